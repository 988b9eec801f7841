//! # CDB decoding
//!
//! A **CDB** (command descriptor block) is the 6 to 16 bytes an initiator sends to describe one
//! SCSI command. Byte 0 is the **operation code** (opcode); its top three bits (the *group code*)
//! fix the CDB's length (6, 10, 12 or 16 bytes). Some opcodes carry several commands told apart
//! by a **service action** in the low five bits of byte 1 (e.g. 9Eh/10h is READ CAPACITY (16)).
//! The last byte is the **CONTROL** byte (NACA and link bits, which we do not support).
//!
//! Multi-byte fields are big-endian. Block commands address the medium in **logical blocks**
//! (the device's block size, 512..=65536 bytes) by **LBA** (logical block address, 0-based).
//!
//! This module owns reading fields out of CDB bytes with checked access (including the view that
//! ignores the former SCSI-2 LUN field, [`SCSI2_LUN_MASK`]), the generic check that no bit is set
//! outside a command's CDB usage mask (the same mask REPORT SUPPORTED OPERATION CODES returns),
//! and decoding of the READ/WRITE-style families into typed values. It never executes anything
//! and never panics, whatever the bytes.

use tcmu_warden_sdk::sense::Sense;

/// Opcodes the emulation knows (SPC-4, SBC-3).
pub mod op {
    /// TEST UNIT READY.
    pub const TEST_UNIT_READY: u8 = 0x00;
    /// REQUEST SENSE.
    pub const REQUEST_SENSE: u8 = 0x03;
    /// FORMAT UNIT.
    pub const FORMAT_UNIT: u8 = 0x04;
    /// READ (6).
    pub const READ_6: u8 = 0x08;
    /// WRITE (6).
    pub const WRITE_6: u8 = 0x0A;
    /// INQUIRY.
    pub const INQUIRY: u8 = 0x12;
    /// MODE SELECT (6).
    pub const MODE_SELECT_6: u8 = 0x15;
    /// MODE SENSE (6).
    pub const MODE_SENSE_6: u8 = 0x1A;
    /// START STOP UNIT.
    pub const START_STOP_UNIT: u8 = 0x1B;
    /// PREVENT ALLOW MEDIUM REMOVAL.
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1E;
    /// READ CAPACITY (10).
    pub const READ_CAPACITY_10: u8 = 0x25;
    /// READ (10).
    pub const READ_10: u8 = 0x28;
    /// WRITE (10).
    pub const WRITE_10: u8 = 0x2A;
    /// WRITE AND VERIFY (10).
    pub const WRITE_VERIFY_10: u8 = 0x2E;
    /// VERIFY (10).
    pub const VERIFY_10: u8 = 0x2F;
    /// PRE-FETCH (10).
    pub const PRE_FETCH_10: u8 = 0x34;
    /// SYNCHRONIZE CACHE (10).
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    /// READ DEFECT DATA (10).
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    /// WRITE SAME (10).
    pub const WRITE_SAME_10: u8 = 0x41;
    /// UNMAP.
    pub const UNMAP: u8 = 0x42;
    /// MODE SELECT (10).
    pub const MODE_SELECT_10: u8 = 0x55;
    /// MODE SENSE (10).
    pub const MODE_SENSE_10: u8 = 0x5A;
    /// EXTENDED COPY (LID1 is service action 00h).
    pub const EXTENDED_COPY: u8 = 0x83;
    /// RECEIVE COPY RESULTS (service actions: COPY STATUS 00h, OPERATING PARAMETERS 03h).
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    /// READ (16).
    pub const READ_16: u8 = 0x88;
    /// COMPARE AND WRITE.
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    /// WRITE (16).
    pub const WRITE_16: u8 = 0x8A;
    /// ORWRITE (16).
    pub const ORWRITE_16: u8 = 0x8B;
    /// WRITE AND VERIFY (16).
    pub const WRITE_VERIFY_16: u8 = 0x8E;
    /// VERIFY (16).
    pub const VERIFY_16: u8 = 0x8F;
    /// PRE-FETCH (16).
    pub const PRE_FETCH_16: u8 = 0x90;
    /// SYNCHRONIZE CACHE (16).
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    /// WRITE SAME (16).
    pub const WRITE_SAME_16: u8 = 0x93;
    /// SERVICE ACTION IN (16): READ CAPACITY (16), GET LBA STATUS.
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    /// REPORT LUNS.
    pub const REPORT_LUNS: u8 = 0xA0;
    /// MAINTENANCE IN: REPORT SUPPORTED OPERATION CODES.
    pub const MAINTENANCE_IN: u8 = 0xA3;
    /// READ (12).
    pub const READ_12: u8 = 0xA8;
    /// WRITE (12).
    pub const WRITE_12: u8 = 0xAA;
    /// WRITE AND VERIFY (12).
    pub const WRITE_VERIFY_12: u8 = 0xAE;
    /// VERIFY (12).
    pub const VERIFY_12: u8 = 0xAF;
    /// READ DEFECT DATA (12).
    pub const READ_DEFECT_DATA_12: u8 = 0xB7;

    /// Service action of READ CAPACITY (16) under [`SERVICE_ACTION_IN_16`].
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
    /// Service action of GET LBA STATUS under [`SERVICE_ACTION_IN_16`].
    pub const SA_GET_LBA_STATUS: u8 = 0x12;
    /// Service action of REPORT SUPPORTED OPERATION CODES under [`MAINTENANCE_IN`].
    pub const SA_REPORT_SUPPORTED_OPCODES: u8 = 0x0C;
    /// Service action of EXTENDED COPY (LID1) under [`EXTENDED_COPY`].
    pub const SA_EXTENDED_COPY_LID1: u8 = 0x00;
    /// Service action of RECEIVE COPY STATUS (LID1) under [`RECEIVE_COPY_RESULTS`].
    pub const SA_COPY_STATUS_LID1: u8 = 0x00;
    /// Service action of RECEIVE COPY OPERATING PARAMETERS under [`RECEIVE_COPY_RESULTS`].
    pub const SA_COPY_OPERATING_PARAMETERS: u8 = 0x03;
}

/// Mask of the service-action bits in CDB byte 1.
pub const SA_MASK: u8 = 0x1F;

/// Bits 7..5 of CDB byte 1: the **LUN field of SCSI-2** (the logical unit number, i.e. which disk
/// behind the target the command is for), reserved since SCSI-3 moved the LUN into the transport.
///
/// Linux still writes the LUN there (`lun << 5 & 0xe0`, `scsi_dispatch_cmd()` in scsi_lib.c when
/// `sdev->lun_in_cdb`, and `scsi_eh_prep_cmnd()` in scsi_error.c) for every command to a device
/// whose SCSI level is SCSI-2 or lower. While it probes a LUN of a target it has not seen before,
/// it assumes that level (`scsi_alloc_target()` starts `starget->scsi_level` at `SCSI_2`, and
/// `scsi_sysfs_device_initialize()` sets `lun_in_cdb` from it) until its first INQUIRY answer says
/// otherwise: the probe INQUIRY of LUN 1 carries 20h in byte 1, of LUN 5 A0h. The commands that
/// ignore these bits are marked in the command table (see [`super::table`]); the dispatcher reads
/// them through [`Cdb::ignoring_scsi2_lun`].
pub const SCSI2_LUN_MASK: u8 = 0xE0;

/// Read-only, checked view of a CDB's bytes. Bytes past the end read as zero; the dispatcher
/// rejects CDBs shorter than the command's length before any command sees them, so that default
/// is never observable.
#[derive(Debug, Clone, Copy)]
pub struct Cdb<'a> {
    bytes: &'a [u8],
    /// Bits of byte 1 every reader sees as zero (the former SCSI-2 LUN field, for the commands
    /// that ignore it).
    ignored1: u8,
}

impl<'a> Cdb<'a> {
    /// A view of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Cdb<'a> {
        Cdb { bytes, ignored1: 0 }
    }

    /// The same CDB with the former SCSI-2 LUN field ([`SCSI2_LUN_MASK`]) read as zero by every
    /// accessor, so neither the reserved-bit check nor the command sees it.
    pub fn ignoring_scsi2_lun(self) -> Cdb<'a> {
        Cdb {
            ignored1: SCSI2_LUN_MASK,
            ..self
        }
    }

    /// The raw bytes, as the initiator sent them (ignored bits included).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Byte `i` (for byte 1, without the bits this view ignores).
    pub fn u8(&self, i: usize) -> u8 {
        let b = self.bytes.get(i).copied().unwrap_or(0);
        if i == 1 { b & !self.ignored1 } else { b }
    }

    /// Bit `bit` of byte `i`.
    pub fn bit(&self, i: usize, bit: u8) -> bool {
        self.u8(i) & (1u8 << (bit & 7)) != 0
    }

    /// Big-endian unsigned integer of `n` (1..=8) bytes starting at `i`.
    pub fn be(&self, i: usize, n: usize) -> u64 {
        (0..n.min(8)).fold(0u64, |acc, k| {
            (acc << 8) | u64::from(self.u8(i.saturating_add(k)))
        })
    }

    /// Big-endian u16 at `i`.
    pub fn be16(&self, i: usize) -> u16 {
        u16::from_be_bytes([self.u8(i), self.u8(i + 1)])
    }

    /// Big-endian u32 at `i`.
    pub fn be32(&self, i: usize) -> u32 {
        u32::from_be_bytes([self.u8(i), self.u8(i + 1), self.u8(i + 2), self.u8(i + 3)])
    }

    /// Big-endian u64 at `i`.
    pub fn be64(&self, i: usize) -> u64 {
        self.be(i, 8)
    }
}

/// Field boundaries of the CONTROL byte (the last CDB byte): vendor specific 7..6, reserved
/// 5..3, NACA 2, obsolete 1, LINK 0.
const CONTROL_SPLITS: u8 = 0x27;

/// Checks that `cdb` sets no bit outside `usage` (bytes 1..len; byte 0 is the opcode).
///
/// `has_sa` marks byte 1's low five bits as the service action, which the dispatcher has already
/// matched. `splits` lists, per byte, bits that begin a new field among the unused bits (see
/// [`field_msb`]). The error points at the most significant bit of the offending field.
pub fn check_usage(
    cdb: &Cdb<'_>,
    usage: &[u8],
    has_sa: bool,
    splits: &[(u8, u8)],
) -> Result<(), Sense> {
    for (i, &mask) in usage.iter().enumerate().skip(1) {
        let allowed = if i == 1 && has_sa {
            (mask & !SA_MASK) | SA_MASK
        } else {
            mask
        };
        let bad = cdb.u8(i) & !allowed;
        if bad != 0 {
            let top = 7 - bad.leading_zeros() as u8;
            let control = if i + 1 == usage.len() {
                CONTROL_SPLITS
            } else {
                0
            };
            let split = splits
                .iter()
                .filter(|(b, _)| usize::from(*b) == i)
                .fold(control, |acc, (_, m)| acc | m);
            let bit = field_msb(allowed, split, top);
            return Err(Sense::invalid_field_in_cdb(
                u16::try_from(i).unwrap_or(u16::MAX),
                Some(bit),
            ));
        }
    }
    Ok(())
}

/// The most significant bit of the unused field containing bit `bit`.
///
/// Unused bits of a byte (those not in `used`) are taken to form one field per contiguous run,
/// as reserved fields are drawn in SPC/SBC; `split` marks bits that start a separate field
/// although their neighbour above is unused too (e.g. INQUIRY's CMDDT bit below the reserved
/// bits 7..2).
pub fn field_msb(used: u8, split: u8, bit: u8) -> u8 {
    let mut b = bit.min(7);
    while b < 7 && split & (1 << b) == 0 && used & (1 << (b + 1)) == 0 {
        b += 1;
    }
    b
}

/// The block-access families' CDB layouts: where LBA and length sit, and how wide they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RwLayout {
    /// 6-byte CDB: 21-bit LBA in bytes 1..=3, 8-bit length in byte 4 (0 means 256).
    Six,
    /// 10-byte CDB: 32-bit LBA in bytes 2..=5, 16-bit length in bytes 7..=8.
    Ten,
    /// 12-byte CDB: 32-bit LBA in bytes 2..=5, 32-bit length in bytes 6..=9.
    Twelve,
    /// 16-byte CDB: 64-bit LBA in bytes 2..=9, 32-bit length in bytes 10..=13.
    Sixteen,
}

impl RwLayout {
    /// The layout of a READ/WRITE/VERIFY/WRITE AND VERIFY/SYNCHRONIZE CACHE/WRITE SAME opcode by
    /// its group code.
    pub fn of(opcode: u8) -> RwLayout {
        match opcode >> 5 {
            0 => RwLayout::Six,
            4 => RwLayout::Sixteen,
            5 => RwLayout::Twelve,
            _ => RwLayout::Ten,
        }
    }

    /// Byte offset of the length field (what a field pointer names).
    pub fn len_byte(self) -> u16 {
        match self {
            RwLayout::Six => 4,
            RwLayout::Ten => 7,
            RwLayout::Twelve => 6,
            RwLayout::Sixteen => 10,
        }
    }
}

/// The LBA and length of a block command, with the flags of byte 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRange {
    /// First logical block.
    pub lba: u64,
    /// Number of logical blocks (READ (6)/WRITE (6): 0 in the CDB is 256 here).
    pub blocks: u32,
    /// Byte offset of the length field in the CDB.
    pub len_byte: u16,
}

/// Decodes the LBA and length of a block command. `six_zero_is_256` applies the READ (6) /
/// WRITE (6) rule that a length of 0 means 256 blocks.
pub fn block_range(cdb: &Cdb<'_>, six_zero_is_256: bool) -> BlockRange {
    let layout = RwLayout::of(cdb.u8(0));
    let (lba, blocks) = match layout {
        RwLayout::Six => {
            let lba = cdb.be(1, 3) & 0x1F_FFFF;
            let n = u32::from(cdb.u8(4));
            (lba, if n == 0 && six_zero_is_256 { 256 } else { n })
        }
        RwLayout::Ten => (u64::from(cdb.be32(2)), u32::from(cdb.be16(7))),
        RwLayout::Twelve => (u64::from(cdb.be32(2)), cdb.be32(6)),
        RwLayout::Sixteen => (cdb.be64(2), cdb.be32(10)),
    };
    BlockRange {
        lba,
        blocks,
        len_byte: layout.len_byte(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_readers_are_big_endian_and_total() {
        let c = Cdb::new(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(c.be16(0), 0x0102);
        assert_eq!(c.be32(1), 0x0203_0405);
        assert_eq!(c.be64(1), 0x0203_0405_0607_0809);
        assert_eq!(c.be(2, 3), 0x03_0405);
        assert_eq!(c.u8(100), 0);
        assert_eq!(c.be32(7), 0x0809_0000);
        assert!(c.bit(0, 0));
        assert!(!c.bit(0, 1));
    }

    #[test]
    fn block_ranges_per_layout() {
        let r = block_range(&Cdb::new(&[0x08, 0xFF, 0x12, 0x34, 0, 0]), true);
        assert_eq!((r.lba, r.blocks, r.len_byte), (0x1F_1234, 256, 4));
        let r = block_range(&Cdb::new(&[0x28, 0, 0, 0, 1, 0, 0, 0, 8, 0]), true);
        assert_eq!((r.lba, r.blocks, r.len_byte), (256, 8, 7));
        let r = block_range(&Cdb::new(&[0xA8, 0, 0, 0, 0, 2, 0, 1, 0, 0, 0, 0]), true);
        assert_eq!((r.lba, r.blocks, r.len_byte), (2, 0x10000, 6));
        let mut c16 = [0u8; 16];
        c16[0] = 0x88;
        c16[2] = 0x80;
        c16[13] = 3;
        let r = block_range(&Cdb::new(&c16), true);
        assert_eq!((r.lba, r.blocks, r.len_byte), (1 << 63, 3, 10));
    }

    #[test]
    fn usage_check_points_at_field_msb() {
        // READ (10)-like mask: byte 1 uses bits 4..1; RDPROTECT (7..5) unused.
        let usage = [0x28, 0x1E, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x00];
        let ok = Cdb::new(&[0x28, 0x08, 1, 2, 3, 4, 0x1F, 0, 1, 0]);
        assert_eq!(check_usage(&ok, &usage, false, &[]), Ok(()));
        let bad = Cdb::new(&[0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(
            check_usage(&bad, &usage, false, &[]),
            Err(Sense::invalid_field_in_cdb(1, Some(7)))
        );
        let bad = Cdb::new(&[0x28, 0x01, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(
            check_usage(&bad, &usage, false, &[]),
            Err(Sense::invalid_field_in_cdb(1, Some(0)))
        );
        let naca = Cdb::new(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0x04]);
        assert_eq!(
            check_usage(&naca, &usage, false, &[]),
            Err(Sense::invalid_field_in_cdb(9, Some(2)))
        );
        let vendor = Cdb::new(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0x40]);
        assert_eq!(
            check_usage(&vendor, &usage, false, &[]),
            Err(Sense::invalid_field_in_cdb(9, Some(7)))
        );
    }

    #[test]
    fn scsi2_lun_view_hides_only_byte_1_bits_7_to_5() {
        // MODE SENSE (10) from LUN 5 of a SCSI-2 device: LLBAA, DBD and the LUN field set.
        let raw = [0x5A, 0xB8, 0x3F, 0, 0, 0, 0, 0, 0xFC, 0];
        let usage = [0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0];
        let strict = Cdb::new(&raw);
        let lenient = strict.ignoring_scsi2_lun();
        assert_eq!(strict.u8(1), 0xB8);
        assert_eq!(lenient.u8(1), 0x18);
        assert!(lenient.bit(1, 4) && lenient.bit(1, 3) && !lenient.bit(1, 5));
        assert_eq!(lenient.be16(0), 0x5A18);
        assert_eq!(lenient.be(1, 2), 0x183F);
        assert_eq!(lenient.u8(8), 0xFC);
        assert_eq!(lenient.bytes(), &raw);
        assert_eq!(
            check_usage(&strict, &usage, false, &[]),
            Err(Sense::invalid_field_in_cdb(1, Some(7)))
        );
        assert_eq!(check_usage(&lenient, &usage, false, &[]), Ok(()));
        // Other reserved bits of byte 1 stay visible.
        let low = [0x5A, 0xA1, 0x3F, 0, 0, 0, 0, 0, 0xFC, 0];
        assert_eq!(
            check_usage(&Cdb::new(&low).ignoring_scsi2_lun(), &usage, false, &[]),
            Err(Sense::invalid_field_in_cdb(1, Some(2)))
        );
    }

    #[test]
    fn splits_separate_adjacent_unused_fields() {
        // INQUIRY byte 1: reserved 7..2, CMDDT 1, EVPD 0 (used).
        assert_eq!(field_msb(0x01, 0x02, 1), 1);
        assert_eq!(field_msb(0x01, 0x02, 3), 7);
        assert_eq!(field_msb(0x01, 0x00, 1), 7);
    }

    #[test]
    fn service_action_bits_are_not_reserved() {
        let usage = [
            0x9E, 0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0x01, 0x00,
        ];
        let mut c = [0u8; 16];
        c[0] = 0x9E;
        c[1] = 0x10;
        assert_eq!(check_usage(&Cdb::new(&c), &usage, true, &[]), Ok(()));
        c[1] = 0x30;
        assert_eq!(
            check_usage(&Cdb::new(&c), &usage, true, &[]),
            Err(Sense::invalid_field_in_cdb(1, Some(7)))
        );
    }
}
