//! What an initiator sees across a worker restart: the successor recovers the ring from the
//! journal, and the first new command it is sent reports a POWER ON, RESET, OR BUS DEVICE RESET
//! OCCURRED unit attention (06/29/00) — the state the previous worker kept for the initiator
//! (pending unit attentions, EXTENDED COPY results) is gone, as after a power cycle. A device
//! handed over fresh (never served before) reports nothing.
//!
//! Driven through the real conversation ([`Worker::serve`]) over a socket pair, with the
//! simulator's map standing in for `/dev/uioN`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::memfd::{MFdFlags, memfd_create};
use tcmu_warden_proto::{Channel, DeviceSpec, FromWorker, JOURNAL_BYTES, JournalMode, ToWorker};
use tcmu_warden_tests::{CHECK_CONDITION, Completed, KernelSim, SimConfig};
use tcmu_warden_worker::handler::builtin_factories;
use tcmu_warden_worker::runtime::{Worker, WorkerError};

const TEST_UNIT_READY: [u8; 6] = [0; 6];

fn spec(journal: JournalMode, map_size: usize) -> DeviceSpec {
    DeviceSpec {
        id: 1,
        uio: "uio0".into(),
        hba: 1,
        name: "disk".into(),
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

/// Starts a worker thread, answers its handshake, hands it the device and waits for it to be
/// served.
fn serve(
    map_fd: &OwnedFd,
    journal: &OwnedFd,
    spec: DeviceSpec,
) -> (Channel, std::thread::JoinHandle<Result<(), WorkerError>>) {
    let (sup, wk) = Channel::pair().unwrap();
    let worker = std::thread::spawn(move || Worker::new(wk, builtin_factories()).serve());
    sup.send(
        &ToWorker::Hello {
            worker: "t".into(),
            subtypes: vec!["ram".into()],
        },
        &[],
    )
    .unwrap();
    assert!(matches!(
        sup.recv::<FromWorker>().unwrap().0,
        FromWorker::Hello { .. }
    ));
    sup.send(
        &ToWorker::AddDevice(spec),
        &[map_fd.as_fd(), journal.as_fd()],
    )
    .unwrap();
    match sup.recv::<FromWorker>().unwrap().0 {
        FromWorker::DeviceReady { id: 1, .. } => {}
        other => panic!("expected DeviceReady, got {other:?}"),
    }
    (sup, worker)
}

fn stop(sup: &Channel, worker: std::thread::JoinHandle<Result<(), WorkerError>>) {
    sup.send(&ToWorker::Shutdown, &[]).unwrap();
    worker.join().unwrap().unwrap();
}

/// Submits one command and waits (generously) for its completion.
fn run(sim: &mut KernelSim, cdb: &[u8]) -> Completed {
    let id = sim.submit(cdb, &[], 0).unwrap();
    sim.kick().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = sim.reap().unwrap();
        if let Some(c) = done.into_iter().find(|c| c.cmd_id == id) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "command {id} was never completed"
        );
        sim.wait_notified(Duration::from_millis(200)).unwrap();
    }
}

/// (sense key, ASC, ASCQ) of a fixed-format sense buffer.
fn sense(c: &Completed) -> (u8, u8, u8) {
    (c.sense[2] & 0x0F, c.sense[12], c.sense[13])
}

#[test]
fn a_restarted_worker_reports_a_power_on_reset_once() {
    let (mut sim, dev) = KernelSim::new(SimConfig::default()).unwrap();
    let journal = memfd_create("journal", MFdFlags::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&journal, JOURNAL_BYTES as i64).unwrap();

    // The first worker gets the device fresh: no unit attention.
    let (sup, worker) = serve(&dev.map_fd, &journal, spec(JournalMode::Fresh, dev.map_len));
    let c = run(&mut sim, &TEST_UNIT_READY);
    assert_eq!(c.status, 0, "a fresh device is ready: {c:?}");
    stop(&sup, worker);

    // Its successor recovers the ring from the same journal.
    let (sup, worker) = serve(
        &dev.map_fd,
        &journal,
        spec(JournalMode::Recover, dev.map_len),
    );
    let c = run(&mut sim, &TEST_UNIT_READY);
    assert_eq!(c.status, CHECK_CONDITION, "{c:?}");
    assert_eq!(sense(&c), (0x06, 0x29, 0x00));
    // Reported once: the next command is served normally.
    let c = run(&mut sim, &TEST_UNIT_READY);
    assert_eq!(c.status, 0, "{c:?}");
    stop(&sup, worker);

    assert_eq!(sim.in_flight(), 0);
    assert!(sim.broken().is_none());
}
