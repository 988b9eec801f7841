//! # Commands and results: what a handler sees of one SCSI command
//!
//! A [`Command`] borrows one command's CDB and data buffers for the length of a synchronous call
//! ([`crate::Handler::execute`], or the SCSI emulation's own work). A [`CommandResult`] is how the
//! command ended: a SCSI status byte, sense data for CHECK CONDITION, and for data-in commands
//! how many bytes were really transferred.
//!
//! This module owns these types and the status byte values; it never decides which status a
//! command gets.

use crate::buf::DataBuf;
use crate::sense::Sense;

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

/// One SCSI command, borrowed for a synchronous call.
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
    /// SCSI status byte (see [`status`]).
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
    /// CHECK CONDITION, HARDWARE ERROR / INTERNAL TARGET FAILURE (04/44/00): the command was
    /// fine, the device server was not. This is also what a command gets whose [`crate::Pending`]
    /// is dropped unanswered.
    pub fn internal_error() -> Self {
        Self::check(Sense::internal_target_failure())
    }
}
