//! # Block range lock
//!
//! COMPARE AND WRITE must be atomic: between reading the blocks to compare and writing the new
//! data, no other write may change any of those blocks. Commands run concurrently on several
//! threads, so every command that modifies blocks takes a lock on the block range it touches:
//! ordinary writes take it *shared* (they may overlap each other, as SCSI promises no order
//! between concurrent writes), COMPARE AND WRITE takes it *exclusive*. A waiting exclusive
//! request holds back new overlapping shared requests, so a stream of writes cannot starve it.
//!
//! A command on the asynchronous block path keeps its lock after its I/O thread has moved on:
//! it takes an [`OwnedRangeGuard`] (which holds the lock through an `Arc`), moves it into the
//! block request's continuation, and releases it when the request completes (or is dropped),
//! so the guarantees hold until the handler has really finished the I/O. Taking a lock may
//! wait (on the I/O thread) for an overlapping exclusive holder; releasing never waits.
//!
//! This module owns only that bookkeeping; it never does I/O and never blocks non-overlapping
//! ranges against each other.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

#[derive(Debug, Clone, Copy)]
struct Entry {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
    /// Still waiting (only exclusive requests are recorded while waiting).
    waiting: bool,
}

impl Entry {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    entries: Vec<Entry>,
}

impl State {
    /// Records a request for `[start, end)` after every earlier one; returns its id.
    fn push(&mut self, start: u64, end: u64, exclusive: bool, waiting: bool) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.entries.push(Entry {
            id,
            start,
            end,
            exclusive,
            waiting,
        });
        id
    }
}

/// Shared/exclusive locks on half-open block ranges `[start, end)`.
#[derive(Debug, Default)]
pub struct RangeLock {
    state: Mutex<State>,
    changed: Condvar,
}

/// Holds a range until dropped.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: Option<u64>,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.lock.release(id);
        }
    }
}

/// Holds a range until dropped, keeping the lock alive itself: for a lock held across an
/// asynchronous completion on another thread.
#[derive(Debug)]
pub struct OwnedRangeGuard {
    lock: Arc<RangeLock>,
    id: Option<u64>,
}

impl Drop for OwnedRangeGuard {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.lock.release(id);
        }
    }
}

impl RangeLock {
    /// A lock with nothing held.
    pub fn new() -> RangeLock {
        RangeLock::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked (entries are only pushed and
        // retained under the lock), so a poisoned mutex is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a holder to release (same poisoning argument as [`RangeLock::state`]).
    fn wait<'a>(&self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed
            .wait(st)
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn release(&self, id: u64) {
        let mut st = self.state();
        st.entries.retain(|e| e.id != id);
        drop(st);
        self.changed.notify_all();
    }

    /// A guard for request `id` (`None`: an empty range, which holds nothing).
    fn guard(&self, id: Option<u64>) -> RangeGuard<'_> {
        RangeGuard { lock: self, id }
    }

    /// Locks `[start, end)` shared: waits for overlapping exclusive holders and waiters.
    pub fn shared(&self, start: u64, end: u64) -> RangeGuard<'_> {
        self.guard(self.lock_shared(start, end))
    }

    /// Locks `[start, end)` shared, as [`RangeLock::shared`], with a guard that owns a
    /// reference to the lock.
    pub fn shared_owned(self: &Arc<Self>, start: u64, end: u64) -> OwnedRangeGuard {
        OwnedRangeGuard {
            id: self.lock_shared(start, end),
            lock: self.clone(),
        }
    }

    fn lock_shared(&self, start: u64, end: u64) -> Option<u64> {
        if start >= end {
            return None;
        }
        let mut st = self.state();
        while st
            .entries
            .iter()
            .any(|e| e.exclusive && e.overlaps(start, end))
        {
            st = self.wait(st);
        }
        Some(st.push(start, end, false, false))
    }

    /// Locks `[start, end)` exclusively: waits for every overlapping holder, and for overlapping
    /// exclusive requests that queued earlier.
    pub fn exclusive(&self, start: u64, end: u64) -> RangeGuard<'_> {
        if start >= end {
            return self.guard(None);
        }
        let mut st = self.state();
        let id = st.push(start, end, true, true);
        // Entries are kept in arrival order, so "queued earlier" is "appears before ours".
        loop {
            let blocked = st
                .entries
                .iter()
                .take_while(|e| e.id != id)
                .any(|e| e.overlaps(start, end) && (!e.waiting || e.exclusive))
                || st
                    .entries
                    .iter()
                    .skip_while(|e| e.id != id)
                    .skip(1)
                    .any(|e| !e.waiting && e.overlaps(start, end));
            if !blocked {
                break;
            }
            st = self.wait(st);
        }
        if let Some(e) = st.entries.iter_mut().find(|e| e.id == id) {
            e.waiting = false;
        }
        self.guard(Some(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn shared_ranges_coexist_and_disjoint_exclusive_does_not_wait() {
        let l = RangeLock::new();
        let _a = l.shared(0, 10);
        let _b = l.shared(5, 15);
        let _c = l.exclusive(15, 20);
        let _d = l.exclusive(7, 7); // empty range: never waits
    }

    #[test]
    fn exclusive_waits_for_overlapping_shared_and_blocks_new_shared() {
        let l = Arc::new(RangeLock::new());
        let held = l.shared(0, 10);
        let got_excl = Arc::new(AtomicBool::new(false));
        let t = {
            let (l, got) = (l.clone(), got_excl.clone());
            std::thread::spawn(move || {
                let _g = l.exclusive(9, 12);
                got.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                got.store(false, Ordering::SeqCst);
            })
        };
        // The exclusive request is queued once it appears in the state.
        wait_until("exclusive request queued", || {
            l.state().entries.iter().any(|e| e.exclusive)
        });
        assert!(!got_excl.load(Ordering::SeqCst));
        // A new overlapping shared request must wait behind the queued exclusive one, and when
        // it gets the lock the exclusive holder has already finished.
        let t2 = {
            let (l, got) = (l.clone(), got_excl.clone());
            std::thread::spawn(move || {
                let _g = l.shared(11, 11 + 1);
                assert!(
                    !got.load(Ordering::SeqCst),
                    "shared overlapped an exclusive holder"
                );
            })
        };
        drop(held);
        t.join().unwrap();
        t2.join().unwrap();
        assert!(l.state().entries.is_empty());
    }

    #[test]
    fn an_owned_shared_guard_holds_off_exclusive_until_dropped_on_another_thread() {
        let l = Arc::new(RangeLock::new());
        let g = l.shared_owned(0, 8);
        let got = Arc::new(AtomicBool::new(false));
        let t = {
            let (l, got) = (l.clone(), got.clone());
            std::thread::spawn(move || {
                let _x = l.exclusive(4, 5);
                got.store(true, Ordering::SeqCst);
            })
        };
        wait_until("exclusive request queued", || {
            l.state().entries.iter().any(|e| e.exclusive)
        });
        assert!(!got.load(Ordering::SeqCst));
        std::thread::spawn(move || drop(g)).join().unwrap();
        t.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
        assert!(l.state().entries.is_empty());
    }
}
