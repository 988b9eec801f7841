//! Robustness of the ring engine against a hostile or broken kernel side: malformed CMD entries
//! come out as `Fetched::Invalid` (and the ring keeps working), broken headers are errors, and
//! no entry contents make the engine panic.

// Test code: a panic is a test failure, which is what these assertions want.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::os::fd::AsFd;

use proptest::prelude::*;
use tcmu_warden_tests::{CHECK_CONDITION, KernelSim, SimConfig};
use tcmu_warden_worker::ring::{Completion, Fetched, Mapping, Ring, RingError};

const CMD: u32 = 1;
const TMR: u32 = 2;
const WRITE10: [u8; 10] = [0x2a, 0, 0, 0, 0, 8, 0, 0, 1, 0];
const SENSE: [u8; 18] = [
    0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0,
];

fn setup(cfg: SimConfig) -> (KernelSim, Ring) {
    let (sim, dev) = KernelSim::new(cfg).unwrap();
    let map = Mapping::map(dev.map_fd.as_fd(), dev.map_len).unwrap();
    (sim, Ring::new(map).unwrap())
}

fn small() -> SimConfig {
    SimConfig {
        ring_size: 4000,
        data_size: 64 * 1024,
        ..SimConfig::default()
    }
}

/// A CMD entry built like the kernel's: `iovs` (with the given counts), then the CDB after
/// the iovec array; `cdb_off` overrides where the entry says the CDB is.
fn raw_cmd(
    entry_off: u64,
    iovs: &[(u64, u64)],
    counts: (u32, u32, u32),
    cdb_off: Option<u64>,
) -> Vec<u8> {
    let base = (48 + 16 * iovs.len()).max(112);
    let size = base + 16;
    let mut e = vec![0u8; size];
    e[0..4].copy_from_slice(&(size as u32 | CMD).to_ne_bytes());
    e[8..12].copy_from_slice(&counts.0.to_ne_bytes());
    e[12..16].copy_from_slice(&counts.1.to_ne_bytes());
    e[16..20].copy_from_slice(&counts.2.to_ne_bytes());
    let cdb_off = cdb_off.unwrap_or(entry_off + base as u64);
    e[24..32].copy_from_slice(&cdb_off.to_ne_bytes());
    for (i, (b, l)) in iovs.iter().enumerate() {
        e[48 + 16 * i..56 + 16 * i].copy_from_slice(&b.to_ne_bytes());
        e[56 + 16 * i..64 + 16 * i].copy_from_slice(&l.to_ne_bytes());
    }
    e[base..base + 10].copy_from_slice(&WRITE10);
    e
}

fn raw_size(n_iov: usize) -> usize {
    (48 + 16 * n_iov).max(112) + 16
}

/// After something odd happened: a normal write still goes through, data intact.
fn ring_still_works(sim: &mut KernelSim, ring: &mut Ring) {
    let data: Vec<u8> = (0..5000).map(|i| (i % 251) as u8).collect();
    let id = sim.submit(&WRITE10, &data, 0).unwrap();
    let cmd = match ring.fetch().unwrap() {
        Some(Fetched::Cmd(c)) => c,
        other => panic!("expected the follow-up command, got {other:?}"),
    };
    assert_eq!(cmd.cmd_id, id);
    assert_eq!(cmd.data.to_vec(), data);
    ring.complete_command(cmd, &Completion::status(0)).unwrap();
    let done = sim.reap().unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].cmd_id, done[0].status), (id, 0));
    assert!(sim.is_drained());
}

#[test]
fn malicious_cmd_entries_are_invalid_and_the_ring_keeps_working() {
    let (mut sim, mut ring) = setup(small());
    let l = sim.layout();
    let ring_start = u64::from(l.ring_off);
    let map_end = l.map_len as u64;
    let data = l.data_off;
    // (what, iovecs, counts, cdb_off override relative to the entry or absolute)
    type Case = (
        &'static str,
        Vec<(u64, u64)>,
        (u32, u32, u32),
        Option<Box<dyn Fn(u64) -> u64>>,
    );
    let cases: Vec<Case> = vec![
        (
            "iovec inside the ring",
            vec![(ring_start + 8, 16)],
            (1, 0, 0),
            None,
        ),
        ("iovec in the mailbox", vec![(0, 16)], (1, 0, 0), None),
        (
            "iovec past the map end",
            vec![(map_end - 8, 16)],
            (1, 0, 0),
            None,
        ),
        (
            "iovec starting past the map end",
            vec![(map_end + 4096, 1)],
            (1, 0, 0),
            None,
        ),
        (
            "iovec length wrapping u64",
            vec![(data, u64::MAX - data + 1)],
            (1, 0, 0),
            None,
        ),
        (
            "bidi iovec outside",
            vec![(data, 16), (0, 16)],
            (1, 1, 0),
            None,
        ),
        (
            "dif iovec outside",
            vec![(data, 16), (map_end, 16)],
            (1, 0, 1),
            None,
        ),
        ("iov_cnt overflow", vec![(data, 16)], (u32::MAX, 0, 0), None),
        ("iov_cnt one too many", vec![(data, 16)], (5, 0, 0), None),
        (
            "iov_bidi_cnt overflow",
            vec![(data, 16)],
            (1, u32::MAX, 0),
            None,
        ),
        (
            "iov_dif_cnt overflow",
            vec![(data, 16)],
            (1, 0, u32::MAX),
            None,
        ),
        (
            "cdb_off u64::MAX",
            vec![(data, 16)],
            (1, 0, 0),
            Some(Box::new(|_| u64::MAX)),
        ),
        (
            "cdb_off at the map end",
            vec![(data, 16)],
            (1, 0, 0),
            Some(Box::new(move |_| map_end)),
        ),
        (
            "cdb_off in the data area",
            vec![(data, 16)],
            (1, 0, 0),
            Some(Box::new(move |_| data)),
        ),
        (
            "cdb_off in the mailbox",
            vec![(data, 16)],
            (1, 0, 0),
            Some(Box::new(|_| 0)),
        ),
        (
            "cdb_off before the entry",
            vec![(data, 16)],
            (1, 0, 0),
            Some(Box::new(|e| e - 16)),
        ),
        (
            "cdb_off on the iovec array",
            vec![(data, 16)],
            (1, 0, 0),
            Some(Box::new(|e| e + 48)),
        ),
        (
            "cdb_off too close to the entry end",
            vec![(data, 16)],
            (1, 0, 0),
            Some(Box::new(|e| e + 112 + 8)),
        ),
    ];
    for (what, iovs, counts, cdb) in cases {
        let size = raw_size(iovs.len());
        let at = sim.next_entry_offset(size).unwrap();
        let mut e = raw_cmd(at, &iovs, counts, cdb.map(|f| f(at)));
        if what == "cdb_off too close to the entry end" {
            // A 10-byte CDB starting 8 bytes before the end.
            e[120] = 0x2a;
        }
        let id = sim.submit_raw_entry(&e).unwrap().unwrap();
        match ring.fetch() {
            Ok(Some(Fetched::Invalid { cmd_id, why })) => {
                assert_eq!(cmd_id, id, "{what}");
                assert!(!why.is_empty(), "{what}");
            }
            other => panic!("{what}: expected Invalid, got {other:?}"),
        }
        assert_eq!(ring.in_flight(), 1, "{what}");
        ring.complete(
            id,
            &Completion {
                status: CHECK_CONDITION,
                sense: &SENSE,
                read_len: None,
            },
        )
        .unwrap();
        assert!(ring.take_tail_moved());
        let done = sim.reap().unwrap();
        assert_eq!(done.len(), 1, "{what}");
        assert_eq!(done[0].cmd_id, id);
        assert_eq!(done[0].status, CHECK_CONDITION);
        assert_eq!(&done[0].sense[..18], &SENSE);
        ring_still_works(&mut sim, &mut ring);
    }
}

#[test]
fn well_formed_raw_entry_is_a_command() {
    // The raw builder itself is sound: the same shape with good values is accepted.
    let (mut sim, mut ring) = setup(small());
    let data = sim.layout().data_off;
    let at = sim.next_entry_offset(raw_size(1)).unwrap();
    let id = sim
        .submit_raw_entry(&raw_cmd(at, &[(data + 4096, 16)], (1, 0, 0), None))
        .unwrap()
        .unwrap();
    match ring.fetch().unwrap() {
        Some(Fetched::Cmd(c)) => {
            assert_eq!(c.cmd_id, id);
            assert_eq!(c.cdb, WRITE10);
            assert_eq!(c.data.len(), 16);
            ring.complete_command(c, &Completion::status(0)).unwrap();
        }
        other => panic!("expected a command, got {other:?}"),
    }
    assert_eq!(sim.reap().unwrap().len(), 1);
}

fn header(len_op: u32) -> Vec<u8> {
    let mut h = len_op.to_ne_bytes().to_vec();
    h.extend([1, 0, 0, 0]);
    h
}

#[test]
fn broken_headers_are_errors_and_earlier_commands_still_complete() {
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("length 0", header(CMD), 8),
        ("PAD of length 0", header(0), 8),
        ("length past the ring end", header((4000 + 8) | CMD), 8),
        ("length past cmd_head", header(512 | CMD), 256),
        ("CMD shorter than a response", header(64 | CMD), 64),
        ("TMR shorter than its fixed part", header(24 | TMR), 24),
        ("unknown entry type", header(128 | 3), 128),
        ("unaligned cmd_head", Vec::new(), 12),
        ("cmd_head past the ring end", Vec::new(), 4000 * 3 / 2),
    ];
    for (what, bytes, advance) in cases {
        let (mut sim, mut ring) = setup(small());
        let id = sim.submit(&WRITE10, b"before", 0).unwrap();
        let cmd = match ring.fetch().unwrap() {
            Some(Fetched::Cmd(c)) => c,
            other => panic!("{what}: {other:?}"),
        };
        let pos = ring.fetch_pos();
        sim.submit_corrupt(&bytes, advance).unwrap();
        for _ in 0..3 {
            match ring.fetch() {
                Err(RingError::Corrupt { pos: p, .. }) => assert_eq!(p, pos, "{what}"),
                other => panic!("{what}: expected Corrupt, got {other:?}"),
            }
        }
        assert_eq!(ring.fetch_pos(), pos, "{what}");
        ring.complete_command(cmd, &Completion::status(0)).unwrap();
        let done = sim.reap().unwrap();
        assert_eq!(done.len(), 1, "{what}");
        assert_eq!(done[0].cmd_id, id, "{what}");
        assert_eq!(sim.cmd_tail(), pos, "{what}");
    }
}

#[derive(Debug, Clone)]
struct Garbage {
    op: u32,
    words: Vec<u64>,
    /// Point some iovec fields into the data area so that some entries pass the checks.
    plausible: bool,
}

fn garbage() -> impl Strategy<Value = Garbage> {
    (
        prop_oneof![Just(0u32), Just(CMD), Just(TMR)],
        prop::collection::vec(any::<u64>(), 16..64),
        any::<bool>(),
    )
        .prop_map(|(op, words, plausible)| Garbage {
            op,
            words,
            plausible,
        })
}

proptest! {
    /// Random entry contents with a sound header never panic the engine and never wedge the
    /// ring: a CMD comes out as a command or as Invalid, a TMR as a TMR, a PAD is skipped;
    /// completing what came out lets the simulated kernel reap it, and a normal command works
    /// afterwards.
    #[test]
    fn garbage_entries_never_panic_or_wedge(entries in prop::collection::vec(garbage(), 1..8)) {
        let (mut sim, mut ring) = setup(small());
        let l = sim.layout();
        for g in entries {
            let mut e: Vec<u8> = g.words.iter().flat_map(|w| w.to_ne_bytes()).collect();
            e[0..4].copy_from_slice(&g.op.to_ne_bytes());
            if g.plausible && g.op == CMD {
                // Small counts, one iovec inside the data area, CDB right after it.
                let at = sim.next_entry_offset(e.len()).unwrap();
                e[8..12].copy_from_slice(&1u32.to_ne_bytes());
                e[12..20].fill(0);
                e[24..32].copy_from_slice(&(at + 112).to_ne_bytes());
                let off = g.words[1] % (l.map_len as u64 - l.data_off - 64);
                e[48..56].copy_from_slice(&(l.data_off + off).to_ne_bytes());
                e[56..64].copy_from_slice(&(g.words[2] % 64).to_ne_bytes());
            }
            let id = sim.submit_raw_entry(&e).unwrap();
            let mut fetched = None;
            // Skip over PAD entries (nothing comes out for them).
            if let Some(f) = ring.fetch().unwrap() {
                fetched = Some(f);
            }
            match (g.op, fetched) {
                (0, None) => {}
                (TMR, Some(Fetched::Tmr(t))) => {
                    let want = u32::from_ne_bytes(e[12..16].try_into().unwrap()) as usize;
                    prop_assert_eq!(t.cmd_ids.len(), want.min((e.len() - 32) / 2));
                }
                (CMD, Some(Fetched::Cmd(c))) => {
                    prop_assert_eq!(Some(c.cmd_id), id);
                    prop_assert!(g.plausible);
                    ring.complete_command(c, &Completion::status(0)).unwrap();
                }
                (CMD, Some(Fetched::Invalid { cmd_id, .. })) => {
                    prop_assert_eq!(Some(cmd_id), id);
                    ring.complete(cmd_id, &Completion::status(CHECK_CONDITION)).unwrap();
                }
                (op, other) => prop_assert!(false, "op {} gave {:?}", op, other),
            }
            let done = sim.reap().unwrap();
            prop_assert_eq!(done.len(), usize::from(id.is_some()));
            prop_assert!(sim.is_drained());
        }
        ring_still_works(&mut sim, &mut ring);
    }
}
