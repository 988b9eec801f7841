//! # The completion handle: answering a command later, from any thread
//!
//! A [`Pending`] is one command handed to a handler: it owns the CDB, the data buffers and the
//! duty to answer. [`Pending::complete`] consumes it, so a command is answered at most once by
//! construction; dropping it unanswered answers it too (CHECK CONDITION, HARDWARE ERROR /
//! INTERNAL TARGET FAILURE, 04/44/00), so it is answered at least once. The data buffers are
//! released before the answer is passed on, because on the real data path they point into ring
//! pages the kernel reuses as soon as it sees the answer.
//!
//! [`DeviceBlock`] is the handler's switch to stop the device taking new commands (while its
//! backend reconnects, say) and to let it go on; see the crate documentation.
//!
//! The runtime (the worker, or a test harness) builds each [`Pending`] with a [`CompleteFn`],
//! the closure that carries the answer back to it; handlers never build one.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::buf::DataBuf;
use crate::command::{Command, CommandResult};

/// How a command's answer came about, for the runtime's logs and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The handler (or the emulation) called [`Pending::complete`].
    Completed,
    /// The [`Pending`] was dropped unanswered (the handler forgot it, lost it in a panic, or was
    /// itself dropped); the result is [`CommandResult::internal_error`].
    Dropped,
}

/// Carries a command's answer back to the runtime. Called exactly once, on whatever thread
/// answered the command; it must not block for long (the worker's sends to a channel and wakes
/// the worker's event-loop thread).
pub type CompleteFn = Box<dyn FnOnce(CommandResult, Answer) + Send>;

/// One command in a handler's hands, and the duty to answer it. See the module documentation.
///
/// `Pending` is [`Send`]: move it to a completion thread, a callback's context, a queue. It is
/// not [`Clone`]: one command, one answer.
pub struct Pending {
    cdb: Vec<u8>,
    data: DataBuf,
    bidi_in: Option<DataBuf>,
    block: DeviceBlock,
    done: Option<CompleteFn>,
}

impl fmt::Debug for Pending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pending")
            .field("cdb", &self.cdb)
            .field("data", &self.data)
            .field("bidi_in", &self.bidi_in)
            .field("answered", &self.done.is_none())
            .finish()
    }
}

impl Pending {
    /// A command for a handler, answered through `done`. For runtimes and test harnesses.
    pub fn new(
        cdb: Vec<u8>,
        data: DataBuf,
        bidi_in: Option<DataBuf>,
        block: DeviceBlock,
        done: CompleteFn,
    ) -> Pending {
        Pending {
            cdb,
            data,
            bidi_in,
            block,
            done: Some(done),
        }
    }

    /// The CDB.
    pub fn cdb(&self) -> &[u8] {
        &self.cdb
    }

    /// The opcode (CDB byte 0; 0 for an empty CDB, which the runtime never hands a handler).
    pub fn opcode(&self) -> u8 {
        self.cdb.first().copied().unwrap_or(0)
    }

    /// The data buffer: data-out to read from for writes, data-in to fill for reads.
    pub fn data(&self) -> &DataBuf {
        &self.data
    }

    /// The data buffer, to fill.
    pub fn data_mut(&mut self) -> &mut DataBuf {
        &mut self.data
    }

    /// For bidirectional commands, the data-in buffer (`data` then holds the data-out).
    pub fn bidi_in_mut(&mut self) -> Option<&mut DataBuf> {
        self.bidi_in.as_mut()
    }

    /// The command borrowed as a [`Command`], for code written against the synchronous shape.
    pub fn command(&mut self) -> Command<'_> {
        Command {
            cdb: &self.cdb,
            data: &mut self.data,
            bidi_in: self.bidi_in.as_mut(),
        }
    }

    /// The device's block switch (see [`DeviceBlock`]); a clone may be kept beyond this command.
    pub fn device_block(&self) -> DeviceBlock {
        self.block.clone()
    }

    /// Answers the command. Any thread; exactly once (this consumes the handle).
    pub fn complete(mut self, result: CommandResult) {
        self.answer(result, Answer::Completed);
    }

    fn answer(&mut self, result: CommandResult, how: Answer) {
        if let Some(done) = self.done.take() {
            // The buffers may point into pages the kernel reuses once it sees the answer.
            drop(std::mem::replace(&mut self.data, DataBuf::empty()));
            drop(self.bidi_in.take());
            done(result, how);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.answer(CommandResult::internal_error(), Answer::Dropped);
    }
}

/// What the runtime does when a handler blocks or unblocks its device.
pub trait BlockSwitch: Send + Sync {
    /// Stops (`true`) or resumes (`false`) taking new commands from the kernel.
    fn set_blocked(&self, blocked: bool);
    /// Whether the device is blocked.
    fn is_blocked(&self) -> bool;
}

/// A handler's switch to stop its device taking new commands, and to resume.
///
/// While a device is blocked the runtime fetches no new command from the ring: the kernel holds
/// them (in the ring, then in its own queue, subject to the device's `qfull_time_out`) and the
/// initiator waits, as it does for a device blocked through configfs. Commands already handed
/// out are still answered and delivered. Blocking is idempotent; any thread may call it.
#[derive(Clone)]
pub struct DeviceBlock {
    switch: Arc<dyn BlockSwitch>,
}

impl fmt::Debug for DeviceBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceBlock")
            .field("blocked", &self.is_blocked())
            .finish()
    }
}

/// A switch that only remembers its state: for harnesses with no ring to pause.
#[derive(Debug, Default)]
struct Detached(AtomicBool);

impl BlockSwitch for Detached {
    fn set_blocked(&self, blocked: bool) {
        self.0.store(blocked, Ordering::SeqCst);
    }
    fn is_blocked(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

impl DeviceBlock {
    /// The switch of a runtime.
    pub fn new(switch: Arc<dyn BlockSwitch>) -> DeviceBlock {
        DeviceBlock { switch }
    }

    /// A switch attached to nothing (it only remembers its state).
    pub fn detached() -> DeviceBlock {
        DeviceBlock::new(Arc::new(Detached::default()))
    }

    /// Stops the device taking new commands.
    pub fn block(&self) {
        self.switch.set_blocked(true);
    }

    /// Lets the device take new commands again.
    pub fn unblock(&self) {
        self.switch.set_blocked(false);
    }

    /// Whether the device is blocked.
    pub fn is_blocked(&self) -> bool {
        self.switch.is_blocked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sense::Sense;
    use std::sync::Mutex;

    type Log = Arc<Mutex<Vec<(CommandResult, Answer, usize)>>>;

    fn pending(log: &Log) -> Pending {
        let log = log.clone();
        Pending::new(
            vec![0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            DataBuf::zeroed(&[512]),
            None,
            DeviceBlock::detached(),
            Box::new(move |r, how| {
                let mut l = log.lock().unwrap();
                let n = l.len();
                l.push((r, how, n));
            }),
        )
    }

    #[test]
    fn complete_answers_once_with_the_result() {
        let log = Log::default();
        let mut p = pending(&log);
        assert_eq!(p.opcode(), 0x28);
        assert_eq!(p.data_mut().copy_from(0, b"abc"), 3);
        assert_eq!(&p.command().data.to_vec()[..3], b"abc");
        p.complete(CommandResult::good());
        let l = log.lock().unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(
            (l[0].0.clone(), l[0].1),
            (CommandResult::good(), Answer::Completed)
        );
    }

    #[test]
    fn a_dropped_handle_answers_internal_target_failure_once() {
        let log = Log::default();
        let p = pending(&log);
        let t = std::thread::spawn(move || drop(p));
        t.join().unwrap();
        let l = log.lock().unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].1, Answer::Dropped);
        assert_eq!(l[0].0.status, crate::status::CHECK_CONDITION);
        assert_eq!(l[0].0.sense, Some(Sense::new(0x04, 0x44, 0x00)));
    }

    #[test]
    fn the_block_switch_is_shared_by_clones() {
        let log = Log::default();
        let p = pending(&log);
        let b = p.device_block();
        assert!(!b.is_blocked());
        p.device_block().block();
        assert!(b.is_blocked());
        b.unblock();
        assert!(!p.device_block().is_blocked());
        p.complete(CommandResult::busy());
    }
}
