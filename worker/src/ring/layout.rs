//! # The kernel's shared-memory layout, as constants and pure parsers
//!
//! Every number here comes from the kernel's `include/uapi/linux/target_core_user.h` (the
//! `struct tcmu_mailbox`, `struct tcmu_cmd_entry` and `struct tcmu_tmr_entry` definitions) and is
//! named after the kernel's macro or field. Offsets are byte offsets: mailbox fields from the
//! start of the mapping, entry fields from the start of the entry.
//!
//! This module owns the byte-level decoding of ring entries. Its parsers only ever look at a
//! *local copy* of an entry (never at the shared page), check every count, offset and length they
//! read, and report a bad entry as an error string instead of panicking. It must never touch
//! shared memory itself: copying entries out of the ring is the engine's job (see `super`).
//!
//! Words: a *CDB* (command descriptor block) is the SCSI command itself, 6 to 260 bytes whose
//! first byte (the *opcode*) says what to do and, through its top three bits (the *group*), how
//! long the CDB is. An *iovec* is one `(offset, length)` piece of a command's data buffer in the
//! data area that follows the ring.

use super::IoVec;

// ---------------------------------------------------------------------------------------------
// Mailbox (`struct tcmu_mailbox`, at offset 0 of the mapping).

/// The only mailbox layout this code understands (`TCMU_MAILBOX_VERSION`).
pub const TCMU_MAILBOX_VERSION: u16 = 2;
/// Mailbox flag: userspace may complete commands out of order.
pub const TCMU_MAILBOX_FLAG_CAP_OOOC: u16 = 1 << 0;
/// Mailbox flag: the kernel honours `rsp.read_len` when `TCMU_UFLAG_READ_LEN` is set.
pub const TCMU_MAILBOX_FLAG_CAP_READ_LEN: u16 = 1 << 1;
/// Mailbox flag: the kernel writes task-management (TMR) entries into the ring.
pub const TCMU_MAILBOX_FLAG_CAP_TMR: u16 = 1 << 2;
/// Mailbox flag: userspace may keep a command's data buffer past completion (unused here).
pub const TCMU_MAILBOX_FLAG_CAP_KEEP_BUF: u16 = 1 << 3;

/// `version: u16`.
pub const MB_VERSION: usize = 0;
/// `flags: u16`.
pub const MB_FLAGS: usize = 2;
/// `cmdr_off: u32`: where the command ring starts, from the start of the mapping.
pub const MB_CMDR_OFF: usize = 4;
/// `cmdr_size: u32`: ring size in bytes (a multiple of 8, *not* a power of two).
pub const MB_CMDR_SIZE: usize = 8;
/// `cmd_head: u32`: the kernel's producer index (ring offset of the next entry it will write).
pub const MB_CMD_HEAD: usize = 12;
/// `cmd_tail: u32`: userspace's consumer index, alone on its own 64-byte cache line.
pub const MB_CMD_TAIL: usize = 64;
/// `sizeof(struct tcmu_mailbox)`; the kernel's ring starts right after it (`CMDR_OFF`).
pub const TCMU_MAILBOX_SIZE: usize = 128;

// ---------------------------------------------------------------------------------------------
// Entry header (`struct tcmu_cmd_entry_hdr`), common to every ring entry.

/// Entry type in the low bits of `len_op`: padding up to the ring's end.
pub const TCMU_OP_PAD: u32 = 0;
/// Entry type: a SCSI command.
pub const TCMU_OP_CMD: u32 = 1;
/// Entry type: a task-management notification.
pub const TCMU_OP_TMR: u32 = 2;
/// `len_op & TCMU_OP_MASK` is the type, `len_op & !TCMU_OP_MASK` the entry length.
pub const TCMU_OP_MASK: u32 = 0x7;
/// Every entry starts and ends on this alignment.
pub const TCMU_OP_ALIGN_SIZE: u32 = 8;

/// `len_op: u32`.
pub const HDR_LEN_OP: usize = 0;
/// `cmd_id: u16`.
pub const HDR_CMD_ID: usize = 4;
/// `kflags: u8` (kernel's flags, left alone).
pub const HDR_KFLAGS: usize = 6;
/// `uflags: u8` (userspace's flags, written at completion).
pub const HDR_UFLAGS: usize = 7;
/// `sizeof(struct tcmu_cmd_entry_hdr)`.
pub const TCMU_HDR_SIZE: usize = 8;

/// uflag: userspace did not know the opcode; the kernel answers CHECK CONDITION itself.
pub const TCMU_UFLAG_UNKNOWN_OP: u8 = 0x1;
/// uflag: `rsp.read_len` holds the number of data-in bytes actually produced.
pub const TCMU_UFLAG_READ_LEN: u8 = 0x2;
/// uflag: keep the data buffer after completion (unused here).
pub const TCMU_UFLAG_KEEP_BUF: u8 = 0x4;

// ---------------------------------------------------------------------------------------------
// CMD entry request (`struct tcmu_cmd_entry`, `req` member).

/// `req.iov_cnt: u32`: data iovecs (data-out for bidi commands).
pub const REQ_IOV_CNT: usize = 8;
/// `req.iov_bidi_cnt: u32`: data-in iovecs of a bidirectional command, after the first ones.
pub const REQ_IOV_BIDI_CNT: usize = 12;
/// `req.iov_dif_cnt: u32`: protection-information iovecs, after the bidi ones.
pub const REQ_IOV_DIF_CNT: usize = 16;
// Bytes 20..24 are a hole: `cdb_off` is a u64 and is naturally aligned.
/// `req.cdb_off: u64`: where the CDB is, from the start of the *mapping*.
pub const REQ_CDB_OFF: usize = 24;
// `req.__pad1: u64` at 32 and `req.__pad2: u64` at 40.
/// `req.iov[]`: `struct iovec { u64 base; u64 len; }`, `base` from the start of the mapping.
pub const REQ_IOV: usize = 48;
/// `sizeof(struct iovec)` on a 64-bit kernel.
pub const TCMU_IOVEC_SIZE: usize = 16;

// CMD entry response (`rsp` member, overlaying `req` from byte 8).

/// `rsp.scsi_status: u8`.
pub const RSP_SCSI_STATUS: usize = 8;
/// `rsp.read_len: u32`.
pub const RSP_READ_LEN: usize = 12;
/// `rsp.sense_buffer[96]`.
pub const RSP_SENSE_BUFFER: usize = 16;
/// `TCMU_SENSE_BUFFERSIZE`.
pub const TCMU_SENSE_BUFFERSIZE: usize = 96;
/// `sizeof(struct tcmu_cmd_entry)`: the smallest CMD entry, big enough for the response.
pub const TCMU_CMD_ENTRY_MIN_SIZE: usize = RSP_SENSE_BUFFER + TCMU_SENSE_BUFFERSIZE;

// ---------------------------------------------------------------------------------------------
// TMR entry (`struct tcmu_tmr_entry`).

/// `tmr_type: u8`.
pub const TMR_TYPE: usize = 8;
/// `cmd_cnt: u32`.
pub const TMR_CMD_CNT: usize = 12;
/// `cmd_ids[]: u16`, after two u64 pads.
pub const TMR_CMD_IDS: usize = 32;
/// `sizeof(struct tcmu_tmr_entry)` without ids.
pub const TCMU_TMR_ENTRY_SIZE: usize = 32;

/// TMR types (`TCMU_TMR_*`).
pub mod tmr {
    /// Unknown task-management function.
    pub const TCMU_TMR_UNKNOWN: u8 = 0;
    /// Abort one task.
    pub const TCMU_TMR_ABORT_TASK: u8 = 1;
    /// Abort every task of the initiator.
    pub const TCMU_TMR_ABORT_TASK_SET: u8 = 2;
    /// Clear auto-contingent-allegiance.
    pub const TCMU_TMR_CLEAR_ACA: u8 = 3;
    /// Abort every task of every initiator.
    pub const TCMU_TMR_CLEAR_TASK_SET: u8 = 4;
    /// Logical unit reset.
    pub const TCMU_TMR_LUN_RESET: u8 = 5;
    /// Target warm reset.
    pub const TCMU_TMR_TARGET_WARM_RESET: u8 = 6;
    /// Target cold reset.
    pub const TCMU_TMR_TARGET_COLD_RESET: u8 = 7;
    /// LUN reset issued by persistent-reservation handling.
    pub const TCMU_TMR_LUN_RESET_PRO: u8 = 128;
}

/// Longest CDB the kernel passes (`SCSI_MAX_VARLEN_CDB_SIZE`).
pub const SCSI_MAX_VARLEN_CDB_SIZE: usize = 260;
/// The opcode of a variable-length CDB, whose length is `8 + cdb[7]`.
pub const VARIABLE_LENGTH_CMD: u8 = 0x7f;

/// The length of the CDB starting at `cdb[0]`, judged like the kernel's `scsi_command_size()`:
/// by the opcode's group (its top three bits), except for variable-length CDBs (opcode 0x7F)
/// whose byte 7 gives the additional length. `None` when `cdb` is too short to tell, or the
/// length would exceed [`SCSI_MAX_VARLEN_CDB_SIZE`].
pub fn scsi_command_size(cdb: &[u8]) -> Option<usize> {
    let opcode = *cdb.first()?;
    let len = if opcode == VARIABLE_LENGTH_CMD {
        8 + usize::from(*cdb.get(7)?)
    } else {
        match opcode >> 5 {
            0 => 6,
            1 | 2 => 10,
            3 => 12, // reserved group; the kernel's table says 12
            4 => 16,
            5 => 12,
            _ => 10, // groups 6 and 7: vendor specific
        }
    };
    (len <= SCSI_MAX_VARLEN_CDB_SIZE).then_some(len)
}

/// Size of a CMD entry with `n_iov` iovecs and a CDB of `cdb_len` bytes, as the kernel sizes it
/// (`tcmu_cmd_get_cmd_size`): the fixed part and the iovec array, at least
/// [`TCMU_CMD_ENTRY_MIN_SIZE`], then the CDB rounded up to 8 bytes.
pub fn cmd_entry_size(n_iov: usize, cdb_len: usize) -> usize {
    let base = (REQ_IOV + TCMU_IOVEC_SIZE * n_iov).max(TCMU_CMD_ENTRY_MIN_SIZE);
    base + cdb_len.next_multiple_of(TCMU_OP_ALIGN_SIZE as usize)
}

/// Size of a TMR entry naming `n_ids` commands.
pub fn tmr_entry_size(n_ids: usize) -> usize {
    (TCMU_TMR_ENTRY_SIZE + 2 * n_ids).next_multiple_of(TCMU_OP_ALIGN_SIZE as usize)
}

pub(crate) fn rd_u8(b: &[u8], off: usize) -> Option<u8> {
    b.get(off).copied()
}

pub(crate) fn rd_u16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

pub(crate) fn rd_u32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

pub(crate) fn rd_u64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Where the parsers may let iovecs point: the data area `[start, end)` of the mapping.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DataArea {
    pub start: u64,
    pub end: u64,
}

/// A CMD entry's request, decoded from a local copy and checked.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct CmdRequest {
    pub cdb: Vec<u8>,
    pub iovecs: Vec<IoVec>,
    pub bidi_iovecs: Vec<IoVec>,
}

/// Decodes the CMD entry `entry` (a local copy of the whole entry, `entry.len()` being the
/// header's length) that sits at `entry_map_off` from the start of the mapping.
///
/// Checks: the three iovec counts fit inside the entry; every iovec (data, bidi and dif) lies
/// inside the data area; the CDB lies inside the entry after the iovec array, its length given by
/// its opcode. Returns why the entry is unusable otherwise.
pub(crate) fn parse_cmd(
    entry: &[u8],
    entry_map_off: u64,
    data: DataArea,
) -> Result<CmdRequest, String> {
    let field = |off, what| rd_u32(entry, off).ok_or_else(|| format!("entry too short for {what}"));
    let iov_cnt = field(REQ_IOV_CNT, "iov_cnt")?;
    let bidi_cnt = field(REQ_IOV_BIDI_CNT, "iov_bidi_cnt")?;
    let dif_cnt = field(REQ_IOV_DIF_CNT, "iov_dif_cnt")?;
    let cdb_off = rd_u64(entry, REQ_CDB_OFF).ok_or("entry too short for cdb_off")?;

    // Three u32 counts times 16 cannot overflow a u64.
    let total = u64::from(iov_cnt) + u64::from(bidi_cnt) + u64::from(dif_cnt);
    let iov_end = REQ_IOV as u64 + TCMU_IOVEC_SIZE as u64 * total;
    if iov_end > entry.len() as u64 {
        return Err(format!(
            "iovec counts {iov_cnt}+{bidi_cnt}+{dif_cnt} do not fit in an entry of {} bytes",
            entry.len()
        ));
    }
    let mut iovs = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for i in 0..total {
        // In range: `i < total` and the array ends at `iov_end <= entry.len()`.
        let off = usize::try_from(REQ_IOV as u64 + TCMU_IOVEC_SIZE as u64 * i)
            .map_err(|_| "iovec offset overflow".to_string())?;
        let base = rd_u64(entry, off).ok_or("iovec outside entry")?;
        let len = rd_u64(entry, off + 8).ok_or("iovec outside entry")?;
        let end = base
            .checked_add(len)
            .ok_or_else(|| format!("iovec {i} wraps around"))?;
        if base < data.start || end > data.end {
            return Err(format!(
                "iovec {i} [{base:#x}, +{len:#x}) outside the data area [{:#x}, {:#x})",
                data.start, data.end
            ));
        }
        iovs.push(IoVec { base, len });
    }
    let n_data = usize::try_from(iov_cnt).map_err(|_| "iov_cnt overflow".to_string())?;
    let n_bidi = usize::try_from(bidi_cnt).map_err(|_| "iov_bidi_cnt overflow".to_string())?;
    let mut rest = iovs.into_iter();
    let iovecs: Vec<IoVec> = rest.by_ref().take(n_data).collect();
    let bidi_iovecs: Vec<IoVec> = rest.take(n_bidi).collect();
    // The remaining (dif) iovecs were bounds-checked above and are otherwise ignored.

    let rel = cdb_off
        .checked_sub(entry_map_off)
        .filter(|rel| *rel >= iov_end && *rel < entry.len() as u64)
        .ok_or_else(|| {
            format!("cdb_off {cdb_off:#x} is not inside the entry after its iovec array")
        })?;
    let rel = usize::try_from(rel).map_err(|_| "cdb_off overflow".to_string())?;
    let tail = entry.get(rel..).ok_or("cdb_off outside entry")?;
    let cdb_len = scsi_command_size(tail).ok_or_else(|| {
        format!(
            "CDB with opcode {:#04x} has no valid length inside the entry",
            tail.first().copied().unwrap_or(0)
        )
    })?;
    let cdb = tail
        .get(..cdb_len)
        .ok_or_else(|| format!("CDB of {cdb_len} bytes runs past the end of the entry"))?
        .to_vec();
    Ok(CmdRequest {
        cdb,
        iovecs,
        bidi_iovecs,
    })
}

/// A TMR entry decoded from a local copy: its type, its command ids, and whether `cmd_cnt`
/// claimed more ids than the entry holds (then only the ids that fit are returned).
pub(crate) fn parse_tmr(entry: &[u8]) -> Option<(u8, Vec<u16>, bool)> {
    if entry.len() < TCMU_TMR_ENTRY_SIZE {
        return None;
    }
    let tmr_type = rd_u8(entry, TMR_TYPE)?;
    let cmd_cnt = rd_u32(entry, TMR_CMD_CNT)?;
    let room = (entry.len() - TCMU_TMR_ENTRY_SIZE) / 2;
    let n = usize::try_from(cmd_cnt).unwrap_or(usize::MAX).min(room);
    let ids = (0..n)
        .filter_map(|i| rd_u16(entry, TMR_CMD_IDS + 2 * i))
        .collect();
    Some((
        tmr_type,
        ids,
        n < usize::try_from(cmd_cnt).unwrap_or(usize::MAX),
    ))
}
