//! Tests of the kernel simulator itself (its layout, allocation, event channel and strict
//! reaping), and a threaded round trip that uses it the way the worker runtime will.

// Test code: a panic is a test failure, which is what these assertions want.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tcmu_warden_tests::{
    CAP_OOOC, CAP_READ_LEN, CAP_TMR, CHECK_CONDITION, KernelSim, SIM_POISON, SimConfig, SimError,
};
use tcmu_warden_worker::ring::{Completion, Fetched, Mapping, Ring};

const WRITE10: [u8; 10] = [0x2a, 0, 0, 0, 0, 8, 0, 0, 1, 0];
const READ10: [u8; 10] = [0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0];
const TUR: [u8; 6] = [0; 6];

fn rd<const N: usize>(map: &Mapping, off: usize) -> [u8; N] {
    assert!(off + N <= map.len());
    let mut b = [0u8; N];
    // SAFETY: in bounds; the test is the only other user and the simulator is idle.
    unsafe { std::ptr::copy_nonoverlapping(map.as_ptr().add(off), b.as_mut_ptr(), N) };
    b
}

fn u32_at(map: &Mapping, off: usize) -> u32 {
    u32::from_ne_bytes(rd::<4>(map, off))
}

fn u64_at(map: &Mapping, off: usize) -> u64 {
    u64::from_ne_bytes(rd::<8>(map, off))
}

fn wr(map: &Mapping, off: usize, b: &[u8]) {
    assert!(off + b.len() <= map.len());
    // SAFETY: in bounds; used to play a misbehaving worker while the simulator is idle.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), map.as_ptr().add(off), b.len()) };
}

fn set_tail(map: &Mapping, tail: u32) {
    // SAFETY: the 4-aligned cmd_tail word of the mailbox.
    let w = unsafe { AtomicU32::from_ptr(map.as_ptr().add(64).cast()) };
    w.store(tail, Ordering::Release);
}

#[test]
fn mailbox_and_entries_have_the_kernel_layout() {
    let cfg = SimConfig {
        ring_size: 2000,
        data_size: 16 * 4096,
        max_iov_len: 1000,
        ..SimConfig::default()
    };
    let (mut sim, dev) = KernelSim::new(cfg).unwrap();
    let map = Mapping::map(dev.map_fd.as_fd(), dev.map_len).unwrap();
    let l = sim.layout();
    assert_eq!((l.ring_off, l.ring_size, l.data_off), (128, 2000, 2128));
    assert_eq!(l.map_len, 2128 + 16 * 4096);
    assert_eq!(u16::from_ne_bytes(rd(&map, 0)), 2);
    assert_eq!(
        u16::from_ne_bytes(rd(&map, 2)),
        CAP_OOOC | CAP_READ_LEN | CAP_TMR
    );
    assert_eq!(u32_at(&map, 4), 128);
    assert_eq!(u32_at(&map, 8), 2000);
    assert_eq!((u32_at(&map, 12), u32_at(&map, 64)), (0, 0));

    // 5000 bytes: blocks 0 and 1, merged, then split at 1000 bytes: 5 iovecs.
    let data: Vec<u8> = (0..5000).map(|i| (i * 3 % 256) as u8).collect();
    let id = sim.submit(&WRITE10, &data, 0).unwrap();
    assert_ne!(id, 0);
    let size = 48 + 16 * 5 + 16; // 144
    assert_eq!(u32_at(&map, 12), size as u32);
    assert_eq!(u32_at(&map, 128), size as u32 | 1);
    assert_eq!(u16::from_ne_bytes(rd(&map, 132)), id);
    assert_eq!(
        (u32_at(&map, 136), u32_at(&map, 140), u32_at(&map, 144)),
        (5, 0, 0)
    );
    let cdb_off = u64_at(&map, 152);
    assert_eq!(cdb_off, 128 + 48 + 80);
    assert_eq!(rd::<10>(&map, cdb_off as usize), WRITE10);
    let mut gathered = Vec::new();
    for i in 0..5 {
        let base = u64_at(&map, 128 + 48 + 16 * i);
        let len = u64_at(&map, 128 + 56 + 16 * i);
        assert!(len <= 1000);
        assert_eq!(base, 2128 + 1000 * i as u64);
        for j in 0..len as usize {
            gathered.push(rd::<1>(&map, base as usize + j)[0]);
        }
    }
    assert_eq!(gathered, data);

    // Data-in space is poisoned; a short CDB gets the 112-byte minimum entry.
    let id2 = sim.submit(&READ10, &[], 100).unwrap();
    let e2 = 128 + size;
    assert_eq!(u32_at(&map, e2), (112 + 16) | 1);
    assert_eq!(u16::from_ne_bytes(rd(&map, e2 + 4)), id2);
    let base = u64_at(&map, e2 + 48);
    assert_eq!(
        base,
        2128 + 2 * 4096,
        "lowest free block after the first command's two"
    );
    assert_eq!(rd::<1>(&map, base as usize)[0], SIM_POISON);
    assert_eq!(sim.in_flight(), 2);
}

#[test]
fn pads_the_ring_end_and_reports_full() {
    let cfg = SimConfig {
        ring_size: 1000,
        data_size: 4 * 4096,
        ..SimConfig::default()
    };
    let (mut sim, dev) = KernelSim::new(cfg).unwrap();
    let map = Mapping::map(dev.map_fd.as_fd(), dev.map_len).unwrap();
    let mut ring = Ring::new(map.clone()).unwrap();
    // 120-byte entries: 8 fit (960 bytes); the ninth needs 40 + 120 > 39 free bytes.
    let ids: Vec<u16> = (0..8).map(|_| sim.submit(&TUR, &[], 0).unwrap()).collect();
    assert!(matches!(sim.submit(&TUR, &[], 0), Err(SimError::Full)));
    assert_eq!(sim.in_flight(), 8);
    // Distinct, nonzero, increasing ids.
    assert!(ids.windows(2).all(|w| w[0] < w[1]) && ids[0] != 0);
    for _ in 0..2 {
        let Some(Fetched::Cmd(c)) = ring.fetch().unwrap() else {
            panic!()
        };
        ring.complete_command(c, &Completion::status(0)).unwrap();
    }
    assert_eq!(sim.reap().unwrap().len(), 2);
    // Now 240 bytes are free at the start: PAD 960..1000, entry at 0.
    let id = sim.submit(&TUR, &[], 0).unwrap();
    assert_eq!(u32_at(&map, 128 + 960), 40);
    assert_eq!(u32_at(&map, 128), 120 | 1);
    assert_eq!(u16::from_ne_bytes(rd(&map, 132)), id);
    assert_eq!(sim.cmd_head(), 120);
    // Only 120..240 is free, less the one byte that always stays unused: 119 bytes.
    assert!(matches!(sim.next_entry_offset(120), Err(SimError::Full)));
    assert_eq!(sim.next_entry_offset(112).unwrap(), 128 + 120);

    // Data area: 4 blocks.
    assert!(matches!(
        sim.submit(&WRITE10, &vec![1u8; 5 * 4096], 0),
        Err(SimError::BadRequest(_))
    ));
    let (mut sim2, _dev2) = KernelSim::new(SimConfig {
        data_size: 4 * 4096,
        ..SimConfig::default()
    })
    .unwrap();
    sim2.submit(&WRITE10, &vec![1u8; 3 * 4096], 0).unwrap();
    assert!(matches!(
        sim2.submit(&WRITE10, &vec![1u8; 4097], 0),
        Err(SimError::Full)
    ));
    sim2.submit(&WRITE10, &[1u8; 4096], 0).unwrap();
}

#[test]
fn refuses_bad_requests() {
    let (mut sim, _dev) = KernelSim::new(SimConfig::default()).unwrap();
    let bad = |r: Result<u16, SimError>| matches!(r, Err(SimError::BadRequest(_)));
    assert!(
        bad(sim.submit(&WRITE10[..6], &[], 0)),
        "CDB shorter than its opcode says"
    );
    assert!(bad(sim.submit(&[], &[], 0)));
    assert!(
        bad(sim.submit(&WRITE10, b"x", 1)),
        "both directions need submit_bidi"
    );
    assert!(matches!(
        sim.submit_raw_entry(&[1, 0, 0, 0, 0]),
        Err(SimError::BadRequest(_))
    ));
    assert!(matches!(
        sim.submit_raw_entry(&vec![1u8; 40 * 1024]),
        Err(SimError::BadRequest(_))
    ));
    assert!(matches!(
        KernelSim::new(SimConfig {
            ring_size: 1001,
            ..SimConfig::default()
        }),
        Err(SimError::BadRequest(_))
    ));
    assert_eq!(sim.in_flight(), 0);
    assert!(sim.is_drained());
}

fn readable(fd: &OwnedFd, ms: u16) -> bool {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::from(ms)).unwrap() == 1
}

#[test]
fn event_channel_behaves_like_a_uio_fd() {
    let (sim, dev) = KernelSim::new(SimConfig::default()).unwrap();
    let ev = dev.event_fd;
    assert!(!readable(&ev, 0));
    sim.kick().unwrap();
    sim.kick().unwrap();
    assert!(readable(&ev, 1000));
    let mut buf = [0u8; 4];
    assert_eq!(nix::unistd::read(&ev, &mut buf).unwrap(), 4);
    assert_eq!(u32::from_ne_bytes(buf), 1);
    assert_eq!(nix::unistd::read(&ev, &mut buf).unwrap(), 4);
    assert_eq!(u32::from_ne_bytes(buf), 2, "the event count");
    assert!(!readable(&ev, 0));

    assert!(!sim.wait_notified(Duration::ZERO).unwrap());
    for _ in 0..3 {
        assert_eq!(nix::unistd::write(&ev, &1u32.to_ne_bytes()).unwrap(), 4);
    }
    assert!(sim.wait_notified(Duration::from_secs(10)).unwrap());
    assert!(
        !sim.wait_notified(Duration::from_millis(1)).unwrap(),
        "all drained"
    );

    nix::unistd::write(&ev, &[1, 2, 3, 4, 5]).unwrap();
    let err = sim.wait_notified(Duration::from_secs(10)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);

    drop(ev);
    let err = sim.wait_notified(Duration::from_secs(10)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    // Kicking a closed worker is an error, not a hang.
    assert!(sim.kick().is_err());
}

#[test]
fn many_kicks_without_reads_do_not_block() {
    let (sim, _dev) = KernelSim::new(SimConfig::default()).unwrap();
    for _ in 0..10_000 {
        sim.kick().unwrap();
    }
}

#[test]
fn unknown_cmd_id_breaks_the_ring() {
    let (mut sim, dev) = KernelSim::new(SimConfig::default()).unwrap();
    let map = Mapping::map(dev.map_fd.as_fd(), dev.map_len).unwrap();
    let id = sim.submit(&TUR, &[], 0).unwrap();
    wr(&map, 128 + 4, &(id + 100).to_ne_bytes());
    set_tail(&map, 120);
    let err = sim.reap().unwrap_err();
    assert!(
        matches!(err, SimError::Broken(ref why) if why.contains("not found")),
        "{err}"
    );
    assert!(sim.broken().is_some());
    assert!(
        matches!(sim.reap(), Err(SimError::Broken(_))),
        "broken for good"
    );
}

#[test]
fn misplaced_tails_and_changed_len_op_break_the_ring() {
    // Tail beyond head.
    let (mut sim, dev) = KernelSim::new(SimConfig::default()).unwrap();
    let map = Mapping::map(dev.map_fd.as_fd(), dev.map_len).unwrap();
    sim.submit(&TUR, &[], 0).unwrap();
    set_tail(&map, 240);
    assert!(matches!(sim.reap(), Err(SimError::Broken(_))));

    // Tail inside an entry.
    let (mut sim, dev) = KernelSim::new(SimConfig::default()).unwrap();
    let map = Mapping::map(dev.map_fd.as_fd(), dev.map_len).unwrap();
    sim.submit(&TUR, &[], 0).unwrap();
    sim.submit(&TUR, &[], 0).unwrap();
    set_tail(&map, 64);
    assert!(matches!(sim.reap(), Err(SimError::Broken(_))));

    // Unaligned tail.
    let (mut sim, dev) = KernelSim::new(SimConfig::default()).unwrap();
    let map = Mapping::map(dev.map_fd.as_fd(), dev.map_len).unwrap();
    sim.submit(&TUR, &[], 0).unwrap();
    set_tail(&map, 4);
    assert!(matches!(sim.reap(), Err(SimError::Broken(_))));

    // len_op overwritten by the response.
    let (mut sim, dev) = KernelSim::new(SimConfig::default()).unwrap();
    let map = Mapping::map(dev.map_fd.as_fd(), dev.map_len).unwrap();
    sim.submit(&TUR, &[], 0).unwrap();
    wr(&map, 128, &(128u32 | 1).to_ne_bytes());
    set_tail(&map, 120);
    assert!(matches!(sim.reap(), Err(SimError::Broken(_))));
}

#[test]
fn relabelled_slots_need_cap_oooc() {
    for ooo in [true, false] {
        let flags = if ooo { CAP_OOOC } else { 0 };
        let (mut sim, dev) = KernelSim::new(SimConfig {
            flags,
            ..SimConfig::default()
        })
        .unwrap();
        let map = Mapping::map(dev.map_fd.as_fd(), dev.map_len).unwrap();
        let a = sim.submit(&TUR, &[], 0).unwrap();
        let b = sim.submit(&TUR, &[], 0).unwrap();
        // Complete b into a's slot by hand.
        wr(&map, 128 + 4, &b.to_ne_bytes());
        wr(&map, 128 + 8, &[0x08]);
        set_tail(&map, 120);
        let r = sim.reap();
        if ooo {
            let done = r.unwrap();
            assert_eq!((done[0].cmd_id, done[0].status), (b, 0x08));
            assert_eq!(sim.in_flight(), 1);
            let _ = a;
        } else {
            assert!(matches!(r, Err(SimError::Broken(_))));
        }
    }
}

#[test]
fn read_len_and_check_condition_shape_data_in() {
    let (mut sim, dev) = KernelSim::new(SimConfig::default()).unwrap();
    let map = Mapping::map(dev.map_fd.as_fd(), dev.map_len).unwrap();
    let mut ring = Ring::new(map).unwrap();
    let sense = [0x70, 0, 3];
    // (status, read_len) -> expected data-in length out of 100
    let cases: [(u8, Option<u32>, usize); 5] = [
        (0, None, 100),
        (0, Some(40), 40),
        (0, Some(0), 100), // the kernel ignores a zero read_len
        (CHECK_CONDITION, None, 0),
        (CHECK_CONDITION, Some(10), 10),
    ];
    for (status, read_len, want) in cases {
        let id = sim.submit(&READ10, &[], 100).unwrap();
        let Some(Fetched::Cmd(mut c)) = ring.fetch().unwrap() else {
            panic!()
        };
        c.data.copy_from(0, &[7u8; 100]);
        ring.complete_command(
            c,
            &Completion {
                status,
                sense: &sense,
                read_len,
            },
        )
        .unwrap();
        let done = sim.reap().unwrap();
        assert_eq!(done.len(), 1);
        let d = &done[0];
        assert_eq!((d.cmd_id, d.status, d.read_len), (id, status, read_len));
        assert_eq!(d.data_in, vec![7u8; want], "{status} {read_len:?}");
        if status == CHECK_CONDITION {
            assert_eq!(d.sense.len(), 96);
            assert_eq!(&d.sense[..3], &sense);
        } else {
            assert!(d.sense.is_empty());
        }
    }
}

#[test]
fn bidi_round_trip() {
    let (mut sim, dev) = KernelSim::new(SimConfig {
        max_iov_len: 1024,
        ..SimConfig::default()
    })
    .unwrap();
    let map = Mapping::map(dev.map_fd.as_fd(), dev.map_len).unwrap();
    let mut ring = Ring::new(map).unwrap();
    let out: Vec<u8> = (0..3000).map(|i| i as u8).collect();
    let id = sim.submit_bidi(&WRITE10, &out, 2500).unwrap();
    let Some(Fetched::Cmd(mut c)) = ring.fetch().unwrap() else {
        panic!()
    };
    assert_eq!(c.cmd_id, id);
    assert_eq!(c.iovecs.len(), 3);
    assert_eq!(c.bidi_iovecs.len(), 3);
    assert_eq!(c.data.to_vec(), out);
    let back: Vec<u8> = (0..2500).map(|i| (i * 7) as u8).collect();
    c.bidi_in.as_mut().unwrap().copy_from(0, &back);
    ring.complete_command(c, &Completion::status(0)).unwrap();
    let done = sim.reap().unwrap();
    assert_eq!(done[0].data_in, back);
}

/// The shape of the worker runtime's loop, on its own thread: wait for POLLIN on the event fd,
/// read the 4-byte count, fetch everything, complete it, notify with one 4-byte write per batch.
#[test]
fn threaded_worker_round_trip() {
    const N: u32 = 2000;
    let (mut sim, dev) = KernelSim::new(SimConfig {
        ring_size: 3000,
        data_size: 64 * 4096,
        max_iov_len: 512,
        ..SimConfig::default()
    })
    .unwrap();
    let worker = thread::spawn(move || {
        let map = Mapping::map(dev.map_fd.as_fd(), dev.map_len).unwrap();
        let mut ring = Ring::new(map).unwrap();
        let ev = dev.event_fd;
        let mut served = 0u32;
        let mut held = Vec::new();
        while served < N {
            let mut fds = [PollFd::new(ev.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(10_000u16)).unwrap() == 0 {
                panic!("worker starved after {served} commands");
            }
            let mut count = [0u8; 4];
            assert_eq!(nix::unistd::read(&ev, &mut count).unwrap(), 4);
            while let Some(f) = ring.fetch().unwrap() {
                let Fetched::Cmd(mut c) = f else {
                    panic!("unexpected {f:?}")
                };
                // Echo data-out sums into data-in; complete every other command late to
                // exercise out-of-order completion across batches.
                if c.cdb[0] == READ10[0] {
                    let tag = c.cdb[2];
                    let len = c.data.len();
                    c.data.copy_from(0, &vec![tag; len]);
                }
                held.push(c);
                served += 1;
            }
            let keep = held.len() / 2;
            for c in held.drain(keep..) {
                ring.complete_command(c, &Completion::status(0)).unwrap();
            }
            if served == N {
                for c in held.drain(..) {
                    ring.complete_command(c, &Completion::status(0)).unwrap();
                }
            }
            if ring.take_tail_moved() {
                assert_eq!(nix::unistd::write(&ev, &1u32.to_ne_bytes()).unwrap(), 4);
            }
        }
        assert_eq!(ring.in_flight(), 0);
    });

    let mut submitted = 0u32;
    let mut reaped = 0u32;
    let mut expect = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while reaped < N {
        assert!(Instant::now() < deadline, "stuck at {reaped} reaped");
        while submitted < N {
            let tag = (submitted % 250) as u8;
            let len = 1 + (submitted as usize * 37) % 3000;
            let mut cdb = READ10;
            cdb[2] = tag;
            match sim.submit(&cdb, &[], len) {
                Ok(id) => {
                    expect.insert(id, (tag, len));
                    submitted += 1;
                }
                Err(SimError::Full) => break,
                Err(e) => panic!("{e}"),
            }
        }
        // Kick even when nothing new was queued: the worker keeps some commands until its
        // next wake-up, as a slow handler would.
        sim.kick().unwrap();
        sim.wait_notified(Duration::from_millis(200)).unwrap();
        for d in sim.reap().unwrap() {
            let (tag, len) = expect.remove(&d.cmd_id).unwrap();
            assert_eq!(d.data_in, vec![tag; len]);
            reaped += 1;
        }
    }
    worker.join().unwrap();
    assert!(sim.is_drained());
}
