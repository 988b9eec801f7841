//! # Block requests: asynchronous block I/O under the SCSI emulation
//!
//! A [`BlockRequest`] is one block-level operation the worker's SCSI emulation asks of a handler
//! through [`crate::Handler::submit_io`]: read bytes into a buffer, write bytes from one, flush,
//! or unmap a byte range ([`BlockOp`]). The emulation has already decoded and checked the SCSI
//! command (ranges, transfer length, FUA and the write cache's durability, reserved bits); the
//! handler only moves bytes. The request owns the data buffer and the duty to complete it, with
//! the same rules as a [`crate::Pending`]:
//! - [`BlockRequest::complete`] consumes it, so it completes at most once; dropping it
//!   unanswered completes it too, as [`Answer::Dropped`], which the emulation answers with CHECK
//!   CONDITION, HARDWARE ERROR / INTERNAL TARGET FAILURE (04/44/00): never a hang;
//! - it is [`Send`]: complete it from any thread (a library callback, a reply reader, an
//!   io_uring completion loop);
//! - the data buffer belongs to the request until it completes: fill a read's bytes before
//!   completing, and do not keep pointers into it afterwards (on the real data path it is the
//!   kernel's ring memory, reused as soon as the command is answered).
//!
//! The runtime builds each request with a [`BlockDoneFn`], the emulation's continuation, which
//! gets the buffer back with the outcome; handlers never build one.
//! [`run_blocking`] is what the default [`crate::Handler::submit_io`] does: the operation on
//! the handler's blocking methods, completed before it returns.

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};

use crate::buf::DataBuf;
use crate::completion::Answer;
use crate::handler::Handler;

/// What a [`BlockRequest`] asks for. Offsets and lengths are in bytes on the device; the
/// emulation only issues whole logical blocks inside the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOp {
    /// Fill the request's buffer ([`BlockRequest::len`] bytes) from byte `offset`; every byte,
    /// zeros beyond the end of a shorter backing store.
    Read {
        /// Device byte offset.
        offset: u64,
    },
    /// Write the request's buffer at byte `offset`. With `durable`, complete only once the
    /// data would survive a power loss (the device has no volatile write cache, or the
    /// initiator set FUA, "force unit access").
    Write {
        /// Device byte offset.
        offset: u64,
        /// Complete only once durable.
        durable: bool,
    },
    /// Make every write completed before this request was submitted durable (SYNCHRONIZE
    /// CACHE, and after UNMAP on a device without a write cache).
    Flush,
    /// Deallocate `[offset, offset + len)`; afterwards it reads as zeros if
    /// [`crate::HandlerCaps::unmap_reads_zero`]. Only issued when [`crate::HandlerCaps::unmap`]
    /// is set.
    Unmap {
        /// Device byte offset.
        offset: u64,
        /// Bytes to deallocate.
        len: u64,
    },
}

/// The emulation's continuation of a [`BlockRequest`]: gets the data buffer back with the
/// outcome and how it came about. Called exactly once, on the completing thread; it must not
/// block for long.
pub type BlockDoneFn = Box<dyn FnOnce(DataBuf, io::Result<()>, Answer) + Send>;

/// One block operation in a handler's hands, and the duty to complete it. See the module
/// documentation.
pub struct BlockRequest {
    op: BlockOp,
    buf: DataBuf,
    buf_off: usize,
    len: usize,
    done: Option<BlockDoneFn>,
}

impl fmt::Debug for BlockRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockRequest")
            .field("op", &self.op)
            .field("len", &self.len)
            .field("completed", &self.done.is_none())
            .finish()
    }
}

impl BlockRequest {
    /// A request whose data are bytes `[buf_off, buf_off + len)` of `buf` (clipped to the
    /// buffer; empty for [`BlockOp::Flush`] and [`BlockOp::Unmap`]), completed through `done`.
    /// For runtimes and test harnesses.
    pub fn new(
        op: BlockOp,
        buf: DataBuf,
        buf_off: usize,
        len: usize,
        done: BlockDoneFn,
    ) -> BlockRequest {
        let len = match op {
            BlockOp::Read { .. } | BlockOp::Write { .. } => {
                len.min(buf.len().saturating_sub(buf_off))
            }
            BlockOp::Flush | BlockOp::Unmap { .. } => 0,
        };
        BlockRequest {
            op,
            buf,
            buf_off,
            len,
            done: Some(done),
        }
    }

    /// The operation.
    pub fn op(&self) -> BlockOp {
        self.op
    }

    /// Bytes of data the request reads or writes (0 for flush and unmap).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the request carries no data.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The request's data as I/O slices: what a write writes (for `pwritev`-style calls).
    pub fn io_slices(&self) -> Vec<IoSlice<'_>> {
        self.buf.io_slices(self.buf_off, self.len)
    }

    /// The request's data as mutable I/O slices: what a read fills (for `preadv`-style calls).
    pub fn io_slices_mut(&mut self) -> Vec<IoSliceMut<'_>> {
        self.buf.io_slices_mut(self.buf_off, self.len)
    }

    /// Copies `src` into the request's data from byte `at` (a read's result); returns how many
    /// bytes fit.
    pub fn copy_in(&mut self, at: usize, src: &[u8]) -> usize {
        let room = self.len.saturating_sub(at);
        let src = src.get(..room.min(src.len())).unwrap_or_default();
        self.buf.copy_from(self.buf_off.saturating_add(at), src)
    }

    /// Copies the request's data from byte `at` into `dst` (a write's data); returns how many
    /// bytes were copied.
    pub fn copy_out(&self, at: usize, dst: &mut [u8]) -> usize {
        let room = self.len.saturating_sub(at);
        let n = room.min(dst.len());
        match dst.get_mut(..n) {
            Some(d) => self.buf.copy_to(self.buf_off.saturating_add(at), d),
            None => 0,
        }
    }

    /// Completes the request. Any thread; exactly once (this consumes the handle).
    pub fn complete(mut self, result: io::Result<()>) {
        self.finish(result, Answer::Completed);
    }

    fn finish(&mut self, result: io::Result<()>, how: Answer) {
        if let Some(done) = self.done.take() {
            let buf = std::mem::replace(&mut self.buf, DataBuf::empty());
            done(buf, result, how);
        }
    }
}

impl Drop for BlockRequest {
    fn drop(&mut self) {
        self.finish(
            Err(io::Error::other("block request dropped without completion")),
            Answer::Dropped,
        );
    }
}

/// Runs `req` on the handler's blocking methods ([`Handler::read`], [`Handler::write`],
/// [`Handler::flush`], [`Handler::unmap`]) and completes it before returning: what the default
/// [`Handler::submit_io`] does.
pub fn run_blocking<H: Handler + ?Sized>(handler: &H, mut req: BlockRequest) {
    let result = match req.op {
        BlockOp::Read { offset } => {
            let mut slices = req.io_slices_mut();
            handler.read(offset, &mut slices)
        }
        BlockOp::Write { offset, durable } => handler.write(offset, &req.io_slices(), durable),
        BlockOp::Flush => handler.flush(),
        BlockOp::Unmap { offset, len } => handler.unmap(offset, len),
    };
    req.complete(result);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    type Log = Arc<Mutex<Vec<(Vec<u8>, bool, Answer)>>>;

    fn request(op: BlockOp, buf: DataBuf, off: usize, len: usize, log: &Log) -> BlockRequest {
        let log = log.clone();
        BlockRequest::new(
            op,
            buf,
            off,
            len,
            Box::new(move |b, r, how| log.lock().unwrap().push((b.to_vec(), r.is_ok(), how))),
        )
    }

    #[test]
    fn a_read_fills_only_its_window_and_completes_once() {
        let log = Log::default();
        let mut r = request(
            BlockOp::Read { offset: 0 },
            DataBuf::zeroed(&[3, 5]),
            2,
            4,
            &log,
        );
        assert_eq!(r.len(), 4);
        assert_eq!(r.copy_in(0, b"abcdefg"), 4);
        r.complete(Ok(()));
        let l = log.lock().unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0], (b"\0\0abcd\0\0".to_vec(), true, Answer::Completed));
    }

    #[test]
    fn a_dropped_request_completes_as_dropped_with_an_error() {
        let log = Log::default();
        let r = request(
            BlockOp::Write {
                offset: 0,
                durable: true,
            },
            DataBuf::from_segments(vec![b"xyz".to_vec()]),
            0,
            99,
            &log,
        );
        assert_eq!(r.len(), 3);
        let mut out = [0u8; 8];
        assert_eq!(r.copy_out(1, &mut out), 2);
        std::thread::spawn(move || drop(r)).join().unwrap();
        let l = log.lock().unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0], (b"xyz".to_vec(), false, Answer::Dropped));
    }
}
