//! # Crash injection, for recovery tests
//!
//! A worker can die between any two instructions. To test recovery at the moments that matter,
//! the ring engine calls a *crash point* at each step of its journal protocol (see
//! [`super::journal`]). In normal builds a crash point does nothing. With the `crash-points`
//! feature (or in this crate's own tests) a `CrashPlan` installed with `Ring::set_crash_plan`
//! can make one of them fire: the engine then stops on the spot,
//! writes nothing more to the ring or the journal, and every later call returns
//! [`super::RingError::Crashed`], exactly as if the process had been killed there.
//!
//! This module owns the plan (which point fires, and when). It never touches shared memory.

#[cfg(any(test, feature = "crash-points"))]
use std::sync::Mutex;
#[cfg(any(test, feature = "crash-points"))]
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The places where the engine can be made to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CrashPoint {
    /// Fetch: the pending marker is stored, the journal slot not yet written.
    FetchPending,
    /// Fetch: the journal slot is live, the fetch position not yet committed.
    FetchJournaled,
    /// Fetch: the fetch position is committed, the command not yet handed to the runtime.
    FetchCommitted,
    /// A command's response is journaled, not yet written into the ring.
    ResponseJournaled,
    /// Completing at the tail: the journal marks the ring slot, the response is not written.
    CompletingMarked,
    /// A response is written into its ring slot; the tail is not moved yet.
    ResponseWritten,
    /// The tail was stored; the journal slots of the completed commands are not freed yet.
    TailStored,
    /// One journal slot of a completed batch was freed (others may not be).
    SlotReleased,
    /// The runtime's loop, between batches (a crash while idle).
    LoopTop,
}

impl CrashPoint {
    /// Every point, for coverage checks.
    pub const ALL: [CrashPoint; 9] = [
        CrashPoint::FetchPending,
        CrashPoint::FetchJournaled,
        CrashPoint::FetchCommitted,
        CrashPoint::ResponseJournaled,
        CrashPoint::CompletingMarked,
        CrashPoint::ResponseWritten,
        CrashPoint::TailStored,
        CrashPoint::SlotReleased,
        CrashPoint::LoopTop,
    ];
}

/// When to crash: at the `after`-th hit (counting from 1) of `target` (or of any point when
/// `target` is `None`), or at the next hit of any point once [`CrashPlan::kill_now`] was called.
#[cfg(any(test, feature = "crash-points"))]
#[derive(Debug)]
pub struct CrashPlan {
    target: Option<CrashPoint>,
    countdown: AtomicU64,
    now: AtomicBool,
    fired: Mutex<Option<CrashPoint>>,
}

#[cfg(any(test, feature = "crash-points"))]
impl CrashPlan {
    /// A plan that fires at the `after`-th hit of `target` (any point if `None`).
    pub fn new(target: Option<CrashPoint>, after: u64) -> CrashPlan {
        CrashPlan {
            target,
            countdown: AtomicU64::new(after.max(1)),
            now: AtomicBool::new(false),
            fired: Mutex::new(None),
        }
    }

    /// Makes the next crash point of any kind fire.
    pub fn kill_now(&self) {
        self.now.store(true, Ordering::SeqCst);
    }

    /// Where the plan fired, if it did.
    pub fn fired(&self) -> Option<CrashPoint> {
        *self
            .fired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Called at each crash point; true when the engine must stop here.
    pub(crate) fn hit(&self, p: CrashPoint) -> bool {
        let mut fired = self
            .fired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if fired.is_some() {
            return false;
        }
        let due = if self.now.load(Ordering::SeqCst) {
            true
        } else if self.target.is_none_or(|t| t == p) {
            self.countdown.fetch_sub(1, Ordering::SeqCst) == 1
        } else {
            false
        };
        if due {
            *fired = Some(p);
        }
        due
    }
}
