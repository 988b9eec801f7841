//! Asynchronous handlers through the worker's real runtime and the simulated kernel: a handler
//! that keeps commands in flight and answers them later from a thread of its own, one that drops
//! a command's handle without answering, and one that blocks its device. Everything is checked
//! from the simulated kernel's side (statuses, sense data, data-in bytes) with polling waits.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use tcmu_warden_sdk::{CommandResult, DeviceConfig, Handler, Pending};
use tcmu_warden_tests::{Rig, SimConfig, sense_triple};

const BS: u32 = 512;
const READ10: u8 = 0x28;
/// How many commands the asynchronous handler holds before answering any.
const IN_FLIGHT: usize = 256;

fn cfg(blocks: u64) -> DeviceConfig {
    DeviceConfig {
        name: "async".into(),
        subtype: "async".into(),
        cfgstring: String::new(),
        dev_size: blocks * u64::from(BS),
        block_size: BS,
        max_sectors: 128,
        write_cache: false,
        unit_serial: "async-serial-1".into(),
    }
}

fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![READ10, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn lba_of(cdb: &[u8]) -> u32 {
    u32::from_be_bytes(cdb[2..6].try_into().unwrap())
}

/// The bytes block `lba` reads as: its number, then a counting pattern.
fn block_bytes(lba: u32) -> Vec<u8> {
    let mut b: Vec<u8> = (0..BS).map(|i| (i as u8).wrapping_add(lba as u8)).collect();
    b[..4].copy_from_slice(&lba.to_be_bytes());
    b
}

/// A ring and data area large enough for [`IN_FLIGHT`] one-block READs at once.
fn big_ring() -> SimConfig {
    SimConfig {
        ring_size: 256 * 1024,
        data_size: 4 * 1024 * 1024,
        ..SimConfig::default()
    }
}

/// The block methods of a handler that answers every READ(10) itself; the emulation never
/// needs them for the commands these tests send.
macro_rules! no_block_io {
    () => {
        fn read(&self, _offset: u64, _bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::Unsupported))
        }
        fn write(&self, _offset: u64, _bufs: &[IoSlice<'_>], _durable: bool) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::Unsupported))
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
    };
}

/// Holds every READ(10) it is given; its completion thread waits until it holds
/// [`IN_FLIGHT`] of them, then answers them all in a shuffled order.
struct Holding {
    held: Mutex<Vec<Pending>>,
    arrived: Condvar,
    submit_threads: Mutex<Vec<ThreadId>>,
}

impl Handler for Holding {
    no_block_io!();

    fn implemented_opcodes(&self) -> &[u8] {
        &[READ10]
    }

    fn submit(&self, cmd: Pending) {
        self.submit_threads
            .lock()
            .unwrap()
            .push(std::thread::current().id());
        self.held.lock().unwrap().push(cmd);
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
fn an_async_handler_answers_256_commands_in_flight_out_of_order_from_one_thread() {
    let handler = Arc::new(Holding {
        held: Mutex::new(Vec::new()),
        arrived: Condvar::new(),
        submit_threads: Mutex::new(Vec::new()),
    });
    let mut rig = Rig::new(&cfg(4096), handler.clone(), big_ring(), 4);

    // The one completion thread: waits (bounded) until all commands are held at once, then
    // answers them in a shuffled order, filling each one's data first.
    let completer = {
        let handler = handler.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut held = handler.held.lock().unwrap();
            while held.len() < IN_FLIGHT {
                let left = deadline.saturating_duration_since(Instant::now());
                assert!(!left.is_zero(), "only {} commands arrived", held.len());
                held = handler.arrived.wait_timeout(held, left).unwrap().0;
            }
            let mut cmds: Vec<Pending> = std::mem::take(&mut *held);
            drop(held);
            let mut seed = 0x5eed_u64;
            for i in (1..cmds.len()).rev() {
                let j = (splitmix(&mut seed) % (i as u64 + 1)) as usize;
                cmds.swap(i, j);
            }
            let mut order = Vec::new();
            for mut p in cmds {
                let lba = lba_of(p.cdb());
                assert_eq!(p.data_mut().copy_from(0, &block_bytes(lba)), BS as usize);
                order.push(lba);
                p.complete(CommandResult::good());
            }
            (order, std::thread::current().id())
        })
    };

    // Every command reads a different block: LBA 7 * i, so each answer is recognisable.
    let cmds: Vec<(Vec<u8>, Vec<u8>, usize)> = (0..IN_FLIGHT as u32)
        .map(|i| (read10(7 * i, 1), Vec::new(), BS as usize))
        .collect();
    // `run` fails on a completion for a command not in flight (a second answer) and on a
    // command never answered; it returns them in submission order.
    let done = rig.run(&cmds);
    let (order, completion_thread) = completer.join().unwrap();

    assert_eq!(done.len(), IN_FLIGHT);
    for (i, c) in done.iter().enumerate() {
        assert_eq!(c.status, 0, "command {i}");
        assert_eq!(c.data_in, block_bytes(7 * i as u32), "data of command {i}");
    }
    // Answered out of order, each exactly once.
    let submitted: Vec<u32> = (0..IN_FLIGHT as u32).map(|i| 7 * i).collect();
    assert_ne!(order, submitted, "the answers came in submission order");
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, submitted);
    // Submitted from the runtime's I/O threads, none of them the completion thread.
    assert!(
        handler
            .submit_threads
            .lock()
            .unwrap()
            .iter()
            .all(|t| *t != completion_thread)
    );
    assert!(rig.sim.is_drained());
    let runner = rig.take_runner().unwrap();
    assert_eq!(runner.counters().commands.load(Ordering::Relaxed), 256);
    assert_eq!(
        runner.counters().bytes_read.load(Ordering::Relaxed),
        256 * u64::from(BS)
    );
    runner.stop().unwrap();
}

/// Drops the handle of every READ(10) of an odd block without answering, on a thread of its
/// own; answers the others.
struct Forgetful {
    dropped: AtomicUsize,
}

impl Handler for Forgetful {
    no_block_io!();

    fn implemented_opcodes(&self) -> &[u8] {
        &[READ10]
    }

    fn submit(&self, mut cmd: Pending) {
        if lba_of(cmd.cdb()) % 2 == 1 {
            self.dropped.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || drop(cmd));
        } else {
            let lba = lba_of(cmd.cdb());
            cmd.data_mut().copy_from(0, &block_bytes(lba));
            cmd.complete(CommandResult::good());
        }
    }
}

#[test]
fn a_handle_dropped_unanswered_ends_its_command_in_check_condition() {
    let handler = Arc::new(Forgetful {
        dropped: AtomicUsize::new(0),
    });
    let mut rig = Rig::new(&cfg(64), handler.clone(), SimConfig::default(), 2);
    let cmds: Vec<(Vec<u8>, Vec<u8>, usize)> = (0..8)
        .map(|lba| (read10(lba, 1), Vec::new(), BS as usize))
        .collect();
    // Bounded: `run` polls with a deadline and fails rather than hang.
    let done = rig.run(&cmds);
    for (lba, c) in done.iter().enumerate() {
        if lba % 2 == 1 {
            // HARDWARE ERROR / INTERNAL TARGET FAILURE, the SDK's documented answer.
            assert_eq!(sense_triple(c), (0x04, 0x44, 0x00), "block {lba}");
        } else {
            assert_eq!(c.status, 0, "block {lba}");
            assert_eq!(c.data_in, block_bytes(lba as u32));
        }
    }
    assert_eq!(handler.dropped.load(Ordering::SeqCst), 4);
    // The device carries on.
    let again = rig.one(&read10(2, 1), &[], BS as usize);
    assert_eq!(again.status, 0);
    let runner = rig.take_runner().unwrap();
    assert_eq!(runner.counters().errors.load(Ordering::Relaxed), 4);
    runner.stop().unwrap();
}

/// Blocks its device when it gets a READ(10) of block 0 and hands that command to the test;
/// answers every other READ(10) at once, counting it.
struct Blocking {
    first: Mutex<mpsc::Sender<Pending>>,
    answered: AtomicUsize,
}

impl Handler for Blocking {
    no_block_io!();

    fn implemented_opcodes(&self) -> &[u8] {
        &[READ10]
    }

    fn submit(&self, mut cmd: Pending) {
        if lba_of(cmd.cdb()) == 0 {
            cmd.device_block().block();
            self.first.lock().unwrap().send(cmd).unwrap();
        } else {
            let lba = lba_of(cmd.cdb());
            cmd.data_mut().copy_from(0, &block_bytes(lba));
            self.answered.fetch_add(1, Ordering::SeqCst);
            cmd.complete(CommandResult::good());
        }
    }
}

#[test]
fn a_blocked_device_fetches_nothing_new_until_the_handler_unblocks_it() {
    let (tx, rx) = mpsc::channel();
    let handler = Arc::new(Blocking {
        first: Mutex::new(tx),
        answered: AtomicUsize::new(0),
    });
    let mut rig = Rig::new(&cfg(64), handler.clone(), SimConfig::default(), 2);
    let sim = &mut rig.sim;
    let first = sim.submit(&read10(0, 1), &[], BS as usize).unwrap();
    sim.kick().unwrap();
    let held = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let block = held.device_block();
    assert!(block.is_blocked());

    // Two more commands arrive while the device is blocked.
    let later: Vec<u16> = (1..3)
        .map(|lba| sim.submit(&read10(lba, 1), &[], BS as usize).unwrap())
        .collect();
    sim.kick().unwrap();
    // Answering the held command wakes the ring thread after the two were queued: it delivers
    // the answer and, the device being blocked, fetches nothing.
    held.complete(CommandResult::busy());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut reaped = Vec::new();
    while !reaped
        .iter()
        .any(|c: &tcmu_warden_tests::Completed| c.cmd_id == first)
    {
        assert!(
            Instant::now() < deadline,
            "the held command was not delivered"
        );
        sim.wait_notified(Duration::from_millis(200)).unwrap();
        reaped.extend(sim.reap().unwrap());
    }
    assert_eq!(reaped.len(), 1, "{reaped:?}");
    assert_eq!(reaped[0].status, 0x08, "BUSY");
    assert_eq!(handler.answered.load(Ordering::SeqCst), 0);
    assert_eq!(sim.in_flight(), 2);

    // Unblocked, the device serves what waited.
    block.unblock();
    let mut rest = Vec::new();
    while rest.len() < later.len() {
        assert!(
            Instant::now() < deadline,
            "the waiting commands were not served"
        );
        sim.wait_notified(Duration::from_millis(200)).unwrap();
        rest.extend(sim.reap().unwrap());
    }
    rest.sort_by_key(|c| c.cmd_id);
    for c in &rest {
        assert!(later.contains(&c.cmd_id));
        assert_eq!(c.status, 0);
    }
    assert_eq!(handler.answered.load(Ordering::SeqCst), 2);
    assert!(sim.is_drained());
}
