//! # Quarantine: failing fast, and the operator's lift
//!
//! A worker key that crashes `quarantine_after` times within `quarantine_window` is
//! *quarantined* ([`super::lifecycle`] decides when): no successor is started. Its devices must
//! not hang their initiators meanwhile. A blocked device (`action/block_dev = 1`) makes the
//! kernel hold or BUSY every command, and an initiator then waits for its own SCSI timeout
//! (Linux: 30 s per try by default, several tries) before it sees an error; a multipath
//! initiator cannot move the I/O to another path until then. So each device of a quarantined key
//! is *parked*: handed, like a device the policy refused, to the refusals worker
//! ([`WorkerKey::Refused`]), with a refusal reason naming the quarantine. That worker answers
//! every command but INQUIRY, REPORT LUNS and REQUEST SENSE at once with CHECK CONDITION, NOT
//! READY, LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED (sense 02/04/03). Linux does not
//! retry that ASCQ (`scsi_io_completion_action` in `drivers/scsi/scsi_lib.c` retries NOT READY
//! only for 04/01 "becoming ready" and the transitional "in progress" ASCQs, and `scsi_check_sense`
//! in `scsi_error.c` retries only 04/01 (and 04/0a on newer kernels); 04/03 fails the request at once
//! with `BLK_STS_IOERR`, which dm-multipath treats as a path error and retries on another path).
//!
//! The hand-over is the one every crash recovery uses: the device stays blocked while it
//! happens, the refusals worker gets it with its in-flight journal in `Recover` mode (or the ring
//! is reset first when there is no journal), so the commands the dead worker left are finished
//! exactly once: responses it had computed (acknowledged writes among them) are delivered,
//! commands it was still running are answered NOT READY (or BUSY when not replay-safe), none
//! twice. Once the refusals worker reports the device ready it is unblocked, and from then on
//! fails fast. If the refusals worker cannot take it (it is quarantined itself, or cannot be
//! started), the device stays blocked in [`DevicePhase::Quarantined`] and the status report says
//! so.
//!
//! **Lift.** [`Supervisor::lift_quarantine`] (the control socket's `lift_quarantine` request,
//! `tcmu-warden quarantine lift <worker>`) clears the key's crash window and quarantine, then
//! takes each of its devices back: blocked again, released by the refusals worker (its journal
//! kept), and handed to a newly started worker of the key in `Recover` mode, which finishes what
//! the refusals worker left in flight. Once it reports the device ready the device is unblocked
//! and serves I/O again. The crash totals stay; the lift is counted.
//!
//! This module owns parking, the moves between workers and the lift. It never decides when a key
//! is quarantined (that is [`super::lifecycle`]) and never parses a journal or a ring.

use tracing::{error, info, warn};

use super::{DevicePhase, Supervisor, WorkerKey, WorkerPhase};
use crate::control::LiftReport;
use tcmu_warden_proto::ToWorker;
use tcmu_warden_proto::process::fit_reason;

/// A device parked with the refusals worker while its own worker key is quarantined.
#[derive(Debug, Clone)]
pub(super) struct Parked {
    /// The quarantined key it belongs to.
    pub home: WorkerKey,
    /// Its own refusal (by the policy) before it was parked, restored when it goes home.
    pub refusal: Option<String>,
}

/// Why a quarantine cannot be lifted.
#[derive(Debug, thiserror::Error)]
pub enum LiftError {
    /// No worker of that name was ever started.
    #[error("no worker is named {name:?} (workers: {known})")]
    UnknownWorker {
        /// The name asked for.
        name: String,
        /// The names there are.
        known: String,
    },
    /// The worker is not quarantined.
    #[error("worker {0:?} is not quarantined")]
    NotQuarantined(String),
    /// The daemon is stopping.
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

impl Supervisor {
    /// Quarantines `key` (its history already says why): each of its devices `ids` is blocked
    /// and handed to the refusals worker, or stays blocked if `key` is the refusals worker.
    pub(super) fn quarantine(
        &mut self,
        key: &WorkerKey,
        reason: &str,
        ids: Vec<u64>,
        crashes: usize,
        cause: &str,
    ) {
        let name = key.name();
        let window = self.opts.lifecycle.quarantine_window;
        let devices = self.device_labels(key);
        if *key == WorkerKey::Refused {
            error!(worker = %name, crashes, window = ?window, last_cause = %cause, devices = ?devices,
                   "worker quarantined: the refusals worker will not be restarted; its devices stay blocked (initiators wait) until `tcmu-warden quarantine lift {name}`");
        } else {
            error!(worker = %name, crashes, window = ?window, last_cause = %cause, devices = ?devices,
                   "worker quarantined: it will not be restarted; its devices are handed to the refusals worker and fail fast with NOT READY until `tcmu-warden quarantine lift {name}`");
        }
        for id in ids {
            // Held while the hand-over runs; the refusals worker's DeviceReady lifts it.
            self.block_device(id);
            if let Some(dev) = self.devices.get_mut(&id) {
                dev.phase = DevicePhase::Quarantined(reason.to_owned());
                dev.deadline = None;
                dev.reset_for_handover = false;
            }
            if self.park(id, key, reason) {
                self.assign(&WorkerKey::Refused, id, None);
            }
        }
    }

    /// Parks device `id` of the quarantined key `home` with the refusals worker (it is then
    /// assigned to it; the caller hands it over). False when `home` is the refusals worker
    /// itself: nothing else can answer for its devices.
    pub(super) fn park(&mut self, id: u64, home: &WorkerKey, reason: &str) -> bool {
        if *home == WorkerKey::Refused {
            return false;
        }
        let Some(dev) = self.devices.get_mut(&id) else {
            return false;
        };
        let refusal = fit_reason(format!(
            "{reason}; the device answers NOT READY until an operator runs `tcmu-warden quarantine lift {}`",
            home.name()
        ));
        let own = dev.spec.refusal.replace(refusal);
        if dev.parked.is_none() {
            dev.parked = Some(Parked {
                home: home.clone(),
                refusal: own,
            });
        }
        dev.spec.has_backing_fd = false;
        dev.worker = WorkerKey::Refused;
        warn!(device = %dev.dev.uio, backstore = %dev.dev.label(), worker = %home.name(),
              "device handed to the refusals worker while its worker is quarantined: its commands fail at once with NOT READY (02/04/03)");
        true
    }

    /// Moves device `id` to worker `target`: blocks it, has its current worker release it (the
    /// journal and the supervisor's uio descriptor are kept), and hands it over once released
    /// ([`Supervisor::release_done`]). A device the kernel is deleting is left to that.
    pub(super) fn release_to(&mut self, id: u64, target: WorkerKey) {
        if self
            .devices
            .get(&id)
            .is_none_or(|d| d.phase == DevicePhase::Removing)
        {
            return;
        }
        self.block_device(id);
        let Some(dev) = self.devices.get_mut(&id) else {
            return;
        };
        dev.move_to = Some(target);
        let key = dev.worker.clone();
        let uio = dev.dev.uio.clone();
        match dev.phase {
            // Released once its worker answers the AddDevice (see `on_device_ready`).
            DevicePhase::Sent => {}
            DevicePhase::Ready => {
                let sent = self
                    .workers
                    .get(&key)
                    .filter(|s| s.phase == WorkerPhase::Ready)
                    .map(|slot| slot.process.send(&ToWorker::RemoveDevice { id }));
                match sent {
                    Some(Ok(())) => {
                        if let Some(dev) = self.devices.get_mut(&id) {
                            dev.phase = DevicePhase::Removing;
                            dev.deadline =
                                Some(std::time::Instant::now() + self.opts.reply_timeout);
                        }
                        info!(device = %uio, worker = %key.name(), "asked the worker to release the device for its hand-over");
                    }
                    // Killing it orphans its devices, which completes this release.
                    Some(Err(err)) => {
                        self.kill_worker(&key, format!("sending RemoveDevice: {err}"))
                    }
                    None => self.release_done(id),
                }
            }
            _ => {
                if let Some(slot) = self.workers.get_mut(&key) {
                    slot.queue.retain(|(queued, _)| *queued != id);
                }
                self.release_done(id);
            }
        }
    }

    /// Device `id` was released by its worker (or the worker is gone): drop it, or, if it was
    /// released for a hand-over, give it to its next worker (still blocked, its journal intact).
    pub(super) fn release_done(&mut self, id: u64) {
        let target = self.devices.get_mut(&id).and_then(|d| d.move_to.take());
        let Some(target) = target else {
            self.drop_device(id);
            return;
        };
        let shutting_down = self.shutdown.is_some();
        let Some(dev) = self.devices.get_mut(&id) else {
            return;
        };
        dev.deadline = None;
        if shutting_down {
            // No new worker now; the device keeps its journal and stays blocked for the next
            // daemon.
            dev.phase = DevicePhase::Orphaned;
            return;
        }
        if dev.parked.as_ref().is_some_and(|p| p.home == target)
            && let Some(parked) = dev.parked.take()
        {
            dev.spec.refusal = parked.refusal;
        }
        dev.worker = target.clone();
        dev.phase = DevicePhase::Queued;
        info!(device = %dev.dev.uio, backstore = %dev.dev.label(), worker = %target.name(),
              "device released; handing it to its worker");
        let backing = self.reopen_backing(id);
        self.assign(&target, id, backing);
    }

    /// Lifts the quarantine of the worker called `name`: its crash window is cleared, a new
    /// worker is started, and its devices are taken back from the refusals worker and handed to
    /// it (see the module documentation).
    pub fn lift_quarantine(&mut self, name: &str) -> Result<LiftReport, LiftError> {
        if self.shutdown.is_some() {
            return Err(LiftError::ShuttingDown);
        }
        let named = |k: &&WorkerKey| k.name() == name;
        let quarantined = self
            .history
            .iter()
            .find(|(k, h)| k.name() == name && h.quarantined.is_some())
            .map(|(k, _)| k.clone());
        let Some(key) = quarantined else {
            let known = self
                .history
                .keys()
                .chain(self.workers.keys())
                .any(|k| named(&k));
            if known {
                return Err(LiftError::NotQuarantined(name.to_owned()));
            }
            let mut names: Vec<String> = self.workers.keys().map(WorkerKey::name).collect();
            names.sort();
            names.dedup();
            return Err(LiftError::UnknownWorker {
                name: name.to_owned(),
                known: if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                },
            });
        };
        let was = match self.history.get_mut(&key) {
            Some(h) => {
                h.crashes.clear();
                h.restart_at = None;
                h.lifts = h.lifts.saturating_add(1);
                h.quarantined.take().unwrap_or_default()
            }
            None => String::new(),
        };
        let ids: Vec<u64> = self
            .devices
            .iter()
            .filter(|(_, d)| {
                d.parked.as_ref().is_some_and(|p| p.home == key)
                    || (d.worker == key && matches!(d.phase, DevicePhase::Quarantined(_)))
            })
            .map(|(id, _)| *id)
            .collect();
        let devices: Vec<String> = ids
            .iter()
            .filter_map(|id| self.devices.get(id))
            .map(|d| format!("{} ({})", d.dev.uio, d.dev.label()))
            .collect();
        warn!(worker = %name, devices = ?devices, quarantine = %was,
              "quarantine lifted by the operator: the worker is started again and its devices are handed back to it");
        for &id in &ids {
            let parked_away = self
                .devices
                .get(&id)
                .is_some_and(|d| d.parked.is_some() && d.worker != key);
            if parked_away {
                self.release_to(id, key.clone());
            } else {
                if let Some(dev) = self.devices.get_mut(&id) {
                    dev.phase = DevicePhase::Queued;
                }
                let backing = self.reopen_backing(id);
                self.assign(&key, id, backing);
            }
        }
        Ok(LiftReport {
            worker: name.to_owned(),
            devices,
        })
    }
}
