//! # The configuration file
//!
//! Parses `tcmu-warden.toml` (the schema is below) into a validated
//! [`Config`]. Parsing is two-step: serde reads the text into private `Raw*` structs that keep
//! each value's byte span, then [`Config::from_toml_str`] checks every value and builds the
//! public, span-free types. Every error, syntactic or semantic, is a [`ConfigError`] that names
//! the file, line and column of the offending value.
//!
//! This module owns the schema and its validation. It never touches the file system beyond
//! reading the configuration file itself (whether an allowed path exists is checked when a
//! device is admitted, not here, because storage may be mounted after the daemon starts).
//!
//! ## The configuration file
//!
//! A commented example lives in `docs/tcmu-warden.example.toml`. Unknown sections and keys are
//! errors, so a typo never silently changes behaviour.
//!
//! ```toml
//! [daemon]
//! # The worker executable. Default: `tcmu-warden-worker` in the directory of the running
//! # `tcmu-warden`. Must be absolute.
//! worker_exe = "/usr/libexec/tcmu-warden/tcmu-warden-worker"
//! # Where sysfs is mounted: `class/uio` and `kernel/config` (configfs) are looked up under it.
//! # Default "/sys". Tests point it at a fake tree.
//! sysfs_root = "/sys"
//! # Where the `uioN` device nodes are. Default "/dev".
//! dev_root = "/dev"
//! # "text" (human-readable, stderr), "json" (one object per line, stderr) or "journald"
//! # (native journal entries). Default: journald when JOURNAL_STREAM is set (started by
//! # systemd with output to the journal), text otherwise.
//! log_format = "text"
//! # Where each device's in-flight journal lives (a tmpfs: it must survive a supervisor restart,
//! # and need not survive a reboot). Default "/run/tcmu-warden/journal".
//! journal_dir = "/run/tcmu-warden/journal"
//! # Worker lifecycle. Durations take a unit: ms, s, m, h.
//! heartbeat_interval = "5s"       # how often a serving worker is pinged
//! heartbeat_timeout = "10s"       # a worker that does not answer a ping this long is killed
//! restart_backoff_initial = "100ms" # delay before restarting a crashed worker, doubling...
//! restart_backoff_max = "30s"     # ...up to this
//! quarantine_after = 5            # this many crashes within quarantine_window: no more
//! quarantine_window = "10m"       # restarts; the worker's devices stay blocked and failed
//! # The control socket `tcmu-warden status` talks to (root only). Default
//! # "/run/tcmu-warden/control.sock".
//! control_socket = "/run/tcmu-warden/control.sock"
//! # At shutdown, how long in-flight SCSI commands may take to finish before workers are
//! # killed (1s to 1h). Default "30s".
//! drain_timeout = "30s"
//! # Which copy of the kernel's device events to follow: "udev" (sent once udev created
//! # /dev/uioN), "kernel", or "auto" (default: udev's when systemd-udevd runs).
//! uevent_source = "auto"
//!
//! # Devices of subtype `file`: the cfgstring is an absolute path to a regular file or a block
//! # device. Without this section every `file` device is refused.
//! [handler.file]
//! # Required, non-empty. Directories whose files (at any depth) may back devices, or paths
//! # allowed exactly (typically a block device such as /dev/disk/by-id/wwn-0x5000c500a1b2c3d4).
//! # Absolute, no `..`. Symlinks *inside* a directory may not lead out of it.
//! allow_paths = ["/var/lib/tcmu", "/srv/disks"]
//! # "subtype" (default): one worker process serves every `file` device.
//! # "device": one worker process per device.
//! isolation = "subtype"
//!
//! # Devices of subtype `ram`: volatile, held in the worker's memory. Without this section every
//! # `ram` device is refused.
//! [handler.ram]
//! # Optional cap on a device's size: an integer (bytes) or a string such as "64GiB", "512MiB",
//! # "10GB" (see [`tcmu_warden_policy::size`] for the units).
//! max_size = "64GiB"
//!
//! # A third-party subtype: its own worker executable, built on the worker runtime.
//! [handler.qcow]
//! exe = "/usr/libexec/qcow-worker"    # required for a subtype the built-in worker lacks
//! backing = "fd"                      # "fd": cfgstring is a path under allow_paths, opened by
//! allow_paths = ["/srv/qcow"]         # the supervisor and passed; "none" (default): no backing
//! ```
//!
//! ## The jail keys
//! The `[jail]` section holds the defaults of every worker (and is exactly the jail of the
//! worker that serves refused devices); each `[handler.<subtype>]` section may override any key
//! (`rlimits` entry by entry). See [`jail`] and `docs/security.md`.
//!
//! ```toml
//! [jail]
//! user = "tcmu"                 # name or number; default: the supervisor's (root)
//! group = "tcmu"                # default: the user's primary group
//! read_paths = []               # read-only landlock grants
//! write_paths = []              # read-write (never execute) landlock grants
//! network = "none"              # or "tcp" with connect_ports = [3260]
//! syscalls = []                 # extra names for the stage-two seccomp allow-list
//! namespaces = ["ipc", "net", "uts"]   # default; "net" only without TCP; also "mount", "cgroup"
//! landlock = "required"         # or "best-effort"
//! seccomp_action = "kill"       # or "log": a debugging aid, NOT FOR PRODUCTION
//! io_uring = false
//! io_threads = 4                # the worker's shared I/O pool (1..=256); plus one event-loop thread
//! rlimits = { open_files = 4096, core_size = 0, address_space = "64GiB", processes = 256 }
//! ```
//!
//! A device whose subtype has no section, whose cfgstring the rules refuse, or that has no
//! subtype at all is *refused*. A device created while the daemon runs is refused to the kernel:
//! the administrator's configfs `enable` write fails with an error, and the log says why. A
//! device that already existed when the daemon started is still handed to a worker that
//! answers every SCSI command with NOT READY, so initiators fail at once rather than time out.

pub mod admit;
pub mod duration;

pub use admit::{Admission, PolicyError};
pub use duration::{DurationError, HumanDuration, format_duration, parse_duration};

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use tcmu_warden_policy::JailSpec;
use tcmu_warden_policy::jail::settings::{
    Backing, Id, JailSettings, LandlockMode, Namespace, Network, Rlimits, SeccompMode,
};
use tcmu_warden_policy::size::ByteSize;

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

/// Default drain deadline at shutdown.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Paths that `allow_paths` may name but almost certainly should not: the root and the trees
/// holding the system itself, its secrets and its devices ([`Config::warnings`]).
const SYSTEM_TREES: &[&str] = &[
    "/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/root", "/run", "/sbin",
    "/sys", "/usr", "/var",
];

/// Largest configuration file accepted. A real one is a few KiB; this bounds what a mistake
/// (a log file or an image named as the configuration) can cost.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

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
    /// How long a shutdown waits for in-flight commands before workers are killed (default
    /// [`DEFAULT_DRAIN_TIMEOUT`], 1 s to 1 h).
    pub drain_timeout: Duration,
    /// Which copy of the kernel's uevents to follow.
    pub uevent_source: UeventSource,
    /// Where the devices' in-flight journals live (default `/run/tcmu-warden/journal`). They
    /// must outlive the supervisor process (so a restarted supervisor can recover its devices)
    /// but not a reboot (the kernel's rings do not either): a tmpfs such as `/run`.
    pub journal_dir: PathBuf,
    /// Worker lifecycle timing and limits.
    pub lifecycle: Lifecycle,
}

/// How the supervisor watches and restarts workers (keys of `[daemon]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifecycle {
    /// How often a serving worker is pinged (`heartbeat_interval`, default 5 s).
    pub heartbeat_interval: Duration,
    /// How long a worker has to answer a ping before it is killed as hung
    /// (`heartbeat_timeout`, default 10 s).
    pub heartbeat_timeout: Duration,
    /// Delay before the first restart after a crash (`restart_backoff_initial`, default
    /// 100 ms); it doubles with each further crash inside the window.
    pub restart_backoff_initial: Duration,
    /// Longest restart delay (`restart_backoff_max`, default 30 s).
    pub restart_backoff_max: Duration,
    /// A worker that crashes this many times within `quarantine_window` is not restarted any
    /// more: its devices stay blocked and are reported failed (`quarantine_after`, default 5).
    pub quarantine_after: u32,
    /// See `quarantine_after` (`quarantine_window`, default 10 minutes).
    pub quarantine_window: Duration,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(10),
            restart_backoff_initial: Duration::from_millis(100),
            restart_backoff_max: Duration::from_secs(30),
            quarantine_after: 5,
            quarantine_window: Duration::from_secs(600),
        }
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            worker_exe: None,
            sysfs_root: PathBuf::from("/sys"),
            dev_root: PathBuf::from("/dev"),
            log_format: None,
            control_socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            uevent_source: UeventSource::Auto,
            journal_dir: PathBuf::from("/run/tcmu-warden/journal"),
            lifecycle: Lifecycle::default(),
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
    /// `[jail]`: the confinement of every worker unless its handler section overrides a key
    /// (the worker of refused devices gets exactly this).
    pub jail: JailSettings,
    /// Every `[handler.<subtype>]` section, built-in and third-party, by subtype.
    pub handlers: BTreeMap<String, HandlerPolicy>,
}

/// One `[handler.<subtype>]` section: which worker serves the subtype, how its devices are
/// spread and admitted, and the jail its workers run in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerPolicy {
    /// The subtype.
    pub subtype: String,
    /// The worker executable (`None`: `daemon.worker_exe`, the built-in worker).
    pub exe: Option<PathBuf>,
    /// How devices are spread over workers.
    pub isolation: Isolation,
    /// How a device's backing store reaches the worker.
    pub backing: Backing,
    /// With [`Backing::Fd`]: the absolute, normalized paths beneath which (or exactly at which)
    /// a cfgstring may name a backing store. Empty otherwise.
    pub allow_paths: Vec<PathBuf>,
    /// `ram` only: largest device size accepted, in bytes.
    pub max_size: Option<u64>,
    /// The effective jail settings (`[jail]` with this section's overrides).
    pub jail: JailSettings,
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
    jail: Option<Spanned<RawSection>>,
    #[serde(default)]
    handler: BTreeMap<String, Spanned<RawSection>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    worker_exe: Option<Spanned<String>>,
    sysfs_root: Option<Spanned<String>>,
    dev_root: Option<Spanned<String>>,
    log_format: Option<LogFormat>,
    control_socket: Option<Spanned<String>>,
    drain_timeout: Option<Spanned<HumanDuration>>,
    uevent_source: Option<UeventSource>,
    journal_dir: Option<Spanned<String>>,
    heartbeat_interval: Option<Spanned<HumanDuration>>,
    heartbeat_timeout: Option<Spanned<HumanDuration>>,
    restart_backoff_initial: Option<Spanned<HumanDuration>>,
    restart_backoff_max: Option<Spanned<HumanDuration>>,
    quarantine_after: Option<Spanned<u32>>,
    quarantine_window: Option<Spanned<HumanDuration>>,
}

type SpannedList<T> = Spanned<Vec<Spanned<T>>>;

/// Every key a `[handler.<subtype>]` or `[jail]` section may hold; which ones a given section
/// accepts is checked after parsing, so the error names the key and its line.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSection {
    // handler-only keys
    exe: Option<Spanned<String>>,
    isolation: Option<Spanned<Isolation>>,
    backing: Option<Spanned<String>>,
    allow_paths: Option<SpannedList<String>>,
    max_size: Option<Spanned<ByteSize>>,
    // jail keys (in [jail] and in handler sections)
    user: Option<Spanned<RawId>>,
    group: Option<Spanned<RawId>>,
    read_paths: Option<SpannedList<String>>,
    write_paths: Option<SpannedList<String>>,
    network: Option<Spanned<String>>,
    connect_ports: Option<SpannedList<i64>>,
    syscalls: Option<SpannedList<String>>,
    rlimits: Option<Spanned<RawRlimits>>,
    namespaces: Option<SpannedList<String>>,
    landlock: Option<Spanned<String>>,
    seccomp_action: Option<Spanned<String>>,
    io_uring: Option<Spanned<bool>>,
    io_threads: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawId {
    Number(i64),
    Name(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRlimits {
    open_files: Option<Spanned<i64>>,
    address_space: Option<Spanned<ByteSize>>,
    processes: Option<Spanned<i64>>,
    core_size: Option<Spanned<ByteSize>>,
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

    /// A TOML syntax or schema error, located; a duplicate key or table is named (the parser
    /// only says "duplicate key").
    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let message = e.message().trim_end();
        let named = e
            .span()
            .filter(|_| message.starts_with("duplicate key"))
            .and_then(|span| {
                let before = self.text.get(..span.start)?;
                let line_start = before.rfind('\n').map_or(0, |i| i + 1);
                let line_end = self
                    .text
                    .get(span.start..)
                    .and_then(|rest| rest.find('\n'))
                    .map_or(self.text.len(), |i| span.start + i);
                let line = self.text.get(line_start..line_end)?.trim();
                let key = self.text.get(span)?.trim();
                Some(if line.starts_with('[') {
                    let table = line
                        .split(']')
                        .next()
                        .unwrap_or(line)
                        .trim_start_matches('[');
                    format!(
                        "duplicate table [{table}]: it is already defined above (merge the two)"
                    )
                } else {
                    format!("duplicate key `{key}`: it is already set above in this table")
                })
            });
        match named {
            Some(m) => self.error(e.span(), m),
            None => self.error(e.span(), message),
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

    /// A list of absolute paths, normalized and without duplicates.
    fn path_list(
        &self,
        key: &str,
        list: &SpannedList<String>,
    ) -> Result<Vec<PathBuf>, ConfigError> {
        let mut out = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for entry in list.get_ref() {
            let path = self.absolute_path(key, entry)?;
            if seen.insert(path.clone()) {
                out.push(path);
            }
        }
        Ok(out)
    }

    /// Refuses keys that only a `[handler.<subtype>]` section may hold.
    fn refuse_handler_keys(&self, section: &Spanned<RawSection>) -> Result<(), ConfigError> {
        let s = section.get_ref();
        let spans = [
            ("exe", s.exe.as_ref().map(Spanned::span)),
            ("isolation", s.isolation.as_ref().map(Spanned::span)),
            ("backing", s.backing.as_ref().map(Spanned::span)),
            ("allow_paths", s.allow_paths.as_ref().map(Spanned::span)),
            ("max_size", s.max_size.as_ref().map(Spanned::span)),
        ];
        for (key, span) in spans {
            if let Some(span) = span {
                return Err(self.error(
                    Some(span),
                    format!("jail.{key}: `{key}` belongs in a [handler.<subtype>] section"),
                ));
            }
        }
        Ok(())
    }

    /// A user or group id: a number, or a name looked up in the system's databases.
    fn id(&self, key: &str, value: &Spanned<RawId>, group: bool) -> Result<Id, ConfigError> {
        let span = Some(value.span());
        let (name, id) = match value.get_ref() {
            RawId::Number(n) => {
                let id = u32::try_from(*n)
                    .ok()
                    .filter(|id| *id != u32::MAX)
                    .ok_or_else(|| self.error(span.clone(), format!("{key}: {n} is not an id")))?;
                (n.to_string(), id)
            }
            RawId::Name(name) => {
                if let Ok(id) = name.parse::<u32>() {
                    (name.clone(), id)
                } else if group {
                    let found = nix::unistd::Group::from_name(name).map_err(|e| {
                        self.error(span.clone(), format!("{key}: looking up {name:?}: {e}"))
                    })?;
                    let g = found.ok_or_else(|| {
                        self.error(span.clone(), format!("{key}: no such group {name:?}"))
                    })?;
                    (name.clone(), g.gid.as_raw())
                } else {
                    let found = nix::unistd::User::from_name(name).map_err(|e| {
                        self.error(span.clone(), format!("{key}: looking up {name:?}: {e}"))
                    })?;
                    let u = found.ok_or_else(|| {
                        self.error(span.clone(), format!("{key}: no such user {name:?}"))
                    })?;
                    (name.clone(), u.uid.as_raw())
                }
            }
        };
        Ok(Id { name, id })
    }

    /// The jail keys of `section` applied over `base`. `prefix` names the section in errors
    /// (`jail`, `handler.file`).
    fn jail_settings(
        &self,
        prefix: &str,
        s: &RawSection,
        base: &JailSettings,
    ) -> Result<JailSettings, ConfigError> {
        let mut out = base.clone();
        if let Some(user) = &s.user {
            let id = self.id(&format!("{prefix}.user"), user, false)?;
            // A user named without a group runs with that user's primary group.
            if s.group.is_none() {
                let gid = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(id.id))
                    .ok()
                    .flatten()
                    .map(|u| u.gid.as_raw());
                out.group = match gid {
                    Some(gid) => Some(Id {
                        name: gid.to_string(),
                        id: gid,
                    }),
                    None => {
                        return Err(self.error(
                            Some(user.span()),
                            format!(
                                "{prefix}.user: uid {} has no entry in the user database, so \
                                 `group` must be given too",
                                id.id
                            ),
                        ));
                    }
                };
            }
            out.user = Some(id);
        }
        if let Some(group) = &s.group {
            out.group = Some(self.id(&format!("{prefix}.group"), group, true)?);
        }
        if let Some(list) = &s.read_paths {
            out.read_paths = self.path_list(&format!("{prefix}.read_paths"), list)?;
        }
        if let Some(list) = &s.write_paths {
            out.write_paths = self.path_list(&format!("{prefix}.write_paths"), list)?;
        }
        let network_kind = match &s.network {
            None => None,
            Some(n) => match n.get_ref().as_str() {
                "none" => Some(false),
                "tcp" => Some(true),
                other => {
                    return Err(self.error(
                        Some(n.span()),
                        format!("{prefix}.network: {other:?} is not \"none\" or \"tcp\""),
                    ));
                }
            },
        };
        let ports = match &s.connect_ports {
            None => None,
            Some(list) => {
                let mut ports = Vec::new();
                for p in list.get_ref() {
                    let port = u16::try_from(*p.get_ref())
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| {
                            self.error(
                                Some(p.span()),
                                format!(
                                    "{prefix}.connect_ports: {} is not a TCP port (1-65535)",
                                    p.get_ref()
                                ),
                            )
                        })?;
                    if !ports.contains(&port) {
                        ports.push(port);
                    }
                }
                Some((ports, list.span()))
            }
        };
        match (network_kind, ports) {
            (Some(false), Some((_, span))) => {
                return Err(self.error(
                    Some(span),
                    format!("{prefix}.connect_ports needs network = \"tcp\""),
                ));
            }
            (Some(false), None) => out.network = Network::None,
            (Some(true), Some((ports, span))) => {
                if ports.is_empty() {
                    return Err(self.error(
                        Some(span),
                        format!("{prefix}.connect_ports is empty: list the ports to connect to"),
                    ));
                }
                out.network = Network::Tcp {
                    connect_ports: ports,
                };
            }
            (Some(true), None) => {
                let span = s.network.as_ref().map(Spanned::span);
                return Err(self.error(
                    span,
                    format!("{prefix}.network = \"tcp\" needs connect_ports = [...]"),
                ));
            }
            (None, Some((ports, span))) => match out.network {
                Network::Tcp { .. } if !ports.is_empty() => {
                    out.network = Network::Tcp {
                        connect_ports: ports,
                    };
                }
                _ => {
                    return Err(self.error(
                        Some(span),
                        format!("{prefix}.connect_ports needs network = \"tcp\""),
                    ));
                }
            },
            (None, None) => {}
        }
        if let Some(list) = &s.syscalls {
            let mut names = Vec::new();
            for entry in list.get_ref() {
                let name = entry.get_ref();
                if let Err(why) = tcmu_warden_policy::jail::seccomp::check_extra_syscall(name) {
                    return Err(self.error(Some(entry.span()), format!("{prefix}.syscalls: {why}")));
                }
                if !names.contains(name) {
                    names.push(name.clone());
                }
            }
            out.syscalls = names;
        }
        if let Some(limits) = &s.rlimits {
            out.rlimits = self.rlimits(prefix, limits.get_ref(), &out.rlimits)?;
        }
        if let Some(list) = &s.namespaces {
            let mut spaces = Vec::new();
            for entry in list.get_ref() {
                let ns = Namespace::from_name(entry.get_ref()).ok_or_else(|| {
                    self.error(
                        Some(entry.span()),
                        format!(
                            "{prefix}.namespaces: {:?} is not one of {}",
                            entry.get_ref(),
                            Namespace::ALL.map(Namespace::as_str).join(", ")
                        ),
                    )
                })?;
                if !spaces.contains(&ns) {
                    spaces.push(ns);
                }
            }
            out.namespaces = Some(spaces);
        }
        if let Some(mode) = &s.landlock {
            out.landlock = LandlockMode::from_name(mode.get_ref()).ok_or_else(|| {
                self.error(
                    Some(mode.span()),
                    format!(
                        "{prefix}.landlock: {:?} is not \"required\" or \"best-effort\"",
                        mode.get_ref()
                    ),
                )
            })?;
        }
        if let Some(mode) = &s.seccomp_action {
            out.seccomp_action = SeccompMode::from_name(mode.get_ref()).ok_or_else(|| {
                self.error(
                    Some(mode.span()),
                    format!(
                        "{prefix}.seccomp_action: {:?} is not \"kill\" or \"log\"",
                        mode.get_ref()
                    ),
                )
            })?;
        }
        if let Some(flag) = &s.io_uring {
            out.io_uring = *flag.get_ref();
        }
        if let Some(n) = &s.io_threads {
            let v = *n.get_ref();
            let ok = u16::try_from(v).ok().filter(|v| (1..=256).contains(v));
            out.io_threads = Some(ok.ok_or_else(|| {
                self.error(
                    Some(n.span()),
                    format!("{prefix}.io_threads: {v} is not between 1 and 256"),
                )
            })?);
        }
        // The effective combination must make sense, wherever its parts were set.
        if matches!(out.network, Network::Tcp { .. })
            && out
                .namespaces
                .as_ref()
                .is_some_and(|n| n.contains(&Namespace::Net))
        {
            let span = s
                .namespaces
                .as_ref()
                .map(Spanned::span)
                .or_else(|| s.network.as_ref().map(Spanned::span));
            return Err(self.error(
                span,
                format!(
                    "{prefix}: network = \"tcp\" cannot work in a new \"net\" namespace (it has \
                     no interfaces); remove \"net\" from namespaces"
                ),
            ));
        }
        Ok(out)
    }

    fn rlimits(
        &self,
        prefix: &str,
        raw: &RawRlimits,
        base: &Rlimits,
    ) -> Result<Rlimits, ConfigError> {
        let mut out = *base;
        let count = |key: &str, v: &Spanned<i64>, min: i64| -> Result<u64, ConfigError> {
            let n = *v.get_ref();
            if n < min {
                return Err(self.error(
                    Some(v.span()),
                    format!("{prefix}.rlimits.{key}: {n} is below the minimum of {min}"),
                ));
            }
            Ok(n.unsigned_abs())
        };
        if let Some(v) = &raw.open_files {
            // The runtime needs a handful of descriptors of its own.
            out.open_files = count("open_files", v, 16)?;
        }
        if let Some(v) = &raw.processes {
            out.processes = Some(count("processes", v, 1)?);
        }
        if let Some(v) = &raw.address_space {
            let bytes = v.get_ref().0;
            if bytes < MIN_ADDRESS_SPACE {
                return Err(self.error(
                    Some(v.span()),
                    format!(
                        "{prefix}.rlimits.address_space: {} is too small for a worker (at least {})",
                        tcmu_warden_policy::size::format_size(bytes),
                        tcmu_warden_policy::size::format_size(MIN_ADDRESS_SPACE)
                    ),
                ));
            }
            out.address_space = Some(bytes);
        }
        if let Some(v) = &raw.core_size {
            out.core_size = v.get_ref().0;
        }
        Ok(out)
    }

    /// One `[handler.<subtype>]` section.
    fn handler(
        &self,
        subtype: &str,
        section: &Spanned<RawSection>,
        defaults: &JailSettings,
    ) -> Result<HandlerPolicy, ConfigError> {
        let prefix = format!("handler.{subtype}");
        let s = section.get_ref();
        let here = Some(section.span());
        if !is_subtype_name(subtype) {
            return Err(self.error(
                here,
                format!(
                    "[{prefix}]: {subtype:?} is not a subtype name (letters, digits, `_`, `-`, at \
                     most 64)"
                ),
            ));
        }
        let builtin = KNOWN_SUBTYPES.contains(&subtype);
        let exe = match &s.exe {
            Some(exe) => Some(self.absolute_path(&format!("{prefix}.exe"), exe)?),
            None if builtin => None,
            None => {
                return Err(self.error(
                    here,
                    format!(
                        "[{prefix}] needs exe = \"/path/to/worker\": the built-in worker serves \
                         only {}",
                        KNOWN_SUBTYPES.join(" and ")
                    ),
                ));
            }
        };
        let default_backing = if subtype == "file" {
            Backing::Fd
        } else {
            Backing::None
        };
        let backing = match &s.backing {
            None => default_backing,
            Some(b) => {
                let backing = Backing::from_name(b.get_ref()).ok_or_else(|| {
                    self.error(
                        Some(b.span()),
                        format!(
                            "{prefix}.backing: {:?} is not \"fd\" or \"none\"",
                            b.get_ref()
                        ),
                    )
                })?;
                if builtin && backing != default_backing {
                    return Err(self.error(
                        Some(b.span()),
                        format!(
                            "{prefix}.backing: the built-in {subtype} handler needs backing = {:?}",
                            default_backing.as_str()
                        ),
                    ));
                }
                backing
            }
        };
        let allow_paths = match (&s.allow_paths, backing) {
            (None, Backing::Fd) => {
                return Err(self.error(
                    here,
                    format!(
                        "[{prefix}] needs allow_paths = [...]: the directories or files whose \
                         paths a cfgstring may name"
                    ),
                ));
            }
            (Some(list), Backing::Fd) => {
                if list.get_ref().is_empty() {
                    return Err(self.error(
                        Some(list.span()),
                        format!(
                            "{prefix}.allow_paths is empty: no file could ever back a device \
                             (remove the [{prefix}] section to refuse every {subtype} device)"
                        ),
                    ));
                }
                self.path_list(&format!("{prefix}.allow_paths"), list)?
            }
            (Some(list), Backing::None) => {
                return Err(self.error(
                    Some(list.span()),
                    format!(
                        "{prefix}.allow_paths only applies with backing = \"fd\" (for paths the \
                         worker opens itself, use read_paths or write_paths)"
                    ),
                ));
            }
            (None, Backing::None) => Vec::new(),
        };
        let max_size = match &s.max_size {
            None => None,
            Some(_) if subtype != "ram" => {
                let span = s.max_size.as_ref().map(Spanned::span);
                return Err(self.error(
                    span,
                    format!("{prefix}.max_size: only [handler.ram] has a max_size"),
                ));
            }
            Some(size) => {
                if size.get_ref().0 == 0 {
                    return Err(self.error(
                        Some(size.span()),
                        "handler.ram.max_size must be larger than zero",
                    ));
                }
                Some(size.get_ref().0)
            }
        };
        let isolation = s
            .isolation
            .as_ref()
            .map_or(Isolation::Subtype, |i| *i.get_ref());
        let jail = self.jail_settings(&prefix, s, defaults)?;
        Ok(HandlerPolicy {
            subtype: subtype.to_owned(),
            exe,
            isolation,
            backing,
            allow_paths,
            max_size,
            jail,
        })
    }
}

/// The smallest `rlimits.address_space` accepted: below this a worker cannot even start its
/// threads.
const MIN_ADDRESS_SPACE: u64 = 256 << 20;

/// Whether `name` can be a subtype: 1 to 64 ASCII letters, digits, `_` or `-`.
fn is_subtype_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Why a path is not an absolute, normalizable Unix path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The text is empty.
    #[error("empty path")]
    Empty,
    /// It holds a NUL byte.
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    /// It is relative.
    #[error("{0:?} is not an absolute path")]
    Relative(String),
    /// It has a `..` component.
    #[error("{0:?} contains a `..` component")]
    ParentDir(String),
    /// It has a prefix no Unix path has.
    #[error("{0:?} is not a Unix path")]
    NotUnix(String),
    /// It cannot be split at the allowed directory it lies under.
    #[error("cannot be split at its allowed directory")]
    Unsplittable,
}

/// Lexically normalizes an absolute path: removes `.` and repeated or trailing slashes. Refuses
/// relative paths, `..` components and NUL bytes, saying which.
pub(crate) fn normalize_absolute(text: &str) -> Result<PathBuf, PathError> {
    if text.is_empty() {
        return Err(PathError::Empty);
    }
    if text.contains('\0') {
        return Err(PathError::Nul(text.to_owned()));
    }
    let path = Path::new(text);
    if !path.is_absolute() {
        return Err(PathError::Relative(text.to_owned()));
    }
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir => return Err(PathError::ParentDir(text.to_owned())),
            Component::Prefix(_) => return Err(PathError::NotUnix(text.to_owned())),
        }
    }
    Ok(out)
}

impl Config {
    /// The jail of the worker for `subtype` (`None`: the worker of refused devices, which gets
    /// `[jail]` as is). `default_exe` is the daemon's worker executable.
    pub fn jail_for(&self, subtype: Option<&str>, default_exe: &Path) -> JailSpec {
        match subtype.and_then(|s| self.handler(s)) {
            Some(h) => {
                let exe = h.exe.as_deref().unwrap_or(default_exe);
                let backing: &[PathBuf] = match h.backing {
                    Backing::Fd => &h.allow_paths,
                    Backing::None => &[],
                };
                JailSpec::new(exe, &h.jail, backing)
            }
            None => JailSpec::new(default_exe, &self.jail, &[]),
        }
    }

    /// Reads and validates a configuration file of at most [`MAX_CONFIG_BYTES`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        use std::io::Read as _;
        let read_err = |source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut text = String::new();
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::Invalid {
                file: path.to_path_buf(),
                line: None,
                column: None,
                message: format!(
                    "larger than {MAX_CONFIG_BYTES} bytes: is this the configuration file?"
                ),
            });
        }
        Config::from_toml_str(&text, path)
    }

    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let loc = Locator { file: origin, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| loc.toml_error(&e))?;

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
        if let Some(t) = &raw.daemon.drain_timeout {
            let d = t.get_ref().0;
            if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&d) {
                return Err(loc.error(
                    Some(t.span()),
                    format!(
                        "daemon.drain_timeout must be between 1s and 1h (got {})",
                        format_duration(d)
                    ),
                ));
            }
            daemon.drain_timeout = d;
        }
        if let Some(source) = raw.daemon.uevent_source {
            daemon.uevent_source = source;
        }
        if let Some(dir) = &raw.daemon.journal_dir {
            daemon.journal_dir = loc.absolute_path("daemon.journal_dir", dir)?;
        }
        let lc = &mut daemon.lifecycle;
        let positive = |key: &str, v: &Option<Spanned<HumanDuration>>, into: &mut Duration| {
            if let Some(v) = v {
                if v.get_ref().0.is_zero() {
                    return Err(loc.error(
                        Some(v.span()),
                        format!("daemon.{key} must be longer than zero"),
                    ));
                }
                *into = v.get_ref().0;
            }
            Ok(())
        };
        positive(
            "heartbeat_interval",
            &raw.daemon.heartbeat_interval,
            &mut lc.heartbeat_interval,
        )?;
        positive(
            "heartbeat_timeout",
            &raw.daemon.heartbeat_timeout,
            &mut lc.heartbeat_timeout,
        )?;
        positive(
            "restart_backoff_initial",
            &raw.daemon.restart_backoff_initial,
            &mut lc.restart_backoff_initial,
        )?;
        positive(
            "restart_backoff_max",
            &raw.daemon.restart_backoff_max,
            &mut lc.restart_backoff_max,
        )?;
        positive(
            "quarantine_window",
            &raw.daemon.quarantine_window,
            &mut lc.quarantine_window,
        )?;
        if lc.restart_backoff_max < lc.restart_backoff_initial {
            let span = raw
                .daemon
                .restart_backoff_max
                .as_ref()
                .or(raw.daemon.restart_backoff_initial.as_ref())
                .map(Spanned::span);
            return Err(loc.error(
                span,
                "daemon.restart_backoff_max is shorter than daemon.restart_backoff_initial",
            ));
        }
        if let Some(n) = &raw.daemon.quarantine_after {
            if *n.get_ref() == 0 {
                return Err(loc.error(Some(n.span()), "daemon.quarantine_after must be at least 1"));
            }
            lc.quarantine_after = *n.get_ref();
        }

        let jail_defaults = match &raw.jail {
            None => JailSettings::default(),
            Some(section) => {
                loc.refuse_handler_keys(section)?;
                loc.jail_settings("jail", section.get_ref(), &JailSettings::default())?
            }
        };

        let mut handlers = BTreeMap::new();
        for (subtype, section) in &raw.handler {
            let policy = loc.handler(subtype, section, &jail_defaults)?;
            handlers.insert(subtype.clone(), policy);
        }

        let file = handlers
            .get("file")
            .map(|h: &HandlerPolicy| FileHandlerConfig {
                allow_paths: h.allow_paths.clone(),
                isolation: h.isolation,
            });
        let ram = handlers
            .get("ram")
            .map(|h: &HandlerPolicy| RamHandlerConfig {
                max_size: h.max_size,
            });

        Ok(Config {
            source: origin.to_path_buf(),
            daemon,
            file,
            ram,
            jail: jail_defaults,
            handlers,
        })
    }

    /// The policy of `subtype`'s workers, if it has a `[handler.<subtype>]` section.
    pub fn handler(&self, subtype: &str) -> Option<&HandlerPolicy> {
        self.handlers.get(subtype)
    }

    /// What is valid but probably not what the operator meant, one sentence each: a file that
    /// serves no subtype (every device refused), or an `allow_paths` entry that opens the whole
    /// host or one of its system trees to whoever creates backstores. The daemon logs these at
    /// WARN when it loads or reloads the file; `tcmu-warden policy check` prints them.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.handlers.is_empty() {
            out.push("no [handler.<subtype>] section: every device will be refused".into());
        }
        for (subtype, h) in &self.handlers {
            for path in &h.allow_paths {
                if let Some(tree) = SYSTEM_TREES.iter().find(|t| Path::new(t) == path) {
                    let what = if *tree == "/" {
                        "every file and block device on the host"
                    } else {
                        "a system directory"
                    };
                    out.push(format!(
                        "handler.{subtype}.allow_paths contains {tree:?}: whoever creates a \
                         {subtype} backstore may back it with {what} (list the directories that \
                         hold disk images instead)"
                    ));
                }
            }
        }
        out
    }

    /// The subtypes that have a `[handler.*]` section: the built-in ones first (in
    /// [`KNOWN_SUBTYPES`] order), then third-party ones by name.
    pub fn served_subtypes(&self) -> Vec<&str> {
        let builtin = KNOWN_SUBTYPES
            .iter()
            .copied()
            .filter(|s| self.handlers.contains_key(*s));
        let others = self
            .handlers
            .keys()
            .map(String::as_str)
            .filter(|s| !KNOWN_SUBTYPES.contains(s));
        builtin.chain(others).collect()
    }

    /// Whether devices of `subtype` are served (it has a section).
    pub fn serves(&self, subtype: &str) -> bool {
        self.handlers.contains_key(subtype)
    }

    /// How devices of `subtype` are spread over workers ([`Isolation::Subtype`] for subtypes
    /// without a section).
    pub fn isolation(&self, subtype: &str) -> Isolation {
        self.handlers
            .get(subtype)
            .map_or(Isolation::Subtype, |h| h.isolation)
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
mod jail_tests;

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
    fn lifecycle_keys() {
        let cfg = parse(
            "[daemon]\nheartbeat_interval = '250ms'\nheartbeat_timeout = '2s'\n\
             restart_backoff_initial = '50ms'\nrestart_backoff_max = '1m'\n\
             quarantine_after = 3\nquarantine_window = '1h'\njournal_dir = '/run/x//j/'\n",
        )
        .unwrap();
        let lc = cfg.daemon.lifecycle;
        assert_eq!(lc.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(lc.heartbeat_timeout, Duration::from_secs(2));
        assert_eq!(lc.restart_backoff_initial, Duration::from_millis(50));
        assert_eq!(lc.restart_backoff_max, Duration::from_secs(60));
        assert_eq!(lc.quarantine_after, 3);
        assert_eq!(lc.quarantine_window, Duration::from_secs(3600));
        assert_eq!(cfg.daemon.journal_dir, Path::new("/run/x/j"));

        let (line, _, msg) = error_at("[daemon]\n\nheartbeat_timeout = 5\n");
        assert_eq!(line, 3);
        assert!(msg.contains("no unit"), "{msg}");
        let (line, _, msg) = error_at("[daemon]\nheartbeat_interval = '0s'\n");
        assert_eq!(line, 2);
        assert!(msg.contains("longer than zero"), "{msg}");
        let (line, _, msg) =
            error_at("[daemon]\nrestart_backoff_initial = '5s'\nrestart_backoff_max = '1s'\n");
        assert_eq!(line, 3);
        assert!(msg.contains("shorter"), "{msg}");
        let (line, _, msg) = error_at("[daemon]\nquarantine_after = 0\n");
        assert_eq!(line, 2);
        assert!(msg.contains("at least 1"), "{msg}");
        let (_, _, msg) = error_at("[daemon]\njournal_dir = 'run/j'\n");
        assert!(msg.contains("daemon.journal_dir"), "{msg}");
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
            "[daemon]\ncontrol_socket = '/run/x//c.sock'\ndrain_timeout = '5s'\nuevent_source = 'kernel'\n",
        )
        .unwrap();
        assert_eq!(cfg.daemon.control_socket, Path::new("/run/x/c.sock"));
        assert_eq!(cfg.daemon.drain_timeout, Duration::from_secs(5));
        assert_eq!(cfg.daemon.uevent_source, UeventSource::Kernel);
        let d = parse("").unwrap().daemon;
        assert_eq!(d.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
        assert_eq!(d.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
        assert_eq!(d.uevent_source, UeventSource::Auto);
        let (line, _, msg) = error_at("[daemon]\n\ndrain_timeout = '0s'\n");
        assert_eq!(line, 3);
        assert!(msg.contains("drain_timeout"), "{msg}");
        // Like every other duration, it takes a unit: a bare number is refused, not guessed.
        let (line, _, msg) = error_at("[daemon]\ndrain_timeout = 30\n");
        assert_eq!(line, 2);
        assert!(msg.contains("no unit") && msg.contains("\"30s\""), "{msg}");
        let (_, _, msg) = error_at("[daemon]\ndrain_timeout = '2h'\n");
        assert!(msg.contains("between 1s and 1h"), "{msg}");
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

    #[test]
    fn suspicious_but_valid_files_are_warned_about() {
        let empty = parse("").unwrap();
        let w = empty.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("every device will be refused"), "{w:?}");
        let root = parse("[handler.file]\nallow_paths = ['/']\n").unwrap();
        let w = root.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("handler.file.allow_paths") && w[0].contains("every file"),
            "{w:?}"
        );
        let etc = parse("[handler.file]\nallow_paths = ['/srv/disks', '/etc/']\n").unwrap();
        let w = etc.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("\"/etc\"") && w[0].contains("system directory"),
            "{w:?}"
        );
        let fine =
            parse("[handler.file]\nallow_paths = ['/srv/disks', '/var/lib/tcmu']\n").unwrap();
        assert!(fine.warnings().is_empty(), "{:?}", fine.warnings());
    }

    #[test]
    fn duplicates_are_named() {
        let (line, _, msg) = error_at(
            "[handler.file]\nallow_paths = ['/a']\n[handler.file]\nallow_paths = ['/b']\n",
        );
        assert_eq!(line, 3);
        assert!(msg.contains("duplicate table [handler.file]"), "{msg}");
        let (line, _, msg) = error_at("[daemon]\nsysfs_root = '/sys'\nsysfs_root = '/x'\n");
        assert_eq!(line, 3);
        assert!(msg.contains("duplicate key `sysfs_root`"), "{msg}");
    }

    #[test]
    fn many_allow_paths_are_deduplicated_in_order() {
        // 40,000 entries with every path twice: kept once each, first occurrence first.
        let mut text = String::from("[handler.file]\nallow_paths = [\n");
        for round in 0..2 {
            for i in 0..20_000 {
                text.push_str(&format!(
                    "  '/srv/d{i}{}',\n",
                    if round == 0 { "" } else { "/" }
                ));
            }
        }
        text.push_str("]\n");
        let cfg = parse(&text).unwrap();
        let paths = &cfg.handler("file").unwrap().allow_paths;
        assert_eq!(paths.len(), 20_000);
        assert_eq!(paths[0], Path::new("/srv/d0"));
        assert_eq!(paths[19_999], Path::new("/srv/d19999"));
    }

    #[test]
    fn an_oversized_file_is_refused_before_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.toml");
        let mut text = String::from("[handler.ram]\n");
        while (text.len() as u64) <= MAX_CONFIG_BYTES {
            text.push_str("# padding padding padding padding padding padding padding padding\n");
        }
        std::fs::write(&path, &text).unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
        std::fs::write(&path, "[handler.ram]\n").unwrap();
        assert!(Config::load(&path).is_ok());
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

        // A third-party subtype may have a section, but not unknown keys in it.
        let (line, _, msg) = error_at("\n\n[handler.qcow]\nx = 1\n");
        assert_eq!(line, 4);
        assert!(msg.contains("unknown field `x`"), "{msg}");

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
