//! The worker's side of a hand-over: a device sent for recovery with a journal the worker cannot
//! use is answered `RecoveryFailed` (so the supervisor resets the ring), never served; a journal
//! of the wrong size is a plain device failure. Driven through the real conversation
//! ([`Worker::serve`]) over a socket pair, with the simulator's map standing in for `/dev/uioN`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;

use nix::sys::memfd::{MFdFlags, memfd_create};
use tcmu_warden_proto::{Channel, DeviceSpec, FromWorker, JOURNAL_BYTES, JournalMode, ToWorker};
use tcmu_warden_tests::{KernelSim, SimConfig};
use tcmu_warden_worker::handler::builtin_factories;
use tcmu_warden_worker::runtime::Worker;

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

#[test]
fn unusable_journals_are_reported_not_served() {
    let (_sim, dev) = KernelSim::new(SimConfig::default()).unwrap();
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
    let (hello, _) = sup.recv::<FromWorker>().unwrap();
    assert!(matches!(hello, FromWorker::Hello { .. }));

    // A journal full of garbage, sent for recovery: the worker asks for a ring reset.
    let garbage = memfd(JOURNAL_BYTES, 0x6b);
    sup.send(
        &ToWorker::AddDevice(spec(1, dev.map_len, JournalMode::Recover)),
        &[dev.map_fd.as_fd(), garbage.as_fd()],
    )
    .unwrap();
    match sup.recv::<FromWorker>().unwrap().0 {
        FromWorker::RecoveryFailed { id: 1, reason } => {
            assert!(reason.contains("magic"), "{reason}");
        }
        other => panic!("expected RecoveryFailed, got {other:?}"),
    }
    // An all-zero journal (a worker that died before initialising it) is no better.
    let zeros = memfd(JOURNAL_BYTES, 0);
    sup.send(
        &ToWorker::AddDevice(spec(2, dev.map_len, JournalMode::Recover)),
        &[dev.map_fd.as_fd(), zeros.as_fd()],
    )
    .unwrap();
    assert!(matches!(
        sup.recv::<FromWorker>().unwrap().0,
        FromWorker::RecoveryFailed { id: 2, .. }
    ));
    // A journal of the wrong size is refused before anything is mapped.
    let small = memfd(4096, 0);
    sup.send(
        &ToWorker::AddDevice(spec(3, dev.map_len, JournalMode::Fresh)),
        &[dev.map_fd.as_fd(), small.as_fd()],
    )
    .unwrap();
    match sup.recv::<FromWorker>().unwrap().0 {
        FromWorker::DeviceFailed { id: 3, reason } => {
            assert!(reason.contains("4096 bytes"), "{reason}");
        }
        other => panic!("expected DeviceFailed, got {other:?}"),
    }
    // Nothing was served: the journals are untouched.
    let mut head = [0u8; 16];
    std::fs::File::from(garbage.try_clone().unwrap())
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert_eq!(head, [0x6b; 16]);

    sup.send(&ToWorker::Shutdown, &[]).unwrap();
    worker.join().unwrap().unwrap();
}
