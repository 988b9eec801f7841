//! The former SCSI-2 LUN field (CDB byte 1, bits 7..5): ignored by the commands that had it in
//! SCSI-2 and keep it reserved today, still checked everywhere else.
//!
//! Linux writes `lun << 5` into byte 1 of every command to a device it takes for SCSI-2, which is
//! every LUN of a target it has not probed before, until that LUN's INQUIRY answers. Each test
//! below runs one command as a SPC-3 initiator sends it and as Linux sends it to LUNs 1, 2 and 5
//! (byte 1 ORed with 20h, 40h, A0h), each on a fresh device, and asserts the same outcome:
//! status, sense, data-in, what reached the handler and what the medium holds afterwards. Then it
//! sets another reserved bit next to the LUN bits, which must still be INVALID FIELD IN CDB.

use super::*;

/// The SCSI-2 LUN field of the LUNs Linux may probe this way: 1, 2 and 5 (bits 001b, 010b, 101b).
const LUN_BITS: [u8; 3] = [0x20, 0x40, 0xA0];

/// Everything observable about one command on a fresh device.
#[derive(Debug, PartialEq)]
struct Outcome {
    result: CommandResult,
    data_in: Vec<u8>,
    calls: Vec<Call>,
    medium: Vec<u8>,
}

/// The command's data phase.
#[derive(Clone, Copy)]
enum Data<'a> {
    None,
    In(usize),
    Out(&'a [u8]),
}

/// Runs `cdb` on a fresh 1 MiB device whose blocks hold a known pattern.
fn outcome(cdb: &[u8], data: Data<'_>) -> Outcome {
    let d = Dev::new();
    d.h.fill(0, &pattern(2048 * BS, 7));
    let (result, data_in) = match data {
        Data::None => (d.run(cdb), Vec::new()),
        Data::In(len) => d.run_in(cdb, len),
        Data::Out(bytes) => (d.run_out(cdb, bytes), Vec::new()),
    };
    Outcome {
        result,
        data_in,
        calls: d.h.calls(),
        medium: d.h.bytes(0, 2048 * BS),
    }
}

fn with_byte1(cdb: &[u8], bits: u8) -> Vec<u8> {
    let mut c = cdb.to_vec();
    c[1] |= bits;
    c
}

/// `cdb` (byte 1 bits 7..5 clear) gives the same outcome with the LUN field of LUNs 1, 2 and 5;
/// with `reserved` (byte, mask) also set it is INVALID FIELD IN CDB at `pointer` (byte, bit).
#[track_caller]
fn lun_field_ignored(cdb: &[u8], data: Data<'_>, reserved: (usize, u8), pointer: (u16, u8)) {
    assert_eq!(cdb[1] & 0xE0, 0, "the reference CDB has no LUN field");
    let reference = outcome(cdb, data);
    assert_good(&reference.result);
    for bits in LUN_BITS {
        let sent = with_byte1(cdb, bits);
        assert_eq!(
            outcome(&sent, data),
            reference,
            "byte 1 = {:02x}h: another outcome than with {:02x}h",
            sent[1],
            cdb[1]
        );
        let mut bad = sent.clone();
        bad[reserved.0] |= reserved.1;
        assert_bad_cdb_field(&outcome(&bad, data).result, pointer.0, pointer.1);
    }
}

#[test]
fn test_unit_ready() {
    lun_field_ignored(&[0x00, 0, 0, 0, 0, 0], Data::None, (1, 0x10), (1, 7));
}

#[test]
fn request_sense() {
    // DESC=1 (descriptor format) is kept: the LUN bits do not hide the real field.
    lun_field_ignored(
        &[0x03, 0x01, 0, 0, 252, 0],
        Data::In(252),
        (1, 0x02),
        (1, 7),
    );
    lun_field_ignored(
        &[0x03, 0x00, 0, 0, 252, 0],
        Data::In(252),
        (1, 0x08),
        (1, 7),
    );
}

#[test]
fn read_6() {
    lun_field_ignored(&rw6(0x08, 0x203, 4), Data::In(4 * BS), (5, 0x04), (5, 2));
}

#[test]
fn write_6() {
    let data = pattern(2 * BS, 99);
    lun_field_ignored(&rw6(0x0A, 0x7FE, 2), Data::Out(&data), (5, 0x04), (5, 2));
}

/// The top five bits of READ (6)/WRITE (6)'s LBA share byte 1 with the LUN field: with LUN 5's
/// bits set, LBA 1_0203h is still LBA 1_0203h.
#[test]
fn read_6_and_write_6_keep_the_lba_bits_of_byte_1() {
    let d = Dev::with(cfg(0x1_0210), HandlerCaps::default(), |_| {});
    let data = pattern(2 * BS, 5);
    assert_good(&d.run_out(&with_byte1(&rw6(0x0A, 0x1_0203, 2), 0xA0), &data));
    let (r, back) = d.run_in(&with_byte1(&rw6(0x08, 0x1_0203, 2), 0xA0), 2 * BS);
    assert_good(&r);
    assert_eq!(back, data);
    let off = 0x1_0203 * BS as u64;
    assert_eq!(
        d.h.calls(),
        vec![
            Call::Write {
                off,
                len: 2 * BS,
                slices: 1,
                durable: true
            },
            Call::Read {
                off,
                len: 2 * BS,
                slices: 1
            }
        ]
    );
}

#[test]
fn inquiry_standard_and_vpd() {
    // The probe's standard INQUIRY (36 bytes, then the full length), and a VPD page.
    lun_field_ignored(&inquiry(false, 0, 36), Data::In(36), (1, 0x04), (1, 7));
    lun_field_ignored(&inquiry(false, 0, 96), Data::In(96), (1, 0x10), (1, 7));
    lun_field_ignored(&inquiry(true, 0x83, 255), Data::In(255), (1, 0x04), (1, 7));
    // CMDDT (obsolete) is still refused.
    lun_field_ignored(&inquiry(false, 0, 36), Data::In(36), (1, 0x02), (1, 1));
}

/// A caching mode page (08h) with the write cache off: what the device has, so changes nothing.
fn caching_page() -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x08;
    p[1] = 0x12;
    p
}

#[test]
fn mode_select_6() {
    // PF=1, a 4-byte header and the caching page.
    let mut list = vec![0u8; 4];
    list.extend_from_slice(&caching_page());
    let cdb = [0x15, 0x10, 0, 0, list.len() as u8, 0];
    lun_field_ignored(&cdb, Data::Out(&list), (1, 0x02), (1, 3));
}

#[test]
fn mode_sense_6() {
    // All pages, with and without DBD (bit 3, next to the LUN field).
    lun_field_ignored(
        &[0x1A, 0x00, 0x3F, 0, 255, 0],
        Data::In(255),
        (1, 0x10),
        (1, 7),
    );
    lun_field_ignored(
        &[0x1A, 0x08, 0x3F, 0, 255, 0],
        Data::In(255),
        (1, 0x04),
        (1, 2),
    );
}

#[test]
fn start_stop_unit() {
    lun_field_ignored(&[0x1B, 0x01, 0, 0, 0x01, 0], Data::None, (1, 0x02), (1, 7));
}

#[test]
fn prevent_allow_medium_removal() {
    lun_field_ignored(&[0x1E, 0, 0, 0, 0x01, 0], Data::None, (1, 0x01), (1, 7));
}

#[test]
fn read_capacity_10() {
    let cdb = [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    lun_field_ignored(&cdb, Data::In(8), (1, 0x02), (1, 7));
    // RELADR (obsolete, bit 0) is still refused.
    lun_field_ignored(&cdb, Data::In(8), (1, 0x01), (1, 0));
}

#[test]
fn pre_fetch_10() {
    lun_field_ignored(&rw10(0x34, 16, 8, 0x02), Data::None, (1, 0x04), (1, 7));
}

#[test]
fn synchronize_cache_10() {
    lun_field_ignored(&rw10(0x35, 0, 0, 0x02), Data::None, (1, 0x08), (1, 7));
    lun_field_ignored(&rw10(0x35, 0, 0, 0), Data::None, (1, 0x10), (1, 7));
}

#[test]
fn read_defect_data_10() {
    let cdb = [0x37, 0, 0x1B, 0, 0, 0, 0, 0, 32, 0];
    lun_field_ignored(&cdb, Data::In(32), (1, 0x01), (1, 7));
}

#[test]
fn mode_select_10() {
    // PF=1, an 8-byte header and the caching page.
    let mut list = vec![0u8; 8];
    list.extend_from_slice(&caching_page());
    let cdb = [0x55, 0x10, 0, 0, 0, 0, 0, 0, list.len() as u8, 0];
    lun_field_ignored(&cdb, Data::Out(&list), (1, 0x04), (1, 3));
}

#[test]
fn mode_sense_10() {
    // LLBAA (bit 4) and DBD (bit 3) sit right below the LUN field.
    let cdb = [0x5A, 0x10, 0x3F, 0, 0, 0, 0, 0x01, 0x00, 0];
    lun_field_ignored(&cdb, Data::In(256), (1, 0x04), (1, 2));
    let cdb = [0x5A, 0x00, 0x08, 0, 0, 0, 0, 0x01, 0x00, 0];
    lun_field_ignored(&cdb, Data::In(256), (1, 0x01), (1, 2));
}

#[test]
fn read_defect_data_12() {
    let cdb = [0xB7, 0x0C, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0];
    lun_field_ignored(&cdb, Data::In(64), (11, 0x04), (11, 2));
}

/// The SCSI-2 commands whose bits 7..5 are fields now, and the commands that never had a LUN
/// field, still check them: a nonzero protection field asks for protection information this
/// device does not have (LIO answers it the same way), LONGLIST changes FORMAT UNIT's parameter
/// list, and a reserved field of a newer command is just that.
#[test]
fn bits_7_to_5_are_still_checked_where_they_are_not_the_old_lun_field() {
    let d = Dev::thin();
    let one = pattern(BS, 3);
    for cdb in [
        rw10(0x28, 0, 1, 0),
        rw12(0xA8, 0, 1, 0),
        rw16(0x88, 0, 1, 0),
        rw10(0x2F, 0, 1, 0),
        rw12(0xAF, 0, 1, 0),
    ] {
        for bits in LUN_BITS {
            let r = d.run_in(&with_byte1(&cdb, bits), BS).0;
            assert_bad_cdb_field(&r, 1, 7);
        }
    }
    for cdb in [
        rw10(0x2A, 0, 1, 0),
        rw12(0xAA, 0, 1, 0),
        rw10(0x2E, 0, 1, 0),
        rw12(0xAE, 0, 1, 0),
        rw10(0x41, 0, 1, 0),
        rw16(0x8A, 0, 1, 0),
    ] {
        for bits in LUN_BITS {
            assert_bad_cdb_field(&d.run_out(&with_byte1(&cdb, bits), &one), 1, 7);
        }
    }
    assert!(
        d.h.write_calls().is_empty(),
        "a refused write reached the handler"
    );
    // FORMAT UNIT: FMTPINFO (7..6) refused; LUN 1's 20h would be LONGLIST, which is read.
    assert_bad_cdb_field(&d.run(&[0x04, 0xA0, 0, 0, 0, 0]), 1, 7);
    assert_bad_cdb_field(&d.run(&[0x04, 0x40, 0, 0, 0, 0]), 1, 7);
    // UNMAP and REPORT LUNS never had a LUN field.
    assert_bad_cdb_field(&d.run_out(&[0x42, 0x20, 0, 0, 0, 0, 0, 0, 0, 0], &[]), 1, 7);
    let (r, _) = d.run_in(&[0xA0, 0x20, 0, 0, 0, 0, 0, 0, 0x01, 0, 0, 0], 256);
    assert_bad_cdb_field(&r, 1, 7);
}

/// REPORT SUPPORTED OPERATION CODES reports the ignored bits as 0, as SPC-4 asks for bits the
/// device server ignores: what is advertised is what is evaluated.
#[test]
fn ignored_bits_are_not_advertised_as_used() {
    let d = Dev::new();
    for opcode in [0x00u8, 0x12, 0x1A, 0x25, 0x35, 0x5A] {
        let cdb = [0xA3, 0x0C, 0x01, opcode, 0, 0, 0, 0, 0x01, 0, 0, 0];
        let v = d.data_in(&cdb, 256);
        assert_eq!(v[1] & 0x07, 0x03, "opcode {opcode:02x}h supported");
        assert_eq!(v[4], opcode);
        assert_eq!(
            v[5] & 0xE0,
            0,
            "opcode {opcode:02x}h: byte 1 usage {:02x}h",
            v[5]
        );
    }
}
