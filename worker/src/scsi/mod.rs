//! # SCSI core: CDB decoding, sense data and command emulation
//!
//! An initiator (the host using the disk) sends SCSI **commands**; each is a CDB (command
//! descriptor block: an opcode byte and its fields) plus an optional data buffer: *data-out*
//! flows from initiator to device (WRITE), *data-in* from device to initiator (READ, INQUIRY).
//! The device answers with a **status** byte: GOOD, or CHECK CONDITION with **sense data**
//! (a sense key, ASC and ASCQ saying what went wrong; see [`sense`]).
//!
//! The kernel's TCMU backstore hands us every command for a device; this module executes them.
//! [`Emulator`] is one device's executor. Commands whose opcode the handler lists in
//! [`Handler::implemented_opcodes`](crate::handler::Handler::implemented_opcodes) go to the
//! handler; every other command is emulated here on top of the handler's read/write/flush/unmap.
//!
//! Submodules:
//! - [`sense`]: sense data encoding (fixed format with field pointers and information field);
//! - [`cdb`]: checked CDB field access, opcodes, the reserved-bit check, block-range decoding;
//! - `table`: the command table that drives dispatch, reserved-bit checks and REPORT
//!   SUPPORTED OPERATION CODES alike;
//! - `emulate`: [`Emulator`], the dispatcher and the device state (write cache, capacity,
//!   unit attentions);
//! - `inquiry`: standard INQUIRY data and VPD pages (vital product data);
//! - `mode`: mode pages (caching, control) for MODE SENSE / MODE SELECT;
//! - `block`: READ/WRITE/VERIFY/WRITE SAME/UNMAP/COMPARE AND WRITE/ORWRITE/SYNCHRONIZE CACHE/
//!   PRE-FETCH/READ CAPACITY/GET LBA STATUS/FORMAT UNIT/READ DEFECT DATA;
//! - `copy`: EXTENDED COPY (LID1) and RECEIVE COPY RESULTS, and the [`CopyRegistry`] through
//!   which a copy reaches the other devices this process serves;
//! - `misc`: TEST UNIT READY, REQUEST SENSE, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL,
//!   REPORT LUNS;
//! - `rangelock`: the block-range lock that makes COMPARE AND WRITE atomic.
//!
//! This module must never panic, whatever the CDB or data-out bytes: every field is read with
//! checked access and every malformed command becomes sense data. It never touches the ring.

mod block;
pub mod cdb;
mod copy;
mod emulate;
mod inquiry;
mod misc;
mod mode;
mod rangelock;
pub mod sense;
mod table;

#[cfg(test)]
mod tests;

use crate::iobuf::DataBuf;
pub use copy::CopyRegistry;
pub use emulate::Emulator;
pub use inquiry::naa_designator;
pub use sense::Sense;
pub use table::{DataDir, MediumAccess, describe, medium_access};

/// SCSI status byte values (SAM-5).
pub mod status {
    /// The command succeeded.
    pub const GOOD: u8 = 0x00;
    /// Sense data describes an error.
    pub const CHECK_CONDITION: u8 = 0x02;
    /// The device is busy; the initiator retries.
    pub const BUSY: u8 = 0x08;
    /// Reservation conflict.
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    /// Task set full; the initiator retries.
    pub const TASK_SET_FULL: u8 = 0x28;
}

/// One SCSI command as the emulation sees it.
#[derive(Debug)]
pub struct Command<'a> {
    /// The CDB (6 to 16 bytes, or longer for variable-length CDBs). Bytes beyond the
    /// command's CDB length are ignored.
    pub cdb: &'a [u8],
    /// The data buffer: data-out (initiator to us) for writes, data-in (us to initiator) for reads.
    pub data: &'a mut DataBuf,
    /// For bidirectional commands, the data-in buffer (`data` then holds the data-out).
    pub bidi_in: Option<&'a mut DataBuf>,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandResult {
    /// SCSI status byte.
    pub status: u8,
    /// Sense data for CHECK CONDITION.
    pub sense: Option<Sense>,
    /// For data-in commands, bytes actually transferred when fewer than the buffer holds (or
    /// fewer than the command asked for).
    pub read_len: Option<u32>,
}

impl CommandResult {
    /// GOOD status.
    pub fn good() -> Self {
        CommandResult {
            status: status::GOOD,
            sense: None,
            read_len: None,
        }
    }
    /// CHECK CONDITION with the given sense.
    pub fn check(sense: Sense) -> Self {
        CommandResult {
            status: status::CHECK_CONDITION,
            sense: Some(sense),
            read_len: None,
        }
    }
    /// ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE.
    pub fn invalid_opcode() -> Self {
        Self::check(Sense::invalid_opcode())
    }
    /// BUSY: the initiator retries.
    pub fn busy() -> Self {
        CommandResult {
            status: status::BUSY,
            sense: None,
            read_len: None,
        }
    }
}
