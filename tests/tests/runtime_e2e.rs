//! End to end without a kernel: the simulated kernel queues SCSI commands on a ring laid out
//! exactly like the kernel's, and the worker's real runtime (ring thread, I/O threads, SCSI
//! emulation, `ram` and `file` handlers) serves them. Everything is checked from the simulated
//! kernel's side: statuses, sense data, and the bytes an initiator would receive.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tcmu_warden_tests::{Rig, SimConfig, sense_triple};
use tcmu_warden_worker::handler::file::FileHandler;
use tcmu_warden_worker::handler::ram::RamHandler;
use tcmu_warden_worker::handler::{DeviceConfig, Handler};

const BS: u32 = 512;

fn cfg(blocks: u64, write_cache: bool) -> DeviceConfig {
    DeviceConfig {
        name: "e2e".into(),
        subtype: "ram".into(),
        cfgstring: String::new(),
        dev_size: blocks * u64::from(BS),
        block_size: BS,
        max_sectors: 128,
        write_cache,
        unit_serial: "e2e-serial-1".into(),
    }
}

fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn write10(lba: u32, blocks: u16, fua: bool) -> Vec<u8> {
    let mut c = read10(lba, blocks);
    c[0] = 0x2a;
    if fua {
        c[1] |= 0x08;
    }
    c
}

#[test]
fn identifies_itself_and_reports_capacity() {
    let blocks = 2048;
    let mut rig = Rig::new(
        &cfg(blocks, false),
        Arc::new(RamHandler::new(blocks * 512)),
        SimConfig::default(),
        2,
    );
    let tur = rig.one(&[0, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(tur.status, 0);
    let inq = rig.one(&[0x12, 0, 0, 0, 96, 0], &[], 96);
    assert_eq!(inq.status, 0);
    assert_eq!(inq.data_in[0] & 0x1f, 0, "peripheral device type: disk");
    assert_eq!(&inq.data_in[8..16], b"LIO-ORG ");
    let rc16 = rig.one(
        &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
        &[],
        32,
    );
    assert_eq!(rc16.status, 0);
    assert_eq!(
        u64::from_be_bytes(rc16.data_in[0..8].try_into().unwrap()),
        blocks - 1
    );
    assert_eq!(
        u32::from_be_bytes(rc16.data_in[8..12].try_into().unwrap()),
        BS
    );
    let vpd83 = rig.one(&[0x12, 1, 0x83, 0, 255, 0], &[], 255);
    assert_eq!(vpd83.status, 0);
    assert_eq!(vpd83.data_in[1], 0x83);
}

#[test]
fn errors_carry_the_right_sense() {
    let blocks = 1024;
    let mut rig = Rig::new(
        &cfg(blocks, false),
        Arc::new(RamHandler::new(blocks * 512)),
        SimConfig::default(),
        2,
    );
    let past_end = rig.one(&read10(blocks as u32, 1), &[], 512);
    assert_eq!(
        sense_triple(&past_end),
        (0x05, 0x21, 0x00),
        "LBA OUT OF RANGE"
    );
    let straddle = rig.one(&read10(blocks as u32 - 1, 2), &[], 1024);
    assert_eq!(sense_triple(&straddle), (0x05, 0x21, 0x00));
    let last = rig.one(&read10(blocks as u32 - 1, 1), &[], 512);
    assert_eq!(last.status, 0);
    let unknown = rig.one(&[0xc7, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(
        sense_triple(&unknown),
        (0x05, 0x20, 0x00),
        "INVALID COMMAND OPERATION CODE"
    );
}

#[test]
fn a_malformed_entry_fails_alone() {
    let blocks = 64;
    let mut rig = Rig::new(
        &cfg(blocks, false),
        Arc::new(RamHandler::new(blocks * 512)),
        SimConfig::default(),
        2,
    );
    // A CMD entry whose one iovec points far outside the data area.
    let mut e = vec![0u8; 128];
    e[0..4].copy_from_slice(&(128u32 | 1).to_le_bytes());
    e[8..12].copy_from_slice(&1u32.to_le_bytes());
    e[48..56].copy_from_slice(&(u64::MAX - 4096).to_le_bytes());
    e[56..64].copy_from_slice(&4096u64.to_le_bytes());
    let cdb_off = rig.sim.next_entry_offset(128).unwrap() + 64;
    e[24..32].copy_from_slice(&cdb_off.to_le_bytes());
    e[64..74].copy_from_slice(&read10(0, 8));
    let id = rig
        .sim
        .submit_raw_entry(&e)
        .unwrap()
        .expect("a CMD entry has an id");
    rig.sim.kick().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        assert!(Instant::now() < deadline);
        rig.sim.wait_notified(Duration::from_millis(200)).unwrap();
        let mut v = rig.sim.reap().unwrap();
        if let Some(c) = v.pop() {
            break c;
        }
    };
    assert_eq!(done.cmd_id, id);
    assert_eq!(
        sense_triple(&done).0,
        0x04,
        "HARDWARE ERROR for a malformed entry"
    );
    assert_eq!(
        rig.one(&[0, 0, 0, 0, 0, 0], &[], 0).status,
        0,
        "the device keeps serving"
    );
}

/// A handler wrapper that records how writes were asked to be made durable.
struct Recording {
    inner: RamHandler,
    durable: AtomicUsize,
    volatile: AtomicUsize,
    flushes: AtomicUsize,
}

impl Handler for Recording {
    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<()> {
        self.inner.read(offset, bufs)
    }
    fn write(&self, offset: u64, bufs: &[IoSlice<'_>], durable: bool) -> std::io::Result<()> {
        if durable {
            &self.durable
        } else {
            &self.volatile
        }
        .fetch_add(1, Ordering::SeqCst);
        self.inner.write(offset, bufs, durable)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn recording(blocks: u64) -> Arc<Recording> {
    Arc::new(Recording {
        inner: RamHandler::new(blocks * 512),
        durable: AtomicUsize::new(0),
        volatile: AtomicUsize::new(0),
        flushes: AtomicUsize::new(0),
    })
}

#[test]
fn durability_follows_write_cache_and_fua() {
    let blocks = 256;
    // No volatile cache (WCE=0): every write is durable before it completes.
    let h = recording(blocks);
    let mut rig = Rig::new(&cfg(blocks, false), h.clone(), SimConfig::default(), 2);
    assert_eq!(rig.one(&write10(0, 1, false), &[1u8; 512], 0).status, 0);
    assert_eq!(h.durable.load(Ordering::SeqCst), 1);
    assert_eq!(h.volatile.load(Ordering::SeqCst), 0);
    drop(rig);
    // Volatile cache (WCE=1): plain writes may stay volatile, FUA writes may not, and SYNCHRONIZE
    // CACHE flushes.
    let h = recording(blocks);
    let mut rig = Rig::new(&cfg(blocks, true), h.clone(), SimConfig::default(), 2);
    assert_eq!(rig.one(&write10(0, 1, false), &[1u8; 512], 0).status, 0);
    assert_eq!(rig.one(&write10(1, 1, true), &[2u8; 512], 0).status, 0);
    assert_eq!(
        (
            h.durable.load(Ordering::SeqCst),
            h.volatile.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
    assert_eq!(
        rig.one(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0).status,
        0
    );
    assert!(h.flushes.load(Ordering::SeqCst) >= 1);
}

/// Writes to disjoint regions with many commands in flight, then reads everything back with
/// many in flight, and compares with a model; on `ram` and on `file`.
fn round_trip(handler: Arc<dyn Handler>, blocks: u64, seed: u64, sim_cfg: SimConfig) {
    let mut rig = Rig::new(&cfg(blocks, false), handler, sim_cfg, 4);
    let mut model = vec![0u8; (blocks * 512) as usize];
    let mut rng = seed;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for _round in 0..3 {
        // Carve the device into random disjoint extents and write each with a random pattern.
        let mut cmds = Vec::new();
        let mut lba = 0u64;
        while lba < blocks {
            let n = (next() % 16 + 1).min(blocks - lba);
            if next() % 3 != 0 {
                let data: Vec<u8> = (0..n * 512).map(|_| next() as u8).collect();
                model[(lba * 512) as usize..((lba + n) * 512) as usize].copy_from_slice(&data);
                cmds.push((write10(lba as u32, n as u16, next() % 4 == 0), data, 0));
            }
            lba += n;
        }
        for c in rig.run(&cmds) {
            assert_eq!(c.status, 0, "write failed: {:?}", c.sense);
        }
        let mut reads = Vec::new();
        let mut lba = 0u64;
        while lba < blocks {
            let n = (next() % 16 + 1).min(blocks - lba);
            reads.push((lba, n));
            lba += n;
        }
        let cmds: Vec<_> = reads
            .iter()
            .map(|&(l, n)| (read10(l as u32, n as u16), vec![], (n * 512) as usize))
            .collect();
        for (c, &(l, n)) in rig.run(&cmds).iter().zip(&reads) {
            assert_eq!(c.status, 0);
            assert!(
                c.data_in[..] == model[(l * 512) as usize..((l + n) * 512) as usize],
                "data mismatch at LBA {l} (+{n})"
            );
        }
    }
}

#[test]
fn ram_round_trip_with_many_in_flight() {
    round_trip(
        Arc::new(RamHandler::new(512 * 512)),
        512,
        0x9e37_79b9_7f4a_7c15,
        SimConfig::default(),
    );
}

#[test]
fn file_round_trip_with_many_in_flight() {
    let blocks = 512;
    let d = cfg(blocks, false);
    let f = tempfile::tempfile().unwrap();
    let h = Arc::new(FileHandler::new(&d, f).unwrap());
    let sim_cfg = SimConfig {
        max_iov_len: 1536,
        ..SimConfig::default()
    };
    round_trip(h, blocks, 0x1234_5678_9abc_def1, sim_cfg);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    /// Small rings (frequent wrap-around and PAD entries), small data areas (frequent Full),
    /// split iovecs, and in-order or out-of-order completion.
    #[test]
    fn round_trip_over_random_ring_shapes(ring_kib in 2u32..16, data_blocks in 8usize..64,
                                          iov in prop_oneof![Just(usize::MAX), 512usize..4096],
                                          ooo in any::<bool>(), seed in 1u64..u64::MAX) {
        let sim_cfg = SimConfig {
            ring_size: ring_kib * 1024 - 8 * (ring_kib % 3) - 128,
            data_size: data_blocks * 4096,
            max_iov_len: iov,
            flags: if ooo { SimConfig::default().flags } else { SimConfig::default().flags & !tcmu_warden_tests::CAP_OOOC },
            ..SimConfig::default()
        };
        round_trip(Arc::new(RamHandler::new(128 * 512)), 128, seed, sim_cfg);
    }
}

#[test]
fn stop_drains_in_flight_commands() {
    /// A handler whose reads wait until released, so commands are provably in flight at stop.
    struct Gate {
        inner: RamHandler,
        open: Mutex<bool>,
        cv: std::sync::Condvar,
        waiting: AtomicUsize,
    }
    impl Handler for Gate {
        fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<()> {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let mut g = self.open.lock().unwrap();
            while !*g {
                g = self.cv.wait(g).unwrap();
            }
            self.inner.read(offset, bufs)
        }
        fn write(&self, o: u64, b: &[IoSlice<'_>], d: bool) -> std::io::Result<()> {
            self.inner.write(o, b, d)
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let gate = Arc::new(Gate {
        inner: RamHandler::new(64 * 512),
        open: Mutex::new(false),
        cv: std::sync::Condvar::new(),
        waiting: AtomicUsize::new(0),
    });
    let mut rig = Rig::new(&cfg(64, false), gate.clone(), SimConfig::default(), 2);
    let a = rig.sim.submit(&read10(0, 1), &[], 512).unwrap();
    let b = rig.sim.submit(&read10(1, 1), &[], 512).unwrap();
    rig.sim.kick().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while gate.waiting.load(Ordering::SeqCst) < 2 {
        assert!(
            Instant::now() < deadline,
            "commands never reached the handler"
        );
        std::thread::yield_now();
    }
    let runner = rig.take_runner().unwrap();
    let stopper = std::thread::spawn(move || runner.stop());
    *gate.open.lock().unwrap() = true;
    gate.cv.notify_all();
    stopper.join().unwrap().unwrap();
    let mut ids: Vec<u16> = rig.sim.reap().unwrap().iter().map(|c| c.cmd_id).collect();
    ids.sort_unstable();
    let mut want = vec![a, b];
    want.sort_unstable();
    assert_eq!(
        ids, want,
        "both in-flight commands completed before stop returned"
    );
}
