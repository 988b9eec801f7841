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
//! The device state that commands share lives in `unit`, below every command module; this file
//! is the top of the SCSI core's imports (it uses `table`, which uses the command modules).
//!
//! This module never panics on command input and never touches the ring; errors become sense data.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock};

use super::cdb::{Cdb, check_usage, op};
use super::inquiry;
use super::rangelock::RangeLock;
use super::table;
use super::unit::{CopyBook, Emulator, command_result};
use tcmu_warden_sdk::sense::Sense;
use tcmu_warden_sdk::{Command, CommandResult};
use tcmu_warden_sdk::{DeviceConfig, Handler, Pending};

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

impl Emulator {
    /// An emulator for one device served by `handler`.
    ///
    /// The handler's [`Handler::caps`] and [`Handler::implemented_opcodes`] are read once, here.
    pub fn new(cfg: &DeviceConfig, handler: Arc<dyn Handler>) -> Emulator {
        let caps = handler.caps();
        let nonblocking = handler.nonblocking();
        let mut handler_ops = [false; 256];
        for &op in handler.implemented_opcodes() {
            if let Some(slot) = handler_ops.get_mut(usize::from(op)) {
                *slot = true;
            }
        }
        let designator = inquiry::naa_designator(&inquiry::serial_of(&cfg.unit_serial, &cfg.name));
        Emulator {
            name: Arc::from(cfg.name.as_str()),
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
            nonblocking,
            write_cache: AtomicBool::new(cfg.write_cache),
            dev_size: AtomicU64::new(cfg.dev_size),
            ua_pending: AtomicBool::new(false),
            unit_attentions: Mutex::new(Vec::new()),
            ranges: Arc::new(RangeLock::new()),
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

    /// Executes one command, blocking until it is done. Safe to call concurrently from several
    /// threads. A command the handler implements itself runs through its blocking
    /// [`Handler::execute`]; the runtime uses [`Emulator::submit`] instead.
    pub fn execute(&self, cmd: &mut Command<'_>) -> CommandResult {
        self.execute_inner(cmd, true)
    }

    /// Executes a command that a previous worker had already accepted and that crash recovery
    /// runs again. It was issued before the restart, so a pending unit attention (the restart's
    /// power-on reset) is left for the next new command instead of failing this one.
    pub fn execute_replayed(&self, cmd: &mut Command<'_>) -> CommandResult {
        self.execute_inner(cmd, false)
    }

    /// Starts one command and answers it through its completion handle: a command the handler
    /// implements goes to [`Handler::submit`] (which may answer later, from another thread);
    /// every other one is emulated here, on the calling thread, and answered before this
    /// returns. `replayed` as in [`Emulator::execute_replayed`].
    pub fn submit(&self, cmd: Pending, replayed: bool) {
        match self.admit(cmd.cdb(), !replayed) {
            Err(r) => cmd.complete(r),
            Ok(opcode) if self.handler_implements(opcode) => self.handler.submit(cmd),
            Ok(_) => self.emulate_pending(cmd),
        }
    }

    /// Whether [`Emulator::submit`] of `cdb` returns without waiting for anything slow, so that
    /// the runtime may run it on its event-loop thread: commands answered from the emulation's
    /// own state (TEST UNIT READY, INQUIRY, MODE SENSE, READ CAPACITY, REPORT LUNS...), commands
    /// refused before they reach the handler, every command of a refused device, and, when the
    /// handler declares itself [`Handler::nonblocking`], the commands on the asynchronous block
    /// path (READ, WRITE, SYNCHRONIZE CACHE, UNMAP...) and those it implements itself. Commands
    /// the emulation runs blocking over several requests (COMPARE AND WRITE, VERIFY, a WRITE
    /// SAME that writes, FORMAT UNIT, EXTENDED COPY, GET LBA STATUS) never qualify: they may
    /// wait on a range lock or for another device. Reads only the CDB and never panics.
    pub fn runs_inline(&self, cdb: &[u8]) -> bool {
        let Some(&opcode) = cdb.first() else {
            return true;
        };
        if self.refusal.is_some() {
            return true;
        }
        if self.handler_implements(opcode) {
            return self.nonblocking;
        }
        let sa = cdb.get(1).map(|b| b & crate::scsi::cdb::SA_MASK);
        let own_state = match opcode {
            op::TEST_UNIT_READY
            | op::REQUEST_SENSE
            | op::INQUIRY
            | op::MODE_SENSE_6
            | op::MODE_SENSE_10
            | op::READ_CAPACITY_10
            | op::PREVENT_ALLOW_MEDIUM_REMOVAL
            | op::READ_DEFECT_DATA_10
            | op::READ_DEFECT_DATA_12
            | op::REPORT_LUNS
            | op::RECEIVE_COPY_RESULTS => true,
            op::SERVICE_ACTION_IN_16 => sa == Some(op::SA_READ_CAPACITY_16),
            op::MAINTENANCE_IN => sa == Some(op::SA_REPORT_SUPPORTED_OPCODES),
            _ => false,
        };
        if own_state {
            return true;
        }
        match table::lookup(&Cdb::new(cdb), |o| self.offers(o)) {
            // Refused at decoding: answered with sense data at once.
            Err(_) => true,
            Ok(desc) => self.nonblocking && desc.start.is_some(),
        }
    }

    fn execute_inner(&self, cmd: &mut Command<'_>, report_ua: bool) -> CommandResult {
        match self.admit(cmd.cdb, report_ua) {
            Err(r) => r,
            Ok(opcode) if self.handler_implements(opcode) => self.handler.execute(cmd),
            Ok(_) => self.emulate(cmd),
        }
    }

    /// What applies to every command before it reaches the handler or the emulation: the
    /// opcode, or the answer that ends the command here (refused device, unit attention).
    fn admit(&self, bytes: &[u8], report_ua: bool) -> Result<u8, CommandResult> {
        let Some(&opcode) = bytes.first() else {
            return Err(CommandResult::invalid_opcode());
        };
        if !table::is_housekeeping(opcode) {
            if self.refusal.is_some() {
                return Err(CommandResult::check(Sense::not_ready_manual_intervention()));
            }
            if let Some(ua) = report_ua.then(|| self.take_unit_attention()).flatten() {
                tracing::debug!(device = %self.name, opcode, asc = ua.asc, ascq = ua.ascq, "reporting unit attention");
                return Err(CommandResult::check(ua));
            }
        }
        Ok(opcode)
    }

    /// Finds an emulated command in the table and checks its CDB against the usage mask.
    fn decode(&self, bytes: &[u8]) -> Result<&'static table::OpDesc, CommandResult> {
        let cdb = Cdb::new(bytes);
        let desc = table::lookup(&cdb, |o| self.offers(o)).map_err(CommandResult::check)?;
        // From here on the command's own view: without the former SCSI-2 LUN field for the
        // commands that ignore it (see the table's module docs). The asynchronous starts read
        // none of those bits (READ/WRITE(6) take only the LBA bits 4..0 of byte 1).
        let cdb = desc.view(cdb);
        if bytes.len() < desc.cdb_len() {
            return Err(CommandResult::check(Sense::invalid_field_in_cdb(0, None)));
        }
        check_usage(&cdb, desc.usage, desc.sa.is_some(), desc.splits)
            .map_err(CommandResult::check)?;
        Ok(desc)
    }

    /// Emulates a command the handler does not implement, blocking.
    fn emulate(&self, cmd: &mut Command<'_>) -> CommandResult {
        match self.decode(cmd.cdb) {
            Ok(desc) => self.run(desc, cmd),
            Err(r) => r,
        }
    }

    fn run(&self, desc: &'static table::OpDesc, cmd: &mut Command<'_>) -> CommandResult {
        let r = (desc.exec)(self, cmd, desc.view(Cdb::new(cmd.cdb)));
        command_result(&self.name, desc.name, r, cmd.data.len())
    }

    /// Emulates a command the handler does not implement and answers it: on the asynchronous
    /// block path when the table has a start function for it (the command is then answered
    /// when its block requests complete), else blocking, on this thread.
    fn emulate_pending(&self, cmd: Pending) {
        let desc = match self.decode(cmd.cdb()) {
            Ok(d) => d,
            Err(r) => return cmd.complete(r),
        };
        let mut cmd = match desc.start {
            Some(start) => match start(self, cmd, desc.name) {
                None => return,
                Some(back) => back,
            },
            None => cmd,
        };
        let r = self.run(desc, &mut cmd.command());
        cmd.complete(r);
    }
}
