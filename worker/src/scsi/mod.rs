//! # SCSI core: CDB decoding, sense data and command emulation
//!
//! (Skeleton: the SCSI helper owns this module and replaces this text.)

pub mod sense;

use std::sync::Arc;

use crate::handler::{DeviceConfig, Handler};
use crate::iobuf::DataBuf;
pub use sense::Sense;

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
    /// The CDB (6 to 16 bytes, or longer for variable-length CDBs).
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
    /// For data-in commands, bytes actually transferred when fewer than the buffer holds.
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

/// Executes commands for one device.
pub struct Emulator {
    handler: Arc<dyn Handler>,
    _cfg: DeviceConfig,
}

impl Emulator {
    /// An emulator for one device.
    pub fn new(cfg: &DeviceConfig, handler: Arc<dyn Handler>) -> Emulator {
        Emulator {
            handler,
            _cfg: cfg.clone(),
        }
    }

    /// Executes one command.
    pub fn execute(&self, cmd: &mut Command<'_>) -> CommandResult {
        let op = cmd.cdb.first().copied().unwrap_or(0xff);
        if self.handler.implemented_opcodes().contains(&op) {
            return self.handler.execute(cmd);
        }
        CommandResult::invalid_opcode()
    }
}
