//! # The dispatcher: one device's emulated SCSI target
//!
//! [`Emulator`] executes the commands of one logical unit (LU, the SCSI name for a disk). Its
//! [`Emulator::execute`] runs concurrently on several threads and, per command:
//! 1. refuses everything but INQUIRY, REPORT LUNS and REQUEST SENSE when the policy refused the
//!    device (NOT READY, 02/04/03), so initiators fail fast instead of timing out;
//! 2. reports a pending **unit attention** (UA: sense key 6, a one-time notice that something
//!    about the LU changed, such as a reset or a new capacity) instead of executing the command,
//!    unless the command is INQUIRY, REPORT LUNS or REQUEST SENSE;
//! 3. hands the command to the handler if the handler implements its opcode itself;
//! 4. otherwise finds the command in the table ([`super::table`]), rejects bits set outside the
//!    command's CDB usage mask, and runs its emulation.
//!
//! Device state that commands share lives here: the volatile write cache setting (**WCE**, write
//! cache enable: when set, completed writes may sit in a volatile cache until SYNCHRONIZE CACHE;
//! when clear, every write is durable before it completes), the capacity, the pending unit
//! attentions, and the range lock that makes COMPARE AND WRITE atomic.
//!
//! This module never panics on command input and never touches the ring; errors become sense data.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use super::cdb::{Cdb, check_usage};
use super::copy::{CopyBook, CopyRegistry};
use super::inquiry;
use super::rangelock::RangeLock;
use super::sense::Sense;
use super::table::{self, Avail, OpDesc};
use super::{Command, CommandResult};
use crate::handler::{DeviceConfig, Handler, HandlerCaps};
use crate::iobuf::DataBuf;

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

/// Which way an I/O went, for choosing its sense data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Reading the medium.
    Read,
    /// Writing, flushing or unmapping.
    Write,
}

/// Stands in for a handler on refused devices; never called, since refused devices execute only
/// commands that need no handler.
struct NoHandler;

impl Handler for NoHandler {
    fn read(&self, _offset: u64, _bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn write(&self, _offset: u64, _bufs: &[io::IoSlice<'_>], _durable: bool) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn flush(&self) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// Executes SCSI commands for one device. See the module documentation.
pub struct Emulator {
    name: String,
    subtype: String,
    serial: String,
    block_size: u32,
    max_sectors: u32,
    handler: Arc<dyn Handler>,
    refusal: Option<String>,
    caps: HandlerCaps,
    handler_ops: [bool; 256],
    write_cache: AtomicBool,
    dev_size: AtomicU64,
    ua_pending: AtomicBool,
    unit_attentions: Mutex<Vec<Sense>>,
    ranges: RangeLock,
    designator: [u8; 16],
    copy_registry: OnceLock<Weak<CopyRegistry>>,
    copy_book: Mutex<CopyBook>,
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

impl Emulator {
    /// An emulator for one device served by `handler`.
    ///
    /// The handler's [`Handler::caps`] and [`Handler::implemented_opcodes`] are read once, here.
    pub fn new(cfg: &DeviceConfig, handler: Arc<dyn Handler>) -> Emulator {
        let caps = handler.caps();
        let mut handler_ops = [false; 256];
        for &op in handler.implemented_opcodes() {
            if let Some(slot) = handler_ops.get_mut(usize::from(op)) {
                *slot = true;
            }
        }
        let designator = inquiry::naa_designator(&inquiry::serial_of(&cfg.unit_serial, &cfg.name));
        Emulator {
            name: cfg.name.clone(),
            subtype: cfg.subtype.clone(),
            serial: cfg.unit_serial.clone(),
            // Guard against a zero block size (the protocol validates it; the math must not
            // divide by zero regardless).
            block_size: cfg.block_size.max(1),
            max_sectors: cfg.max_sectors,
            handler,
            refusal: None,
            caps,
            handler_ops,
            write_cache: AtomicBool::new(cfg.write_cache),
            dev_size: AtomicU64::new(cfg.dev_size),
            ua_pending: AtomicBool::new(false),
            unit_attentions: Mutex::new(Vec::new()),
            ranges: RangeLock::new(),
            designator,
            copy_registry: OnceLock::new(),
            copy_book: Mutex::new(CopyBook::default()),
        }
    }

    /// An emulator for a device the policy refused: INQUIRY, REPORT LUNS and REQUEST SENSE
    /// answer as usual (REQUEST SENSE reports the NOT READY condition); every other command ends
    /// in CHECK CONDITION, NOT READY / LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED
    /// (02/04/03). `why` is kept for logs.
    pub fn refused(cfg: &DeviceConfig, why: &str) -> Emulator {
        let mut e = Emulator::new(cfg, Arc::new(NoHandler));
        e.refusal = Some(why.to_owned());
        e
    }

    /// Executes one command. Safe to call concurrently from several threads.
    pub fn execute(&self, cmd: &mut Command<'_>) -> CommandResult {
        self.execute_inner(cmd, true)
    }

    /// Executes a command that a previous worker had already accepted and that crash recovery
    /// runs again. It was issued before the restart, so a pending unit attention (the restart's
    /// power-on reset) is left for the next new command instead of failing this one.
    pub fn execute_replayed(&self, cmd: &mut Command<'_>) -> CommandResult {
        self.execute_inner(cmd, false)
    }

    fn execute_inner(&self, cmd: &mut Command<'_>, report_ua: bool) -> CommandResult {
        let bytes = cmd.cdb;
        let Some(&opcode) = bytes.first() else {
            return CommandResult::invalid_opcode();
        };
        let housekeeping = table::is_housekeeping(opcode);
        if !housekeeping {
            if self.refusal.is_some() {
                return CommandResult::check(Sense::not_ready_manual_intervention());
            }
            if let Some(ua) = report_ua.then(|| self.take_unit_attention()).flatten() {
                tracing::debug!(device = %self.name, opcode, asc = ua.asc, ascq = ua.ascq, "reporting unit attention");
                return CommandResult::check(ua);
            }
        }
        if self.handler_implements(opcode) {
            return self.handler.execute(cmd);
        }
        let cdb = Cdb::new(bytes);
        let desc = match table::lookup(&cdb, |o| self.offers(o)) {
            Ok(d) => d,
            Err(s) => return CommandResult::check(s),
        };
        // From here on the command's own view: without the former SCSI-2 LUN field for the
        // commands that ignore it (see the table's module docs).
        let cdb = desc.view(cdb);
        if bytes.len() < desc.cdb_len() {
            return CommandResult::check(Sense::invalid_field_in_cdb(0, None));
        }
        if let Err(s) = check_usage(&cdb, desc.usage, desc.sa.is_some(), desc.splits) {
            return CommandResult::check(s);
        }
        match (desc.exec)(self, cmd, cdb) {
            Ok(Done::Good) => CommandResult::good(),
            Err(s) => {
                tracing::debug!(
                    device = %self.name,
                    command = desc.name,
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
                if transferred < cmd.data.len() || transferred < expected {
                    r.read_len = Some(u32::try_from(transferred).unwrap_or(u32::MAX));
                }
                r
            }
        }
    }

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

    /// Whether the table entry is offered on this device.
    pub(crate) fn offers(&self, o: &OpDesc) -> bool {
        match o.avail {
            Avail::Always => true,
            Avail::Unmap => self.caps.unmap,
        }
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
    /// - errors that say the request or the environment was wrong rather than the medium
    ///   (EINVAL, EBADF, EFAULT, ENOMEM, ENOSYS, EOPNOTSUPP, "unsupported"): HARDWARE ERROR /
    ///   INTERNAL TARGET FAILURE (04/44/00);
    /// - everything else (EIO and handler-specific errors): MEDIUM ERROR, UNRECOVERED READ ERROR
    ///   (03/11/00) on reads, WRITE ERROR (03/0C/00) on writes, flushes and unmaps.
    pub(crate) fn io_sense(&self, e: &io::Error, kind: IoKind, what: &'static str) -> Sense {
        tracing::warn!(device = %self.name, op = what, error = %e, "handler I/O failed");
        let errno = e.raw_os_error();
        match (errno, e.kind()) {
            (Some(libc::ENOSPC | libc::EDQUOT), _) | (_, io::ErrorKind::StorageFull) => {
                Sense::space_allocation_failed()
            }
            (Some(libc::EROFS), _) | (_, io::ErrorKind::ReadOnlyFilesystem) => {
                Sense::write_protected()
            }
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
