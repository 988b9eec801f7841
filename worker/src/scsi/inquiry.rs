//! # INQUIRY: who we are
//!
//! INQUIRY returns either the **standard inquiry data** (device type, SCSI version, vendor,
//! product, revision) or, with EVPD set, one **VPD page** (vital product data: fixed facts about
//! the LU, by page code):
//! - 00h supported VPD pages;
//! - 80h unit serial number;
//! - 83h device identification: *designators* that name the LU worldwide. We give an NAA IEEE
//!   Registered Extended designator (NAA = Network Address Authority format 6: an IEEE company
//!   ID plus a vendor-chosen 100-bit value) and a T10 vendor ID designator ("LIO-ORG" and the
//!   serial). Linux builds `/dev/disk/by-id/wwn-0x6...` and multipath WWIDs from the NAA, so it
//!   must be stable: it is a pure function of the unit serial;
//! - 86h extended INQUIRY data: which task attributes we honour (SIMPLE only: commands run
//!   concurrently, so ORDERED and HEAD OF QUEUE ordering is not provided) and whether the device
//!   has a volatile cache (V_SUP follows WCE);
//! - B0h block limits (largest transfer, UNMAP and WRITE SAME limits);
//! - B1h block device characteristics (we say: not rotating);
//! - B2h logical block provisioning (whether UNMAP / WRITE SAME with UNMAP are supported: thin
//!   provisioning).
//!
//! This module owns the content of those pages; it never reads device data.

use super::block::{
    MAX_UNMAP_DESCRIPTORS, max_compare_write_blocks, max_unmap_blocks, max_write_same_blocks,
};
use super::cdb::Cdb;
use super::unit::{Done, Emulator, data_in};
use tcmu_warden_sdk::Command;
use tcmu_warden_sdk::sense::Sense;

/// T10 vendor identification of LIO-style targets.
pub const VENDOR: &[u8; 8] = b"LIO-ORG ";
/// IEEE company ID used in the NAA designator (the one LIO uses, so designators match what the
/// kernel's own emulation reports for the same serial).
pub const COMPANY_ID: u32 = 0x00_1405;
/// SCSI version claimed: SPC-4.
pub const VERSION_SPC4: u8 = 0x06;
/// Longest unit serial we report (keeps the T10 designator within its one-byte length).
pub const MAX_SERIAL_LEN: usize = 240;

const PAGE_SUPPORTED: u8 = 0x00;
const PAGE_SERIAL: u8 = 0x80;
const PAGE_DEVICE_ID: u8 = 0x83;
const PAGE_EXTENDED_INQUIRY: u8 = 0x86;
const PAGE_BLOCK_LIMITS: u8 = 0xB0;
const PAGE_BLOCK_CHARACTERISTICS: u8 = 0xB1;
const PAGE_PROVISIONING: u8 = 0xB2;
const PAGES: [u8; 7] = [
    PAGE_SUPPORTED,
    PAGE_SERIAL,
    PAGE_DEVICE_ID,
    PAGE_EXTENDED_INQUIRY,
    PAGE_BLOCK_LIMITS,
    PAGE_BLOCK_CHARACTERISTICS,
    PAGE_PROVISIONING,
];

/// Version descriptors in standard INQUIRY data: SAM-5, SPC-4, SBC-3.
const VERSION_DESCRIPTORS: [u16; 3] = [0x00A0, 0x0460, 0x04C0];

/// INQUIRY (12h). CMDDT is outside the usage mask (rejected by the dispatcher); EVPD=0 with a
/// non-zero page code and unknown VPD pages are INVALID FIELD IN CDB pointing at the page code.
pub fn inquiry(emu: &Emulator, cmd: &mut Command<'_>, cdb: Cdb<'_>) -> Result<Done, Sense> {
    let evpd = cdb.bit(1, 0);
    let page = cdb.u8(2);
    let alloc = usize::from(cdb.be16(3));
    let resp = if evpd {
        vpd_page(emu, page).ok_or(Sense::invalid_field_in_cdb(2, Some(7)))?
    } else if page != 0 {
        return Err(Sense::invalid_field_in_cdb(2, Some(7)));
    } else {
        standard(emu)
    };
    Ok(data_in(cmd, &resp, alloc))
}

/// `s` as exactly `n` bytes of printable ASCII: unprintable characters become `?`, short strings
/// are padded with spaces, long ones cut.
fn ascii_field(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s.bytes().map(printable).take(n).collect();
    v.resize(n, b' ');
    v
}

fn printable(b: u8) -> u8 {
    if (0x20..0x7F).contains(&b) { b } else { b'?' }
}

/// The unit serial as reported: the configured one, or the device name when none is set (so
/// that the NAA designator still differs between devices), printable ASCII, at most
/// [`MAX_SERIAL_LEN`] bytes.
pub fn effective_serial(emu: &Emulator) -> Vec<u8> {
    serial_of(emu.serial(), emu.name())
}

/// [`effective_serial`] from the configured serial and the device name.
pub fn serial_of(serial: &str, name: &str) -> Vec<u8> {
    let s = if serial.is_empty() { name } else { serial };
    s.bytes().map(printable).take(MAX_SERIAL_LEN).collect()
}

/// Standard INQUIRY data: 96 bytes (36 mandatory plus version descriptors).
pub fn standard(emu: &Emulator) -> Vec<u8> {
    let mut b = Vec::with_capacity(96);
    b.push(0x00); // peripheral qualifier 0 (connected), device type 0 (direct access block)
    b.push(0x00); // not removable
    b.push(VERSION_SPC4);
    b.push(0x12); // HISUP (hierarchical LUNs), response data format 2
    b.push(96 - 5); // additional length
    b.push(0x08); // 3PC: EXTENDED COPY; no SCCS, ACC, TPGS, PROTECT
    b.push(0x00); // no ENCSERV, MULTIP
    b.push(0x02); // CMDQUE: command queuing
    b.extend_from_slice(VENDOR);
    b.extend_from_slice(&ascii_field(&format!("TCMU {}", emu.subtype()), 16));
    b.extend_from_slice(&ascii_field(
        &format!(
            "{}.{}",
            env!("CARGO_PKG_VERSION_MAJOR"),
            env!("CARGO_PKG_VERSION_MINOR")
        ),
        4,
    ));
    b.resize(58, 0); // vendor specific 36..56, clocking/QAS/IUS, reserved
    for v in VERSION_DESCRIPTORS {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.resize(96, 0);
    b
}

/// A VPD page: header (device type, page code, 16-bit page length) and `body`.
fn page(code: u8, body: &[u8]) -> Vec<u8> {
    let mut b = vec![0x00, code];
    b.extend_from_slice(&u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes());
    b.extend_from_slice(body);
    b
}

/// VPD page `code`, or None if we do not have it.
pub fn vpd_page(emu: &Emulator, code: u8) -> Option<Vec<u8>> {
    match code {
        PAGE_SUPPORTED => Some(page(code, &PAGES)),
        PAGE_SERIAL => Some(page(code, &effective_serial(emu))),
        PAGE_DEVICE_ID => Some(page(code, &device_identification(emu))),
        PAGE_EXTENDED_INQUIRY => Some(page(code, &extended_inquiry(emu))),
        PAGE_BLOCK_LIMITS => Some(page(code, &block_limits(emu))),
        PAGE_BLOCK_CHARACTERISTICS => {
            let mut body = vec![0u8; 0x3C];
            if let Some(rate) = body.get_mut(0..2) {
                rate.copy_from_slice(&1u16.to_be_bytes()); // non-rotating medium
            }
            Some(page(code, &body))
        }
        PAGE_PROVISIONING => Some(page(code, &provisioning(emu))),
        _ => None,
    }
}

/// Designation descriptors of page 83h.
fn device_identification(emu: &Emulator) -> Vec<u8> {
    let serial = effective_serial(emu);
    let mut b = Vec::new();
    // NAA: code set 1 (binary), association 0 (the LU), designator type 3 (NAA).
    b.extend_from_slice(&[0x01, 0x03, 0x00, 16]);
    b.extend_from_slice(&emu.designator());
    // T10 vendor ID: code set 2 (ASCII), association 0, designator type 1.
    let t10_len = VENDOR.len() + serial.len();
    b.extend_from_slice(&[0x02, 0x01, 0x00, u8::try_from(t10_len).unwrap_or(u8::MAX)]);
    b.extend_from_slice(VENDOR);
    b.extend_from_slice(&serial);
    b
}

/// Number of 4-bit digits in the NAA designator's vendor-specific part (36 + 64 bits).
const NAA_NIBBLES: usize = 25;

/// The 16-byte NAA IEEE Registered Extended designator for a unit serial.
///
/// NAA 6 and the company ID fill the first 28 bits; the remaining 100 bits (25 hex digits) are:
/// - when the serial contains at least 25 hex digits (LIO's default serials are UUIDs): those
///   digits, in order, ignoring other characters, which is how LIO itself derives the
///   designator, so a device keeps its WWN when it moves here from the kernel's emulation;
/// - otherwise a 100-bit FNV-1a hash of the whole serial, so short serials such as "disk1" and
///   "dsk1" do not collide the way their few hex digits would.
pub fn naa_designator(serial: &[u8]) -> [u8; 16] {
    let hex: Vec<u8> = serial
        .iter()
        .filter_map(|&c| char::from(c).to_digit(16))
        .filter_map(|d| u8::try_from(d).ok())
        .take(NAA_NIBBLES)
        .collect();
    let nibbles: Vec<u8> = if hex.len() == NAA_NIBBLES {
        hex
    } else {
        let h = fnv1a_128(serial);
        (0..NAA_NIBBLES)
            .map(|i| ((h >> (124 - 4 * i)) & 0xF) as u8)
            .collect()
    };
    let mut all = Vec::with_capacity(32);
    all.push(0x6);
    for shift in [20u32, 16, 12, 8, 4, 0] {
        all.push(((COMPANY_ID >> shift) & 0xF) as u8);
    }
    all.extend_from_slice(&nibbles);
    let mut out = [0u8; 16];
    for (byte, pair) in out.iter_mut().zip(all.chunks(2)) {
        let hi = pair.first().copied().unwrap_or(0);
        let lo = pair.get(1).copied().unwrap_or(0);
        *byte = (hi << 4) | lo;
    }
    out
}

/// FNV-1a over 128 bits (a fixed, documented function: the designator must never change with
/// the toolchain, which rules out `std`'s hasher).
fn fnv1a_128(data: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013B;
    data.iter()
        .fold(OFFSET, |h, &b| (h ^ u128::from(b)).wrapping_mul(PRIME))
}

fn put(b: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = at
        .checked_add(bytes.len())
        .and_then(|end| b.get_mut(at..end))
    {
        dst.copy_from_slice(bytes);
    }
}

/// Body of the extended INQUIRY data page (86h), 60 bytes: no protection information, SIMPSUP
/// (the SIMPLE task attribute), V_SUP when the device has a volatile write cache; everything
/// else (ORDSUP, HEADSUP, LUICLR, microcode activation, referrals, ...) clear.
fn extended_inquiry(emu: &Emulator) -> Vec<u8> {
    let mut b = vec![0u8; 0x3C];
    put(&mut b, 1, &[0x01]); // SIMPSUP
    if emu.write_cache() {
        put(&mut b, 2, &[0x01]); // V_SUP
    }
    b
}

/// Body of the block limits page (B0h), 60 bytes.
fn block_limits(emu: &Emulator) -> Vec<u8> {
    let mut b = vec![0u8; 0x3C];
    let max = emu.max_transfer_blocks();
    let max_field = if max == u32::MAX { 0 } else { max };
    put(&mut b, 0, &[0x01]); // WSNZ: WRITE SAME with 0 blocks is not "to the end"
    put(&mut b, 1, &[max_compare_write_blocks(emu)]);
    let granularity = (4096 / emu.block_size()).max(1);
    put(
        &mut b,
        2,
        &u16::try_from(granularity).unwrap_or(1).to_be_bytes(),
    );
    put(&mut b, 4, &max_field.to_be_bytes()); // MAXIMUM TRANSFER LENGTH
    put(&mut b, 8, &max_field.to_be_bytes()); // OPTIMAL TRANSFER LENGTH
    let caps = emu.caps();
    if caps.unmap {
        put(&mut b, 16, &max_unmap_blocks(emu).to_be_bytes());
        put(&mut b, 20, &MAX_UNMAP_DESCRIPTORS.to_be_bytes());
        put(&mut b, 24, &caps.unmap_granularity.to_be_bytes());
    }
    put(&mut b, 32, &max_write_same_blocks(emu).to_be_bytes());
    b
}

/// Body of the logical block provisioning page (B2h), 4 bytes.
fn provisioning(emu: &Emulator) -> Vec<u8> {
    let caps = emu.caps();
    let mut flags = 0u8;
    let mut ptype = 0u8;
    if caps.unmap {
        flags |= 0x80 | 0x40 | 0x20; // LBPU, LBPWS, LBPWS10
        if caps.unmap_reads_zero {
            flags |= 0x04; // LBPRZ = 001b: unmapped blocks read as zeros
        }
        ptype = 0x02; // thin provisioned
    }
    vec![0x00, flags, ptype, 0x00]
}
