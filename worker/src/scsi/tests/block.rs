//! READ/WRITE/VERIFY/WRITE SAME/UNMAP/SYNCHRONIZE CACHE/READ CAPACITY/GET LBA STATUS.

use super::*;
use crate::scsi::sense::key;

const LAST: u32 = 2047;

#[test]
fn write_then_read_round_trips_in_every_cdb_size() {
    let d = Dev::new();
    let data = pattern(4 * BS, 1);
    assert_good(&d.run_out(&rw10(0x2A, 10, 4, 0), &data));
    assert_eq!(d.h.bytes(10 * BS, 4 * BS), data);
    assert_eq!(d.data_in(&rw10(0x28, 10, 4, 0), 4 * BS), data);
    assert_eq!(d.data_in(&rw12(0xA8, 10, 4, 0), 4 * BS), data);
    assert_eq!(d.data_in(&rw16(0x88, 10, 4, 0), 4 * BS), data);
    assert_eq!(d.data_in(&rw6(0x08, 10, 4), 4 * BS), data);

    let data2 = pattern(2 * BS, 7);
    assert_good(&d.run_out(&rw6(0x0A, 300, 2), &data2));
    assert_good(&d.run_out(&rw12(0xAA, 100, 2, 0), &data2));
    assert_eq!(d.h.bytes(300 * BS, 2 * BS), data2);
    assert_good(&d.run_out(&rw16(0x8A, 200, 2, 0), &data2));
    assert_eq!(d.h.bytes(100 * BS, 2 * BS), data2);
    assert_eq!(d.h.bytes(200 * BS, 2 * BS), data2);
}

#[test]
fn read6_and_write6_length_zero_means_256_blocks() {
    let d = Dev::new(); // max_sectors 128
    assert_bad_cdb_field(&d.run_in(&rw6(0x08, 0, 0), 256 * BS).0, 4, 7);
    let mut c = cfg(2048);
    c.max_sectors = 256;
    let d = Dev::with(c, HandlerCaps::default(), |_| {});
    let data = pattern(256 * BS, 3);
    assert_good(&d.run_out(&rw6(0x0A, 5, 0), &data));
    assert_eq!(d.h.bytes(5 * BS, 256 * BS), data);
    assert_eq!(d.data_in(&rw6(0x08, 5, 0), 256 * BS), data);
}

#[test]
fn lba_range_boundaries() {
    let d = Dev::new();
    // Last block: fine; one past: out of range.
    assert_good(&d.run_in(&rw10(0x28, LAST, 1, 0), BS).0);
    assert_lba_out_of_range(&d.run_in(&rw10(0x28, LAST + 1, 1, 0), BS).0);
    assert_lba_out_of_range(&d.run_in(&rw10(0x28, LAST, 2, 0), 2 * BS).0);
    assert_good(&d.run_in(&rw10(0x28, LAST - 1, 2, 0), 2 * BS).0);
    assert_good(&d.run_out(&rw10(0x2A, LAST, 1, 0), &[1; BS]));
    assert_lba_out_of_range(&d.run_out(&rw10(0x2A, LAST + 1, 1, 0), &[1; BS]));
    assert_lba_out_of_range(&d.run_out(&rw16(0x8A, 2046, 3, 0), &[1; 3 * BS]));
    // LBA + length overflows 64 bits.
    assert_lba_out_of_range(&d.run_in(&rw16(0x88, u64::MAX, 2, 0), 2 * BS).0);
    assert_lba_out_of_range(&d.run_in(&rw16(0x88, u64::MAX - 1, 4, 0), 4 * BS).0);
    assert_lba_out_of_range(&d.run_in(&rw12(0xA8, u32::MAX, 1, 0), BS).0);
    // READ (6)'s 21-bit LBA.
    assert_lba_out_of_range(&d.run_in(&rw6(0x08, 0x1F_FFFF, 1), BS).0);
    // Nothing reached the handler for the failed ones.
    assert_eq!(d.h.write_calls().len(), 1);
}

#[test]
fn transfer_length_above_max_sectors_is_invalid_field() {
    let d = Dev::new(); // max_sectors 128
    assert_good(&d.run_in(&rw10(0x28, 0, 128, 0), 128 * BS).0);
    assert_bad_cdb_field(&d.run_in(&rw10(0x28, 0, 129, 0), 129 * BS).0, 7, 7);
    assert_bad_cdb_field(&d.run_out(&rw10(0x2A, 0, 129, 0), &[]), 7, 7);
    assert_bad_cdb_field(&d.run_in(&rw12(0xA8, 0, 129, 0), BS).0, 6, 7);
    assert_bad_cdb_field(&d.run_in(&rw16(0x88, 0, 129, 0), BS).0, 10, 7);
    // The length check comes before the range check.
    assert_bad_cdb_field(&d.run_in(&rw16(0x88, u64::MAX, 1000, 0), BS).0, 10, 7);
}

#[test]
fn zero_length_transfers_are_good_no_ops() {
    let d = Dev::new();
    let (r, _) = d.run_in(&rw10(0x28, 5, 0, 0), 0);
    assert_good(&r);
    assert_good(&d.run_out(&rw10(0x2A, 5, 0, 0), &[]));
    assert_good(&d.run_out(&rw16(0x8A, 5, 0, 0x08), &[]));
    assert!(d.h.calls().is_empty(), "{:?}", d.h.calls());
    // The LBA is still checked.
    assert_lba_out_of_range(&d.run_out(&rw10(0x2A, LAST + 1, 0, 0), &[]));
}

#[test]
fn protection_and_reserved_bits_are_rejected() {
    let d = Dev::new();
    assert_bad_cdb_field(&d.run_in(&rw10(0x28, 0, 1, 0x20), BS).0, 1, 7); // RDPROTECT=001
    assert_bad_cdb_field(&d.run_in(&rw10(0x28, 0, 1, 0xE0), BS).0, 1, 7);
    assert_bad_cdb_field(&d.run_out(&rw10(0x2A, 0, 1, 0x40), &[0; BS]), 1, 7); // WRPROTECT
    assert_bad_cdb_field(&d.run_out(&rw10(0x2A, 0, 1, 0x04), &[0; BS]), 1, 2); // reserved
    assert_bad_cdb_field(&d.run_in(&rw10(0x28, 0, 1, 0x01), BS).0, 1, 0); // obsolete
    // Accepted hints: DPO, FUA_NV, RARC, group number.
    assert_good(&d.run_in(&rw10(0x28, 0, 1, 0x16), BS).0);
    let mut c = rw10(0x28, 0, 1, 0);
    c[6] = 0x1F;
    assert_good(&d.run_in(&c, BS).0);
    c[6] = 0x20;
    assert_bad_cdb_field(&d.run_in(&c, BS).0, 6, 7);
    // READ (6) has no flags at all in byte 1 beyond the LBA; byte 5 is CONTROL.
    assert_bad_cdb_field(&d.run_in(&[0x08, 0, 0, 0, 1, 0x04], BS).0, 5, 2);
}

#[test]
fn durable_flag_follows_wce_and_fua() {
    let d = Dev::new();
    let one = [0x5A; BS];
    let durable_of_last = |d: &Dev| match d.h.write_calls().last() {
        Some(Call::Write { durable, .. }) => *durable,
        other => panic!("no write: {other:?}"),
    };
    // WCE=0: every write durable.
    assert_good(&d.run_out(&rw10(0x2A, 0, 1, 0), &one));
    assert!(durable_of_last(&d));
    assert_good(&d.run_out(&rw6(0x0A, 0, 1), &one));
    assert!(durable_of_last(&d));
    // WCE=1: only FUA writes.
    d.emu.set_write_cache(true);
    assert_good(&d.run_out(&rw10(0x2A, 0, 1, 0), &one));
    assert!(!durable_of_last(&d));
    assert_good(&d.run_out(&rw6(0x0A, 0, 1), &one));
    assert!(!durable_of_last(&d));
    for cdb in [
        rw10(0x2A, 0, 1, 0x08),
        rw12(0xAA, 0, 1, 0x08),
        rw16(0x8A, 0, 1, 0x08),
    ] {
        assert_good(&d.run_out(&cdb, &one));
        assert!(durable_of_last(&d), "FUA in {cdb:02x?}");
    }
    // DPO alone is not FUA.
    assert_good(&d.run_out(&rw10(0x2A, 0, 1, 0x10), &one));
    assert!(!durable_of_last(&d));
    assert_eq!(d.h.flushes.load(Ordering::SeqCst), 0);
}

#[test]
fn fua_read_flushes_only_with_the_write_cache_on() {
    let d = Dev::new();
    assert_good(&d.run_in(&rw10(0x28, 0, 1, 0x08), BS).0);
    assert_eq!(d.h.flushes.load(Ordering::SeqCst), 0);
    d.emu.set_write_cache(true);
    assert_good(&d.run_in(&rw10(0x28, 0, 1, 0x08), BS).0);
    assert_eq!(
        d.h.calls()[1..],
        [
            Call::Flush,
            Call::Read {
                off: 0,
                len: BS,
                slices: 1
            }
        ]
    );
    assert_good(&d.run_in(&rw10(0x28, 0, 1, 0), BS).0);
    assert_eq!(d.h.flushes.load(Ordering::SeqCst), 1);
}

#[test]
fn scatter_gather_buffers_go_to_the_handler_uncopied() {
    let d = Dev::new();
    let data = pattern(3 * BS, 9);
    let mut buf = DataBuf::from_segments(vec![
        data[..100].to_vec(),
        data[100..1000].to_vec(),
        data[1000..].to_vec(),
    ]);
    assert_good(&d.run_buf(&rw10(0x2A, 7, 3, 0), &mut buf));
    assert_eq!(
        d.h.write_calls(),
        [Call::Write {
            off: 7 * BS as u64,
            len: 3 * BS,
            slices: 3,
            durable: true
        }]
    );
    let mut buf = DataBuf::zeroed(&[BS, 2 * BS]);
    assert_good(&d.run_buf(&rw10(0x28, 7, 3, 0), &mut buf));
    assert_eq!(buf.to_vec(), data);
    assert_eq!(
        d.h.calls().last(),
        Some(&Call::Read {
            off: 7 * BS as u64,
            len: 3 * BS,
            slices: 2
        })
    );
}

#[test]
fn short_and_long_data_buffers() {
    let d = Dev::new();
    d.h.fill(0, &pattern(8 * BS, 4));
    // Buffer shorter than the transfer: what fits, with read_len.
    let (r, v) = d.run_in(&rw10(0x28, 0, 4, 0), 2 * BS);
    assert_good(&r);
    assert_eq!(r.read_len, Some(2 * BS as u32));
    assert_eq!(v, pattern(8 * BS, 4)[..2 * BS]);
    // Buffer longer than the transfer: read_len says how much, the rest is zeroed.
    let (r, v) = d.run_in(&rw10(0x28, 0, 1, 0), 4 * BS);
    assert_eq!(r.read_len, Some(BS as u32));
    assert_eq!(v[..BS], pattern(8 * BS, 4)[..BS]);
    assert!(v[BS..].iter().all(|&b| b == 0));
    // Write with less data than the CDB says: what was sent is written.
    assert_good(&d.run_out(&rw10(0x2A, 100, 4, 0), &[0x33; BS + 10]));
    assert_eq!(d.h.bytes(100 * BS, BS + 10), vec![0x33; BS + 10]);
    assert_eq!(d.h.bytes(100 * BS + BS + 10, 10), vec![0; 10]);
}

#[test]
fn synchronize_cache_flushes_after_range_check() {
    let d = Dev::new();
    let sync10 = |lba: u32, n: u16, immed: bool| {
        let mut c = rw10(0x35, lba, n, 0);
        c[1] = if immed { 0x02 } else { 0 };
        c
    };
    assert_good(&d.run(&sync10(0, 0, false)));
    assert_good(&d.run(&sync10(LAST, 1, true)));
    assert_good(&d.run(&rw16(0x91, 0, 2048, 0)));
    assert_eq!(d.h.flushes.load(Ordering::SeqCst), 3);
    assert_lba_out_of_range(&d.run(&sync10(LAST + 1, 0, false)));
    assert_lba_out_of_range(&d.run(&sync10(LAST, 2, false)));
    assert_lba_out_of_range(&d.run(&rw16(0x91, u64::MAX, 1, 0)));
    assert_eq!(d.h.flushes.load(Ordering::SeqCst), 3);
    assert_bad_cdb_field(&d.run(&rw10(0x35, 0, 0, 0x08)), 1, 7);
}

#[test]
fn verify_without_byte_check_only_checks_the_range() {
    let d = Dev::new();
    assert_good(&d.run(&rw10(0x2F, 0, 2048, 0)));
    assert_good(&d.run(&rw16(0x8F, LAST as u64, 1, 0)));
    assert_good(&d.run(&rw12(0xAF, 0, 0, 0)));
    assert_lba_out_of_range(&d.run(&rw10(0x2F, LAST, 2, 0)));
    assert!(d.h.calls().is_empty());
}

#[test]
fn verify_with_byte_check() {
    let d = Dev::new();
    let data = pattern(4 * BS, 2);
    d.h.fill(8 * BS, &data);
    assert_good(&d.run_out(&rw10(0x2F, 8, 4, 0x02), &data));
    let mut other = data.clone();
    other[1000] ^= 0x40;
    let r = d.run_out(&rw16(0x8F, 8, 4, 0x02), &other);
    let s = assert_sense(&r, key::MISCOMPARE, 0x1D, 0x00);
    assert_eq!(s.info, Some(1000));
    let b = s.to_bytes();
    assert_eq!(b[0], 0xF0, "VALID");
    assert_eq!(&b[3..7], &1000u32.to_be_bytes());
    // Too little data for the comparison.
    assert_bad_cdb_field(&d.run_out(&rw10(0x2F, 8, 4, 0x02), &data[..BS]), 7, 7);
    // BYTCHK=10b is reserved.
    assert_bad_cdb_field(&d.run_out(&rw10(0x2F, 8, 4, 0x04), &data), 1, 2);
    // BYTCHK=1 transfers data: bounded by the max transfer length.
    assert_bad_cdb_field(&d.run_out(&rw10(0x2F, 0, 129, 0x02), &[]), 7, 7);
}

#[test]
fn verify_with_one_block_compared_to_each() {
    let d = Dev::new();
    let block = pattern(BS, 5);
    for i in 0..3 {
        d.h.fill((20 + i) * BS, &block);
    }
    assert_good(&d.run_out(&rw10(0x2F, 20, 3, 0x06), &block));
    d.h.fill(22 * BS + 17, &[block[17] ^ 1]);
    let s = assert_sense(
        &d.run_out(&rw10(0x2F, 20, 3, 0x06), &block),
        key::MISCOMPARE,
        0x1D,
        0,
    );
    assert_eq!(s.info, Some(2 * BS as u64 + 17));
}

#[test]
fn write_and_verify_is_durable_and_compares() {
    let d = Dev::new();
    d.emu.set_write_cache(true);
    let data = pattern(2 * BS, 6);
    assert_good(&d.run_out(&rw10(0x2E, 30, 2, 0x02), &data));
    assert_eq!(d.h.bytes(30 * BS, 2 * BS), data);
    assert!(matches!(
        d.h.write_calls()[..],
        [Call::Write { durable: true, .. }]
    ));
    assert_good(&d.run_out(&rw16(0x8E, 40, 2, 0), &data));
    assert_good(&d.run_out(&rw12(0xAE, 50, 2, 0), &data));
    assert_eq!(d.h.bytes(50 * BS, 2 * BS), data);
    assert_bad_cdb_field(&d.run_out(&rw10(0x2E, 30, 2, 0x06), &data), 1, 2);
    assert_bad_cdb_field(&d.run_out(&rw10(0x2E, 30, 2, 0x08), &data), 1, 3);
    assert_lba_out_of_range(&d.run_out(&rw10(0x2E, LAST, 2, 0), &data));
}

fn ws10(lba: u32, n: u16, flags: u8) -> Vec<u8> {
    rw10(0x41, lba, n, flags)
}

#[test]
fn write_same_writes_the_block_everywhere() {
    let d = Dev::new();
    let block = pattern(BS, 8);
    assert_good(&d.run_out(&ws10(100, 5, 0), &block));
    for i in 0..5 {
        assert_eq!(d.h.bytes((100 + i) * BS, BS), block);
    }
    assert_eq!(d.h.bytes(105 * BS, BS), vec![0; BS]);
    assert!(d.h.write_durability().iter().all(|durable| *durable));
}

#[test]
fn write_same_writes_large_ranges_in_bounded_chunks() {
    let d = Dev::with(cfg(6000), HandlerCaps::default(), |_| {});
    let block = pattern(BS, 8);
    assert_good(&d.run_out(&rw16(0x93, 0, 6000, 0), &block));
    assert_eq!(d.h.bytes(0, BS), block);
    assert_eq!(d.h.bytes(5999 * BS, BS), block);
    let writes = d.h.write_calls();
    assert_eq!(writes.len(), 3);
    let total: usize = writes
        .iter()
        .map(|c| match c {
            Call::Write { len, .. } => {
                assert!(*len <= 1 << 20);
                *len
            }
            _ => 0,
        })
        .sum();
    assert_eq!(total, 6000 * BS);
}

#[test]
fn write_same_field_checks() {
    let d = Dev::new();
    let block = pattern(BS, 8);
    assert_bad_cdb_field(&d.run_out(&ws10(0, 0, 0), &block), 7, 7); // WSNZ
    assert_bad_cdb_field(&d.run_out(&ws10(0, 1, 0x10), &block), 1, 4); // ANCHOR
    assert_bad_cdb_field(&d.run_out(&ws10(0, 1, 0x02), &block), 1, 1); // LBDATA
    assert_bad_cdb_field(&d.run_out(&ws10(0, 1, 0x04), &block), 1, 2); // PBDATA
    assert_bad_cdb_field(&d.run_out(&ws10(0, 1, 0x01), &block), 1, 0); // NDOB is (16) only
    assert_bad_cdb_field(&d.run_out(&ws10(0, 1, 0), &block[..10]), 7, 7); // no full block
    assert_lba_out_of_range(&d.run_out(&ws10(LAST, 2, 0), &block));
    let too_many = ((256u32 << 20) / BS as u32) + 1;
    assert_bad_cdb_field(&d.run_out(&rw16(0x93, 0, too_many, 0), &block), 10, 7);
}

#[test]
fn write_same_16_ndob_writes_zeros() {
    let d = Dev::new();
    d.h.fill(0, &[0xFF; 4 * BS]);
    assert_good(&d.run_out(&rw16(0x93, 1, 2, 0x01), &[]));
    assert_eq!(d.h.bytes(0, BS), vec![0xFF; BS]);
    assert_eq!(d.h.bytes(BS, 2 * BS), vec![0; 2 * BS]);
    assert_eq!(d.h.bytes(3 * BS, BS), vec![0xFF; BS]);
}

#[test]
fn write_same_with_unmap() {
    // Thin device: zeros with UNMAP deallocate; WCE=0 then flushes.
    let d = Dev::thin();
    d.h.fill(0, &[0xFF; 8 * BS]);
    assert_good(&d.run_out(&ws10(2, 4, 0x08), &[0; BS]));
    assert_eq!(
        d.h.calls(),
        [
            Call::Unmap {
                off: 2 * BS as u64,
                len: 4 * BS as u64
            },
            Call::Flush
        ]
    );
    assert_eq!(d.h.bytes(2 * BS, 4 * BS), vec![0; 4 * BS]);
    d.h.clear_calls();
    assert_good(&d.run_out(&rw16(0x93, 0, 1, 0x09), &[]));
    assert!(matches!(d.h.calls()[..], [Call::Unmap { .. }, Call::Flush]));
    // With the write cache on, no flush.
    d.emu.set_write_cache(true);
    d.h.clear_calls();
    assert_good(&d.run_out(&ws10(2, 4, 0x08), &[0; BS]));
    assert!(matches!(d.h.calls()[..], [Call::Unmap { .. }]));
    // Non-zero data with UNMAP: written, not unmapped.
    d.h.clear_calls();
    assert_good(&d.run_out(&ws10(2, 1, 0x08), &[1; BS]));
    assert!(matches!(d.h.calls()[..], [Call::Write { .. }]));
    // No unmap support: UNMAP is only a permission, the zeros are written.
    let d = Dev::new();
    d.h.fill(0, &[0xFF; 8 * BS]);
    assert_good(&d.run_out(&ws10(2, 4, 0x08), &[0; BS]));
    assert!(matches!(d.h.calls()[..], [Call::Write { .. }]));
    assert_eq!(d.h.bytes(2 * BS, 4 * BS), vec![0; 4 * BS]);
}

/// An UNMAP parameter list from (lba, blocks) descriptors.
fn unmap_list(descs: &[(u64, u32)]) -> Vec<u8> {
    let bd = (descs.len() * 16) as u16;
    let mut v = Vec::new();
    v.extend_from_slice(&(bd + 6).to_be_bytes());
    v.extend_from_slice(&bd.to_be_bytes());
    v.extend_from_slice(&[0; 4]);
    for &(lba, n) in descs {
        v.extend_from_slice(&lba.to_be_bytes());
        v.extend_from_slice(&n.to_be_bytes());
        v.extend_from_slice(&[0; 4]);
    }
    v
}

fn unmap_cdb(len: u16) -> Vec<u8> {
    let l = len.to_be_bytes();
    vec![0x42, 0, 0, 0, 0, 0, 0, l[0], l[1], 0]
}

#[test]
fn unmap_needs_thin_provisioning() {
    let d = Dev::new();
    let l = unmap_list(&[(0, 1)]);
    assert_sense(
        &d.run_out(&unmap_cdb(l.len() as u16), &l),
        key::ILLEGAL_REQUEST,
        0x20,
        0,
    );
}

#[test]
fn unmap_deallocates_every_descriptor() {
    let d = Dev::thin();
    d.h.fill(0, &[0xEE; 64 * BS]);
    let l = unmap_list(&[(1, 2), (10, 0), (LAST as u64, 1), (20, 4)]);
    assert_good(&d.run_out(&unmap_cdb(l.len() as u16), &l));
    let b = BS as u64;
    assert_eq!(
        d.h.calls(),
        [
            Call::Unmap { off: b, len: 2 * b },
            Call::Unmap {
                off: LAST as u64 * b,
                len: b
            },
            Call::Unmap {
                off: 20 * b,
                len: 4 * b
            },
            Call::Flush,
        ]
    );
    assert_eq!(d.h.bytes(BS, 2 * BS), vec![0; 2 * BS]);
    assert_eq!(d.h.bytes(3 * BS, BS), vec![0xEE; BS]);
    // Write cache on: no flush.
    d.emu.set_write_cache(true);
    d.h.clear_calls();
    assert_good(&d.run_out(&unmap_cdb(l.len() as u16), &l));
    assert!(!d.h.calls().contains(&Call::Flush));
    // Zero parameter list length: nothing.
    d.h.clear_calls();
    assert_good(&d.run_out(&unmap_cdb(0), &[]));
    assert!(d.h.calls().is_empty());
}

#[test]
fn unmap_parameter_list_checks() {
    let d = Dev::thin();
    let l = unmap_list(&[(0, 1), (5, 1)]);
    // Shorter than the header.
    assert_sense(&d.run_out(&unmap_cdb(6), &l[..6]), 0x05, 0x1A, 0x00);
    // Parameter list length larger than the data sent, header claiming more than there is.
    assert_sense(
        &d.run_out(&unmap_cdb(l.len() as u16), &l[..20]),
        0x05,
        0x1A,
        0x00,
    );
    let mut bad = l.clone();
    bad[3] = 48;
    assert_sense(
        &d.run_out(&unmap_cdb(bad.len() as u16), &bad),
        0x05,
        0x1A,
        0x00,
    );
    // A trailing partial descriptor is ignored.
    let mut partial = unmap_list(&[(0, 1)]);
    partial[1] += 8;
    partial[3] += 8;
    partial.extend_from_slice(&[0xFF; 8]);
    assert_good(&d.run_out(&unmap_cdb(partial.len() as u16), &partial));
    // Out of range: nothing is unmapped, even the valid first descriptor.
    d.h.clear_calls();
    let l = unmap_list(&[(0, 1), (LAST as u64, 2)]);
    assert_lba_out_of_range(&d.run_out(&unmap_cdb(l.len() as u16), &l));
    let l = unmap_list(&[(0, 1), (u64::MAX, 2)]);
    assert_lba_out_of_range(&d.run_out(&unmap_cdb(l.len() as u16), &l));
    assert!(d.h.calls().is_empty());
    // Too many descriptors.
    let many: Vec<(u64, u32)> = (0..257).map(|i| (i, 1)).collect();
    let l = unmap_list(&many);
    assert_bad_param_field(&d.run_out(&unmap_cdb(l.len() as u16), &l), 2, 7);
    // Too many blocks in total: points at the descriptor that went over.
    let c = DeviceConfig {
        dev_size: 4 << 30,
        ..cfg(1)
    };
    let h = Arc::new(MemHandler::new(
        BS,
        HandlerCaps {
            unmap: true,
            unmap_granularity: 0,
            unmap_reads_zero: true,
        },
    ));
    let emu = Emulator::new(&c, h.clone());
    // MAXIMUM UNMAP LBA COUNT: 2^20 blocks.
    let max = 1u32 << 20;
    let l = unmap_list(&[(0, max - 1), (max as u64, 1), (2 * max as u64, 1)]);
    let mut buf = DataBuf::from_segments(vec![l.clone()]);
    let r = emu.execute(&mut Command {
        cdb: &unmap_cdb(l.len() as u16),
        data: &mut buf,
        bidi_in: None,
    });
    assert_bad_param_field(&r, 8 + 2 * 16 + 8, 7);
    assert!(h.calls().is_empty());
    // ANCHOR is not supported.
    let l = unmap_list(&[(0, 1)]);
    let mut c = unmap_cdb(l.len() as u16);
    c[1] = 0x01;
    assert_bad_cdb_field(&d.run_out(&c, &l), 1, 0);
}

#[test]
fn read_capacity_10() {
    let d = Dev::new();
    let rc = [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(d.data_in(&rc, 8), [0, 0, 0x07, 0xFF, 0, 0, 0x02, 0x00]);
    // PMI=0 with an LBA: invalid; PMI=1: the last LBA anyway.
    assert_bad_cdb_field(&d.run_in(&[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0], 8).0, 2, 7);
    assert_eq!(
        d.data_in(&[0x25, 0, 0, 0, 0, 1, 0, 0, 1, 0], 8)[..4],
        [0, 0, 0x07, 0xFF]
    );
    // Too big for 32 bits: FFFFFFFFh. Exactly 2^32 - 1 blocks still fits (last LBA FFFFFFFEh).
    for (blocks, want) in [
        (1u64 << 32, u32::MAX),
        ((1u64 << 32) - 1, 0xFFFF_FFFE),
        (1 << 40, u32::MAX),
    ] {
        let c = DeviceConfig {
            dev_size: blocks * BS as u64,
            ..cfg(1)
        };
        let emu = Emulator::new(&c, Arc::new(MemHandler::new(BS, HandlerCaps::default())));
        let mut buf = DataBuf::zeroed(&[8]);
        assert_good(&emu.execute(&mut Command {
            cdb: &rc,
            data: &mut buf,
            bidi_in: None,
        }));
        assert_eq!(buf.to_vec()[..4], want.to_be_bytes());
    }
}

fn rc16(alloc: u32) -> Vec<u8> {
    let mut c = vec![0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0];
    c.extend_from_slice(&alloc.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

#[test]
fn read_capacity_16() {
    let d = Dev::new();
    let v = d.data_in(&rc16(32), 32);
    let mut want = vec![0u8; 32];
    want[..8].copy_from_slice(&2047u64.to_be_bytes());
    want[8..12].copy_from_slice(&512u32.to_be_bytes());
    assert_eq!(v, want);
    let d = Dev::thin();
    let v = d.data_in(&rc16(32), 32);
    assert_eq!(v[14], 0xC0, "LBPME and LBPRZ");
    let d = Dev::thin_unzeroed();
    assert_eq!(d.data_in(&rc16(32), 32)[14], 0x80);
    // Allocation length truncation.
    let (r, v) = d.run_in(&rc16(12), 32);
    assert_eq!(r.read_len, Some(12));
    assert_eq!(v[..12], [0, 0, 0, 0, 0, 0, 0, 63, 0, 0, 2, 0]);
    // Large device.
    let c = DeviceConfig {
        dev_size: (1u64 << 40) * BS as u64,
        ..cfg(1)
    };
    let emu = Emulator::new(&c, Arc::new(MemHandler::new(BS, HandlerCaps::default())));
    let mut buf = DataBuf::zeroed(&[32]);
    assert_good(&emu.execute(&mut Command {
        cdb: &rc16(32),
        data: &mut buf,
        bidi_in: None,
    }));
    assert_eq!(buf.to_vec()[..8], ((1u64 << 40) - 1).to_be_bytes());
    // PMI / LBA check, and unknown service actions of 9Eh.
    let mut c = rc16(32);
    c[9] = 1;
    assert_bad_cdb_field(&d.run_in(&c, 32).0, 2, 7);
    c[14] = 1;
    assert_good(&d.run_in(&c, 32).0);
    let mut c = rc16(32);
    c[1] = 0x11;
    assert_bad_cdb_field(&d.run_in(&c, 32).0, 1, 4);
    c[1] = 0x30; // service action 10h plus a reserved bit
    assert_bad_cdb_field(&d.run_in(&c, 32).0, 1, 7);
}

#[test]
fn get_lba_status_reports_mapped_or_unknown() {
    let d = Dev::thin();
    let mut c = vec![0x9E, 0x12];
    c.extend_from_slice(&100u64.to_be_bytes());
    c.extend_from_slice(&64u32.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    let v = d.data_in(&c, 64);
    let mut want = vec![0, 0, 0, 20, 0, 0, 0, 0];
    want.extend_from_slice(&100u64.to_be_bytes());
    want.extend_from_slice(&1948u32.to_be_bytes());
    want.extend_from_slice(&[0; 4]);
    assert_eq!(v, want);
    c[2..10].copy_from_slice(&2048u64.to_be_bytes());
    assert_lba_out_of_range(&d.run_in(&c, 64).0);
    // Not offered without thin provisioning: the service action is unknown.
    let d = Dev::new();
    assert_bad_cdb_field(&d.run_in(&c, 64).0, 1, 4);
}

#[test]
fn get_lba_status_reports_what_the_handler_allocated() {
    use crate::handler::ram::RamHandler;
    // The ram handler allocates 64 KiB (128-block) chunks.
    let c = cfg(2048);
    let h = Arc::new(RamHandler::new(c.dev_size));
    let emu = Emulator::new(&c, h.clone());
    let run = |cdb: &[u8], len: usize| {
        let mut d = DataBuf::from_segments(vec![vec![0xAA; len]]);
        let r = emu.execute(&mut Command {
            cdb,
            data: &mut d,
            bidi_in: None,
        });
        assert_good(&r);
        let mut v = d.to_vec();
        v.truncate(r.read_len.map_or(len, |n| n as usize));
        v
    };
    let glbas = |lba: u64, alloc: u32| {
        let mut c = vec![0x9E, 0x12];
        c.extend_from_slice(&lba.to_be_bytes());
        c.extend_from_slice(&alloc.to_be_bytes());
        c.extend_from_slice(&[0, 0]);
        c
    };
    let descs = |v: &[u8]| -> Vec<(u64, u32, u8)> {
        assert_eq!(
            u32::from_be_bytes(v[..4].try_into().unwrap()) as usize,
            v.len() - 4
        );
        v[8..]
            .chunks(16)
            .map(|d| {
                (
                    u64::from_be_bytes(d[..8].try_into().unwrap()),
                    u32::from_be_bytes(d[8..12].try_into().unwrap()),
                    d[12],
                )
            })
            .collect()
    };
    assert_eq!(descs(&run(&glbas(0, 1024), 1024)), [(0, 2048, 1)]);
    assert_good(&d_write(&emu, &rw10(0x2A, 130, 2, 0), &[1; 2 * BS]));
    assert_good(&d_write(&emu, &rw10(0x2A, 600, 1, 0), &[1; BS]));
    assert_eq!(
        descs(&run(&glbas(0, 1024), 1024)),
        [
            (0, 128, 1),
            (128, 128, 0),
            (256, 256, 1),
            (512, 128, 0),
            (640, 1408, 1)
        ]
    );
    assert_eq!(
        descs(&run(&glbas(200, 1024), 1024)),
        [(200, 56, 0), (256, 256, 1), (512, 128, 0), (640, 1408, 1)]
    );
    // The allocation length bounds the descriptors returned (8 + 2 * 16 bytes: two).
    assert_eq!(descs(&run(&glbas(0, 40), 40)), [(0, 128, 1), (128, 128, 0)]);
    // Unmapping deallocates again.
    let l = unmap_list(&[(128, 128), (512, 128)]);
    assert_good(&d_write(&emu, &unmap_cdb(l.len() as u16), &l));
    assert_eq!(descs(&run(&glbas(0, 1024), 1024)), [(0, 2048, 1)]);
}

fn d_write(emu: &Emulator, cdb: &[u8], data: &[u8]) -> CommandResult {
    let mut d = DataBuf::from_segments(vec![data.to_vec()]);
    emu.execute(&mut Command {
        cdb,
        data: &mut d,
        bidi_in: None,
    })
}
