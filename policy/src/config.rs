//! # The configuration file
//!
//! Parses `tcmu-warden.toml` (schema in the [crate documentation](crate)) into a validated
//! [`Config`]. Parsing is two-step: serde reads the text into private `Raw*` structs that keep
//! each value's byte span, then [`Config::from_toml_str`] checks every value and builds the
//! public, span-free types. Every error, syntactic or semantic, is a [`ConfigError`] that names
//! the file, line and column of the offending value.
//!
//! This module owns the schema and its validation. It never touches the file system beyond
//! reading the configuration file itself (whether an allowed path exists is checked when a
//! device is admitted, not here, because storage may be mounted after the daemon starts).

use std::fmt;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::size::ByteSize;

/// Handler subtypes this configuration schema knows.
pub const KNOWN_SUBTYPES: &[&str] = &["file", "ram"];

/// Where logs go and how they look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines on stderr.
    Text,
    /// One JSON object per line on stderr.
    Json,
    /// Native journald entries (structured fields preserved).
    Journald,
}

impl LogFormat {
    /// The name used in the configuration file and in `TCMU_WARDEN_LOG_FORMAT`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
            LogFormat::Journald => "journald",
        }
    }

    /// Parses the configuration-file spelling.
    pub fn from_name(name: &str) -> Option<LogFormat> {
        match name {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            "journald" => Some(LogFormat::Journald),
            _ => None,
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How devices of one subtype are spread over worker processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// One worker serves every device of the subtype.
    #[default]
    Subtype,
    /// Every device gets a worker of its own.
    Device,
}

impl Isolation {
    /// The configuration-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Subtype => "subtype",
            Isolation::Device => "device",
        }
    }
}

/// Which copy of the kernel's device events (uevents) the daemon follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UeventSource {
    /// udev's copy when systemd-udevd runs (`/run/udev/control` exists), the kernel's
    /// otherwise.
    #[default]
    Auto,
    /// udev's copy (sent once udev created `/dev/uioN`).
    Udev,
    /// The kernel's copy.
    Kernel,
}

impl UeventSource {
    /// The configuration-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            UeventSource::Auto => "auto",
            UeventSource::Udev => "udev",
            UeventSource::Kernel => "kernel",
        }
    }
}

/// Default path of the control socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/tcmu-warden/control.sock";

/// Default drain deadline at shutdown, in seconds.
pub const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 30;

/// The `[daemon]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// The worker executable; `None` means `tcmu-warden-worker` next to the running supervisor
    /// (the supervisor resolves it, since only it knows where it runs from).
    pub worker_exe: Option<PathBuf>,
    /// Where `class/uio` and `kernel/config` live (default `/sys`).
    pub sysfs_root: PathBuf,
    /// Where the `uioN` device nodes live (default `/dev`).
    pub dev_root: PathBuf,
    /// The chosen log format; `None` means journald under systemd (`JOURNAL_STREAM` set), text
    /// otherwise.
    pub log_format: Option<LogFormat>,
    /// The control socket `tcmu-warden status` talks to (default
    /// [`DEFAULT_CONTROL_SOCKET`]).
    pub control_socket: PathBuf,
    /// How long a shutdown waits for in-flight commands before workers are killed, in seconds
    /// (default [`DEFAULT_DRAIN_TIMEOUT_SECS`], 1..=3600).
    pub drain_timeout_secs: u64,
    /// Which copy of the kernel's uevents to follow.
    pub uevent_source: UeventSource,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            worker_exe: None,
            sysfs_root: PathBuf::from("/sys"),
            dev_root: PathBuf::from("/dev"),
            log_format: None,
            control_socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            drain_timeout_secs: DEFAULT_DRAIN_TIMEOUT_SECS,
            uevent_source: UeventSource::Auto,
        }
    }
}

/// The `[handler.file]` section: devices backed by a file or block device named by the
/// cfgstring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHandlerConfig {
    /// Absolute, lexically normalized paths: directories whose files may back devices, or block
    /// devices (or files) allowed by their exact path.
    pub allow_paths: Vec<PathBuf>,
    /// How devices are spread over workers.
    pub isolation: Isolation,
}

/// The `[handler.ram]` section: volatile devices held in the worker's memory.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RamHandlerConfig {
    /// Largest device size accepted, in bytes (`None`: no cap).
    pub max_size: Option<u64>,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from (for messages).
    pub source: PathBuf,
    /// `[daemon]`.
    pub daemon: DaemonConfig,
    /// `[handler.file]`, if present.
    pub file: Option<FileHandlerConfig>,
    /// `[handler.ram]`, if present.
    pub ram: Option<RamHandlerConfig>,
}

/// A configuration file that could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: {source}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or violates the schema.
    #[error("{}{}: {message}", file.display(), location_suffix(*line, *column))]
    Invalid {
        /// The file.
        file: PathBuf,
        /// 1-based line of the offending value, when known.
        line: Option<usize>,
        /// 1-based column of the offending value, when known.
        column: Option<usize>,
        /// What is wrong.
        message: String,
    },
}

fn location_suffix(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

impl ConfigError {
    /// The 1-based line the error points at, if any.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Invalid { line, .. } => *line,
            ConfigError::Read { .. } => None,
        }
    }
}

// ---- raw, span-keeping schema ---------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    handler: RawHandlers,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    worker_exe: Option<Spanned<String>>,
    sysfs_root: Option<Spanned<String>>,
    dev_root: Option<Spanned<String>>,
    log_format: Option<LogFormat>,
    control_socket: Option<Spanned<String>>,
    drain_timeout: Option<Spanned<i64>>,
    uevent_source: Option<UeventSource>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHandlers {
    file: Option<RawFile>,
    ram: Option<RawRam>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    allow_paths: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    isolation: Isolation,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRam {
    max_size: Option<Spanned<ByteSize>>,
}

/// Converts byte offsets into 1-based line/column for messages.
struct Locator<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    fn error(&self, span: Option<Range<usize>>, message: impl Into<String>) -> ConfigError {
        let (line, column) = match span {
            Some(span) => {
                let (l, c) = self.line_col(span.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }

    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
        (line, column)
    }

    /// An absolute path without `..`, normalized (`//` and `.` removed).
    fn absolute_path(&self, key: &str, value: &Spanned<String>) -> Result<PathBuf, ConfigError> {
        normalize_absolute(value.get_ref())
            .map_err(|why| self.error(Some(value.span()), format!("{key}: {why}")))
    }
}

/// Lexically normalizes an absolute path: removes `.` and repeated or trailing slashes. Refuses
/// relative paths, `..` components and NUL bytes with a message saying which.
pub(crate) fn normalize_absolute(text: &str) -> Result<PathBuf, String> {
    if text.is_empty() {
        return Err("empty path".into());
    }
    if text.contains('\0') {
        return Err(format!("{text:?} contains a NUL byte"));
    }
    let path = Path::new(text);
    if !path.is_absolute() {
        return Err(format!("{text:?} is not an absolute path"));
    }
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                return Err(format!("{text:?} contains a `..` component"));
            }
            Component::Prefix(_) => return Err(format!("{text:?} is not a Unix path")),
        }
    }
    Ok(out)
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Config::from_toml_str(&text, path)
    }

    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let loc = Locator { file: origin, text };
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| loc.error(e.span(), e.message().trim_end()))?;

        let mut daemon = DaemonConfig::default();
        if let Some(exe) = &raw.daemon.worker_exe {
            daemon.worker_exe = Some(loc.absolute_path("daemon.worker_exe", exe)?);
        }
        if let Some(root) = &raw.daemon.sysfs_root {
            daemon.sysfs_root = loc.absolute_path("daemon.sysfs_root", root)?;
        }
        if let Some(root) = &raw.daemon.dev_root {
            daemon.dev_root = loc.absolute_path("daemon.dev_root", root)?;
        }
        daemon.log_format = raw.daemon.log_format;
        if let Some(sock) = &raw.daemon.control_socket {
            daemon.control_socket = loc.absolute_path("daemon.control_socket", sock)?;
        }
        if let Some(secs) = &raw.daemon.drain_timeout {
            daemon.drain_timeout_secs = u64::try_from(*secs.get_ref())
                .ok()
                .filter(|s| (1..=3600).contains(s))
                .ok_or_else(|| {
                    loc.error(
                        Some(secs.span()),
                        "daemon.drain_timeout must be a number of seconds in 1..=3600",
                    )
                })?;
        }
        if let Some(source) = raw.daemon.uevent_source {
            daemon.uevent_source = source;
        }

        let file = match raw.handler.file {
            None => None,
            Some(f) => {
                if f.allow_paths.get_ref().is_empty() {
                    return Err(loc.error(
                        Some(f.allow_paths.span()),
                        "handler.file.allow_paths is empty: no file could ever back a device \
                         (remove the [handler.file] section to refuse every file device)",
                    ));
                }
                let mut allow_paths = Vec::new();
                for entry in f.allow_paths.get_ref() {
                    let path = loc.absolute_path("handler.file.allow_paths", entry)?;
                    if !allow_paths.contains(&path) {
                        allow_paths.push(path);
                    }
                }
                Some(FileHandlerConfig {
                    allow_paths,
                    isolation: f.isolation,
                })
            }
        };

        let ram = match raw.handler.ram {
            None => None,
            Some(r) => {
                let max_size = match r.max_size {
                    None => None,
                    Some(size) => {
                        if size.get_ref().0 == 0 {
                            return Err(loc.error(
                                Some(size.span()),
                                "handler.ram.max_size must be larger than zero",
                            ));
                        }
                        Some(size.get_ref().0)
                    }
                };
                Some(RamHandlerConfig { max_size })
            }
        };

        Ok(Config {
            source: origin.to_path_buf(),
            daemon,
            file,
            ram,
        })
    }

    /// The subtypes that have a `[handler.*]` section, in a fixed order.
    pub fn served_subtypes(&self) -> Vec<&'static str> {
        KNOWN_SUBTYPES
            .iter()
            .copied()
            .filter(|s| self.serves(s))
            .collect()
    }

    /// Whether devices of `subtype` are served (it has a section).
    pub fn serves(&self, subtype: &str) -> bool {
        match subtype {
            "file" => self.file.is_some(),
            "ram" => self.ram.is_some(),
            _ => false,
        }
    }

    /// How devices of `subtype` are spread over workers ([`Isolation::Subtype`] for subtypes
    /// without an `isolation` key).
    pub fn isolation(&self, subtype: &str) -> Isolation {
        match (subtype, &self.file) {
            ("file", Some(f)) => f.isolation,
            _ => Isolation::Subtype,
        }
    }

    /// The configured log format, or the default for the current environment: journald when
    /// started by systemd with its output connected to the journal (`JOURNAL_STREAM` set), text
    /// otherwise.
    pub fn effective_log_format(&self) -> LogFormat {
        self.daemon.log_format.unwrap_or_else(|| {
            if std::env::var_os("JOURNAL_STREAM").is_some() {
                LogFormat::Journald
            } else {
                LogFormat::Text
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Path::new("/etc/tcmu-warden.toml"))
    }

    #[test]
    fn full_example() {
        let cfg = parse(
            r#"
[daemon]
worker_exe = "/usr/libexec/tcmu-warden/tcmu-warden-worker"
sysfs_root = "/tmp/sys"
dev_root = "/tmp/dev/"
log_format = "json"

[handler.file]
allow_paths = ["/var/lib/tcmu", "/srv//disks/.", "/var/lib/tcmu"]
isolation = "device"

[handler.ram]
max_size = "64GiB"
"#,
        )
        .unwrap();
        assert_eq!(
            cfg.daemon.worker_exe.as_deref(),
            Some(Path::new("/usr/libexec/tcmu-warden/tcmu-warden-worker"))
        );
        assert_eq!(cfg.daemon.sysfs_root, Path::new("/tmp/sys"));
        assert_eq!(cfg.daemon.dev_root, Path::new("/tmp/dev"));
        assert_eq!(cfg.daemon.log_format, Some(LogFormat::Json));
        let file = cfg.file.as_ref().unwrap();
        assert_eq!(
            file.allow_paths,
            vec![PathBuf::from("/var/lib/tcmu"), PathBuf::from("/srv/disks")]
        );
        assert_eq!(file.isolation, Isolation::Device);
        assert_eq!(cfg.isolation("file"), Isolation::Device);
        assert_eq!(cfg.ram.as_ref().unwrap().max_size, Some(64 << 30));
        assert_eq!(cfg.served_subtypes(), vec!["file", "ram"]);
        assert_eq!(cfg.effective_log_format(), LogFormat::Json);
    }

    #[test]
    fn defaults() {
        let cfg = parse("").unwrap();
        assert_eq!(cfg.daemon, DaemonConfig::default());
        assert!(cfg.served_subtypes().is_empty());
        assert!(!cfg.serves("file"));
        assert!(!cfg.serves("qcow"));

        let cfg = parse("[handler.ram]\n[handler.file]\nallow_paths=['/a']\n").unwrap();
        assert_eq!(cfg.ram, Some(RamHandlerConfig { max_size: None }));
        assert_eq!(cfg.isolation("file"), Isolation::Subtype);
        assert_eq!(cfg.isolation("ram"), Isolation::Subtype);
    }

    #[test]
    fn operations_keys() {
        let cfg = parse(
            "[daemon]\ncontrol_socket = '/run/x//c.sock'\ndrain_timeout = 5\nuevent_source = 'kernel'\n",
        )
        .unwrap();
        assert_eq!(cfg.daemon.control_socket, Path::new("/run/x/c.sock"));
        assert_eq!(cfg.daemon.drain_timeout_secs, 5);
        assert_eq!(cfg.daemon.uevent_source, UeventSource::Kernel);
        let d = parse("").unwrap().daemon;
        assert_eq!(d.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
        assert_eq!(d.drain_timeout_secs, DEFAULT_DRAIN_TIMEOUT_SECS);
        assert_eq!(d.uevent_source, UeventSource::Auto);
        let (line, _, msg) = error_at("[daemon]\n\ndrain_timeout = 0\n");
        assert_eq!(line, 3);
        assert!(msg.contains("drain_timeout"), "{msg}");
        let (line, _, msg) = error_at("[daemon]\ncontrol_socket = 'rel.sock'\n");
        assert_eq!(line, 2);
        assert!(msg.contains("daemon.control_socket"), "{msg}");
        let (line, _, msg) = error_at("[daemon]\nuevent_source = 'both'\n");
        assert_eq!(line, 2);
        assert!(msg.contains("both"), "{msg}");
    }

    #[test]
    fn integer_size() {
        let cfg = parse("[handler.ram]\nmax_size = 1048576\n").unwrap();
        assert_eq!(cfg.ram.unwrap().max_size, Some(1 << 20));
    }

    fn error_at(text: &str) -> (usize, usize, String) {
        match parse(text).unwrap_err() {
            ConfigError::Invalid {
                line: Some(l),
                column: Some(c),
                message,
                ..
            } => (l, c, message),
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let (line, _, msg) = error_at("[daemon]\nsysfs_root = '/sys'\nworker = 'x'\n");
        assert_eq!(line, 3);
        assert!(msg.contains("unknown field `worker`"), "{msg}");

        let (line, _, msg) = error_at("\n\n[handler.qcow]\nx = 1\n");
        assert_eq!(line, 3);
        assert!(msg.contains("qcow"), "{msg}");

        let (line, _, msg) = error_at("[handler.file]\nallow_paths = ['/a']\nallow = ['/b']\n");
        assert_eq!(line, 3);
        assert!(msg.contains("allow"), "{msg}");
    }

    #[test]
    fn bad_values_name_line_and_column() {
        let (line, col, msg) =
            error_at("[handler.file]\nallow_paths = [\n  '/ok',\n  'relative/dir',\n]\n");
        assert_eq!((line, col), (4, 3));
        assert!(msg.contains("not an absolute path"), "{msg}");

        let (line, _, msg) = error_at("[handler.file]\nallow_paths = ['/a/../etc']\n");
        assert_eq!(line, 2);
        assert!(msg.contains(".."), "{msg}");

        let (line, _, msg) = error_at("[handler.file]\nallow_paths = []\n");
        assert_eq!(line, 2);
        assert!(msg.contains("empty"), "{msg}");

        let (line, _, msg) = error_at("[handler.file]\nisolation = 'device'\n");
        assert_eq!(line, 1);
        assert!(msg.contains("allow_paths"), "{msg}");

        let (line, _, msg) =
            error_at("[handler.file]\nallow_paths = ['/a']\nisolation = 'process'\n");
        assert_eq!(line, 3);
        assert!(msg.contains("process"), "{msg}");

        let (line, _, msg) = error_at("[handler.ram]\n\nmax_size = '12 parsecs'\n");
        assert_eq!(line, 3);
        assert!(msg.contains("parsecs"), "{msg}");

        let (line, _, msg) = error_at("[handler.ram]\nmax_size = -5\n");
        assert_eq!(line, 2);
        assert!(msg.contains("negative"), "{msg}");

        let (line, _, msg) = error_at("[handler.ram]\nmax_size = 0\n");
        assert_eq!(line, 2);
        assert!(msg.contains("zero"), "{msg}");

        let (line, _, msg) = error_at("[daemon]\nlog_format = 'syslog'\n");
        assert_eq!(line, 2);
        assert!(msg.contains("syslog"), "{msg}");

        let (line, _, msg) = error_at("[daemon]\nworker_exe = 'tcmu-warden-worker'\n");
        assert_eq!(line, 2);
        assert!(msg.contains("daemon.worker_exe"), "{msg}");

        let (line, _, _) = error_at("[daemon\n");
        assert_eq!(line, 1);
    }

    #[test]
    fn error_display_names_the_file() {
        let err = parse("[daemon]\nbogus = 1\n").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("/etc/tcmu-warden.toml:2:"), "{text}");
        assert_eq!(err.line(), Some(2));
    }

    #[test]
    fn load_reports_missing_file() {
        let err = Config::load(Path::new("/nonexistent/tcmu-warden.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err.to_string().contains("/nonexistent/tcmu-warden.toml"));
    }

    #[test]
    fn example_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/tcmu-warden.example.toml");
        let cfg = Config::load(&path).unwrap();
        assert!(cfg.serves("file"));
        assert!(cfg.serves("ram"));
    }

    #[test]
    fn log_format_names_roundtrip() {
        for f in [LogFormat::Text, LogFormat::Json, LogFormat::Journald] {
            assert_eq!(LogFormat::from_name(f.as_str()), Some(f));
        }
        assert_eq!(LogFormat::from_name("xml"), None);
    }
}
