//! # EXTENDED COPY (LID1) and RECEIVE COPY RESULTS: copies the device server does itself
//!
//! With **EXTENDED COPY** (SPC-4 §6.4, the "LID1" form with a one-byte list identifier) an
//! initiator asks the device to copy blocks itself instead of reading them over the wire and
//! writing them back (VMware's "XCOPY", `cp --reflink`-style offload). The command's parameter
//! list holds
//! - a 16-byte header: LIST IDENTIFIER (names the copy for RECEIVE COPY RESULTS), LIST ID USAGE
//!   (whether we must hold its status for later retrieval), and the lengths of the lists below;
//! - **CSCD descriptors** (copy source and copy destination, 32 bytes each; SPC-3 called them
//!   target descriptors). We support type E4h, which names a logical unit by a designator from its
//!   Device Identification VPD page (83h); we accept the NAA designator that page reports;
//! - **segment descriptors**, each one piece of work. We support type 02h, block device to block
//!   device: copy N blocks from LBA s of CSCD descriptor i to LBA d of CSCD descriptor j.
//!
//! Source and destination may be this device or any other device **this worker process serves**:
//! the runtime registers every device's emulator in a [`CopyRegistry`], keyed by its NAA
//! designator, and a copy finds its targets there. A designator the registry does not know ends
//! the copy with COPY ABORTED / COPY TARGET DEVICE NOT REACHABLE (0A/0D/02), which tells the
//! initiator to fall back to reading and writing itself. Copies run in [`CHUNK`]-sized steps,
//! each holding the destination's range lock shared only while it writes, so a copy never holds
//! two range locks at once (and cannot deadlock against COMPARE AND WRITE on another device).
//! An overlapping copy within one device runs backwards when the destination lies after the
//! source, as `memmove` does, so every block receives the source's original contents.
//!
//! **RECEIVE COPY RESULTS** reports on copies: OPERATING PARAMETERS (03h) gives our limits,
//! COPY STATUS (00h) the outcome of a copy whose LIST ID USAGE was 00b ("hold"). We hold the
//! status of successful copies, at most [`MAX_HELD`] of them per device, until the same list
//! identifier is used again; a copy that fails ends in CHECK CONDITION with the details and holds
//! nothing. SPC-4 keeps held status per I_T nexus and drops it when the nexus goes away; TCMU does
//! not tell a backstore which nexus sent a command (nor when one logs out), so we keep it per
//! device instead.
//!
//! This module owns parameter-list parsing, the copy loop and the registry; it never touches the
//! ring, and never reaches a device that is not registered (or is refused).

use std::ops::Deref;
use std::sync::{Arc, MutexGuard, PoisonError, Weak};

use super::block::CHUNK;
use super::cdb::Cdb;
use super::unit::{CopyBook, CopyRegistry, Done, Emulator, Held, IoKind, data_in};
use tcmu_warden_sdk::sense::{Sense, key};
use tcmu_warden_sdk::{Command, DataBuf};

/// Length of the parameter list header.
const HEADER_LEN: usize = 16;
/// Length of a CSCD descriptor of type E4h (and of most other types).
const CSCD_LEN: usize = 32;
/// Length of a block-to-block segment descriptor (type 02h).
const SEGMENT_B2B_LEN: usize = 28;
/// CSCD descriptor type: identification descriptor (a designator from VPD page 83h).
const CSCD_IDENTIFICATION: u8 = 0xE4;
/// Segment descriptor type: block device to block device.
const SEGMENT_BLOCK_TO_BLOCK: u8 = 0x02;

/// MAXIMUM CSCD DESCRIPTOR COUNT we report and enforce.
pub const MAX_CSCD_DESCRIPTORS: u16 = 8;
/// MAXIMUM SEGMENT DESCRIPTOR COUNT we report and enforce.
pub const MAX_SEGMENT_DESCRIPTORS: u16 = 32;
/// MAXIMUM DESCRIPTOR LIST LENGTH (CSCD plus segment descriptor lists), in bytes.
pub const MAX_DESCRIPTOR_LIST_LEN: u32 = 1024;
/// MAXIMUM SEGMENT LENGTH in bytes: one segment copies at most this much.
pub const MAX_SEGMENT_BYTES: u32 = 256 << 20;
/// TOTAL and MAXIMUM CONCURRENT COPIES we report.
const CONCURRENT_COPIES: u16 = 4;
/// How many completed copies' status a device holds for RECEIVE COPY RESULTS.
pub const MAX_HELD: usize = 16;

impl CopyRegistry {
    /// An empty registry, shared by the devices of one worker.
    pub fn new() -> Arc<CopyRegistry> {
        Arc::new(CopyRegistry::default())
    }

    /// Makes `emu` reachable as a copy source and destination for the devices registered here,
    /// and lets its own EXTENDED COPY commands reach them. Refused devices are not registered.
    ///
    /// A device belongs to one registry; registering it with a second one only adds it there.
    pub fn register(self: &Arc<Self>, emu: &Arc<Emulator>) {
        if emu.refusal().is_some() {
            return;
        }
        // Set once: the first registry the device joins is the one its copies look in.
        let _ = emu.copy_registry().set(Arc::downgrade(self));
        let mut map = self.devices.write().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, w| w.strong_count() > 0);
        map.insert(emu.designator(), Arc::downgrade(emu));
    }

    /// The live, served device with this NAA designator.
    pub fn find(&self, designator: &[u8; 16]) -> Option<Arc<Emulator>> {
        let map = self.devices.read().unwrap_or_else(PoisonError::into_inner);
        map.get(designator)
            .and_then(Weak::upgrade)
            .filter(|e| e.refusal().is_none())
    }

    /// Number of live registered devices.
    pub fn len(&self) -> usize {
        let map = self.devices.read().unwrap_or_else(PoisonError::into_inner);
        map.values().filter(|w| w.strong_count() > 0).count()
    }

    /// Whether no live device is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes a running list identifier when the copy ends, however it ends.
struct Running<'a> {
    emu: &'a Emulator,
    list_id: Option<u8>,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.list_id {
            let mut book = book(self.emu);
            if let Some(i) = book.running.iter().position(|&r| r == id) {
                book.running.swap_remove(i);
            }
        }
    }
}

fn book(emu: &Emulator) -> MutexGuard<'_, CopyBook> {
    // Plain values: a panicking holder cannot leave them inconsistent.
    emu.copy_book()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// A copy source or destination: this device, or another one from the registry.
enum Target<'a> {
    Local(&'a Emulator),
    Remote(Arc<Emulator>),
}

impl Deref for Target<'_> {
    type Target = Emulator;
    fn deref(&self) -> &Emulator {
        match self {
            Target::Local(e) => e,
            Target::Remote(e) => e,
        }
    }
}

fn be(list: &[u8], at: usize, n: usize) -> u64 {
    (0..n).fold(0u64, |acc, k| {
        (acc << 8) | u64::from(list.get(at.saturating_add(k)).copied().unwrap_or(0))
    })
}

fn at16(i: usize) -> u16 {
    u16::try_from(i).unwrap_or(u16::MAX)
}

/// One parsed CSCD descriptor of type E4h.
#[derive(Debug, Clone, Copy)]
struct Cscd {
    /// Offset of the descriptor in the parameter list (for field pointers).
    at: usize,
    /// The NAA designator, when the descriptor carries one we understand.
    naa: Option<[u8; 16]>,
    /// PERIPHERAL DEVICE TYPE.
    device_type: u8,
    /// DISK BLOCK LENGTH from the block device type specific parameters.
    block_len: u32,
}

/// One parsed block-to-block segment descriptor.
#[derive(Debug, Clone, Copy)]
struct Segment {
    src: usize,
    dst: usize,
    blocks: u64,
    src_lba: u64,
    dst_lba: u64,
}

/// Parses an E4h descriptor. Only the designator's code set, association, type and length are
/// checked here; whether a device answers to it is decided when a segment uses it.
fn parse_cscd(list: &[u8], at: usize) -> Cscd {
    let code_set = be(list, at + 4, 1) as u8 & 0x0F;
    let assoc_type = be(list, at + 5, 1) as u8;
    let len = be(list, at + 7, 1) as usize;
    let naa = (code_set == 1 && assoc_type & 0x3F == 0x03 && len == 16)
        .then(|| {
            let mut d = [0u8; 16];
            for (k, b) in d.iter_mut().enumerate() {
                *b = be(list, at + 8 + k, 1) as u8;
            }
            d
        })
        // NAA 6 (IEEE Registered Extended) is the only 16-byte NAA format.
        .filter(|d| d.first().is_some_and(|b| b >> 4 == 6));
    Cscd {
        at,
        naa,
        device_type: be(list, at + 1, 1) as u8 & 0x1F,
        block_len: be(list, at + 29, 3) as u32,
    }
}

/// EXTENDED COPY (LID1) (83h/00h). See the module documentation.
///
/// Checks, in order, all before any block is copied:
/// - a zero PARAMETER LIST LENGTH is a GOOD no-op; a list shorter than its header, or than the
///   lengths the header gives, is PARAMETER LIST LENGTH ERROR, as is a descriptor list longer
///   than [`MAX_DESCRIPTOR_LIST_LEN`];
/// - LIST ID USAGE 01b (reserved) and inline data (which block-to-block copies never use) are
///   INVALID FIELD IN PARAMETER LIST; a list identifier already running is OPERATION IN PROGRESS;
/// - more CSCD or segment descriptors than we support is TOO MANY TARGET / SEGMENT DESCRIPTORS;
///   a descriptor type other than E4h / 02h is UNSUPPORTED TARGET / SEGMENT DESCRIPTOR TYPE CODE
///   (pointing at it); a segment descriptor with a wrong DESCRIPTOR LENGTH, or longer than
///   [`MAX_SEGMENT_BYTES`], is INVALID FIELD IN PARAMETER LIST.
///
/// Then each segment, in order: a CSCD index beyond the list is COPY ABORTED / UNREACHABLE COPY
/// TARGET; a designator no served device has, or a range outside the device, is COPY ABORTED /
/// COPY TARGET DEVICE NOT REACHABLE; a descriptor for another device type or block length is
/// COPY ABORTED / INCORRECT COPY TARGET DEVICE TYPE; an I/O error is COPY ABORTED with the
/// error's ASC/ASCQ. Segments before the failing one stay copied.
pub fn extended_copy(emu: &Emulator, cmd: &mut Command<'_>, cdb: Cdb<'_>) -> Result<Done, Sense> {
    let param_len = cdb.be32(10) as usize;
    if param_len == 0 {
        return Ok(Done::Good);
    }
    let avail = param_len.min(cmd.data.len());
    if avail < HEADER_LEN {
        return Err(Sense::param_list_length_error());
    }
    let list_len = avail.min(HEADER_LEN + MAX_DESCRIPTOR_LIST_LEN as usize + 64);
    let mut list = vec![0u8; list_len];
    cmd.data.copy_to(0, &mut list);

    let list_id = be(&list, 0, 1) as u8;
    let usage = (be(&list, 1, 1) as u8 >> 3) & 0x03;
    let cscd_len = be(&list, 2, 2) as usize;
    let seg_len = be(&list, 8, 4) as usize;
    let inline_len = be(&list, 12, 4) as usize;
    if cscd_len.saturating_add(seg_len) > MAX_DESCRIPTOR_LIST_LEN as usize {
        return Err(Sense::param_list_length_error());
    }
    if HEADER_LEN + cscd_len + seg_len + inline_len > avail {
        return Err(Sense::param_list_length_error());
    }
    if usage == 0x01 {
        return Err(Sense::invalid_field_in_param_list(1, Some(4)));
    }
    if inline_len != 0 {
        return Err(Sense::invalid_field_in_param_list(12, Some(7)));
    }

    // CSCD descriptors.
    if cscd_len / CSCD_LEN > usize::from(MAX_CSCD_DESCRIPTORS) {
        return Err(Sense::too_many_target_descriptors());
    }
    let mut cscds = Vec::new();
    let mut at = HEADER_LEN;
    while at < HEADER_LEN + cscd_len {
        let code = be(&list, at, 1) as u8;
        if code != CSCD_IDENTIFICATION || at + CSCD_LEN > HEADER_LEN + cscd_len {
            return Err(Sense::param_list_field(0x07, at16(at), Some(7)));
        }
        cscds.push(parse_cscd(&list, at));
        at += CSCD_LEN;
    }

    // Segment descriptors.
    let seg_start = HEADER_LEN + cscd_len;
    let seg_end = seg_start + seg_len;
    let mut segments = Vec::new();
    let mut at = seg_start;
    while at < seg_end {
        if segments.len() == usize::from(MAX_SEGMENT_DESCRIPTORS) {
            return Err(Sense::too_many_segment_descriptors());
        }
        let code = be(&list, at, 1) as u8;
        if code != SEGMENT_BLOCK_TO_BLOCK {
            return Err(Sense::param_list_field(0x09, at16(at), Some(7)));
        }
        let desc_len = be(&list, at + 2, 2) as usize;
        if desc_len + 4 != SEGMENT_B2B_LEN || at + SEGMENT_B2B_LEN > seg_end {
            return Err(Sense::invalid_field_in_param_list(at16(at + 2), Some(7)));
        }
        let s = Segment {
            src: be(&list, at + 4, 2) as usize,
            dst: be(&list, at + 6, 2) as usize,
            blocks: be(&list, at + 10, 2),
            src_lba: be(&list, at + 12, 8),
            dst_lba: be(&list, at + 20, 8),
        };
        if s.blocks.saturating_mul(u64::from(emu.block_size())) > u64::from(MAX_SEGMENT_BYTES) {
            return Err(Sense::invalid_field_in_param_list(at16(at + 10), Some(7)));
        }
        segments.push(s);
        at += SEGMENT_B2B_LEN;
    }

    // The list identifier names this copy from now on (unless LIST ID USAGE 11b says it means
    // nothing): a second copy with the same one must wait, and its old held status goes.
    let tracked = (usage != 0x03).then_some(list_id);
    let _running = {
        let mut b = book(emu);
        if let Some(id) = tracked {
            if b.running.contains(&id) {
                return Err(Sense::operation_in_progress());
            }
            b.running.push(id);
            b.held.retain(|h| h.list_id != id);
        }
        Running {
            emu,
            list_id: tracked,
        }
    };

    let mut bytes = 0u64;
    for s in &segments {
        bytes = bytes.saturating_add(copy_segment(emu, &cscds, s)?);
    }
    if usage == 0x00 {
        let mut b = book(emu);
        while b.held.len() >= MAX_HELD {
            b.held.pop_front();
        }
        b.held.push_back(Held {
            list_id,
            segments: u16::try_from(segments.len()).unwrap_or(u16::MAX),
            bytes,
        });
    }
    Ok(Done::Good)
}

/// The device a CSCD descriptor names, checked against what the segment needs.
fn resolve<'a>(emu: &'a Emulator, cscds: &[Cscd], index: usize) -> Result<Target<'a>, Sense> {
    let c = cscds.get(index).ok_or(Sense::unreachable_copy_target())?;
    let naa = c.naa.ok_or(Sense::copy_target_not_reachable())?;
    let target = if naa == emu.designator() {
        Target::Local(emu)
    } else {
        emu.copy_registry()
            .get()
            .and_then(Weak::upgrade)
            .and_then(|r| r.find(&naa))
            .map(Target::Remote)
            .ok_or(Sense::copy_target_not_reachable())?
    };
    if c.device_type != 0 || c.block_len != target.block_size() {
        tracing::debug!(device = %emu.name(), cscd_at = c.at, "copy target type or block length mismatch");
        return Err(Sense::incorrect_copy_target_type());
    }
    Ok(target)
}

/// An I/O error during a copy: COPY ABORTED with the error's additional sense code.
fn aborted(s: Sense) -> Sense {
    Sense::new(key::COPY_ABORTED, s.asc, s.ascq)
}

/// Copies one segment; returns the bytes copied.
fn copy_segment(emu: &Emulator, cscds: &[Cscd], s: &Segment) -> Result<u64, Sense> {
    let src = resolve(emu, cscds, s.src)?;
    let dst = resolve(emu, cscds, s.dst)?;
    if s.blocks == 0 {
        return Ok(0);
    }
    if src.check_range(s.src_lba, s.blocks).is_err()
        || dst.check_range(s.dst_lba, s.blocks).is_err()
    {
        return Err(Sense::copy_target_not_reachable());
    }
    let bs = u64::from(src.block_size());
    let step = (CHUNK / bs).max(1);
    let same = std::ptr::eq(src.deref(), dst.deref());
    // memmove semantics inside one device: copy from the end when the destination overlaps the
    // source from above.
    let backwards = same && s.dst_lba > s.src_lba && s.dst_lba < s.src_lba + s.blocks;
    let durable = !dst.write_cache();
    let mut buf = DataBuf::zeroed(&[usize::try_from(step.min(s.blocks) * bs).unwrap_or(0)]);
    let mut done = 0u64;
    while done < s.blocks {
        let n = step.min(s.blocks - done);
        let first = if backwards { s.blocks - done - n } else { done };
        let len = usize::try_from(n * bs).unwrap_or(0);
        if len > buf.len() {
            return Err(Sense::internal_target_failure());
        }
        let (src_off, _) = src.byte_range(s.src_lba + first, n);
        src.io_read(src_off, &mut buf, 0, len)
            .map_err(|e| aborted(src.io_sense(&e, IoKind::Read, "copy read")))?;
        let dst_lba = s.dst_lba + first;
        let (dst_off, _) = dst.byte_range(dst_lba, n);
        {
            let _g = dst.ranges().shared(dst_lba, dst_lba + n);
            dst.io_write(dst_off, &mut buf, 0, len, durable)
                .map_err(|e| aborted(dst.io_sense(&e, IoKind::Write, "copy write")))?;
        }
        done += n;
    }
    Ok(s.blocks * bs)
}

/// RECEIVE COPY STATUS (LID1) (84h/00h): the held outcome of the copy with the CDB's list
/// identifier: copy manager status 01h (completed without errors) with the segments processed
/// and the bytes transferred, or 00h (in progress) while it runs. A list identifier with nothing
/// held and nothing running is INVALID FIELD IN CDB pointing at it.
pub fn receive_copy_status(
    emu: &Emulator,
    cmd: &mut Command<'_>,
    cdb: Cdb<'_>,
) -> Result<Done, Sense> {
    let list_id = cdb.u8(2);
    let alloc = cdb.be32(10) as usize;
    let (status, segments, bytes) = {
        let b = book(emu);
        if b.running.contains(&list_id) {
            (0x00u8, 0u16, 0u64)
        } else {
            let h = b
                .held
                .iter()
                .rev()
                .find(|h| h.list_id == list_id)
                .ok_or(Sense::invalid_field_in_cdb(2, Some(7)))?;
            (0x01, h.segments, h.bytes)
        }
    };
    // TRANSFER COUNT UNITS: bytes, or the smallest power of 1024 that fits 32 bits.
    let mut units = 0u8;
    let mut count = bytes;
    while count > u64::from(u32::MAX) {
        count >>= 10;
        units += 1;
    }
    let mut resp = Vec::with_capacity(12);
    resp.extend_from_slice(&8u32.to_be_bytes());
    resp.push(status); // HDD = 0: no data was discarded
    resp.extend_from_slice(&segments.to_be_bytes());
    resp.push(units);
    resp.extend_from_slice(&u32::try_from(count).unwrap_or(u32::MAX).to_be_bytes());
    Ok(data_in(cmd, &resp, alloc))
}

/// RECEIVE COPY OPERATING PARAMETERS (84h/03h): the limits above, SNLID (list identifiers may be
/// left unused, LIST ID USAGE 11b), one copy at a time per list identifier, and the descriptor
/// types we implement (02h, E4h).
pub fn receive_copy_operating_parameters(
    emu: &Emulator,
    cmd: &mut Command<'_>,
    cdb: Cdb<'_>,
) -> Result<Done, Sense> {
    let alloc = cdb.be32(10) as usize;
    let log2 = |n: u32| u8::try_from(n.trailing_zeros()).unwrap_or(0);
    let mut resp = vec![0u8; 46];
    let mut put = |at: usize, bytes: &[u8]| {
        if let Some(dst) = resp.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    };
    put(0, &42u32.to_be_bytes()); // AVAILABLE DATA: 46 - 4
    put(4, &[0x01]); // SNLID
    put(8, &MAX_CSCD_DESCRIPTORS.to_be_bytes());
    put(10, &MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
    put(12, &MAX_DESCRIPTOR_LIST_LEN.to_be_bytes());
    put(16, &MAX_SEGMENT_BYTES.to_be_bytes());
    // MAXIMUM INLINE DATA LENGTH, HELD DATA LIMIT, MAXIMUM STREAM DEVICE TRANSFER SIZE: 0.
    // TOTAL / MAXIMUM CONCURRENT COPIES: copies with distinct list identifiers run side by
    // side, each on one of the device's I/O threads; we promise no more than that.
    put(34, &CONCURRENT_COPIES.to_be_bytes());
    put(36, &[CONCURRENT_COPIES as u8]);
    let g = log2(emu.block_size());
    put(37, &[g, g, g]); // data segment, inline data and held data granularity (log2)
    put(43, &[2, SEGMENT_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION]);
    Ok(data_in(cmd, &resp, alloc))
}
