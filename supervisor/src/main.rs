//! `tcmu-warden`: the supervisor daemon's executable. Parses the command line, loads the
//! configuration, sets up logging and runs [`tcmu_warden_supervisor::daemon::run`]. Errors end
//! here, with context, on stderr and a non-zero exit status.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use tcmu_warden_supervisor::cli::{
    Cli, Command, DaemonSocket, PolicyCommand, QuarantineCommand, describe_config, describe_policy,
};
use tcmu_warden_supervisor::config::{Config, DEFAULT_CONTROL_SOCKET, LogFormat};
use tcmu_warden_supervisor::control::{self, Request};
use tcmu_warden_supervisor::daemon::admin::status_json;
use tcmu_warden_supervisor::daemon::{self, Options};
use tcmu_warden_supervisor::logging;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            config,
            foreground,
            no_jail,
        } => run(&config, foreground, no_jail),
        Command::CheckConfig { file } => check_config(&file),
        Command::Policy {
            command: PolicyCommand::Check { file },
        } => policy_check(&file),
        Command::Status { json, daemon } => status(json, daemon),
        Command::Quarantine {
            command: QuarantineCommand::Lift { worker, daemon },
        } => lift(&worker, daemon),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tcmu-warden: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &Path, foreground: bool, no_jail: bool) -> anyhow::Result<()> {
    let config = Config::load(path).context("invalid configuration")?;
    let format = if foreground {
        LogFormat::Text
    } else {
        config.effective_log_format()
    };
    let format = logging::init(format).context("setting up logging")?;
    let mut opts = Options::from_config(&config)?;
    opts.worker_log_format = Some(format);
    opts.unconfined = no_jail;
    daemon::run(config, opts).context("the daemon stopped on an error")
}

/// The control socket `daemon` names.
fn socket_path(daemon: DaemonSocket) -> anyhow::Result<PathBuf> {
    Ok(match (daemon.socket, daemon.config) {
        (Some(s), _) => s,
        (None, Some(c)) => {
            Config::load(&c)
                .context("invalid configuration")?
                .daemon
                .control_socket
        }
        (None, None) => PathBuf::from(DEFAULT_CONTROL_SOCKET),
    })
}

fn lift(worker: &str, daemon: DaemonSocket) -> anyhow::Result<()> {
    let socket = socket_path(daemon)?;
    let request = Request::LiftQuarantine {
        worker: worker.to_owned(),
    };
    let response = control::query(&socket, request, Duration::from_secs(30))
        .context("lifting the quarantine")?;
    let lift = response
        .lift
        .context("the daemon's answer does not say what it lifted")?;
    println!(
        "quarantine of worker {} lifted; {} devices go back to it{}",
        lift.worker,
        lift.devices.len(),
        if lift.devices.is_empty() { "" } else { ":" }
    );
    for dev in &lift.devices {
        println!("  {dev}");
    }
    println!("(`tcmu-warden status` shows when they are served again)");
    Ok(())
}

fn status(json: bool, daemon: DaemonSocket) -> anyhow::Result<()> {
    let socket = socket_path(daemon)?;
    let response = control::query(&socket, Request::Status, Duration::from_secs(30))
        .context("asking the daemon")?;
    let report = response
        .status
        .context("the daemon's answer has no status report")?;
    if json {
        println!("{}", status_json(&report));
    } else {
        print!("{}", control::render_status(&report));
    }
    Ok(())
}

fn check_config(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path).context("invalid configuration")?;
    let exe = match &config.daemon.worker_exe {
        Some(exe) => exe.clone(),
        None => daemon::default_worker_exe()?,
    };
    print!("{}", describe_config(&config, &exe));
    Ok(())
}

fn policy_check(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path).context("invalid configuration")?;
    let exe = match &config.daemon.worker_exe {
        Some(exe) => exe.clone(),
        None => daemon::default_worker_exe()?,
    };
    print!("{}", describe_policy(&config, &exe));
    Ok(())
}
