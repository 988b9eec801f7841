//! # The daemon: devices, workers, and the event loop that ties them together
//!
//! [`Supervisor`] owns every TCMU device the daemon serves and every worker process serving
//! them. [`run`] is the daemon: scan, hand devices to workers, then loop until told to stop.
//!
//! ## Devices
//! [`Supervisor::adopt`] takes a discovered [`TcmuDevice`], opens its `/dev/uioN` and keeps that
//! descriptor for as long as it manages the device: the kernel tears a TCMU ring down only on
//! the *last* close, so a worker that crashes leaves the ring (and the commands in it) intact
//! for a successor. The supervisor never `read`s the uio descriptor: the wake-up counter behind
//! it is shared with the worker's copy, and a read here would steal the worker's wake-ups.
//!
//! Every device is asked of the policy ([`Config::admit`]). An admitted device goes to the
//! worker for its subtype with its backing store (for `file`, the descriptor the policy opened).
//! A refused device is logged (one WARN line naming device, cfgstring and rule) and still goes to
//! a worker, with [`DeviceSpec::refusal`] set and no backing store: the worker answers its SCSI
//! commands with NOT READY, so initiators fail at once instead of timing out. Refused devices of
//! a configured subtype stay with that subtype's worker (under `isolation = "subtype"`); the
//! others go to a worker dedicated to refusals, which is given no subtypes. The refusals worker
//! also answers, the same way, for the devices of a quarantined worker ([`quarantine`]).
//!
//! ## Workers
//! One worker per [`WorkerKey`]: per subtype, per device (`isolation = "device"`), or the
//! refusals worker. A worker is started on first need, greeted with `Hello`, and sent devices
//! once it answered. Workers are untrusted: every message is decoded and validated by the
//! protocol crate, and a worker that sends something undecodable, something unexpected in its
//! state, or a reply about a device it does not own is killed (SIGKILL, reaped, logged) — the
//! supervisor itself carries on. A worker that misses a deadline (Hello, a device reply,
//! shutdown) is killed too.
//!
//! ## Crashes, restarts and recovery
//! See [`lifecycle`]: heartbeats, crash classification, restart with exponential backoff,
//! quarantine (what it does to devices, and the operator's lift: [`quarantine`]), and the
//! hand-over of each device's in-flight journal (kept by [`JournalStore`]
//! under `daemon.journal_dir`) so that a successor finishes exactly what a dead worker left in
//! flight, with `block_dev` around the hand-over and `reset_ring` as the fallback.
//!
//! ## When the supervisor itself restarts
//! Workers are started with `PR_SET_PDEATHSIG = SIGKILL`: if the supervisor dies, they die too,
//! and the last descriptor of each `/dev/uioN` closes. The kernel keeps the ring and its commands
//! through that (`tcmu_release` only drops commands kept with `KEEP_BUF`, which tcmu-warden never
//! uses, and `tcmu_open` does not reset the ring), and the journals stay in `/run`. A restarted
//! supervisor that finds a device with a journal file therefore blocks it and hands it over in
//! `Recover` mode, exactly as after a worker crash; journals of devices that no longer exist are
//! deleted at start-up.
//!
//! ## The loop
//! [`Supervisor`] is the coordinator: it owns the device table (`devices`: every fact about one
//! device in its `Device` record), the worker table (`workers` and their crash history), the
//! hot-plug state machine (`hotplug::Hotplug`) and the administrator's face
//! (`admin::Admin`: control socket, status, reload, systemd), and dispatches events to them.
//! [`Supervisor::poll_once`] is one turn: `poll` on every source, each named by a `Token`
//! (the signal wake-up socket, each worker's channel, uevents, netlink, each control
//! connection), with the nearest deadline as timeout; then signals, worker messages, kernel
//! events, control requests, reaping (`waitpid(WNOHANG)` per worker), deadlines (replies,
//! heartbeats, restarts), and the hot-plug and admin turns (`Supervisor::hotplug_turn`,
//! `Supervisor::admin_turn`). Heartbeats ([`lifecycle`]) are the only pings; their answers
//! carry the counters the status report shows.
//!
//! Kernel knobs (`block_dev`, `reset_ring`, module parameters) are written only through
//! [`crate::lio`], and only from [`lifecycle`] (a device's block, unblock and ring reset, the
//! drain's block) and [`hotplug`] (netlink's module parameters, the drain's ring reset).
//!
//! This module never parses sysfs (that is [`crate::discovery`]), never decides policy (that is
//! [`crate::config`]), and never spawns processes by hand (that is [`crate::worker`]).

pub mod admin;
pub mod hotplug;
pub mod lifecycle;
pub mod quarantine;
mod signals;

use std::collections::{BTreeMap, VecDeque};
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::config::{Config, Isolation, Lifecycle, LogFormat, UeventSource};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tcmu_warden_proto::process::{fit_name, fit_reason};
use tcmu_warden_proto::{
    DeviceFds, DeviceSpec, DeviceStats, FromWorker, JournalMode, ProtoError, ToWorker,
};
use tracing::{debug, error, info, warn};

use crate::control::ControlToken;
use crate::discovery::{self, DiscoveryError, TcmuDevice, is_uio_name};
use crate::jail::{self, JailStatus};
use crate::journal::{JournalStore, OpenJournal};
use crate::worker::{WorkerProcess, WorkerProcessError, describe_exit};

use lifecycle::CrashHistory;
use signals::Signals;

/// Name of the worker that serves refused devices of unconfigured subtypes.
pub const REFUSED_WORKER: &str = "refused";

/// Most messages handled from one worker in one turn, so a chatty worker cannot starve others.
const MAX_MESSAGES_PER_TURN: usize = 64;

/// How long start-up waits for a busy uio node to be released (see
/// [`Supervisor::start`]).
const UIO_RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Longest sleep of one loop turn when no deadline is nearer.
pub const IDLE_TICK: Duration = Duration::from_secs(1);

/// How long the supervisor waits for the kernel to log the audit record of a seccomp kill
/// (printed asynchronously by the audit thread) before naming the system call "unknown".
const KMSG_PATIENCE: Duration = Duration::from_millis(300);

/// How long after SIGKILL at the end of a shutdown the daemon waits for reaping before it exits
/// anyway (a process stuck in uninterruptible I/O cannot be reaped).
const REAP_GRACE: Duration = Duration::from_secs(5);

/// Tunables of the supervisor; [`Options::from_config`] fills them from the configuration.
#[derive(Debug, Clone)]
pub struct Options {
    /// The worker executable.
    pub worker_exe: PathBuf,
    /// Where `class/uio` and `kernel/config` are.
    pub sysfs_root: PathBuf,
    /// Where the `uioN` nodes are.
    pub dev_root: PathBuf,
    /// `TCMU_WARDEN_LOG_FORMAT` for workers (`None`: pass the supervisor's own through).
    pub worker_log_format: Option<LogFormat>,
    /// How long a new worker has to answer `Hello`.
    pub handshake_timeout: Duration,
    /// How long a worker has to answer `AddDevice` or `RemoveDevice`.
    pub reply_timeout: Duration,
    /// How long workers have to exit after `Shutdown` before they are killed.
    pub shutdown_timeout: Duration,
    /// How long a worker that closed its channel has to exit before it is killed.
    pub exit_grace: Duration,
    /// Heartbeats, restart backoff and quarantine (`[daemon]` keys).
    pub lifecycle: Lifecycle,
    /// Where the devices' in-flight journals live.
    pub journal_dir: PathBuf,
    /// DEBUGGING ONLY, NOT FOR PRODUCTION: start workers without their jail (no stage one,
    /// and the worker skips stage two). Off unless `tcmu-warden run --no-jail` turns it on.
    pub unconfined: bool,
    /// Follow the kernel's device events (uevents, `TCM-USER` netlink). On by default only
    /// when `sysfs_root` is `/sys`: a fake tree gets no kernel events.
    pub kernel_events: bool,
    /// Which copy of the uevents to follow.
    pub uevent_source: UeventSource,
    /// Where [`Supervisor::start_operations`] opens the control socket (`None`: nowhere).
    pub control_socket: Option<PathBuf>,
}

impl Options {
    /// Options from the configuration, with default timeouts. The worker executable defaults to
    /// `tcmu-warden-worker` next to the running executable.
    pub fn from_config(config: &Config) -> Result<Options, DaemonError> {
        let worker_exe = match &config.daemon.worker_exe {
            Some(exe) => exe.clone(),
            None => default_worker_exe()?,
        };
        Ok(Options {
            worker_exe,
            sysfs_root: config.daemon.sysfs_root.clone(),
            dev_root: config.daemon.dev_root.clone(),
            worker_log_format: None,
            handshake_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(30),
            shutdown_timeout: config.daemon.drain_timeout,
            exit_grace: Duration::from_secs(2),
            lifecycle: config.daemon.lifecycle,
            journal_dir: config.daemon.journal_dir.clone(),
            unconfined: false,
            kernel_events: config.daemon.sysfs_root == std::path::Path::new("/sys"),
            uevent_source: config.daemon.uevent_source,
            control_socket: Some(config.daemon.control_socket.clone()),
        })
    }
}

/// `tcmu-warden-worker` in the directory of the running executable.
pub fn default_worker_exe() -> Result<PathBuf, DaemonError> {
    let me = std::env::current_exe().map_err(DaemonError::WorkerExe)?;
    Ok(me.with_file_name("tcmu-warden-worker"))
}

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The default worker executable could not be located.
    #[error("locating the worker executable: {0}")]
    WorkerExe(io::Error),
    /// Signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(io::Error),
    /// The start-up scan failed as a whole.
    #[error("scanning for TCMU devices: {0}")]
    Scan(#[from] DiscoveryError),
    /// `poll` failed.
    #[error("poll: {0}")]
    Poll(nix::Error),
    /// The control socket could not be opened.
    #[error("control socket: {0}")]
    Control(crate::control::ControlError),
}

/// Why a device could not be taken over.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// The daemon is stopping.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// Not a `uioN` name.
    #[error("{0:?} is not a uio device name")]
    BadUio(String),
    /// The device is already managed.
    #[error("{0} is already managed")]
    AlreadyManaged(String),
    /// `/dev/uioN` could not be opened (`EBUSY`: another TCMU runner holds it).
    #[error("opening {}: {source}", path.display())]
    OpenUio {
        /// The node.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The device's attributes do not fit the wire's limits.
    #[error("cannot describe the device to a worker: {0}")]
    Spec(ProtoError),
}

/// A protocol violation: a message a worker had no business sending. It ends that worker (the
/// text is its kill reason), never the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// Something other than `Hello` as the first message.
    #[error("sent {0} before answering Hello")]
    BeforeHello(&'static str),
    /// A second `Hello`.
    #[error("sent a second Hello")]
    SecondHello,
    /// A reply about a device that is not the worker's.
    #[error("{what} for device {id}, which it does not own")]
    NotOwned {
        /// The message.
        what: &'static str,
        /// The device id it named.
        id: u64,
    },
    /// A reply the device's phase does not expect.
    #[error("{what} for device {id}, which is {phase:?}")]
    WrongPhase {
        /// The message.
        what: &'static str,
        /// The device.
        id: u64,
        /// Its phase.
        phase: DevicePhase,
    },
    /// `RecoveryFailed` right after the supervisor reset and blocked the ring.
    #[error("RecoveryFailed for device {0}, whose ring was just reset and blocked")]
    RecoveryAfterReset(u64),
    /// A `Pong` that answers no outstanding `Ping`.
    #[error("unsolicited Pong {0}")]
    UnsolicitedPong(u64),
    /// A `Pong` carrying counters of devices that are not the worker's.
    #[error("Pong reports devices it does not own")]
    ForeignStats,
    /// A reconfiguration answer nobody asked for.
    #[error("{what} for device {id}, which has no reconfiguration pending")]
    NoReconfigPending {
        /// The message.
        what: &'static str,
        /// The device.
        id: u64,
    },
}

/// Which worker serves a device.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WorkerKey {
    /// The shared worker of a subtype.
    Subtype(String),
    /// A device's own worker (`isolation = "device"`).
    Device {
        /// The subtype.
        subtype: String,
        /// LIO HBA number.
        hba: u32,
        /// Backstore name.
        name: String,
    },
    /// The worker for refused devices of unconfigured subtypes.
    Refused,
}

impl WorkerKey {
    /// The worker's name in logs and in `Hello`: `file`, `file:user_1/disk0`, `refused`.
    pub fn name(&self) -> String {
        match self {
            WorkerKey::Subtype(s) => s.clone(),
            WorkerKey::Device { subtype, hba, name } => {
                fit_name(format!("{subtype}:user_{hba}/{name}"))
            }
            WorkerKey::Refused => REFUSED_WORKER.to_owned(),
        }
    }

    /// The subtypes the worker is told to serve.
    pub fn subtypes(&self) -> Vec<String> {
        match self {
            WorkerKey::Subtype(s) | WorkerKey::Device { subtype: s, .. } => vec![s.clone()],
            WorkerKey::Refused => Vec::new(),
        }
    }
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerPhase {
    /// Started; `Hello` sent, answer awaited.
    Handshaking,
    /// Serving.
    Ready,
    /// `Shutdown` sent; exit awaited.
    ShuttingDown,
    /// It closed its channel; exit awaited.
    Closing,
    /// Killed by the supervisor; reaping awaited.
    Killed,
    /// Reaped.
    Exited,
}

/// A snapshot of one worker's entry and crash history, for callers and tests. What the control
/// socket serves is [`WorkerReport`](crate::control::WorkerReport), whose `last_crash` falls
/// back to the kill reason or the exit status when the key never crashed; here `last_crash` is
/// the crash history's last cause only.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    /// The worker's name.
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// Its phase.
    pub phase: WorkerPhase,
    /// The subtypes it was assigned.
    pub subtypes: Vec<String>,
    /// The subtypes it said it serves (after `Hello`).
    pub supported: Option<Vec<String>>,
    /// Devices assigned to it.
    pub devices: Vec<u64>,
    /// Why the supervisor killed it, if it did.
    pub kill_reason: Option<String>,
    /// How it ended, once reaped.
    pub exit: Option<ExitStatus>,
    /// Crashes of this worker key inside the quarantine window.
    pub crashes: u32,
    /// Crashes of this worker key ever (all its processes).
    pub total_crashes: u32,
    /// How many times a successor was started.
    pub restarts: u32,
    /// Why the last process of this key went down (`sandbox violation: ...`, `exit code 3`,
    /// `killed by the supervisor: ...`).
    pub last_crash: Option<String>,
    /// When a successor is due, if one is.
    pub restart_at: Option<Instant>,
    /// Why the key is quarantined (no more restarts), if it is.
    pub quarantined: Option<String>,
    /// How many times an operator lifted its quarantine.
    pub lifts: u32,
    /// The device counters of the last heartbeat answer.
    pub stats: Vec<DeviceStats>,
    /// When the last heartbeat was answered.
    pub last_pong: Option<Instant>,
    /// Its jail: what landlock and seccomp enforce, and (after the handshake) what
    /// `/proc/<pid>/status` showed. `None` for a worker started unconfined (`--no-jail`).
    pub jail: Option<JailStatus>,
}

/// Where a device is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevicePhase {
    /// Waiting for its worker to finish the handshake.
    Queued,
    /// `AddDevice` sent; answer awaited.
    Sent,
    /// The worker serves it.
    Ready,
    /// The worker reported it cannot serve it.
    Failed(String),
    /// `RemoveDevice` sent; answer awaited.
    Removing,
    /// No live worker serves it; the supervisor still holds its uio descriptor.
    Orphaned,
    /// Its worker went down; the device is blocked and waits for the successor.
    Recovering,
    /// Its worker crashed too often and is not restarted, and no worker answers for the device:
    /// it stays blocked (initiators wait). Only while the hand-over to the refusals worker is
    /// under way, or when the refusals worker itself is quarantined (see [`quarantine`]).
    Quarantined(String),
}

/// A snapshot of one device's record, for callers and tests (typed: its phase is a
/// [`DevicePhase`]). What the control socket serves is [`DeviceReport`], built from the same
/// record with the worker's counters.
///
/// [`DeviceReport`]: crate::control::DeviceReport
#[derive(Debug, Clone)]
pub struct DeviceStatus {
    /// Supervisor-assigned id.
    pub id: u64,
    /// `uioN`.
    pub uio: String,
    /// `user_<hba>/<name>`.
    pub label: String,
    /// Subtype, if any.
    pub subtype: Option<String>,
    /// The cfgstring.
    pub cfgstring: String,
    /// The worker it is assigned to.
    pub worker: String,
    /// Why the policy refused it, if it did.
    pub refusal: Option<String>,
    /// Whether a backing descriptor was (or will be) sent.
    pub has_backing: bool,
    /// Its phase.
    pub phase: DevicePhase,
    /// Whether the supervisor has blocked it (`action/block_dev = 1`).
    pub blocked: bool,
    /// The journal mode of the last hand-over to a worker.
    pub journal: JournalMode,
    /// Where its journal file is, if it has one.
    pub journal_path: Option<PathBuf>,
    /// Hand-overs that recovered from the journal.
    pub recoveries: u32,
    /// Ring resets.
    pub resets: u32,
    /// The quarantined worker it belongs to, while the refusals worker answers for it
    /// (see [`quarantine`]).
    pub home: Option<String>,
}

/// One worker's entry in the worker table: its process, phase, deadlines, heartbeat state and
/// jail. (Its crash history, which outlives its processes, is the `CrashHistory` of its key;
/// the worker side's ring has a `Slot` of its own, unrelated.)
struct WorkerEntry {
    name: String,
    subtypes: Vec<String>,
    process: WorkerProcess,
    phase: WorkerPhase,
    deadline: Option<Instant>,
    /// Devices waiting for the handshake, with their backing descriptors.
    queue: Vec<(u64, Option<OwnedFd>)>,
    supported: Option<Vec<String>>,
    kill_reason: Option<String>,
    /// Sequence number of the outstanding heartbeat `Ping`.
    ping: Option<u64>,
    /// When the outstanding heartbeat must be answered.
    ping_deadline: Option<Instant>,
    /// When the next heartbeat is due (set once the worker is ready).
    next_ping: Option<Instant>,
    /// Last heartbeat sequence number used.
    ping_seq: u64,
    /// When the last heartbeat was answered.
    last_pong: Option<Instant>,
    /// Counters from the last `Pong`.
    stats: Vec<DeviceStats>,
    /// The worker's jail (`None`: unconfined).
    jail: Option<JailStatus>,
}

/// One device's record in the device table: every fact the supervisor keeps about it. The other
/// types that describe a device differ from it so: [`TcmuDevice`] is what sysfs and configfs
/// said at discovery (no state); [`DeviceSpec`] is the description a worker is sent on the wire
/// (`proto`); the SDK's `DeviceConfig` is what a handler is given; [`DeviceStatus`] is an
/// in-process snapshot of this record for callers and tests; [`DeviceReport`] is its
/// serialized form in the `status` report.
///
/// [`DeviceReport`]: crate::control::DeviceReport
struct DeviceRecord {
    dev: TcmuDevice,
    spec: DeviceSpec,
    uio_fd: OwnedFd,
    worker: WorkerKey,
    phase: DevicePhase,
    deadline: Option<Instant>,
    /// The in-flight journal (`None` if it could not be created).
    journal: Option<OpenJournal>,
    /// A worker may have fetched from the ring since it was last fresh: the next worker must
    /// recover (or, without a journal, the ring must be reset first).
    ring_dirty: bool,
    /// The supervisor wrote `block_dev = 1` and has not unblocked it since (the one record of
    /// whether a device is blocked).
    blocked: bool,
    /// Blocked for the shutdown drain: stays blocked, and its ring is reset once its worker is
    /// gone.
    drained: bool,
    /// Journal mode of the last `AddDevice`.
    mode: JournalMode,
    /// The ring was reset for the hand-over under way (cleared once the device is served or its
    /// worker goes down): the worker cannot find commands in it, so a `RecoveryFailed` now is a
    /// lie (and would loop).
    reset_for_handover: bool,
    recoveries: u32,
    resets: u32,
    /// Parked with the refusals worker because its own worker is quarantined.
    parked: Option<quarantine::Parked>,
    /// Being released by its worker, to be handed to this one once released (a lifted
    /// quarantine takes its devices back from the refusals worker this way).
    move_to: Option<WorkerKey>,
    /// The counters of its worker's last `Pong`.
    stats: Option<DeviceStats>,
    /// What the kernel told of this device's identity ([`hotplug`]).
    inc: hotplug::Incarnation,
    /// Reconfigurations sent to its worker, oldest first, each still to be answered to the
    /// kernel.
    reconfigs: VecDeque<hotplug::PendingReconfig>,
    /// Reconfigurations already answered to the kernel that the worker may still answer (its
    /// late answer is then not a protocol violation).
    abandoned: usize,
    /// Its `dev_config` changed: adopted again, with this description, once released.
    reopen: Option<TcmuDevice>,
}

struct Shutdown {
    give_up: Instant,
}

/// The supervisor: devices, workers, and one turn of the event loop at a time.
pub struct Supervisor {
    config: Config,
    opts: Options,
    workers: BTreeMap<WorkerKey, WorkerEntry>,
    devices: BTreeMap<u64, DeviceRecord>,
    next_id: u64,
    signals: Signals,
    shutdown: Option<Shutdown>,
    /// Crash records per worker key, across its processes.
    history: BTreeMap<WorkerKey, CrashHistory>,
    journals: JournalStore,
    hotplug: hotplug::Hotplug,
    admin: admin::Admin,
}

impl Supervisor {
    /// A supervisor with no devices and no workers. Watches `SIGCHLD` (to reap promptly), not
    /// termination signals (see [`Supervisor::handle_termination_signals`]).
    pub fn new(config: Config, opts: Options) -> Result<Supervisor, DaemonError> {
        let journals = JournalStore::new(opts.journal_dir.clone());
        Ok(Supervisor {
            config,
            opts,
            workers: BTreeMap::new(),
            devices: BTreeMap::new(),
            next_id: 1,
            signals: Signals::new().map_err(DaemonError::Signals)?,
            shutdown: None,
            history: BTreeMap::new(),
            journals,
            hotplug: hotplug::Hotplug::new(),
            admin: admin::Admin::new(),
        })
    }

    /// Makes `SIGTERM` and `SIGINT` start an orderly shutdown (a second one kills the workers
    /// at once).
    pub fn handle_termination_signals(&mut self) -> Result<(), DaemonError> {
        self.signals
            .watch_termination()
            .map_err(DaemonError::Signals)
    }

    /// Makes `SIGHUP` reload the configuration ([`Supervisor::reload`]).
    pub fn handle_reload_signal(&mut self) -> Result<(), DaemonError> {
        self.signals.watch_reload().map_err(DaemonError::Signals)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The options in use.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Scans for devices and adopts each; problems with single devices are logged and skipped.
    pub fn start(&mut self) -> Result<(), DaemonError> {
        let scan = discovery::scan(&self.opts.sysfs_root)?;
        for (uio, err) in &scan.skipped {
            warn!(device = %uio, error = %err, "skipping a TCMU device whose attributes cannot be read");
        }
        let found = scan.devices.len();
        let live: Vec<(u32, String)> = scan
            .devices
            .iter()
            .map(|d| (d.hba, d.name.clone()))
            .collect();
        for path in self.journals.prune(&live) {
            info!(path = %path.display(), "removed the journal of a device that no longer exists");
        }
        let mut busy = Vec::new();
        for dev in scan.devices {
            let uio = dev.uio.clone();
            let label = dev.label();
            match self.adopt(dev.clone()) {
                Err(AdoptError::OpenUio { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) =>
                {
                    busy.push(dev);
                }
                Err(err) => {
                    error!(device = %uio, backstore = %label, error = %err, "cannot take over the device");
                }
                Ok(_) => {}
            }
        }
        self.adopt_when_released(busy);
        info!(
            found,
            skipped = scan.skipped.len(),
            managed = self.devices.len(),
            workers = self.workers.len(),
            "start-up scan complete"
        );
        Ok(())
    }

    /// Retries devices whose uio node was busy at start-up, for a few seconds: after a crash of
    /// a previous supervisor, its workers (killed by `PDEATHSIG`) may not have closed their
    /// descriptors yet. Anything still busy afterwards belongs to another program.
    fn adopt_when_released(&mut self, mut busy: Vec<TcmuDevice>) {
        let give_up = Instant::now() + UIO_RELEASE_WAIT;
        while !busy.is_empty() {
            if Instant::now() >= give_up {
                for dev in &busy {
                    error!(device = %dev.uio, backstore = %dev.label(),
                           "cannot take over the device: its uio node stays busy (another TCMU daemon?)");
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
            let mut still = Vec::new();
            for dev in busy {
                match self.adopt(dev.clone()) {
                    Err(AdoptError::OpenUio { source, .. })
                        if source.raw_os_error() == Some(libc::EBUSY) =>
                    {
                        still.push(dev);
                    }
                    Err(err) => {
                        error!(device = %dev.uio, backstore = %dev.label(), error = %err, "cannot take over the device");
                    }
                    Ok(_) => {}
                }
            }
            busy = still;
        }
    }

    /// Takes over a device: opens its uio node, asks the policy, and hands it to its worker
    /// (starting the worker if needed). Returns the device's id.
    pub fn adopt(&mut self, dev: TcmuDevice) -> Result<u64, AdoptError> {
        if self.shutdown.is_some() {
            return Err(AdoptError::ShuttingDown);
        }
        if !is_uio_name(&dev.uio) {
            return Err(AdoptError::BadUio(dev.uio));
        }
        if self.devices.values().any(|d| d.dev.uio == dev.uio) {
            return Err(AdoptError::AlreadyManaged(dev.uio));
        }
        let path = self.opts.dev_root.join(&dev.uio);
        let uio_fd: OwnedFd = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)
            .map_err(|source| AdoptError::OpenUio { path, source })?
            .into();
        self.adopt_with_fd(dev, uio_fd)
    }

    /// [`Supervisor::adopt`] with the uio node already open (a device adopted again after a
    /// `dev_config` change keeps the supervisor's descriptor).
    fn adopt_with_fd(&mut self, dev: TcmuDevice, uio_fd: OwnedFd) -> Result<u64, AdoptError> {
        if self.shutdown.is_some() {
            return Err(AdoptError::ShuttingDown);
        }

        let (refusal, backing) =
            match self
                .config
                .admit(dev.subtype.as_deref(), &dev.cfgstring, dev.dev_size)
            {
                Ok(admission) => (None, admission.into_backing()),
                Err(err) => {
                    let reason = fit_reason(err.to_string());
                    warn!(
                        device = %dev.uio,
                        backstore = %dev.label(),
                        subtype = dev.subtype.as_deref().unwrap_or("-"),
                        cfgstring = ?dev.cfgstring,
                        rule = %err.rule(),
                        reason = %reason,
                        "device refused by policy; it will answer NOT READY"
                    );
                    (Some(reason), None)
                }
            };

        let id = self.next_id;
        let spec = DeviceSpec {
            id,
            uio: dev.uio.clone(),
            hba: dev.hba,
            name: dev.name.clone(),
            subtype: dev.subtype.clone().unwrap_or_default(),
            cfgstring: dev.cfgstring.clone(),
            map_size: dev.map_size,
            dev_size: dev.dev_size,
            block_size: dev.block_size,
            max_sectors: dev.max_sectors,
            write_cache: dev.write_cache,
            unit_serial: dev.unit_serial.clone(),
            has_backing_fd: backing.is_some(),
            refusal,
            journal: JournalMode::None,
        };
        spec.validate().map_err(AdoptError::Spec)?;
        self.next_id += 1;

        let worker = self.worker_key(&dev, spec.refusal.is_some());
        let journal = match self.journals.open(dev.hba, &dev.name) {
            Ok(j) => Some(j),
            Err(err) => {
                warn!(device = %dev.uio, backstore = %dev.label(), dir = %self.journals.dir().display(),
                      error = %err, "no in-flight journal: a worker crash will reset this device's ring");
                None
            }
        };
        let ring_dirty = journal.as_ref().is_some_and(|j| j.existed);
        if ring_dirty {
            info!(device = %dev.uio, backstore = %dev.label(),
                  "found the journal of a previous supervisor: the device will be recovered");
        }
        self.devices.insert(
            id,
            DeviceRecord {
                dev,
                spec,
                uio_fd,
                worker: worker.clone(),
                phase: DevicePhase::Queued,
                deadline: None,
                journal,
                ring_dirty,
                blocked: false,
                drained: false,
                mode: JournalMode::None,
                reset_for_handover: false,
                recoveries: 0,
                resets: 0,
                parked: None,
                move_to: None,
                stats: None,
                inc: hotplug::Incarnation::default(),
                reconfigs: VecDeque::new(),
                abandoned: 0,
                reopen: None,
            },
        );
        if ring_dirty {
            self.block_device(id);
        }
        self.assign(&worker, id, backing);
        Ok(id)
    }

    /// Stops serving a device: asks its worker to release it (the supervisor closes its uio
    /// descriptor when the worker confirms), or drops it at once if no worker serves it.
    /// Returns false for an unknown id.
    pub fn remove_device(&mut self, id: u64) -> bool {
        let Some(dev) = self.devices.get(&id) else {
            return false;
        };
        let key = dev.worker.clone();
        let uio = dev.dev.uio.clone();
        let phase = dev.phase.clone();
        let live = self
            .workers
            .get(&key)
            .filter(|s| matches!(s.phase, WorkerPhase::Ready | WorkerPhase::ShuttingDown));
        match (phase, live) {
            (DevicePhase::Sent | DevicePhase::Ready, Some(slot)) => {
                let name = slot.name.clone();
                match slot.process.send(&ToWorker::RemoveDevice { id }) {
                    Ok(()) => {
                        if let Some(dev) = self.devices.get_mut(&id) {
                            dev.phase = DevicePhase::Removing;
                            dev.deadline = Some(Instant::now() + self.opts.reply_timeout);
                        }
                        info!(device = %uio, worker = %name, "asked the worker to release the device");
                    }
                    Err(err) => {
                        self.kill_worker(&key, format!("sending RemoveDevice: {err}"));
                        self.drop_device(id);
                    }
                }
            }
            (DevicePhase::Removing, _) => {
                // The kernel deleted it: whatever its release was for, it ends here.
                if let Some(dev) = self.devices.get_mut(&id) {
                    dev.move_to = None;
                }
            }
            _ => {
                if let Some(slot) = self.workers.get_mut(&key) {
                    slot.queue.retain(|(queued, _)| *queued != id);
                }
                self.drop_device(id);
            }
        }
        true
    }

    fn drop_device(&mut self, id: u64) {
        self.unblock_device(id);
        if let Some(dev) = self.devices.remove(&id) {
            if dev.journal.is_some()
                && let Err(err) = self.journals.remove(dev.dev.hba, &dev.dev.name)
            {
                warn!(device = %dev.dev.uio, error = %err, "cannot remove the device's journal");
            }
            info!(device = %dev.dev.uio, backstore = %dev.dev.label(), "device released");
            self.on_device_dropped(id, dev);
        }
    }

    fn worker_key(&self, dev: &TcmuDevice, refused: bool) -> WorkerKey {
        let Some(subtype) = dev.subtype.as_deref() else {
            return WorkerKey::Refused;
        };
        if !self.config.serves(subtype) {
            return WorkerKey::Refused;
        }
        match self.config.isolation(subtype) {
            Isolation::Subtype => WorkerKey::Subtype(subtype.to_owned()),
            // A refused device runs no handler code, so there is nothing to isolate.
            Isolation::Device if refused => WorkerKey::Refused,
            Isolation::Device => WorkerKey::Device {
                subtype: subtype.to_owned(),
                hba: dev.hba,
                name: dev.name.clone(),
            },
        }
    }

    /// Hands device `id` to worker `key`, starting the worker if there is none yet.
    fn assign(&mut self, key: &WorkerKey, id: u64, backing: Option<OwnedFd>) {
        if let Some(h) = self.history.get(key) {
            if let Some(reason) = h.quarantined.clone() {
                if self.park(id, key, &reason) {
                    // The refusals worker answers for it (NOT READY) until the lift.
                    self.assign(&WorkerKey::Refused, id, None);
                    return;
                }
                self.block_device(id);
                if let Some(dev) = self.devices.get_mut(&id) {
                    dev.phase = DevicePhase::Quarantined(reason);
                }
                return;
            }
            if h.restart_at.is_some() {
                // The successor gets it (with its backing store reopened then).
                if let Some(dev) = self.devices.get_mut(&id) {
                    dev.phase = DevicePhase::Recovering;
                }
                return;
            }
        }
        let exited = self
            .workers
            .get(key)
            .is_some_and(|s| s.phase == WorkerPhase::Exited);
        if !self.workers.contains_key(key) || exited {
            self.start_worker(key);
        }
        match self.workers.get_mut(key) {
            Some(slot) if slot.phase == WorkerPhase::Handshaking => {
                slot.queue.push((id, backing));
            }
            Some(slot) if slot.phase == WorkerPhase::Ready => self.send_add(key, id, backing),
            _ => self.orphan(id, "no live worker for it"),
        }
    }

    /// The executable of worker `key`: its handler's `exe`, or the daemon's worker.
    fn exe_for(&self, key: &WorkerKey) -> PathBuf {
        let subtype = match key {
            WorkerKey::Subtype(s) | WorkerKey::Device { subtype: s, .. } => Some(s.as_str()),
            WorkerKey::Refused => None,
        };
        subtype
            .and_then(|s| self.config.handler(s))
            .and_then(|h| h.exe.clone())
            .unwrap_or_else(|| self.opts.worker_exe.clone())
    }

    fn start_worker(&mut self, key: &WorkerKey) {
        let name = key.name();
        let exe = self.exe_for(key);
        let (stage_one, stage_two, jail) = if self.opts.unconfined {
            warn!(worker = %name, "starting the worker WITHOUT ITS JAIL (--no-jail): a debugging aid, NOT FOR PRODUCTION");
            (None, None, None)
        } else {
            let subtype = match key {
                WorkerKey::Subtype(s) | WorkerKey::Device { subtype: s, .. } => Some(s.as_str()),
                WorkerKey::Refused => None,
            };
            let spec = self.config.jail_for(subtype, &self.opts.worker_exe);
            match jail::prepare(&spec) {
                Ok(prepared) => (
                    Some(prepared.stage_one),
                    Some(prepared.stage_two),
                    Some(prepared.status),
                ),
                Err(err) => {
                    error!(worker = %name, exe = %exe.display(), reason = %err, "cannot start worker: its jail cannot be enforced");
                    return;
                }
            }
        };
        let process =
            match WorkerProcess::spawn(&exe, &name, self.opts.worker_log_format, stage_one) {
                Ok(p) => p,
                Err(err) => {
                    error!(worker = %name, error = %err, "cannot start worker");
                    return;
                }
            };
        info!(worker = %name, pid = process.pid(), exe = %exe.display(), "worker started");
        if let Some(jail) = &jail {
            info!(
                worker = %name,
                pid = process.pid(),
                landlock_abi = jail.landlock.abi,
                landlock = %jail.landlock.enforcement(),
                landlock_mode = jail.landlock_mode.as_str(),
                seccomp = jail.seccomp_action.as_str(),
                uid = jail.uid,
                gid = jail.gid,
                jail = %jail,
                "worker jailed (stage one)"
            );
            if jail.seccomp_action == tcmu_warden_policy::SeccompMode::Log {
                warn!(worker = %name, "seccomp_action = \"log\": a debugging aid, NOT FOR PRODUCTION");
            }
        }
        let hello = ToWorker::Hello {
            worker: name.clone(),
            subtypes: key.subtypes(),
            jail: stage_two,
        };
        let sent = process.send(&hello);
        self.workers.insert(
            key.clone(),
            WorkerEntry {
                name,
                subtypes: key.subtypes(),
                process,
                phase: WorkerPhase::Handshaking,
                deadline: Some(Instant::now() + self.opts.handshake_timeout),
                queue: Vec::new(),
                supported: None,
                kill_reason: None,
                ping: None,
                ping_deadline: None,
                next_ping: None,
                ping_seq: 0,
                last_pong: None,
                stats: Vec::new(),
                jail,
            },
        );
        if let Err(err) = sent {
            self.kill_worker(key, format!("sending Hello: {err}"));
        }
    }

    fn send_add(&mut self, key: &WorkerKey, id: u64, backing: Option<OwnedFd>) {
        if !self
            .workers
            .get(key)
            .is_some_and(|s| s.phase == WorkerPhase::Ready)
        {
            self.orphan(id, "its worker is gone");
            return;
        }
        let mode = self.prepare_handover(id);
        if self
            .devices
            .get(&id)
            .is_some_and(|d| matches!(d.phase, DevicePhase::Failed(_)))
        {
            return;
        }
        let fatal = {
            let (Some(slot), Some(dev)) = (self.workers.get(key), self.devices.get_mut(&id)) else {
                return;
            };
            dev.spec.has_backing_fd = backing.is_some();
            dev.spec.journal = mode;
            let fds = DeviceFds {
                uio: dev.uio_fd.as_fd(),
                backing: backing.as_ref().map(AsFd::as_fd),
                journal: dev
                    .journal
                    .as_ref()
                    .filter(|_| mode != JournalMode::None)
                    .map(|j| j.file.as_fd()),
            };
            match slot.process.send_device(&dev.spec, &fds) {
                Ok(()) => {
                    debug!(device = %dev.dev.uio, worker = %slot.name, backing = fds.backing.is_some(), journal = ?mode, "device sent to worker");
                    dev.phase = DevicePhase::Sent;
                    dev.deadline = Some(Instant::now() + self.opts.reply_timeout);
                    dev.mode = mode;
                    // From now on the worker may fetch from the ring.
                    dev.ring_dirty = true;
                    None
                }
                Err(WorkerProcessError::Proto(
                    err @ (ProtoError::Invalid { .. }
                    | ProtoError::Oversized
                    | ProtoError::FdCount { .. }),
                )) => {
                    error!(device = %dev.dev.uio, worker = %slot.name, error = %err, "cannot send the device to its worker");
                    dev.phase = DevicePhase::Failed(err.to_string());
                    dev.deadline = None;
                    None
                }
                Err(err) => Some(format!("sending AddDevice for {}: {err}", dev.dev.uio)),
            }
        };
        if let Some(why) = fatal {
            self.kill_worker(key, why);
        }
    }

    fn orphan(&mut self, id: u64, why: &str) {
        if let Some(dev) = self.devices.get_mut(&id) {
            if dev.phase == DevicePhase::Removing {
                self.release_done(id);
                return;
            }
            if matches!(dev.phase, DevicePhase::Failed(_) | DevicePhase::Orphaned) {
                return;
            }
            if self.shutdown.is_some() {
                debug!(device = %dev.dev.uio, worker = %dev.worker.name(), why, "device no longer served (shutting down)");
            } else {
                warn!(
                    device = %dev.dev.uio,
                    backstore = %dev.dev.label(),
                    worker = %dev.worker.name(),
                    why,
                    "device is not served; its uio descriptor stays open"
                );
            }
            dev.phase = DevicePhase::Orphaned;
            dev.deadline = None;
        }
    }

    /// The ids of the devices assigned to worker `key`, in id order.
    fn device_ids_of(&self, key: &WorkerKey) -> Vec<u64> {
        self.devices
            .iter()
            .filter(|(_, d)| &d.worker == key)
            .map(|(id, _)| *id)
            .collect()
    }

    fn orphan_all(&mut self, key: &WorkerKey, why: &str) {
        let ids: Vec<u64> = self.device_ids_of(key);
        for id in ids {
            self.orphan(id, why);
        }
    }

    /// Kills a worker (SIGKILL) and orphans its devices. It is reaped by a later turn.
    fn kill_worker(&mut self, key: &WorkerKey, reason: String) {
        let Some(slot) = self.workers.get_mut(key) else {
            return;
        };
        if matches!(slot.phase, WorkerPhase::Killed | WorkerPhase::Exited) {
            return;
        }
        error!(worker = %slot.name, pid = slot.process.pid(), reason = %reason, "killing worker");
        if let Err(err) = slot.process.kill() {
            error!(worker = %slot.name, error = %err, "SIGKILL failed");
        }
        slot.phase = WorkerPhase::Killed;
        slot.kill_reason = Some(reason);
        slot.deadline = None;
        slot.queue.clear();
        self.orphan_all(key, "its worker was killed");
    }

    /// One turn of the event loop; sleeps at most `max_wait` (less if a deadline is nearer).
    pub fn poll_once(&mut self, max_wait: Duration) -> Result<(), DaemonError> {
        let now = Instant::now();
        let wait_for = [
            self.next_deadline(),
            self.hotplug.next_deadline(now),
            self.admin.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
        .map_or(max_wait, |d| d.saturating_duration_since(now).min(max_wait));
        let ready = {
            let mut sources: Vec<(Token, BorrowedFd<'_>, PollFlags)> =
                vec![(Token::Signals, self.signals.fd(), PollFlags::POLLIN)];
            for (key, slot) in &self.workers {
                if let Some(channel) = slot.process.channel() {
                    sources.push((Token::Worker(key.clone()), channel.fd(), PollFlags::POLLIN));
                }
            }
            sources.extend(self.hotplug_sources());
            sources.extend(self.admin_sources());
            wait(sources, poll_timeout(wait_for))?
        };
        if ready.contains(&Token::Signals) {
            if let Some(sig) = self.signals.drain() {
                self.on_termination_signal(sig);
            }
            if self.signals.take_reload() {
                info!("SIGHUP: reloading the configuration");
                self.reload();
            }
        }
        for token in &ready {
            if let Token::Worker(key) = token {
                self.service(key);
            }
        }
        // Uevents before netlink: the kernel emits a uio device's uevent before its netlink
        // request.
        if ready.contains(&Token::Uevent) {
            self.read_uevents();
        }
        if ready.contains(&Token::Netlink) {
            self.read_netlink();
        }
        let control: Vec<ControlToken> = ready
            .iter()
            .filter_map(|t| match t {
                Token::Control(c) => Some(*c),
                _ => None,
            })
            .collect();
        if !control.is_empty() {
            self.serve_control(&control);
        }
        self.reap();
        let now = Instant::now();
        self.check_deadlines(now);
        self.hotplug_turn(now);
        self.admin_turn(now);
        Ok(())
    }

    fn on_termination_signal(&mut self, sig: i32) {
        let name = nix::sys::signal::Signal::try_from(sig).map_or("signal", |s| s.as_str());
        if self.shutdown.is_none() {
            info!(signal = name, "termination requested");
            self.begin_shutdown();
        } else {
            warn!(
                signal = name,
                "second termination request; killing workers now"
            );
            let keys: Vec<WorkerKey> = self.workers.keys().cloned().collect();
            for key in keys {
                self.kill_worker(&key, format!("{name} during shutdown"));
            }
        }
    }

    /// Handles what one worker sent.
    fn service(&mut self, key: &WorkerKey) {
        for _ in 0..MAX_MESSAGES_PER_TURN {
            let Some(slot) = self.workers.get(key) else {
                return;
            };
            match slot.process.recv() {
                Ok(Some(msg)) => {
                    if let Err(why) = self.handle(key, msg) {
                        self.kill_worker(key, why.to_string());
                        return;
                    }
                }
                Ok(None) => return,
                Err(WorkerProcessError::Proto(ProtoError::Closed)) => {
                    self.on_closed(key);
                    return;
                }
                Err(WorkerProcessError::NoChannel) => return,
                Err(err) => {
                    self.kill_worker(key, format!("protocol violation: {err}"));
                    return;
                }
            }
        }
    }

    fn on_closed(&mut self, key: &WorkerKey) {
        let grace = self.opts.exit_grace;
        let Some(slot) = self.workers.get_mut(key) else {
            return;
        };
        slot.process.close_channel();
        if slot.phase == WorkerPhase::ShuttingDown {
            return;
        }
        warn!(worker = %slot.name, pid = slot.process.pid(), "worker closed its channel");
        slot.phase = WorkerPhase::Closing;
        slot.deadline = Some(Instant::now() + grace);
        slot.queue.clear();
        self.orphan_all(key, "its worker closed its channel");
    }

    /// Acts on one validated message. `Err` is a protocol violation that ends the worker.
    fn handle(&mut self, key: &WorkerKey, msg: FromWorker) -> Result<(), Violation> {
        let phase = self.workers.get(key).map(|s| s.phase);
        match (phase, msg) {
            (Some(WorkerPhase::Handshaking), FromWorker::Hello { pid, subtypes }) => {
                self.on_hello(key, pid, subtypes);
                Ok(())
            }
            (Some(WorkerPhase::Handshaking), other) => Err(Violation::BeforeHello(kind(&other))),
            (_, FromWorker::Hello { .. }) => Err(Violation::SecondHello),
            (_, FromWorker::DeviceReady { id }) => {
                let (dev, _) = self.owned(key, id, "DeviceReady")?;
                if dev.phase != DevicePhase::Sent {
                    return Err(Violation::WrongPhase {
                        what: "DeviceReady",
                        id,
                        phase: dev.phase.clone(),
                    });
                }
                dev.phase = DevicePhase::Ready;
                dev.deadline = None;
                let ready_id = id;
                self.lift_stale_block(id);
                let Some(dev) = self.devices.get(&id) else {
                    return Ok(());
                };
                let worker = key.name();
                match &dev.spec.refusal {
                    None => info!(
                        device = %dev.dev.uio,
                        backstore = %dev.dev.label(),
                        worker = %worker,
                        subtype = %dev.spec.subtype,
                        "device is being served"
                    ),
                    Some(refusal) => info!(
                        device = %dev.dev.uio,
                        backstore = %dev.dev.label(),
                        worker = %worker,
                        refusal = %refusal,
                        "refused device answers NOT READY"
                    ),
                }
                self.on_device_ready(ready_id);
                Ok(())
            }
            (_, FromWorker::DeviceFailed { id, reason }) => {
                let (dev, worker) = self.owned(key, id, "DeviceFailed")?;
                if dev.phase == DevicePhase::Removing {
                    // The kernel tears a deleted device down while its worker releases it; the
                    // worker may see the ring go away first. Its DeviceRemoved follows.
                    debug!(device = %dev.dev.uio, worker = %worker, reason = ?reason, "device failed while being released");
                    return Ok(());
                }
                if !matches!(dev.phase, DevicePhase::Sent | DevicePhase::Ready) {
                    return Err(Violation::WrongPhase {
                        what: "DeviceFailed",
                        id,
                        phase: dev.phase.clone(),
                    });
                }
                // The reason is the worker's text: logged escaped, never interpreted.
                error!(
                    device = %dev.dev.uio,
                    backstore = %dev.dev.label(),
                    worker = %worker,
                    reason = ?reason,
                    "worker cannot serve the device"
                );
                if dev.phase == DevicePhase::Sent && dev.mode != JournalMode::Recover {
                    // It never served the ring: the journal (if any) was not used.
                    dev.ring_dirty = false;
                }
                dev.phase = DevicePhase::Failed(reason);
                dev.deadline = None;
                Ok(())
            }
            (_, FromWorker::RecoveryFailed { id, reason }) => {
                let (dev, _) = self.owned(key, id, "RecoveryFailed")?;
                // In any journal mode: without a journal to recover from, a ring that already
                // holds commands cannot be served either (see `lifecycle`).
                if dev.phase != DevicePhase::Sent {
                    return Err(Violation::WrongPhase {
                        what: "RecoveryFailed",
                        id,
                        phase: dev.phase.clone(),
                    });
                }
                if dev.reset_for_handover {
                    return Err(Violation::RecoveryAfterReset(id));
                }
                dev.deadline = None;
                self.on_recovery_failed(key, id, &reason);
                Ok(())
            }
            (_, FromWorker::DeviceRemoved { id }) => {
                let (dev, _) = self.owned(key, id, "DeviceRemoved")?;
                if dev.phase != DevicePhase::Removing {
                    return Err(Violation::WrongPhase {
                        what: "DeviceRemoved",
                        id,
                        phase: dev.phase.clone(),
                    });
                }
                self.release_done(id);
                Ok(())
            }
            (_, msg @ FromWorker::Pong { .. }) => {
                let FromWorker::Pong { seq, stats } = &msg else {
                    return Ok(());
                };
                let owned_all = stats
                    .iter()
                    .all(|s| self.devices.get(&s.id).is_some_and(|d| &d.worker == key));
                let ping = self.workers.get(key).and_then(|s| s.ping);
                if ping != Some(*seq) {
                    return Err(Violation::UnsolicitedPong(*seq));
                }
                if !owned_all {
                    return Err(Violation::ForeignStats);
                }
                let FromWorker::Pong { stats, .. } = &msg else {
                    return Ok(());
                };
                let counters = stats.clone();
                self.on_pong(key, msg);
                self.record_stats(counters);
                Ok(())
            }
            (_, FromWorker::Reconfigured { id }) => {
                self.on_reconfig_reply(key, id, hotplug::ReconfigAnswer::Applied)
            }
            (_, FromWorker::ReconfigFailed { id, reason }) => {
                self.on_reconfig_reply(key, id, hotplug::ReconfigAnswer::Refused(reason))
            }
        }
    }

    /// The device `id` if worker `key` owns it, with the worker's name.
    fn owned(
        &mut self,
        key: &WorkerKey,
        id: u64,
        what: &'static str,
    ) -> Result<(&mut DeviceRecord, String), Violation> {
        let name = key.name();
        match self.devices.get_mut(&id) {
            Some(dev) if &dev.worker == key => Ok((dev, name)),
            _ => Err(Violation::NotOwned { what, id }),
        }
    }

    /// Reads the jail of worker `key` back from `/proc/<pid>/status` and compares it with what
    /// stage one applied. Returns why the worker must be killed, if it must.
    fn verify_jail(&mut self, key: &WorkerKey) -> Option<String> {
        let slot = self.workers.get_mut(key)?;
        let pid = slot.process.pid();
        let jail = slot.jail.as_mut()?;
        match jail::observe(pid) {
            Ok(observed) => jail.observed = Some(observed),
            Err(err) => return Some(format!("cannot read its /proc/{pid}/status: {err}")),
        }
        let wrong = jail.mismatches();
        if !wrong.is_empty() {
            return Some(format!("its jail is not in force: {}", wrong.join("; ")));
        }
        let observed = jail.observed.as_ref()?;
        info!(
            worker = %slot.name,
            pid,
            landlock_abi = jail.landlock.abi,
            landlock = %jail.landlock.enforcement(),
            seccomp_mode = observed.seccomp_mode,
            seccomp_filters = ?observed.seccomp_filters,
            stage_two = ?jail.stage_two(),
            no_new_privs = observed.no_new_privs,
            capabilities = %observed.caps_summary(),
            uid = observed.uid[1],
            gid = observed.gid[1],
            jail = %jail,
            "worker jail verified"
        );
        if jail.stage_two() == Some(false) {
            warn!(worker = %slot.name, pid, "the worker did not install its stage-two seccomp allow-list; only stage one confines it");
        }
        None
    }

    fn on_hello(&mut self, key: &WorkerKey, pid: u32, supported: Vec<String>) {
        if let Some(why) = self.verify_jail(key) {
            self.kill_worker(key, why);
            return;
        }
        let exe = self.exe_for(key).display().to_string();
        let Some(slot) = self.workers.get_mut(key) else {
            return;
        };
        info!(
            worker = %slot.name,
            pid = slot.process.pid(),
            reported_pid = pid,
            subtypes = ?supported,
            "worker ready"
        );
        let missing: Vec<String> = slot
            .subtypes
            .iter()
            .filter(|s| !supported.contains(s))
            .cloned()
            .collect();
        for subtype in &missing {
            error!(
                worker = %slot.name,
                subtype = %subtype,
                exe = %exe,
                "the worker executable has no handler for this subtype; its devices will answer NOT READY"
            );
        }
        slot.phase = WorkerPhase::Ready;
        slot.deadline = None;
        slot.next_ping = Some(Instant::now() + self.opts.lifecycle.heartbeat_interval);
        slot.supported = Some(supported);
        let queue = std::mem::take(&mut slot.queue);
        for (id, mut backing) in queue {
            if let Some(dev) = self.devices.get_mut(&id)
                && dev.spec.refusal.is_none()
                && missing.contains(&dev.spec.subtype)
            {
                let reason = fit_reason(format!(
                    "the worker executable {exe} has no handler for subtype {:?}",
                    dev.spec.subtype
                ));
                warn!(
                    device = %dev.dev.uio,
                    backstore = %dev.dev.label(),
                    cfgstring = ?dev.dev.cfgstring,
                    rule = "worker capabilities",
                    reason = %reason,
                    "device refused; it will answer NOT READY"
                );
                dev.spec.refusal = Some(reason);
                dev.spec.has_backing_fd = false;
                backing = None;
            }
            self.send_add(key, id, backing);
        }
    }

    /// Reaps every worker that exited.
    fn reap(&mut self) {
        let keys: Vec<WorkerKey> = self.workers.keys().cloned().collect();
        for key in keys {
            let Some(slot) = self.workers.get_mut(&key) else {
                continue;
            };
            if slot.phase == WorkerPhase::Exited {
                continue;
            }
            let status = match slot.process.try_reap() {
                Ok(Some(status)) => status,
                Ok(None) => continue,
                Err(err) => {
                    error!(worker = %slot.name, error = %err, "cannot reap worker");
                    continue;
                }
            };
            let was = slot.phase;
            slot.deadline = None;
            slot.ping = None;
            slot.ping_deadline = None;
            slot.next_ping = None;
            slot.queue.clear();
            slot.process.close_channel();
            let how = describe_exit(status);
            if status.signal() == Some(libc::SIGSYS) {
                // A seccomp kill (or, in log mode, a SIGSYS the worker did not survive). Only the
                // kernel's audit record names the system call.
                let pid = slot.process.pid();
                let since = slot
                    .jail
                    .as_ref()
                    .map_or(std::time::UNIX_EPOCH, |j| j.prepared_at);
                let syscall = jail::kernel_log_violation(pid, since, KMSG_PATIENCE);
                error!(
                    worker = %slot.name,
                    pid,
                    syscall = syscall.as_deref().unwrap_or("unknown (see the audit log, type=SECCOMP)"),
                    "sandbox violation: seccomp killed the worker"
                );
                if let Some(jail) = slot.jail.as_mut() {
                    jail.violation =
                        Some(syscall.unwrap_or_else(|| "unknown system call".to_owned()));
                }
            }
            match was {
                WorkerPhase::Killed => {
                    info!(worker = %slot.name, pid = slot.process.pid(), status = %how, "killed worker reaped");
                }
                WorkerPhase::ShuttingDown if status.success() => {
                    info!(worker = %slot.name, pid = slot.process.pid(), "worker exited");
                }
                _ => {
                    error!(worker = %slot.name, pid = slot.process.pid(), status = %how, "worker exited unexpectedly");
                }
            }
            // Decided while the phase still says how it ended (shutting down or not).
            self.on_worker_down(&key, status);
            if let Some(slot) = self.workers.get_mut(&key) {
                slot.phase = WorkerPhase::Exited;
            }
        }
    }

    fn check_deadlines(&mut self, now: Instant) {
        let mut overdue: Vec<(WorkerKey, String)> = Vec::new();
        for (key, slot) in &self.workers {
            if slot.deadline.is_none_or(|d| d > now) {
                continue;
            }
            let why = match slot.phase {
                WorkerPhase::Handshaking => format!(
                    "no answer to Hello within {:?}",
                    self.opts.handshake_timeout
                ),
                WorkerPhase::ShuttingDown => format!(
                    "still running {:?} after Shutdown",
                    self.opts.shutdown_timeout
                ),
                WorkerPhase::Closing => format!(
                    "closed its channel but still running after {:?}",
                    self.opts.exit_grace
                ),
                _ => continue,
            };
            overdue.push((key.clone(), why));
        }
        for dev in self.devices.values() {
            if dev.deadline.is_some_and(|d| d <= now) {
                let what = match dev.phase {
                    DevicePhase::Removing => "RemoveDevice",
                    _ => "AddDevice",
                };
                overdue.push((
                    dev.worker.clone(),
                    format!(
                        "no answer to {what} for {} within {:?}",
                        dev.dev.uio, self.opts.reply_timeout
                    ),
                ));
            }
        }
        for (key, why) in overdue {
            self.kill_worker(&key, why);
        }
        self.heartbeats(now);
        self.restarts(now);
    }

    fn next_deadline(&self) -> Option<Instant> {
        let workers = self.workers.values().filter_map(|s| s.deadline);
        let devices = self.devices.values().filter_map(|d| d.deadline);
        let reconfigs = self
            .devices
            .values()
            .filter_map(|d| d.reconfigs.iter().map(|p| p.deadline).min());
        let give_up = self.shutdown.as_ref().map(|s| s.give_up);
        let lifecycle = self.lifecycle_deadline();
        workers
            .chain(devices)
            .chain(reconfigs)
            .chain(give_up)
            .chain(lifecycle)
            .min()
    }

    /// Starts an orderly shutdown: `Shutdown` to every worker; workers still running after
    /// [`Options::shutdown_timeout`] are killed. Idempotent.
    pub fn begin_shutdown(&mut self) {
        if self.shutdown.is_some() {
            return;
        }
        let deadline = Instant::now() + self.opts.shutdown_timeout;
        self.shutdown = Some(Shutdown {
            give_up: deadline + REAP_GRACE,
        });
        self.on_shutdown_begin();
        info!(workers = self.workers.len(), "shutting down");
        for h in self.history.values_mut() {
            h.restart_at = None;
        }
        let keys: Vec<WorkerKey> = self.workers.keys().cloned().collect();
        for key in keys {
            let Some(slot) = self.workers.get_mut(&key) else {
                continue;
            };
            if !matches!(slot.phase, WorkerPhase::Handshaking | WorkerPhase::Ready) {
                continue;
            }
            match slot.process.send(&ToWorker::Shutdown) {
                Ok(()) => {
                    slot.phase = WorkerPhase::ShuttingDown;
                    slot.deadline = Some(deadline);
                    slot.queue.clear();
                }
                Err(err) => self.kill_worker(&key, format!("sending Shutdown: {err}")),
            }
        }
    }

    /// Whether a shutdown is complete: every worker reaped (or the reaping grace ran out).
    pub fn is_finished(&self) -> bool {
        let Some(shutdown) = &self.shutdown else {
            return false;
        };
        self.workers
            .values()
            .all(|s| s.phase == WorkerPhase::Exited)
            || Instant::now() >= shutdown.give_up
    }

    /// Whether a shutdown was requested.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_some()
    }

    /// Snapshots of every device, by id.
    pub fn devices(&self) -> Vec<DeviceStatus> {
        self.devices
            .iter()
            .map(|(id, d)| status_of(*id, d))
            .collect()
    }

    /// Snapshot of one device.
    pub fn device(&self, id: u64) -> Option<DeviceStatus> {
        self.devices.get(&id).map(|d| status_of(id, d))
    }

    /// Snapshot of the device on `uio` (e.g. `uio0`).
    pub fn device_by_uio(&self, uio: &str) -> Option<DeviceStatus> {
        self.devices
            .iter()
            .find(|(_, d)| d.dev.uio == uio)
            .map(|(id, d)| status_of(*id, d))
    }

    /// The supervisor's own descriptor of a device's uio node.
    pub fn uio_fd(&self, id: u64) -> Option<BorrowedFd<'_>> {
        self.devices.get(&id).map(|d| d.uio_fd.as_fd())
    }

    /// Snapshots of every worker ever started, by key.
    pub fn workers(&self) -> Vec<WorkerStatus> {
        self.workers
            .iter()
            .map(|(key, s)| self.worker_status(key, s))
            .collect()
    }

    /// Snapshot of the worker called `name`.
    pub fn worker(&self, name: &str) -> Option<WorkerStatus> {
        self.workers
            .iter()
            .find(|(_, s)| s.name == name)
            .map(|(key, s)| self.worker_status(key, s))
    }

    fn worker_status(&self, key: &WorkerKey, s: &WorkerEntry) -> WorkerStatus {
        let h = self.history.get(key);
        WorkerStatus {
            name: s.name.clone(),
            pid: s.process.pid(),
            phase: s.phase,
            subtypes: s.subtypes.clone(),
            supported: s.supported.clone(),
            devices: self.device_ids_of(key),
            kill_reason: s.kill_reason.clone(),
            exit: s.process.exit_status(),
            crashes: h.map_or(0, |h| u32::try_from(h.crashes.len()).unwrap_or(u32::MAX)),
            total_crashes: h.map_or(0, |h| h.total),
            restarts: h.map_or(0, |h| h.restarts),
            last_crash: h.and_then(|h| h.last_cause.clone()),
            restart_at: h.and_then(|h| h.restart_at),
            quarantined: h.and_then(|h| h.quarantined.clone()),
            lifts: h.map_or(0, |h| h.lifts),
            stats: s.stats.clone(),
            last_pong: s.last_pong,
            jail: s.jail.clone(),
        }
    }

    /// Logs workers that could not be reaped by the end of a shutdown.
    fn log_unreaped(&self) {
        for slot in self.workers.values() {
            if slot.phase != WorkerPhase::Exited {
                error!(worker = %slot.name, pid = slot.process.pid(), "worker could not be reaped; leaving it behind");
            }
        }
    }
}

fn status_of(id: u64, d: &DeviceRecord) -> DeviceStatus {
    DeviceStatus {
        id,
        uio: d.dev.uio.clone(),
        label: d.dev.label(),
        subtype: d.dev.subtype.clone(),
        cfgstring: d.dev.cfgstring.clone(),
        worker: d.worker.name(),
        refusal: d.spec.refusal.clone(),
        has_backing: d.spec.has_backing_fd,
        phase: d.phase.clone(),
        blocked: d.blocked,
        journal: d.mode,
        journal_path: d.journal.as_ref().map(|j| j.path.clone()),
        recoveries: d.recoveries,
        resets: d.resets,
        home: d.parked.as_ref().map(|p| p.home.name()),
    }
}

fn kind(msg: &FromWorker) -> &'static str {
    match msg {
        FromWorker::Hello { .. } => "Hello",
        FromWorker::DeviceReady { .. } => "DeviceReady",
        FromWorker::DeviceFailed { .. } => "DeviceFailed",
        FromWorker::DeviceRemoved { .. } => "DeviceRemoved",
        FromWorker::RecoveryFailed { .. } => "RecoveryFailed",
        FromWorker::Pong { .. } => "Pong",
        FromWorker::Reconfigured { .. } => "Reconfigured",
        FromWorker::ReconfigFailed { .. } => "ReconfigFailed",
    }
}

/// What one descriptor of the event loop's wait stands for: each source is named by its token,
/// never by its position in the `poll` array.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// The signal wake-up socket ([`signals`]).
    Signals,
    /// A worker's channel.
    Worker(WorkerKey),
    /// The uevent socket ([`hotplug`]).
    Uevent,
    /// The `TCM-USER` generic netlink socket ([`hotplug`]).
    Netlink,
    /// The control socket's listener or one of its connections ([`admin`]).
    Control(ControlToken),
}

/// Waits until one of `sources` is ready or `timeout` passes, and returns the tokens of the
/// ready ones (none on a timeout or `EINTR`).
fn wait(
    sources: Vec<(Token, BorrowedFd<'_>, PollFlags)>,
    timeout: PollTimeout,
) -> Result<Vec<Token>, DaemonError> {
    let (tokens, mut fds): (Vec<Token>, Vec<PollFd<'_>>) = sources
        .into_iter()
        .map(|(token, fd, flags)| (token, PollFd::new(fd, flags)))
        .unzip();
    match poll(&mut fds, timeout) {
        Ok(_) => {}
        Err(nix::errno::Errno::EINTR) => return Ok(Vec::new()),
        Err(err) => return Err(DaemonError::Poll(err)),
    }
    Ok(tokens
        .into_iter()
        .zip(&fds)
        .filter(|(_, fd)| fd.revents().is_some_and(|r| !r.is_empty()))
        .map(|(token, _)| token)
        .collect())
}

/// `poll` timeout in whole milliseconds, rounded up so a deadline is never missed by a spin.
fn poll_timeout(d: Duration) -> PollTimeout {
    let millis = d.as_micros().div_ceil(1000);
    PollTimeout::try_from(millis.min(i32::MAX as u128)).unwrap_or(PollTimeout::MAX)
}

/// The daemon: takes over every TCMU device, serves until `SIGTERM`/`SIGINT`, shuts the workers
/// down, and returns.
pub fn run(config: Config, opts: Options) -> Result<(), DaemonError> {
    if !opts.worker_exe.exists() {
        warn!(exe = %opts.worker_exe.display(), "the worker executable does not exist; devices will not be served");
    }
    info!(
        config = %config.source.display(),
        handlers = ?config.served_subtypes(),
        sysfs_root = %opts.sysfs_root.display(),
        "tcmu-warden starting"
    );
    for warning in config.warnings() {
        warn!(config = %config.source.display(), "{warning}");
    }
    let mut sup = Supervisor::new(config, opts)?;
    sup.handle_termination_signals()?;
    sup.handle_reload_signal()?;
    sup.start_operations()?;
    sup.start()?;
    sup.operations_ready();
    while !sup.is_finished() {
        sup.poll_once(IDLE_TICK)?;
    }
    sup.log_unreaped();
    sup.finish_operations();
    info!("tcmu-warden stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn worker_keys() {
        assert_eq!(WorkerKey::Subtype("file".into()).name(), "file");
        let k = WorkerKey::Device {
            subtype: "file".into(),
            hba: 1,
            name: "d0".into(),
        };
        assert_eq!(k.name(), "file:user_1/d0");
        assert_eq!(k.subtypes(), vec!["file".to_owned()]);
        assert_eq!(WorkerKey::Refused.name(), "refused");
        let long = WorkerKey::Device {
            subtype: "file".into(),
            hba: 1,
            name: "ü".repeat(300),
        };
        assert!(long.name().len() <= tcmu_warden_proto::MAX_NAME_LEN);
        assert!(long.name().starts_with("file:user_1/ü"));
        assert!(WorkerKey::Refused.subtypes().is_empty());
    }

    #[test]
    fn poll_timeouts_round_up() {
        assert_eq!(poll_timeout(Duration::from_micros(1)).as_millis(), Some(1));
        assert_eq!(poll_timeout(Duration::ZERO).as_millis(), Some(0));
        assert_eq!(
            poll_timeout(Duration::from_millis(1500)).as_millis(),
            Some(1500)
        );
        assert_eq!(
            poll_timeout(Duration::from_secs(u64::MAX)).as_millis(),
            Some(i32::MAX as u32)
        );
    }

    fn config(text: &str) -> Config {
        Config::from_toml_str(text, Path::new("t.toml")).unwrap()
    }

    fn device(subtype: Option<&str>) -> TcmuDevice {
        TcmuDevice {
            uio: "uio0".into(),
            hba: 1,
            name: "d0".into(),
            subtype: subtype.map(str::to_owned),
            cfgstring: String::new(),
            map_size: 1 << 20,
            dev_size: 1 << 20,
            block_size: 512,
            max_sectors: 128,
            write_cache: false,
            unit_serial: "s".into(),
        }
    }

    fn supervisor(text: &str) -> Supervisor {
        let cfg = config(text);
        let opts = Options::from_config(&cfg).unwrap();
        Supervisor::new(cfg, opts).unwrap()
    }

    #[test]
    fn worker_assignment() {
        let sup = supervisor("[handler.file]\nallow_paths=['/a']\n[handler.ram]\n");
        let file = device(Some("file"));
        assert_eq!(
            sup.worker_key(&file, false),
            WorkerKey::Subtype("file".into())
        );
        // Refused but configured: stays with its subtype's worker.
        assert_eq!(
            sup.worker_key(&file, true),
            WorkerKey::Subtype("file".into())
        );
        assert_eq!(
            sup.worker_key(&device(Some("qcow")), true),
            WorkerKey::Refused
        );
        assert_eq!(sup.worker_key(&device(None), true), WorkerKey::Refused);

        let sup = supervisor("[handler.file]\nallow_paths=['/a']\nisolation='device'\n");
        assert_eq!(
            sup.worker_key(&file, false),
            WorkerKey::Device {
                subtype: "file".into(),
                hba: 1,
                name: "d0".into()
            }
        );
        assert_eq!(sup.worker_key(&file, true), WorkerKey::Refused);
    }

    #[test]
    fn adopt_refuses_bad_or_missing_nodes() {
        let tmp = tempfile::tempdir().unwrap();
        let text = format!(
            "[daemon]\ndev_root = {:?}\njournal_dir = {:?}\nworker_exe = '/nonexistent/worker'\n[handler.ram]\n",
            tmp.path().display().to_string(),
            tmp.path().join("journal").display().to_string()
        );
        let mut sup = supervisor(&text);
        let mut dev = device(Some("ram"));
        dev.uio = "../x".into();
        assert!(matches!(sup.adopt(dev), Err(AdoptError::BadUio(_))));
        let err = sup.adopt(device(Some("ram"))).unwrap_err();
        assert!(matches!(err, AdoptError::OpenUio { .. }), "{err}");
        assert!(sup.devices().is_empty());

        // With a node but no worker executable: managed, orphaned, descriptor held.
        std::fs::write(tmp.path().join("uio0"), b"").unwrap();
        let id = sup.adopt(device(Some("ram"))).unwrap();
        let status = sup.device(id).unwrap();
        assert_eq!(status.phase, DevicePhase::Orphaned);
        assert_eq!(status.worker, "ram");
        assert!(sup.uio_fd(id).is_some());
        assert!(matches!(
            sup.adopt(device(Some("ram"))),
            Err(AdoptError::AlreadyManaged(_))
        ));
        assert!(sup.remove_device(id));
        assert!(sup.device(id).is_none());
        assert!(!sup.remove_device(id));

        sup.begin_shutdown();
        assert!(sup.is_finished());
        assert!(matches!(
            sup.adopt(device(Some("ram"))),
            Err(AdoptError::ShuttingDown)
        ));
    }
}
