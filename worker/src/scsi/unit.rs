//! # The logical unit: the device state that commands share
//!
//! [`Emulator`] is one logical unit (LU, the SCSI name for a disk). This module holds its state
//! and the helpers every command module uses: the volatile write cache setting (**WCE**, write
//! cache enable: when set, completed writes may sit in a volatile cache until SYNCHRONIZE CACHE;
//! when clear, every write is durable before it completes), the capacity, the pending unit
//! attentions, the range lock that makes COMPARE AND WRITE atomic, the handler and its
//! capabilities, the copy bookkeeping ([`CopyRegistry`], [`CopyBook`], whose behaviour is in
//! `copy`), how a finished command's data-in is reported ([`Done`], [`data_in`]) and how a
//! handler error becomes sense data ([`Emulator::io_sense`]).
//!
//! It sits below every other file of the SCSI core: the command modules (`block`, `copy`,
//! `inquiry`, `misc`, `mode`), the table that names them (`table`) and the dispatcher
//! (`emulate`, which builds an [`Emulator`] and runs commands through the table) import it, and
//! it imports none of them, so the files form no import cycle.
//!
//! This module never panics on command input and never touches the ring.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, Weak};

use super::rangelock::RangeLock;
use tcmu_warden_sdk::sense::Sense;
use tcmu_warden_sdk::{BlockDoneFn, BlockOp, BlockRequest};
use tcmu_warden_sdk::{Command, CommandResult, DataBuf, Handler, HandlerCaps, Pending};

/// How an emulated command finished successfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// GOOD, no data-in.
    Good,
    /// GOOD with `transferred` bytes of data-in; `expected` is what the CDB asked for (after
    /// allocation-length truncation).
    DataIn {
        /// Bytes placed in the data-in buffer.
        transferred: usize,
        /// Bytes the command meant to transfer.
        expected: usize,
    },
}

/// Starts a command on the asynchronous block path and answers it through its handle, now or
/// when its block requests complete; or gives the command back, untouched, when it must run
/// blocking after all (see `block`). The name is the command's, for logs.
pub type StartFn = fn(&Emulator, Pending, &'static str) -> Option<Pending>;

/// The answer of an emulated command that ended with `r`; `data_len` is the size of its data
/// buffer (for the residual of a short data-in). Errors are logged at debug level.
pub(crate) fn command_result(
    device: &str,
    command: &'static str,
    r: Result<Done, Sense>,
    data_len: usize,
) -> CommandResult {
    match r {
        Ok(Done::Good) => CommandResult::good(),
        Err(s) => {
            tracing::debug!(
                device = %device,
                command,
                key = s.key,
                asc = s.asc,
                ascq = s.ascq,
                "check condition"
            );
            CommandResult::check(s)
        }
        Ok(Done::DataIn {
            transferred,
            expected,
        }) => {
            let mut r = CommandResult::good();
            if transferred < data_len || transferred < expected {
                r.read_len = Some(u32::try_from(transferred).unwrap_or(u32::MAX));
            }
            r
        }
    }
}

/// Copies `resp`, truncated to `alloc` bytes (the CDB's allocation length), into the data-in
/// buffer, and zero-fills whatever the buffer has beyond it so no stale bytes leave the device.
pub fn data_in(cmd: &mut Command<'_>, resp: &[u8], alloc: usize) -> Done {
    let n = resp.len().min(alloc);
    let copied = cmd.data.copy_from(0, resp.get(..n).unwrap_or_default());
    zero_tail(cmd.data, copied);
    Done::DataIn {
        transferred: copied,
        expected: n,
    }
}

/// Zero-fills `buf` from `from` to its end.
pub fn zero_tail(buf: &mut DataBuf, from: usize) {
    let len = buf.len();
    if from < len {
        buf.fill(from, len - from, 0);
    }
}

/// The error a dropped block request stands for: INTERNAL TARGET FAILURE once mapped.
pub(crate) fn dropped_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "block request dropped without completion",
    )
}

/// Which way an I/O went, for choosing its sense data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Reading the medium.
    Read,
    /// Writing, flushing or unmapping.
    Write,
}

/// Executes SCSI commands for one device. See the module documentation.
pub struct Emulator {
    pub(super) name: Arc<str>,
    pub(super) subtype: String,
    pub(super) serial: String,
    pub(super) block_size: u32,
    pub(super) max_sectors: u32,
    pub(super) handler: Arc<dyn Handler>,
    pub(super) refusal: Option<String>,
    pub(super) caps: HandlerCaps,
    pub(super) handler_ops: [bool; 256],
    /// The handler's [`Handler::nonblocking`], read once.
    pub(super) nonblocking: bool,
    pub(super) write_cache: AtomicBool,
    pub(super) dev_size: AtomicU64,
    pub(super) ua_pending: AtomicBool,
    pub(super) unit_attentions: Mutex<Vec<Sense>>,
    pub(super) ranges: Arc<RangeLock>,
    pub(super) designator: [u8; 16],
    pub(super) copy_registry: OnceLock<Weak<CopyRegistry>>,
    pub(super) copy_book: Mutex<CopyBook>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("name", &self.name)
            .field("subtype", &self.subtype)
            .field("block_size", &self.block_size)
            .field("refusal", &self.refusal)
            .finish_non_exhaustive()
    }
}

/// Finds the emulators of the devices this process serves by their NAA designator, so that an
/// EXTENDED COPY received by one device can read from or write to another.
///
/// It holds weak references: a device that stops serving (its emulator dropped) disappears from
/// the registry by itself, and registering a device again (after a restart, with the same unit
/// serial) replaces the old entry.
#[derive(Debug, Default)]
pub struct CopyRegistry {
    pub(super) devices: RwLock<HashMap<[u8; 16], Weak<Emulator>>>,
}

/// The outcome of a completed copy, as COPY STATUS reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Held {
    pub(super) list_id: u8,
    pub(super) segments: u16,
    pub(super) bytes: u64,
}

/// Per-device bookkeeping of copies: list identifiers in use, and held results.
#[derive(Debug, Default)]
pub struct CopyBook {
    pub(super) running: Vec<u8>,
    pub(super) held: VecDeque<Held>,
}

impl Emulator {
    /// Turns the volatile write cache on or off (the device's WCE setting changed).
    pub fn set_write_cache(&self, on: bool) {
        self.write_cache.store(on, Ordering::SeqCst);
    }

    /// The device now has `new_size_bytes` bytes: READ CAPACITY and range checks use the new
    /// size, and a CAPACITY DATA HAS CHANGED unit attention (06/2A/09) is queued.
    ///
    /// This does not call [`Handler::resize`]: the caller resizes the handler first (which can
    /// fail) and tells the emulator once that succeeded.
    pub fn resize(&self, new_size_bytes: u64) {
        self.dev_size.store(new_size_bytes, Ordering::SeqCst);
        self.queue_unit_attention(Sense::capacity_changed());
    }

    /// Queues a POWER ON, RESET, OR BUS DEVICE RESET OCCURRED unit attention (06/29/00); it
    /// supersedes any other pending unit attention, as a reset does.
    pub fn power_on_reset(&self) {
        let mut q = self.ua_queue();
        q.clear();
        q.push(Sense::power_on_reset());
        self.ua_pending.store(true, Ordering::SeqCst);
    }

    /// Why the policy refused this device, if it did.
    pub fn refusal(&self) -> Option<&str> {
        self.refusal.as_deref()
    }

    /// The device's NAA designator, as INQUIRY's Device Identification page (83h) reports it;
    /// EXTENDED COPY names its copy sources and destinations by it.
    pub fn designator(&self) -> [u8; 16] {
        self.designator
    }

    // ---- shared helpers for the command modules ----

    fn ua_queue(&self) -> std::sync::MutexGuard<'_, Vec<Sense>> {
        // A Vec of plain values cannot be left inconsistent by a panicking holder.
        self.unit_attentions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn queue_unit_attention(&self, s: Sense) {
        let mut q = self.ua_queue();
        if !q.contains(&s) {
            q.push(s);
        }
        self.ua_pending.store(true, Ordering::SeqCst);
    }

    /// Removes and returns the oldest pending unit attention.
    pub(crate) fn take_unit_attention(&self) -> Option<Sense> {
        if !self.ua_pending.load(Ordering::SeqCst) {
            return None;
        }
        let mut q = self.ua_queue();
        let s = (!q.is_empty()).then(|| q.remove(0));
        if q.is_empty() {
            self.ua_pending.store(false, Ordering::SeqCst);
        }
        s
    }

    /// Whether the handler executes `opcode` itself.
    pub(crate) fn handler_implements(&self, opcode: u8) -> bool {
        self.refusal.is_none()
            && self
                .handler_ops
                .get(usize::from(opcode))
                .copied()
                .unwrap_or(false)
    }

    pub(crate) fn handler(&self) -> &dyn Handler {
        self.handler.as_ref()
    }

    pub(crate) fn caps(&self) -> HandlerCaps {
        self.caps
    }

    pub(crate) fn ranges(&self) -> &RangeLock {
        &self.ranges
    }

    /// The range lock, for guards held across an asynchronous completion.
    pub(crate) fn ranges_arc(&self) -> &Arc<RangeLock> {
        &self.ranges
    }

    /// The handler, for continuations that submit a command's next block request.
    pub(crate) fn handler_arc(&self) -> &Arc<dyn Handler> {
        &self.handler
    }

    /// The device name, for continuations' logs.
    pub(crate) fn name_arc(&self) -> &Arc<str> {
        &self.name
    }

    /// Runs one block operation through [`Handler::submit_io`] and waits for it on this
    /// thread: the block I/O of the commands the emulation runs blocking (see `block`). The
    /// data are `buf[from..from + len]`; the buffer is lent to the request and put back (reads
    /// fill it). A dropped request is an error that [`Emulator::io_sense`] maps to INTERNAL
    /// TARGET FAILURE.
    fn wait_io(&self, op: BlockOp, buf: &mut DataBuf, from: usize, len: usize) -> io::Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let done: BlockDoneFn = Box::new(move |buf, r, how| {
            let r = match how {
                tcmu_warden_sdk::Answer::Completed => r,
                tcmu_warden_sdk::Answer::Dropped => Err(dropped_error()),
            };
            let _ = tx.send((buf, r));
        });
        let lent = std::mem::replace(buf, DataBuf::empty());
        self.handler
            .submit_io(BlockRequest::new(op, lent, from, len, done));
        match rx.recv() {
            Ok((back, r)) => {
                *buf = back;
                r
            }
            Err(_) => Err(dropped_error()),
        }
    }

    /// Reads `buf[from..from + len]` from device byte `offset`, waiting (see `wait_io`).
    pub(crate) fn io_read(
        &self,
        offset: u64,
        buf: &mut DataBuf,
        from: usize,
        len: usize,
    ) -> io::Result<()> {
        self.wait_io(BlockOp::Read { offset }, buf, from, len)
    }

    /// Writes `buf[from..from + len]` at device byte `offset`, waiting (see `wait_io`).
    pub(crate) fn io_write(
        &self,
        offset: u64,
        buf: &mut DataBuf,
        from: usize,
        len: usize,
        durable: bool,
    ) -> io::Result<()> {
        self.wait_io(BlockOp::Write { offset, durable }, buf, from, len)
    }

    /// Flushes, waiting (see `wait_io`).
    pub(crate) fn io_flush(&self) -> io::Result<()> {
        self.wait_io(BlockOp::Flush, &mut DataBuf::empty(), 0, 0)
    }

    /// Unmaps `[offset, offset + len)`, waiting (see `wait_io`).
    pub(crate) fn io_unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        self.wait_io(BlockOp::Unmap { offset, len }, &mut DataBuf::empty(), 0, 0)
    }

    /// The registry of the worker's devices this one joined (see [`CopyRegistry::register`]).
    pub(crate) fn copy_registry(&self) -> &OnceLock<Weak<CopyRegistry>> {
        &self.copy_registry
    }

    /// List identifiers of running copies and held copy results.
    pub(crate) fn copy_book(&self) -> &Mutex<CopyBook> {
        &self.copy_book
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn subtype(&self) -> &str {
        &self.subtype
    }

    pub(crate) fn serial(&self) -> &str {
        &self.serial
    }

    /// Logical block size in bytes (at least 1).
    pub(crate) fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Whole logical blocks on the device.
    pub(crate) fn num_blocks(&self) -> u64 {
        self.dev_size.load(Ordering::SeqCst) / u64::from(self.block_size)
    }

    /// Largest transfer in blocks (the device's `hw_max_sectors`; 0 there means no limit).
    pub(crate) fn max_transfer_blocks(&self) -> u32 {
        if self.max_sectors == 0 {
            u32::MAX
        } else {
            self.max_sectors
        }
    }

    /// Whether the volatile write cache is on (WCE=1).
    pub(crate) fn write_cache(&self) -> bool {
        self.write_cache.load(Ordering::SeqCst)
    }

    /// Checks that `[lba, lba+blocks)` lies on the medium; LBA OUT OF RANGE (05/21/00) if the
    /// first block does not exist or the range runs past the last block (or overflows).
    pub(crate) fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        let nb = self.num_blocks();
        match lba.checked_add(blocks) {
            Some(end) if lba < nb && end <= nb => Ok(()),
            _ => Err(Sense::lba_out_of_range()),
        }
    }

    /// Byte offset and length of `[lba, lba+blocks)` (callers range-check first, so these
    /// cannot overflow for a real device; saturating keeps it total anyway).
    pub(crate) fn byte_range(&self, lba: u64, blocks: u64) -> (u64, u64) {
        let bs = u64::from(self.block_size);
        (lba.saturating_mul(bs), blocks.saturating_mul(bs))
    }

    /// Maps a handler error to sense data, and logs it.
    ///
    /// - ENOSPC, EDQUOT (the backing store is full): DATA PROTECT / SPACE ALLOCATION FAILED
    ///   WRITE PROTECT (07/27/07), so thin-provisioning-aware initiators see "out of space";
    /// - EROFS: DATA PROTECT / WRITE PROTECTED (07/27/00);
    /// - ENOTCONN (a network backend stayed unreachable): NOT READY / ASYMMETRIC ACCESS STATE
    ///   TRANSITION (02/04/0A), a transport error to Linux, which multipath fails over on;
    /// - errors that say the request or the environment was wrong rather than the medium
    ///   (EINVAL, EBADF, EFAULT, ENOMEM, ENOSYS, EOPNOTSUPP, "unsupported"): HARDWARE ERROR /
    ///   INTERNAL TARGET FAILURE (04/44/00);
    /// - everything else (EIO and handler-specific errors): MEDIUM ERROR, UNRECOVERED READ ERROR
    ///   (03/11/00) on reads, WRITE ERROR (03/0C/00) on writes, flushes and unmaps.
    pub(crate) fn io_sense(&self, e: &io::Error, kind: IoKind, what: &'static str) -> Sense {
        io_sense(&self.name, e, kind, what)
    }
}

/// [`Emulator::io_sense`] for a continuation that holds only the device's name.
pub(crate) fn io_sense(name: &str, e: &io::Error, kind: IoKind, what: &'static str) -> Sense {
    {
        tracing::warn!(device = %name, op = what, error = %e, "handler I/O failed");
        let errno = e.raw_os_error();
        match (errno, e.kind()) {
            (Some(libc::ENOSPC | libc::EDQUOT), _) | (_, io::ErrorKind::StorageFull) => {
                Sense::space_allocation_failed()
            }
            (Some(libc::EROFS), _) | (_, io::ErrorKind::ReadOnlyFilesystem) => {
                Sense::write_protected()
            }
            // A network backend that stayed unreachable (the nbd handler's bounded wait).
            (Some(libc::ENOTCONN), _) => Sense::not_ready_transition(),
            (
                Some(
                    libc::EINVAL
                    | libc::EBADF
                    | libc::EFAULT
                    | libc::ENOMEM
                    | libc::ENOSYS
                    | libc::EOPNOTSUPP,
                ),
                _,
            )
            | (
                None,
                io::ErrorKind::Unsupported
                | io::ErrorKind::InvalidInput
                | io::ErrorKind::OutOfMemory,
            ) => Sense::internal_target_failure(),
            _ => match kind {
                IoKind::Read => Sense::read_error(),
                IoKind::Write => Sense::write_error(),
            },
        }
    }
}
