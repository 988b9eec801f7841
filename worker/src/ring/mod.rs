//! # The TCMU command ring
//!
//! The kernel's TCMU backstore hands SCSI commands to userspace through one shared-memory region
//! (the UIO device's map 0): a *mailbox* with the ring indexes, a *command ring* of variable-size
//! entries, and a *data area* holding each command's data buffer. This module is the userspace
//! half of that protocol:
//!
//! - [`Mapping`] maps the region;
//! - [`Ring`] fetches entries between its own fetch position and the kernel's `cmd_head`,
//!   validates and decodes them into [`Fetched`] values, and writes completions back, moving
//!   `cmd_tail`;
//! - [`layout`] has the kernel's offsets and constants and the pure entry parsers.
//!
//! ## The protocol in brief
//! The kernel appends an entry at `cmd_head` (ring offsets are modulo `cmdr_size`, which is *not*
//! a power of two), then advances `cmd_head` and wakes userspace. Entries never wrap: when one
//! does not fit before the end of the ring, the kernel first writes a PAD entry filling the rest.
//! Userspace answers a command by writing the response over the entry's request (status, sense,
//! optional residual length) and advancing `cmd_tail` past it; the kernel then walks from its own
//! last-cleaned position up to `cmd_tail`, slot by slot, using each slot's *own* header length
//! and looking the command up by the slot's `cmd_id`.
//!
//! With `TCMU_MAILBOX_FLAG_CAP_OOOC` (out-of-order completion), userspace may finish commands in
//! any order: finishing X writes X's response into the *oldest* unfinished CMD slot (at the tail)
//! and relabels that slot with X's `cmd_id`. This is why a command's request (CDB, iovecs) is
//! copied out of its slot when it is fetched: the slot may be overwritten before the command ends.
//! Without the flag, completions go to the ring in ring order; [`Ring`] holds an early completion
//! until every older command is done.
//!
//! ## Trust
//! The shared region is writable by whoever else maps it; every offset and length read from it is
//! untrusted. Each entry is copied out of shared memory exactly once (the header first, then the
//! rest) and only the local copy is parsed, so a concurrent writer cannot change what was checked
//! (no double fetch). A malformed CMD entry whose header is sound comes out as
//! [`Fetched::Invalid`] so that the command can be failed with CHECK CONDITION; a malformed header
//! (or index) makes the ring unusable and [`Ring::fetch`] returns [`RingError::Corrupt`].
//!
//! ## Data buffers
//! Each fetched command gets one [`DataBuf`] per data direction, built over its iovecs in the data
//! area. The buffers keep the [`Mapping`] alive, and [`Ring::complete`] refuses to complete a
//! command while any of its buffers still exists, because completion hands the pages back to the
//! kernel for reuse. Drop the [`RingCommand`] (or use [`Ring::complete_command`]) first.
//!
//! ## What this module must never do
//! No I/O on the UIO file descriptor (waiting for work and notifying the kernel with 4-byte
//! `read`/`write` calls is the runtime's job: see [`Ring::take_tail_moved`]); no panics on ring
//! contents; no reads or writes of the data area except through the [`DataBuf`]s it hands out.
//!
//! ## Recovery
//! A ring built with [`Ring::with_journal`] keeps an in-flight [`journal`] in a shared-memory
//! file that outlives the worker: its fetch position and, for every command fetched and not yet
//! finished, the request (and once it ran, the response), plus a completing-at-tail marker
//! written before each tail advance. [`Ring::recover`] rebuilds a ring from that journal and the
//! ring itself: it re-delivers the responses a dead worker computed but the kernel never got,
//! hands back the commands that were still running (to re-execute or answer BUSY), and resumes
//! fetching where the predecessor stopped. After the kernel's `reset_ring` action (head = tail =
//! 0) the runtime must build a new [`Ring`]: an existing one would misread the rewound indexes.
//!
//! The steps of the journal protocol are [`crash`] points: with the `crash-points` feature a
//! test can make the engine stop dead at any of them.

pub mod crash;
pub mod journal;
pub mod layout;
mod mapping;
mod recover;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering, fence};
use std::sync::{Arc, Weak};

#[cfg(any(test, feature = "crash-points"))]
pub use crash::CrashPlan;
pub use crash::CrashPoint;
use journal::{Journal, JournalRequest, RingIdent};
use layout::*;
pub use mapping::Mapping;
pub use recover::{RecoverError, Recovered, Recovery, RecoveryReport};
use tcmu_warden_sdk::{BufOwner, DataBuf};

/// Errors of the ring engine.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// A zero-length mapping was requested.
    #[error("cannot map a region of {len} bytes")]
    MapSize {
        /// The requested length.
        len: usize,
    },
    /// `mmap` failed.
    #[error("mmap of {len} bytes failed: {source}")]
    Map {
        /// The requested length.
        len: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The mailbox is not one this engine can use (version, ring bounds, initial tail).
    #[error("bad mailbox: {0}")]
    Mailbox(String),
    /// The ring is unusable: a broken index or entry header. The device must not be served any
    /// more from this ring.
    #[error("corrupt ring at offset {pos}: {why}")]
    Corrupt {
        /// Ring offset (from `cmdr_off`) of the entry being fetched.
        pos: u32,
        /// What was wrong.
        why: String,
    },
    /// [`Ring::complete`] for a command that was not fetched, or was already completed. The ring
    /// was not touched.
    #[error("completion for command {0}, which is not in flight")]
    NotInFlight(u16),
    /// [`Ring::complete`] while a [`DataBuf`] of the command is still alive. The ring was not
    /// touched; drop the buffers and complete again.
    #[error("command {0} still has live data buffers; drop its RingCommand before completing it")]
    BuffersInUse(u16),
    /// A test's [`crash`] plan stopped the engine at this point; it does nothing any more.
    /// Never produced without the `crash-points` feature.
    #[error("crash injected at {0:?}")]
    Crashed(CrashPoint),
}

/// One `struct iovec` of a command: `len` bytes at offset `base` from the start of the mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoVec {
    /// Offset from the start of the mapping.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A SCSI command fetched from the ring.
#[derive(Debug)]
pub struct RingCommand {
    /// The kernel's id for the command; pass it to [`Ring::complete`].
    pub cmd_id: u16,
    /// The CDB, copied out of the ring.
    pub cdb: Vec<u8>,
    /// The data buffer: data-out or data-in, as the CDB says; for a bidirectional command the
    /// data-out part.
    pub data: DataBuf,
    /// The data-in buffer of a bidirectional command (`iov_bidi_cnt > 0`), else `None`.
    pub bidi_in: Option<DataBuf>,
    /// The iovecs behind `data`, as the kernel described them.
    pub iovecs: Vec<IoVec>,
    /// The iovecs behind `bidi_in`.
    pub bidi_iovecs: Vec<IoVec>,
}

/// A task-management notification: the initiator aborted commands or reset the LUN. It needs
/// no completion; the aborted commands themselves must still be completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TmrEntry {
    /// One of [`layout::tmr`]'s `TCMU_TMR_*` values.
    pub tmr_type: u8,
    /// The ids of the affected commands that are on the ring.
    pub cmd_ids: Vec<u16>,
}

/// What [`Ring::fetch`] found.
#[derive(Debug)]
pub enum Fetched {
    /// A well-formed command.
    Cmd(RingCommand),
    /// A task-management notification.
    Tmr(TmrEntry),
    /// A CMD entry whose contents are unusable (bad iovec, CDB or counts). It is in flight: the
    /// runtime completes it, typically with CHECK CONDITION.
    Invalid {
        /// The entry's command id.
        cmd_id: u16,
        /// What was wrong, for the log.
        why: String,
    },
}

/// The response to one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion<'a> {
    /// SCSI status byte.
    pub status: u8,
    /// Sense data; copied, truncated to 96 bytes, the rest of the kernel's buffer zeroed.
    pub sense: &'a [u8],
    /// For data-in commands that produced fewer bytes than their buffer holds: how many. Only
    /// passed on when the kernel advertises `CAP_READ_LEN`. The kernel treats 0 as "not given".
    pub read_len: Option<u32>,
}

impl Completion<'static> {
    /// A completion with `status`, no sense and no residual.
    pub const fn status(status: u8) -> Completion<'static> {
        Completion {
            status,
            sense: &[],
            read_len: None,
        }
    }
}

/// Owner of one command's data buffers: keeps the mapping alive, and its liveness tells the ring
/// whether any buffer of the command still exists.
struct CmdGuard {
    _map: Arc<Mapping>,
}

/// A fetched entry between the tail and the fetch position.
#[derive(Clone, Copy, Debug)]
struct Slot {
    /// Ring offset.
    off: u32,
    /// The entry's own length, from its header.
    len: u32,
    /// `None` for PAD and TMR entries, which the tail simply passes.
    cmd_id: Option<u16>,
}

struct InFlight {
    /// Dead once every data buffer of the command is dropped (a dangling Weak for Invalid).
    guard: Weak<CmdGuard>,
    /// Start offsets (keys of `Ring::ranges`) of the command's data segments.
    ranges: Vec<u64>,
}

type Response = journal::JournalResponse;

/// The journal of a ring and the engine's private view of it.
#[derive(Debug)]
struct Jrnl {
    j: Journal,
    /// Unused journal slots.
    free: Vec<u16>,
    /// The journal slot of every fetched command not yet freed (in flight or done).
    slot_of: HashMap<u16, u16>,
}

impl Jrnl {
    fn new(j: Journal) -> Jrnl {
        Jrnl {
            j,
            free: (0..journal::JOURNAL_SLOTS as u16).rev().collect(),
            slot_of: HashMap::new(),
        }
    }
}

/// The userspace side of one device's command ring. See the module documentation.
pub struct Ring {
    map: Arc<Mapping>,
    flags: u16,
    cmdr_off: usize,
    cmdr_size: u32,
    data: DataArea,
    /// Ring offset of the next entry to fetch.
    fetch_pos: u32,
    /// Ring offset we last stored in `cmd_tail`.
    tail: u32,
    /// Fetched entries from `tail` to `fetch_pos`, oldest first.
    slots: VecDeque<Slot>,
    /// Fetched commands not yet completed through [`Ring::complete`].
    in_flight: HashMap<u16, InFlight>,
    /// Completed commands whose response is not yet on the ring (in-order mode only keeps any).
    done: HashMap<u16, Response>,
    /// Data segments of in-flight commands, start -> end (mapping offsets); kept disjoint.
    ranges: BTreeMap<u64, u64>,
    tail_moved: bool,
    /// The in-flight journal, if this ring keeps one.
    journal: Option<Jrnl>,
    #[cfg(any(test, feature = "crash-points"))]
    crash: Option<Arc<CrashPlan>>,
    /// Set once a crash point fired: the engine is dead.
    #[cfg(any(test, feature = "crash-points"))]
    crashed: Option<CrashPoint>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("flags", &self.flags)
            .field("cmdr_size", &self.cmdr_size)
            .field("fetch_pos", &self.fetch_pos)
            .field("tail", &self.tail)
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

fn corrupt(pos: u32, why: impl Into<String>) -> RingError {
    RingError::Corrupt {
        pos,
        why: why.into(),
    }
}

impl Ring {
    /// Validates the mailbox of `map` and starts fetching and completing at its current
    /// `cmd_tail` (a fresh or reset ring has `cmd_head == cmd_tail == 0`).
    ///
    /// Requires version 2, an 8-aligned ring that starts after the mailbox and ends inside the
    /// map, and an 8-aligned tail inside the ring. The data area is everything after the ring.
    pub fn new(map: Arc<Mapping>) -> Result<Ring, RingError> {
        let len = map.len();
        let mut mb = [0u8; TCMU_MAILBOX_SIZE];
        if !read_shared(&map, 0, &mut mb) {
            return Err(RingError::Mailbox(format!(
                "mapping of {len} bytes is smaller than the {TCMU_MAILBOX_SIZE}-byte mailbox"
            )));
        }
        let bad = |why: String| RingError::Mailbox(why);
        let version = rd_u16(&mb, MB_VERSION).ok_or_else(|| bad("no version".into()))?;
        if version != TCMU_MAILBOX_VERSION {
            return Err(bad(format!(
                "version {version}, expected {TCMU_MAILBOX_VERSION}"
            )));
        }
        let flags = rd_u16(&mb, MB_FLAGS).ok_or_else(|| bad("no flags".into()))?;
        let cmdr_off = rd_u32(&mb, MB_CMDR_OFF).ok_or_else(|| bad("no cmdr_off".into()))?;
        let cmdr_size = rd_u32(&mb, MB_CMDR_SIZE).ok_or_else(|| bad("no cmdr_size".into()))?;
        let ring_end = u64::from(cmdr_off) + u64::from(cmdr_size);
        if (cmdr_off as usize) < TCMU_MAILBOX_SIZE
            || cmdr_off % TCMU_OP_ALIGN_SIZE != 0
            || cmdr_size == 0
            || cmdr_size % TCMU_OP_ALIGN_SIZE != 0
            || ring_end > len as u64
        {
            return Err(bad(format!(
                "ring [{cmdr_off}, +{cmdr_size}) is not an 8-aligned range after the mailbox \
                 inside the {len}-byte mapping"
            )));
        }
        let mut ring = Ring {
            flags,
            cmdr_off: cmdr_off as usize,
            cmdr_size,
            data: DataArea {
                start: ring_end,
                end: len as u64,
            },
            fetch_pos: 0,
            tail: 0,
            slots: VecDeque::new(),
            in_flight: HashMap::new(),
            done: HashMap::new(),
            ranges: BTreeMap::new(),
            tail_moved: false,
            journal: None,
            #[cfg(any(test, feature = "crash-points"))]
            crash: None,
            #[cfg(any(test, feature = "crash-points"))]
            crashed: None,
            map,
        };
        // Acquire: if another process (a previous worker) left the tail here, what it wrote into
        // the ring before storing the tail is visible to us.
        let tail = ring.mailbox_word(MB_CMD_TAIL).load(Ordering::Acquire);
        if tail >= cmdr_size || tail % TCMU_OP_ALIGN_SIZE != 0 {
            return Err(bad(format!(
                "cmd_tail {tail} is not an 8-aligned offset inside the {cmdr_size}-byte ring"
            )));
        }
        ring.fetch_pos = tail;
        ring.tail = tail;
        Ok(ring)
    }

    /// Like [`Ring::new`], and keeps an in-flight journal in `journal`, which is initialised
    /// (every slot free, the fetch position at the current tail) before anything is fetched.
    /// Use it for a ring nobody served before, or one just reset; for a ring a previous worker
    /// served with a journal, use [`Ring::recover`].
    pub fn with_journal(map: Arc<Mapping>, journal: Journal) -> Result<Ring, RingError> {
        let mut ring = Ring::new(map)?;
        journal.init(ring.ident(), ring.tail);
        ring.journal = Some(Jrnl::new(journal));
        Ok(ring)
    }

    /// What the journal header records about this ring.
    fn ident(&self) -> RingIdent {
        RingIdent {
            map_len: self.map.len() as u64,
            cmdr_off: self.cmdr_off as u32,
            cmdr_size: self.cmdr_size,
            flags: self.flags,
        }
    }

    /// Whether this ring keeps a journal.
    pub fn has_journal(&self) -> bool {
        self.journal.is_some()
    }

    /// Installs a crash plan (tests only): see [`crash`].
    #[cfg(any(test, feature = "crash-points"))]
    pub fn set_crash_plan(&mut self, plan: Arc<CrashPlan>) {
        self.crash = Some(plan);
    }

    /// A crash point: `Err(Crashed)` when the installed plan fires here (and ever after). Does
    /// nothing without the `crash-points` feature.
    #[inline]
    pub fn crash_point(&mut self, p: CrashPoint) -> Result<(), RingError> {
        #[cfg(any(test, feature = "crash-points"))]
        {
            if let Some(at) = self.crashed {
                return Err(RingError::Crashed(at));
            }
            if self.crash.as_ref().is_some_and(|plan| plan.hit(p)) {
                self.crashed = Some(p);
                return Err(RingError::Crashed(p));
            }
        }
        let _ = p;
        Ok(())
    }

    /// `Err(Crashed)` once a crash point fired.
    #[inline]
    fn alive(&self) -> Result<(), RingError> {
        #[cfg(any(test, feature = "crash-points"))]
        if let Some(at) = self.crashed {
            return Err(RingError::Crashed(at));
        }
        Ok(())
    }

    /// The mailbox flags (`TCMU_MAILBOX_FLAG_CAP_*` in [`layout`]).
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// The ring's size in bytes (`cmdr_size`).
    pub fn ring_size(&self) -> u32 {
        self.cmdr_size
    }

    /// Ring offset of the next entry [`Ring::fetch`] will look at.
    pub fn fetch_pos(&self) -> u32 {
        self.fetch_pos
    }

    /// Ring offset last stored into `cmd_tail`.
    pub fn tail(&self) -> u32 {
        self.tail
    }

    /// Commands fetched (including [`Fetched::Invalid`] ones) and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The ids of the commands counted by [`Ring::in_flight`], sorted.
    pub fn in_flight_ids(&self) -> Vec<u16> {
        let mut ids: Vec<u16> = self.in_flight.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Commands completed through [`Ring::complete`] whose response is not on the ring yet
    /// because an older command is still running (only without `CAP_OOOC`), sorted.
    pub fn awaiting_older_ids(&self) -> Vec<u16> {
        let mut ids: Vec<u16> = self.done.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Whether `cmd_tail` moved since the last call. When true, the runtime notifies the kernel
    /// (a 4-byte write to the UIO fd); one notification covers a whole batch of completions.
    pub fn take_tail_moved(&mut self) -> bool {
        std::mem::take(&mut self.tail_moved)
    }

    /// Fetches the next entry between the fetch position and `cmd_head`, skipping PAD entries.
    ///
    /// `Ok(None)`: nothing new. `Err`: the ring is unusable (a broken index or header); calling
    /// again returns the same error, and completions of commands already fetched still work.
    pub fn fetch(&mut self) -> Result<Option<Fetched>, RingError> {
        self.alive()?;
        loop {
            let pos = self.fetch_pos;
            // Acquire: the kernel writes an entry completely and only then stores the new head.
            // Loading the head with Acquire keeps our reads of the entry below from being
            // performed before this load, so they see everything the kernel wrote before the
            // head we observed (a plain load would let weakly ordered CPUs read stale entry
            // bytes: the aarch64 bug tcmu-runner once had).
            let head = self.mailbox_word(MB_CMD_HEAD).load(Ordering::Acquire);
            if head >= self.cmdr_size || head % TCMU_OP_ALIGN_SIZE != 0 {
                return Err(corrupt(
                    pos,
                    format!("cmd_head {head} is not an 8-aligned offset inside the ring"),
                ));
            }
            if head == pos {
                return Ok(None);
            }
            let size = u64::from(self.cmdr_size);
            let published = (u64::from(head) + size - u64::from(pos)) % size;
            let map_off = self.cmdr_off + pos as usize;

            // The header is read once; its length, type and id are never re-read.
            let mut hdr = [0u8; TCMU_HDR_SIZE];
            if !read_shared(&self.map, map_off, &mut hdr) {
                return Err(corrupt(pos, "entry header outside the mapping"));
            }
            let len_op = rd_u32(&hdr, HDR_LEN_OP).ok_or_else(|| corrupt(pos, "short header"))?;
            let cmd_id = rd_u16(&hdr, HDR_CMD_ID).ok_or_else(|| corrupt(pos, "short header"))?;
            // Masking the type bits off leaves a multiple of 8: the length is aligned by
            // construction, so only zero and out-of-range lengths can be wrong.
            let len = len_op & !TCMU_OP_MASK;
            let op = len_op & TCMU_OP_MASK;
            if len == 0 {
                return Err(corrupt(pos, "entry length 0"));
            }
            if len > self.cmdr_size - pos {
                return Err(corrupt(
                    pos,
                    format!("entry of {len} bytes runs past the end of the ring"),
                ));
            }
            if u64::from(len) > published {
                return Err(corrupt(
                    pos,
                    format!("entry of {len} bytes extends beyond cmd_head {head}"),
                ));
            }
            let next = (pos + len) % self.cmdr_size;

            match op {
                TCMU_OP_PAD => self.pass_entry(pos, len, next)?,
                TCMU_OP_TMR => {
                    let entry = self.copy_entry(pos, len, &hdr)?;
                    let (tmr_type, cmd_ids, clipped) = parse_tmr(&entry).ok_or_else(|| {
                        corrupt(pos, format!("TMR entry of {len} bytes is too short"))
                    })?;
                    if clipped {
                        tracing::warn!(
                            pos,
                            len,
                            kept = cmd_ids.len(),
                            "TMR entry claims more command ids than it holds; using those it holds"
                        );
                    }
                    // Nothing to answer: the tail passes the entry as soon as everything older
                    // is done (possibly right now).
                    self.pass_entry(pos, len, next)?;
                    return Ok(Some(Fetched::Tmr(TmrEntry { tmr_type, cmd_ids })));
                }
                TCMU_OP_CMD => {
                    if (len as usize) < TCMU_CMD_ENTRY_MIN_SIZE {
                        return Err(corrupt(
                            pos,
                            format!(
                                "CMD entry of {len} bytes cannot hold a response \
                                 ({TCMU_CMD_ENTRY_MIN_SIZE} bytes)"
                            ),
                        ));
                    }
                    if self.in_flight.contains_key(&cmd_id) || self.done.contains_key(&cmd_id) {
                        return Err(corrupt(
                            pos,
                            format!("cmd_id {cmd_id} is already in flight"),
                        ));
                    }
                    if self.journal.as_ref().is_some_and(|j| j.free.is_empty()) {
                        // Every journal slot is taken: leave the command in the ring until one
                        // frees (the runtime fetches again after each completion).
                        return Ok(None);
                    }
                    let entry = self.copy_entry(pos, len, &hdr)?;
                    let fetched = match parse_cmd(&entry, map_off as u64, self.data) {
                        Ok(req) => self.claim(cmd_id, req),
                        Err(why) => Err(why),
                    };
                    let fetched = match fetched {
                        Ok(cmd) => Fetched::Cmd(cmd),
                        Err(why) => {
                            self.in_flight.insert(
                                cmd_id,
                                InFlight {
                                    guard: Weak::new(),
                                    ranges: Vec::new(),
                                },
                            );
                            Fetched::Invalid { cmd_id, why }
                        }
                    };
                    self.journal_fetch(pos, next, cmd_id, &fetched)?;
                    self.slots.push_back(Slot {
                        off: pos,
                        len,
                        cmd_id: Some(cmd_id),
                    });
                    self.fetch_pos = next;
                    self.crash_point(CrashPoint::FetchCommitted)?;
                    return Ok(Some(fetched));
                }
                other => {
                    return Err(corrupt(pos, format!("unknown entry type {other}")));
                }
            }
        }
    }

    /// Completes the in-flight command `cmd_id` with `c`.
    ///
    /// With `CAP_OOOC` the response goes at once into the oldest unfinished CMD slot, and
    /// `cmd_tail` moves past it and past any PAD/TMR entries already fetched behind it. Without
    /// it, the response waits until every older command is completed. Errors (an id not in
    /// flight, or whose buffers are still alive) leave the ring untouched.
    pub fn complete(&mut self, cmd_id: u16, c: &Completion<'_>) -> Result<(), RingError> {
        self.alive()?;
        let inf = self
            .in_flight
            .get(&cmd_id)
            .ok_or(RingError::NotInFlight(cmd_id))?;
        if inf.guard.strong_count() > 0 {
            return Err(RingError::BuffersInUse(cmd_id));
        }
        // Acquire pairs with the Release decrement of the last buffer's Arc (perhaps dropped on
        // another thread): every write made through the command's buffers happens before the
        // response below, and so before the Release store of cmd_tail that lets the kernel read
        // the data-in bytes.
        fence(Ordering::Acquire);
        if let Some(inf) = self.in_flight.remove(&cmd_id) {
            for start in inf.ranges {
                self.ranges.remove(&start);
            }
        }
        let mut sense = [0u8; TCMU_SENSE_BUFFERSIZE];
        for (dst, src) in sense.iter_mut().zip(c.sense) {
            *dst = *src;
        }
        let read_len = c
            .read_len
            .filter(|_| self.flags & TCMU_MAILBOX_FLAG_CAP_READ_LEN != 0);
        let resp = Response {
            status: c.status,
            read_len,
            sense,
        };
        if let Some(jr) = &self.journal
            && let Some(&slot) = jr.slot_of.get(&cmd_id)
        {
            jr.j.write_response(slot, &resp);
        }
        self.done.insert(cmd_id, resp);
        self.crash_point(CrashPoint::ResponseJournaled)?;
        self.retire()
    }

    /// Drops `cmd` (and so its data buffers), then completes it.
    pub fn complete_command(
        &mut self,
        cmd: RingCommand,
        c: &Completion<'_>,
    ) -> Result<(), RingError> {
        let cmd_id = cmd.cmd_id;
        drop(cmd);
        self.complete(cmd_id, c)
    }

    /// Fetches past the PAD or TMR entry of `len` bytes at `pos` (the next entry being at
    /// `next`), which needs no answer: records its slot, moves the fetch position (journaled
    /// before the tail can pass the entry), and lets the tail pass it once everything older is
    /// done.
    fn pass_entry(&mut self, pos: u32, len: u32, next: u32) -> Result<(), RingError> {
        self.slots.push_back(Slot {
            off: pos,
            len,
            cmd_id: None,
        });
        self.fetch_pos = next;
        if let Some(jr) = &self.journal {
            jr.j.set_fetch(next, None);
        }
        self.retire()
    }

    /// Journals a fetched CMD entry at `pos` (the next entry being at `next`): pending marker,
    /// slot, then the committed fetch position. See [`journal`] for why in this order.
    fn journal_fetch(
        &mut self,
        pos: u32,
        next: u32,
        cmd_id: u16,
        fetched: &Fetched,
    ) -> Result<(), RingError> {
        let Some(slot) = self.journal.as_mut().and_then(|jr| jr.free.pop()) else {
            return Ok(());
        };
        if let Some(jr) = &self.journal {
            jr.j.set_fetch(pos, Some(slot));
        }
        self.crash_point(CrashPoint::FetchPending)?;
        let req = match fetched {
            Fetched::Cmd(c) => JournalRequest {
                cmd_id,
                invalid: false,
                cdb: &c.cdb,
                iovecs: &c.iovecs,
                bidi_iovecs: &c.bidi_iovecs,
            },
            Fetched::Invalid { .. } | Fetched::Tmr(_) => JournalRequest {
                cmd_id,
                invalid: true,
                cdb: &[],
                iovecs: &[],
                bidi_iovecs: &[],
            },
        };
        if let Some(jr) = &mut self.journal {
            jr.j.write_request(slot, &req);
            jr.slot_of.insert(cmd_id, slot);
        }
        self.crash_point(CrashPoint::FetchJournaled)?;
        if let Some(jr) = &self.journal {
            jr.j.set_fetch(next, None);
        }
        Ok(())
    }

    /// Writes the responses that may go to the ring now and moves the tail past them and past
    /// the PAD/TMR entries that follow, never beyond the fetch position.
    ///
    /// With a journal, each response's journal slot is marked completing-at-tail (with the ring
    /// slot it goes into) before the response is written, and freed only after the tail store.
    fn retire(&mut self) -> Result<(), RingError> {
        let ooo = self.flags & TCMU_MAILBOX_FLAG_CAP_OOOC != 0;
        let old_tail = self.tail;
        let mut finished: Vec<u16> = Vec::new();
        while let Some(slot) = self.slots.front().copied() {
            if let Some(owner) = slot.cmd_id {
                let chosen = if self.done.contains_key(&owner) {
                    Some(owner)
                } else if ooo {
                    self.done.keys().next().copied()
                } else {
                    None
                };
                let Some((id, resp)) = chosen.and_then(|id| self.done.remove_entry(&id)) else {
                    break;
                };
                if let Some(jr) = &mut self.journal
                    && let Some(js) = jr.slot_of.remove(&id)
                {
                    jr.j.mark_completing(js, slot.off);
                    finished.push(js);
                }
                self.crash_point(CrashPoint::CompletingMarked)?;
                self.write_response(slot, id, &resp);
                self.crash_point(CrashPoint::ResponseWritten)?;
            }
            self.slots.pop_front();
            // Slots never wrap, so `off + len <= cmdr_size`.
            self.tail = (slot.off + slot.len) % self.cmdr_size;
        }
        if self.tail != old_tail {
            // Release: the responses written above (and, through the fence in `complete`, the
            // data-in bytes) are visible to the kernel before it can observe the new tail.
            self.mailbox_word(MB_CMD_TAIL)
                .store(self.tail, Ordering::Release);
            self.tail_moved = true;
            self.crash_point(CrashPoint::TailStored)?;
        }
        if !finished.is_empty() {
            // The kernel has these now: free their journal slots before the tail can move again
            // (a completing marker left behind could later look "not done").
            for js in finished {
                if let Some(jr) = &mut self.journal {
                    jr.j.set_state(js, journal::FREE);
                    jr.free.push(js);
                }
                self.crash_point(CrashPoint::SlotReleased)?;
            }
            if let Some(jr) = &self.journal {
                jr.j.set_tail(self.tail);
            }
        }
        Ok(())
    }

    /// Writes `resp` for command `id` into `slot`, keeping the slot's `len_op` and `kflags`.
    fn write_response(&self, slot: Slot, id: u16, resp: &Response) {
        let base = self.cmdr_off + slot.off as usize;
        let mut rsp = [0u8; TCMU_CMD_ENTRY_MIN_SIZE - RSP_SCSI_STATUS];
        let mut put = |off: usize, bytes: &[u8]| {
            let at = off - RSP_SCSI_STATUS;
            if let Some(dst) = rsp.get_mut(at..at + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        };
        put(RSP_SCSI_STATUS, &[resp.status]);
        put(RSP_READ_LEN, &resp.read_len.unwrap_or(0).to_ne_bytes());
        put(RSP_SENSE_BUFFER, &resp.sense);
        let uflags = if resp.read_len.is_some() {
            TCMU_UFLAG_READ_LEN
        } else {
            0
        };
        // The slot was validated at fetch time (at least TCMU_CMD_ENTRY_MIN_SIZE bytes, inside
        // the ring), so these writes cannot fail; a failure would only mean a lost response.
        let ok = write_shared(&self.map, base + HDR_CMD_ID, &id.to_ne_bytes())
            && write_shared(&self.map, base + HDR_UFLAGS, &[uflags])
            && write_shared(&self.map, base + RSP_SCSI_STATUS, &rsp);
        if !ok {
            tracing::error!(
                pos = slot.off,
                cmd_id = id,
                "response slot outside the mapping"
            );
        }
    }

    /// Copies the entry at ring offset `pos` out of shared memory: the header already read, then
    /// the rest, each byte read once.
    fn copy_entry(&self, pos: u32, len: u32, hdr: &[u8]) -> Result<Vec<u8>, RingError> {
        let mut entry = vec![0u8; len as usize];
        let (head, rest) = entry.split_at_mut(TCMU_HDR_SIZE.min(len as usize));
        for (dst, src) in head.iter_mut().zip(hdr) {
            *dst = *src;
        }
        if !read_shared(
            &self.map,
            self.cmdr_off + pos as usize + TCMU_HDR_SIZE,
            rest,
        ) {
            return Err(corrupt(pos, "entry outside the mapping"));
        }
        Ok(entry)
    }

    /// Reserves the command's data segments (refusing overlaps with any in-flight command's
    /// segments, or with each other) and builds its buffers.
    fn claim(&mut self, cmd_id: u16, req: layout::CmdRequest) -> Result<RingCommand, String> {
        let mut reserved: Vec<u64> = Vec::new();
        for iov in req.iovecs.iter().chain(&req.bidi_iovecs) {
            if iov.len == 0 {
                continue;
            }
            let end = iov.base.saturating_add(iov.len);
            let clash = self
                .ranges
                .range(..end)
                .next_back()
                .filter(|(_, other_end)| **other_end > iov.base)
                .map(|(s, e)| (*s, *e));
            if let Some((s, e)) = clash {
                for start in reserved {
                    self.ranges.remove(&start);
                }
                return Err(format!(
                    "iovec [{:#x}, {end:#x}) overlaps data [{s:#x}, {e:#x}) of an in-flight command",
                    iov.base
                ));
            }
            self.ranges.insert(iov.base, end);
            reserved.push(iov.base);
        }
        let guard = Arc::new(CmdGuard {
            _map: Arc::clone(&self.map),
        });
        let owner: Arc<dyn BufOwner> = guard.clone();
        let data = self.data_buf(&req.iovecs, &owner);
        let bidi_in =
            (!req.bidi_iovecs.is_empty()).then(|| self.data_buf(&req.bidi_iovecs, &owner));
        self.in_flight.insert(
            cmd_id,
            InFlight {
                guard: Arc::downgrade(&guard),
                ranges: reserved,
            },
        );
        Ok(RingCommand {
            cmd_id,
            cdb: req.cdb,
            data,
            bidi_in,
            iovecs: req.iovecs,
            bidi_iovecs: req.bidi_iovecs,
        })
    }

    fn data_buf(&self, iovecs: &[IoVec], owner: &Arc<dyn BufOwner>) -> DataBuf {
        let base = self.map.as_ptr();
        let segs: Vec<(NonNull<u8>, usize)> = iovecs
            .iter()
            .filter(|v| v.len > 0)
            .filter_map(|v| {
                let off = usize::try_from(v.base).ok()?;
                let len = usize::try_from(v.len).ok()?;
                // SAFETY: `parse_cmd` checked `base + len <= data.end == map.len()`, so the
                // offset stays inside the mapping's allocation.
                let p = unsafe { base.add(off) };
                Some((NonNull::new(p)?, len))
            })
            .collect();
        // SAFETY: the contract of `DataBuf::from_raw` holds:
        // - valid for reads and writes while `owner` lives: every segment lies inside the data
        //   area of the mapping (checked by `parse_cmd`), which is mapped read-write and stays
        //   mapped while `owner` (holding an `Arc<Mapping>`) lives;
        // - no overlap: `claim` reserved these segments against every segment of every in-flight
        //   command and against each other; a command's segments stay reserved until
        //   `complete`, which refuses to run while any buffer of the command exists, so no live
        //   buffer overlaps another;
        // - nothing else accesses the memory while the buffer exists: the kernel leaves a
        //   command's data pages alone until the command is completed, `complete` cannot run
        //   while the buffer exists, and this engine never touches the data area itself. The
        //   `data` and `bidi_in` buffers of one command get disjoint iovec lists.
        unsafe { DataBuf::from_raw(&segs, Arc::clone(owner)) }
    }

    /// One of the mailbox's two index words as an atomic.
    fn mailbox_word(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off == MB_CMD_HEAD || off == MB_CMD_TAIL);
        // SAFETY: `off` is 12 or 64, so the word lies inside the 128-byte mailbox, which `new`
        // checked is inside the mapping; the mapping is page-aligned so the word is 4-aligned;
        // the memory stays mapped while `self` (holding the Arc) lives, which bounds the returned
        // reference. The engine accesses these two words only atomically. The kernel accesses
        // them with single aligned 32-bit loads and stores (READ_ONCE/WRITE_ONCE-style), which
        // is the shared-memory convention atomics interoperate with.
        unsafe { AtomicU32::from_ptr(self.map.as_ptr().add(off).cast::<u32>()) }
    }
}

/// Copies `dst.len()` bytes at `off` of the mapping into `dst`; false (and nothing read) when the
/// range is not inside the mapping. Each byte is read exactly once.
fn read_shared(map: &Mapping, off: usize, dst: &mut [u8]) -> bool {
    if off.checked_add(dst.len()).is_none_or(|end| end > map.len()) {
        return false;
    }
    // SAFETY: `[off, off + dst.len())` is inside the mapping (checked above), which is readable
    // and mapped while `map` is borrowed. Volatile reads because another party may write the
    // memory; the protocol makes sure it does not write the bytes we read (the kernel does not
    // touch entries between the tail and the head), and if it misbehaves, each byte is still read
    // once into local memory and validated there.
    unsafe {
        let src = map.as_ptr().add(off);
        for (i, b) in dst.iter_mut().enumerate() {
            *b = std::ptr::read_volatile(src.add(i));
        }
    }
    true
}

/// Writes `src` at `off` of the mapping; false (and nothing written) when it does not fit.
fn write_shared(map: &Mapping, off: usize, src: &[u8]) -> bool {
    if off.checked_add(src.len()).is_none_or(|end| end > map.len()) {
        return false;
    }
    // SAFETY: in bounds as checked; the engine only writes response bytes of ring slots that
    // userspace owns (between the tail and the fetch position), which the kernel does not read
    // until the Release store of cmd_tail that follows.
    unsafe {
        let dst = map.as_ptr().add(off);
        for (i, b) in src.iter().enumerate() {
            std::ptr::write_volatile(dst.add(i), *b);
        }
    }
    true
}
