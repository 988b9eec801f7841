//! The shipped systemd unit, `dist/tcmu-warden.service`, must keep what the daemon relies on
//! across its own restarts. Above all the in-flight journals (what each worker took off a
//! device's command ring and has not finished yet): they live in the default `journal_dir`,
//! inside the unit's `RuntimeDirectory`, which systemd deletes whenever the unit stops unless
//! `RuntimeDirectoryPreserve=` says otherwise. Without them a restarted supervisor resets every
//! ring that had commands in flight instead of recovering it (docs/operations.md, "The runtime
//! directory", explains why the unit says `yes`).
//!
//! These tests read the unit as systemd would (sections, `Key=Value` lines, comments, line
//! continuations, an empty assignment resetting a list) and check the directives against the
//! daemon's own defaults, and run `systemd-analyze verify` on it, which needs no running systemd
//! (only the `systemd` package; `tests/vm/setup-host.sh` installs it). Where that tool cannot be
//! installed, `TCMU_WARDEN_SKIP_SYSTEMD_ANALYZE=1` skips that one test, saying so.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tcmu_warden_supervisor::config::{DEFAULT_DRAIN_TIMEOUT, DaemonConfig};

/// The unit file, as shipped.
fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/tcmu-warden.service")
}

fn unit_text() -> String {
    let path = unit_path();
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A unit file's assignments in order: (section, key, value, line number).
struct Unit {
    entries: Vec<(String, String, String, usize)>,
}

impl Unit {
    /// Parses unit-file syntax (systemd.syntax(7)): `[Section]` headers, `Key=Value`
    /// assignments, `#`/`;` comment lines, and a trailing backslash continuing a line.
    fn parse(text: &str) -> Result<Unit, String> {
        let mut entries = Vec::new();
        let mut section = String::new();
        let mut lines = text.lines().enumerate();
        while let Some((i, raw)) = lines.next() {
            let lineno = i + 1;
            let mut line = raw.trim().to_owned();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            while let Some(head) = line.strip_suffix('\\') {
                let mut joined = format!("{head} ");
                // Comment lines inside a continuation are skipped, as systemd does.
                loop {
                    let (_, next) = lines
                        .next()
                        .ok_or_else(|| format!("line {lineno}: continuation at end of file"))?;
                    let next = next.trim();
                    if next.starts_with('#') || next.starts_with(';') {
                        continue;
                    }
                    joined.push_str(next);
                    break;
                }
                line = joined;
            }
            if let Some(name) = line.strip_prefix('[') {
                section = name
                    .strip_suffix(']')
                    .ok_or_else(|| format!("line {lineno}: bad section header {line:?}"))?
                    .to_owned();
                continue;
            }
            if section.is_empty() {
                return Err(format!("line {lineno}: assignment outside a section"));
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| format!("line {lineno}: not an assignment: {line:?}"))?;
            entries.push((
                section.clone(),
                key.trim().to_owned(),
                value.trim().to_owned(),
                lineno,
            ));
        }
        Ok(Unit { entries })
    }

    /// Every value assigned to `key` in `section`, after the last empty assignment (which
    /// resets a list setting).
    fn values(&self, section: &str, key: &str) -> Vec<&str> {
        let mut out = Vec::new();
        for (s, k, v, _) in &self.entries {
            if s == section && k == key {
                if v.is_empty() {
                    out.clear();
                } else {
                    out.push(v.as_str());
                }
            }
        }
        out
    }

    /// The value in force for a single-valued setting (the last assignment wins).
    fn last(&self, section: &str, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .rev()
            .find(|(s, k, _, _)| s == section && k == key)
            .map(|(_, _, v, _)| v.as_str())
    }

    /// The whitespace-separated words of every assignment to `key` (list settings such as
    /// `RuntimeDirectory=` or `ReadWritePaths=`).
    fn words(&self, section: &str, key: &str) -> Vec<String> {
        self.values(section, key)
            .iter()
            .flat_map(|v| v.split_whitespace().map(str::to_owned))
            .collect()
    }
}

fn shipped_unit() -> Unit {
    Unit::parse(&unit_text()).unwrap_or_else(|e| panic!("{}: {e}", unit_path().display()))
}

/// systemd's boolean spellings (systemd.syntax(7)).
fn systemd_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "yes" | "y" | "true" | "t" | "on" => Some(true),
        "0" | "no" | "n" | "false" | "f" | "off" => Some(false),
        _ => None,
    }
}

/// A systemd time span (systemd.time(7)): a bare number is seconds; otherwise number+unit
/// components, summed ("1min 30s").
fn systemd_timespan(text: &str) -> Option<Duration> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        rest = rest.trim_start();
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest.get(..digits)?.parse().ok()?;
        rest = rest.get(digits..)?.trim_start();
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit = rest.get(..unit_len)?;
        rest = rest.get(unit_len..)?;
        total += match unit {
            "us" | "usec" => Duration::from_micros(n),
            "ms" | "msec" => Duration::from_millis(n),
            "" | "s" | "sec" | "second" | "seconds" => Duration::from_secs(n),
            "m" | "min" | "minute" | "minutes" => Duration::from_secs(n * 60),
            "h" | "hr" | "hour" | "hours" => Duration::from_secs(n * 3600),
            _ => return None,
        };
    }
    Some(total)
}

/// `/run/<name>` for each `RuntimeDirectory=` of the unit.
fn runtime_dirs(unit: &Unit) -> Vec<PathBuf> {
    unit.words("Service", "RuntimeDirectory")
        .iter()
        .map(|name| Path::new("/run").join(name))
        .collect()
}

#[test]
fn the_parser_reads_unit_syntax() {
    let unit = Unit::parse(
        "# comment\n[Service]\n; another\nA=1\nB = two words \nL=x\nL=y\nL=\nL=z\n\
         C=first \\\n# skipped\n  second\n",
    )
    .unwrap();
    assert_eq!(unit.last("Service", "A"), Some("1"));
    assert_eq!(unit.last("Service", "B"), Some("two words"));
    assert_eq!(unit.values("Service", "L"), ["z"]);
    assert_eq!(unit.last("Service", "C"), Some("first  second"));
    assert_eq!(unit.last("Unit", "A"), None);
    assert!(Unit::parse("A=1\n").is_err());
    assert!(Unit::parse("[Service]\nno assignment\n").is_err());
    assert_eq!(systemd_timespan("1min 30s"), Some(Duration::from_secs(90)));
    assert_eq!(systemd_timespan("60s"), Some(Duration::from_secs(60)));
    assert_eq!(systemd_timespan("45"), Some(Duration::from_secs(45)));
    assert_eq!(systemd_timespan("5 fortnights"), None);
}

/// The journals and the control socket must be in the runtime directory by default, and
/// systemd must keep that directory when the unit stops, including before a restart.
#[test]
fn the_runtime_directory_holds_the_journals_and_survives_a_restart() {
    let unit = shipped_unit();
    let dirs = runtime_dirs(&unit);
    assert_eq!(
        dirs,
        [PathBuf::from("/run/tcmu-warden")],
        "RuntimeDirectory= must name the daemon's directory under /run"
    );
    let run_dir = &dirs[0];

    let defaults = DaemonConfig::default();
    assert!(
        defaults.journal_dir.starts_with(run_dir) && defaults.journal_dir != *run_dir,
        "the default journal_dir {} is not inside the unit's RuntimeDirectory {}",
        defaults.journal_dir.display(),
        run_dir.display()
    );
    assert!(
        defaults.control_socket.starts_with(run_dir),
        "the default control_socket {} is not inside the unit's RuntimeDirectory {}",
        defaults.control_socket.display(),
        run_dir.display()
    );

    // "yes" (any boolean spelling of it): kept across restarts *and* stops, see the module doc.
    let preserve = unit
        .last("Service", "RuntimeDirectoryPreserve")
        .expect("RuntimeDirectoryPreserve= is missing: systemd deletes the journals at every stop");
    assert_eq!(
        systemd_bool(preserve),
        Some(true),
        "RuntimeDirectoryPreserve={preserve}: must be yes (restart still loses the journals \
         when a crashed daemon is stopped instead of restarted)"
    );
    assert_eq!(
        unit.last("Service", "RuntimeDirectoryMode"),
        Some("0700"),
        "the runtime directory is root's alone"
    );

    // The journals matter because a crashed supervisor is restarted.
    let restart = unit.last("Service", "Restart").unwrap_or("no");
    assert!(
        ["on-failure", "on-abnormal", "always"].contains(&restart),
        "Restart={restart} does not restart a crashed supervisor"
    );
}

/// Nothing else in the unit deletes, hides or freezes what the daemon keeps across restarts,
/// and a restart never overlaps the previous supervisor's workers.
#[test]
fn nothing_else_in_the_unit_loses_state_across_restarts() {
    let unit = shipped_unit();
    let run_dir = runtime_dirs(&unit)
        .into_iter()
        .next()
        .expect("no RuntimeDirectory=");
    let journal_dir = DaemonConfig::default().journal_dir;

    // PrivateTmp= gives the service a /tmp and /var/tmp that systemd deletes at every stop.
    if unit
        .last("Service", "PrivateTmp")
        .and_then(systemd_bool)
        .unwrap_or(false)
    {
        for tmp in ["/tmp", "/var/tmp"] {
            assert!(
                !journal_dir.starts_with(tmp) && !run_dir.starts_with(tmp),
                "PrivateTmp=yes and the journals are under {tmp}"
            );
        }
    }

    // Settings that replace, hide or make read-only a path must not touch the runtime
    // directory (or /run around it).
    for key in [
        "TemporaryFileSystem",
        "InaccessiblePaths",
        "ReadOnlyPaths",
        "BindPaths",
        "BindReadOnlyPaths",
    ] {
        for word in unit.words("Service", key) {
            let path = word.trim_start_matches(['-', '+']);
            let path = Path::new(path.split(':').next().unwrap_or(path));
            assert!(
                !(run_dir.starts_with(path) || path.starts_with(&run_dir)),
                "{key}={word} covers {}",
                run_dir.display()
            );
        }
    }

    // ProtectSystem=strict leaves only the API trees, ReadWritePaths= and the unit's own
    // directories writable: the journals must be in one of them.
    if unit.last("Service", "ProtectSystem") == Some("strict") {
        let writable = journal_dir.starts_with(&run_dir)
            || unit
                .words("Service", "ReadWritePaths")
                .iter()
                .any(|w| journal_dir.starts_with(w.trim_start_matches(['-', '+'])));
        assert!(
            writable,
            "ProtectSystem=strict makes {} read-only",
            journal_dir.display()
        );
    }

    // No command of the unit cleans the directory up itself.
    for (section, key, value, line) in &unit.entries {
        if section == "Service" && key.starts_with("Exec") {
            assert!(
                !value.contains(run_dir.to_string_lossy().as_ref()),
                "line {line}: {key}={value} touches {}",
                run_dir.display()
            );
        }
    }

    // SIGTERM to the supervisor alone (it drains and stops its workers itself); but after a
    // crash systemd must kill whatever is left in the cgroup before it starts a new supervisor,
    // so no old worker still serves a ring the new one recovers. "process" and "none" do not.
    let kill_mode = unit.last("Service", "KillMode").unwrap_or("control-group");
    assert_eq!(kill_mode, "mixed", "KillMode={kill_mode}");
    assert_ne!(
        unit.last("Service", "SendSIGKILL").and_then(systemd_bool),
        Some(false),
        "SendSIGKILL=no leaves a wedged worker running into the next start"
    );

    // A stop that runs past TimeoutStopSec ends in SIGKILL before the drain finished.
    let timeout = unit
        .last("Service", "TimeoutStopSec")
        .expect("TimeoutStopSec= is missing");
    let timeout =
        systemd_timespan(timeout).unwrap_or_else(|| panic!("TimeoutStopSec={timeout} unparsed"));
    let drain = DEFAULT_DRAIN_TIMEOUT;
    assert!(
        timeout >= drain + Duration::from_secs(10),
        "TimeoutStopSec {timeout:?} leaves no room for drain_timeout {drain:?} plus reaping"
    );
}

/// The unit must not take away a system call the daemon cannot do without. Found with systemd
/// as the VM's init (tests/vm/run.sh --suite systemd): `RestrictSUIDSGID=yes` makes every
/// `openat2()` fail with ENOSYS (systemd cannot filter its mode, so it filters the call), and
/// backing files are opened only through `openat2` (`policy/src/admit.rs`), so every `file`
/// device was refused with "the kernel lacks openat2".
#[test]
fn the_unit_leaves_openat2_to_the_daemon() {
    let unit = shipped_unit();
    let on = |key: &str| {
        unit.last("Service", key)
            .and_then(systemd_bool)
            .unwrap_or(false)
    };
    assert!(
        !on("RestrictSUIDSGID"),
        "RestrictSUIDSGID=yes blocks openat2, which admitting a backing file needs"
    );
    // DynamicUser=yes implies RestrictSUIDSGID=yes (and cannot open /dev/uioN anyway).
    assert!(
        !on("DynamicUser"),
        "DynamicUser=yes implies RestrictSUIDSGID=yes"
    );
    for word in unit.words("Service", "SystemCallFilter") {
        assert!(
            !word.contains("openat2"),
            "SystemCallFilter={word} touches openat2"
        );
    }
}

/// `systemd-analyze verify` accepts the unit: every directive is known to systemd and parses
/// (a misspelt `RuntimeDirectoryPreserve=` would only be warned about and ignored at run time).
#[test]
fn systemd_analyze_verifies_the_unit() {
    let have_tool = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_tool {
        if std::env::var_os("TCMU_WARDEN_SKIP_SYSTEMD_ANALYZE").is_some_and(|v| v == "1") {
            eprintln!(
                "SKIPPED: systemd-analyze is not installed (TCMU_WARDEN_SKIP_SYSTEMD_ANALYZE=1)"
            );
            return;
        }
        panic!(
            "systemd-analyze is not installed: install the `systemd` package \
             (tests/vm/setup-host.sh does), or set TCMU_WARDEN_SKIP_SYSTEMD_ANALYZE=1 to skip"
        );
    }

    // verify checks that ExecStart= names an executable. The binary is not installed here, so
    // a copy of the unit (same file name: the name is part of what is checked) points at one
    // that exists, this test's own executable; nothing else is changed.
    let text = unit_text();
    let exec_start = "ExecStart=/usr/bin/tcmu-warden ";
    assert_eq!(
        text.matches(exec_start).count(),
        1,
        "the unit no longer starts /usr/bin/tcmu-warden; update this test"
    );
    let me = std::env::current_exe().unwrap();
    let copy = text.replace(exec_start, &format!("ExecStart={} ", me.display()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tcmu-warden.service");
    std::fs::write(&path, copy).unwrap();

    // --recursive-errors=no: warnings about this unit (not its dependencies, which this
    // machine may not have) make the exit status nonzero.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "--recursive-errors=no"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify {}: {}\n{stdout}{stderr}",
        path.display(),
        out.status
    );
}
