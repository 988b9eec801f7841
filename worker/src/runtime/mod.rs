//! # The worker runtime: the conversation with the supervisor, and the engine serving its devices
//!
//! A worker process starts with one inherited descriptor, a `SOCK_SEQPACKET` socket to the
//! supervisor (its number in `TCMU_WARDEN_FD`). It answers the supervisor's `Hello`, then serves
//! devices as they arrive: for each [`ToWorker::AddDevice`] it opens the subtype's handler (or, for
//! a device the policy refused, an emulator that fails every command with NOT READY), maps the UIO
//! region, and starts serving it on the worker's one [`device::Engine`] (an event loop over every
//! device's ring and a shared I/O pool of the policy's `io_threads`, started after stage two of
//! the jail; see [`device`]), which returns the device's [`device::DeviceRunner`]. It reports each device ready or failed, answers
//! pings with counters, and on `Shutdown` (or when the supervisor goes away) drains its devices and
//! exits.
//!
//! Each device normally comes with an in-flight journal ([`JournalMode`]): `Fresh` starts a
//! journal at the ring's tail; `Recover` rebuilds the ring from the journal a crashed predecessor
//! left ([`Ring::recover`]) and finishes what it left running. A journal that does not agree with
//! the ring is reported as [`FromWorker::RecoveryFailed`] and the device is not served: the
//! supervisor resets the ring and sends the device again. So is a ring handed over without a
//! journal to recover from (`Fresh` or `None`) in which commands already wait
//! ([`Ring::check_unserved`]): nothing says which of them a previous server already answered.
//!
//! [`worker_main`] is the whole of a worker executable's `main`: the built-in `tcmu-warden-worker`
//! calls it with the built-in handler factories, and a third-party handler binary calls it with its
//! own.
//!
//! This module never opens a path: every file it uses arrives as a descriptor from the supervisor.

mod config;
pub mod device;
pub mod replay;

use std::collections::HashMap;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::Arc;

use tcmu_warden_proto::{
    Channel, DeviceFds, DeviceSpec, DeviceStats, Fds, FromWorker, JournalMode, ProtoError, ToWorker,
};
use tracing::{error, info, warn};

use crate::ring::journal::{Journal, JournalError};
use crate::ring::{Mapping, RecoverError, Ring, RingError};
use crate::scsi::{CopyRegistry, Emulator};
pub use config::{MIN_MAX_TRANSFER_BYTES, device_config};
pub use device::{Counters, DeviceError, DeviceOptions, DeviceRunner, Engine, OnExit};
use tcmu_warden_sdk::{HandlerError, HandlerFactory};

use tcmu_warden_proto::process::{CHANNEL_FD_ENV as FD_ENV, LOG_FORMAT_ENV, fit_reason};

/// Errors that end a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The supervisor socket failed or sent something unacceptable.
    #[error("supervisor channel: {0}")]
    Proto(#[from] ProtoError),
    /// The conversation broke its rules.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The inherited socket is missing or bad.
    #[error("no supervisor socket: {0}")]
    NoSocket(String),
    /// Stage two of the jail could not be entered: the worker serves nothing unconfined.
    #[error("{0}")]
    Jail(#[from] crate::jail::JailError),
}

/// Why a device could not be served.
#[derive(Debug, thiserror::Error)]
enum AddError {
    #[error("no handler for subtype {0:?} in this worker")]
    UnknownSubtype(String),
    #[error("{0}")]
    Handler(#[from] HandlerError),
    #[error("{0}")]
    Ring(#[from] RingError),
    #[error("starting device threads: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Fds(#[from] ProtoError),
    #[error("device id {0} is already served")]
    Duplicate(u64),
    #[error("map size {0} does not fit this machine's address space")]
    MapSize(u64),
    #[error("{0}")]
    Journal(#[from] JournalError),
    #[error("{0}")]
    Recover(#[from] RecoverError),
}

/// How a device's runner starts.
enum Start {
    /// A ring with no history to finish.
    Ring(Ring),
    /// A ring rebuilt from a predecessor's journal.
    Recovered(crate::ring::Recovery),
}

struct Served {
    runner: DeviceRunner,
    emulator: Arc<Emulator>,
}

/// Applies a kernel reconfiguration (LIO's `RECONFIG_DEVICE`, relayed by the supervisor) to a
/// served device's emulator: a new size resizes the handler first (which may fail, leaving the
/// old size in force), then the emulator, which makes READ CAPACITY report it and queues a
/// CAPACITY DATA HAS CHANGED unit attention for the initiator; a new write-cache setting takes
/// effect for the next command.
pub fn apply_reconfig(
    emulator: &Emulator,
    dev_size: Option<u64>,
    write_cache: Option<bool>,
) -> Result<(), String> {
    if let Some(size) = dev_size {
        let block = u64::from(emulator.block_size());
        if size < block {
            return Err(format!("new size {size} holds no whole {block}-byte block"));
        }
        emulator
            .handler()
            .resize(size)
            .map_err(|e| format!("resizing the backing store to {size} bytes: {e}"))?;
        emulator.resize(size);
    }
    if let Some(on) = write_cache {
        emulator.set_write_cache(on);
    }
    Ok(())
}

/// A worker's state: its handler factories and the devices it serves.
pub struct Worker {
    chan: Arc<Channel>,
    factories: Vec<Arc<dyn HandlerFactory>>,
    devices: HashMap<u64, Served>,
    opts: DeviceOptions,
    /// The event loop and I/O pool serving every device, started after stage two of the jail
    /// (so that its threads are confined too).
    engine: Option<Engine>,
    /// Every served device's emulator by NAA designator, so that an EXTENDED COPY received by
    /// one device can read from or write to another device of this worker. It holds weak
    /// references: a device leaves it when its runner (the last owner of its emulator) stops.
    copy_registry: Arc<CopyRegistry>,
}

impl Worker {
    /// A worker speaking on `chan` with the given handler factories.
    pub fn new(chan: Channel, factories: Vec<Arc<dyn HandlerFactory>>) -> Worker {
        Worker {
            chan: Arc::new(chan),
            factories,
            devices: HashMap::new(),
            opts: DeviceOptions::default(),
            engine: None,
            copy_registry: CopyRegistry::new(),
        }
    }

    fn factory(&self, subtype: &str) -> Option<&Arc<dyn HandlerFactory>> {
        self.factories.iter().find(|f| f.subtype() == subtype)
    }

    /// Runs the conversation until `Shutdown` or until the supervisor hangs up.
    pub fn serve(mut self) -> Result<(), WorkerError> {
        let (hello, fds) = self.chan.recv::<ToWorker>()?;
        let ToWorker::Hello {
            worker,
            subtypes,
            jail,
        } = hello
        else {
            return Err(WorkerError::Protocol(format!(
                "expected Hello, got {hello:?}"
            )));
        };
        drop(fds);
        // Stage two of the jail, before answering and so before any device is served.
        crate::jail::enter_stage_two(&self.factories, jail.as_ref())?;
        if let Some(n) = jail.as_ref().and_then(|j| j.io_threads) {
            self.opts.io_threads = usize::from(n).max(1);
        }
        let missing: Vec<&String> = subtypes
            .iter()
            .filter(|s| self.factory(s).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(WorkerError::Protocol(format!(
                "asked to serve subtypes this worker lacks: {missing:?}"
            )));
        }
        let span = tracing::info_span!("worker", worker = %worker);
        let _enter = span.enter();
        let mine: Vec<String> = self
            .factories
            .iter()
            .map(|f| f.subtype().to_owned())
            .collect();
        self.chan.send(&FromWorker::Hello {
            pid: std::process::id(),
            subtypes: mine,
        })?;
        info!(?subtypes, "worker ready");
        loop {
            let (msg, fds) = match self.chan.recv::<ToWorker>() {
                Ok(m) => m,
                Err(ProtoError::Closed) => {
                    warn!("supervisor closed the connection; draining devices and exiting");
                    self.stop_all();
                    return Ok(());
                }
                Err(e) => {
                    self.stop_all();
                    return Err(e.into());
                }
            };
            match msg {
                ToWorker::Hello { .. } => return Err(WorkerError::Protocol("second Hello".into())),
                ToWorker::AddDevice(spec) => {
                    let id = spec.id;
                    let name = spec.name.clone();
                    match self.add_device(spec, fds) {
                        Ok(()) => {
                            info!(device = %name, id, "device ready");
                            self.chan.send(&FromWorker::DeviceReady { id })?;
                        }
                        Err(AddError::Recover(e)) => {
                            warn!(device = %name, id, error = %e,
                                  "cannot serve the ring as it is; asking for a ring reset");
                            let reason = fit_reason(e.to_string());
                            self.chan.send(&FromWorker::RecoveryFailed { id, reason })?;
                        }
                        Err(e) => {
                            error!(device = %name, id, error = %e, "device failed");
                            let reason = fit_reason(e.to_string());
                            self.chan.send(&FromWorker::DeviceFailed { id, reason })?;
                        }
                    }
                }
                ToWorker::RemoveDevice { id } => {
                    if let Some(dev) = self.devices.remove(&id) {
                        if let Err(e) = dev.runner.stop() {
                            warn!(id, error = %e, "device did not stop cleanly");
                        }
                        self.chan.send(&FromWorker::DeviceRemoved { id })?;
                    } else {
                        warn!(id, "asked to remove a device this worker does not serve");
                    }
                }
                ToWorker::Reconfig {
                    id,
                    dev_size,
                    write_cache,
                } => {
                    let reply = match self.devices.get(&id) {
                        None => FromWorker::ReconfigFailed {
                            id,
                            reason: "this worker does not serve the device".into(),
                        },
                        Some(dev) => match apply_reconfig(&dev.emulator, dev_size, write_cache) {
                            Ok(()) => {
                                info!(id, ?dev_size, ?write_cache, "device reconfigured");
                                FromWorker::Reconfigured { id }
                            }
                            Err(reason) => {
                                warn!(id, error = %reason, "reconfiguration failed");
                                let reason = fit_reason(reason);
                                FromWorker::ReconfigFailed { id, reason }
                            }
                        },
                    };
                    self.chan.send(&reply)?;
                }
                ToWorker::Ping { seq } => {
                    let stats = self.stats();
                    self.chan.send(&FromWorker::Pong { seq, stats })?;
                }
                ToWorker::Shutdown => {
                    info!("shutdown requested");
                    self.stop_all();
                    return Ok(());
                }
            }
        }
    }

    fn stats(&self) -> Vec<DeviceStats> {
        let mut v: Vec<DeviceStats> = self
            .devices
            .iter()
            .take(tcmu_warden_proto::MAX_DEVICES_PER_WORKER)
            .map(|(&id, d)| {
                let c = d.runner.counters();
                let get =
                    |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                DeviceStats {
                    id,
                    commands: get(&c.commands),
                    errors: get(&c.errors),
                    bytes_read: get(&c.bytes_read),
                    bytes_written: get(&c.bytes_written),
                }
            })
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }

    fn stop_all(&mut self) {
        for (id, dev) in self.devices.drain() {
            if let Err(e) = dev.runner.stop() {
                warn!(id, error = %e, "device did not stop cleanly");
            }
        }
    }

    fn add_device(&mut self, spec: DeviceSpec, fds: Fds) -> Result<(), AddError> {
        if self.devices.contains_key(&spec.id) {
            return Err(AddError::Duplicate(spec.id));
        }
        let DeviceFds {
            uio,
            backing,
            journal,
        } = DeviceFds::claim(&spec, fds)?;
        let journal = match journal {
            Some(fd) => Some(Journal::map(fd.as_fd())?),
            None => None,
        };
        let cfg = device_config(&spec);
        let emulator = match &spec.refusal {
            Some(why) => {
                warn!(device = %spec.name, reason = %why, "serving refused device: every command fails NOT READY");
                Emulator::refused(&cfg, why)
            }
            None => {
                let factory = self
                    .factory(&spec.subtype)
                    .ok_or_else(|| AddError::UnknownSubtype(spec.subtype.clone()))?;
                let handler = factory.open(&cfg, backing)?;
                Emulator::new(&cfg, handler)
            }
        };
        let len = usize::try_from(spec.map_size).map_err(|_| AddError::MapSize(spec.map_size))?;
        let map = Mapping::map(uio.as_fd(), len)?;
        let start = match (spec.journal, journal) {
            (JournalMode::Recover, Some(j)) => {
                let rec = Ring::recover(map, j)?;
                info!(device = %spec.name, generation = rec.report.generation,
                      redelivered = rec.report.redelivered, already_done = rec.report.already_done,
                      running = rec.report.pending, tail = rec.report.tail,
                      fetch_pos = rec.report.fetch_pos,
                      "recovered the ring from the previous worker's journal");
                Start::Recovered(rec)
            }
            (_, j) => {
                // Nothing to recover from: the ring must be one nobody served (or one just
                // reset). If commands already wait in it, ask for a reset rather than guess.
                Ring::new(Arc::clone(&map))?.check_unserved()?;
                match j {
                    Some(j) => Start::Ring(Ring::with_journal(map, j)?),
                    None => Start::Ring(Ring::new(map)?),
                }
            }
        };
        let chan = self.chan.clone();
        let id = spec.id;
        let on_exit = Box::new(move |r: &Result<(), DeviceError>| {
            if let Err(e) = r {
                let reason = fit_reason(e.to_string());
                let _ = chan.send(&FromWorker::DeviceFailed { id, reason });
            }
        });
        if spec.journal == JournalMode::Recover {
            // A previous worker served this device and is gone: whatever state it kept for the
            // initiator (unit attentions, copy results) went with it, as after a power cycle.
            // Recovered commands are replayed without it; the next new command reports it.
            emulator.power_on_reset();
        }
        let emulator = Arc::new(emulator);
        self.copy_registry.register(&emulator);
        let engine = match &self.engine {
            Some(e) => e.clone(),
            None => {
                let e = Engine::new(self.opts)?;
                info!(
                    io_threads = self.opts.io_threads,
                    "started the event loop and the I/O pool"
                );
                self.engine = Some(e.clone());
                e
            }
        };
        let runner = match start {
            Start::Recovered(rec) => {
                engine.start_recovered(spec.name.clone(), rec, uio, emulator.clone(), on_exit)?
            }
            Start::Ring(ring) => {
                engine.start(spec.name.clone(), ring, uio, emulator.clone(), on_exit)?
            }
        };
        self.devices.insert(spec.id, Served { runner, emulator });
        Ok(())
    }
}

/// Cuts `s` to at most `max` bytes at a character boundary (`String::truncate` panics inside a
/// character).
/// Takes ownership of the supervisor socket named by `TCMU_WARDEN_FD`.
pub fn channel_from_env() -> Result<Channel, WorkerError> {
    let raw =
        std::env::var(FD_ENV).map_err(|_| WorkerError::NoSocket(format!("{FD_ENV} is not set")))?;
    let fd: i32 = raw
        .trim()
        .parse()
        .map_err(|_| WorkerError::NoSocket(format!("{FD_ENV}={raw:?} is not a number")))?;
    if fd < 3 {
        return Err(WorkerError::NoSocket(format!(
            "{FD_ENV}={fd} names a standard stream"
        )));
    }
    // SAFETY: F_GETFD only inspects the descriptor table entry.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(WorkerError::NoSocket(format!(
            "descriptor {fd} is not open"
        )));
    }
    // SAFETY: the supervisor installed this descriptor for us at exec; nothing else in this
    // process owns it, and we take it exactly once (the variable is removed right after).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: single-threaded at this point of start-up; nothing reads the environment concurrently.
    unsafe { std::env::remove_var(FD_ENV) };
    // SAFETY: fcntl with an integer argument on a descriptor we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(Channel::from_fd(owned))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var(LOG_FORMAT_ENV).is_ok_and(|v| v == "json");
    // Colour only for a person at a terminal; the journal and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The `main` of a worker executable: logging, the supervisor socket, then [`Worker::serve`]
/// (which enters stage two of the jail, [`crate::jail::enter_stage_two`], as the supervisor's
/// `Hello` asks, before it serves anything).
pub fn worker_main(factories: Vec<Arc<dyn HandlerFactory>>) -> ExitCode {
    init_logging();
    let chan = match channel_from_env() {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "a worker is started by the tcmu-warden supervisor, not by hand");
            return ExitCode::from(2);
        }
    };
    match Worker::new(chan, factories).serve() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ WorkerError::Jail(_)) => {
            error!(error = %e, "cannot confine this worker; refusing to serve");
            ExitCode::from(3)
        }
        Err(e) => {
            error!(error = %e, "worker ends");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconfig_of_an_unknown_device_is_refused_and_the_worker_carries_on() {
        let (sup, ours) = Channel::pair().unwrap();
        let worker = std::thread::spawn(move || Worker::new(ours, Vec::new()).serve());
        sup.send(&ToWorker::Hello {
            worker: "t".into(),
            subtypes: Vec::new(),
            jail: None,
        })
        .unwrap();
        let (hello, _) = sup.recv::<FromWorker>().unwrap();
        assert!(matches!(hello, FromWorker::Hello { .. }));
        sup.send(&ToWorker::Reconfig {
            id: 9,
            dev_size: Some(1 << 20),
            write_cache: Some(true),
        })
        .unwrap();
        let (reply, _) = sup.recv::<FromWorker>().unwrap();
        match reply {
            FromWorker::ReconfigFailed { id, reason } => {
                assert_eq!(id, 9);
                assert!(reason.contains("does not serve"), "{reason}");
            }
            other => panic!("unexpected {other:?}"),
        }
        sup.send(&ToWorker::Ping { seq: 4 }).unwrap();
        let (pong, _) = sup.recv::<FromWorker>().unwrap();
        assert_eq!(
            pong,
            FromWorker::Pong {
                seq: 4,
                stats: Vec::new()
            }
        );
        sup.send(&ToWorker::Shutdown).unwrap();
        worker.join().unwrap().unwrap();
    }
}
