//! # Mode pages: MODE SENSE and MODE SELECT
//!
//! **Mode pages** are small, numbered records of device settings that an initiator reads with
//! MODE SENSE and may change with MODE SELECT. Each is returned in one of four flavours, chosen
//! by the PAGE CONTROL field (PC): current values, *changeable* (a bit mask of what MODE SELECT
//! may change), default values, and saved values. We implement:
//! - 01h **read-write error recovery**: all zero: no automatic reallocation, no retries to
//!   report, errors are reported as they happen;
//! - 08h **caching**: its WCE bit (write cache enable) tells the initiator whether completed
//!   writes may sit in a volatile cache (then it must send SYNCHRONIZE CACHE, or writes with
//!   FUA, "force unit access", for data it needs durable);
//! - 0Ah **control**: fixed facts about command queuing and sense format;
//! - 1Ch **informational exceptions control**: DEXCPT set, we report no failure predictions.
//!
//! PAGE CODE 3Fh returns them all, in ascending order.
//!
//! Nothing is changeable by the initiator: WCE is the device's configuration (LIO's
//! `emulate_write_cache` attribute), changed by the administrator through a reconfiguration,
//! never by MODE SELECT. Like LIO, MODE SELECT accepts pages identical to the current ones and
//! rejects any difference with INVALID FIELD IN PARAMETER LIST pointing at the differing bit.
//! Default and saved values are the current configuration (there is no separate saved copy:
//! the configuration *is* what persists).
//!
//! Data returned starts with a mode parameter header and, unless DBD (disable block
//! descriptors) is set, a **block descriptor** giving the number and size of logical blocks.
//!
//! This module owns the page contents and their parsing; it never changes device state.

use super::cdb::{Cdb, op};
use super::unit::{Done, Emulator, data_in};
use tcmu_warden_sdk::Command;
use tcmu_warden_sdk::sense::Sense;

const PAGE_ERROR_RECOVERY: u8 = 0x01;
const PAGE_CACHING: u8 = 0x08;
const PAGE_CONTROL: u8 = 0x0A;
const PAGE_INFORMATIONAL_EXCEPTIONS: u8 = 0x1C;
const ALL_PAGES: u8 = 0x3F;
/// Pages we have, in ascending order (the order "all pages" returns them in).
const PAGES: [u8; 4] = [
    PAGE_ERROR_RECOVERY,
    PAGE_CACHING,
    PAGE_CONTROL,
    PAGE_INFORMATIONAL_EXCEPTIONS,
];
/// Device-specific parameter of the header: DPOFUA (we honour DPO and FUA bits).
const DPOFUA: u8 = 0x10;

/// The PAGE CONTROL field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pc {
    Current,
    Changeable,
    Default,
    Saved,
}

/// Page `code` as returned for `pc`, or None if we do not have it.
fn page(emu: &Emulator, code: u8, pc: Pc) -> Option<Vec<u8>> {
    let mut p = match code {
        // AWRE, ARRE, TB, RC, EER, PER, DTE, DCR all clear; no retry counts, no time limit.
        PAGE_ERROR_RECOVERY => vec![0u8; 12],
        // DEXCPT: informational exception operations are disabled; MRIE 0: none reported.
        PAGE_INFORMATIONAL_EXCEPTIONS => vec![0, 0, 0x08, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        PAGE_CACHING => {
            let mut p = vec![0u8; 20];
            if let Some(b) = p.get_mut(2) {
                *b = if emu.write_cache() { 0x04 } else { 0x00 }; // WCE
            }
            p
        }
        PAGE_CONTROL => vec![
            0, 0,
            0x02, // GLTSD: no log parameters are saved implicitly; D_SENSE=0: fixed-format sense
            0x10, // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering allowed
            0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, // BUSY TIMEOUT PERIOD: unlimited
            0x00, 0x00,
        ],
        _ => return None,
    };
    if pc == Pc::Changeable {
        p.fill(0);
    }
    let len = u8::try_from(p.len().saturating_sub(2)).unwrap_or(0);
    if let Some(h) = p.get_mut(0..2) {
        h.copy_from_slice(&[code, len]);
    }
    Some(p)
}

/// MODE SENSE (6) and (10).
pub fn mode_sense(emu: &Emulator, cmd: &mut Command<'_>, cdb: Cdb<'_>) -> Result<Done, Sense> {
    let ten = cdb.u8(0) == op::MODE_SENSE_10;
    let dbd = cdb.bit(1, 3);
    let llbaa = ten && cdb.bit(1, 4);
    let pc = match cdb.u8(2) >> 6 {
        0 => Pc::Current,
        1 => Pc::Changeable,
        2 => Pc::Default,
        _ => Pc::Saved,
    };
    let code = cdb.u8(2) & 0x3F;
    let subpage = cdb.u8(3);
    let alloc = if ten {
        usize::from(cdb.be16(7))
    } else {
        usize::from(cdb.u8(4))
    };
    if subpage != 0x00 && subpage != 0xFF {
        return Err(Sense::invalid_field_in_cdb(3, Some(7)));
    }
    let mut pages = Vec::new();
    if code == ALL_PAGES {
        for c in PAGES {
            pages.extend(page(emu, c, pc).unwrap_or_default());
        }
    } else {
        pages = page(emu, code, pc).ok_or(Sense::invalid_field_in_cdb(2, Some(5)))?;
    }

    let block_desc = if dbd {
        Vec::new()
    } else {
        block_descriptor(emu, llbaa, pc)
    };
    let mut resp = Vec::new();
    if ten {
        let total = 8 + block_desc.len() + pages.len();
        resp.extend_from_slice(&u16::try_from(total - 2).unwrap_or(u16::MAX).to_be_bytes());
        resp.extend_from_slice(&[0, DPOFUA, u8::from(llbaa && !dbd), 0]);
        resp.extend_from_slice(&u16::try_from(block_desc.len()).unwrap_or(0).to_be_bytes());
    } else {
        let total = 4 + block_desc.len() + pages.len();
        resp.extend_from_slice(&[
            u8::try_from(total - 1).unwrap_or(u8::MAX),
            0,
            DPOFUA,
            u8::try_from(block_desc.len()).unwrap_or(0),
        ]);
    }
    resp.extend_from_slice(&block_desc);
    resp.extend_from_slice(&pages);
    Ok(data_in(cmd, &resp, alloc))
}

/// The block descriptor: short (8 bytes: 32-bit block count, saturated, and 24-bit block
/// length) or long (16 bytes: 64-bit count, 32-bit length). Nothing in it is changeable.
fn block_descriptor(emu: &Emulator, long: bool, pc: Pc) -> Vec<u8> {
    let (blocks, bs) = if pc == Pc::Changeable {
        (0, 0)
    } else {
        (emu.num_blocks(), emu.block_size())
    };
    let mut d = Vec::with_capacity(16);
    if long {
        d.extend_from_slice(&blocks.to_be_bytes());
        d.extend_from_slice(&[0; 4]);
        d.extend_from_slice(&bs.to_be_bytes());
    } else {
        d.extend_from_slice(&u32::try_from(blocks).unwrap_or(u32::MAX).to_be_bytes());
        d.extend_from_slice(&bs.to_be_bytes()); // byte 4 reserved = top byte of a <2^24 value
    }
    d
}

fn be(list: &[u8], at: usize, n: usize) -> u64 {
    (0..n).fold(0u64, |acc, k| {
        (acc << 8) | u64::from(list.get(at.saturating_add(k)).copied().unwrap_or(0))
    })
}

fn at16(i: usize) -> u16 {
    u16::try_from(i).unwrap_or(u16::MAX)
}

/// MODE SELECT (6) and (10): validates the parameter list (header, block descriptor, pages)
/// and accepts it if it changes nothing.
pub fn mode_select(emu: &Emulator, cmd: &mut Command<'_>, cdb: Cdb<'_>) -> Result<Done, Sense> {
    let ten = cdb.u8(0) == op::MODE_SELECT_10;
    let pf = cdb.bit(1, 4);
    let (param_len, len_byte) = if ten {
        (usize::from(cdb.be16(7)), 7)
    } else {
        (usize::from(cdb.u8(4)), 4)
    };
    if param_len == 0 {
        return Ok(Done::Good);
    }
    if !pf {
        // PF=0 means vendor-specific page formats; we only speak the standard ones.
        return Err(Sense::invalid_field_in_cdb(1, Some(4)));
    }
    if cmd.data.len() < param_len {
        return Err(Sense::invalid_field_in_cdb(len_byte, Some(7)));
    }
    let mut list = vec![0u8; param_len];
    cmd.data.copy_to(0, &mut list);

    let header_len = if ten { 8 } else { 4 };
    if list.len() < header_len {
        return Err(Sense::param_list_length_error());
    }
    let (bdl, bdl_at, long) = if ten {
        (be(&list, 6, 2) as usize, 6, be(&list, 4, 1) & 1 == 1)
    } else {
        (be(&list, 3, 1) as usize, 3, false)
    };
    let want_bdl = if long { 16 } else { 8 };
    if bdl != 0 && bdl != want_bdl {
        return Err(Sense::invalid_field_in_param_list(bdl_at, Some(7)));
    }
    let pages_at = header_len + bdl;
    if list.len() < pages_at {
        return Err(Sense::param_list_length_error());
    }
    if bdl != 0 {
        check_block_descriptor(emu, &list, header_len, long)?;
    }

    let mut o = pages_at;
    while o < list.len() {
        let b0 = be(&list, o, 1) as u8;
        let code = b0 & 0x3F;
        if b0 & 0x40 != 0 {
            // Sub-page format: we have no sub-pages.
            if list.len() < o + 4 {
                return Err(Sense::param_list_length_error());
            }
            return Err(Sense::invalid_field_in_param_list(at16(o), Some(6)));
        }
        if list.len() < o + 2 {
            return Err(Sense::param_list_length_error());
        }
        let plen = be(&list, o + 1, 1) as usize;
        let ours = page(emu, code, Pc::Current)
            .ok_or(Sense::invalid_field_in_param_list(at16(o), Some(5)))?;
        if plen + 2 != ours.len() {
            return Err(Sense::invalid_field_in_param_list(at16(o + 1), Some(7)));
        }
        let theirs = list
            .get(o + 2..o + 2 + plen)
            .ok_or(Sense::param_list_length_error())?;
        let diff = theirs
            .iter()
            .zip(ours.iter().skip(2))
            .enumerate()
            .find(|(_, (a, b))| a != b);
        if let Some((k, (a, b))) = diff {
            let bit = 7 - (a ^ b).leading_zeros() as u8;
            return Err(Sense::invalid_field_in_param_list(
                at16(o + 2 + k),
                Some(bit),
            ));
        }
        o += 2 + plen;
    }
    Ok(Done::Good)
}

/// A block descriptor in MODE SELECT may restate the current geometry (or give 0 blocks, which
/// means "keep"); anything else would be a format change we do not do.
fn check_block_descriptor(emu: &Emulator, list: &[u8], at: usize, long: bool) -> Result<(), Sense> {
    let (blocks, blocks_cur, len, len_at) = if long {
        (
            be(list, at, 8),
            emu.num_blocks(),
            be(list, at + 12, 4),
            at + 12,
        )
    } else {
        (
            be(list, at, 4),
            emu.num_blocks().min(u64::from(u32::MAX)),
            be(list, at + 5, 3),
            at + 5,
        )
    };
    if blocks != 0 && blocks != blocks_cur {
        return Err(Sense::invalid_field_in_param_list(at16(at), Some(7)));
    }
    if len != u64::from(emu.block_size()) {
        return Err(Sense::invalid_field_in_param_list(at16(len_at), Some(7)));
    }
    Ok(())
}
