//! Crash recovery, proven against the kernel simulator.
//!
//! Each iteration serves a random workload (writes, reads, WRITE SAME, COMPARE AND WRITE,
//! TEST UNIT READY, SYNCHRONIZE CACHE, INQUIRY, and task-management entries) on a randomly shaped
//! ring (small rings that wrap with PAD entries, in-order or out-of-order completion, iovecs split
//! so that some commands have more than a journal slot holds) with the real worker runtime, and
//! kills the worker one to four times at random points of the journal protocol: after a fetch
//! is journaled but not committed, after a response is written into the ring but before the tail
//! moves, after the tail moved but before the journal slots are freed, while idle, and so on
//! ([`CrashPoint`]). A kill stops the ring thread dead (no further ring or journal write); the
//! I/O threads finish what they were executing, as a killed process's last system calls would,
//! and the rest is abandoned. A successor then recovers from the same ring and journal while the
//! simulated device is blocked, and serves on.
//!
//! Everything is checked on the simulated kernel's side: every command completes exactly once
//! (a second completion, or one naming an id the kernel does not have, breaks the simulated ring;
//! ids are allocated cyclically so a stale id is never mistaken for a new command), none is lost
//! (the ring drains), BUSY appears only for commands that were in flight at a crash and could not
//! be replayed (COMPARE AND WRITE, or more iovecs than a journal slot holds), a COMPARE AND WRITE
//! never runs twice (a miscompare on its first attempt would prove it did), reads return exactly
//! the acknowledged data, and the device's final contents equal the model.
//!
//! A second test damages the journal before recovery: recovery must notice, and the fallback
//! (`reset_ring`: every in-flight command answered BUSY) must lose nothing either.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::memfd::{MFdFlags, memfd_create};
use tcmu_warden_tests::{CAP_OOOC, Completed, KernelSim, SimConfig, SimError};
use tcmu_warden_worker::handler::ram::RamHandler;
use tcmu_warden_worker::handler::{DeviceConfig, Handler, HandlerCaps};
use tcmu_warden_worker::ring::journal::{self, Journal, MAX_JOURNAL_IOVECS};
use tcmu_warden_worker::ring::{
    CrashPlan, CrashPoint, Mapping, RecoverError, Recovery, Ring, RingError,
};
use tcmu_warden_worker::runtime::{DeviceError, DeviceOptions, DeviceRunner};
use tcmu_warden_worker::scsi::Emulator;

const BS: usize = 512;
const BLOCKS: usize = 96;
const GOOD: u8 = 0x00;
const CHECK: u8 = 0x02;
const BUSY: u8 = 0x08;

fn iterations(default: usize) -> usize {
    std::env::var("RECOVERY_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A RAM disk whose I/O takes a little, varying time, so commands finish out of order and many
/// are in flight when a kill comes.
struct Jittery {
    inner: RamHandler,
    tick: AtomicU64,
}

impl Jittery {
    fn pause(&self) {
        let t = self.tick.fetch_add(0x9e37_79b9, Ordering::Relaxed);
        match (t >> 7) % 8 {
            0 => std::thread::sleep(Duration::from_micros(200)),
            1 | 2 => std::thread::sleep(Duration::from_micros(30)),
            3 => std::thread::yield_now(),
            _ => {}
        }
    }
}

impl Handler for Jittery {
    fn caps(&self) -> HandlerCaps {
        self.inner.caps()
    }
    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<()> {
        self.pause();
        self.inner.read(offset, bufs)
    }
    fn write(&self, offset: u64, bufs: &[IoSlice<'_>], durable: bool) -> std::io::Result<()> {
        self.pause();
        self.inner.write(offset, bufs, durable)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.pause();
        self.inner.flush()
    }
    fn unmap(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.unmap(offset, len)
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        lba: usize,
        data: Vec<u8>,
    },
    Read {
        lba: usize,
        blocks: usize,
    },
    WriteSame {
        lba: usize,
        blocks: usize,
        pattern: u8,
    },
    Caw {
        lba: usize,
        old: Vec<u8>,
        new: Vec<u8>,
    },
    Tur,
    Sync,
    Inquiry,
}

impl Op {
    /// The blocks it touches.
    fn range(&self) -> Option<(usize, usize)> {
        match self {
            Op::Write { lba, data } => Some((*lba, data.len() / BS)),
            Op::Read { lba, blocks } | Op::WriteSame { lba, blocks, .. } => Some((*lba, *blocks)),
            Op::Caw { lba, old, .. } => Some((*lba, old.len() / BS)),
            _ => None,
        }
    }

    /// Re-executing it after a crash is safe (the worker's replay list agrees).
    fn replayable(&self) -> bool {
        !matches!(self, Op::Caw { .. })
    }

    /// CDB, data-out, data-in length.
    fn encode(&self) -> (Vec<u8>, Vec<u8>, usize) {
        fn rw10(op: u8, lba: usize, blocks: usize) -> Vec<u8> {
            let mut c = vec![op, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            c[2..6].copy_from_slice(&(lba as u32).to_be_bytes());
            c[7..9].copy_from_slice(&(blocks as u16).to_be_bytes());
            c
        }
        match self {
            Op::Write { lba, data } => (rw10(0x2a, *lba, data.len() / BS), data.clone(), 0),
            Op::Read { lba, blocks } => (rw10(0x28, *lba, *blocks), Vec::new(), blocks * BS),
            Op::WriteSame {
                lba,
                blocks,
                pattern,
            } => (rw10(0x41, *lba, *blocks), vec![*pattern; BS], 0),
            Op::Caw { lba, old, new } => {
                let mut c = vec![0u8; 16];
                c[0] = 0x89;
                c[2..10].copy_from_slice(&(*lba as u64).to_be_bytes());
                c[13] = (old.len() / BS) as u8;
                let mut out = old.clone();
                out.extend_from_slice(new);
                (c, out, 0)
            }
            Op::Tur => (vec![0; 6], Vec::new(), 0),
            Op::Sync => (vec![0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], Vec::new(), 0),
            Op::Inquiry => (vec![0x12, 0, 0, 0, 96, 0], Vec::new(), 96),
        }
    }
}

struct OpState {
    op: Op,
    done: bool,
    /// A COMPARE AND WRITE answered BUSY may have run before the crash.
    maybe_applied: bool,
}

/// One submission of an op.
#[derive(Debug)]
struct Attempt {
    op: usize,
    /// In flight at a crash.
    crossed: bool,
    /// In flight at a ring reset.
    reset: bool,
    iovs: usize,
}

#[derive(Debug, Default)]
struct Stats {
    crashes: BTreeMap<CrashPoint, usize>,
    recoveries: usize,
    resets: usize,
    redelivered: usize,
    already_done: usize,
    replayed_good: usize,
    busy_unreplayable: usize,
    busy_overflow: usize,
    caw_miscompare_after_busy: usize,
    commands: usize,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        for (p, n) in &o.crashes {
            *self.crashes.entry(*p).or_default() += n;
        }
        self.recoveries += o.recoveries;
        self.resets += o.resets;
        self.redelivered += o.redelivered;
        self.already_done += o.already_done;
        self.replayed_good += o.replayed_good;
        self.busy_unreplayable += o.busy_unreplayable;
        self.busy_overflow += o.busy_overflow;
        self.caw_miscompare_after_busy += o.caw_miscompare_after_busy;
        self.commands += o.commands;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Damage {
    /// Kill only.
    None,
    /// Random bytes over the whole journal: recovery must refuse it.
    Garbage,
    /// A few random bytes in the header and the first slots: refused, or harmless.
    Flips,
}

/// Where the journal lives: a memfd, or a file that each successor reopens by path (as a
/// restarted supervisor finds `/run/tcmu-warden/journal/...`).
enum JournalHome {
    Memfd(OwnedFd),
    File(#[allow(dead_code)] tempfile::TempDir, PathBuf),
}

impl JournalHome {
    fn open(&self) -> OwnedFd {
        match self {
            JournalHome::Memfd(fd) => fd.try_clone().unwrap(),
            JournalHome::File(_, path) => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .unwrap()
                .into(),
        }
    }
}

enum StartWith {
    Fresh(Ring),
    Recovered(Recovery),
}

struct World {
    rng: Rng,
    sim: KernelSim,
    map_fd: OwnedFd,
    map_len: usize,
    /// The "supervisor's" own copy of the event descriptor: it outlives every worker.
    event: OwnedFd,
    journal: JournalHome,
    handler: Arc<Jittery>,
    dcfg: DeviceConfig,
    io_threads: usize,
    runner: Option<DeviceRunner>,
    plan: Option<Arc<CrashPlan>>,
    model: Vec<u8>,
    reserved: Vec<bool>,
    ops: Vec<OpState>,
    retry: VecDeque<usize>,
    outstanding: HashMap<u16, Attempt>,
    crashes_left: usize,
    damage: Damage,
    stats: Stats,
    log: Vec<String>,
}

impl World {
    fn new(seed: u64, damage: Damage) -> World {
        let mut rng = Rng(seed | 1);
        let ooo = !rng.one_in(4);
        let max_iov_len = match rng.below(4) {
            0 => 256,
            1 => 1024,
            _ => usize::MAX,
        };
        let ring_kib = 2 + rng.below(14) as u32;
        let cfg = SimConfig {
            ring_size: ring_kib * 1024 - 8 * (ring_kib % 5) - 128,
            data_size: (8 + rng.below(40)) * 4096,
            max_iov_len,
            flags: if ooo {
                SimConfig::default().flags
            } else {
                SimConfig::default().flags & !CAP_OOOC
            },
            cyclic_ids: true,
            ..SimConfig::default()
        };
        let (sim, dev) = KernelSim::new(cfg).unwrap();
        let journal = if rng.one_in(4) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("user_1-disk");
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(journal::JOURNAL_LEN as u64).unwrap();
            JournalHome::File(dir, path)
        } else {
            let fd = memfd_create("journal", MFdFlags::MFD_CLOEXEC).unwrap();
            nix::unistd::ftruncate(&fd, journal::JOURNAL_LEN as i64).unwrap();
            JournalHome::Memfd(fd)
        };
        let dcfg = DeviceConfig {
            name: "kill".into(),
            subtype: "ram".into(),
            cfgstring: String::new(),
            dev_size: (BLOCKS * BS) as u64,
            block_size: BS as u32,
            max_sectors: 128,
            write_cache: rng.one_in(2),
            unit_serial: "recovery-1".into(),
        };
        let crashes_left = 1 + rng.below(4);
        let io_threads = 1 + rng.below(3);
        World {
            sim,
            map_fd: dev.map_fd,
            map_len: dev.map_len,
            event: dev.event_fd,
            journal,
            handler: Arc::new(Jittery {
                inner: RamHandler::new((BLOCKS * BS) as u64),
                tick: AtomicU64::new(seed),
            }),
            dcfg,
            io_threads,
            runner: None,
            plan: None,
            model: vec![0u8; BLOCKS * BS],
            reserved: vec![false; BLOCKS],
            ops: Vec::new(),
            retry: VecDeque::new(),
            outstanding: HashMap::new(),
            crashes_left,
            damage,
            stats: Stats::default(),
            log: Vec::new(),
            rng,
        }
    }

    fn map(&self) -> Arc<Mapping> {
        Mapping::map(self.map_fd.as_fd(), self.map_len).unwrap()
    }

    fn new_plan(&mut self) -> Option<Arc<CrashPlan>> {
        if self.crashes_left == 0 {
            return None;
        }
        let plan = match self.rng.below(3) {
            0 => CrashPlan::new(None, 1 + self.rng.below(150) as u64),
            _ => CrashPlan::new(
                Some(CrashPoint::ALL[self.rng.below(CrashPoint::ALL.len() - 1)]),
                1 + self.rng.below(12) as u64,
            ),
        };
        Some(Arc::new(plan))
    }

    fn start(&mut self, with: StartWith) {
        let plan = self.new_plan();
        let emu = Arc::new(Emulator::new(&self.dcfg, self.handler.clone()));
        let opts = DeviceOptions {
            io_threads: self.io_threads,
        };
        let event = self.event.try_clone().unwrap();
        let runner = match with {
            StartWith::Recovered(mut rec) => {
                if let Some(p) = &plan {
                    rec.ring.set_crash_plan(p.clone());
                }
                DeviceRunner::start_recovered(
                    "kill".into(),
                    rec,
                    event,
                    emu,
                    opts,
                    Box::new(|_| {}),
                )
            }
            StartWith::Fresh(mut ring) => {
                if let Some(p) = &plan {
                    ring.set_crash_plan(p.clone());
                }
                DeviceRunner::start("kill".into(), ring, event, emu, opts, Box::new(|_| {}))
            }
        }
        .unwrap();
        self.runner = Some(runner);
        self.plan = plan;
    }

    fn start_fresh(&mut self) {
        let j = Journal::map(self.journal.open().as_fd()).unwrap();
        let ring = Ring::with_journal(self.map(), j).unwrap();
        self.start(StartWith::Fresh(ring));
    }

    /// A new op over free blocks (reserving them), or `None` if the random spot is taken.
    fn new_op(&mut self) -> Option<Op> {
        let kind = self.rng.below(20);
        let blocks = 1 + self.rng.below(24);
        let lba = self.rng.below(BLOCKS - blocks + 1);
        let op = match kind {
            0..=6 => Op::Write {
                lba,
                data: self.rng.bytes(blocks * BS),
            },
            7..=11 => Op::Read { lba, blocks },
            12 | 13 => Op::WriteSame {
                lba,
                blocks,
                pattern: self.rng.next() as u8,
            },
            14..=16 => {
                let n = 1 + self.rng.below(2);
                let lba = self.rng.below(BLOCKS - n + 1);
                Op::Caw {
                    lba,
                    old: self.model[lba * BS..(lba + n) * BS].to_vec(),
                    new: self.rng.bytes(n * BS),
                }
            }
            17 => Op::Tur,
            18 => Op::Sync,
            _ => Op::Inquiry,
        };
        if let Some((lba, n)) = op.range() {
            if self.reserved[lba..lba + n].iter().any(|r| *r) {
                return None;
            }
            self.reserved[lba..lba + n]
                .iter_mut()
                .for_each(|r| *r = true);
        }
        Some(op)
    }

    fn release(&mut self, op: &Op) {
        if let Some((lba, n)) = op.range() {
            self.reserved[lba..lba + n]
                .iter_mut()
                .for_each(|r| *r = false);
        }
    }

    /// Queues as much as the ring, the data area and the in-flight cap allow.
    fn submit(&mut self, total_ops: usize, cap: usize) {
        while self.outstanding.len() < cap {
            let idx = if let Some(i) = self.retry.pop_front() {
                i
            } else if self.ops.len() < total_ops {
                let Some(op) = self.new_op() else { break };
                self.ops.push(OpState {
                    op,
                    done: false,
                    maybe_applied: false,
                });
                self.ops.len() - 1
            } else {
                break;
            };
            let (cdb, out, in_len) = self.ops[idx].op.encode();
            match self.sim.submit(&cdb, &out, in_len) {
                Ok(id) => {
                    let iovs = self.sim.iov_count(id).unwrap();
                    self.outstanding.insert(
                        id,
                        Attempt {
                            op: idx,
                            crossed: false,
                            reset: false,
                            iovs,
                        },
                    );
                    self.stats.commands += 1;
                }
                Err(SimError::Full) => {
                    self.retry.push_front(idx);
                    break;
                }
                Err(e) => panic!("submit: {e}"),
            }
        }
        if !self.outstanding.is_empty() && self.rng.one_in(25) {
            // A task-management entry naming a command in flight: it must be passed over.
            let id = *self.outstanding.keys().next().unwrap();
            match self.sim.submit_tmr(1, &[id]) {
                Ok(()) | Err(SimError::Full) => {}
                Err(e) => panic!("submit_tmr: {e}"),
            }
        }
    }

    fn reap(&mut self) {
        let done = match self.sim.reap() {
            Ok(d) => d,
            Err(e) => panic!(
                "the simulated kernel broke the ring: {e}\nlog: {:#?}",
                self.log
            ),
        };
        self.process(done);
    }

    fn process(&mut self, completions: Vec<Completed>) {
        for c in completions {
            let a = self.outstanding.remove(&c.cmd_id).unwrap_or_else(|| {
                panic!(
                    "completion for command {} which is not outstanding\nlog: {:#?}",
                    c.cmd_id, self.log
                )
            });
            let op = self.ops[a.op].op.clone();
            match c.status {
                GOOD => {
                    if a.crossed {
                        self.stats.replayed_good += 1;
                    }
                    match &op {
                        Op::Write { lba, data } => {
                            self.model[lba * BS..lba * BS + data.len()].copy_from_slice(data);
                        }
                        Op::WriteSame {
                            lba,
                            blocks,
                            pattern,
                        } => self.model[lba * BS..(lba + blocks) * BS].fill(*pattern),
                        Op::Read { lba, blocks } => {
                            assert!(
                                c.data_in[..] == self.model[lba * BS..(lba + blocks) * BS],
                                "READ of {blocks} blocks at {lba} returned other data than \
                                 acknowledged (attempt {a:?})\nlog: {:#?}",
                                self.log
                            );
                        }
                        Op::Caw { lba, new, .. } => {
                            self.model[lba * BS..lba * BS + new.len()].copy_from_slice(new);
                        }
                        Op::Inquiry => assert_eq!(c.data_in.len(), 96),
                        Op::Tur | Op::Sync => {}
                    }
                    self.finish(a.op, &op);
                }
                BUSY => {
                    assert!(
                        a.crossed || a.reset,
                        "BUSY for a command that never saw a crash: {op:?} {a:?}"
                    );
                    if !a.reset && op.replayable() {
                        assert!(
                            a.iovs > MAX_JOURNAL_IOVECS,
                            "a replayable command with {} iovecs was answered BUSY after a \
                             crash: {op:?}\nlog: {:#?}",
                            a.iovs,
                            self.log
                        );
                        self.stats.busy_overflow += 1;
                    } else if !op.replayable() {
                        self.stats.busy_unreplayable += 1;
                    }
                    if matches!(op, Op::Caw { .. }) {
                        self.ops[a.op].maybe_applied = true;
                    }
                    // The initiator retries.
                    self.retry.push_back(a.op);
                }
                CHECK => {
                    let Op::Caw { lba, new, .. } = &op else {
                        panic!("CHECK CONDITION for {op:?}: {:?}", &c.sense[..18]);
                    };
                    let key = c.sense[2] & 0x0f;
                    assert_eq!(key, 0x0e, "expected MISCOMPARE, sense {:?}", &c.sense[..18]);
                    assert!(
                        self.ops[a.op].maybe_applied,
                        "COMPARE AND WRITE miscompared on its first run: it was executed twice \
                         ({a:?})\nlog: {:#?}",
                        self.log
                    );
                    // The earlier attempt did write; the device holds the new data.
                    self.model[lba * BS..lba * BS + new.len()].copy_from_slice(new);
                    self.stats.caw_miscompare_after_busy += 1;
                    self.finish(a.op, &op);
                }
                other => panic!("status {other:#x} for {op:?}"),
            }
        }
    }

    fn finish(&mut self, idx: usize, op: &Op) {
        self.ops[idx].done = true;
        self.release(op);
    }

    /// The ring thread stopped at a crash point: reap what the kernel was given, then recover
    /// with a successor, as the supervisor would (device blocked meanwhile).
    fn on_crash(&mut self) {
        let runner = self.runner.take().unwrap();
        let point = match runner.stop() {
            Err(DeviceError::Ring(RingError::Crashed(p))) => p,
            other => panic!("the runner ended with {other:?}, not at a crash point"),
        };
        *self.stats.crashes.entry(point).or_default() += 1;
        self.log.push(format!(
            "crash at {point:?}, outstanding {:?}",
            self.sim.in_flight_ids()
        ));
        self.crashes_left -= 1;
        self.reap();
        for a in self.outstanding.values_mut() {
            a.crossed = true;
        }
        self.sim.set_blocked(true);
        let jfd = self.journal.open();
        match self.damage {
            Damage::None => {}
            Damage::Garbage => {
                let junk = self.rng.bytes(journal::JOURNAL_LEN);
                std::fs::File::from(jfd.try_clone().unwrap())
                    .write_all_at(&junk, 0)
                    .unwrap();
            }
            Damage::Flips => {
                // Aim at what recovery reads: the header's fields, and the metadata, sense and
                // CDB of the lowest slots (the engine hands out slot 0 first).
                let f = std::fs::File::from(jfd.try_clone().unwrap());
                for _ in 0..1 + self.rng.below(4) {
                    let at = if self.rng.one_in(3) {
                        self.rng.below(72)
                    } else {
                        journal::HEADER_SIZE
                            + self.rng.below(8) * journal::SLOT_SIZE
                            + self.rng.below(400)
                    };
                    f.write_all_at(&[self.rng.next() as u8], at as u64).unwrap();
                }
            }
        }
        let j = Journal::map(jfd.as_fd()).unwrap();
        match Ring::recover(self.map(), j) {
            Ok(rec) => {
                assert_ne!(
                    self.damage,
                    Damage::Garbage,
                    "a journal of random bytes was accepted"
                );
                self.stats.recoveries += 1;
                self.stats.redelivered += rec.report.redelivered;
                self.stats.already_done += rec.report.already_done;
                self.log.push(format!("recovered: {:?}", rec.report));
                self.start(StartWith::Recovered(rec));
            }
            Err(RecoverError::Inconsistent(why)) => {
                assert_ne!(
                    self.damage,
                    Damage::None,
                    "recovery refused an undamaged journal: {why}\nlog: {:#?}",
                    self.log
                );
                // The supervisor's fallback: reset the ring (every command in flight BUSY).
                self.stats.resets += 1;
                self.log.push(format!("reset: {why}"));
                for a in self.outstanding.values_mut() {
                    a.reset = true;
                }
                let busy = self.sim.reset_ring(1).unwrap();
                self.process(busy);
                assert!(self.outstanding.is_empty());
                self.start_fresh();
            }
            Err(e) => panic!("recovery failed on the mailbox: {e}"),
        }
        self.sim.set_blocked(false);
        self.sim.kick().unwrap();
    }

    fn run(mut self) -> Stats {
        self.start_fresh();
        let total_ops = 20 + self.rng.below(50);
        let cap = 4 + self.rng.below(24);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(
                Instant::now() < deadline,
                "iteration did not finish: {} outstanding, log: {:#?}",
                self.outstanding.len(),
                self.log
            );
            self.submit(total_ops, cap);
            self.sim.kick().unwrap();
            self.sim.wait_notified(Duration::from_millis(2)).unwrap();
            self.reap();
            if self.runner.as_ref().is_some_and(DeviceRunner::is_finished) {
                self.on_crash();
                continue;
            }
            // Done when every op is acknowledged and the worker has passed every entry (a
            // trailing task-management entry needs no answer but must be passed over).
            let all_done = self.ops.len() == total_ops
                && self.ops.iter().all(|o| o.done)
                && self.outstanding.is_empty()
                && self.sim.is_drained();
            if self.crashes_left > 0 && (all_done || self.rng.one_in(40)) {
                // Kill now, whatever the worker is doing (often idle).
                if let Some(p) = &self.plan {
                    p.kill_now();
                }
                continue;
            }
            if all_done && self.crashes_left == 0 {
                break;
            }
        }
        assert!(
            self.sim.is_drained(),
            "the ring is not drained: {:?}",
            self.sim
        );
        self.runner.take().unwrap().stop().unwrap();
        // The device holds exactly the acknowledged data.
        let mut disk = vec![0u8; BLOCKS * BS];
        self.handler
            .inner
            .read(0, &mut [IoSliceMut::new(&mut disk)])
            .unwrap();
        assert!(disk == self.model, "final contents differ from the model");
        self.stats
    }
}

fn campaign(iters: usize, seed: u64, damage: Damage) -> Stats {
    // RECOVERY_SEED varies the campaign (for long soak runs); the default is fixed so that a
    // failure reproduces.
    let seed = std::env::var("RECOVERY_SEED")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(seed, |s| seed ^ s.wrapping_mul(0xd6e8_feb8_6659_fd93));
    let mut total = Stats::default();
    for i in 0..iters {
        let s = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let stats = std::panic::catch_unwind(|| World::new(s, damage).run())
            .unwrap_or_else(|_| panic!("iteration {i} (seed {s:#x}) failed"));
        total.add(&stats);
    }
    total
}

#[test]
fn kill_at_random_points_loses_nothing() {
    let iters = iterations(800);
    let stats = campaign(iters, 0x5eed_0001_d00d_f00d, Damage::None);
    eprintln!("{stats:#?}");
    assert_eq!(stats.resets, 0);
    if iters >= 400 {
        // The campaign really exercised what it claims to.
        for p in CrashPoint::ALL {
            assert!(
                stats.crashes.get(&p).copied().unwrap_or(0) > 0,
                "never crashed at {p:?}: {stats:#?}"
            );
        }
        assert!(stats.redelivered > 0, "{stats:#?}");
        assert!(stats.already_done > 0, "{stats:#?}");
        assert!(stats.replayed_good > 0, "{stats:#?}");
        assert!(stats.busy_unreplayable > 0, "{stats:#?}");
        assert!(stats.busy_overflow > 0, "{stats:#?}");
    }
}

#[test]
fn garbage_journal_falls_back_to_a_ring_reset() {
    let stats = campaign(
        iterations(800) * 3 / 40,
        0x5eed_0002_0bad_cafe,
        Damage::Garbage,
    );
    eprintln!("{stats:#?}");
    assert!(stats.resets > 0);
    assert_eq!(stats.recoveries, 0);
}

#[test]
fn damaged_journal_is_refused_or_harmless() {
    let stats = campaign(
        iterations(800) * 3 / 20,
        0x5eed_0003_f11b_5eed,
        Damage::Flips,
    );
    eprintln!("{stats:#?}");
    assert!(stats.resets > 0, "{stats:#?}");
}
