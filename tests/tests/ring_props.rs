//! Property tests: the worker's real ring engine ([`Ring`]) driven over the kernel simulator's
//! memfd, with random ring sizes (small, mostly not powers of two, so wrap-around and PAD
//! entries are frequent), random data sizes and block layouts, random command mixes with TMR
//! entries interleaved, and random completion orders, in both out-of-order and in-order mode.
//!
//! Every command carries a unique tag in its CDB; the test-side consumer derives the status,
//! sense, residual and data-in bytes from the tag, so what the simulated kernel reaps can be
//! checked against what the consumer produced for that very command.

// Test code: a panic is a test failure, which is what these assertions want.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsFd;

use proptest::prelude::*;
use tcmu_warden_tests::{
    CAP_OOOC, CAP_READ_LEN, CAP_TMR, CHECK_CONDITION, KernelSim, SIM_POISON, SimConfig, SimError,
};
use tcmu_warden_worker::ring::{Completion, Fetched, Mapping, Ring, RingCommand};

#[derive(Debug, Clone, Copy)]
enum Kind {
    NoData,
    Out(usize),
    In(usize),
    Bidi(usize, usize),
    /// A TMR naming up to this many in-flight commands.
    Tmr(usize),
}

#[derive(Debug, Clone)]
struct Scenario {
    ring_size: u32,
    block_size: usize,
    data_size: usize,
    max_iov_len: usize,
    ooo: bool,
    read_len_cap: bool,
    /// Most commands in flight at once (the device's queue depth).
    depth: usize,
    ops: Vec<(Kind, u8)>,
    choices: Vec<u32>,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        1 => Just(Kind::NoData),
        3 => (1usize..=512).prop_map(Kind::Out),
        3 => (1usize..=512).prop_map(Kind::In),
        1 => (1usize..=512, 1usize..=512).prop_map(|(o, i)| Kind::Bidi(o, i)),
        1 => (0usize..=6).prop_map(Kind::Tmr),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        (1280u32..4096).prop_map(|s| s & !7),
        prop::sample::select(vec![64usize, 128, 256, 512]),
        2048usize..8192,
        prop::sample::select(vec![32usize, 48, 64, 100, 256, 4096]),
        (any::<bool>(), any::<bool>(), 1usize..48),
        prop::collection::vec((kind(), 0u8..5), 1..100),
        prop::collection::vec(any::<u32>(), 1..300),
    )
        .prop_map(
            |(
                ring_size,
                block_size,
                data,
                max_iov_len,
                (ooo, read_len_cap, depth),
                ops,
                choices,
            )| {
                Scenario {
                    ring_size,
                    block_size,
                    data_size: data / block_size * block_size,
                    max_iov_len,
                    ooo,
                    read_len_cap,
                    depth,
                    ops,
                    choices,
                }
            },
        )
}

/// A CDB of one of five lengths, with the tag in bytes 1..5.
fn cdb(style: u8, tag: u32) -> Vec<u8> {
    let (op, len) = match style {
        0 => (0x0a, 6),
        1 => (0x2a, 10),
        2 => (0xaa, 12),
        3 => (0x8a, 16),
        _ => (0x7f, 32),
    };
    let mut c = vec![0u8; len];
    c[0] = op;
    c[1..5].copy_from_slice(&tag.to_le_bytes());
    if op == 0x7f {
        c[7] = 24;
    }
    c[len - 1] = style;
    c
}

fn tag_of(cdb: &[u8]) -> u32 {
    u32::from_le_bytes(cdb[1..5].try_into().unwrap())
}

fn pattern_out(tag: u32, n: usize) -> Vec<u8> {
    (0..n).map(|i| (tag as usize * 31 + i * 7) as u8).collect()
}

fn pattern_in(tag: u32, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (tag as usize * 17 + i * 13 + 1) as u8)
        .collect()
}

/// What the consumer answers for a tag.
fn response(tag: u32, in_len: usize) -> (u8, Vec<u8>, Option<u32>) {
    let status = match tag % 5 {
        0 => CHECK_CONDITION,
        1 => 0x08,
        _ => 0,
    };
    let sense = if status == CHECK_CONDITION {
        (0..(tag % 130) as usize)
            .map(|i| (i as u32 ^ tag) as u8 | 1)
            .collect()
    } else {
        Vec::new()
    };
    let read_len = (in_len > 0 && tag % 3 == 0).then(|| tag % (in_len as u32 + 1));
    (status, sense, read_len)
}

#[derive(Debug)]
struct Sent {
    tag: u32,
    cdb: Vec<u8>,
    out: Vec<u8>,
    in_len: usize,
    bidi: bool,
}

struct Harness {
    sim: KernelSim,
    ring: Ring,
    read_len_cap: bool,
    max_iov_len: usize,
    /// By cmd_id: what was submitted, until reaped.
    sent: HashMap<u16, Sent>,
    /// Fetched by the consumer, not yet completed.
    pending: Vec<RingCommand>,
    tmrs: VecDeque<(u8, Vec<u16>)>,
    submitted: usize,
    reaped: usize,
    next_tag: u32,
}

impl Harness {
    fn fetch_all(&mut self) -> Result<(), TestCaseError> {
        let before = self.sim.cmd_tail();
        self.fetch_batch()?;
        // Fetching passes PAD and TMR entries when nothing older is outstanding.
        prop_assert_eq!(self.ring.take_tail_moved(), self.sim.cmd_tail() != before);
        Ok(())
    }

    fn fetch_batch(&mut self) -> Result<(), TestCaseError> {
        while let Some(f) = self
            .ring
            .fetch()
            .map_err(|e| TestCaseError::fail(e.to_string()))?
        {
            match f {
                Fetched::Cmd(cmd) => {
                    let sent = self
                        .sent
                        .get(&cmd.cmd_id)
                        .ok_or_else(|| TestCaseError::fail("fetched an unknown cmd_id"))?;
                    prop_assert_eq!(&cmd.cdb, &sent.cdb);
                    prop_assert_eq!(tag_of(&cmd.cdb), sent.tag);
                    // Data-in space arrives holding the simulator's poison bytes.
                    let poison = vec![SIM_POISON; sent.in_len];
                    if sent.bidi {
                        prop_assert_eq!(cmd.data.to_vec(), sent.out.clone());
                        prop_assert_eq!(cmd.bidi_in.as_ref().map(|b| b.to_vec()), Some(poison));
                    } else if sent.in_len > 0 {
                        prop_assert_eq!(cmd.data.to_vec(), poison);
                        prop_assert!(cmd.bidi_in.is_none());
                    } else {
                        prop_assert_eq!(cmd.data.to_vec(), sent.out.clone());
                        prop_assert!(cmd.bidi_in.is_none());
                    }
                    prop_assert!(
                        cmd.iovecs
                            .iter()
                            .chain(&cmd.bidi_iovecs)
                            .all(|v| v.len <= self.max_iov_len as u64)
                    );
                    self.pending.push(cmd);
                }
                Fetched::Tmr(t) => {
                    let want = self.tmrs.pop_front();
                    prop_assert_eq!(Some((t.tmr_type, t.cmd_ids)), want);
                }
                Fetched::Invalid { cmd_id, why } => {
                    return Err(TestCaseError::fail(format!(
                        "command {cmd_id} invalid: {why}"
                    )));
                }
            }
        }
        Ok(())
    }

    fn complete(&mut self, pick: usize) -> Result<(), TestCaseError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut cmd = self.pending.swap_remove(pick % self.pending.len());
        let tag = tag_of(&cmd.cdb);
        let in_len = self.sent[&cmd.cmd_id].in_len;
        let (status, sense, read_len) = response(tag, in_len);
        let data_in = pattern_in(tag, in_len);
        let buf = match cmd.bidi_in.as_mut() {
            Some(b) => b,
            None => &mut cmd.data,
        };
        if in_len > 0 {
            prop_assert_eq!(buf.copy_from(0, &data_in), in_len);
        }
        let before = self.sim.cmd_tail();
        self.ring
            .complete_command(
                cmd,
                &Completion {
                    status,
                    sense: &sense,
                    read_len,
                },
            )
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(self.ring.take_tail_moved(), self.sim.cmd_tail() != before);
        Ok(())
    }

    fn reap(&mut self) -> Result<(), TestCaseError> {
        let done = self
            .sim
            .reap()
            .map_err(|e| TestCaseError::fail(format!("reap: {e}")))?;
        for c in done {
            let sent = self
                .sent
                .remove(&c.cmd_id)
                .ok_or_else(|| TestCaseError::fail("reaped an unknown cmd_id"))?;
            let (status, sense, read_len) = response(sent.tag, sent.in_len);
            prop_assert_eq!(c.status, status);
            if status == CHECK_CONDITION {
                let mut want = sense.clone();
                want.resize(96, 0);
                prop_assert_eq!(&c.sense, &want);
            } else {
                prop_assert!(c.sense.is_empty());
            }
            let want_rl = read_len.filter(|_| self.read_len_cap);
            prop_assert_eq!(c.read_len, want_rl);
            let valid = want_rl.is_some_and(|r| r != 0) && !sent.bidi;
            let n = if status == CHECK_CONDITION && !valid {
                0
            } else if valid {
                (want_rl.unwrap_or(0) as usize).min(sent.in_len)
            } else {
                sent.in_len
            };
            prop_assert_eq!(&c.data_in, &pattern_in(sent.tag, sent.in_len)[..n]);
            self.reaped += 1;
        }
        Ok(())
    }

    /// Frees space: everything fetchable is fetched, one command completed, completions reaped.
    fn progress(&mut self, pick: usize) -> Result<(), TestCaseError> {
        self.fetch_all()?;
        self.complete(pick)?;
        self.reap()
    }

    fn submit(&mut self, kind: Kind, style: u8) -> Result<bool, TestCaseError> {
        let tag = self.next_tag;
        let (out, in_len, bidi) = match kind {
            Kind::NoData => (0, 0, false),
            Kind::Out(n) => (n, 0, false),
            Kind::In(n) => (0, n, false),
            Kind::Bidi(o, i) => (o, i, true),
            Kind::Tmr(n) => {
                let mut ids: Vec<u16> = self.sent.keys().copied().collect();
                ids.sort_unstable();
                ids.truncate(n);
                let ty = (tag % 7 + 1) as u8;
                return match self.sim.submit_tmr(ty, &ids) {
                    Ok(()) => {
                        self.next_tag += 1;
                        self.tmrs.push_back((ty, ids));
                        Ok(true)
                    }
                    Err(SimError::Full) => Ok(false),
                    Err(e) => Err(TestCaseError::fail(e.to_string())),
                };
            }
        };
        let c = cdb(style, tag);
        let data_out = pattern_out(tag, out);
        let r = if bidi {
            self.sim.submit_bidi(&c, &data_out, in_len)
        } else {
            self.sim.submit(&c, &data_out, in_len)
        };
        match r {
            Ok(id) => {
                prop_assert!(id != 0);
                let prev = self.sent.insert(
                    id,
                    Sent {
                        tag,
                        cdb: c,
                        out: data_out,
                        in_len,
                        bidi,
                    },
                );
                prop_assert!(prev.is_none(), "cmd_id {} reused while in flight", id);
                self.next_tag += 1;
                self.submitted += 1;
                Ok(true)
            }
            Err(SimError::Full) => Ok(false),
            Err(e) => Err(TestCaseError::fail(e.to_string())),
        }
    }
}

/// SplitMix64's finalizer: every output bit depends on every input bit.
fn mix(x: u64) -> u32 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u32
}

fn run(s: Scenario) -> Result<(), TestCaseError> {
    let mut flags = CAP_TMR;
    if s.ooo {
        flags |= CAP_OOOC;
    }
    if s.read_len_cap {
        flags |= CAP_READ_LEN;
    }
    let cfg = SimConfig {
        ring_size: s.ring_size,
        block_size: s.block_size,
        data_size: s.data_size,
        max_iov_len: s.max_iov_len,
        flags,
        ..SimConfig::default()
    };
    let (sim, dev) = KernelSim::new(cfg).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let map = Mapping::map(dev.map_fd.as_fd(), dev.map_len).unwrap();
    let ring = Ring::new(map).unwrap();
    prop_assert_eq!(ring.flags(), flags);
    prop_assert_eq!(ring.ring_size(), s.ring_size);
    let mut h = Harness {
        sim,
        ring,
        read_len_cap: s.read_len_cap,
        max_iov_len: s.max_iov_len,
        sent: HashMap::new(),
        pending: Vec::new(),
        tmrs: VecDeque::new(),
        submitted: 0,
        reaped: 0,
        next_tag: 1,
    };
    let mut next_op = 0;
    // The generated choices, cycled and mixed with the step number so that a short list still
    // yields every kind of step. The mix must reach the low bits (the step kind is `c % 8`): a
    // plain `c ^ i * odd` left them periodic, and some lists then never submitted again.
    let mut choices = s
        .choices
        .iter()
        .copied()
        .cycle()
        .zip(1u64..)
        .map(|(c, i)| mix(u64::from(c) << 32 | i));
    let mut steps = 0u32;
    while next_op < s.ops.len() {
        steps += 1;
        prop_assert!(steps < 200_000, "no progress");
        let c = choices.next().unwrap_or(0);
        let pick = (c / 8) as usize;
        match c % 8 {
            0..=2 => {
                let (kind, style) = s.ops[next_op];
                if h.sim.in_flight() < s.depth && h.submit(kind, style)? {
                    next_op += 1;
                } else {
                    h.progress(pick)?;
                }
            }
            3 | 4 => h.fetch_all()?,
            5 | 6 => h.complete(pick)?,
            _ => h.reap()?,
        }
    }
    // Drain: everything fetched, completed in random order, reaped.
    h.fetch_all()?;
    while !h.pending.is_empty() {
        let c = choices.next().unwrap_or(0) as usize;
        h.complete(c)?;
        if c % 3 == 0 {
            h.reap()?;
        }
    }
    h.fetch_all()?;
    prop_assert!(h.pending.is_empty());
    h.reap()?;
    prop_assert_eq!(h.reaped, h.submitted);
    prop_assert!(
        h.sent.is_empty(),
        "not reaped: {:?}",
        h.sent.keys().collect::<Vec<_>>()
    );
    prop_assert!(h.tmrs.is_empty());
    prop_assert_eq!(h.ring.in_flight(), 0);
    prop_assert!(h.ring.awaiting_older_ids().is_empty());
    prop_assert!(h.sim.is_drained(), "{:?}", h.sim);
    prop_assert_eq!(h.sim.cmd_head(), h.sim.cmd_tail());
    prop_assert_eq!(h.ring.tail(), h.sim.cmd_head());
    prop_assert_eq!(h.ring.fetch_pos(), h.sim.cmd_head());
    prop_assert_eq!(h.sim.in_flight(), 0);
    Ok(())
}

proptest! {
    #[test]
    fn every_command_is_reaped_once_with_its_own_answer(s in scenario()) {
        run(s)?;
    }
}
