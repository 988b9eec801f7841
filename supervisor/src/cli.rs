//! # Command line
//!
//! ```text
//! tcmu-warden run --config FILE [--foreground]   run the daemon
//! tcmu-warden check-config FILE                  validate a configuration, print what it serves
//! tcmu-warden status [--json] [--socket PATH | --config FILE]
//!                                                ask the running daemon what it serves
//! tcmu-warden --version
//! ```
//!
//! `status` talks to the daemon's control socket (`/run/tcmu-warden/control.sock` unless
//! `--socket` names another, or `--config` names a configuration whose `control_socket` to
//! use) and prints each device (uio, backstore, subtype, cfgstring, size, worker pid, state,
//! commands served, errors), each worker (pid, restarts, last crash) and the policy in force;
//! `--json` prints the daemon's report as JSON instead (schema: [`crate::control::StatusReport`]).
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

use clap::{Parser, Subcommand};
use tcmu_warden_policy::{Config, format_size};

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
        /// The control socket (default: /run/tcmu-warden/control.sock).
        #[arg(long, value_name = "PATH", conflicts_with = "config")]
        socket: Option<PathBuf>,
        /// Take the control socket from this configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

/// A human-readable account of what a configuration does. `worker_exe` is the executable the
/// daemon would start (the configured one or the default).
pub fn describe_config(config: &Config, worker_exe: &Path) -> String {
    let mut out = String::new();
    let d = &config.daemon;
    let _ = writeln!(out, "{}: valid", config.source.display());
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
    let _ = writeln!(
        out,
        "every other subtype is refused (its SCSI commands answer NOT READY)"
    );
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
            Command::Run { ref config, foreground: false } if config == Path::new("/etc/w.toml")
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
        let cli =
            Cli::try_parse_from(["tcmu-warden", "status", "--json", "--socket", "/s"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Status { json: true, socket: Some(ref s), config: None } if s == Path::new("/s")
        ));
        let cli = Cli::try_parse_from(["tcmu-warden", "status"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Status {
                json: false,
                socket: None,
                config: None
            }
        ));
        assert!(
            Cli::try_parse_from(["tcmu-warden", "status", "--socket", "/s", "-c", "/c"]).is_err()
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

        let cfg = Config::from_toml_str("", Path::new("/etc/w.toml")).unwrap();
        let out = describe_config(&cfg, Path::new("/nonexistent/worker"));
        assert!(
            out.contains("no handlers: every device is refused"),
            "{out}"
        );
    }
}
