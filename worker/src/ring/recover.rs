//! # Recovery: rebuilding a ring engine from a dead worker's journal
//!
//! [`Ring::recover`] is the only reader of a journal. It reads the kernel's indexes
//! (`cmd_tail` = T, `cmd_head` = H) and the journal's fetch position F, and walks the ring from
//! T to F by each entry's own header length: every CMD entry there is a command the kernel
//! still waits for (each outstanding command occupies exactly one CMD slot between the tail and
//! the fetch position, whatever the relabelling by out-of-order completions did to the slots'
//! ids). The journal must account for exactly those:
//!
//! - a slot named by the pending marker was never committed: it is dropped, and the entry at F
//!   is fetched again like any new one;
//! - a `COMPLETING(S)` slot with S outside `[T, F)` is done (the kernel's tail passed S): it is
//!   freed; with S inside, the tail store never happened and the response is delivered again;
//!   such slots must be exactly the first CMD slots after T, in order, as the engine writes
//!   completions from the tail onwards;
//! - `DONE` slots have their response delivered (re-written at the tail);
//! - `FETCHED` slots were still running: they come back as [`Recovered`] commands, with data
//!   buffers rebuilt from the journaled iovecs (re-checked against the data area and against
//!   each other), for the runtime to re-execute or answer BUSY;
//! - and the number of these outstanding commands must equal the number of CMD slots walked.
//!
//! Anything else (a bad header, checksum, offset, count, a duplicate id, an iovec outside the
//! data area, F outside `[T, H]`, a ring entry that does not parse) is a [`RecoverError`]: the
//! caller then falls back to the kernel's `reset_ring`.
//!
//! Every journal write made here keeps the journal consistent at each step, so a worker that
//! dies while recovering can itself be recovered.
//!
//! [`Ring::check_unserved`] is the counterpart for a ring handed over *without* a journal to
//! recover from: such a ring may be served from its tail only if no command waits in it. One
//! that holds commands was served by someone whose record is gone (a journal deleted with
//! `/run`, a `journal_dir` changed between restarts, another TCMU daemon before us), and the
//! same out-of-order relabelling makes its slots unreadable as a list of outstanding commands:
//! it is [`RecoverError::Unjournaled`], and the supervisor resets it.
//!
//! This module owns that algorithm. It never executes commands and never notifies the kernel.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use super::journal::{self, Journal, LiveState, ParsedSlot, SlotFlags};
use super::layout::{
    HDR_CMD_ID, HDR_LEN_OP, MB_CMD_HEAD, TCMU_CMD_ENTRY_MIN_SIZE, TCMU_HDR_SIZE,
    TCMU_OP_ALIGN_SIZE, TCMU_OP_CMD, TCMU_OP_MASK, TCMU_OP_PAD, TCMU_OP_TMR, rd_u16, rd_u32,
};
use super::{InFlight, Jrnl, Mapping, Response, Ring, RingCommand, RingError, Slot, read_shared};

/// Why a journal could not be used. The device's ring must then be reset.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// The mailbox itself is unusable.
    #[error("{0}")]
    Ring(#[from] RingError),
    /// The journal does not agree with itself or with the ring.
    #[error("journal inconsistent: {0}")]
    Inconsistent(String),
    /// The ring was handed over without a journal to recover from (a fresh one, or none) but
    /// already holds commands: someone served it before — a worker whose journal was lost, or
    /// another TCMU daemon — and nothing records which of them were answered already. Serving
    /// them from `cmd_tail` would answer some twice (the kernel then marks the ring broken) and
    /// lose others; the ring must be reset.
    #[error(
        "{commands} commands wait in the ring (cmd_tail {tail}, cmd_head {head}) and no journal \
         records which of them are still outstanding"
    )]
    Unjournaled {
        /// Command entries between `cmd_tail` and `cmd_head`.
        commands: usize,
        /// The kernel's tail.
        tail: u32,
        /// The kernel's head.
        head: u32,
    },
}

fn inconsistent(why: impl Into<String>) -> RecoverError {
    RecoverError::Inconsistent(why.into())
}

/// A command that was running when the previous worker died. Each must be completed once.
#[derive(Debug)]
pub enum Recovered {
    /// Its request is intact: re-execute it if that is safe for its opcode, else answer BUSY.
    Pending(RingCommand),
    /// It had more iovecs than a journal slot holds, so it cannot be rebuilt: answer BUSY.
    Unreplayable {
        /// Its id.
        cmd_id: u16,
        /// Its CDB (for the log).
        cdb: Vec<u8>,
    },
    /// Its entry was malformed when fetched: fail it again (CHECK CONDITION).
    Invalid {
        /// Its id.
        cmd_id: u16,
    },
}

impl Recovered {
    /// The command's id.
    pub fn cmd_id(&self) -> u16 {
        match self {
            Recovered::Pending(c) => c.cmd_id,
            Recovered::Unreplayable { cmd_id, .. } | Recovered::Invalid { cmd_id } => *cmd_id,
        }
    }
}

/// What recovery found, for the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The journal's generation before this recovery (one per worker that used it).
    pub generation: u64,
    /// Responses computed by the previous worker and delivered again now.
    pub redelivered: usize,
    /// Commands the kernel had already received (their slots were freed).
    pub already_done: usize,
    /// Commands returned as [`Recovered`].
    pub pending: usize,
    /// Whether a half-journaled fetch was dropped (its entry is fetched again).
    pub dropped_uncommitted_fetch: bool,
    /// The kernel's tail and the journal's fetch position at recovery.
    pub tail: u32,
    /// See `tail`.
    pub fetch_pos: u32,
}

/// A rebuilt ring and what is left to do.
#[derive(Debug)]
pub struct Recovery {
    /// The ring, positioned where the previous worker stopped, its recovered responses already
    /// written (check [`Ring::take_tail_moved`] and notify the kernel).
    pub ring: Ring,
    /// The commands that were running: each must be completed exactly once.
    pub commands: Vec<Recovered>,
    /// What was found.
    pub report: RecoveryReport,
}

/// Bytes from ring offset `from` forward to `to`.
fn dist(size: u32, from: u32, to: u32) -> u64 {
    let size = u64::from(size);
    (u64::from(to) + size - u64::from(from) % size) % size
}

impl Ring {
    /// Rebuilds a ring from `map` and the journal a previous worker kept for it. See the module
    /// documentation. On error nothing was written to the ring or the journal, and the caller
    /// must fall back to resetting the ring.
    pub fn recover(map: Arc<Mapping>, journal: Journal) -> Result<Recovery, RecoverError> {
        let mut ring = Ring::new(map)?;
        let size = ring.cmdr_size;
        let tail = ring.tail;
        let head = ring.mailbox_word(MB_CMD_HEAD).load(Ordering::Acquire);
        if head >= size || head % TCMU_OP_ALIGN_SIZE != 0 {
            return Err(inconsistent(format!(
                "cmd_head {head} is not a ring offset"
            )));
        }
        let parsed = journal::parse(&journal.snapshot(), ring.ident()).map_err(inconsistent)?;
        let fetch_pos = parsed.fetch_pos;
        if fetch_pos >= size || fetch_pos % TCMU_OP_ALIGN_SIZE != 0 {
            return Err(inconsistent(format!(
                "fetch position {fetch_pos} is not a ring offset"
            )));
        }
        if dist(size, tail, fetch_pos) > dist(size, tail, head) {
            return Err(inconsistent(format!(
                "fetch position {fetch_pos} is not between cmd_tail {tail} and cmd_head {head}"
            )));
        }
        let slots = ring.walk(tail, fetch_pos)?;
        let cmd_slots: Vec<Slot> = slots
            .iter()
            .filter(|s| s.cmd_id.is_some())
            .copied()
            .collect();

        // Sort the journal's live slots.
        let mut ids = HashSet::new();
        let mut done_completing: Vec<u16> = Vec::new();
        let mut redeliver: Vec<(ParsedSlot, Response, bool)> = Vec::new();
        let mut running: Vec<ParsedSlot> = Vec::new();
        let mut open_offsets: Vec<u32> = Vec::new();
        for s in parsed.slots {
            if !ids.insert(s.cmd_id) {
                return Err(inconsistent(format!(
                    "command {} is journaled twice",
                    s.cmd_id
                )));
            }
            match s.state.clone() {
                LiveState::Fetched => running.push(s),
                LiveState::Done(resp) => redeliver.push((s, resp, false)),
                LiveState::Completing(resp, off) => {
                    let ahead = off % TCMU_OP_ALIGN_SIZE == 0
                        && off < size
                        && dist(size, tail, off) < dist(size, tail, fetch_pos);
                    if ahead {
                        open_offsets.push(off);
                        redeliver.push((s, resp, true));
                    } else {
                        done_completing.push(s.index);
                    }
                }
            }
        }
        // Completing-but-not-done markers must name exactly the first CMD slots after the tail.
        open_offsets.sort_by_key(|off| dist(size, tail, *off));
        let prefix: Vec<u32> = cmd_slots
            .iter()
            .take(open_offsets.len())
            .map(|s| s.off)
            .collect();
        if open_offsets != prefix {
            return Err(inconsistent(format!(
                "completions in progress at {open_offsets:?} are not the oldest slots {prefix:?}"
            )));
        }
        let outstanding = running.len() + redeliver.len();
        if outstanding != cmd_slots.len() {
            return Err(inconsistent(format!(
                "{outstanding} commands journaled as outstanding, {} command slots between \
                 cmd_tail {tail} and the fetch position {fetch_pos}",
                cmd_slots.len()
            )));
        }
        if ring.flags & super::layout::TCMU_MAILBOX_FLAG_CAP_OOOC == 0 {
            // In order, every slot still carries its own command's id.
            let mut seen = HashSet::new();
            for s in &cmd_slots {
                let id = s.cmd_id.unwrap_or(0);
                if !ids.contains(&id) || !seen.insert(id) {
                    return Err(inconsistent(format!(
                        "slot at {} names command {id}, which is not outstanding",
                        s.off
                    )));
                }
            }
        }

        // Rebuild the engine's state. Buffers first: a bad iovec aborts before any write.
        let mut commands = Vec::new();
        for s in &running {
            let rec = ring.rebuild(s)?;
            commands.push(rec);
        }
        ring.fetch_pos = fetch_pos;
        ring.slots = slots;
        let mut jr = Jrnl::new(journal);
        let mut used: HashSet<u16> = HashSet::new();
        for s in &running {
            jr.slot_of.insert(s.cmd_id, s.index);
            used.insert(s.index);
        }
        for (s, resp, _) in &redeliver {
            jr.slot_of.insert(s.cmd_id, s.index);
            used.insert(s.index);
            ring.done.insert(s.cmd_id, resp.clone());
        }
        jr.free.retain(|slot| !used.contains(slot));

        // Journal writes, each leaving the journal consistent: the uncommitted slot first (it is
        // still covered by the pending marker), then slots the kernel already has (their
        // offsets are behind the tail, and the tail does not move before they are free), then
        // in-progress completions back to DONE, and only then the fetch word without the marker.
        if let Some(p) = parsed.pending {
            jr.j.set_state(p, journal::FREE);
        }
        for &slot in &done_completing {
            jr.j.set_state(slot, journal::FREE);
        }
        for (s, _, completing) in &redeliver {
            if *completing {
                jr.j.set_state(s.index, journal::DONE);
            }
        }
        jr.j.set_fetch(fetch_pos, None);
        jr.j.set_tail(tail);
        jr.j.bump_generation(parsed.generation.saturating_add(1));
        ring.journal = Some(jr);

        let report = RecoveryReport {
            generation: parsed.generation,
            redelivered: redeliver.len(),
            already_done: done_completing.len(),
            pending: commands.len(),
            dropped_uncommitted_fetch: parsed.pending.is_some(),
            tail,
            fetch_pos,
        };
        // Deliver the recovered responses now (journaled like any completion).
        ring.retire()?;
        Ok(Recovery {
            ring,
            commands,
            report,
        })
    }

    /// Fails with [`RecoverError::Unjournaled`] if command entries wait between `cmd_tail` and
    /// `cmd_head`. A ring handed over without a journal to recover from must pass this before
    /// anything is fetched: only a ring nobody fetched from (or one just reset) is safe to serve
    /// from its tail. PAD and TMR entries need no answer and do not count. Nothing is written.
    pub fn check_unserved(&self) -> Result<(), RecoverError> {
        let size = self.cmdr_size;
        let head = self.mailbox_word(MB_CMD_HEAD).load(Ordering::Acquire);
        if head >= size || head % TCMU_OP_ALIGN_SIZE != 0 {
            return Err(inconsistent(format!(
                "cmd_head {head} is not a ring offset"
            )));
        }
        let commands = self
            .walk(self.tail, head)?
            .iter()
            .filter(|s| s.cmd_id.is_some())
            .count();
        if commands > 0 {
            return Err(RecoverError::Unjournaled {
                commands,
                tail: self.tail,
                head,
            });
        }
        Ok(())
    }

    /// The entries from ring offset `from` up to `to`, by their own header lengths.
    fn walk(&self, from: u32, to: u32) -> Result<VecDeque<Slot>, RecoverError> {
        let size = self.cmdr_size;
        let total = dist(size, from, to);
        let mut walked = 0u64;
        let mut pos = from;
        let mut out = VecDeque::new();
        while pos != to {
            let mut hdr = [0u8; TCMU_HDR_SIZE];
            if !read_shared(&self.map, self.cmdr_off + pos as usize, &mut hdr) {
                return Err(inconsistent(format!(
                    "ring entry at {pos} outside the mapping"
                )));
            }
            let len_op = rd_u32(&hdr, HDR_LEN_OP).unwrap_or(0);
            let cmd_id = rd_u16(&hdr, HDR_CMD_ID).unwrap_or(0);
            let len = len_op & !TCMU_OP_MASK;
            if len == 0 || len > size - pos || walked + u64::from(len) > total {
                return Err(inconsistent(format!(
                    "ring entry at {pos} of {len} bytes does not end by offset {to}"
                )));
            }
            let id = match len_op & TCMU_OP_MASK {
                TCMU_OP_PAD | TCMU_OP_TMR => None,
                TCMU_OP_CMD if len as usize >= TCMU_CMD_ENTRY_MIN_SIZE => Some(cmd_id),
                other => {
                    return Err(inconsistent(format!(
                        "ring entry at {pos}: type {other}, {len} bytes"
                    )));
                }
            };
            out.push_back(Slot {
                off: pos,
                len,
                cmd_id: id,
            });
            walked += u64::from(len);
            pos = (pos + len) % size;
        }
        Ok(out)
    }

    /// Rebuilds one still-running command from its journal slot, reserving its data.
    fn rebuild(&mut self, s: &ParsedSlot) -> Result<Recovered, RecoverError> {
        if self.in_flight.contains_key(&s.cmd_id) {
            return Err(inconsistent(format!("command {} twice", s.cmd_id)));
        }
        let placeholder = InFlight {
            guard: Weak::new(),
            ranges: Vec::new(),
        };
        if s.flags & SlotFlags::INVALID != 0 {
            self.in_flight.insert(s.cmd_id, placeholder);
            return Ok(Recovered::Invalid { cmd_id: s.cmd_id });
        }
        if s.flags & SlotFlags::OVERFLOW != 0 {
            self.in_flight.insert(s.cmd_id, placeholder);
            return Ok(Recovered::Unreplayable {
                cmd_id: s.cmd_id,
                cdb: s.cdb.clone(),
            });
        }
        for (i, v) in s.iovecs.iter().chain(&s.bidi_iovecs).enumerate() {
            let end = v.base.checked_add(v.len);
            if v.base < self.data.start || end.is_none_or(|e| e > self.data.end) {
                return Err(inconsistent(format!(
                    "command {}: iovec {i} [{:#x}, +{:#x}) outside the data area",
                    s.cmd_id, v.base, v.len
                )));
            }
        }
        let req = super::layout::CmdRequest {
            cdb: s.cdb.clone(),
            iovecs: s.iovecs.clone(),
            bidi_iovecs: s.bidi_iovecs.clone(),
        };
        let cmd = self
            .claim(s.cmd_id, req)
            .map_err(|why| inconsistent(format!("command {}: {why}", s.cmd_id)))?;
        Ok(Recovered::Pending(cmd))
    }
}
