//! The asynchronous block path through the worker's real runtime and the simulated kernel: a
//! handler whose block I/O is asynchronous only (its blocking read/write/flush panic) holds
//! hundreds of the emulation's block requests at once and completes them from one thread of its
//! own, out of order; a dropped block request ends its command in CHECK CONDITION; and the
//! emulation's durability decisions (FUA, WCE, SYNCHRONIZE CACHE, UNMAP's flush) reach the
//! handler's `submit_io`. Everything is checked from the simulated kernel's side (statuses,
//! sense data, data-in bytes) and from what the handler was asked, with polling waits.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use tcmu_warden_sdk::{BlockOp, BlockRequest, DeviceConfig, Handler, HandlerCaps};
use tcmu_warden_tests::{Rig, SimConfig, sense_triple};

const BS: u32 = 512;
const READ10: u8 = 0x28;
const WRITE10: u8 = 0x2A;
const SYNC_CACHE10: u8 = 0x35;
const UNMAP: u8 = 0x42;
/// How many block requests the handler holds before completing any.
const IN_FLIGHT: usize = 256;

fn cfg(blocks: u64, write_cache: bool) -> DeviceConfig {
    DeviceConfig {
        name: "asyncblock".into(),
        subtype: "asyncblock".into(),
        cfgstring: String::new(),
        dev_size: blocks * u64::from(BS),
        block_size: BS,
        max_sectors: 128,
        write_cache,
        unit_serial: "asyncblock-serial-1".into(),
    }
}

fn rw10(op: u8, lba: u32, blocks: u16, fua: bool) -> Vec<u8> {
    let mut c = vec![op, if fua { 0x08 } else { 0 }, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// The bytes block `lba` reads as.
fn read_bytes(lba: u64) -> Vec<u8> {
    let mut b: Vec<u8> = (0..BS).map(|i| (i as u8).wrapping_add(lba as u8)).collect();
    b[..8].copy_from_slice(&lba.to_be_bytes());
    b
}

/// The bytes the test writes to block `lba`.
fn write_bytes(lba: u64) -> Vec<u8> {
    read_bytes(lba).iter().map(|b| !b).collect()
}

/// A ring and data area large enough for [`IN_FLIGHT`] one-block commands at once.
fn big_ring() -> SimConfig {
    SimConfig {
        ring_size: 256 * 1024,
        data_size: 4 * 1024 * 1024,
        ..SimConfig::default()
    }
}

/// The blocking block methods of a handler whose block I/O is asynchronous only: the emulation
/// must never call them.
macro_rules! no_blocking_io {
    () => {
        fn read(&self, _offset: u64, _bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
            panic!("blocking read called on an asynchronous-only handler")
        }
        fn write(&self, _offset: u64, _bufs: &[IoSlice<'_>], _durable: bool) -> io::Result<()> {
            panic!("blocking write called on an asynchronous-only handler")
        }
        fn flush(&self) -> io::Result<()> {
            panic!("blocking flush called on an asynchronous-only handler")
        }
    };
}

/// Holds every block request; its completion thread completes them once it holds
/// [`IN_FLIGHT`] of them at once.
struct Holding {
    held: Mutex<Vec<BlockRequest>>,
    arrived: Condvar,
    most_held: AtomicUsize,
    submit_threads: Mutex<Vec<ThreadId>>,
}

impl Handler for Holding {
    no_blocking_io!();

    fn submit_io(&self, req: BlockRequest) {
        self.submit_threads
            .lock()
            .unwrap()
            .push(std::thread::current().id());
        let mut held = self.held.lock().unwrap();
        held.push(req);
        self.most_held.fetch_max(held.len(), Ordering::SeqCst);
        self.arrived.notify_all();
    }
}

/// SplitMix64: a fixed, well-mixed sequence for the shuffle.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[test]
fn an_async_only_handler_keeps_256_block_requests_in_flight_and_completes_them_out_of_order() {
    let handler = Arc::new(Holding {
        held: Mutex::new(Vec::new()),
        arrived: Condvar::new(),
        most_held: AtomicUsize::new(0),
        submit_threads: Mutex::new(Vec::new()),
    });
    // Four I/O threads for 256 commands: the requests are held without holding a thread each.
    let mut rig = Rig::new(&cfg(4096, true), handler.clone(), big_ring(), 4);

    // The one completion thread: waits (bounded) until all requests are held at once, then
    // completes them in a shuffled order: reads get their block's bytes, writes are checked.
    let completer = {
        let handler = handler.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut held = handler.held.lock().unwrap();
            while held.len() < IN_FLIGHT {
                let left = deadline.saturating_duration_since(Instant::now());
                assert!(!left.is_zero(), "only {} requests arrived", held.len());
                held = handler.arrived.wait_timeout(held, left).unwrap().0;
            }
            let mut reqs: Vec<BlockRequest> = std::mem::take(&mut *held);
            drop(held);
            let mut seed = 0xb10c_u64;
            for i in (1..reqs.len()).rev() {
                let j = (splitmix(&mut seed) % (i as u64 + 1)) as usize;
                reqs.swap(i, j);
            }
            let mut order = Vec::new();
            let mut written = HashMap::new();
            for mut r in reqs {
                assert_eq!(r.len(), BS as usize);
                match r.op() {
                    BlockOp::Read { offset } => {
                        let lba = offset / u64::from(BS);
                        assert_eq!(r.copy_in(0, &read_bytes(lba)), BS as usize);
                        order.push(lba);
                    }
                    BlockOp::Write { offset, durable } => {
                        let lba = offset / u64::from(BS);
                        assert!(!durable, "a plain WRITE on a WCE=1 device is not durable");
                        let mut data = vec![0u8; BS as usize];
                        assert_eq!(r.copy_out(0, &mut data), BS as usize);
                        assert!(
                            written.insert(lba, data).is_none(),
                            "block {lba} written twice"
                        );
                        order.push(lba);
                    }
                    other => panic!("unexpected block request {other:?}"),
                }
                r.complete(Ok(()));
            }
            (order, written, std::thread::current().id())
        })
    };

    // Command i reads (even i) or writes (odd i) block 7 * i, so each request is recognisable.
    let cmds: Vec<(Vec<u8>, Vec<u8>, usize)> = (0..IN_FLIGHT as u32)
        .map(|i| {
            let lba = 7 * i;
            if i % 2 == 0 {
                (rw10(READ10, lba, 1, false), Vec::new(), BS as usize)
            } else {
                (rw10(WRITE10, lba, 1, false), write_bytes(u64::from(lba)), 0)
            }
        })
        .collect();
    // `run` fails on a completion for a command not in flight (a second answer) and on a
    // command never answered; it returns them in submission order.
    let done = rig.run(&cmds);
    let (order, written, completion_thread) = completer.join().unwrap();

    assert_eq!(done.len(), IN_FLIGHT);
    for (i, c) in done.iter().enumerate() {
        assert_eq!(c.status, 0, "command {i}");
        if i % 2 == 0 {
            assert_eq!(c.data_in, read_bytes(7 * i as u64), "data of command {i}");
        }
    }
    assert_eq!(written.len(), IN_FLIGHT / 2);
    for (lba, data) in &written {
        assert_eq!(*data, write_bytes(*lba), "data written to block {lba}");
    }
    // Every request completed exactly once, not in submission order.
    let submitted: Vec<u64> = (0..IN_FLIGHT as u64).map(|i| 7 * i).collect();
    assert_ne!(
        order, submitted,
        "the requests completed in submission order"
    );
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, submitted);
    assert_eq!(handler.most_held.load(Ordering::SeqCst), IN_FLIGHT);
    // Submitted from the runtime's I/O threads (at most four of them), none of them the
    // completion thread.
    let mut threads = handler.submit_threads.lock().unwrap().clone();
    assert!(threads.iter().all(|t| *t != completion_thread));
    threads.sort_by_key(|t| format!("{t:?}"));
    threads.dedup();
    assert!(threads.len() <= 4, "{} submitting threads", threads.len());

    assert!(rig.sim.is_drained());
    let runner = rig.take_runner().unwrap();
    assert_eq!(runner.counters().commands.load(Ordering::Relaxed), 256);
    assert_eq!(runner.counters().errors.load(Ordering::Relaxed), 0);
    assert_eq!(
        runner.counters().bytes_read.load(Ordering::Relaxed),
        128 * u64::from(BS)
    );
    assert_eq!(
        runner.counters().bytes_written.load(Ordering::Relaxed),
        128 * u64::from(BS)
    );
    runner.stop().unwrap();
}

/// Drops every block request for an odd block without completing it, on a thread of its own;
/// completes the others at once.
struct Forgetful {
    dropped: AtomicUsize,
}

impl Handler for Forgetful {
    no_blocking_io!();

    fn submit_io(&self, mut req: BlockRequest) {
        let lba = match req.op() {
            BlockOp::Read { offset } | BlockOp::Write { offset, .. } => offset / u64::from(BS),
            _ => 0,
        };
        if lba % 2 == 1 {
            self.dropped.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || drop(req));
        } else {
            if matches!(req.op(), BlockOp::Read { .. }) {
                req.copy_in(0, &read_bytes(lba));
            }
            req.complete(Ok(()));
        }
    }
}

#[test]
fn a_block_request_dropped_uncompleted_ends_its_command_in_check_condition() {
    let handler = Arc::new(Forgetful {
        dropped: AtomicUsize::new(0),
    });
    let mut rig = Rig::new(&cfg(64, false), handler.clone(), SimConfig::default(), 2);
    let mut cmds: Vec<(Vec<u8>, Vec<u8>, usize)> = (0..8)
        .map(|lba| (rw10(READ10, lba, 1, false), Vec::new(), BS as usize))
        .collect();
    cmds.push((rw10(WRITE10, 9, 1, false), write_bytes(9), 0));
    cmds.push((rw10(WRITE10, 10, 1, false), write_bytes(10), 0));
    // Bounded: `run` polls with a deadline and fails rather than hang.
    let done = rig.run(&cmds);
    for (i, c) in done.iter().enumerate() {
        let lba = if i < 8 { i } else { i + 1 };
        if lba % 2 == 1 {
            // HARDWARE ERROR / INTERNAL TARGET FAILURE, the SDK's documented answer.
            assert_eq!(sense_triple(c), (0x04, 0x44, 0x00), "block {lba}");
        } else {
            assert_eq!(c.status, 0, "block {lba}");
            if i < 8 {
                assert_eq!(c.data_in, read_bytes(lba as u64));
            }
        }
    }
    assert_eq!(handler.dropped.load(Ordering::SeqCst), 5);
    // The device carries on.
    let again = rig.one(&rw10(READ10, 2, 1, false), &[], BS as usize);
    assert_eq!(again.status, 0);
    assert_eq!(again.data_in, read_bytes(2));
    let runner = rig.take_runner().unwrap();
    assert_eq!(runner.counters().errors.load(Ordering::Relaxed), 5);
    runner.stop().unwrap();
}

/// Completes every block request at once, on the submitting thread, and records what it was
/// asked; it supports unmap.
#[derive(Default)]
struct Recording {
    ops: Mutex<Vec<BlockOp>>,
}

impl Handler for Recording {
    no_blocking_io!();

    fn caps(&self) -> HandlerCaps {
        HandlerCaps {
            unmap: true,
            unmap_granularity: 1,
            unmap_reads_zero: true,
        }
    }

    fn submit_io(&self, req: BlockRequest) {
        self.ops.lock().unwrap().push(req.op());
        req.complete(Ok(()));
    }
}

fn unmap_cdb(descriptors: &[(u64, u32)]) -> (Vec<u8>, Vec<u8>) {
    let mut list = vec![0u8; 8];
    for (lba, blocks) in descriptors {
        list.extend_from_slice(&lba.to_be_bytes());
        list.extend_from_slice(&blocks.to_be_bytes());
        list.extend_from_slice(&[0; 4]);
    }
    let n = list.len() as u16;
    list[0..2].copy_from_slice(&(n - 2).to_be_bytes());
    list[2..4].copy_from_slice(&(n - 8).to_be_bytes());
    let mut cdb = vec![UNMAP, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    cdb[7..9].copy_from_slice(&n.to_be_bytes());
    (cdb, list)
}

#[test]
fn durability_reaches_the_handler_fua_and_wce_off_are_durable_and_sync_cache_flushes() {
    let off = |lba: u64| lba * u64::from(BS);

    // Write cache on: plain writes are volatile, FUA writes durable, SYNCHRONIZE CACHE
    // flushes, and a FUA read flushes before it reads.
    let handler = Arc::new(Recording::default());
    let mut rig = Rig::new(&cfg(64, true), handler.clone(), SimConfig::default(), 2);
    let data = write_bytes(0);
    assert_eq!(rig.one(&rw10(WRITE10, 1, 1, false), &data, 0).status, 0);
    assert_eq!(rig.one(&rw10(WRITE10, 2, 1, true), &data, 0).status, 0);
    let sync = [SYNC_CACHE10, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(rig.one(&sync, &[], 0).status, 0);
    assert_eq!(
        rig.one(&rw10(READ10, 3, 1, true), &[], BS as usize).status,
        0
    );
    assert_eq!(
        *handler.ops.lock().unwrap(),
        vec![
            BlockOp::Write {
                offset: off(1),
                durable: false
            },
            BlockOp::Write {
                offset: off(2),
                durable: true
            },
            BlockOp::Flush,
            BlockOp::Flush,
            BlockOp::Read { offset: off(3) },
        ]
    );
    drop(rig);

    // Write cache off: every write is durable, and UNMAP's deallocations are flushed after
    // the last descriptor's request completes.
    let handler = Arc::new(Recording::default());
    let mut rig = Rig::new(&cfg(64, false), handler.clone(), SimConfig::default(), 2);
    assert_eq!(rig.one(&rw10(WRITE10, 4, 1, false), &data, 0).status, 0);
    let (cdb, list) = unmap_cdb(&[(8, 2), (20, 0), (30, 4)]);
    assert_eq!(rig.one(&cdb, &list, 0).status, 0);
    let ops = handler.ops.lock().unwrap().clone();
    assert_eq!(
        ops,
        vec![
            BlockOp::Write {
                offset: off(4),
                durable: true
            },
            BlockOp::Unmap {
                offset: off(8),
                len: 2 * u64::from(BS)
            },
            BlockOp::Unmap {
                offset: off(30),
                len: 4 * u64::from(BS)
            },
            BlockOp::Flush,
        ]
    );
    // WRITE SAME with UNMAP and zeros deallocates (then flushes); with other data it writes
    // the pattern, durably, through the same `submit_io` (blocking on its I/O thread).
    let ws = |lba: u32, blocks: u16| {
        let mut c = vec![0x41, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&blocks.to_be_bytes());
        c
    };
    assert_eq!(rig.one(&ws(40, 3), &[0u8; BS as usize], 0).status, 0);
    assert_eq!(rig.one(&ws(50, 2), &data, 0).status, 0);
    let ops = handler.ops.lock().unwrap().clone();
    assert_eq!(
        ops[4..],
        [
            BlockOp::Unmap {
                offset: off(40),
                len: 3 * u64::from(BS)
            },
            BlockOp::Flush,
            BlockOp::Write {
                offset: off(50),
                durable: true
            },
        ]
    );
    // An out-of-range write is refused before it reaches the handler.
    let c = rig.one(&rw10(WRITE10, 64, 1, false), &data, 0);
    assert_eq!(sense_triple(&c), (0x05, 0x21, 0x00));
    assert_eq!(handler.ops.lock().unwrap().len(), ops.len());
}

/// Keeps blocks in memory; holds the first write it gets (handing it to the test) and completes
/// everything else at once, on the submitting thread. A write's data lands in memory when it
/// completes. Records what it was asked, and any read that arrived while the held write was
/// still in flight.
#[derive(Default)]
struct Gated {
    memory: Mutex<HashMap<u64, Vec<u8>>>,
    held: Mutex<Option<BlockRequest>>,
    held_once: std::sync::atomic::AtomicBool,
    reads_while_held: AtomicUsize,
    ops: Mutex<Vec<BlockOp>>,
}

impl Gated {
    fn apply(&self, req: &mut BlockRequest) {
        let mut mem = self.memory.lock().unwrap();
        match req.op() {
            BlockOp::Read { offset } => {
                let lba = offset / u64::from(BS);
                let data = mem.get(&lba).cloned().unwrap_or(vec![0; BS as usize]);
                req.copy_in(0, &data);
            }
            BlockOp::Write { offset, .. } => {
                let mut data = vec![0u8; req.len()];
                req.copy_out(0, &mut data);
                mem.insert(offset / u64::from(BS), data);
            }
            _ => {}
        }
    }
}

impl Handler for Gated {
    no_blocking_io!();

    fn submit_io(&self, mut req: BlockRequest) {
        self.ops.lock().unwrap().push(req.op());
        match req.op() {
            BlockOp::Write { .. } if !self.held_once.swap(true, Ordering::SeqCst) => {
                *self.held.lock().unwrap() = Some(req);
            }
            op => {
                if matches!(op, BlockOp::Read { .. }) && self.held.lock().unwrap().is_some() {
                    self.reads_while_held.fetch_add(1, Ordering::SeqCst);
                }
                self.apply(&mut req);
                req.complete(Ok(()));
            }
        }
    }
}

#[test]
fn a_write_keeps_its_range_locked_until_its_block_request_completes() {
    let handler = Arc::new(Gated::default());
    let mut rig = Rig::new(&cfg(64, true), handler.clone(), SimConfig::default(), 4);
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = write_bytes(5);
    let second = read_bytes(5);

    // A WRITE of block 5, held by the handler.
    let write_id = rig
        .sim
        .submit(&rw10(WRITE10, 5, 1, false), &first, 0)
        .unwrap();
    rig.sim.kick().unwrap();
    while handler.held.lock().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the write never reached the handler"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // COMPARE AND WRITE of block 5, expecting what the held write writes. It must wait for
    // the write's range lock: had it read the block now, it would find zeros and miscompare.
    let mut caw = vec![0x89, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 1, 0, 0];
    caw[2..10].copy_from_slice(&5u64.to_be_bytes());
    let mut caw_data = first.clone();
    caw_data.extend_from_slice(&second);
    let caw_id = rig.sim.submit(&caw, &caw_data, 0).unwrap();
    rig.sim.kick().unwrap();
    // Give it ample opportunity to (wrongly) read the block while the write is in flight.
    let watch = Instant::now() + Duration::from_secs(2);
    while Instant::now() < watch && handler.reads_while_held.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(handler.reads_while_held.load(Ordering::SeqCst), 0);
    assert!(
        rig.sim.reap().unwrap().is_empty(),
        "answered before the write completed"
    );

    // The write completes (from this thread); then the COMPARE AND WRITE reads, matches and
    // writes.
    let mut held = handler.held.lock().unwrap().take().unwrap();
    handler.apply(&mut held);
    held.complete(Ok(()));
    let mut reaped = Vec::new();
    while reaped.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "commands not answered: {reaped:?}"
        );
        rig.sim.wait_notified(Duration::from_millis(200)).unwrap();
        reaped.extend(rig.sim.reap().unwrap());
    }
    for c in &reaped {
        assert!(c.cmd_id == write_id || c.cmd_id == caw_id);
        assert_eq!(c.status, 0, "command {}: {:?}", c.cmd_id, c.sense);
    }
    assert_eq!(handler.memory.lock().unwrap().get(&5), Some(&second));
    assert_eq!(
        *handler.ops.lock().unwrap(),
        vec![
            BlockOp::Write {
                offset: 5 * u64::from(BS),
                durable: false
            },
            BlockOp::Read {
                offset: 5 * u64::from(BS)
            },
            BlockOp::Write {
                offset: 5 * u64::from(BS),
                durable: false
            },
        ]
    );
}
