//! COMPARE AND WRITE.

use super::*;
use crate::scsi::sense::key;
use std::sync::atomic::AtomicBool;

fn caw(lba: u64, n: u8, flags: u8) -> Vec<u8> {
    let mut c = vec![0x89, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&[0, 0, 0, n, 0, 0]);
    c
}

#[test]
fn compare_and_write_writes_when_equal() {
    let d = Dev::new();
    let old = pattern(2 * BS, 1);
    let new = pattern(2 * BS, 2);
    d.h.fill(10 * BS, &old);
    assert_good(&d.run_out(&caw(10, 2, 0), &[old.clone(), new.clone()].concat()));
    assert_eq!(d.h.bytes(10 * BS, 2 * BS), new);
    assert_eq!(
        d.h.write_calls(),
        [Call::Write {
            off: 10 * BS as u64,
            len: 2 * BS,
            slices: 1,
            durable: true
        }]
    );
}

#[test]
fn compare_and_write_miscompare_reports_the_offset_and_writes_nothing() {
    let d = Dev::new();
    let old = pattern(2 * BS, 1);
    d.h.fill(10 * BS, &old);
    let mut expect = old.clone();
    expect[BS + 3] ^= 0x80;
    let r = d.run_out(&caw(10, 2, 0), &[expect, vec![0; 2 * BS]].concat());
    let s = assert_sense(&r, key::MISCOMPARE, 0x1D, 0x00);
    assert_eq!(s.info, Some(BS as u64 + 3));
    assert_eq!(&s.to_bytes()[3..7], &(BS as u32 + 3).to_be_bytes());
    assert_eq!(d.h.bytes(10 * BS, 2 * BS), old);
    assert!(d.h.write_calls().is_empty());
}

#[test]
fn compare_and_write_durability_follows_fua_and_wce() {
    let d = Dev::new();
    d.emu.set_write_cache(true);
    let buf = vec![0u8; 2 * BS];
    assert_good(&d.run_out(&caw(0, 1, 0), &buf));
    assert_good(&d.run_out(&caw(0, 1, 0x08), &buf));
    assert_eq!(d.h.write_durability(), [false, true]);
}

#[test]
fn compare_and_write_field_checks() {
    let d = Dev::new();
    let buf = vec![0u8; 4 * BS];
    // Zero blocks: nothing happens.
    assert_good(&d.run_out(&caw(0, 0, 0), &[]));
    assert!(d.h.calls().is_empty());
    assert_lba_out_of_range(&d.run_out(&caw(2047, 2, 0), &buf));
    assert_lba_out_of_range(&d.run_out(&caw(u64::MAX, 1, 0), &buf));
    assert_good(&d.run_out(&caw(2047, 1, 0), &buf[..2 * BS]));
    // Data-out shorter than 2 * N blocks.
    assert_bad_cdb_field(&d.run_out(&caw(0, 2, 0), &buf[..3 * BS]), 13, 7);
    // Data-out longer than 2 * N blocks, and N = 0 with data (an initiator that wanted 256
    // blocks, which the one-byte field cannot say): the CDB does not describe the data.
    assert_bad_cdb_field(&d.run_out(&caw(0, 1, 0), &buf[..3 * BS]), 13, 7);
    assert_bad_cdb_field(&d.run_out(&caw(0, 0, 0), &buf), 13, 7);
    // Reserved bytes and bits, protection.
    let mut c = caw(0, 1, 0);
    c[10] = 1;
    assert_bad_cdb_field(&d.run_out(&c, &buf), 10, 7);
    assert_bad_cdb_field(&d.run_out(&caw(0, 1, 0x20), &buf), 1, 7);
    assert_bad_cdb_field(&d.run_out(&caw(0, 1, 0x04), &buf), 1, 2);
    // More blocks than MAXIMUM COMPARE AND WRITE LENGTH.
    let mut c = cfg(64);
    c.max_sectors = 8;
    let d = Dev::with(c, HandlerCaps::default(), |_| {});
    assert_good(&d.run_out(&caw(0, 8, 0), &vec![0; 16 * BS]));
    assert_bad_cdb_field(&d.run_out(&caw(0, 9, 0), &vec![0; 18 * BS]), 13, 7);
}

/// Several threads increment a counter in block 0 with READ + COMPARE AND WRITE retry loops
/// while other threads keep writing blocks 1..3, which overlap the compared range. Atomicity
/// means: no increment is lost, and (seen by the handler) no write lands on the compared blocks
/// between a COMPARE AND WRITE's read and its write.
#[test]
fn compare_and_write_is_atomic_under_concurrent_writers() {
    const CAW_THREADS: usize = 4;
    const INCREMENTS: u64 = 40;
    let d = Dev::with(cfg(64), HandlerCaps::default(), |h| h.slow_reads = true);
    let filler = vec![0x77u8; 2 * BS];
    d.h.fill(BS, &filler[..BS]);
    let stop = AtomicBool::new(false);
    let writer_writes = AtomicUsize::new(0);
    let miscompares = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    assert_good(&d.run_out(&rw10(0x2A, 1, 2, 0), &filler));
                    writer_writes.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        let cawers: Vec<_> = (0..CAW_THREADS)
            .map(|_| {
                s.spawn(|| {
                    let mut done = 0;
                    while done < INCREMENTS {
                        let old = d.data_in(&rw10(0x28, 0, 2, 0), 2 * BS);
                        let mut new = old.clone();
                        let n = u64::from_le_bytes(old[..8].try_into().unwrap());
                        new[..8].copy_from_slice(&(n + 1).to_le_bytes());
                        let r = d.run_out(&caw(0, 2, 0), &[old, new].concat());
                        if r.status == status::GOOD {
                            done += 1;
                        } else {
                            assert_sense(&r, key::MISCOMPARE, 0x1D, 0x00);
                            miscompares.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for t in cawers {
            t.join().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
    });
    let counter = u64::from_le_bytes(d.h.bytes(0, 8).try_into().unwrap());
    assert_eq!(counter, CAW_THREADS as u64 * INCREMENTS, "lost increments");
    assert_eq!(
        d.h.interleavings.load(Ordering::SeqCst),
        0,
        "a write interleaved"
    );
    assert!(writer_writes.load(Ordering::SeqCst) > 0);
}
