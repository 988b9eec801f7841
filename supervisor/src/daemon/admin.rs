//! # The administrator's face: the control socket, the status report, reload, systemd
//!
//! What an operator sees of the daemon and how they steer it: the control socket
//! ([`crate::control`]: `status`, `version`, `quarantine lift`) answered from
//! [`Supervisor::status_report`], the one status schema ([`StatusReport`], which `tcmu-warden
//! status` prints and the in-process snapshots [`DeviceStatus`](super::DeviceStatus) and
//! [`WorkerStatus`](super::WorkerStatus) are views of for tests), `SIGHUP` reloads
//! ([`crate::reload`]), and systemd's `READY=1`, `RELOADING=1`, `STOPPING=1`, `STATUS=` and
//! `WATCHDOG=1` ([`crate::sdnotify`]).
//!
//! `Admin` owns the control server, the systemd notifier and its watchdog timer, the start
//! time and the configuration generation. This module only reads the device and worker tables
//! (to report them) and replaces the configuration on reload; it never starts, kills or
//! messages a worker, and never writes a kernel knob.

use std::os::fd::BorrowedFd;
use std::time::Instant;

use nix::poll::PollFlags;
use tracing::{error, info, warn};

use super::{DevicePhase, Supervisor, Token, WorkerPhase, default_worker_exe};
use crate::config::Config;
use crate::control::{
    ControlServer, ControlToken, DaemonReport, DeviceReport, FilePolicy, PolicyReport, RamPolicy,
    Request, Response, StatusReport, WorkerReport,
};
use crate::reload;
use crate::sdnotify::Notifier;
use crate::worker::describe_exit;

/// The administrator's face's own state.
pub(super) struct Admin {
    pub(super) control: Option<ControlServer>,
    pub(super) notifier: Notifier,
    pub(super) next_watchdog: Option<Instant>,
    started_at: Instant,
    generation: u32,
}

impl Admin {
    pub(super) fn new() -> Admin {
        Admin {
            control: None,
            notifier: Notifier::default(),
            next_watchdog: None,
            started_at: Instant::now(),
            generation: 1,
        }
    }

    /// The earliest time the control socket or the watchdog needs a turn.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let control = self.control.as_ref().and_then(ControlServer::next_deadline);
        [control, self.next_watchdog].into_iter().flatten().min()
    }
}

fn phase_name(p: &DevicePhase) -> &'static str {
    match p {
        DevicePhase::Queued => "queued",
        DevicePhase::Sent => "sent",
        DevicePhase::Ready => "ready",
        DevicePhase::Failed(_) => "failed",
        DevicePhase::Removing => "removing",
        DevicePhase::Orphaned => "orphaned",
        DevicePhase::Recovering => "recovering",
        DevicePhase::Quarantined(_) => "quarantined",
    }
}

fn worker_phase_name(p: WorkerPhase) -> &'static str {
    match p {
        WorkerPhase::Handshaking => "handshaking",
        WorkerPhase::Ready => "ready",
        WorkerPhase::ShuttingDown => "shutting-down",
        WorkerPhase::Closing => "closing",
        WorkerPhase::Killed => "killed",
        WorkerPhase::Exited => "exited",
    }
}

impl Supervisor {
    /// Answers control requests on `server`.
    pub fn attach_control(&mut self, server: ControlServer) {
        self.admin.control = Some(server);
    }

    /// The control socket's descriptors the loop waits on.
    pub(super) fn admin_sources(&self) -> Vec<(Token, BorrowedFd<'_>, PollFlags)> {
        self.admin.control.as_ref().map_or_else(Vec::new, |c| {
            c.poll_fds()
                .into_iter()
                .map(|(t, fd, flags)| (Token::Control(t), fd, flags))
                .collect()
        })
    }

    /// Work due at the end of every turn: the systemd watchdog, idle control connections.
    pub(super) fn admin_turn(&mut self, now: Instant) {
        if let Some(next) = self.admin.next_watchdog
            && next <= now
        {
            self.admin.notifier.notify("WATCHDOG=1");
            self.admin.next_watchdog = self
                .admin
                .notifier
                .watchdog_interval()
                .map(|every| now + every);
        }
        if let Some(c) = &mut self.admin.control {
            c.expire(now);
        }
    }

    // ---- control ------------------------------------------------------------------------------

    pub(super) fn serve_control(&mut self, ready: &[ControlToken]) {
        let Some(server) = &mut self.admin.control else {
            return;
        };
        let requests = server.service(ready);
        for (conn, request) in requests {
            let response = match request {
                Ok(Request::Status) => Response {
                    ok: true,
                    status: Some(self.status_report()),
                    ..Response::default()
                },
                Ok(Request::Version) => Response {
                    ok: true,
                    version: Some(env!("CARGO_PKG_VERSION").to_owned()),
                    ..Response::default()
                },
                Ok(Request::LiftQuarantine { worker }) => match self.lift_quarantine(&worker) {
                    Ok(lift) => Response {
                        ok: true,
                        lift: Some(lift),
                        ..Response::default()
                    },
                    Err(e) => {
                        warn!(worker = ?worker, error = %e, "quarantine lift refused");
                        Response::error(e.to_string())
                    }
                },
                Err(why) => Response::error(why.to_string()),
            };
            if let Some(server) = &mut self.admin.control {
                server.respond(conn, &response);
            }
        }
    }

    /// Everything `tcmu-warden status` shows.
    pub fn status_report(&self) -> StatusReport {
        let uevents = self.hotplug.uevents_state();
        let daemon = DaemonReport {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            config: self.config.source.display().to_string(),
            config_generation: self.admin.generation,
            uptime_secs: self.admin.started_at.elapsed().as_secs(),
            shutting_down: self.shutdown.is_some(),
            uevents: uevents.to_owned(),
            netlink: self.hotplug.netlink_state().to_owned(),
        };
        let c = &self.config;
        let policy = PolicyReport {
            served: c
                .served_subtypes()
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            worker_exe: self.opts.worker_exe.display().to_string(),
            file: c.file.as_ref().map(|f| FilePolicy {
                allow_paths: f
                    .allow_paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
                isolation: f.isolation.as_str().to_owned(),
            }),
            ram: c.ram.as_ref().map(|r| RamPolicy {
                max_size: r.max_size,
            }),
        };
        let devices = self
            .devices
            .iter()
            .map(|(id, d)| {
                let stats = d.stats.as_ref();
                let worker_pid = self
                    .workers
                    .get(&d.worker)
                    .filter(|s| !matches!(s.phase, WorkerPhase::Exited | WorkerPhase::Killed))
                    .map(|s| s.process.pid());
                // Parked with the refusals worker (failing fast, or blocked if nothing answers).
                let quarantined = d.parked.is_some()
                    && !matches!(d.phase, DevicePhase::Failed(_) | DevicePhase::Removing);
                DeviceReport {
                    id: *id,
                    uio: d.dev.uio.clone(),
                    backstore: d.dev.label(),
                    subtype: d.dev.subtype.clone(),
                    cfgstring: d.dev.cfgstring.clone(),
                    size: d.dev.dev_size,
                    block_size: d.dev.block_size,
                    write_cache: d.dev.write_cache,
                    worker: d.worker.name(),
                    worker_pid,
                    state: if quarantined {
                        "quarantined"
                    } else {
                        phase_name(&d.phase)
                    }
                    .to_owned(),
                    blocked: d.blocked,
                    recoveries: d.recoveries,
                    resets: d.resets,
                    refusal: d.spec.refusal.clone(),
                    home_worker: d.parked.as_ref().map(|p| p.home.name()),
                    failure: match &d.phase {
                        DevicePhase::Failed(why) => Some(why.clone()),
                        _ => None,
                    },
                    commands: stats.map(|s| s.commands),
                    errors: stats.map(|s| s.errors),
                    bytes_read: stats.map(|s| s.bytes_read),
                    bytes_written: stats.map(|s| s.bytes_written),
                }
            })
            .collect();
        let workers = self
            .workers
            .iter()
            .map(|(key, s)| {
                let exit = s.process.exit_status();
                let history = self.history.get(key);
                let last_crash = history
                    .and_then(|h| h.last_cause.clone())
                    .or_else(|| s.kill_reason.clone())
                    .or_else(|| exit.filter(|e| !e.success()).map(describe_exit));
                // A quarantined worker's devices stay its own while the refusals worker
                // answers for them.
                let devices = self
                    .devices
                    .iter()
                    .filter(|(_, d)| {
                        &d.worker == key || d.parked.as_ref().is_some_and(|p| &p.home == key)
                    })
                    .map(|(id, _)| *id)
                    .collect();
                WorkerReport {
                    name: s.name.clone(),
                    pid: s.process.pid(),
                    state: worker_phase_name(s.phase).to_owned(),
                    subtypes: s.subtypes.clone(),
                    devices,
                    restarts: history.map_or(0, |h| h.restarts),
                    crashes: history.map_or(0, |h| h.total),
                    last_crash,
                    quarantined: history.and_then(|h| h.quarantined.clone()),
                    lifts: history.map_or(0, |h| h.lifts),
                    jail: s.jail.as_ref().map(ToString::to_string),
                }
            })
            .collect();
        StatusReport {
            daemon,
            policy,
            devices,
            workers,
        }
    }

    // ---- reload ---------------------------------------------------------------------------------

    /// Re-reads the configuration file and applies it to devices and workers from now on
    /// (see [`crate::reload`]). A file that does not load keeps the configuration in force.
    pub fn reload(&mut self) {
        self.admin.notifier.notify("RELOADING=1");
        let source = self.config.source.clone();
        let result = Config::load(&source);
        match result {
            Err(e) => {
                error!(config = %source.display(), error = %e, "configuration reload failed; the configuration in force stays");
            }
            Ok(new) => {
                for warning in new.warnings() {
                    warn!(config = %source.display(), "{warning}");
                }
                let changes = reload::changes(&self.config, &new);
                let merged = reload::merge(&self.config, new);
                let exe = match &merged.daemon.worker_exe {
                    Some(exe) => Some(exe.clone()),
                    None => default_worker_exe().ok(),
                };
                if let Some(exe) = exe {
                    self.opts.worker_exe = exe;
                }
                self.opts.shutdown_timeout = merged.daemon.drain_timeout;
                self.config = merged;
                self.admin.generation += 1;
                for line in &changes.applied {
                    info!(change = %line, "configuration change applies to devices and workers from now on");
                }
                for line in &changes.need_restart {
                    warn!(change = %line, "configuration change needs a restart; ignored");
                }
                info!(
                    config = %source.display(),
                    generation = self.admin.generation,
                    applied = changes.applied.len(),
                    ignored = changes.need_restart.len(),
                    "configuration reloaded"
                );
            }
        }
        self.admin.notifier.notify(&format!(
            "READY=1\nSTATUS=serving {} devices with {} workers",
            self.devices.len(),
            self.workers.len()
        ));
    }
}

/// Renders a status report as JSON (what `status --json` prints).
pub fn status_json(report: &StatusReport) -> String {
    serde_json::to_string_pretty(report)
        .unwrap_or_else(|e| format!("{{\"error\":{:?}}}", e.to_string()))
}
