//! # Worker lifecycle: heartbeats, crashes, restarts, quarantine, and ring recovery
//!
//! **Heartbeats.** Every serving worker gets a `Ping` each `heartbeat_interval`; a worker that
//! does not answer within `heartbeat_timeout` is killed (SIGKILL) as hung. The `Pong` carries the
//! worker's device counters, kept in [`WorkerStatus::stats`](super::WorkerStatus::stats): this
//! is the one place that pings workers (a stats poller reads the counters from there).
//!
//! **Crashes.** A worker that goes down outside a shutdown — whatever the cause: an exit, any
//! signal (`SIGSYS` is reported as a sandbox violation), or a kill by the supervisor (protocol
//! violation, missed deadline, missed heartbeat) — is logged with the cause and the devices it
//! served. Its devices are blocked (`action/block_dev = 1`: the kernel answers new commands BUSY,
//! initiators retry) and wait, in [`DevicePhase::Recovering`], for a successor started after an
//! exponential backoff (`restart_backoff_initial`, doubling per crash inside the window, capped
//! at `restart_backoff_max`). A worker that crashes `quarantine_after` times within
//! `quarantine_window` is quarantined: not restarted, and its devices are handed to the refusals
//! worker, which fails their commands at once with NOT READY until an operator lifts the
//! quarantine ([`super::quarantine`]).
//!
//! **Recovery.** The successor receives each device with the supervisor's own (duplicated) uio
//! descriptor, its backing store reopened through the policy, and its journal in
//! [`JournalMode::Recover`]: it finishes exactly what its predecessor left in flight. Once it
//! reports the device ready, the device is unblocked. If the worker reports the journal
//! inconsistent ([`FromWorker::RecoveryFailed`]), the supervisor falls back to
//! `action/reset_ring = 1` (every command in flight completes BUSY, the ring rewinds), zeroes the
//! journal and sends the device again as `Fresh`; a device without a journal is always reset that
//! way before a successor gets it. The same recovery runs when the supervisor itself restarts:
//! a device whose journal file exists is blocked and sent in `Recover` mode.
//!
//! **A ring nobody recorded.** A device adopted without a journal to recover from (the file did
//! not exist: a first start, but also a `/run` emptied while no supervisor ran, a changed
//! `journal_dir`, or another TCMU daemon that served the device before us) is sent `Fresh` (or
//! without a journal) on the assumption that nobody fetched from its ring. The worker checks
//! that no command waits in the ring before it fetches anything; if some do, nothing says which
//! of them the previous server already answered (out-of-order completions relabel the slots),
//! and serving them from `cmd_tail` would answer some twice — the kernel then marks the ring
//! broken — and lose others. It answers `RecoveryFailed` instead, and the supervisor resets the
//! ring exactly as for an inconsistent journal. Right after a reset, with the device blocked, no
//! command can be waiting: a `RecoveryFailed` then is a protocol violation (it would make the
//! supervisor reset the ring forever) and kills the worker.
//!
//! This module never parses a journal or the ring (the worker does); it only decides, writes the
//! two configfs actions, and keeps the books.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tcmu_warden_proto::{FromWorker, JournalMode, ToWorker};
use tracing::{debug, error, info, warn};

use super::{DevicePhase, Supervisor, WorkerKey, WorkerPhase};
use crate::journal::JournalStore;
use crate::lio;
use crate::worker::classify_exit;
use tcmu_warden_proto::process::fit_reason;

/// What the supervisor remembers of a worker key's crashes, across its successive processes.
#[derive(Debug, Default)]
pub(super) struct CrashHistory {
    /// When it crashed, within the quarantine window.
    pub crashes: VecDeque<Instant>,
    /// Crashes ever.
    pub total: u32,
    /// Restarts ever.
    pub restarts: u32,
    /// Why it last went down.
    pub last_cause: Option<String>,
    /// When the next restart is due.
    pub restart_at: Option<Instant>,
    /// Why it is quarantined (not restarted until an operator lifts the quarantine), if it is.
    pub quarantined: Option<String>,
    /// How many times an operator lifted its quarantine.
    pub lifts: u32,
}

/// Why a ring could not be reset (logged, and the device marked failed, where it happens).
#[derive(Debug, thiserror::Error)]
pub(super) enum ResetError {
    /// The device left the table.
    #[error("device {0} is no longer managed")]
    Gone(u64),
    /// `action/reset_ring` could not be written.
    #[error("ring reset failed: {0}")]
    Knob(#[from] lio::KnobError),
}

/// The restart delay after the `n`-th crash inside the window (1-based).
pub(super) fn backoff(initial: Duration, max: Duration, n: usize) -> Duration {
    let doublings = u32::try_from(n.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(31);
    initial
        .checked_mul(1u32 << doublings)
        .map_or(max, |d| d.min(max))
}

impl Supervisor {
    /// A worker was reaped: decide what becomes of it and of its devices.
    pub(super) fn on_worker_down(&mut self, key: &WorkerKey, status: ExitStatus) {
        let Some(slot) = self.workers.get(key) else {
            return;
        };
        let cause = classify_exit(status, slot.kill_reason.as_deref());
        let was_shutting_down = slot.phase == WorkerPhase::ShuttingDown;
        if self.shutdown.is_some() || was_shutting_down {
            self.orphan_all(key, "its worker exited");
            return;
        }
        let pid = slot.process.pid();
        let name = slot.name.clone();
        let devices = self.device_labels(key);
        error!(worker = %name, pid, cause = %cause, devices = ?devices, "worker crashed");
        self.worker_failed(key, cause);
    }

    /// `uioN (user_<hba>/<name>)` of every device assigned to `key`.
    pub(super) fn device_labels(&self, key: &WorkerKey) -> Vec<String> {
        self.devices
            .values()
            .filter(|d| &d.worker == key)
            .map(|d| format!("{} ({})", d.dev.uio, d.dev.label()))
            .collect()
    }

    /// Records a crash of `key` (or a failed restart) and schedules its restart, or quarantines
    /// it. Its devices are blocked and wait.
    pub(super) fn worker_failed(&mut self, key: &WorkerKey, cause: String) {
        let lc = self.opts.lifecycle;
        let now = Instant::now();
        let name = key.name();
        let h = self.history.entry(key.clone()).or_default();
        h.crashes.push_back(now);
        while h
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > lc.quarantine_window)
        {
            h.crashes.pop_front();
        }
        h.total = h.total.saturating_add(1);
        h.last_cause = Some(cause.clone());
        let recent = h.crashes.len();
        let ids: Vec<u64> = self.device_ids_of(key);
        // Devices being released are done with, and so are devices on their way to another
        // worker (they go on to it: the dead worker cannot release them any more); the rest wait
        // for a successor.
        for &id in &ids {
            if self
                .devices
                .get(&id)
                .is_some_and(|d| d.phase == DevicePhase::Removing || d.move_to.is_some())
            {
                self.release_done(id);
            }
        }
        let ids: Vec<u64> = ids
            .into_iter()
            .filter(|id| self.devices.get(id).is_some_and(|d| &d.worker == key))
            .collect();
        if recent >= lc.quarantine_after as usize {
            let reason = fit_reason(format!(
                "worker {name} crashed {recent} times within {:?} (last: {cause}); quarantined",
                lc.quarantine_window
            ));
            if let Some(h) = self.history.get_mut(key) {
                h.quarantined = Some(reason.clone());
                h.restart_at = None;
            }
            self.quarantine(key, &reason, ids, recent, &cause);
            return;
        }
        if ids.is_empty() {
            // Nothing to serve: the next device of this key starts a worker.
            return;
        }
        let delay = backoff(lc.restart_backoff_initial, lc.restart_backoff_max, recent);
        if let Some(h) = self.history.get_mut(key) {
            h.restart_at = Some(now + delay);
        }
        warn!(worker = %name, crashes = recent, delay = ?delay, "restarting the worker after a backoff");
        for id in ids {
            self.block_device(id);
            if let Some(dev) = self.devices.get_mut(&id) {
                dev.phase = DevicePhase::Recovering;
                dev.deadline = None;
                dev.reset_for_handover = false;
            }
        }
    }

    /// `block_dev = 1`, once.
    pub(super) fn block_device(&mut self, id: u64) {
        let root = self.opts.sysfs_root.clone();
        let Some(dev) = self.devices.get_mut(&id) else {
            return;
        };
        if dev.blocked {
            return;
        }
        match lio::block_dev(&root, dev.dev.hba, &dev.dev.name, true) {
            Ok(()) => {
                dev.blocked = true;
                info!(device = %dev.dev.uio, backstore = %dev.dev.label(), "device blocked: new commands answer BUSY until it is served again");
            }
            Err(err) => {
                error!(device = %dev.dev.uio, backstore = %dev.dev.label(), error = %err, "cannot block the device");
            }
        }
    }

    /// Blocks a served device for the shutdown drain (`block_dev = 1`; its ring is reset once
    /// its worker is gone, see `finish_operations`). Returns whether the device is blocked.
    pub(super) fn block_for_drain(&mut self, id: u64) -> bool {
        let root = self.opts.sysfs_root.clone();
        let Some(dev) = self.devices.get_mut(&id) else {
            return false;
        };
        match lio::block_dev(&root, dev.dev.hba, &dev.dev.name, true) {
            Ok(()) => {
                debug!(device = %dev.dev.uio, "device blocked for the drain");
                dev.blocked = true;
                dev.drained = true;
            }
            Err(err) if err.is_missing() => {
                debug!(device = %dev.dev.uio, error = %err, "device has no block_dev action");
            }
            Err(err) => {
                warn!(device = %dev.dev.uio, error = %err, "cannot block the device for the drain");
            }
        }
        dev.drained
    }

    /// `block_dev = 0` if the supervisor blocked it (not a device blocked for the shutdown
    /// drain: that stays blocked until the next daemon serves it).
    pub(super) fn unblock_device(&mut self, id: u64) {
        let root = self.opts.sysfs_root.clone();
        let Some(dev) = self.devices.get_mut(&id) else {
            return;
        };
        if !dev.blocked || dev.drained {
            return;
        }
        match lio::block_dev(&root, dev.dev.hba, &dev.dev.name, false) {
            Ok(()) => {
                dev.blocked = false;
                info!(device = %dev.dev.uio, backstore = %dev.dev.label(), "device unblocked");
            }
            Err(err) => {
                error!(device = %dev.dev.uio, backstore = %dev.dev.label(), error = %err, "cannot unblock the device");
            }
        }
    }

    /// The journal mode for the next `AddDevice` of device `id`. A device whose ring a worker
    /// may have used and that has no journal is reset first (every command in flight BUSY).
    pub(super) fn prepare_handover(&mut self, id: u64) -> JournalMode {
        let Some(dev) = self.devices.get(&id) else {
            return JournalMode::None;
        };
        match (&dev.journal, dev.ring_dirty) {
            (Some(_), true) => JournalMode::Recover,
            (Some(_), false) => JournalMode::Fresh,
            (None, false) => JournalMode::None,
            (None, true) => {
                let label = dev.dev.label();
                let uio = dev.dev.uio.clone();
                warn!(device = %uio, backstore = %label, "no journal to recover from: resetting the ring (commands in flight complete BUSY)");
                if self.reset_device_ring(id).is_err() {
                    return JournalMode::None;
                }
                JournalMode::None
            }
        }
    }

    /// Blocks (if needed) and resets the ring of device `id`, and zeroes its journal. On
    /// failure the device is marked failed.
    pub(super) fn reset_device_ring(&mut self, id: u64) -> Result<(), ResetError> {
        self.block_device(id);
        let root = self.opts.sysfs_root.clone();
        let Some(dev) = self.devices.get_mut(&id) else {
            return Err(ResetError::Gone(id));
        };
        if let Err(err) = lio::reset_ring(&root, dev.dev.hba, &dev.dev.name) {
            error!(device = %dev.dev.uio, backstore = %dev.dev.label(), error = %err,
                   "cannot reset the ring; the device is not served");
            dev.phase = DevicePhase::Failed(fit_reason(format!("ring reset failed: {err}")));
            dev.deadline = None;
            return Err(ResetError::Knob(err));
        }
        dev.resets = dev.resets.saturating_add(1);
        dev.ring_dirty = false;
        dev.reset_for_handover = true;
        info!(device = %dev.dev.uio, backstore = %dev.dev.label(), "ring reset: every command in flight completed BUSY");
        if let Some(j) = &dev.journal
            && let Err(err) = JournalStore::zero(&j.file)
        {
            error!(device = %dev.dev.uio, path = %j.path.display(), error = %err,
                   "cannot clear the journal; serving the device without one");
            dev.journal = None;
        }
        Ok(())
    }

    /// The worker cannot serve device `id`'s ring as it is: its journal does not agree with the
    /// ring, or there was no journal to recover from and commands already wait in the ring.
    /// Reset the ring and send the device again with a fresh journal.
    pub(super) fn on_recovery_failed(&mut self, key: &WorkerKey, id: u64, reason: &str) {
        if let Some(dev) = self.devices.get(&id) {
            if dev.mode == JournalMode::Recover {
                warn!(device = %dev.dev.uio, backstore = %dev.dev.label(), worker = %key.name(),
                      reason = ?reason,
                      "the journal does not agree with the ring; falling back to a ring reset");
            } else {
                warn!(device = %dev.dev.uio, backstore = %dev.dev.label(), worker = %key.name(),
                      reason = ?reason,
                      "the ring holds commands no journal accounts for (a lost journal, or another TCMU daemon before us); resetting the ring");
            }
        }
        if self.reset_device_ring(id).is_err() {
            return;
        }
        let backing = self.reopen_backing(id);
        self.send_add(key, id, backing);
    }

    /// The device is served again: unblock it and count the recovery (or, if it is to move on
    /// to another worker, have it released at once, still blocked).
    pub(super) fn on_device_ready(&mut self, id: u64) {
        let Some(dev) = self.devices.get_mut(&id) else {
            return;
        };
        dev.reset_for_handover = false;
        if dev.mode == JournalMode::Recover {
            dev.recoveries = dev.recoveries.saturating_add(1);
            info!(device = %dev.dev.uio, backstore = %dev.dev.label(), "device recovered: the new worker finished what its predecessor left in flight");
        }
        if let Some(target) = dev.move_to.clone() {
            self.release_to(id, target);
            return;
        }
        self.unblock_device(id);
    }

    /// The backing store of device `id`, reopened through the policy (a worker consumes the
    /// descriptor it is sent). A device the policy now refuses is served refused.
    pub(super) fn reopen_backing(&mut self, id: u64) -> Option<OwnedFd> {
        let dev = self.devices.get_mut(&id)?;
        if dev.spec.refusal.is_some() {
            dev.spec.has_backing_fd = false;
            return None;
        }
        match self.config.admit(
            dev.dev.subtype.as_deref(),
            &dev.dev.cfgstring,
            dev.dev.dev_size,
        ) {
            Ok(adm) => {
                let backing = adm.into_backing();
                dev.spec.has_backing_fd = backing.is_some();
                backing
            }
            Err(err) => {
                let reason = fit_reason(err.to_string());
                warn!(device = %dev.dev.uio, backstore = %dev.dev.label(), rule = %err.rule(),
                      reason = %reason, "device refused by policy on re-admission; it will answer NOT READY");
                dev.spec.refusal = Some(reason);
                dev.spec.has_backing_fd = false;
                None
            }
        }
    }

    /// Starts the successors whose backoff ran out, and hands them their devices.
    pub(super) fn restarts(&mut self, now: Instant) {
        if self.shutdown.is_some() {
            return;
        }
        let due: Vec<WorkerKey> = self
            .history
            .iter()
            .filter(|(_, h)| h.restart_at.is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let attempt = match self.history.get_mut(&key) {
                Some(h) => {
                    h.restart_at = None;
                    h.restarts = h.restarts.saturating_add(1);
                    h.restarts
                }
                None => continue,
            };
            info!(worker = %key.name(), restart = attempt, "restarting worker");
            self.start_worker(&key);
            let started = self
                .workers
                .get(&key)
                .is_some_and(|s| s.phase == WorkerPhase::Handshaking);
            if !started {
                // A spawn failure counts like a crash (a Hello that could not be sent killed
                // the new worker: its reaping reports it).
                if self
                    .workers
                    .get(&key)
                    .is_none_or(|s| s.phase == WorkerPhase::Exited)
                {
                    self.worker_failed(&key, "the worker could not be started".into());
                }
                continue;
            }
            let ids: Vec<u64> = self
                .devices
                .iter()
                .filter(|(_, d)| d.worker == key && d.phase == DevicePhase::Recovering)
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                let backing = self.reopen_backing(id);
                if let Some(dev) = self.devices.get_mut(&id) {
                    dev.phase = DevicePhase::Queued;
                }
                if let Some(slot) = self.workers.get_mut(&key) {
                    slot.queue.push((id, backing));
                }
            }
        }
    }

    /// Pings serving workers that are due, and kills those that did not answer in time.
    pub(super) fn heartbeats(&mut self, now: Instant) {
        let lc = self.opts.lifecycle;
        let mut hung: Vec<(WorkerKey, String)> = Vec::new();
        for (key, slot) in self.workers.iter_mut() {
            if slot.phase != WorkerPhase::Ready {
                continue;
            }
            match (slot.ping, slot.ping_deadline, slot.next_ping) {
                (Some(seq), Some(deadline), _) if deadline <= now => hung.push((
                    key.clone(),
                    format!(
                        "no answer to heartbeat {seq} within {:?}",
                        lc.heartbeat_timeout
                    ),
                )),
                (None, _, Some(due)) if due <= now => {
                    slot.ping_seq = slot.ping_seq.wrapping_add(1);
                    let seq = slot.ping_seq;
                    match slot.process.send(&ToWorker::Ping { seq }) {
                        Ok(()) => {
                            slot.ping = Some(seq);
                            slot.ping_deadline = Some(now + lc.heartbeat_timeout);
                            slot.next_ping = None;
                        }
                        Err(err) => hung.push((key.clone(), format!("sending a heartbeat: {err}"))),
                    }
                }
                _ => {}
            }
        }
        for (key, why) in hung {
            self.kill_worker(&key, why);
        }
    }

    /// A `Pong` answered the outstanding heartbeat.
    pub(super) fn on_pong(&mut self, key: &WorkerKey, msg: FromWorker) {
        let interval = self.opts.lifecycle.heartbeat_interval;
        let FromWorker::Pong { stats, .. } = msg else {
            return;
        };
        if let Some(slot) = self.workers.get_mut(key) {
            let now = Instant::now();
            slot.ping = None;
            slot.ping_deadline = None;
            slot.next_ping = Some(now + interval);
            slot.last_pong = Some(now);
            slot.stats = stats;
        }
    }

    /// The nearest lifecycle deadline (a heartbeat to send or to give up on, a restart).
    pub(super) fn lifecycle_deadline(&self) -> Option<Instant> {
        let beats = self
            .workers
            .values()
            .filter(|s| s.phase == WorkerPhase::Ready)
            .filter_map(|s| s.ping_deadline.or(s.next_ping));
        let restarts = self.history.values().filter_map(|h| h.restart_at);
        if self.shutdown.is_some() {
            return beats.min();
        }
        beats.chain(restarts).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(30));
        assert_eq!(backoff(i, m, 1), Duration::from_millis(100));
        assert_eq!(backoff(i, m, 2), Duration::from_millis(200));
        assert_eq!(backoff(i, m, 4), Duration::from_millis(800));
        assert_eq!(backoff(i, m, 9), Duration::from_millis(25_600));
        assert_eq!(backoff(i, m, 10), m);
        assert_eq!(backoff(i, m, 1000), m);
        assert_eq!(backoff(i, m, 0), i);
    }
}
