//! PRE-FETCH, ORWRITE, FORMAT UNIT and READ DEFECT DATA.

use super::*;

fn prefetch10(lba: u32, blocks: u16, immed: bool) -> Vec<u8> {
    rw10(0x34, lba, blocks, if immed { 0x02 } else { 0 })
}

fn prefetch16(lba: u64, blocks: u32, immed: bool) -> Vec<u8> {
    rw16(0x90, lba, blocks, if immed { 0x02 } else { 0 })
}

#[test]
fn pre_fetch_checks_the_range_and_touches_nothing() {
    let d = Dev::new();
    assert_good(&d.run(&prefetch10(0, 8, false)));
    assert_good(&d.run(&prefetch10(2040, 8, true)));
    assert_good(&d.run(&prefetch16(2047, 1, false)));
    // Zero blocks: "to the end", still range-checked on the LBA.
    assert_good(&d.run(&prefetch10(0, 0, false)));
    assert_lba_out_of_range(&d.run(&prefetch10(2049, 0, false)));
    assert_lba_out_of_range(&d.run(&prefetch10(2047, 2, false)));
    assert_lba_out_of_range(&d.run(&prefetch10(u32::MAX, 1, false)));
    assert_lba_out_of_range(&d.run(&prefetch16(u64::MAX, 1, true)));
    assert!(
        d.h.calls().is_empty(),
        "PRE-FETCH did I/O: {:?}",
        d.h.calls()
    );
    // Reserved bits of byte 1 (7..2) and the obsolete bit 0.
    assert_bad_cdb_field(&d.run(&rw10(0x34, 0, 1, 0x04)), 1, 7);
    assert_bad_cdb_field(&d.run(&rw10(0x34, 0, 1, 0x01)), 1, 0);
    assert_bad_cdb_field(&d.run(&rw16(0x90, 0, 1, 0x80)), 1, 7);
}

fn orwrite(lba: u64, blocks: u32, flags: u8) -> Vec<u8> {
    rw16(0x8B, lba, blocks, flags)
}

#[test]
fn orwrite_ors_the_data_into_the_medium() {
    let d = Dev::new();
    let old: Vec<u8> = (0..2 * BS)
        .map(|i| if i % 2 == 0 { 0x0F } else { 0x00 })
        .collect();
    let new: Vec<u8> = (0..2 * BS)
        .map(|i| if i % 3 == 0 { 0xF0 } else { 0x01 })
        .collect();
    d.h.fill(7 * BS, &old);
    assert_good(&d.run_out(&orwrite(7, 2, 0), &new));
    let want: Vec<u8> = old.iter().zip(&new).map(|(a, b)| a | b).collect();
    assert_eq!(d.h.bytes(7 * BS, 2 * BS), want);
    // Neighbours untouched.
    assert!(d.h.bytes(6 * BS, BS).iter().all(|&b| b == 0));
    assert!(d.h.bytes(9 * BS, BS).iter().all(|&b| b == 0));
}

#[test]
fn orwrite_durability_range_and_fields() {
    let d = Dev::new();
    d.emu.set_write_cache(true);
    let buf = vec![0x11u8; BS];
    assert_good(&d.run_out(&orwrite(0, 1, 0), &buf));
    assert_good(&d.run_out(&orwrite(0, 1, 0x08), &buf));
    assert_eq!(d.h.write_durability(), [false, true]);
    d.h.clear_calls();
    assert_good(&d.run_out(&orwrite(5, 0, 0), &[]));
    assert!(d.h.calls().is_empty());
    assert_lba_out_of_range(&d.run_out(&orwrite(2047, 2, 0), &[buf.clone(), buf.clone()].concat()));
    // ORPROTECT (7..5) is protection information we do not have.
    assert_bad_cdb_field(&d.run_out(&orwrite(0, 1, 0x20), &buf), 1, 7);
    // Above the maximum transfer length (128 blocks).
    assert_bad_cdb_field(&d.run_out(&orwrite(0, 129, 0), &buf), 10, 7);
}

fn format(flags: u8) -> Vec<u8> {
    vec![0x04, flags, 0, 0, 0, 0]
}

#[test]
fn format_unit_unmaps_a_thin_device() {
    let d = Dev::thin();
    d.h.fill(0, &pattern(4 * BS, 3));
    assert_good(&d.run(&format(0)));
    assert_eq!(
        d.h.calls(),
        [
            Call::Unmap {
                off: 0,
                len: 2048 * BS as u64
            },
            Call::Flush
        ]
    );
    assert!(d.h.bytes(0, 4 * BS).iter().all(|&b| b == 0));
}

#[test]
fn format_unit_keeps_a_fully_provisioned_device() {
    let d = Dev::new();
    let p = pattern(4 * BS, 3);
    d.h.fill(0, &p);
    assert_good(&d.run(&format(0)));
    assert_eq!(d.h.calls(), [Call::Flush]);
    assert_eq!(d.h.bytes(0, 4 * BS), p);
}

#[test]
fn format_unit_checks_its_parameter_list() {
    let d = Dev::new();
    // FMTDATA with an empty short header: accepted.
    assert_good(&d.run_out(&format(0x10), &[0, 0, 0, 0]));
    // Long header (LONGLIST).
    assert_good(&d.run_out(&format(0x30), &[0, 0, 0, 0, 0, 0, 0, 0]));
    // Too short for the header.
    assert_sense(
        &d.run_out(&format(0x10), &[0, 0]),
        key::ILLEGAL_REQUEST,
        0x1A,
        0x00,
    );
    // PROTECTION FIELD USAGE.
    assert_bad_param_field(&d.run_out(&format(0x10), &[0x01, 0, 0, 0]), 0, 2);
    // DCRT without FOV.
    assert_bad_param_field(&d.run_out(&format(0x10), &[0, 0x20, 0, 0]), 1, 7);
    // An initialization pattern.
    assert_bad_param_field(&d.run_out(&format(0x10), &[0, 0x88, 0, 0]), 1, 3);
    // A defect list.
    assert_bad_param_field(&d.run_out(&format(0x10), &[0, 0, 0, 8]), 2, 7);
    assert_bad_param_field(&d.run_out(&format(0x30), &[0, 0, 0, 0, 0, 0, 0, 8]), 4, 7);
    // FMTPINFO (protection information) and the vendor-specific byte.
    assert_bad_cdb_field(&d.run(&format(0x40)), 1, 7);
    assert_bad_cdb_field(&d.run(&[0x04, 0, 1, 0, 0, 0]), 2, 7);
    assert!(d.h.calls().iter().all(|c| *c == Call::Flush));
}

#[test]
fn read_defect_data_reports_an_empty_list() {
    let d = Dev::new();
    // (10): REQ_PLIST | REQ_GLIST, long block format (011b).
    let v = d.data_in(&[0x37, 0, 0x1B, 0, 0, 0, 0, 0, 32, 0], 32);
    assert_eq!(v, [0, 0x1B, 0, 0]);
    // Allocation length 2 truncates.
    let v = d.data_in(&[0x37, 0, 0x00, 0, 0, 0, 0, 0, 2, 0], 32);
    assert_eq!(v, [0, 0]);
    // (12): 8-byte header.
    let v = d.data_in(&[0xB7, 0x0C, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], 64);
    assert_eq!(v, [0, 0x0C, 0, 0, 0, 0, 0, 0]);
    // Reserved defect list formats.
    assert_bad_cdb_field(&d.run(&[0x37, 0, 0x01, 0, 0, 0, 0, 0, 32, 0]), 2, 2);
    assert_bad_cdb_field(&d.run(&[0xB7, 0x07, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0]), 1, 2);
    // Reserved bits.
    assert_bad_cdb_field(&d.run(&[0x37, 0, 0x20, 0, 0, 0, 0, 0, 32, 0]), 2, 7);
    assert!(d.h.calls().is_empty());
}
