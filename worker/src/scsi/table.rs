//! # The command table
//!
//! One table lists every command the runtime emulates: its opcode and service action, name, CDB
//! length, **CDB usage mask** (for each CDB byte, the bits this device looks at), data direction
//! and the function that executes it. The same table drives
//! - dispatch ([`lookup`]),
//! - the generic reserved-bit check (a set bit outside the usage mask is INVALID FIELD IN CDB,
//!   [`super::cdb::check_usage`]),
//! - REPORT SUPPORTED OPERATION CODES ([`report_supported_opcodes`]), which returns the very
//!   same masks, so what we advertise and what we accept can never disagree, and
//! - the runtime's byte counters ([`medium_access`]): which commands' data counts as read from
//!   or written to the medium.
//!
//! Usage masks follow SPC-4 §6.35's rules: byte 0 is the opcode, the service action bits hold
//! the service action, every other bit is 1 when the device uses it. Bits we accept but ignore
//! (DPO, group number, FUA_NV, RARC) are marked used; fields for features we lack (protection
//! information, ANCHOR, power conditions, the CONTROL byte's NACA/link bits) are not, so setting
//! them is rejected with a field pointer.
//!
//! ## The former SCSI-2 LUN field
//!
//! In SCSI-2 (ANSI X3.131-1994) every 6-, 10- and 12-byte CDB carried the **LUN** (logical unit
//! number: which disk behind the target the command is for) in bits 7..5 of byte 1; SCSI-3 moved
//! the LUN into the transport and SPC/SBC made those bits reserved, or gave them new fields. The
//! Linux SCSI midlayer still writes the LUN there for devices it takes for SCSI-2, and it takes
//! every LUN of a target it has not probed before for one until the LUN's first INQUIRY answer
//! (see [`super::cdb::SCSI2_LUN_MASK`]). Checking those bits made the probe INQUIRY of a LUN
//! above 0 on a target without LUN 0 fail with INVALID FIELD IN CDB, and the disk never appeared.
//! SPC-4 lets a device server check reserved bits but does not require it; LIO's own emulation
//! and tcmu-runner ignore them. So the dispatcher reads the CDB of a command whose
//! `OpDesc::scsi2_lun` flag is set through [`Cdb::ignoring_scsi2_lun`] ([`OpDesc::view`]): for
//! it, bits 7..5 are neither checked nor seen by the command. Their usage masks keep those bits
//! 0, as SPC-4 §6.35.3 asks for bits the device server ignores.
//!
//! The flagged commands are exactly those that had the LUN field in SCSI-2 and whose bits 7..5
//! are still reserved today: TEST UNIT READY, REQUEST SENSE, READ (6), WRITE (6), INQUIRY,
//! MODE SELECT (6), MODE SENSE (6), START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL, READ
//! CAPACITY (10), PRE-FETCH (10), SYNCHRONIZE CACHE (10), READ DEFECT DATA (10), MODE SELECT
//! (10), MODE SENSE (10) and READ DEFECT DATA (12). Not marked, and still checked:
//! - the SCSI-2 commands whose bits 7..5 are fields now: RDPROTECT of READ (10)/(12), WRPROTECT
//!   of WRITE (10)/(12), WRITE AND VERIFY (10)/(12) and WRITE SAME (10), VRPROTECT of VERIFY
//!   (10)/(12), FMTPINFO and LONGLIST of FORMAT UNIT. A nonzero protection field asks for
//!   protection information this device does not have, and SBC-3 has such a command rejected;
//!   LIO does the same (`sbc_check_prot()`: INVALID FIELD IN CDB) and libiscsi's
//!   `Read10.ReadProtect` and similar tests expect it. LONGLIST changes the parameter list's
//!   layout, so it cannot be ignored either. Linux stops writing the LUN once INQUIRY has said
//!   SPC-4, which it does before it sends any of these;
//! - commands that never had a LUN field (16-byte CDBs, and commands newer than SCSI-2: UNMAP,
//!   REPORT LUNS, the service-action commands, EXTENDED COPY, ...).
//!
//! This module owns the table and the REPORT SUPPORTED OPERATION CODES encoding; it never does
//! device I/O.

use super::cdb::{Cdb, SA_MASK, op};
use super::unit::{Done, Emulator, StartFn, data_in};
use super::{block, copy, inquiry, misc, mode};
use tcmu_warden_sdk::Command;
use tcmu_warden_sdk::sense::Sense;

/// Which way a command moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDir {
    /// No data.
    None,
    /// Device to initiator.
    In,
    /// Initiator to device.
    Out,
}

/// Whether a command's data is user data read from or written to the medium (what the device's
/// `bytes_read`/`bytes_written` counters count), as opposed to parameter data, data only
/// compared or verified, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediumAccess {
    /// Not counted.
    None,
    /// Its data-in bytes were read from the medium.
    Read,
    /// Its data-out bytes were written to the medium.
    Write,
}

/// When a command is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Avail {
    /// Always.
    Always,
    /// Only when the handler supports unmap (thin provisioning).
    Unmap,
}

/// Executes one decoded command.
pub type ExecFn = fn(&Emulator, &mut Command<'_>, Cdb<'_>) -> Result<Done, Sense>;

/// One emulated command.
#[derive(Debug, Clone, Copy)]
pub struct OpDesc {
    /// Operation code.
    pub opcode: u8,
    /// Service action (byte 1, bits 4..0), for opcodes that have them.
    pub sa: Option<u8>,
    /// Name, as in SPC/SBC.
    pub name: &'static str,
    /// CDB usage mask; its length is the CDB length.
    pub usage: &'static [u8],
    /// Extra field boundaries among unused bits, per byte (see [`super::cdb::field_msb`]).
    pub splits: &'static [(u8, u8)],
    /// Data direction.
    pub dir: DataDir,
    /// When offered.
    pub avail: Avail,
    /// Served without a pending unit attention being reported, and by refused devices too.
    pub housekeeping: bool,
    /// What its data counts as in the byte counters.
    pub access: MediumAccess,
    /// CDB byte 1 bits 7..5 are the former SCSI-2 LUN field, ignored (see the module docs).
    pub scsi2_lun: bool,
    /// The implementation (blocking; the unit tests' and fuzzers' `Emulator::execute` path).
    pub exec: ExecFn,
    /// The runtime's start on the asynchronous block path, for the commands that have one
    /// (see `block`); `None`: the runtime runs `exec` on an I/O thread.
    pub start: Option<StartFn>,
}

impl OpDesc {
    /// CDB length in bytes.
    pub fn cdb_len(&self) -> usize {
        self.usage.len()
    }
}

const fn d(
    opcode: u8,
    sa: Option<u8>,
    name: &'static str,
    usage: &'static [u8],
    dir: DataDir,
    exec: ExecFn,
) -> OpDesc {
    OpDesc {
        opcode,
        sa,
        name,
        usage,
        splits: &[],
        dir,
        avail: Avail::Always,
        housekeeping: false,
        access: MediumAccess::None,
        scsi2_lun: false,
        exec,
        start: None,
    }
}

impl OpDesc {
    const fn split(mut self, s: &'static [(u8, u8)]) -> OpDesc {
        self.splits = s;
        self
    }
    const fn needs_unmap(mut self) -> OpDesc {
        self.avail = Avail::Unmap;
        self
    }
    const fn housekeeping(mut self) -> OpDesc {
        self.housekeeping = true;
        self
    }
    const fn reads_medium(mut self) -> OpDesc {
        self.access = MediumAccess::Read;
        self
    }
    const fn writes_medium(mut self) -> OpDesc {
        self.access = MediumAccess::Write;
        self
    }
    const fn starts(mut self, start: StartFn) -> OpDesc {
        self.start = Some(start);
        self
    }
    const fn scsi2_lun(mut self) -> OpDesc {
        self.scsi2_lun = true;
        self
    }

    /// How the command reads `cdb`: without the former SCSI-2 LUN field if it ignores it.
    pub fn view<'a>(&self, cdb: Cdb<'a>) -> Cdb<'a> {
        if self.scsi2_lun {
            cdb.ignoring_scsi2_lun()
        } else {
            cdb
        }
    }
}

use DataDir::{In, None as NoData, Out};

/// Usage of the GROUP NUMBER byte of the 10/12/16-byte block CDBs (a hint we accept and ignore).
const GROUP: u8 = 0x1F;

/// Every emulated command, ordered by opcode then service action.
#[rustfmt::skip]
pub static OPS: &[OpDesc] = &[
    d(op::TEST_UNIT_READY, None, "TEST UNIT READY", &[0x00, 0, 0, 0, 0, 0], NoData, misc::test_unit_ready)
        .scsi2_lun(),
    d(op::REQUEST_SENSE, None, "REQUEST SENSE", &[0x03, 0x01, 0, 0, 0xFF, 0], In, misc::request_sense)
        .housekeeping()
        .scsi2_lun(),
    d(op::FORMAT_UNIT, None, "FORMAT UNIT", &[0x04, 0x3F, 0, 0, 0, 0], Out, block::format_unit),
    d(op::READ_6, None, "READ (6)", &[0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0], In, block::read)
        .starts(block::start_read)
        .reads_medium()
        .scsi2_lun(),
    d(op::WRITE_6, None, "WRITE (6)", &[0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0], Out, block::write)
        .starts(block::start_write)
        .writes_medium()
        .scsi2_lun(),
    d(op::INQUIRY, None, "INQUIRY", &[0x12, 0x01, 0xFF, 0xFF, 0xFF, 0], In, inquiry::inquiry)
        .split(&[(1, 0x02)]).housekeeping()
        .scsi2_lun(),
    d(op::MODE_SELECT_6, None, "MODE SELECT (6)", &[0x15, 0x10, 0, 0, 0xFF, 0], Out, mode::mode_select)
        .split(&[(1, 0x01)])
        .scsi2_lun(),
    d(op::MODE_SENSE_6, None, "MODE SENSE (6)", &[0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0], In, mode::mode_sense)
        .scsi2_lun(),
    d(op::START_STOP_UNIT, None, "START STOP UNIT", &[0x1B, 0x01, 0, 0, 0x05, 0], NoData, misc::start_stop_unit)
        .split(&[(3, 0x08), (4, 0x0A)])
        .scsi2_lun(),
    d(op::PREVENT_ALLOW_MEDIUM_REMOVAL, None, "PREVENT ALLOW MEDIUM REMOVAL", &[0x1E, 0, 0, 0, 0x03, 0], NoData, misc::prevent_allow)
        .scsi2_lun(),
    d(op::READ_CAPACITY_10, None, "READ CAPACITY (10)",
        &[0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, 0], In, block::read_capacity_10)
        .split(&[(1, 0x01)])
        .scsi2_lun(),
    d(op::READ_10, None, "READ (10)",
        &[0x28, 0x1E, 0xFF, 0xFF, 0xFF, 0xFF, GROUP, 0xFF, 0xFF, 0], In, block::read)
        .starts(block::start_read)
        .reads_medium(),
    d(op::WRITE_10, None, "WRITE (10)",
        &[0x2A, 0x1A, 0xFF, 0xFF, 0xFF, 0xFF, GROUP, 0xFF, 0xFF, 0], Out, block::write)
        .starts(block::start_write)
        .writes_medium(),
    d(op::WRITE_VERIFY_10, None, "WRITE AND VERIFY (10)",
        &[0x2E, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, GROUP, 0xFF, 0xFF, 0], Out, block::write_verify)
        .starts(block::start_write_verify)
        .writes_medium(),
    d(op::VERIFY_10, None, "VERIFY (10)",
        &[0x2F, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, GROUP, 0xFF, 0xFF, 0], Out, block::verify),
    d(op::PRE_FETCH_10, None, "PRE-FETCH (10)",
        &[0x34, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, GROUP, 0xFF, 0xFF, 0], NoData, block::pre_fetch)
        .scsi2_lun(),
    d(op::SYNCHRONIZE_CACHE_10, None, "SYNCHRONIZE CACHE (10)",
        &[0x35, 0x06, 0xFF, 0xFF, 0xFF, 0xFF, GROUP, 0xFF, 0xFF, 0], NoData, block::synchronize_cache)
        .starts(block::start_synchronize_cache)
        .scsi2_lun(),
    d(op::READ_DEFECT_DATA_10, None, "READ DEFECT DATA (10)",
        &[0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0], In, block::read_defect_data)
        .scsi2_lun(),
    d(op::WRITE_SAME_10, None, "WRITE SAME (10)",
        &[0x41, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, GROUP, 0xFF, 0xFF, 0], Out, block::write_same)
        .starts(block::start_write_same)
        .split(&[(1, 0x13)]),
    d(op::UNMAP, None, "UNMAP",
        &[0x42, 0, 0, 0, 0, 0, GROUP, 0xFF, 0xFF, 0], Out, block::unmap)
        .starts(block::start_unmap)
        .split(&[(1, 0x01)]).needs_unmap(),
    d(op::MODE_SELECT_10, None, "MODE SELECT (10)",
        &[0x55, 0x10, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0], Out, mode::mode_select)
        .split(&[(1, 0x01)]).scsi2_lun(),
    d(op::MODE_SENSE_10, None, "MODE SENSE (10)",
        &[0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0], In, mode::mode_sense)
        .scsi2_lun(),
    d(op::EXTENDED_COPY, Some(op::SA_EXTENDED_COPY_LID1), "EXTENDED COPY (LID1)",
        &[0x83, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0], Out, copy::extended_copy),
    d(op::RECEIVE_COPY_RESULTS, Some(op::SA_COPY_STATUS_LID1), "RECEIVE COPY STATUS (LID1)",
        &[0x84, 0x00, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0], In, copy::receive_copy_status),
    d(op::RECEIVE_COPY_RESULTS, Some(op::SA_COPY_OPERATING_PARAMETERS), "RECEIVE COPY OPERATING PARAMETERS",
        &[0x84, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0], In,
        copy::receive_copy_operating_parameters),
    d(op::READ_16, None, "READ (16)",
        &[0x88, 0x1E, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, GROUP, 0], In, block::read)
        .starts(block::start_read)
        .reads_medium(),
    d(op::COMPARE_AND_WRITE, None, "COMPARE AND WRITE",
        &[0x89, 0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0xFF, GROUP, 0], Out, block::compare_and_write)
        .writes_medium(),
    d(op::WRITE_16, None, "WRITE (16)",
        &[0x8A, 0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, GROUP, 0], Out, block::write)
        .starts(block::start_write)
        .writes_medium(),
    d(op::ORWRITE_16, None, "ORWRITE (16)",
        &[0x8B, 0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, GROUP, 0], Out, block::orwrite)
        .writes_medium(),
    d(op::WRITE_VERIFY_16, None, "WRITE AND VERIFY (16)",
        &[0x8E, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, GROUP, 0], Out, block::write_verify)
        .starts(block::start_write_verify)
        .writes_medium(),
    d(op::VERIFY_16, None, "VERIFY (16)",
        &[0x8F, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, GROUP, 0], Out, block::verify),
    d(op::PRE_FETCH_16, None, "PRE-FETCH (16)",
        &[0x90, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, GROUP, 0], NoData, block::pre_fetch),
    d(op::SYNCHRONIZE_CACHE_16, None, "SYNCHRONIZE CACHE (16)",
        &[0x91, 0x06, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, GROUP, 0], NoData, block::synchronize_cache)
        .starts(block::start_synchronize_cache),
    d(op::WRITE_SAME_16, None, "WRITE SAME (16)",
        &[0x93, 0x09, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, GROUP, 0], Out, block::write_same)
        .starts(block::start_write_same)
        .split(&[(1, 0x12)]),
    d(op::SERVICE_ACTION_IN_16, Some(op::SA_READ_CAPACITY_16), "READ CAPACITY (16)",
        &[0x9E, 0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01, 0], In, block::read_capacity_16),
    d(op::SERVICE_ACTION_IN_16, Some(op::SA_GET_LBA_STATUS), "GET LBA STATUS",
        &[0x9E, 0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0], In, block::get_lba_status)
        .needs_unmap(),
    d(op::REPORT_LUNS, None, "REPORT LUNS",
        &[0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0], In, misc::report_luns)
        .housekeeping(),
    d(op::MAINTENANCE_IN, Some(op::SA_REPORT_SUPPORTED_OPCODES), "REPORT SUPPORTED OPERATION CODES",
        &[0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0], In, report_supported_opcodes),
    d(op::READ_12, None, "READ (12)",
        &[0xA8, 0x1E, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, GROUP, 0], In, block::read)
        .starts(block::start_read)
        .reads_medium(),
    d(op::WRITE_12, None, "WRITE (12)",
        &[0xAA, 0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, GROUP, 0], Out, block::write)
        .starts(block::start_write)
        .writes_medium(),
    d(op::WRITE_VERIFY_12, None, "WRITE AND VERIFY (12)",
        &[0xAE, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, GROUP, 0], Out, block::write_verify)
        .starts(block::start_write_verify)
        .writes_medium(),
    d(op::VERIFY_12, None, "VERIFY (12)",
        &[0xAF, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, GROUP, 0], Out, block::verify),
    d(op::READ_DEFECT_DATA_12, None, "READ DEFECT DATA (12)",
        &[0xB7, 0x1F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0], In, block::read_defect_data)
        .scsi2_lun(),
];

/// The name and data direction of the emulated command `cdb` starts, for logs and for callers
/// that need the direction before executing. None for commands the table does not know.
pub fn describe(cdb: &[u8]) -> Option<(&'static str, DataDir)> {
    cdb.first()?;
    lookup(&Cdb::new(cdb), |_| true)
        .ok()
        .map(|o| (o.name, o.dir))
}

/// What the data of a command with operation code `opcode` counts as in the byte counters
/// ([`MediumAccess::None`] for opcodes the table does not know).
pub fn medium_access(opcode: u8) -> MediumAccess {
    OPS.iter()
        .find(|o| o.opcode == opcode)
        .map_or(MediumAccess::None, |o| o.access)
}

/// Whether `opcode` is served without reporting a pending unit attention (INQUIRY, REPORT LUNS,
/// REQUEST SENSE), and by refused devices.
pub fn is_housekeeping(opcode: u8) -> bool {
    OPS.iter().any(|o| o.opcode == opcode && o.housekeeping)
}

/// Finds the table entry for `cdb` among the entries `offered` accepts.
///
/// An unknown opcode is INVALID COMMAND OPERATION CODE; a known opcode with an unknown service
/// action is INVALID FIELD IN CDB pointing at the service action field (SPC-4 §4.5.2).
pub fn lookup(cdb: &Cdb<'_>, offered: impl Fn(&OpDesc) -> bool) -> Result<&'static OpDesc, Sense> {
    let opcode = cdb.u8(0);
    let mut known = OPS
        .iter()
        .filter(|o| o.opcode == opcode && offered(o))
        .peekable();
    let first = known.peek().copied().ok_or_else(Sense::invalid_opcode)?;
    if first.sa.is_none() {
        return Ok(first);
    }
    let sa = cdb.u8(1) & SA_MASK;
    known
        .find(|o| o.sa == Some(sa))
        .ok_or(Sense::invalid_field_in_cdb(1, Some(4)))
}

/// One line of REPORT SUPPORTED OPERATION CODES: a table entry, or an opcode the handler
/// implements that the table does not know.
#[derive(Debug, Clone, Copy)]
enum Reported {
    Table(&'static OpDesc),
    Handler { opcode: u8, cdb_len: usize },
}

impl Reported {
    fn opcode(&self) -> u8 {
        match self {
            Reported::Table(o) => o.opcode,
            Reported::Handler { opcode, .. } => *opcode,
        }
    }
    fn sa(&self) -> Option<u8> {
        match self {
            Reported::Table(o) => o.sa,
            Reported::Handler { .. } => None,
        }
    }
    fn cdb_len(&self) -> usize {
        match self {
            Reported::Table(o) => o.cdb_len(),
            Reported::Handler { cdb_len, .. } => *cdb_len,
        }
    }
    /// CDB usage data. For handler commands we cannot know which bits they use, so every bit is
    /// reported as possibly used (SPC-4 allows reporting a bit as used that is then ignored).
    fn usage(&self) -> Vec<u8> {
        match self {
            Reported::Table(o) => o.usage.to_vec(),
            Reported::Handler { opcode, cdb_len } => {
                let mut u = vec![0xFF; *cdb_len];
                if let Some(b) = u.first_mut() {
                    *b = *opcode;
                }
                u
            }
        }
    }
}

/// CDB length implied by an opcode's group code, for opcodes outside the table (None for the
/// variable-length and vendor-specific groups).
fn group_cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// Every command this device supports, as REPORT SUPPORTED OPERATION CODES lists them.
fn supported(emu: &Emulator) -> Vec<Reported> {
    let mut out: Vec<Reported> = OPS
        .iter()
        .filter(|o| emu.offers(o) || emu.handler_implements(o.opcode))
        .map(Reported::Table)
        .collect();
    for opcode in 0..=u8::MAX {
        if emu.handler_implements(opcode) && !OPS.iter().any(|o| o.opcode == opcode) {
            if let Some(cdb_len) = group_cdb_len(opcode) {
                out.push(Reported::Handler { opcode, cdb_len });
            }
        }
    }
    out.sort_by_key(|r| (r.opcode(), r.sa()));
    out
}

/// The command timeouts descriptor (RCTD=1): we give no timeout advice, so both are zero.
const TIMEOUTS_DESCRIPTOR: [u8; 12] = [0x00, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// REPORT SUPPORTED OPERATION CODES (MAINTENANCE IN A3h/0Ch, SPC-4 §6.35).
///
/// Reporting options 0 (all commands), 1 (one opcode without service action), 2 (opcode and
/// service action) and 3 (opcode, with service action if it has them); RCTD adds the (empty)
/// timeouts descriptors.
pub fn report_supported_opcodes(
    emu: &Emulator,
    cmd: &mut Command<'_>,
    cdb: Cdb<'_>,
) -> Result<Done, Sense> {
    let rctd = cdb.bit(2, 7);
    let options = cdb.u8(2) & 0x07;
    let req_op = cdb.u8(3);
    let req_sa = cdb.be16(4);
    let alloc = cdb.be32(6) as usize;
    let all = supported(emu);
    let mut resp = Vec::new();
    match options {
        0 => {
            let per = if rctd { 20 } else { 8 };
            let total = all.len().saturating_mul(per);
            resp.extend_from_slice(&u32::try_from(total).unwrap_or(u32::MAX).to_be_bytes());
            for r in &all {
                resp.push(r.opcode());
                resp.push(0);
                resp.extend_from_slice(&u16::from(r.sa().unwrap_or(0)).to_be_bytes());
                resp.push(0);
                resp.push((u8::from(rctd) << 1) | u8::from(r.sa().is_some()));
                resp.extend_from_slice(&u16::try_from(r.cdb_len()).unwrap_or(0).to_be_bytes());
                if rctd {
                    resp.extend_from_slice(&TIMEOUTS_DESCRIPTOR);
                }
            }
        }
        1..=3 => {
            let has_sa = all.iter().any(|r| r.opcode() == req_op && r.sa().is_some());
            let found = match (options, has_sa) {
                // The opcode has service actions, but none was asked for.
                (1, true) => return Err(Sense::invalid_field_in_cdb(2, Some(2))),
                // A service action was asked for an opcode without them.
                (2, false) if all.iter().any(|r| r.opcode() == req_op) => {
                    return Err(Sense::invalid_field_in_cdb(2, Some(2)));
                }
                (_, true) => all
                    .iter()
                    .find(|r| r.opcode() == req_op && r.sa().map(u16::from) == Some(req_sa)),
                (_, false) => all.iter().find(|r| r.opcode() == req_op),
            };
            match found {
                Some(r) => {
                    let usage = r.usage();
                    resp.push(0);
                    resp.push((u8::from(rctd) << 7) | 0x03); // supported, per standard
                    resp.extend_from_slice(&u16::try_from(usage.len()).unwrap_or(0).to_be_bytes());
                    resp.extend_from_slice(&usage);
                    if rctd {
                        resp.extend_from_slice(&TIMEOUTS_DESCRIPTOR);
                    }
                }
                None => resp.extend_from_slice(&[0, 0x01, 0, 0]), // not supported
            }
        }
        _ => return Err(Sense::invalid_field_in_cdb(2, Some(2))),
    }
    Ok(data_in(cmd, &resp, alloc))
}

impl Emulator {
    /// Whether the table entry is offered on this device.
    pub(crate) fn offers(&self, o: &OpDesc) -> bool {
        match o.avail {
            Avail::Always => true,
            Avail::Unmap => self.caps().unmap,
        }
    }
}
