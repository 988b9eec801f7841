//! The worker's side of a hand-over: a device sent for recovery with a journal the worker cannot
//! use is answered `RecoveryFailed` (so the supervisor resets the ring), never served; so is a
//! device sent without a journal to recover from whose ring already holds commands (someone
//! served it and its record is gone); a journal of the wrong size is a plain device failure.
//! A device recovered from a usable journal reports a POWER ON, RESET unit attention (06/29/00)
//! to the first new command, once: the state the previous worker kept for the initiator is gone,
//! as after a power cycle; a device handed over fresh reports nothing.
//! Driven through the real conversation ([`Worker::serve`]) over a socket pair, with the
//! simulator's map standing in for `/dev/uioN`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use nix::sys::memfd::{MFdFlags, memfd_create};
use tcmu_warden_proto::{
    Channel, DeviceFds, DeviceSpec, FromWorker, JOURNAL_BYTES, JournalMode, ToWorker,
};
use tcmu_warden_tests::{CHECK_CONDITION, Completed, KernelSim, SimConfig};
use tcmu_warden_worker::handler::builtin_factories;
use tcmu_warden_worker::ring::{Completion, Fetched, Mapping, RecoverError, Ring};
use tcmu_warden_worker::runtime::Worker;

const TEST_UNIT_READY: [u8; 6] = [0; 6];

fn memfd(len: u64, fill: u8) -> OwnedFd {
    let fd = memfd_create("journal", MFdFlags::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&fd, len as i64).unwrap();
    let f = std::fs::File::from(fd.try_clone().unwrap());
    f.write_all_at(&vec![fill; len as usize], 0).unwrap();
    fd
}

fn spec(id: u64, map_size: usize, journal: JournalMode) -> DeviceSpec {
    DeviceSpec {
        id,
        uio: "uio0".into(),
        hba: 1,
        name: format!("d{id}"),
        subtype: "ram".into(),
        cfgstring: String::new(),
        map_size: map_size as u64,
        dev_size: 1 << 20,
        block_size: 512,
        max_sectors: 128,
        write_cache: false,
        unit_serial: "serial".into(),
        has_backing_fd: false,
        refusal: None,
        journal,
    }
}

/// Starts a worker on one end of a socket pair and answers its handshake.
fn worker() -> (
    Channel,
    std::thread::JoinHandle<Result<(), tcmu_warden_worker::runtime::WorkerError>>,
) {
    let (sup, wk) = Channel::pair().unwrap();
    let worker = std::thread::spawn(move || Worker::new(wk, builtin_factories()).serve());
    sup.send(&ToWorker::Hello {
        worker: "t".into(),
        subtypes: vec!["ram".into()],
        jail: None,
    })
    .unwrap();
    let (hello, _) = sup.recv::<FromWorker>().unwrap();
    assert!(matches!(hello, FromWorker::Hello { .. }));
    (sup, worker)
}

/// Hands the worker a device and returns its answer.
fn add_device(
    sup: &Channel,
    spec: DeviceSpec,
    uio: BorrowedFd<'_>,
    journal: Option<BorrowedFd<'_>>,
) -> FromWorker {
    let fds = DeviceFds {
        uio,
        backing: None,
        journal,
    };
    sup.send_device(&spec, &fds).unwrap();
    sup.recv::<FromWorker>().unwrap().0
}

/// The first `N` bytes of a journal.
fn head<const N: usize>(journal: &OwnedFd) -> [u8; N] {
    let mut head = [0u8; N];
    std::fs::File::from(journal.try_clone().unwrap())
        .read_exact_at(&mut head, 0)
        .unwrap();
    head
}

#[test]
fn unusable_journals_are_reported_not_served() {
    let (_sim, dev) = KernelSim::new(SimConfig::default()).unwrap();
    let (sup, worker) = worker();

    // A journal full of garbage, sent for recovery: the worker asks for a ring reset.
    let garbage = memfd(JOURNAL_BYTES, 0x6b);
    match add_device(
        &sup,
        spec(1, dev.map_len, JournalMode::Recover),
        dev.map_fd.as_fd(),
        Some(garbage.as_fd()),
    ) {
        FromWorker::RecoveryFailed { id: 1, reason } => {
            assert!(reason.contains("magic"), "{reason}");
        }
        other => panic!("expected RecoveryFailed, got {other:?}"),
    }
    // An all-zero journal (a worker that died before initialising it) is no better.
    let zeros = memfd(JOURNAL_BYTES, 0);
    assert!(matches!(
        add_device(
            &sup,
            spec(2, dev.map_len, JournalMode::Recover),
            dev.map_fd.as_fd(),
            Some(zeros.as_fd())
        ),
        FromWorker::RecoveryFailed { id: 2, .. }
    ));
    // A journal of the wrong size is refused before anything is mapped.
    let small = memfd(4096, 0);
    match add_device(
        &sup,
        spec(3, dev.map_len, JournalMode::Fresh),
        dev.map_fd.as_fd(),
        Some(small.as_fd()),
    ) {
        FromWorker::DeviceFailed { id: 3, reason } => {
            assert!(reason.contains("4096 bytes"), "{reason}");
        }
        other => panic!("expected DeviceFailed, got {other:?}"),
    }
    // Nothing was served: the journals are untouched.
    assert_eq!(head(&garbage), [0x6b; 16]);

    sup.send(&ToWorker::Shutdown).unwrap();
    worker.join().unwrap().unwrap();
}

#[test]
fn a_busy_ring_without_a_journal_to_recover_from_is_not_served() {
    let (mut sim, dev) = KernelSim::new(SimConfig::default()).unwrap();
    sim.submit(&TEST_UNIT_READY, &[], 0).unwrap();
    sim.submit(&TEST_UNIT_READY, &[], 0).unwrap();
    let (sup, worker) = worker();

    // A fresh journal: nothing says which of the two waiting commands were answered already.
    let journal = memfd(JOURNAL_BYTES, 0);
    match add_device(
        &sup,
        spec(1, dev.map_len, JournalMode::Fresh),
        dev.map_fd.as_fd(),
        Some(journal.as_fd()),
    ) {
        FromWorker::RecoveryFailed { id: 1, reason } => {
            assert!(reason.contains("2 commands wait in the ring"), "{reason}");
        }
        other => panic!("expected RecoveryFailed, got {other:?}"),
    }
    // No journal at all: the same.
    assert!(matches!(
        add_device(
            &sup,
            spec(2, dev.map_len, JournalMode::None),
            dev.map_fd.as_fd(),
            None
        ),
        FromWorker::RecoveryFailed { id: 2, .. }
    ));
    sup.send(&ToWorker::Shutdown).unwrap();
    worker.join().unwrap().unwrap();

    // Nothing was fetched, answered or journaled.
    assert_eq!(sim.in_flight(), 2);
    assert_eq!(sim.cmd_tail(), 0);
    assert!(sim.reap().unwrap().is_empty());
    assert_eq!(
        head(&journal),
        [0; 64],
        "the fresh journal was not initialised"
    );
}

/// Why a ring served before must not be served again from its tail without its journal: with
/// out-of-order completion the slot at the tail names a command already answered, and the
/// command still outstanding is named nowhere. `check_unserved` catches it; a reset fixes it.
#[test]
fn a_ring_whose_journal_is_lost_must_be_reset() {
    let (mut sim, dev) = KernelSim::new(SimConfig::default()).unwrap();
    let map = Mapping::map(dev.map_fd.as_fd(), dev.map_len).unwrap();
    Ring::new(map.clone()).unwrap().check_unserved().unwrap();
    // A task-management entry needs no answer: still unserved.
    sim.submit_tmr(1, &[]).unwrap();
    Ring::new(map.clone()).unwrap().check_unserved().unwrap();

    // A worker fetches x and y, answers y first (into x's slot, at the tail), and dies.
    let x = sim.submit(&TEST_UNIT_READY, &[], 0).unwrap();
    let y = sim.submit(&TEST_UNIT_READY, &[], 0).unwrap();
    let mut first = Ring::new(map.clone()).unwrap();
    let mut fetched = Vec::new();
    while let Some(entry) = first.fetch().unwrap() {
        if let Fetched::Cmd(c) = entry {
            fetched.push(c);
        }
    }
    assert_eq!(fetched.iter().map(|c| c.cmd_id).collect::<Vec<_>>(), [x, y]);
    let cy = fetched.pop().unwrap();
    first.complete_command(cy, &Completion::status(0)).unwrap();
    let done = sim.reap().unwrap();
    assert_eq!(done.iter().map(|c| c.cmd_id).collect::<Vec<_>>(), [y]);
    drop(fetched);
    drop(first);
    assert_eq!(sim.in_flight_ids(), [x]);

    match Ring::new(map.clone()).unwrap().check_unserved() {
        Err(RecoverError::Unjournaled { commands: 1, .. }) => {}
        other => panic!("expected Unjournaled, got {other:?}"),
    }
    // Served from the tail anyway, the ring offers y again, and answering it breaks the ring.
    let mut naive = Ring::new(map.clone()).unwrap();
    let Some(Fetched::Cmd(again)) = naive.fetch().unwrap() else {
        panic!("no command at the tail")
    };
    assert_eq!(again.cmd_id, y);
    naive
        .complete_command(again, &Completion::status(0))
        .unwrap();
    assert!(sim.reap().is_err());
    assert!(sim.broken().is_some());
    drop(naive);

    // The supervisor's way out: block, reset (x is answered BUSY), and the ring is unserved.
    sim.set_blocked(true);
    let busy = sim.reset_ring(1).unwrap();
    assert_eq!(
        busy.iter()
            .map(|c| (c.cmd_id, c.status))
            .collect::<Vec<_>>(),
        [(x, 0x08)]
    );
    Ring::new(map).unwrap().check_unserved().unwrap();
}

/// Submits one command and waits (generously) for its completion.
fn run(sim: &mut KernelSim, cdb: &[u8]) -> Completed {
    let id = sim.submit(cdb, &[], 0).unwrap();
    sim.kick().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(c) = sim.reap().unwrap().into_iter().find(|c| c.cmd_id == id) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "command {id} was never completed"
        );
        sim.wait_notified(Duration::from_millis(200)).unwrap();
    }
}

#[test]
fn a_restarted_worker_reports_a_power_on_reset_once() {
    let (mut sim, dev) = KernelSim::new(SimConfig::default()).unwrap();
    let journal = memfd(JOURNAL_BYTES, 0);

    // The first worker gets the device fresh: no unit attention.
    let (sup, worker1) = worker();
    let ready = add_device(
        &sup,
        spec(1, dev.map_len, JournalMode::Fresh),
        dev.map_fd.as_fd(),
        Some(journal.as_fd()),
    );
    assert!(
        matches!(ready, FromWorker::DeviceReady { id: 1 }),
        "{ready:?}"
    );
    let c = run(&mut sim, &TEST_UNIT_READY);
    assert_eq!(c.status, 0, "a fresh device is ready: {c:?}");
    sup.send(&ToWorker::Shutdown).unwrap();
    worker1.join().unwrap().unwrap();

    // Its successor recovers the ring from the same journal.
    let (sup, worker2) = worker();
    let ready = add_device(
        &sup,
        spec(1, dev.map_len, JournalMode::Recover),
        dev.map_fd.as_fd(),
        Some(journal.as_fd()),
    );
    assert!(
        matches!(ready, FromWorker::DeviceReady { id: 1 }),
        "{ready:?}"
    );
    let c = run(&mut sim, &TEST_UNIT_READY);
    assert_eq!(c.status, CHECK_CONDITION, "{c:?}");
    assert_eq!(
        (c.sense[2] & 0x0F, c.sense[12], c.sense[13]),
        (0x06, 0x29, 0x00)
    );
    // Reported once: the next command is served normally.
    let c = run(&mut sim, &TEST_UNIT_READY);
    assert_eq!(c.status, 0, "{c:?}");
    sup.send(&ToWorker::Shutdown).unwrap();
    worker2.join().unwrap().unwrap();

    assert_eq!(sim.in_flight(), 0);
    assert!(sim.broken().is_none());
}
