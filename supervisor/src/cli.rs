//! # Command line
//!
//! ```text
//! tcmu-warden run --config FILE [--foreground]   run the daemon
//! tcmu-warden check-config FILE                  validate a configuration, print what it serves
//! tcmu-warden policy check FILE                  validate it, print each worker's effective jail
//! tcmu-warden status [--json] [--socket PATH | --config FILE]
//!                                                ask the running daemon what it serves
//! tcmu-warden quarantine lift WORKER [--socket PATH | --config FILE]
//!                                                serve a quarantined worker's devices again
//! tcmu-warden --version
//! ```
//!
//! `status` talks to the daemon's control socket (`/run/tcmu-warden/control.sock` unless
//! `--socket` names another, or `--config` names a configuration whose `control_socket` to
//! use) and prints each device (uio, backstore, subtype, cfgstring, size, worker pid, state,
//! commands served, errors), each worker (pid, restarts, last crash) and the policy in force;
//! `--json` prints the daemon's report as JSON instead (schema: [`crate::control::StatusReport`]).
//!
//! `quarantine lift WORKER` asks the daemon (same socket choice) to lift the quarantine of the
//! worker named WORKER (as `status` names it: `file`, `file:user_1/disk0`, `refused`): a new
//! worker is started and the devices the refusals worker answered for meanwhile are handed back
//! to it ([`crate::daemon::quarantine`]). An unknown or unquarantined worker is an error (exit
//! status 1).
//!
//! `run` never forks into the background: run it under a service manager (systemd
//! `Type=notify`, see `dist/tcmu-warden.service`). `--foreground` is for running it by hand: logs go to stderr as text,
//! whatever `log_format` says.
//!
//! This module owns argument parsing and the human-readable rendering of a configuration; it
//! never starts the daemon itself (that is `main` and [`crate::daemon`]).

use std::fmt::Write as _;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::config::{Config, KNOWN_SUBTYPES, format_duration};
use clap::{Args, Parser, Subcommand};
use tcmu_warden_policy::format_size;
use tcmu_warden_policy::jail::landlock::LandlockReport;

/// tcmu-warden: serves Linux SCSI disks from userspace through TCMU (LIO's `user` backstore).
#[derive(Debug, Parser)]
#[command(name = "tcmu-warden", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: serve every TCMU device until SIGTERM or SIGINT.
    Run {
        /// The configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Running by hand: log human-readable text to stderr, overriding `log_format`.
        #[arg(long)]
        foreground: bool,
        /// DEBUGGING ONLY, NOT FOR PRODUCTION: start workers without their jail (no
        /// namespaces, capabilities kept, no landlock, no seccomp).
        #[arg(long)]
        no_jail: bool,
    },
    /// Validate a configuration file and print the effective settings and handlers.
    CheckConfig {
        /// The configuration file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Show what the running daemon serves: devices, workers, counters and the policy.
    Status {
        /// Print the daemon's report as JSON.
        #[arg(long)]
        json: bool,
        /// Where the daemon listens.
        #[command(flatten)]
        daemon: DaemonSocket,
    },
    /// Act on quarantined workers (workers that crashed too often and are not restarted).
    Quarantine {
        /// What to do.
        #[command(subcommand)]
        command: QuarantineCommand,
    },
    /// Inspect the workers' jail policy.
    Policy {
        /// What to do.
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

/// Where the running daemon's control socket is.
#[derive(Debug, Args)]
pub struct DaemonSocket {
    /// The control socket (default: /run/tcmu-warden/control.sock).
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    pub socket: Option<PathBuf>,
    /// Take the control socket from this configuration file.
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `tcmu-warden quarantine ...`.
#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// Lift a worker's quarantine: start it again and hand its devices back to it (they fail
    /// fast with NOT READY while it is quarantined).
    Lift {
        /// The worker's name, as `tcmu-warden status` shows it (e.g. `file`).
        #[arg(value_name = "WORKER")]
        worker: String,
        /// Where the daemon listens.
        #[command(flatten)]
        daemon: DaemonSocket,
    },
}

/// `tcmu-warden policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a configuration file and print the effective jail of every worker: who it runs
    /// as, the paths it may touch, the system calls each seccomp stage denies or allows, its
    /// limits, and what landlock enforces on this kernel.
    Check {
        /// The configuration file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// The effective jail of every worker `config` can start, for `tcmu-warden policy check`.
/// `worker_exe` is the daemon's worker executable (the configured one or the default).
/// `<file>: valid`, then one `warning:` line per [`Config::warnings`] entry.
fn write_validity(out: &mut String, config: &Config) {
    let warnings = config.warnings();
    match warnings.len() {
        0 => {
            let _ = writeln!(out, "{}: valid", config.source.display());
        }
        n => {
            let _ = writeln!(
                out,
                "{}: valid, with {n} warning{}",
                config.source.display(),
                if n == 1 { "" } else { "s" }
            );
            for w in warnings {
                let _ = writeln!(out, "warning: {w}");
            }
        }
    }
}

pub fn describe_policy(config: &Config, worker_exe: &Path) -> String {
    let mut out = String::new();
    let abi = tcmu_warden_policy::jail::landlock::abi();
    write_validity(&mut out, config);
    let _ = writeln!(
        out,
        "landlock on this kernel: {}",
        if abi == 0 {
            "unavailable".to_owned()
        } else {
            format!("ABI {abi}")
        }
    );
    let mut section = |title: String, subtype: Option<&str>, notes: String| {
        let spec = config.jail_for(subtype, worker_exe);
        let report = LandlockReport::for_abi(abi, &spec.settings.network);
        let _ = writeln!(out);
        let _ = writeln!(out, "{title}{notes}");
        out.push_str(&spec.describe(&report));
    };
    for subtype in config.served_subtypes() {
        let Some(h) = config.handler(subtype) else {
            continue;
        };
        let mut notes = format!(
            "  (isolation = {}, backing = {}",
            h.isolation.as_str(),
            h.backing.as_str()
        );
        if !h.allow_paths.is_empty() {
            let paths: Vec<String> = h
                .allow_paths
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            let _ = write!(notes, ", allow_paths = [{}]", paths.join(", "));
        }
        notes.push(')');
        section(format!("[handler.{subtype}]"), Some(subtype), notes);
    }
    section(
        "[jail] (the worker of refused devices; defaults of every handler)".to_owned(),
        None,
        String::new(),
    );
    out
}

/// A human-readable account of what a configuration does. `worker_exe` is the executable the
/// daemon would start (the configured one or the default).
pub fn describe_config(config: &Config, worker_exe: &Path) -> String {
    let mut out = String::new();
    let d = &config.daemon;
    write_validity(&mut out, config);
    let _ = writeln!(out);
    let _ = writeln!(out, "[daemon]");
    let exe_note = match (&d.worker_exe, worker_exe.is_file()) {
        (Some(_), true) => String::new(),
        (None, true) => " (default: next to tcmu-warden)".into(),
        (Some(_), false) => " (NOT FOUND)".into(),
        (None, false) => " (default: next to tcmu-warden; NOT FOUND)".into(),
    };
    let _ = writeln!(out, "  worker_exe = {}{exe_note}", worker_exe.display());
    let _ = writeln!(out, "  sysfs_root = {}", d.sysfs_root.display());
    let _ = writeln!(out, "  dev_root   = {}", d.dev_root.display());
    let format = match d.log_format {
        Some(f) => f.to_string(),
        None => "journald under systemd (JOURNAL_STREAM set), text otherwise (default)".into(),
    };
    let _ = writeln!(out, "  log_format = {format}");
    let lc = &d.lifecycle;
    let _ = writeln!(out, "  journal_dir = {}", d.journal_dir.display());
    let _ = writeln!(
        out,
        "  heartbeats every {}, a worker silent for {} is killed",
        format_duration(lc.heartbeat_interval),
        format_duration(lc.heartbeat_timeout)
    );
    let _ = writeln!(
        out,
        "  restarts after {} doubling to {}; quarantine after {} crashes within {}",
        format_duration(lc.restart_backoff_initial),
        format_duration(lc.restart_backoff_max),
        lc.quarantine_after,
        format_duration(lc.quarantine_window)
    );
    let _ = writeln!(out);
    let served = config.served_subtypes();
    if served.is_empty() {
        let _ = writeln!(
            out,
            "no handlers: every device is refused (its SCSI commands answer NOT READY)"
        );
        return out;
    }
    let _ = writeln!(out, "handlers served:");
    if let Some(file) = &config.file {
        let _ = writeln!(out, "  file  isolation = {}", file.isolation.as_str());
        for path in &file.allow_paths {
            let _ = writeln!(
                out,
                "        allow {} ({})",
                path.display(),
                path_kind(path)
            );
        }
    }
    if let Some(ram) = &config.ram {
        let cap = ram
            .max_size
            .map_or_else(|| "no cap".to_owned(), format_size);
        let _ = writeln!(out, "  ram   max_size = {cap}");
    }
    for subtype in served.iter().filter(|s| !KNOWN_SUBTYPES.contains(s)) {
        let Some(h) = config.handler(subtype) else {
            continue;
        };
        let exe = h.exe.as_ref().map_or_else(
            || worker_exe.display().to_string(),
            |e| e.display().to_string(),
        );
        let _ = writeln!(
            out,
            "  {subtype}  exe = {exe}, isolation = {}, backing = {}",
            h.isolation.as_str(),
            h.backing.as_str()
        );
        for path in &h.allow_paths {
            let _ = writeln!(
                out,
                "        allow {} ({})",
                path.display(),
                path_kind(path)
            );
        }
    }
    let _ = writeln!(
        out,
        "every other subtype is refused (its SCSI commands answer NOT READY)"
    );
    let _ = writeln!(out, "(`tcmu-warden policy check` shows each worker's jail)");
    out
}

fn path_kind(path: &Path) -> &'static str {
    match std::fs::metadata(path) {
        Err(_) => "missing",
        Ok(m) if m.is_dir() => "directory: files beneath it",
        Ok(m) if m.file_type().is_block_device() => "block device, exactly",
        Ok(m) if m.is_file() => "regular file, exactly",
        Ok(_) => "unusable file type",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_subcommands() {
        let cli = Cli::try_parse_from(["tcmu-warden", "run", "--config", "/etc/w.toml"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Run { ref config, foreground: false, no_jail: false } if config == Path::new("/etc/w.toml")
        ));
        let cli =
            Cli::try_parse_from(["tcmu-warden", "run", "-c", "w.toml", "--foreground"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Run {
                foreground: true,
                ..
            }
        ));
        let cli = Cli::try_parse_from(["tcmu-warden", "run", "-c", "w.toml", "--no-jail"]).unwrap();
        assert!(matches!(cli.command, Command::Run { no_jail: true, .. }));
        let cli = Cli::try_parse_from(["tcmu-warden", "policy", "check", "w.toml"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Policy { command: PolicyCommand::Check { ref file } } if file == Path::new("w.toml")
        ));
        let cli =
            Cli::try_parse_from(["tcmu-warden", "status", "--json", "--socket", "/s"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Status { json: true, daemon: DaemonSocket { socket: Some(ref s), config: None } } if s == Path::new("/s")
        ));
        let cli = Cli::try_parse_from(["tcmu-warden", "status"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Status {
                json: false,
                daemon: DaemonSocket {
                    socket: None,
                    config: None
                }
            }
        ));
        assert!(
            Cli::try_parse_from(["tcmu-warden", "status", "--socket", "/s", "-c", "/c"]).is_err()
        );
        let cli =
            Cli::try_parse_from(["tcmu-warden", "quarantine", "lift", "file", "-c", "/c"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Quarantine {
                command: QuarantineCommand::Lift { ref worker, daemon: DaemonSocket { socket: None, config: Some(ref c) } }
            } if worker == "file" && c == Path::new("/c")
        ));
        assert!(Cli::try_parse_from(["tcmu-warden", "quarantine", "lift"]).is_err());
        assert!(
            Cli::try_parse_from([
                "tcmu-warden",
                "quarantine",
                "lift",
                "file",
                "--socket",
                "/s",
                "-c",
                "/c"
            ])
            .is_err()
        );
        let cli = Cli::try_parse_from(["tcmu-warden", "check-config", "w.toml"]).unwrap();
        assert!(
            matches!(cli.command, Command::CheckConfig { ref file } if file == Path::new("w.toml"))
        );
        assert!(Cli::try_parse_from(["tcmu-warden", "run"]).is_err());
        assert!(Cli::try_parse_from(["tcmu-warden"]).is_err());
        let version = Cli::try_parse_from(["tcmu-warden", "--version"]).unwrap_err();
        assert_eq!(version.kind(), clap::error::ErrorKind::DisplayVersion);
    }

    #[test]
    fn describes_handlers() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("disks");
        std::fs::create_dir(&dir).unwrap();
        let text = format!(
            "[daemon]\nlog_format = 'json'\n[handler.file]\nallow_paths = [{:?}, '/nonexistent/x']\n\
             isolation = 'device'\n[handler.ram]\nmax_size = '64GiB'\n",
            dir.display().to_string()
        );
        let cfg = Config::from_toml_str(&text, Path::new("/etc/w.toml")).unwrap();
        let out = describe_config(&cfg, Path::new("/nonexistent/worker"));
        assert!(out.starts_with("/etc/w.toml: valid\n"), "{out}");
        assert!(
            out.contains(
                "worker_exe = /nonexistent/worker (default: next to tcmu-warden; NOT FOUND)"
            ),
            "{out}"
        );
        assert!(out.contains("log_format = json"), "{out}");
        assert!(out.contains("file  isolation = device"), "{out}");
        assert!(
            out.contains(&format!("allow {} (directory", dir.display())),
            "{out}"
        );
        assert!(out.contains("allow /nonexistent/x (missing)"), "{out}");
        assert!(out.contains("ram   max_size = 64GiB"), "{out}");

        let cfg = Config::from_toml_str(
            "[handler.qcow]\nexe = '/opt/q/worker'\nbacking = 'fd'\nallow_paths = ['/nonexistent/q']\n",
            Path::new("/etc/w.toml"),
        )
        .unwrap();
        let out = describe_config(&cfg, Path::new("/nonexistent/worker"));
        assert!(
            out.contains("qcow  exe = /opt/q/worker, isolation = subtype, backing = fd"),
            "{out}"
        );
        assert!(out.contains("allow /nonexistent/q (missing)"), "{out}");

        let cfg = Config::from_toml_str("", Path::new("/etc/w.toml")).unwrap();
        let out = describe_config(&cfg, Path::new("/nonexistent/worker"));
        assert!(
            out.contains("no handlers: every device is refused"),
            "{out}"
        );
        // The warnings come first, after the file name, in both descriptions.
        assert!(
            out.starts_with("/etc/w.toml: valid, with 1 warning\nwarning: no [handler."),
            "{out}"
        );
        let out = describe_policy(&cfg, Path::new("/nonexistent/worker"));
        assert!(out.contains("warning: no [handler."), "{out}");
    }

    #[test]
    fn describes_every_workers_jail() {
        let text = "[jail]\nwrite_paths = ['/var/tmp']\n[handler.file]\nallow_paths = ['/srv/disks']\n\
                    isolation = 'device'\n[handler.qcow]\nexe = '/opt/qcow/worker'\n\
                    network = 'tcp'\nconnect_ports = [3260]\nlandlock = 'best-effort'\n";
        let cfg = Config::from_toml_str(text, Path::new("/etc/w.toml")).unwrap();
        let out = describe_policy(&cfg, Path::new("/usr/libexec/tcmu-warden-worker"));
        assert!(out.starts_with("/etc/w.toml: valid\n"), "{out}");
        assert!(out.contains("landlock on this kernel: "), "{out}");
        assert!(
            out.contains(
                "[handler.file]  (isolation = device, backing = fd, allow_paths = [/srv/disks])"
            ),
            "{out}"
        );
        assert!(out.contains("exe          /opt/qcow/worker"), "{out}");
        assert!(out.contains("TCP connect to ports 3260"), "{out}");
        assert!(
            out.contains("[jail] (the worker of refused devices"),
            "{out}"
        );
        assert!(
            out.contains("/srv/disks (backing stores arrive as open descriptors)"),
            "{out}"
        );
        assert!(out.contains("read+write (no execute)  /var/tmp"), "{out}");
        assert!(out.contains("stage one denies:"), "{out}");
        assert!(out.contains("stage two allows:"), "{out}");
    }
}
