//! # Block commands: reading, writing and provisioning logical blocks
//!
//! The SBC-3 commands that move or check data: READ/WRITE (6/10/12/16), WRITE AND VERIFY,
//! VERIFY, WRITE SAME, UNMAP, COMPARE AND WRITE, ORWRITE, SYNCHRONIZE CACHE, PRE-FETCH, READ
//! CAPACITY (10/16), GET LBA STATUS, FORMAT UNIT and READ DEFECT DATA.
//!
//! Rules every command here follows:
//! - the transfer length is checked against the device's maximum transfer length
//!   (`max_sectors` of the device configuration, see
//!   `runtime::MIN_MAX_TRANSFER_BYTES`; INVALID FIELD IN CDB
//!   pointing at the length field), then the range
//!   `[LBA, LBA + length)` against the capacity (LOGICAL BLOCK ADDRESS OUT OF RANGE, 05/21/00,
//!   also when LBA + length overflows);
//! - a zero transfer length is a GOOD no-op (READ (6)/WRITE (6) excepted: 0 means 256 there);
//! - **durability**: a write is passed to the handler with `durable = FUA || !WCE`. With the
//!   write cache off (WCE=0) every write is durable before it completes; with it on, only FUA
//!   ("force unit access") writes are, and SYNCHRONIZE CACHE makes the rest durable. WRITE AND
//!   VERIFY is always durable (verification is against the medium). UNMAP and WRITE SAME with
//!   UNMAP are followed by a flush when WCE=0, so that deallocated blocks cannot come back after
//!   a power loss with their old contents;
//! - a READ with FUA while WCE=1 flushes first: FUA asks for the data from the medium, so dirty
//!   cached data is written back before it is read (reading through the same cache then returns
//!   what the medium holds). DPO (a cache retention hint) is accepted and ignored;
//! - data-in and data-out go between the handler and the command's [`DataBuf`] segments directly
//!   (`io_slices`), without copying. If the data buffer is shorter than the CDB's transfer, the
//!   part that fits is transferred and, for reads, `read_len` reports how much that was;
//! - COMPARE AND WRITE and ORWRITE are atomic: they hold an exclusive lock on their block range
//!   from reading to writing, and every other modifying command holds a shared lock on its range.
//!
//! - **how the I/O reaches the handler**: every block operation goes through
//!   [`Handler::submit_io`] (read, write, flush, unmap; whose default runs the handler's blocking
//!   methods). The runtime starts READ (6/10/12/16), WRITE (6/10/12/16), WRITE AND VERIFY
//!   without BYTCHK, SYNCHRONIZE CACHE, UNMAP and WRITE SAME when it deallocates on the
//!   **asynchronous block path** (the
//!   `start_*` functions at the end of this file): the command is checked here, its request
//!   handed over, and the I/O thread returns; the request's continuation answers the command on
//!   whichever thread completes it, and releases the command's range lock only then. A FUA READ
//!   with WCE=1 waits for its flush on the I/O thread first. Every other command here runs on an
//!   I/O thread and waits for each of its requests there (`Emulator::io_read` and friends):
//!   COMPARE AND WRITE, ORWRITE and WRITE AND VERIFY with BYTCHK (a read-modify-write or
//!   read-back under an exclusive lock), VERIFY, WRITE SAME that writes (chunk by chunk, from
//!   one pattern buffer), FORMAT UNIT;
//!   GET LBA STATUS calls [`Handler::allocation`], which has no asynchronous form. The
//!   blocking `exec` functions (`read`, `write`...) remain for `Emulator::execute`, the
//!   synchronous path of the unit tests and fuzzers, and decide exactly as the `start_*` ones.
//!
//! This module never reads CDB bytes without the checked accessors of [`Cdb`] and never
//! allocates more than [`CHUNK`] bytes (or a COMPARE AND WRITE's bounded size) per command.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::cdb::{Cdb, RwLayout, block_range, op};
use super::rangelock::OwnedRangeGuard;
use super::unit::{Done, Emulator, IoKind, command_result, io_sense, zero_tail};
use tcmu_warden_sdk::sense::Sense;
use tcmu_warden_sdk::{Answer, BlockOp, BlockRequest, Command, DataBuf, Handler, Pending};

/// Largest buffer the emulation allocates for one step of WRITE SAME or VERIFY.
pub const CHUNK: u64 = 1 << 20;
/// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT reported in the block limits page.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// Bytes one WRITE SAME may cover (bounds the time one command can take).
const MAX_WRITE_SAME_BYTES: u64 = 256 << 20;
/// Bytes one UNMAP command may deallocate in total.
const MAX_UNMAP_BYTES: u64 = 1 << 30;

/// MAXIMUM COMPARE AND WRITE LENGTH: at most 255 blocks (the CDB field is one byte), at most
/// [`CHUNK`] bytes, at least one block, and no more than the maximum transfer length.
pub fn max_compare_write_blocks(emu: &Emulator) -> u8 {
    let by_bytes = (CHUNK / u64::from(emu.block_size())).max(1);
    let n = by_bytes
        .min(255)
        .min(u64::from(emu.max_transfer_blocks()).max(1));
    u8::try_from(n).unwrap_or(1)
}

/// MAXIMUM WRITE SAME LENGTH in blocks.
pub fn max_write_same_blocks(emu: &Emulator) -> u64 {
    (MAX_WRITE_SAME_BYTES / u64::from(emu.block_size())).max(1)
}

/// Blocks one UNMAP command may deallocate in total, whatever the block size (initiators treat
/// larger values as implausible: libiscsi's conformance suite insists on at most 2^20).
const MAX_UNMAP_BLOCKS: u64 = 1 << 20;

/// MAXIMUM UNMAP LBA COUNT in blocks: [`MAX_UNMAP_BYTES`] worth, at most [`MAX_UNMAP_BLOCKS`].
pub fn max_unmap_blocks(emu: &Emulator) -> u32 {
    let n = (MAX_UNMAP_BYTES / u64::from(emu.block_size())).clamp(1, MAX_UNMAP_BLOCKS);
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Checks the transfer length against the maximum transfer length.
fn check_max_transfer(emu: &Emulator, blocks: u32, len_byte: u16) -> Result<(), Sense> {
    if blocks > emu.max_transfer_blocks() {
        return Err(Sense::invalid_field_in_cdb(len_byte, Some(7)));
    }
    Ok(())
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// FUA bit (byte 1, bit 3) of the 10/12/16-byte READ/WRITE/COMPARE AND WRITE CDBs.
fn fua(cdb: &Cdb<'_>) -> bool {
    RwLayout::of(cdb.u8(0)) != RwLayout::Six && cdb.bit(1, 3)
}

fn flush(emu: &Emulator) -> Result<(), Sense> {
    emu.io_flush()
        .map_err(|e| emu.io_sense(&e, IoKind::Write, "flush"))
}

/// Reads `len` bytes at device offset `off` into a new vector.
fn read_vec(emu: &Emulator, off: u64, len: usize) -> Result<Vec<u8>, Sense> {
    let mut buf = DataBuf::zeroed(&[len]);
    emu.io_read(off, &mut buf, 0, len)
        .map_err(|e| emu.io_sense(&e, IoKind::Read, "read"))?;
    Ok(buf.to_vec())
}

/// Compares `len` bytes of `data` (from `data_off`) with the medium at `dev_off`, chunk by
/// chunk; returns the offset (relative to the compared region) of the first difference.
fn compare_with_medium(
    emu: &Emulator,
    dev_off: u64,
    data: &DataBuf,
    data_off: usize,
    len: u64,
) -> Result<Option<u64>, Sense> {
    let mut done = 0u64;
    while done < len {
        let n = to_usize((len - done).min(CHUNK));
        let medium = read_vec(emu, dev_off.saturating_add(done), n)?;
        let mut expect = vec![0u8; n];
        data.copy_to(data_off.saturating_add(to_usize(done)), &mut expect);
        if let Some(i) = medium.iter().zip(&expect).position(|(a, b)| a != b) {
            return Ok(Some(done + i as u64));
        }
        done += n as u64;
    }
    Ok(None)
}

/// READ (6), (10), (12), (16).
pub fn read(emu: &Emulator, cmd: &mut Command<'_>, cdb: Cdb<'_>) -> Result<Done, Sense> {
    let r = block_range(&cdb, true);
    check_max_transfer(emu, r.blocks, r.len_byte)?;
    emu.check_range(r.lba, u64::from(r.blocks))?;
    if fua(&cdb) && emu.write_cache() {
        flush(emu)?;
    }
    let (off, len) = emu.byte_range(r.lba, u64::from(r.blocks));
    let n = to_usize(len).min(cmd.data.len());
    if n > 0 {
        emu.io_read(off, cmd.data, 0, n)
            .map_err(|e| emu.io_sense(&e, IoKind::Read, "read"))?;
    }
    zero_tail(cmd.data, n);
    Ok(Done::DataIn {
        transferred: n,
        expected: to_usize(len),
    })
}

/// Writes the first `n` bytes of `data` at `off` with the given durability.
fn write_data(
    emu: &Emulator,
    off: u64,
    data: &mut DataBuf,
    from: usize,
    n: usize,
    durable: bool,
) -> Result<(), Sense> {
    if n == 0 {
        return Ok(());
    }
    emu.io_write(off, data, from, n, durable)
        .map_err(|e| emu.io_sense(&e, IoKind::Write, "write"))
}

/// WRITE (6), (10), (12), (16).
pub fn write(emu: &Emulator, cmd: &mut Command<'_>, cdb: Cdb<'_>) -> Result<Done, Sense> {
    let r = block_range(&cdb, true);
    check_max_transfer(emu, r.blocks, r.len_byte)?;
    emu.check_range(r.lba, u64::from(r.blocks))?;
    let durable = fua(&cdb) || !emu.write_cache();
    let (off, len) = emu.byte_range(r.lba, u64::from(r.blocks));
    let n = to_usize(len).min(cmd.data.len());
    let _g = emu
        .ranges()
        .shared(r.lba, r.lba.saturating_add(u64::from(r.blocks)));
    write_data(emu, off, cmd.data, 0, n, durable)?;
    Ok(Done::Good)
}

/// BYTCHK field (byte 1, bits 2..1) of VERIFY and WRITE AND VERIFY.
fn bytchk(cdb: &Cdb<'_>) -> u8 {
    (cdb.u8(1) >> 1) & 0x03
}

/// WRITE AND VERIFY (10), (12), (16): a durable write, then with BYTCHK=1 a read-back compared
/// with the data (MISCOMPARE with the offset if they differ). BYTCHK 10b/11b are not defined
/// for this command: INVALID FIELD IN CDB.
pub fn write_verify(emu: &Emulator, cmd: &mut Command<'_>, cdb: Cdb<'_>) -> Result<Done, Sense> {
    let check = match bytchk(&cdb) {
        0 => false,
        1 => true,
        _ => return Err(Sense::invalid_field_in_cdb(1, Some(2))),
    };
    let r = block_range(&cdb, false);
    check_max_transfer(emu, r.blocks, r.len_byte)?;
    emu.check_range(r.lba, u64::from(r.blocks))?;
    let (off, len) = emu.byte_range(r.lba, u64::from(r.blocks));
    let n = to_usize(len).min(cmd.data.len());
    let end = r.lba.saturating_add(u64::from(r.blocks));
    // Verification needs the blocks to stay as written until compared.
    let _g = if check {
        emu.ranges().exclusive(r.lba, end)
    } else {
        emu.ranges().shared(r.lba, end)
    };
    write_data(emu, off, cmd.data, 0, n, true)?;
    if check {
        if let Some(at) = compare_with_medium(emu, off, cmd.data, 0, n as u64)? {
            return Err(Sense::miscompare(at));
        }
    }
    Ok(Done::Good)
}

/// VERIFY (10), (12), (16).
/// - BYTCHK=00b: range check only (the medium cannot fail verification otherwise);
/// - BYTCHK=01b: the data-out holds every block; compared with the medium;
/// - BYTCHK=11b: the data-out holds one block, compared with each block of the range;
/// - BYTCHK=10b: reserved, INVALID FIELD IN CDB.
///
/// A miscompare is 0E/1D/00 with the information field set to the byte offset of the first
/// difference from the start of the verified range (for 01b that is also the offset in the
/// data-out buffer).
pub fn verify(emu: &Emulator, cmd: &mut Command<'_>, cdb: Cdb<'_>) -> Result<Done, Sense> {
    let mode = bytchk(&cdb);
    if mode == 2 {
        return Err(Sense::invalid_field_in_cdb(1, Some(2)));
    }
    let r = block_range(&cdb, false);
    if mode == 1 {
        check_max_transfer(emu, r.blocks, r.len_byte)?;
    }
    emu.check_range(r.lba, u64::from(r.blocks))?;
    if r.blocks == 0 || mode == 0 {
        return Ok(Done::Good);
    }
    let bs = u64::from(emu.block_size());
    let (off, len) = emu.byte_range(r.lba, u64::from(r.blocks));
    let need = if mode == 1 { len } else { bs };
    if (cmd.data.len() as u64) < need {
        return Err(Sense::invalid_field_in_cdb(r.len_byte, Some(7)));
    }
    if mode == 1 {
        if let Some(at) = compare_with_medium(emu, off, cmd.data, 0, len)? {
            return Err(Sense::miscompare(at));
        }
        return Ok(Done::Good);
    }
    for k in 0..u64::from(r.blocks) {
        let block_off = k * bs;
        if let Some(at) = compare_with_medium(emu, off + block_off, cmd.data, 0, bs)? {
            return Err(Sense::miscompare(block_off + at));
        }
    }
    Ok(Done::Good)
}

/// SYNCHRONIZE CACHE (10), (16): range check (0 blocks means "to the last block"), then flush.
/// IMMED (return before the flush finishes) is accepted, but we flush before answering anyway:
/// an error would otherwise be lost.
pub fn synchronize_cache(
    emu: &Emulator,
    _cmd: &mut Command<'_>,
    cdb: Cdb<'_>,
) -> Result<Done, Sense> {
    let r = block_range(&cdb, false);
    emu.check_range(r.lba, u64::from(r.blocks))?;
    flush(emu)?;
    Ok(Done::Good)
}

/// WRITE SAME (10), (16): one block of data-out (or zeros with NDOB, "no data-out buffer",
/// WRITE SAME (16) only) written to every block of the range.
///
/// With UNMAP set, the blocks are deallocated instead when that gives the same result: the
/// handler supports unmap, unmapped blocks read as zeros, and the data is all zeros. Otherwise
/// (UNMAP is only a permission) the data is written. A zero block count is INVALID FIELD IN CDB
/// (we report WSNZ=1), as is a count above the MAXIMUM WRITE SAME LENGTH.
pub fn write_same(emu: &Emulator, cmd: &mut Command<'_>, cdb: Cdb<'_>) -> Result<Done, Sense> {
    let r = block_range(&cdb, false);
    let unmap = cdb.bit(1, 3);
    let ndob = cdb.u8(0) == op::WRITE_SAME_16 && cdb.bit(1, 0);
    if r.blocks == 0 || u64::from(r.blocks) > max_write_same_blocks(emu) {
        return Err(Sense::invalid_field_in_cdb(r.len_byte, Some(7)));
    }
    emu.check_range(r.lba, u64::from(r.blocks))?;
    let bs = to_usize(u64::from(emu.block_size()));
    let mut block = vec![0u8; bs];
    if !ndob {
        if cmd.data.len() < bs {
            return Err(Sense::invalid_field_in_cdb(r.len_byte, Some(7)));
        }
        cmd.data.copy_to(0, &mut block);
    }
    let (off, len) = emu.byte_range(r.lba, u64::from(r.blocks));
    let caps = emu.caps();
    let _g = emu
        .ranges()
        .shared(r.lba, r.lba.saturating_add(u64::from(r.blocks)));
    if unmap && caps.unmap && caps.unmap_reads_zero && block.iter().all(|&b| b == 0) {
        emu.io_unmap(off, len)
            .map_err(|e| emu.io_sense(&e, IoKind::Write, "unmap"))?;
        if !emu.write_cache() {
            flush(emu)?;
        }
        return Ok(Done::Good);
    }
    let durable = !emu.write_cache();
    let per_chunk = (CHUNK / bs as u64).max(1);
    let chunk_blocks = per_chunk.min(u64::from(r.blocks));
    let pattern: Vec<u8> = block
        .iter()
        .copied()
        .cycle()
        .take(to_usize(chunk_blocks).saturating_mul(bs))
        .collect();
    let mut pattern = DataBuf::from_segments(vec![pattern]);
    let mut done = 0u64;
    while done < u64::from(r.blocks) {
        let n = chunk_blocks.min(u64::from(r.blocks) - done);
        let bytes = to_usize(n).saturating_mul(bs);
        emu.io_write(off + done * bs as u64, &mut pattern, 0, bytes, durable)
            .map_err(|e| emu.io_sense(&e, IoKind::Write, "write same"))?;
        done += n;
    }
    Ok(Done::Good)
}

/// UNMAP: deallocates the ranges of the parameter list's block descriptors.
///
/// Parameter list: an 8-byte header (UNMAP DATA LENGTH, UNMAP BLOCK DESCRIPTOR DATA LENGTH)
/// then 16-byte descriptors (LBA, block count). Checks, all before anything is unmapped:
/// a list (as sent) shorter than the header or than the descriptor length it claims is
/// PARAMETER LIST LENGTH ERROR; a trailing partial descriptor is ignored; more descriptors than
/// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT, or more blocks in total than MAXIMUM UNMAP LBA COUNT,
/// is INVALID FIELD IN PARAMETER LIST; a descriptor outside the medium is LBA OUT OF RANGE.
/// A zero parameter list length and zero-block descriptors are no-ops.
pub fn unmap(emu: &Emulator, cmd: &mut Command<'_>, cdb: Cdb<'_>) -> Result<Done, Sense> {
    let (ranges, total) = unmap_ranges(emu, cmd.data, &cdb)?;
    for (lba, blocks) in ranges {
        let _g = emu.ranges().shared(lba, lba.saturating_add(blocks));
        let (off, len) = emu.byte_range(lba, blocks);
        emu.io_unmap(off, len)
            .map_err(|e| emu.io_sense(&e, IoKind::Write, "unmap"))?;
    }
    if total > 0 && !emu.write_cache() {
        flush(emu)?;
    }
    Ok(Done::Good)
}

/// The checked block ranges of an UNMAP parameter list (zero-block descriptors left out), and
/// their total in blocks. See [`unmap`] for the checks.
fn unmap_ranges(
    emu: &Emulator,
    data: &DataBuf,
    cdb: &Cdb<'_>,
) -> Result<(Vec<(u64, u64)>, u64), Sense> {
    let param_len = usize::from(cdb.be16(7));
    if param_len == 0 {
        return Ok((Vec::new(), 0));
    }
    let avail = param_len.min(data.len());
    let mut list = vec![0u8; avail];
    data.copy_to(0, &mut list);
    if avail < 8 {
        return Err(Sense::param_list_length_error());
    }
    let field = |at: usize, n: usize| -> u64 {
        (0..n).fold(0u64, |acc, k| {
            (acc << 8) | u64::from(list.get(at + k).copied().unwrap_or(0))
        })
    };
    let data_len = to_usize(field(0, 2));
    let bd_len = to_usize(field(2, 2));
    if data_len.saturating_add(2) > avail || bd_len.saturating_add(8) > avail {
        return Err(Sense::param_list_length_error());
    }
    let count = bd_len / 16;
    if count > MAX_UNMAP_DESCRIPTORS as usize {
        return Err(Sense::invalid_field_in_param_list(2, Some(7)));
    }
    let max_total = u64::from(max_unmap_blocks(emu));
    let mut total = 0u64;
    let mut ranges = Vec::with_capacity(count);
    for i in 0..count {
        let at = 8 + 16 * i;
        let lba = field(at, 8);
        let blocks = field(at + 8, 4);
        if blocks == 0 {
            continue;
        }
        total = total.saturating_add(blocks);
        if total > max_total {
            return Err(Sense::invalid_field_in_param_list(
                u16::try_from(at + 8).unwrap_or(u16::MAX),
                Some(7),
            ));
        }
        emu.check_range(lba, blocks)?;
        ranges.push((lba, blocks));
    }
    Ok((ranges, total))
}

/// COMPARE AND WRITE: the data-out holds N blocks to compare, then N blocks to write. Under an
/// exclusive range lock, the medium is read and compared; on a difference the command ends in
/// MISCOMPARE (0E/1D/00) with the information field set to the offset of the first differing
/// byte and nothing is written; otherwise the second half is written (`durable = FUA || !WCE`).
///
/// The data-out must be exactly 2 × N blocks: a command whose NUMBER OF LOGICAL BLOCKS does not
/// match the data the initiator sent (including N = 0 with data) is INVALID FIELD IN CDB
/// pointing at that field. (Through TCMU we cannot report a write residual instead, and
/// comparing against a guess would be worse.) N = 0 without data is a GOOD no-op.
pub fn compare_and_write(
    emu: &Emulator,
    cmd: &mut Command<'_>,
    cdb: Cdb<'_>,
) -> Result<Done, Sense> {
    let lba = cdb.be64(2);
    let blocks = cdb.u8(13);
    if blocks == 0 {
        if !cmd.data.is_empty() {
            return Err(Sense::invalid_field_in_cdb(13, Some(7)));
        }
        return Ok(Done::Good);
    }
    if blocks > max_compare_write_blocks(emu) {
        return Err(Sense::invalid_field_in_cdb(13, Some(7)));
    }
    emu.check_range(lba, u64::from(blocks))?;
    let (off, len) = emu.byte_range(lba, u64::from(blocks));
    let half = to_usize(len);
    if cmd.data.len() != half.saturating_mul(2) {
        return Err(Sense::invalid_field_in_cdb(13, Some(7)));
    }
    let durable = fua(&cdb) || !emu.write_cache();
    let _g = emu.ranges().exclusive(lba, lba + u64::from(blocks));
    let medium = read_vec(emu, off, half)?;
    let mut verify = vec![0u8; half];
    cmd.data.copy_to(0, &mut verify);
    if let Some(i) = medium.iter().zip(&verify).position(|(a, b)| a != b) {
        return Err(Sense::miscompare(i as u64));
    }
    write_data(emu, off, cmd.data, half, half, durable)?;
    Ok(Done::Good)
}

/// The PMI bit / LBA check of READ CAPACITY: with PMI=0 the LBA field must be zero.
fn check_pmi(pmi: bool, lba: u64) -> Result<(), Sense> {
    if !pmi && lba != 0 {
        return Err(Sense::invalid_field_in_cdb(2, Some(7)));
    }
    Ok(())
}

/// READ CAPACITY (10): last LBA (FFFFFFFFh if it does not fit, telling the initiator to use
/// READ CAPACITY (16)) and block length.
pub fn read_capacity_10(
    emu: &Emulator,
    cmd: &mut Command<'_>,
    cdb: Cdb<'_>,
) -> Result<Done, Sense> {
    check_pmi(cdb.bit(8, 0), u64::from(cdb.be32(2)))?;
    let last = emu.num_blocks().saturating_sub(1);
    let returned = u32::try_from(last)
        .ok()
        .filter(|&l| l != u32::MAX)
        .unwrap_or(u32::MAX);
    let mut resp = Vec::with_capacity(8);
    resp.extend_from_slice(&returned.to_be_bytes());
    resp.extend_from_slice(&emu.block_size().to_be_bytes());
    Ok(super::unit::data_in(cmd, &resp, 8))
}

/// READ CAPACITY (16) (SERVICE ACTION IN 9Eh/10h): last LBA, block length, and LBPME (logical
/// block provisioning management enabled: the handler supports unmap) / LBPRZ (unmapped blocks
/// read as zeros).
pub fn read_capacity_16(
    emu: &Emulator,
    cmd: &mut Command<'_>,
    cdb: Cdb<'_>,
) -> Result<Done, Sense> {
    check_pmi(cdb.bit(14, 0), cdb.be64(2))?;
    let alloc = to_usize(u64::from(cdb.be32(10)));
    let caps = emu.caps();
    let mut resp = vec![0u8; 32];
    let last = emu.num_blocks().saturating_sub(1);
    if let Some(f) = resp.get_mut(0..8) {
        f.copy_from_slice(&last.to_be_bytes());
    }
    if let Some(f) = resp.get_mut(8..12) {
        f.copy_from_slice(&emu.block_size().to_be_bytes());
    }
    if let Some(f) = resp.get_mut(14) {
        if caps.unmap {
            *f |= 0x80;
            if caps.unmap_reads_zero {
                *f |= 0x40;
            }
        }
    }
    Ok(super::unit::data_in(cmd, &resp, alloc))
}

/// Most LBA status descriptors one GET LBA STATUS returns (each costs the handler a lookup).
const MAX_LBA_STATUS_DESCRIPTORS: usize = 64;

/// One run of blocks from `lba` in the same provisioning state: (mapped, blocks), at most
/// `max_blocks`. A block only partly allocated counts as mapped.
fn provisioning_run(emu: &Emulator, lba: u64, max_blocks: u64) -> Result<(bool, u64), Sense> {
    let bs = u64::from(emu.block_size());
    let (off, len) = emu.byte_range(lba, max_blocks);
    let run = emu
        .handler()
        .allocation(off, len)
        .map_err(|e| emu.io_sense(&e, IoKind::Read, "allocation"))?;
    Ok(match run {
        None => (true, max_blocks),
        Some((true, bytes)) => (true, bytes.div_ceil(bs).clamp(1, max_blocks)),
        Some((false, bytes)) if bytes >= bs => (false, (bytes / bs).min(max_blocks)),
        Some((false, _)) => (true, 1),
    })
}

/// GET LBA STATUS (9Eh/12h), offered with thin provisioning: LBA status descriptors from the
/// STARTING LBA on, each a run of blocks that are mapped (status 0h) or deallocated (1h), as
/// the handler's [`Handler::allocation`](tcmu_warden_sdk::Handler::allocation) tells; a handler
/// that cannot tell gets one "mapped" descriptor for the rest of the medium (SBC-3 lets "mapped"
/// stand for "mapped or unknown"). As many descriptors as the allocation length holds, at most
/// [`MAX_LBA_STATUS_DESCRIPTORS`], each at most 2^32 - 1 blocks.
pub fn get_lba_status(emu: &Emulator, cmd: &mut Command<'_>, cdb: Cdb<'_>) -> Result<Done, Sense> {
    let lba = cdb.be64(2);
    let alloc = to_usize(u64::from(cdb.be32(10)));
    emu.check_range(lba, 1)?;
    let nb = emu.num_blocks();
    let wanted = (alloc.saturating_sub(8) / 16).clamp(1, MAX_LBA_STATUS_DESCRIPTORS);
    let mut descs: Vec<(u64, u64, bool)> = Vec::new();
    let mut cur = lba;
    while cur < nb && descs.len() < wanted {
        let (mapped, blocks) = provisioning_run(emu, cur, (nb - cur).min(u64::from(u32::MAX)))?;
        match descs.last_mut() {
            // Runs split only by the 2^32 - 1 cap, or by a partly allocated block, merge.
            Some(last) if last.2 == mapped && last.1 + blocks <= u64::from(u32::MAX) => {
                last.1 += blocks
            }
            _ => descs.push((cur, blocks, mapped)),
        }
        cur += blocks;
    }
    let mut resp = Vec::with_capacity(8 + 16 * descs.len());
    resp.extend_from_slice(
        &u32::try_from(4 + 16 * descs.len())
            .unwrap_or(0)
            .to_be_bytes(),
    );
    resp.extend_from_slice(&[0; 4]);
    for (start, blocks, mapped) in descs {
        resp.extend_from_slice(&start.to_be_bytes());
        resp.extend_from_slice(&u32::try_from(blocks).unwrap_or(u32::MAX).to_be_bytes());
        resp.push(if mapped { 0x00 } else { 0x01 });
        resp.extend_from_slice(&[0; 3]);
    }
    Ok(super::unit::data_in(cmd, &resp, alloc))
}

/// PRE-FETCH (10), (16): asks the device to read blocks into its cache ahead of use. We keep no
/// cache of our own (the handler's backing store has the page cache), so after the range check
/// (a zero length means "to the last block", as for SYNCHRONIZE CACHE) there is nothing to do.
/// The status is GOOD, which SBC-3 defines as "not every block could be cached" (CONDITION MET
/// would promise they all were). IMMED is accepted: we finish at once either way.
pub fn pre_fetch(emu: &Emulator, _cmd: &mut Command<'_>, cdb: Cdb<'_>) -> Result<Done, Sense> {
    let r = block_range(&cdb, false);
    emu.check_range(r.lba, u64::from(r.blocks))?;
    Ok(Done::Good)
}

/// ORWRITE (16): each byte of the data-out is ORed into the medium's byte at the same position
/// (SBC-3 §5.9: a read-modify-write the device does atomically). Under an exclusive range lock,
/// chunk by chunk, the blocks are read, ORed with the data and written back
/// (`durable = FUA || !WCE`). ORPROTECT is outside the usage mask (no protection information).
pub fn orwrite(emu: &Emulator, cmd: &mut Command<'_>, cdb: Cdb<'_>) -> Result<Done, Sense> {
    let r = block_range(&cdb, false);
    check_max_transfer(emu, r.blocks, r.len_byte)?;
    emu.check_range(r.lba, u64::from(r.blocks))?;
    if r.blocks == 0 {
        return Ok(Done::Good);
    }
    let durable = fua(&cdb) || !emu.write_cache();
    let (off, len) = emu.byte_range(r.lba, u64::from(r.blocks));
    let n = to_usize(len).min(cmd.data.len());
    let _g = emu
        .ranges()
        .exclusive(r.lba, r.lba.saturating_add(u64::from(r.blocks)));
    let mut done = 0usize;
    while done < n {
        let step = to_usize(CHUNK).min(n - done);
        let mut medium = read_vec(emu, off + done as u64, step)?;
        let mut data = vec![0u8; step];
        cmd.data.copy_to(done, &mut data);
        for (m, d) in medium.iter_mut().zip(&data) {
            *m |= d;
        }
        let mut merged = DataBuf::from_segments(vec![medium]);
        emu.io_write(off + done as u64, &mut merged, 0, step, durable)
            .map_err(|e| emu.io_sense(&e, IoKind::Write, "orwrite"))?;
        done += step;
    }
    Ok(Done::Good)
}

/// FORMAT UNIT: the medium is already formatted with the device's block size, so formatting
/// only establishes "no data": on a thin-provisioned device whose unmapped blocks read as zeros,
/// every block is unmapped (SBC-3 §4.7.3.5: after a format, a thin-provisioned LU's blocks are
/// unmapped); otherwise the contents are left as they are, which SBC-3 allows without an
/// initialization pattern.
///
/// With FMTDATA the parameter list header (short, or long with LONGLIST) is checked: a
/// protection field usage, an initialization pattern (IP), a defect list, or option bits without
/// FOV are INVALID FIELD IN PARAMETER LIST with a pointer; a list shorter than its header is
/// PARAMETER LIST LENGTH ERROR. FMTPINFO (protection information) is outside the usage mask.
pub fn format_unit(emu: &Emulator, cmd: &mut Command<'_>, cdb: Cdb<'_>) -> Result<Done, Sense> {
    let longlist = cdb.bit(1, 5);
    let fmtdata = cdb.bit(1, 4);
    if fmtdata {
        let hlen = if longlist { 8 } else { 4 };
        if cmd.data.len() < hlen {
            return Err(Sense::param_list_length_error());
        }
        let mut h = vec![0u8; hlen];
        cmd.data.copy_to(0, &mut h);
        let b = |i: usize| h.get(i).copied().unwrap_or(0);
        if b(0) & 0x07 != 0 {
            return Err(Sense::invalid_field_in_param_list(0, Some(2)));
        }
        let fov = b(1) & 0x80 != 0;
        // DPRY, DCRT, STPF, IP and IMMED mean something only with FOV.
        if !fov && b(1) & 0x7A != 0 {
            return Err(Sense::invalid_field_in_param_list(1, Some(7)));
        }
        if b(1) & 0x08 != 0 {
            return Err(Sense::invalid_field_in_param_list(1, Some(3)));
        }
        if longlist && b(3) != 0 {
            return Err(Sense::invalid_field_in_param_list(3, Some(7)));
        }
        let (dl_at, dl) = if longlist {
            (
                4u16,
                h.get(4..8)
                    .map_or(0, |s| s.iter().fold(0u32, |a, &x| (a << 8) | u32::from(x))),
            )
        } else {
            (2u16, u32::from(b(2)) << 8 | u32::from(b(3)))
        };
        if dl != 0 {
            return Err(Sense::invalid_field_in_param_list(dl_at, Some(7)));
        }
    }
    let caps = emu.caps();
    if caps.unmap && caps.unmap_reads_zero {
        let nb = emu.num_blocks();
        let _g = emu.ranges().exclusive(0, nb);
        let (_, len) = emu.byte_range(0, nb);
        emu.io_unmap(0, len)
            .map_err(|e| emu.io_sense(&e, IoKind::Write, "format unit"))?;
    }
    flush(emu)?;
    Ok(Done::Good)
}

/// READ DEFECT DATA (10) and (12): we have no defects. The header echoes the requested list
/// format and lists (PLISTV/GLISTV), with a zero DEFECT LIST LENGTH. The reserved format codes
/// (001b, 010b, 111b) are INVALID FIELD IN CDB.
pub fn read_defect_data(
    _emu: &Emulator,
    cmd: &mut Command<'_>,
    cdb: Cdb<'_>,
) -> Result<Done, Sense> {
    let twelve = cdb.u8(0) == op::READ_DEFECT_DATA_12;
    let flags_byte = if twelve { 1 } else { 2 };
    let flags = cdb.u8(flags_byte) & 0x1F;
    if matches!(flags & 0x07, 1 | 2 | 7) {
        return Err(Sense::invalid_field_in_cdb(
            u16::try_from(flags_byte).unwrap_or(0),
            Some(2),
        ));
    }
    let (resp, alloc) = if twelve {
        (
            vec![0, flags, 0, 0, 0, 0, 0, 0],
            to_usize(u64::from(cdb.be32(6))),
        )
    } else {
        (vec![0, flags, 0, 0], usize::from(cdb.be16(7)))
    };
    Ok(super::unit::data_in(cmd, &resp, alloc))
}

// ---- the asynchronous block path ----
//
// The runtime executes READ, WRITE, WRITE AND VERIFY without BYTCHK, SYNCHRONIZE CACHE, UNMAP
// and deallocating WRITE SAME through the `start_*` functions below (the table names them, see
// `table::OpDesc::start`): each decodes and checks its CDB exactly as its blocking counterpart above, hands the block
// request(s) to `Handler::submit_io` and returns, so the I/O thread is free at once; the
// request's continuation, on whichever thread completes it, turns the outcome into the command's
// answer. The command's range lock is an owned guard moved into the continuation, released when
// the request completes. A start function returns the command (before doing anything) when it
// must run blocking instead.

/// A block request's outcome as the command sees it: a dropped request is INTERNAL TARGET
/// FAILURE, a handler error is mapped as [`Emulator::io_sense`] maps it.
fn outcome(
    name: &str,
    r: io::Result<()>,
    how: Answer,
    kind: IoKind,
    what: &'static str,
) -> Result<(), Sense> {
    match (how, r) {
        (Answer::Dropped, _) => {
            tracing::warn!(
                device = %name,
                op = what,
                "block request dropped without completion; failing the command (04/44/00)"
            );
            Err(Sense::internal_target_failure())
        }
        (Answer::Completed, Ok(())) => Ok(()),
        (Answer::Completed, Err(e)) => Err(io_sense(name, &e, kind, what)),
    }
}

/// Answers a started command.
fn answer(name: &str, what: &'static str, p: Pending, r: Result<Done, Sense>) {
    let data_len = p.data().len();
    p.complete(command_result(name, what, r, data_len));
}

/// READ (6), (10), (12), (16) on the asynchronous path (see [`read`] for the rules). A READ
/// with FUA on a device with the write cache on waits for its flush on the I/O thread first.
pub fn start_read(emu: &Emulator, mut p: Pending, what: &'static str) -> Option<Pending> {
    let checked = {
        let cdb = Cdb::new(p.cdb());
        let r = block_range(&cdb, true);
        check_max_transfer(emu, r.blocks, r.len_byte)
            .and_then(|()| emu.check_range(r.lba, u64::from(r.blocks)))
            .map(|()| (r.lba, r.blocks, fua(&cdb)))
    };
    let (lba, blocks, fua) = match checked {
        Ok(c) => c,
        Err(s) => {
            answer(emu.name(), what, p, Err(s));
            return None;
        }
    };
    if fua && emu.write_cache() {
        if let Err(s) = flush(emu) {
            answer(emu.name(), what, p, Err(s));
            return None;
        }
    }
    let (off, len) = emu.byte_range(lba, u64::from(blocks));
    let expected = to_usize(len);
    let n = expected.min(p.data().len());
    if n == 0 {
        zero_tail(p.data_mut(), 0);
        let done = Done::DataIn {
            transferred: 0,
            expected,
        };
        answer(emu.name(), what, p, Ok(done));
        return None;
    }
    let buf = std::mem::replace(p.data_mut(), DataBuf::empty());
    let name = emu.name_arc().clone();
    let done = Box::new(move |mut buf: DataBuf, r: io::Result<()>, how: Answer| {
        let r = outcome(&name, r, how, IoKind::Read, "read").map(|()| {
            zero_tail(&mut buf, n);
            Done::DataIn {
                transferred: n,
                expected,
            }
        });
        let data_len = buf.len();
        // The buffer may be ring memory the kernel reuses once it sees the answer.
        drop(buf);
        p.complete(command_result(&name, what, r, data_len));
    });
    emu.handler().submit_io(BlockRequest::new(
        BlockOp::Read { offset: off },
        buf,
        0,
        n,
        done,
    ));
    None
}

/// Issues one write of a started command: `[lba, lba + blocks)` from its data-out, under an
/// owned shared range lock released when the request completes.
fn start_write_range(
    emu: &Emulator,
    mut p: Pending,
    what: &'static str,
    lba: u64,
    blocks: u32,
    durable: bool,
) {
    let (off, len) = emu.byte_range(lba, u64::from(blocks));
    let n = to_usize(len).min(p.data().len());
    if n == 0 {
        answer(emu.name(), what, p, Ok(Done::Good));
        return;
    }
    let guard: OwnedRangeGuard = emu
        .ranges_arc()
        .shared_owned(lba, lba.saturating_add(u64::from(blocks)));
    let buf = std::mem::replace(p.data_mut(), DataBuf::empty());
    let name = emu.name_arc().clone();
    let done = Box::new(move |buf: DataBuf, r: io::Result<()>, how: Answer| {
        let r = outcome(&name, r, how, IoKind::Write, "write").map(|()| Done::Good);
        let data_len = buf.len();
        drop(buf);
        // The range stays locked until the handler has finished the write.
        drop(guard);
        p.complete(command_result(&name, what, r, data_len));
    });
    emu.handler().submit_io(BlockRequest::new(
        BlockOp::Write {
            offset: off,
            durable,
        },
        buf,
        0,
        n,
        done,
    ));
}

/// WRITE (6), (10), (12), (16) on the asynchronous path (see [`write`]).
pub fn start_write(emu: &Emulator, p: Pending, what: &'static str) -> Option<Pending> {
    let checked = {
        let cdb = Cdb::new(p.cdb());
        let r = block_range(&cdb, true);
        check_max_transfer(emu, r.blocks, r.len_byte)
            .and_then(|()| emu.check_range(r.lba, u64::from(r.blocks)))
            .map(|()| (r.lba, r.blocks, fua(&cdb) || !emu.write_cache()))
    };
    match checked {
        Ok((lba, blocks, durable)) => start_write_range(emu, p, what, lba, blocks, durable),
        Err(s) => answer(emu.name(), what, p, Err(s)),
    }
    None
}

/// WRITE AND VERIFY (10), (12), (16) with BYTCHK=0 on the asynchronous path: a durable write
/// (see [`write_verify`]). With BYTCHK set the command needs a read-back under an exclusive
/// lock and runs blocking.
pub fn start_write_verify(emu: &Emulator, p: Pending, what: &'static str) -> Option<Pending> {
    let checked = {
        let cdb = Cdb::new(p.cdb());
        if bytchk(&cdb) != 0 {
            None
        } else {
            let r = block_range(&cdb, false);
            Some(
                check_max_transfer(emu, r.blocks, r.len_byte)
                    .and_then(|()| emu.check_range(r.lba, u64::from(r.blocks)))
                    .map(|()| (r.lba, r.blocks)),
            )
        }
    };
    match checked {
        None => return Some(p),
        Some(Ok((lba, blocks))) => start_write_range(emu, p, what, lba, blocks, true),
        Some(Err(s)) => answer(emu.name(), what, p, Err(s)),
    }
    None
}

/// Submits a flush whose completion answers `p`.
fn submit_flush_answering(handler: &dyn Handler, name: Arc<str>, what: &'static str, p: Pending) {
    let done = Box::new(move |buf: DataBuf, r: io::Result<()>, how: Answer| {
        drop(buf);
        let r = outcome(&name, r, how, IoKind::Write, "flush").map(|()| Done::Good);
        answer(&name, what, p, r);
    });
    handler.submit_io(BlockRequest::new(
        BlockOp::Flush,
        DataBuf::empty(),
        0,
        0,
        done,
    ));
}

/// SYNCHRONIZE CACHE (10), (16) on the asynchronous path (see [`synchronize_cache`]).
pub fn start_synchronize_cache(emu: &Emulator, p: Pending, what: &'static str) -> Option<Pending> {
    let checked = {
        let cdb = Cdb::new(p.cdb());
        let r = block_range(&cdb, false);
        emu.check_range(r.lba, u64::from(r.blocks))
    };
    match checked {
        Ok(()) => submit_flush_answering(emu.handler(), emu.name_arc().clone(), what, p),
        Err(s) => answer(emu.name(), what, p, Err(s)),
    }
    None
}

/// WRITE SAME (10), (16) on the asynchronous path when it deallocates (see [`write_same`]):
/// UNMAP set, the handler's unmapped blocks read as zeros and the data is all zeros, so one
/// unmap request (then a flush when WCE=0) does it. Otherwise the command is given back to run
/// blocking: it writes the range chunk by chunk.
pub fn start_write_same(emu: &Emulator, p: Pending, what: &'static str) -> Option<Pending> {
    let checked = {
        let cdb = Cdb::new(p.cdb());
        let r = block_range(&cdb, false);
        let unmap = cdb.bit(1, 3);
        let ndob = cdb.u8(0) == op::WRITE_SAME_16 && cdb.bit(1, 0);
        let bs = to_usize(u64::from(emu.block_size()));
        let caps = emu.caps();
        if !(unmap && caps.unmap && caps.unmap_reads_zero) {
            None
        } else if r.blocks == 0 || u64::from(r.blocks) > max_write_same_blocks(emu) {
            Some(Err(Sense::invalid_field_in_cdb(r.len_byte, Some(7))))
        } else if let Err(s) = emu.check_range(r.lba, u64::from(r.blocks)) {
            Some(Err(s))
        } else if !ndob && p.data().len() < bs {
            Some(Err(Sense::invalid_field_in_cdb(r.len_byte, Some(7))))
        } else {
            let mut block = vec![0u8; if ndob { 0 } else { bs }];
            p.data().copy_to(0, &mut block);
            block
                .iter()
                .all(|&b| b == 0)
                .then_some(Ok((r.lba, u64::from(r.blocks))))
        }
    };
    let (lba, blocks) = match checked {
        None => return Some(p),
        Some(Err(s)) => {
            answer(emu.name(), what, p, Err(s));
            return None;
        }
        Some(Ok(range)) => range,
    };
    let guard = emu
        .ranges_arc()
        .shared_owned(lba, lba.saturating_add(blocks));
    let (offset, len) = emu.byte_range(lba, blocks);
    let flush_after = !emu.write_cache();
    let handler = emu.handler_arc().clone();
    let name = emu.name_arc().clone();
    let done = Box::new(move |buf: DataBuf, r: io::Result<()>, how: Answer| {
        drop(buf);
        drop(guard);
        match outcome(&name, r, how, IoKind::Write, "write same") {
            Err(s) => answer(&name, what, p, Err(s)),
            // As after UNMAP: the second step, from this thread.
            Ok(()) if flush_after => {
                submit_flush_answering(handler.as_ref(), name.clone(), what, p)
            }
            Ok(()) => answer(&name, what, p, Ok(Done::Good)),
        }
    });
    emu.handler().submit_io(BlockRequest::new(
        BlockOp::Unmap { offset, len },
        DataBuf::empty(),
        0,
        0,
        done,
    ));
    None
}

/// The requests of one UNMAP in flight: the last to complete answers the command (after a
/// flush on a device without a write cache).
struct UnmapJoin {
    left: AtomicUsize,
    failed: Mutex<Option<Sense>>,
    cmd: Mutex<Option<Pending>>,
    flush_after: bool,
    handler: Arc<dyn Handler>,
    name: Arc<str>,
    what: &'static str,
}

impl UnmapJoin {
    fn one_done(&self, r: Result<(), Sense>) {
        if let Err(s) = r {
            let mut f = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
            f.get_or_insert(s);
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let Some(p) = self
            .cmd
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        let failed = self
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match failed {
            Some(s) => answer(&self.name, self.what, p, Err(s)),
            // Deallocated blocks must not come back with their old contents after a power
            // loss: the flush is this command's second step, submitted from this thread.
            None if self.flush_after => {
                submit_flush_answering(self.handler.as_ref(), self.name.clone(), self.what, p)
            }
            None => answer(&self.name, self.what, p, Ok(Done::Good)),
        }
    }
}

/// UNMAP on the asynchronous path (see [`unmap`]): every descriptor's request in flight at
/// once, each under its own owned shared range lock.
pub fn start_unmap(emu: &Emulator, p: Pending, what: &'static str) -> Option<Pending> {
    let checked = {
        let cdb = Cdb::new(p.cdb());
        unmap_ranges(emu, p.data(), &cdb)
    };
    let (ranges, total) = match checked {
        Ok(r) => r,
        Err(s) => {
            answer(emu.name(), what, p, Err(s));
            return None;
        }
    };
    if ranges.is_empty() {
        answer(emu.name(), what, p, Ok(Done::Good));
        return None;
    }
    let join = Arc::new(UnmapJoin {
        left: AtomicUsize::new(ranges.len()),
        failed: Mutex::new(None),
        cmd: Mutex::new(Some(p)),
        flush_after: total > 0 && !emu.write_cache(),
        handler: emu.handler_arc().clone(),
        name: emu.name_arc().clone(),
        what,
    });
    for (lba, blocks) in ranges {
        let guard = emu
            .ranges_arc()
            .shared_owned(lba, lba.saturating_add(blocks));
        let (offset, len) = emu.byte_range(lba, blocks);
        let j = join.clone();
        let done = Box::new(move |buf: DataBuf, r: io::Result<()>, how: Answer| {
            drop(buf);
            drop(guard);
            j.one_done(outcome(&j.name, r, how, IoKind::Write, "unmap"));
        });
        emu.handler().submit_io(BlockRequest::new(
            BlockOp::Unmap { offset, len },
            DataBuf::empty(),
            0,
            0,
            done,
        ));
    }
    None
}
