//! # SCSI core: CDB decoding, sense data and command emulation
//!
//! An initiator (the host using the disk) sends SCSI **commands**; each is a CDB (command
//! descriptor block: an opcode byte and its fields) plus an optional data buffer: *data-out*
//! flows from initiator to device (WRITE), *data-in* from device to initiator (READ, INQUIRY).
//! The device answers with a **status** byte: GOOD, or CHECK CONDITION with **sense data**
//! (a sense key, ASC and ASCQ saying what went wrong; see [`sense`]). The command, result and
//! sense types are the handler SDK's (`tcmu_warden_sdk`), re-exported here; this module depends on
//! the SDK and the SDK on nothing here.
//!
//! The kernel's TCMU backstore hands us every command for a device; this module executes them.
//! [`Emulator`] is one device's executor. Commands whose opcode the handler lists in
//! [`Handler::implemented_opcodes`](tcmu_warden_sdk::Handler::implemented_opcodes) go to the
//! handler; every other command is emulated here on top of the handler's block I/O
//! ([`Handler::submit_io`](tcmu_warden_sdk::Handler::submit_io): read, write, flush, unmap,
//! asynchronous, by default run on the blocking methods). [`Emulator::submit`] starts READ,
//! WRITE, SYNCHRONIZE CACHE, UNMAP and deallocating WRITE SAME on the asynchronous block path
//! (answered when the handler completes their requests) and runs the rest on the calling
//! thread; see `block`.
//!
//! Submodules:
//! - [`cdb`]: checked CDB field access, opcodes, the reserved-bit check, block-range decoding;
//! - `table`: the command table that drives dispatch, reserved-bit checks and REPORT
//!   SUPPORTED OPERATION CODES alike;
//! - `unit`: [`Emulator`]'s state, the logical unit's (write cache, capacity, unit attentions,
//!   the handler, copy bookkeeping), and the helpers the command modules share; it imports no
//!   other file of this module, and every other file may import it;
//! - `emulate`: the dispatcher: building an [`Emulator`] and running a command through the
//!   table, or handing it to the handler;
//! - `inquiry`: standard INQUIRY data and VPD pages (vital product data);
//! - `mode`: mode pages (caching, control) for MODE SENSE / MODE SELECT;
//! - `block`: READ/WRITE/VERIFY/WRITE SAME/UNMAP/COMPARE AND WRITE/ORWRITE/SYNCHRONIZE CACHE/
//!   PRE-FETCH/READ CAPACITY/GET LBA STATUS/FORMAT UNIT/READ DEFECT DATA;
//! - `copy`: EXTENDED COPY (LID1) and RECEIVE COPY RESULTS, and the [`CopyRegistry`] through
//!   which a copy reaches the other devices this process serves;
//! - `misc`: TEST UNIT READY, REQUEST SENSE, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL,
//!   REPORT LUNS;
//! - `rangelock`: the block-range lock that makes COMPARE AND WRITE atomic, with owned guards
//!   held across an asynchronous completion.
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
mod table;
mod unit;

#[cfg(test)]
mod tests;

pub use inquiry::naa_designator;
pub use table::{DataDir, MediumAccess, describe, medium_access};
pub use tcmu_warden_sdk::sense;
pub use tcmu_warden_sdk::{Command, CommandResult, Sense, status};
pub use unit::{CopyRegistry, Emulator};
