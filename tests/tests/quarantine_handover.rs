//! The worker's side of a quarantine and of its lift, in the order the supervisor drives them
//! (`supervisor/src/daemon/quarantine.rs`): a `file` device served by its own worker, whose
//! worker then goes away; handed, with the same in-flight journal and no backing store, to a
//! refusals worker (refusal set, `Recover` mode), which fails every command at once with NOT
//! READY, LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED (02/04/03), the command left
//! waiting in the ring at the hand-over included, exactly once; released by it (`RemoveDevice`)
//! and handed back, with the same journal, to a new worker of its own (`Recover` mode), which
//! serves it again: the write acknowledged before the quarantine is there, the write refused
//! during it is not.
//!
//! Driven through the real conversation ([`Worker::serve`]) over socket pairs, with the
//! simulator's map standing in for `/dev/uioN`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use nix::sys::memfd::{MFdFlags, memfd_create};
use tcmu_warden_proto::{
    Channel, DeviceFds, DeviceSpec, FromWorker, JOURNAL_BYTES, JournalMode, ToWorker,
};
use tcmu_warden_tests::{CHECK_CONDITION, Completed, KernelSim, SimConfig, sense_triple};
use tcmu_warden_worker::handler::builtin_factories;
use tcmu_warden_worker::runtime::Worker;

const BLOCK: usize = 512;
const DEV_SIZE: u64 = 1 << 20;
const NOT_READY_MANUAL: (u8, u8, u8) = (0x02, 0x04, 0x03);

fn read10(lba: u8) -> Vec<u8> {
    vec![0x28, 0, 0, 0, 0, lba, 0, 0, 1, 0]
}

fn write10(lba: u8) -> Vec<u8> {
    vec![0x2a, 0, 0, 0, 0, lba, 0, 0, 1, 0]
}

const TEST_UNIT_READY: [u8; 6] = [0; 6];
const INQUIRY: [u8; 6] = [0x12, 0, 0, 0, 96, 0];

fn spec(map_len: usize, journal: JournalMode, refusal: Option<&str>, path: &str) -> DeviceSpec {
    DeviceSpec {
        id: 7,
        uio: "uio0".into(),
        hba: 1,
        name: "disk0".into(),
        subtype: "file".into(),
        cfgstring: path.into(),
        map_size: map_len as u64,
        dev_size: DEV_SIZE,
        block_size: BLOCK as u32,
        max_sectors: 128,
        write_cache: false,
        unit_serial: "serial".into(),
        has_backing_fd: refusal.is_none(),
        refusal: refusal.map(str::to_owned),
        journal,
    }
}

/// Starts a worker serving `subtypes` (none: the refusals worker) on one end of a socket pair
/// and answers its handshake.
fn worker(
    subtypes: &[&str],
) -> (
    Channel,
    std::thread::JoinHandle<Result<(), tcmu_warden_worker::runtime::WorkerError>>,
) {
    let (sup, wk) = Channel::pair().unwrap();
    let worker = std::thread::spawn(move || Worker::new(wk, builtin_factories()).serve());
    sup.send(&ToWorker::Hello {
        worker: "t".into(),
        subtypes: subtypes.iter().map(|s| (*s).to_owned()).collect(),
        jail: None,
    })
    .unwrap();
    let (hello, _) = sup.recv::<FromWorker>().unwrap();
    assert!(matches!(hello, FromWorker::Hello { .. }), "{hello:?}");
    (sup, worker)
}

fn add(sup: &Channel, spec: DeviceSpec, fds: DeviceFds<BorrowedFd<'_>>) {
    sup.send_device(&spec, &fds).unwrap();
    let answer = sup.recv::<FromWorker>().unwrap().0;
    assert!(
        matches!(answer, FromWorker::DeviceReady { id: 7 }),
        "{answer:?}"
    );
}

/// Kicks the worker and collects the completions of `ids` (each exactly once: the simulator
/// breaks the ring on a second completion), within a generous deadline.
fn complete(sim: &mut KernelSim, ids: &[u16]) -> HashMap<u16, Completed> {
    sim.kick().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut done = HashMap::new();
    while ids.iter().any(|id| !done.contains_key(id)) {
        assert!(Instant::now() < deadline, "commands {ids:?} not completed");
        for c in sim.reap().unwrap() {
            assert!(ids.contains(&c.cmd_id), "unexpected completion {c:?}");
            assert!(done.insert(c.cmd_id, c).is_none(), "completed twice");
        }
        sim.wait_notified(Duration::from_millis(200)).unwrap();
    }
    done
}

fn one(sim: &mut KernelSim, cdb: &[u8], out: &[u8], in_len: usize) -> Completed {
    let id = sim.submit(cdb, out, in_len).unwrap();
    complete(sim, &[id]).remove(&id).unwrap()
}

#[test]
fn a_quarantined_device_fails_fast_and_serves_again_after_the_lift() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk0.img");
    File::create(&path).unwrap().set_len(DEV_SIZE).unwrap();
    let backing = || -> OwnedFd {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap()
            .into()
    };
    let path_str = path.display().to_string();
    let (mut sim, dev) = KernelSim::new(SimConfig::default()).unwrap();
    let journal = memfd_create("journal", MFdFlags::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&journal, JOURNAL_BYTES as i64).unwrap();

    // Served by its own worker: a write is acknowledged.
    let (sup, own) = worker(&["file"]);
    let b = backing();
    add(
        &sup,
        spec(dev.map_len, JournalMode::Fresh, None, &path_str),
        DeviceFds {
            uio: dev.map_fd.as_fd(),
            backing: Some(b.as_fd()),
            journal: Some(journal.as_fd()),
        },
    );
    let c = one(&mut sim, &write10(0), &[0xab; BLOCK], 0);
    assert_eq!(c.status, 0, "{c:?}");
    sup.send(&ToWorker::Shutdown).unwrap();
    own.join().unwrap().unwrap();

    // Its worker is gone and quarantined; the device is blocked while the refusals worker takes
    // it, and a command already waits in the ring.
    let waiting = sim.submit(&read10(0), &[], BLOCK).unwrap();
    let (sup, refusals) = worker(&[]);
    let why = "worker file crashed 3 times within 600s (last: exit code 3); quarantined";
    add(
        &sup,
        spec(dev.map_len, JournalMode::Recover, Some(why), &path_str),
        DeviceFds {
            uio: dev.map_fd.as_fd(),
            backing: None,
            journal: Some(journal.as_fd()),
        },
    );
    // The waiting command and every new one fail at once with 02/04/03; INQUIRY still answers.
    let c = complete(&mut sim, &[waiting]).remove(&waiting).unwrap();
    assert_eq!(sense_triple(&c), NOT_READY_MANUAL);
    for (cdb, out, in_len) in [
        (write10(1), vec![0xcd; BLOCK], 0),
        (read10(0), Vec::new(), BLOCK),
        (TEST_UNIT_READY.to_vec(), Vec::new(), 0),
    ] {
        let c = one(&mut sim, &cdb, &out, in_len);
        assert_eq!(c.status, CHECK_CONDITION, "{cdb:02x?}: {c:?}");
        assert_eq!(sense_triple(&c), NOT_READY_MANUAL, "{cdb:02x?}");
    }
    let c = one(&mut sim, &INQUIRY, &[], 96);
    assert_eq!(c.status, 0, "{c:?}");

    // The operator lifts the quarantine: the device is blocked again and released by the
    // refusals worker (the journal stays); another command waits meanwhile.
    sup.send(&ToWorker::RemoveDevice { id: 7 }).unwrap();
    let answer = sup.recv::<FromWorker>().unwrap().0;
    assert!(
        matches!(answer, FromWorker::DeviceRemoved { id: 7 }),
        "{answer:?}"
    );
    sup.send(&ToWorker::Shutdown).unwrap();
    refusals.join().unwrap().unwrap();
    let waiting = sim.submit(&read10(0), &[], BLOCK).unwrap();

    // A new worker of its own recovers the ring from the same journal and serves again.
    let (sup, back) = worker(&["file"]);
    let b = backing();
    add(
        &sup,
        spec(dev.map_len, JournalMode::Recover, None, &path_str),
        DeviceFds {
            uio: dev.map_fd.as_fd(),
            backing: Some(b.as_fd()),
            journal: Some(journal.as_fd()),
        },
    );
    // The first new command reports the hand-over as a power-on reset, once.
    let c = complete(&mut sim, &[waiting]).remove(&waiting).unwrap();
    assert_eq!(sense_triple(&c), (0x06, 0x29, 0x00));
    let c = one(&mut sim, &read10(0), &[], BLOCK);
    assert_eq!(c.status, 0, "{c:?}");
    assert_eq!(
        c.data_in,
        vec![0xab; BLOCK],
        "the acknowledged write is kept"
    );
    let c = one(&mut sim, &read10(1), &[], BLOCK);
    assert_eq!(c.status, 0, "{c:?}");
    assert_eq!(
        c.data_in,
        vec![0; BLOCK],
        "the write refused during the quarantine was not applied"
    );
    let c = one(&mut sim, &write10(2), &[0xef; BLOCK], 0);
    assert_eq!(c.status, 0, "{c:?}");
    sup.send(&ToWorker::Shutdown).unwrap();
    back.join().unwrap().unwrap();

    let mut block = [0u8; BLOCK];
    File::open(&path)
        .unwrap()
        .read_exact_at(&mut block, 2 * BLOCK as u64)
        .unwrap();
    assert_eq!(block, [0xef; BLOCK], "served by the backing file again");
    assert_eq!(sim.in_flight(), 0);
    assert!(sim.broken().is_none());
}
