//! # Sense data: what went wrong with a command
//!
//! When a command ends in CHECK CONDITION status, the initiator learns *why* from **sense data**.
//! Its core is a triple:
//! - the **sense key** (4 bits): the broad class, e.g. ILLEGAL REQUEST (5, the initiator sent
//!   something we refuse), MEDIUM ERROR (3), UNIT ATTENTION (6, "something changed, look again");
//! - the **additional sense code** (ASC) and its **qualifier** (ASCQ): the precise reason, e.g.
//!   ASC/ASCQ 24h/00h INVALID FIELD IN CDB, 21h/00h LOGICAL BLOCK ADDRESS OUT OF RANGE.
//!
//! Sense data is written as `key/ASC/ASCQ` in hex throughout tcmu-warden, e.g. `05/24/00`.
//!
//! Two optional parts matter to us:
//! - the **information** field: for MISCOMPARE, the byte offset of the first difference;
//! - the **sense-key-specific** field: for ILLEGAL REQUEST, a *field pointer* naming the byte
//!   (and optionally the bit) of the CDB (command descriptor block, the command's bytes) or of the
//!   parameter list that was rejected, so the initiator's logs say exactly what was wrong.
//!
//! We build **fixed-format** sense (response code 70h, 18 bytes; SPC-4 §4.5.3), which every
//! initiator understands, and descriptor format (72h) only when REQUEST SENSE asks for it.
//!
//! This module owns the encoding; it never decides *which* sense a command gets (that is the
//! emulation's job) and never allocates more than the 96 bytes a TCMU completion can carry.

/// Sense keys (SPC-4 table 47).
pub mod key {
    /// No error to report.
    pub const NO_SENSE: u8 = 0x0;
    /// The logical unit cannot be accessed right now.
    pub const NOT_READY: u8 = 0x2;
    /// A flaw in the medium or the data on it (unrecoverable read or write).
    pub const MEDIUM_ERROR: u8 = 0x3;
    /// A device failure not attributable to the medium.
    pub const HARDWARE_ERROR: u8 = 0x4;
    /// The initiator sent something invalid.
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    /// Something about the logical unit changed (reset, capacity...).
    pub const UNIT_ATTENTION: u8 = 0x6;
    /// A write was refused (write protection, no space).
    pub const DATA_PROTECT: u8 = 0x7;
    /// An EXTENDED COPY stopped because of an error at a copy source or destination.
    pub const COPY_ABORTED: u8 = 0xA;
    /// The command was aborted.
    pub const ABORTED_COMMAND: u8 = 0xB;
    /// Source data did not match the medium (VERIFY, COMPARE AND WRITE).
    pub const MISCOMPARE: u8 = 0xE;
}

/// Where an ILLEGAL REQUEST points: a byte (and optionally a bit) of the CDB or the parameter list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldPointer {
    /// `true`: the offending field is in the CDB (C/D = 1); `false`: in the parameter list.
    pub in_cdb: bool,
    /// Byte offset of the field (its first byte).
    pub byte: u16,
    /// Bit (0..=7) of the field's most significant bit, when meaningful.
    pub bit: Option<u8>,
}

/// Sense data of a CHECK CONDITION.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// Sense key (see [`key`]).
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// The information field, when valid (e.g. miscompare offset).
    pub info: Option<u64>,
    /// The sense-key-specific field pointer (ILLEGAL REQUEST only).
    pub field: Option<FieldPointer>,
}

/// Length of the fixed-format sense data we produce.
pub const FIXED_LEN: usize = 18;

impl Sense {
    /// Sense with the given key, ASC and ASCQ and nothing else.
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            info: None,
            field: None,
        }
    }

    /// The same sense with the information field set.
    pub const fn with_info(mut self, info: u64) -> Sense {
        self.info = Some(info);
        self
    }

    /// 00/00/00 NO ADDITIONAL SENSE INFORMATION.
    pub const fn no_sense() -> Sense {
        Sense::new(key::NO_SENSE, 0x00, 0x00)
    }

    /// 05/20/00 ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.
    pub const fn invalid_opcode() -> Sense {
        Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00)
    }

    /// 05/24/00 ILLEGAL REQUEST, INVALID FIELD IN CDB, pointing at `byte` (and `bit`).
    pub const fn invalid_field_in_cdb(byte: u16, bit: Option<u8>) -> Sense {
        let mut s = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
        s.field = Some(FieldPointer {
            in_cdb: true,
            byte,
            bit,
        });
        s
    }

    /// 05/26/00 ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST, pointing at `byte` (and `bit`).
    pub const fn invalid_field_in_param_list(byte: u16, bit: Option<u8>) -> Sense {
        let mut s = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
        s.field = Some(FieldPointer {
            in_cdb: false,
            byte,
            bit,
        });
        s
    }

    /// 05/26/`ascq` ILLEGAL REQUEST with one of the INVALID FIELD IN PARAMETER LIST family's
    /// qualifiers (e.g. 07h UNSUPPORTED TARGET DESCRIPTOR TYPE CODE), pointing at `byte`/`bit`
    /// of the parameter list.
    pub const fn param_list_field(ascq: u8, byte: u16, bit: Option<u8>) -> Sense {
        let mut s = Sense::invalid_field_in_param_list(byte, bit);
        s.ascq = ascq;
        s
    }

    /// 05/26/06 ILLEGAL REQUEST, TOO MANY TARGET DESCRIPTORS (EXTENDED COPY).
    pub const fn too_many_target_descriptors() -> Sense {
        Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x06)
    }

    /// 05/26/08 ILLEGAL REQUEST, TOO MANY SEGMENT DESCRIPTORS (EXTENDED COPY).
    pub const fn too_many_segment_descriptors() -> Sense {
        Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x08)
    }

    /// 05/00/16 ILLEGAL REQUEST, OPERATION IN PROGRESS (an EXTENDED COPY with the same list
    /// identifier is still running).
    pub const fn operation_in_progress() -> Sense {
        Sense::new(key::ILLEGAL_REQUEST, 0x00, 0x16)
    }

    /// 0A/08/04 COPY ABORTED, UNREACHABLE COPY TARGET: a segment names a copy target the
    /// parameter list does not describe.
    pub const fn unreachable_copy_target() -> Sense {
        Sense::new(key::COPY_ABORTED, 0x08, 0x04)
    }

    /// 0A/0D/02 COPY ABORTED, COPY TARGET DEVICE NOT REACHABLE: a copy target is not served by
    /// this process, or the blocks asked for do not exist on it.
    pub const fn copy_target_not_reachable() -> Sense {
        Sense::new(key::COPY_ABORTED, 0x0D, 0x02)
    }

    /// 0A/0D/03 COPY ABORTED, INCORRECT COPY TARGET DEVICE TYPE: the descriptor's device type
    /// or block length does not match the device.
    pub const fn incorrect_copy_target_type() -> Sense {
        Sense::new(key::COPY_ABORTED, 0x0D, 0x03)
    }

    /// 05/1A/00 ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR.
    pub const fn param_list_length_error() -> Sense {
        Sense::new(key::ILLEGAL_REQUEST, 0x1A, 0x00)
    }

    /// 05/21/00 ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const fn lba_out_of_range() -> Sense {
        Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00)
    }

    /// 0E/1D/00 MISCOMPARE DURING VERIFY OPERATION, with the offset of the first differing byte.
    pub const fn miscompare(offset: u64) -> Sense {
        Sense::new(key::MISCOMPARE, 0x1D, 0x00).with_info(offset)
    }

    /// 02/04/03 NOT READY, LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED.
    pub const fn not_ready_manual_intervention() -> Sense {
        Sense::new(key::NOT_READY, 0x04, 0x03)
    }

    /// 02/04/0A NOT READY, LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION: the
    /// backend is unreachable for now (a network handler's server went away). Linux answers it
    /// as a transport error, which dm-multipath fails over on.
    pub const fn not_ready_transition() -> Sense {
        Sense::new(key::NOT_READY, 0x04, 0x0A)
    }

    /// 06/29/00 UNIT ATTENTION, POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
    pub const fn power_on_reset() -> Sense {
        Sense::new(key::UNIT_ATTENTION, 0x29, 0x00)
    }

    /// 06/2A/09 UNIT ATTENTION, CAPACITY DATA HAS CHANGED.
    pub const fn capacity_changed() -> Sense {
        Sense::new(key::UNIT_ATTENTION, 0x2A, 0x09)
    }

    /// 03/11/00 MEDIUM ERROR, UNRECOVERED READ ERROR.
    pub const fn read_error() -> Sense {
        Sense::new(key::MEDIUM_ERROR, 0x11, 0x00)
    }

    /// 03/0C/00 MEDIUM ERROR, WRITE ERROR.
    pub const fn write_error() -> Sense {
        Sense::new(key::MEDIUM_ERROR, 0x0C, 0x00)
    }

    /// 07/27/07 DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT (the backing store is full).
    pub const fn space_allocation_failed() -> Sense {
        Sense::new(key::DATA_PROTECT, 0x27, 0x07)
    }

    /// 07/27/00 DATA PROTECT, WRITE PROTECTED.
    pub const fn write_protected() -> Sense {
        Sense::new(key::DATA_PROTECT, 0x27, 0x00)
    }

    /// 04/44/00 HARDWARE ERROR, INTERNAL TARGET FAILURE.
    pub const fn internal_target_failure() -> Sense {
        Sense::new(key::HARDWARE_ERROR, 0x44, 0x00)
    }

    /// The three sense-key-specific bytes, if any.
    fn sks_bytes(&self) -> Option<[u8; 3]> {
        let f = self.field?;
        let mut b0 = 0x80; // SKSV
        if f.in_cdb {
            b0 |= 0x40; // C/D
        }
        if let Some(bit) = f.bit {
            b0 |= 0x08 | (bit & 0x07); // BPV + bit pointer
        }
        let [hi, lo] = f.byte.to_be_bytes();
        Some([b0, hi, lo])
    }

    /// Fixed-format sense bytes (response code 70h, current error), 18 bytes.
    ///
    /// The information field is 4 bytes wide in this format: a larger value is left out and
    /// the VALID bit cleared, as SPC-4 requires.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(FIXED_LEN);
        let info = self.info.and_then(|i| u32::try_from(i).ok());
        b.push(if info.is_some() { 0xF0 } else { 0x70 });
        b.push(0); // obsolete
        b.push(self.key & 0x0F);
        b.extend_from_slice(&info.unwrap_or(0).to_be_bytes());
        b.push((FIXED_LEN - 8) as u8); // additional sense length
        b.extend_from_slice(&[0; 4]); // command-specific information
        b.push(self.asc);
        b.push(self.ascq);
        b.push(0); // field replaceable unit code
        b.extend_from_slice(&self.sks_bytes().unwrap_or([0; 3]));
        b
    }

    /// Descriptor-format sense bytes (response code 72h), with an information descriptor and a
    /// sense-key-specific descriptor when those are present. At most 8 + 12 + 8 = 28 bytes.
    pub fn to_descriptor_bytes(&self) -> Vec<u8> {
        let mut b = vec![0x72, self.key & 0x0F, self.asc, self.ascq, 0, 0, 0, 0];
        if let Some(info) = self.info {
            b.extend_from_slice(&[0x00, 0x0A, 0x80, 0x00]);
            b.extend_from_slice(&info.to_be_bytes());
        }
        if let Some(sks) = self.sks_bytes() {
            b.extend_from_slice(&[0x02, 0x06, 0x00, 0x00]);
            b.extend_from_slice(&sks);
            b.push(0);
        }
        let additional = b.len().saturating_sub(8);
        if let Some(len) = b.get_mut(7) {
            *len = u8::try_from(additional).unwrap_or(u8::MAX);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_layout() {
        let b = Sense::invalid_field_in_cdb(0x0102, Some(5)).to_bytes();
        assert_eq!(b.len(), FIXED_LEN);
        assert_eq!(b[0], 0x70);
        assert_eq!(b[2], 0x05);
        assert_eq!(b[7], 10);
        assert_eq!((b[12], b[13]), (0x24, 0x00));
        assert_eq!(b[15], 0x80 | 0x40 | 0x08 | 5);
        assert_eq!((b[16], b[17]), (0x01, 0x02));
    }

    #[test]
    fn param_list_pointer_has_cd_clear_and_no_bpv_without_bit() {
        let b = Sense::invalid_field_in_param_list(7, None).to_bytes();
        assert_eq!((b[12], b[13]), (0x26, 0x00));
        assert_eq!(b[15], 0x80);
        assert_eq!((b[16], b[17]), (0, 7));
    }

    #[test]
    fn information_field_sets_valid() {
        let b = Sense::miscompare(0x1234_5678).to_bytes();
        assert_eq!(b[0], 0xF0);
        assert_eq!(b[2], 0x0E);
        assert_eq!(&b[3..7], &[0x12, 0x34, 0x56, 0x78]);
        assert_eq!(b[15], 0, "no sense-key-specific data");
        // Too wide for fixed format: VALID clear, field zero.
        let b = Sense::miscompare(1 << 40).to_bytes();
        assert_eq!(b[0], 0x70);
        assert_eq!(&b[3..7], &[0, 0, 0, 0]);
    }

    #[test]
    fn descriptor_format_layout() {
        let b = Sense::miscompare(9).to_descriptor_bytes();
        assert_eq!(&b[..4], &[0x72, 0x0E, 0x1D, 0x00]);
        assert_eq!(b[7] as usize, b.len() - 8);
        assert_eq!(&b[8..12], &[0x00, 0x0A, 0x80, 0x00]);
        assert_eq!(&b[12..20], &9u64.to_be_bytes());
        let b = Sense::invalid_field_in_cdb(3, Some(7)).to_descriptor_bytes();
        assert_eq!(b.len(), 16);
        assert_eq!(&b[8..12], &[0x02, 0x06, 0x00, 0x00]);
        assert_eq!(&b[12..15], &[0xCF, 0x00, 0x03]);
        assert_eq!(
            Sense::no_sense().to_descriptor_bytes(),
            vec![0x72, 0, 0, 0, 0, 0, 0, 0]
        );
    }
}
