//! # The hot-plug state machine: uevents, `TCM-USER` requests, pending adoptions, reconfiguration
//!
//! How the daemon follows the kernel after the start-up scan. `Hotplug` owns the two event
//! channels, the adoptions still pending, the minors refused at creation and the devices
//! released to be adopted again; what it learns about a managed device (the kernel's device id,
//! a reconfiguration waiting for the worker's answer, a new `dev_config`) goes into that
//! device's record in the device table. The coordinator ([`Supervisor::poll_once`]) hands it
//! the ready `Token::Uevent` and `Token::Netlink` and calls `Supervisor::hotplug_turn`
//! at the end of each turn.
//!
//! ## Two event sources, one device table
//! Devices come and go through two channels that are not ordered with respect to each other:
//! uevents for the `uio` subsystem ([`crate::uevent`]) and the kernel's `TCM-USER` netlink
//! requests ([`crate::netlink`]). The rules that keep them consistent:
//! - A device is keyed by its uio minor *and* the kernel's device id once netlink told it, never
//!   by its name: a backstore deleted and re-created under the same name (even on the same
//!   minor) is a new device.
//! - `ADDED_DEVICE` is answered at once: the policy is asked (the same admission the start-up
//!   scan uses) and a refusal is answered with a negative errno, so the administrator's
//!   `enable` write fails with a reason in the log. An admitted device is served as soon as
//!   its `/dev/uioN` exists: the adoption is *pending* until then (retried on each uevent and
//!   every [`PENDING_RETRY`], for at most [`NODE_WAIT`]). A device whose uevent comes first
//!   (the kernel sends it before the netlink request) waits up to [`NETLINK_GRACE`] for that
//!   request, so a device the policy refuses is never handed to a worker.
//! - A device adopted because of `ADDED_DEVICE` expects its own uevent `add` still to come; a
//!   uevent `remove` for its minor that arrives before that `add` belongs to the previous
//!   device on that minor and is ignored.
//! - A new device on a minor whose previous device is still being released waits (pending)
//!   until the release completes.
//! - Every netlink request is answered exactly once, whatever happens: `REMOVED_DEVICE` at
//!   once with 0 (removal cannot be refused), `RECONFIG_DEVICE` when the worker confirmed the
//!   change, or with an error when it refused, died, or missed [`Options::reply_timeout`](super::Options::reply_timeout).
//! - If either socket overflowed (`ENOBUFS`), events were lost: the daemon fails the kernel's
//!   waiting requests (`reset_netlink`) and resynchronizes with a scan of sysfs.
//!
//! ## Reconfiguration
//! `dev_size` and `emulate_write_cache` changes go to the worker ([`ToWorker::Reconfig`]), which
//! resizes the handler and the emulator (READ CAPACITY shows the new size; initiators get a
//! CAPACITY DATA HAS CHANGED unit attention). A size the policy refuses (`handler.ram.max_size`)
//! is refused to the kernel. A `dev_config` change is admitted like a new device, then the
//! device is released by its worker and adopted again with the new configuration (and a new
//! backing descriptor), keeping the supervisor's uio descriptor open throughout.
//!
//! ## Set-up and shutdown
//! [`Supervisor::start_operations`] opens the control socket ([`super::admin`]) and the kernel
//! channels and blocks and resets netlink; a shutdown blocks every served device
//! (`action/block_dev`, through [`crate::lio`]), lets the workers drain, then resets the rings
//! (`action/reset_ring`: what is left completes BUSY, which initiators retry) and blocks the
//! netlink interface, so configfs writes fail fast rather than wait for a daemon that is gone.
//!
//! This module never reads a worker's messages itself (the coordinator does and calls back
//! here), never kills a worker for being slow to answer a ping (hang detection is
//! [`super::lifecycle`]'s), never answers the control socket ([`super::admin`]), and writes no
//! kernel knob except through [`crate::lio`].

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::config::PolicyError;
use nix::poll::PollFlags;
use tcmu_warden_proto::process::fit_reason;
use tcmu_warden_proto::{DeviceStats, ToWorker};
use tracing::{debug, error, info, warn};

use super::{
    AdoptError, DaemonError, DevicePhase, DeviceRecord, Supervisor, Token, Violation, WorkerKey,
    WorkerPhase,
};
use crate::control::ControlServer;
use crate::discovery::{self, TcmuDevice, parse_uio_name};
use crate::lio::{self, ModuleParam};
use crate::netlink::{self, DeviceRef, Incoming, Reconfig, TcmuEvent, TcmuNetlink};
use crate::sdnotify::Notifier;
use crate::uevent::{self, Action, Uevent, UeventSocket};

/// How long an admitted device may take for its `/dev/uioN` to appear.
pub const NODE_WAIT: Duration = Duration::from_secs(10);
/// How often pending adoptions are retried.
pub const PENDING_RETRY: Duration = Duration::from_millis(100);
/// How long a device seen through a uevent waits for the kernel's `ADDED_DEVICE` (which says
/// whether the policy may still refuse it) before it is adopted anyway.
pub const NETLINK_GRACE: Duration = Duration::from_secs(2);

/// Where `systemd-udevd` keeps its control socket (present while it runs).
const UDEV_CONTROL: &str = "/run/udev/control";

/// Most datagrams read from one event socket in one turn.
const MAX_DATAGRAMS_PER_TURN: usize = 64;

/// What the daemon knows about the kernel's identity of a managed device.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Incarnation {
    /// The kernel's device index, once netlink said it.
    device_id: Option<u32>,
    /// Adopted before its uevent `add` arrived: a `remove` seen before that `add` is stale.
    awaiting_add_uevent: bool,
}

#[derive(Debug)]
struct PendingAdd {
    uio: String,
    /// The backstore netlink announced (`hba`, `name`), to recognize it in sysfs.
    backstore: Option<(u32, String)>,
    inc: Incarnation,
    deadline: Instant,
    /// Seen through a uevent while netlink is connected: the kernel's `ADDED_DEVICE` (sent for
    /// every new device, right after its uevent) decides, unless it has not come by then.
    wait_netlink_until: Option<Instant>,
}

/// A reconfiguration sent to the device's worker, to be answered to the kernel.
#[derive(Debug)]
pub(super) struct PendingReconfig {
    device_id: Option<u32>,
    dev_size: Option<u64>,
    write_cache: Option<bool>,
    pub(super) deadline: Instant,
}

/// The hot-plug state machine's own state: the kernel's two event channels, the adoptions
/// waiting for a node or for netlink, the minors refused at creation, and the devices released
/// to be adopted again. (What it knows of one managed device lives in that device's record.)
pub(super) struct Hotplug {
    netlink: Option<TcmuNetlink>,
    netlink_state: &'static str,
    uevents: Option<UeventSocket>,
    pending: Vec<PendingAdd>,
    /// uio → uio name of a device refused at `ADDED_DEVICE`: its uevents are not acted on.
    refused: BTreeMap<String, String>,
    /// Released devices to adopt again, with the supervisor's uio descriptor kept open.
    readopt: Vec<(TcmuDevice, OwnedFd, Incarnation)>,
}

impl Hotplug {
    pub(super) fn new() -> Hotplug {
        Hotplug {
            netlink: None,
            netlink_state: "off",
            uevents: None,
            pending: Vec::new(),
            refused: BTreeMap::new(),
            readopt: Vec::new(),
        }
    }

    /// The earliest time the hot-plug side needs a turn.
    pub(super) fn next_deadline(&self, now: Instant) -> Option<Instant> {
        (!self.pending.is_empty() || !self.readopt.is_empty()).then(|| now + PENDING_RETRY)
    }

    /// `udev`, `kernel` or `off`: which uevents are followed.
    pub(super) fn uevents_state(&self) -> &'static str {
        match &self.uevents {
            None => "off",
            Some(u) if u.group() == uevent::GROUP_UDEV => "udev",
            Some(_) => "kernel",
        }
    }

    /// `connected`, `unavailable` or `off`: the TCM-USER netlink channel.
    pub(super) fn netlink_state(&self) -> &'static str {
        self.netlink_state
    }
}

/// A worker's answer to a [`ToWorker::Reconfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ReconfigAnswer {
    /// `Reconfigured`: the change is in force.
    Applied,
    /// `ReconfigFailed`, with the worker's reason (its text, logged escaped).
    Refused(String),
}

/// The errno a refusal is answered with (the administrator sees its text from the failed
/// configfs write).
pub fn refusal_errno(err: &PolicyError) -> i32 {
    match err {
        PolicyError::NoSubtype | PolicyError::NotServed { .. } => libc::EOPNOTSUPP,
        PolicyError::NotAbsolute { .. }
        | PolicyError::BadPath { .. }
        | PolicyError::WrongType { .. } => libc::EINVAL,
        PolicyError::OutsideAllowPaths { .. } | PolicyError::Escapes { .. } => libc::EPERM,
        PolicyError::NotFound { .. } => libc::ENOENT,
        PolicyError::Changed { .. } => libc::EAGAIN,
        PolicyError::Open { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        PolicyError::TooLarge { .. } => libc::EFBIG,
    }
}

/// Splits a `dev_config` string into subtype and cfgstring, as the uio name does.
fn split_dev_config(dev_config: &str) -> (Option<String>, String) {
    let (subtype, cfg) = match dev_config.split_once('/') {
        Some((s, c)) => (s, c.to_owned()),
        None => (dev_config, String::new()),
    };
    ((!subtype.is_empty()).then(|| subtype.to_owned()), cfg)
}

impl Supervisor {
    // ---- set-up -----------------------------------------------------------------------------

    /// Opens what the operations side listens on, before the start-up scan: opens the control
    /// socket (refusing to start if another daemon answers on it), blocks and resets the
    /// kernel's netlink requests (so a previous daemon's unanswered requests fail instead of
    /// wedging), joins the uevent and `TCM-USER` channels (only when [`Options::kernel_events`](super::Options::kernel_events)),
    /// and asks for kernel command replies. Only a control socket that cannot be created (or
    /// that another daemon holds) is fatal.
    pub fn start_operations(&mut self) -> Result<(), DaemonError> {
        self.admin.notifier = Notifier::from_env();
        // The control socket first: it is also the lock that keeps a second daemon from
        // touching the kernel's state (the module parameters below) under a running one.
        if let Some(path) = self.opts.control_socket.clone() {
            let server = ControlServer::bind(&path).map_err(DaemonError::Control)?;
            info!(socket = %path.display(), "control socket listening");
            self.attach_control(server);
        }
        let root = self.opts.sysfs_root.clone();
        lio::set_module_param(&root, ModuleParam::BlockNetlink, true);
        lio::set_module_param(&root, ModuleParam::ResetNetlink, true);
        if self.opts.kernel_events {
            let group =
                uevent::group_for(self.opts.uevent_source, std::path::Path::new(UDEV_CONTROL));
            match UeventSocket::open(group) {
                Ok(sock) => self.attach_uevents(sock),
                Err(e) => {
                    warn!(error = %e, "cannot listen to uevents; devices that appear later will not be noticed")
                }
            }
            match TcmuNetlink::connect() {
                Ok(nl) => self.attach_netlink(nl),
                Err(netlink::NetlinkError::FamilyMissing) => {
                    self.hotplug.netlink_state = "unavailable";
                    info!(
                        "the kernel has no TCM-USER netlink family yet (target_core_user not loaded); following uevents only"
                    );
                }
                Err(e) => {
                    self.hotplug.netlink_state = "unavailable";
                    warn!(error = %e, "cannot join the TCM-USER netlink family; following uevents only");
                }
            }
        }
        Ok(())
    }

    /// Follows uevents from `sock` (tests pass a socket whose peer plays the kernel).
    pub fn attach_uevents(&mut self, sock: UeventSocket) {
        info!(
            source = if sock.group() == uevent::GROUP_UDEV {
                "udev"
            } else {
                "kernel"
            },
            "following uio uevents"
        );
        self.hotplug.uevents = Some(sock);
    }

    /// Serves `TCM-USER` requests from `nl` and asks for kernel command replies (tests pass a
    /// socket whose peer plays the kernel).
    pub fn attach_netlink(&mut self, mut nl: TcmuNetlink) {
        match nl.set_features() {
            Ok(seq) => debug!(seq, "asked the kernel for command replies"),
            Err(e) => warn!(error = %e, "cannot ask the kernel for command replies"),
        }
        self.hotplug.netlink = Some(nl);
        self.hotplug.netlink_state = "connected";
        info!("following TCM-USER netlink requests");
    }

    /// After the start-up scan: lets the kernel send netlink requests again and tells systemd
    /// the daemon is ready.
    pub fn operations_ready(&mut self) {
        lio::set_module_param(&self.opts.sysfs_root, ModuleParam::BlockNetlink, false);
        self.admin.notifier.notify(&format!(
            "READY=1\nSTATUS=serving {} devices with {} workers",
            self.devices.len(),
            self.workers.len()
        ));
        if let Some(every) = self.admin.notifier.watchdog_interval() {
            self.admin.notifier.notify("WATCHDOG=1");
            self.admin.next_watchdog = Some(Instant::now() + every);
        }
    }

    // ---- the event loop's hooks ---------------------------------------------------------------

    /// The kernel event channels the loop waits on.
    pub(super) fn hotplug_sources(&self) -> Vec<(Token, BorrowedFd<'_>, PollFlags)> {
        let mut v = Vec::new();
        if let Some(u) = &self.hotplug.uevents {
            v.push((Token::Uevent, u.fd(), PollFlags::POLLIN));
        }
        if let Some(n) = &self.hotplug.netlink {
            v.push((Token::Netlink, n.fd(), PollFlags::POLLIN));
        }
        v
    }

    /// Hot-plug work due at the end of every turn: devices to adopt again, pending adoptions,
    /// reconfigurations overdue.
    pub(super) fn hotplug_turn(&mut self, now: Instant) {
        self.run_readopt();
        self.try_pending(now);
        self.check_reconfigs(now);
    }

    /// A device left the table (released or dropped): adopt it again if its `dev_config`
    /// changed, and let a device waiting for its minor proceed.
    pub(super) fn on_device_dropped(&mut self, id: u64, dev: DeviceRecord) {
        for p in dev.reconfigs {
            warn!(device_id = ?p.device_id, id, why = "the device was released", status = -libc::ENODEV, "reconfiguration not applied");
            self.reply(
                netlink::cmd::RECONFIG_DEVICE_DONE,
                p.device_id,
                -libc::ENODEV,
            );
        }
        if let Some(new) = dev.reopen {
            self.hotplug.readopt.push((new, dev.uio_fd, dev.inc));
        }
    }

    /// The worker confirmed a device: lift a block a previous daemon may have left.
    pub(super) fn lift_stale_block(&mut self, id: u64) {
        if !self.opts.kernel_events {
            return;
        }
        // One on its way to another worker stays blocked until that worker serves it; one the
        // supervisor blocked itself is unblocked by `on_device_ready`.
        if let Some(dev) = self
            .devices
            .get(&id)
            .filter(|d| d.move_to.is_none() && !d.blocked)
        {
            match lio::block_dev(&self.opts.sysfs_root, dev.dev.hba, &dev.dev.name, false) {
                Ok(()) => {
                    debug!(device = %dev.dev.uio, "lifted a block a previous daemon may have left")
                }
                Err(e) if e.is_missing() => {
                    debug!(device = %dev.dev.uio, error = %e, "device has no block_dev action");
                }
                Err(e) => warn!(device = %dev.dev.uio, error = %e, "cannot unblock the device"),
            }
        }
    }

    /// A validated `Pong` answering our ping: keep the counters.
    pub(super) fn record_stats(&mut self, stats: Vec<DeviceStats>) {
        for s in stats {
            if let Some(dev) = self.devices.get_mut(&s.id) {
                dev.stats = Some(s);
            }
        }
    }

    /// The worker's answer to a `Reconfig`. `Err` is a protocol violation.
    pub(super) fn on_reconfig_reply(
        &mut self,
        key: &WorkerKey,
        id: u64,
        answer: ReconfigAnswer,
    ) -> Result<(), Violation> {
        let what = match answer {
            ReconfigAnswer::Applied => "Reconfigured",
            ReconfigAnswer::Refused(_) => "ReconfigFailed",
        };
        self.owned(key, id, what)?;
        let Some(p) = self
            .devices
            .get_mut(&id)
            .and_then(|d| d.reconfigs.pop_front())
        else {
            // A late answer to a change already refused to the kernel (the device failed or
            // the deadline passed) is expected; anything else was never asked for.
            return match self.devices.get_mut(&id).map(|d| &mut d.abandoned) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    debug!(id, what, "late answer to an abandoned reconfiguration");
                    Ok(())
                }
                _ => Err(Violation::NoReconfigPending { what, id }),
            };
        };
        let Some(dev) = self.devices.get_mut(&id) else {
            return Ok(());
        };
        let uio = dev.dev.uio.clone();
        match answer {
            ReconfigAnswer::Applied => {
                if let Some(size) = p.dev_size {
                    dev.dev.dev_size = size;
                    dev.spec.dev_size = size;
                }
                if let Some(on) = p.write_cache {
                    dev.dev.write_cache = on;
                    dev.spec.write_cache = on;
                }
                info!(device = %uio, worker = %key.name(), dev_size = ?p.dev_size, write_cache = ?p.write_cache, "device reconfigured");
                self.reply(netlink::cmd::RECONFIG_DEVICE_DONE, p.device_id, 0);
            }
            ReconfigAnswer::Refused(reason) => {
                warn!(device = %uio, worker = %key.name(), reason = ?reason, "the worker could not apply the change; refusing it to the kernel");
                self.reply(netlink::cmd::RECONFIG_DEVICE_DONE, p.device_id, -libc::EIO);
            }
        }
        Ok(())
    }

    /// Called when a shutdown starts: tell systemd, refuse new netlink requests, and block
    /// every served device so the kernel holds new commands while in-flight ones drain.
    pub(super) fn on_shutdown_begin(&mut self) {
        self.admin.notifier.notify("STOPPING=1\nSTATUS=draining");
        lio::set_module_param(&self.opts.sysfs_root, ModuleParam::BlockNetlink, true);
        let ids: Vec<u64> = self
            .devices
            .iter()
            .filter(|(_, d)| matches!(d.phase, DevicePhase::Ready | DevicePhase::Sent))
            .map(|(id, _)| *id)
            .collect();
        let blocked = ids
            .into_iter()
            .filter(|id| self.block_for_drain(*id))
            .count();
        info!(blocked, "devices blocked; in-flight commands are draining");
        for id in self.ids_with_reconfigs() {
            self.answer_reconfigs(id, -libc::ESHUTDOWN, "the daemon is stopping");
        }
        self.hotplug.pending.clear();
    }

    /// After the last worker is gone: rings of blocked devices whose worker exited are reset
    /// (what is left completes BUSY; initiators retry once a daemon serves again), pending
    /// kernel requests are failed, and the control socket is removed. Devices stay blocked, and
    /// netlink stays blocked, until the next daemon starts.
    pub fn finish_operations(&mut self) {
        let drained: Vec<u64> = self
            .devices
            .iter()
            .filter(|(_, d)| d.drained)
            .map(|(id, _)| *id)
            .collect();
        let mut reset = 0usize;
        for id in drained {
            let Some(dev) = self.devices.get(&id) else {
                continue;
            };
            let exited = self
                .workers
                .get(&dev.worker)
                .is_none_or(|s| s.phase == WorkerPhase::Exited);
            if !exited {
                warn!(device = %dev.dev.uio, "its worker could not be reaped; its ring is left as it is");
                continue;
            }
            match lio::reset_ring(&self.opts.sysfs_root, dev.dev.hba, &dev.dev.name) {
                Ok(()) => {
                    debug!(device = %dev.dev.uio, "ring reset");
                    reset += 1;
                }
                Err(e) if e.is_missing() => {
                    debug!(device = %dev.dev.uio, error = %e, "device has no reset_ring action");
                }
                Err(e) => warn!(device = %dev.dev.uio, error = %e, "cannot reset the ring"),
            }
        }
        lio::set_module_param(&self.opts.sysfs_root, ModuleParam::ResetNetlink, true);
        self.admin.control = None;
        info!(
            reset,
            "rings reset; devices stay blocked until a daemon serves them again"
        );
    }

    // ---- uevents ------------------------------------------------------------------------------

    pub(super) fn read_uevents(&mut self) {
        for _ in 0..MAX_DATAGRAMS_PER_TURN {
            let Some(sock) = &self.hotplug.uevents else {
                return;
            };
            match sock.recv() {
                Ok(None) => return,
                Ok(Some(Ok(ev))) => self.on_uevent(ev),
                Ok(Some(Err(e))) => debug!(error = %e, "uevent ignored"),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    self.resync("the uevent queue overflowed");
                }
                Err(e) => {
                    error!(error = %e, "uevent socket failed; no longer following uevents");
                    self.hotplug.uevents = None;
                    return;
                }
            }
        }
    }

    /// Acts on one uevent (public for tests that feed events directly).
    pub fn on_uevent(&mut self, ev: Uevent) {
        let Some(uio) = ev.uio().map(str::to_owned) else {
            return;
        };
        if self.shutdown.is_some() {
            return;
        }
        let managed = self.managed_on(&uio);
        match ev.action {
            Action::Add => {
                if self.hotplug.refused.contains_key(&uio) {
                    debug!(device = %uio, "uevent add for a device refused at creation; ignored");
                    return;
                }
                if let Some(p) = self.hotplug.pending.iter_mut().find(|p| p.uio == uio) {
                    p.inc.awaiting_add_uevent = false;
                } else if let Some((id, _)) = managed.filter(|(_, removing)| !removing) {
                    let Some(inc) = self.devices.get_mut(&id).map(|d| &mut d.inc) else {
                        return;
                    };
                    if inc.awaiting_add_uevent {
                        inc.awaiting_add_uevent = false;
                    } else {
                        debug!(device = %uio, "uevent add for a device already served");
                    }
                    return;
                } else {
                    info!(device = %uio, seqnum = ?ev.seqnum, "uio device appeared");
                    let now = Instant::now();
                    self.hotplug.pending.push(PendingAdd {
                        uio: uio.clone(),
                        backstore: None,
                        inc: Incarnation::default(),
                        deadline: now + NODE_WAIT,
                        wait_netlink_until: self
                            .hotplug
                            .netlink
                            .is_some()
                            .then(|| now + NETLINK_GRACE),
                    });
                }
                self.try_pending(Instant::now());
            }
            Action::Remove => {
                self.hotplug.refused.remove(&uio);
                // A pending adoption still waiting for its own add is a newer device.
                self.hotplug
                    .pending
                    .retain(|p| p.uio != uio || p.inc.awaiting_add_uevent);
                if let Some((id, removing)) = managed {
                    let stale = self
                        .devices
                        .get(&id)
                        .is_some_and(|d| d.inc.awaiting_add_uevent);
                    if stale {
                        debug!(device = %uio, "uevent remove for the previous device on this minor; ignored");
                    } else if !removing {
                        info!(device = %uio, seqnum = ?ev.seqnum, "uio device disappeared");
                        self.remove_device(id);
                    }
                }
            }
            Action::Other(_) => {}
        }
    }

    /// The device managed on `uio` (id, and whether it is being released). Among several (a
    /// released one and its successor), the newest.
    fn managed_on(&self, uio: &str) -> Option<(u64, bool)> {
        self.devices
            .iter()
            .rev()
            .find(|(_, d)| d.dev.uio == uio)
            .map(|(id, d)| (*id, d.phase == DevicePhase::Removing))
    }

    // ---- netlink ------------------------------------------------------------------------------

    pub(super) fn read_netlink(&mut self) {
        for _ in 0..MAX_DATAGRAMS_PER_TURN {
            let Some(nl) = &mut self.hotplug.netlink else {
                return;
            };
            let items = match nl.recv() {
                Ok(None) => return,
                Ok(Some(items)) => items,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    self.resync("the netlink queue overflowed");
                    continue;
                }
                Err(e) => {
                    error!(error = %e, "netlink socket failed; no longer following TCM-USER requests");
                    self.hotplug.netlink = None;
                    self.hotplug.netlink_state = "unavailable";
                    return;
                }
            };
            for item in items {
                match item {
                    Incoming::Event(ev) => self.on_tcmu_event(ev),
                    Incoming::Ack { seq, error: 0 } => debug!(seq, "kernel acknowledged"),
                    Incoming::Ack { seq, error } => {
                        warn!(
                            seq,
                            errno = -error,
                            "the kernel refused one of our netlink messages"
                        );
                    }
                    Incoming::Bad(why) => warn!(reason = %why, "netlink message ignored"),
                }
            }
        }
    }

    /// Answers a kernel request (nothing to answer without a device id: such kernels do not
    /// wait for replies).
    fn reply(&mut self, done_cmd: u8, device_id: Option<u32>, status: i32) {
        let (Some(nl), Some(device_id)) = (&mut self.hotplug.netlink, device_id) else {
            return;
        };
        match nl.send_done(done_cmd, status, device_id) {
            Ok(seq) => debug!(seq, done_cmd, device_id, status, "answered the kernel"),
            Err(e) => {
                error!(error = %e, done_cmd, device_id, status, "cannot answer the kernel; its configfs writer stays blocked until reset_netlink")
            }
        }
    }

    /// Acts on one kernel request and answers it (public for tests that feed requests directly).
    pub fn on_tcmu_event(&mut self, ev: TcmuEvent) {
        match ev {
            TcmuEvent::Added(d) => self.on_nl_added(d),
            TcmuEvent::Removed(d) => self.on_nl_removed(d),
            TcmuEvent::Reconfig(d, change) => self.on_nl_reconfig(d, change),
        }
    }

    /// The managed device `d` refers to: same minor, same backstore, and the same kernel id if
    /// both are known. Released devices are skipped.
    fn device_for(&self, d: &DeviceRef) -> Option<u64> {
        let parsed = parse_uio_name(&d.name).ok().flatten();
        let uio = d.uio();
        self.devices
            .iter()
            .filter(|(_, dev)| dev.dev.uio == uio && dev.phase != DevicePhase::Removing)
            .filter(|(_, dev)| {
                parsed
                    .as_ref()
                    .is_none_or(|p| p.hba == dev.dev.hba && p.name == dev.dev.name)
            })
            .find(|(_, dev)| {
                let known = dev.inc.device_id;
                known.is_none() || d.device_id.is_none() || known == d.device_id
            })
            .map(|(id, _)| *id)
    }

    fn on_nl_added(&mut self, d: DeviceRef) {
        let uio = d.uio();
        let done = netlink::cmd::ADDED_DEVICE_DONE;
        if self.shutdown.is_some() {
            warn!(device = %uio, "a device was added while the daemon stops; refused (retry once it runs again)");
            self.reply(done, d.device_id, -libc::EAGAIN);
            return;
        }
        let parsed = match parse_uio_name(&d.name) {
            Ok(Some(p)) => p,
            Ok(None) | Err(_) => {
                warn!(device = %uio, name = ?d.name, "refusing a device whose uio name cannot be parsed");
                self.reply(done, d.device_id, -libc::EINVAL);
                return;
            }
        };
        let label = format!("user_{}/{}", parsed.hba, parsed.name);
        let dev_size = self.announced_size(&uio, parsed.hba, &parsed.name);
        match self
            .config
            .admit(parsed.subtype.as_deref(), &parsed.cfgstring, dev_size)
        {
            Err(err) => {
                let errno = refusal_errno(&err);
                let reason = fit_reason(err.to_string());
                warn!(
                    device = %uio,
                    backstore = %label,
                    subtype = parsed.subtype.as_deref().unwrap_or("-"),
                    cfgstring = ?parsed.cfgstring,
                    rule = %err.rule(),
                    reason = %reason,
                    errno,
                    "device refused by policy at creation; the configfs write fails"
                );
                self.reply(done, d.device_id, -errno);
                self.hotplug.refused.insert(uio.clone(), d.name.clone());
                self.hotplug.pending.retain(|p| p.uio != uio);
                if let Some(id) = self.device_for(&d) {
                    self.remove_device(id);
                }
                return;
            }
            Ok(_admission) => {
                // The descriptor opened here is dropped; adoption admits (and opens) again.
                self.reply(done, d.device_id, 0);
            }
        }
        info!(device = %uio, backstore = %label, device_id = ?d.device_id, "device added by the kernel");
        self.hotplug.refused.remove(&uio);
        if let Some((id, removing)) = self.managed_on(&uio) {
            let same = self
                .devices
                .get(&id)
                .is_some_and(|dev| dev.dev.hba == parsed.hba && dev.dev.name == parsed.name);
            let known = self.devices.get(&id).and_then(|dev| dev.inc.device_id);
            if !removing && same && (known.is_none() || known == d.device_id) {
                // Adopted already (its uevent came first, or the scan found it).
                if let Some(dev) = self.devices.get_mut(&id) {
                    dev.inc.device_id = d.device_id;
                }
                return;
            }
            if !removing {
                info!(device = %uio, "the device on this minor was replaced; releasing the old one");
                self.remove_device(id);
            }
        }
        let awaiting = self.hotplug.uevents.is_some();
        if let Some(p) = self.hotplug.pending.iter_mut().find(|p| p.uio == uio) {
            p.inc.device_id = d.device_id;
            p.backstore = Some((parsed.hba, parsed.name));
            p.wait_netlink_until = None;
        } else {
            self.hotplug.pending.push(PendingAdd {
                uio,
                backstore: Some((parsed.hba, parsed.name)),
                inc: Incarnation {
                    device_id: d.device_id,
                    awaiting_add_uevent: awaiting,
                },
                deadline: Instant::now() + NODE_WAIT,
                wait_netlink_until: None,
            });
        }
        self.try_pending(Instant::now());
    }

    /// The size of a device being added, from configfs (0 when unreadable).
    fn announced_size(&self, uio: &str, hba: u32, name: &str) -> u64 {
        if let Ok(Some(dev)) = discovery::read_device(&self.opts.sysfs_root, uio)
            && dev.hba == hba
            && dev.name == name
        {
            return dev.dev_size;
        }
        let path =
            discovery::configfs_dir(&self.opts.sysfs_root, hba, name).join("attrib/dev_size");
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    fn on_nl_removed(&mut self, d: DeviceRef) {
        let uio = d.uio();
        self.reply(netlink::cmd::REMOVED_DEVICE_DONE, d.device_id, 0);
        if self.hotplug.refused.get(&uio).is_some_and(|n| *n == d.name) {
            self.hotplug.refused.remove(&uio);
        }
        self.hotplug.pending.retain(|p| {
            !(p.uio == uio && (p.inc.device_id.is_none() || p.inc.device_id == d.device_id))
        });
        if let Some(id) = self.device_for(&d) {
            info!(device = %uio, device_id = ?d.device_id, "device removed by the kernel");
            self.remove_device(id);
        } else {
            debug!(device = %uio, "kernel removed a device this daemon does not serve");
        }
    }

    fn on_nl_reconfig(&mut self, d: DeviceRef, change: Reconfig) {
        let done = netlink::cmd::RECONFIG_DEVICE_DONE;
        let Some(id) = self.device_for(&d) else {
            // Not served (yet: it may be waiting for its node). The policy still decides what
            // its configuration may become.
            let status = match self.refuse_unserved_change(&d, &change) {
                Some(err) => {
                    warn!(device = %d.uio(), ?change, rule = %err.rule(), reason = %err, "change refused by policy; the configfs write fails");
                    -refusal_errno(&err)
                }
                None => {
                    debug!(device = %d.uio(), ?change, "reconfiguration of a device this daemon does not serve; accepted");
                    0
                }
            };
            self.reply(done, d.device_id, status);
            return;
        };
        let Some(dev) = self.devices.get(&id) else {
            return;
        };
        let uio = dev.dev.uio.clone();
        let refused = dev.spec.refusal.is_some();
        match change {
            Reconfig::DevSize(size) => {
                if size < u64::from(dev.dev.block_size) {
                    warn!(device = %uio, size, block_size = dev.dev.block_size, "refusing a size that holds no whole block");
                    self.reply(done, d.device_id, -libc::EINVAL);
                    return;
                }
                if !refused
                    && let Err(err) =
                        self.config
                            .admit(dev.dev.subtype.as_deref(), &dev.dev.cfgstring, size)
                {
                    warn!(device = %uio, size, rule = %err.rule(), reason = %err, "new size refused by policy; the configfs write fails");
                    self.reply(done, d.device_id, -refusal_errno(&err));
                    return;
                }
                self.apply_reconfig(id, d.device_id, Some(size), None);
            }
            Reconfig::WriteCache(on) => self.apply_reconfig(id, d.device_id, None, Some(on)),
            Reconfig::DevConfig(dev_config) => {
                let (subtype, cfgstring) = split_dev_config(&dev_config);
                if let Err(err) =
                    self.config
                        .admit(subtype.as_deref(), &cfgstring, dev.dev.dev_size)
                {
                    warn!(device = %uio, dev_config = ?dev_config, rule = %err.rule(), reason = %err, "new dev_config refused by policy; the configfs write fails");
                    self.reply(done, d.device_id, -refusal_errno(&err));
                    return;
                }
                let mut new = dev.dev.clone();
                new.subtype = subtype;
                new.cfgstring = cfgstring;
                let phase = dev.phase.clone();
                self.reply(done, d.device_id, 0);
                info!(device = %uio, dev_config = ?dev_config, "dev_config changed; reopening the device");
                if let Some(dev) = self.devices.get_mut(&id) {
                    dev.reopen = Some(new);
                }
                if !matches!(phase, DevicePhase::Removing) {
                    self.remove_device(id);
                }
            }
        }
    }

    /// For a device not (yet) served: the policy's objection to `change`, judged from the
    /// device's uio name and configfs size.
    fn refuse_unserved_change(&self, d: &DeviceRef, change: &Reconfig) -> Option<PolicyError> {
        let parsed = parse_uio_name(&d.name).ok().flatten()?;
        match change {
            Reconfig::DevConfig(dev_config) => {
                let (subtype, cfgstring) = split_dev_config(dev_config);
                let size = self.announced_size(&d.uio(), parsed.hba, &parsed.name);
                self.config
                    .admit(subtype.as_deref(), &cfgstring, size)
                    .err()
            }
            Reconfig::DevSize(size) => self
                .config
                .admit(parsed.subtype.as_deref(), &parsed.cfgstring, *size)
                .err()
                // A device whose current configuration is refused anyway is not refused a size.
                .filter(|e| matches!(e, PolicyError::TooLarge { .. })),
            Reconfig::WriteCache(_) => None,
        }
    }

    /// Sends a size or write-cache change to the device's worker, or records it directly when
    /// no worker serves the device yet (the next `AddDevice` carries it).
    fn apply_reconfig(
        &mut self,
        id: u64,
        device_id: Option<u32>,
        dev_size: Option<u64>,
        write_cache: Option<bool>,
    ) {
        let done = netlink::cmd::RECONFIG_DEVICE_DONE;
        let Some(dev) = self.devices.get_mut(&id) else {
            self.reply(done, device_id, -libc::ENODEV);
            return;
        };
        let worker_ready = self
            .workers
            .get(&dev.worker)
            .is_some_and(|s| s.phase == WorkerPhase::Ready);
        let live = worker_ready
            && matches!(dev.phase, DevicePhase::Sent | DevicePhase::Ready)
            && dev.spec.refusal.is_none();
        if !live {
            if let Some(size) = dev_size {
                dev.dev.dev_size = size;
                dev.spec.dev_size = size;
            }
            if let Some(on) = write_cache {
                dev.dev.write_cache = on;
                dev.spec.write_cache = on;
            }
            info!(device = %dev.dev.uio, ?dev_size, ?write_cache, "device settings updated (no worker serves it right now)");
            self.reply(done, device_id, 0);
            return;
        }
        let key = dev.worker.clone();
        let uio = dev.dev.uio.clone();
        let msg = ToWorker::Reconfig {
            id,
            dev_size,
            write_cache,
        };
        let sent = self.workers.get(&key).map(|s| s.process.send(&msg));
        match sent {
            Some(Ok(())) => {
                debug!(device = %uio, worker = %key.name(), "reconfiguration sent to the worker");
                let deadline = Instant::now() + self.opts.reply_timeout;
                if let Some(dev) = self.devices.get_mut(&id) {
                    dev.reconfigs.push_back(PendingReconfig {
                        device_id,
                        dev_size,
                        write_cache,
                        deadline,
                    });
                }
            }
            Some(Err(err)) => {
                self.reply(done, device_id, -libc::EIO);
                self.kill_worker(&key, format!("sending Reconfig: {err}"));
            }
            None => self.reply(done, device_id, -libc::ENODEV),
        }
    }

    /// The devices with a reconfiguration waiting for their worker's answer.
    fn ids_with_reconfigs(&self) -> Vec<u64> {
        self.devices
            .iter()
            .filter(|(_, d)| !d.reconfigs.is_empty())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Answers every pending reconfiguration of `id` with `status`.
    fn answer_reconfigs(&mut self, id: u64, status: i32, why: &str) {
        let Some(dev) = self.devices.get_mut(&id) else {
            return;
        };
        let q = std::mem::take(&mut dev.reconfigs);
        dev.abandoned += q.len();
        for p in q {
            warn!(device_id = ?p.device_id, id, why, status, "reconfiguration not applied");
            self.reply(netlink::cmd::RECONFIG_DEVICE_DONE, p.device_id, status);
        }
    }

    /// Answers reconfigurations whose device is no longer served, and kills workers that did
    /// not answer in time.
    fn check_reconfigs(&mut self, now: Instant) {
        for id in self.ids_with_reconfigs() {
            let (served, key) = match self.devices.get(&id) {
                Some(d) => (
                    matches!(d.phase, DevicePhase::Sent | DevicePhase::Ready)
                        && self
                            .workers
                            .get(&d.worker)
                            .is_some_and(|s| s.phase == WorkerPhase::Ready),
                    Some(d.worker.clone()),
                ),
                None => (false, None),
            };
            if !served {
                self.answer_reconfigs(id, -libc::ENODEV, "its worker no longer serves it");
                continue;
            }
            let overdue = self
                .devices
                .get(&id)
                .and_then(|d| d.reconfigs.front())
                .is_some_and(|p| p.deadline <= now);
            if overdue {
                self.answer_reconfigs(id, -libc::ETIMEDOUT, "its worker did not answer in time");
                if let Some(key) = key {
                    let why = format!(
                        "no answer to Reconfig for device {id} within {:?}",
                        self.opts.reply_timeout
                    );
                    self.kill_worker(&key, why);
                }
            }
        }
    }

    // ---- pending adoptions ----------------------------------------------------------------------

    fn run_readopt(&mut self) {
        for (dev, fd, inc) in std::mem::take(&mut self.hotplug.readopt) {
            let uio = dev.uio.clone();
            match self.adopt_with_fd(dev, fd) {
                Ok(id) => {
                    info!(device = %uio, id, "device reopened with its new dev_config");
                    if let Some(dev) = self.devices.get_mut(&id) {
                        dev.inc = inc;
                    }
                }
                Err(e) => error!(device = %uio, error = %e, "cannot reopen the device"),
            }
        }
    }

    /// Adopts pending devices whose node exists and whose minor is free; gives up on those past
    /// their deadline.
    fn try_pending(&mut self, now: Instant) {
        if self.shutdown.is_some() {
            self.hotplug.pending.clear();
            return;
        }
        let pending = std::mem::take(&mut self.hotplug.pending);
        for p in pending {
            if let Some(keep) = self.try_one(p, now) {
                self.hotplug.pending.push(keep);
            }
        }
    }

    /// One pending adoption: `Some` to keep waiting.
    fn try_one(&mut self, p: PendingAdd, now: Instant) -> Option<PendingAdd> {
        if p.wait_netlink_until.is_some_and(|t| now < t) && self.hotplug.netlink.is_some() {
            return Some(p);
        }
        let expired = p.deadline <= now;
        match self.managed_on(&p.uio) {
            Some((_, true)) => {
                if expired {
                    error!(device = %p.uio, "the previous device on this minor was not released in time; not adopting the new one");
                    return None;
                }
                return Some(p);
            }
            Some((_, false)) => {
                debug!(device = %p.uio, "already served");
                return None;
            }
            None => {}
        }
        let dev = match discovery::read_device(&self.opts.sysfs_root, &p.uio) {
            Ok(Some(dev)) => dev,
            Ok(None) => {
                debug!(device = %p.uio, "not a TCMU device");
                return None;
            }
            Err(e) => {
                if expired {
                    error!(device = %p.uio, error = %e, "gave up on a device whose attributes cannot be read");
                    return None;
                }
                return Some(p);
            }
        };
        if let Some((hba, name)) = &p.backstore
            && (dev.hba != *hba || dev.name != *name)
        {
            debug!(device = %p.uio, "sysfs shows another backstore on this minor; waiting");
            return (!expired).then_some(p);
        }
        if !self.opts.dev_root.join(&p.uio).exists() {
            if expired {
                error!(device = %p.uio, wait = ?NODE_WAIT, "gave up waiting for the device node");
                return None;
            }
            return Some(p);
        }
        let uio = p.uio.clone();
        match self.adopt(dev) {
            Ok(id) => {
                if let Some(dev) = self.devices.get_mut(&id) {
                    dev.inc = p.inc;
                }
                None
            }
            Err(AdoptError::OpenUio { ref source, .. })
                if source.kind() == std::io::ErrorKind::NotFound && !expired =>
            {
                Some(p)
            }
            Err(e) => {
                error!(device = %uio, error = %e, "cannot take over the device");
                None
            }
        }
    }

    /// Events were lost: fail whatever the kernel still waits for and compare the device table
    /// with sysfs.
    fn resync(&mut self, why: &str) {
        error!(reason = why, "events were lost; resynchronizing with sysfs");
        lio::set_module_param(&self.opts.sysfs_root, ModuleParam::ResetNetlink, true);
        let scan = match discovery::scan(&self.opts.sysfs_root) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "resynchronization scan failed");
                return;
            }
        };
        let present: BTreeSet<String> = scan.devices.iter().map(|d| d.uio.clone()).collect();
        let gone: Vec<u64> = self
            .devices
            .iter()
            .filter(|(_, d)| !present.contains(&d.dev.uio) && d.phase != DevicePhase::Removing)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.remove_device(id);
        }
        for dev in scan.devices {
            if self.managed_on(&dev.uio).is_none()
                && !self.hotplug.pending.iter().any(|p| p.uio == dev.uio)
            {
                self.hotplug.pending.push(PendingAdd {
                    uio: dev.uio,
                    backstore: Some((dev.hba, dev.name)),
                    inc: Incarnation::default(),
                    deadline: Instant::now() + NODE_WAIT,
                    wait_netlink_until: None,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn refusals_map_to_errnos() {
        assert_eq!(refusal_errno(&PolicyError::NoSubtype), libc::EOPNOTSUPP);
        assert_eq!(
            refusal_errno(&PolicyError::NotServed {
                subtype: "qcow".into()
            }),
            libc::EOPNOTSUPP
        );
        assert_eq!(
            refusal_errno(&PolicyError::OutsideAllowPaths {
                subtype: "file".into(),
                path: PathBuf::from("/etc/shadow"),
                allowed: "/srv".into()
            }),
            libc::EPERM
        );
        assert_eq!(
            refusal_errno(&PolicyError::NotAbsolute { path: "x".into() }),
            libc::EINVAL
        );
        assert_eq!(
            refusal_errno(&PolicyError::TooLarge {
                dev_size: 2,
                max_size: 1
            }),
            libc::EFBIG
        );
    }

    #[test]
    fn dev_config_splits_like_the_uio_name() {
        assert_eq!(
            split_dev_config("file//a/b"),
            (Some("file".into()), "/a/b".into())
        );
        assert_eq!(
            split_dev_config("ram/"),
            (Some("ram".into()), String::new())
        );
        assert_eq!(split_dev_config("ram"), (Some("ram".into()), String::new()));
        assert_eq!(split_dev_config(""), (None, String::new()));
    }
}
