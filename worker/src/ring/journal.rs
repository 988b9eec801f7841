//! # The in-flight journal: what a worker has taken off the ring and not yet finished
//!
//! ## Why
//! The command ring alone does not say what was in flight when a worker dies. With out-of-order
//! completion, finishing command X writes X's response into the oldest unfinished slot (at
//! `cmd_tail`), which may be the slot of a command Y that is still running. After a crash, Y's
//! request may be overwritten behind the tail while X's request still sits ahead of it although
//! X is done. Replaying from `cmd_tail` would complete X twice (the kernel then marks the ring
//! broken) and lose Y. So the ring engine keeps this journal, in a shared-memory file that the
//! supervisor creates (one per device, kept under `/run` so it outlives the worker and the
//! supervisor process) and hands over with the device.
//!
//! ## What it records
//! - the worker's **fetch position** (ring offset of the next entry to fetch), together with a
//!   *pending* marker naming the journal slot being filled for the entry at that position;
//! - for every command fetched and not yet finished, one **slot**: the `cmd_id`, a copy of the
//!   CDB and of the iovecs (up to [`MAX_JOURNAL_IOVECS`]; a command with more is marked
//!   `OVERFLOW` and answered BUSY if it must be recovered), and once the command has run, its
//!   **response** (status, sense, residual);
//! - a **completing-at-tail marker**: before the response of command X is written into the ring
//!   slot at offset S, X's journal slot records S. The tail advance that hands the response to
//!   the kernel is one atomic store, so on recovery X is done if and only if the kernel's tail
//!   has moved past S, i.e. S is no longer between `cmd_tail` and the fetch position.
//!
//! Slot states: `FREE` → (fetch) `FETCHED` → (response computed) `DONE` → (response written
//! into the ring at S) `COMPLETING(S)` → (tail moved past S) `FREE`.
//!
//! ## Write ordering, and why it is crash-consistent
//! Only the ring thread writes the journal, and only in this order:
//! 1. fetch: store the fetch word `(pos, pending = slot)`; write the slot's request and its
//!    checksum; Release-store `state = FETCHED`; store the fetch word `(next, no pending)`.
//! 2. response computed: write status, sense, residual and their checksum; Release-store
//!    `state = DONE`.
//! 3. before writing a response into ring slot S: write `rsp_off = S` (and its complement);
//!    Release-store `state = COMPLETING`; then write the response into the ring.
//! 4. after the Release store of `cmd_tail` past S: store `state = FREE` for each finished slot,
//!    then the informational tail word.
//!
//! The reader is a *later* process (the successor worker), reading after the writer died. A
//! killed process's stores are all eventually visible, and those it had not executed never
//! are; since every step's last store is a Release store (which keeps every earlier access of
//! the thread before it, at compile time and on the CPU) and the ring write in step 3 comes
//! after a compiler fence, the successor sees the journal as it was at *some point in program
//! order*. Every such point is consistent:
//! - a slot named by the fetch word's pending marker was never committed (its entry is
//!   re-fetched, as the fetch position was not advanced); without the marker, a slot whose
//!   state is `FETCHED` is in flight;
//! - a `COMPLETING(S)` slot whose S is still at or after the kernel's tail is not done (its
//!   response, journaled in step 2, is written again); otherwise the kernel has it, and the
//!   slot is simply freed — this is why step 4 frees slots before the tail can move again.
//!
//! This covers a process crash, not a power loss: the journal lives in shared memory (tmpfs),
//! which survives processes but not the machine, like the kernel's ring itself.
//!
//! ## Trust
//! Everything read from the journal on recovery is untrusted: a compromised worker may have
//! scribbled on it. The reader copies it to private memory once, then checks every field:
//! magic, version and the ring's identity (`cmdr_off`, `cmdr_size`, map length, flags) under a
//! header checksum; the fetch word under its own check bits; each live slot's request and
//! response under checksums; offsets, counts and lengths against the ring. Any inconsistency
//! makes recovery fail, and the supervisor falls back to resetting the ring.
//!
//! This module owns the journal's byte layout, its writes and the untrusted parse. It never
//! touches the command ring (the engine, `super`, decides what to write and when).

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, compiler_fence};

use super::layout::{SCSI_MAX_VARLEN_CDB_SIZE, TCMU_SENSE_BUFFERSIZE, rd_u16, rd_u32, rd_u64};
use super::{IoVec, Mapping};

/// Journal slots: the most commands in flight per device. When every slot is taken the engine
/// stops fetching (commands wait in the ring) until one frees. The kernel's default queue depth
/// is 128.
pub const JOURNAL_SLOTS: usize = 512;
/// Bytes per slot.
pub const SLOT_SIZE: usize = 1024;
/// Bytes of the header region before the first slot.
pub const HEADER_SIZE: usize = 1024;
/// Total size of a journal file.
pub const JOURNAL_LEN: usize = HEADER_SIZE + JOURNAL_SLOTS * SLOT_SIZE;
/// Most iovecs (data and bidi together) a slot holds; a command with more is journaled as
/// [`SlotFlags::OVERFLOW`] and cannot be re-executed after a crash (it is answered BUSY).
pub const MAX_JOURNAL_IOVECS: usize = (SLOT_SIZE - S_IOVECS) / 16;

const _: () = assert!(JOURNAL_LEN as u64 == tcmu_warden_proto::JOURNAL_BYTES);
const _: () = assert!(JOURNAL_SLOTS < u16::MAX as usize);
const _: () = assert!(S_IOVECS + 16 * MAX_JOURNAL_IOVECS <= SLOT_SIZE);
const _: () = assert!(MAX_JOURNAL_IOVECS >= 32);
const _: () = assert!(H_TAIL + 4 <= HEADER_SIZE);

/// `b"TCMUWJNL"`.
pub const MAGIC: [u8; 8] = *b"TCMUWJNL";
/// Layout version.
pub const VERSION: u32 = 1;

// Header offsets.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_SLOTS: usize = 12;
const H_SLOT_SIZE: usize = 16;
const H_SUM: usize = 20;
const H_MAP_LEN: usize = 24;
const H_CMDR_OFF: usize = 32;
const H_CMDR_SIZE: usize = 36;
const H_FLAGS: usize = 40;
const H_GENERATION: usize = 48;
const H_FETCH: usize = 56;
const H_TAIL: usize = 64;

// Slot offsets.
const S_STATE: usize = 0;
const S_CMD_ID: usize = 4;
const S_FLAGS: usize = 6;
const S_CDB_LEN: usize = 8;
const S_N_IOV: usize = 10;
const S_N_BIDI: usize = 12;
const S_RSP_FLAGS: usize = 14;
const S_STATUS: usize = 15;
const S_READ_LEN: usize = 16;
const S_RSP_OFF: usize = 20;
const S_RSP_OFF_CHECK: usize = 24;
const S_REQ_SUM: usize = 28;
const S_RSP_SUM: usize = 32;
const S_SENSE: usize = 40;
const S_CDB: usize = S_SENSE + TCMU_SENSE_BUFFERSIZE;
const S_IOVECS: usize = (S_CDB + SCSI_MAX_VARLEN_CDB_SIZE).next_multiple_of(16);

/// Slot state: unused.
pub const FREE: u32 = 0;
/// Slot state: fetched, not finished.
pub const FETCHED: u32 = 1;
/// Slot state: finished, its response journaled, not yet written into the ring.
pub const DONE: u32 = 2;
/// Slot state: its response is being written into the ring slot at `rsp_off`.
pub const COMPLETING: u32 = 3;

/// Flags of a journaled request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotFlags(pub u16);

impl SlotFlags {
    /// The entry was malformed ([`super::Fetched::Invalid`]); no CDB or iovecs are kept.
    pub const INVALID: u16 = 1;
    /// More iovecs than a slot holds; none are kept, so the command cannot be re-executed.
    pub const OVERFLOW: u16 = 2;
    const KNOWN: u16 = Self::INVALID | Self::OVERFLOW;
}

/// Errors of opening a journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The descriptor is not a journal-sized file.
    #[error("journal is {got} bytes, expected {JOURNAL_LEN}")]
    Size {
        /// Its size.
        got: u64,
    },
    /// `fstat` or `mmap` failed.
    #[error("journal: {0}")]
    Io(#[from] std::io::Error),
}

/// The ring's identity, recorded in the header so that a journal is never applied to another
/// ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingIdent {
    /// Length of the UIO mapping.
    pub map_len: u64,
    /// `cmdr_off`.
    pub cmdr_off: u32,
    /// `cmdr_size`.
    pub cmdr_size: u32,
    /// Mailbox flags.
    pub flags: u16,
}

/// A mapped journal file. See the module documentation.
#[derive(Debug)]
pub struct Journal {
    map: Arc<Mapping>,
}

/// FNV-1a over `parts`, seeded so that different fields never share a sum by accident.
fn sum(seed: u32, parts: &[&[u8]]) -> u32 {
    let mut h: u32 = 0x811c_9dc5 ^ seed;
    for part in parts {
        for &b in *part {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

const SEED_HEADER: u32 = 0x4844_5231;
const SEED_FETCH: u32 = 0x4645_5431;
const SEED_REQ: u32 = 0x5245_5131;
const SEED_RSP: u32 = 0x5253_5031;

/// Packs the fetch word: position, pending slot (+1, 0 = none) and 16 check bits.
fn fetch_word(pos: u32, pending: Option<u16>) -> u64 {
    let p = pending.map_or(0u16, |s| s.wrapping_add(1));
    let check = sum(SEED_FETCH, &[&pos.to_ne_bytes(), &p.to_ne_bytes()]);
    let check16 = (check ^ (check >> 16)) as u16;
    u64::from(pos) | (u64::from(p) << 32) | (u64::from(check16) << 48)
}

/// Unpacks a fetch word; `None` when its check bits do not match.
fn parse_fetch_word(w: u64) -> Option<(u32, Option<u16>)> {
    let pos = w as u32;
    let p = (w >> 32) as u16;
    let pending = p.checked_sub(1);
    (fetch_word(pos, pending) == w).then_some((pos, pending))
}

fn slot_base(slot: u16) -> usize {
    HEADER_SIZE + usize::from(slot) * SLOT_SIZE
}

impl Journal {
    /// Maps the journal file `fd` (shared, read-write). It must be exactly [`JOURNAL_LEN`]
    /// bytes long.
    pub fn map(fd: BorrowedFd<'_>) -> Result<Journal, JournalError> {
        let st = nix::sys::stat::fstat(fd).map_err(std::io::Error::from)?;
        let got = u64::try_from(st.st_size).unwrap_or(0);
        if got != JOURNAL_LEN as u64 {
            return Err(JournalError::Size { got });
        }
        let map = Mapping::map(fd, JOURNAL_LEN).map_err(|e| match e {
            super::RingError::Map { source, .. } => JournalError::Io(source),
            other => JournalError::Io(std::io::Error::other(other.to_string())),
        })?;
        Ok(Journal { map })
    }

    fn word32(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off % 4 == 0 && off + 4 <= JOURNAL_LEN);
        // SAFETY: every caller passes a 4-aligned offset of a u32 field inside the header or a
        // slot (constants above, slot < JOURNAL_SLOTS), so the word is inside the mapping, which
        // `map` checked is JOURNAL_LEN bytes and which is page-aligned; it stays mapped while
        // `self` lives, bounding the reference. Only this thread writes the journal, and it
        // accesses these words only atomically.
        unsafe { AtomicU32::from_ptr(self.map.as_ptr().add(off).cast::<u32>()) }
    }

    fn word64(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off % 8 == 0 && off + 8 <= JOURNAL_LEN);
        // SAFETY: as in `word32`, for the 8-aligned fetch word of the header.
        unsafe { AtomicU64::from_ptr(self.map.as_ptr().add(off).cast::<u64>()) }
    }

    /// Volatile copy of `src` to `off`; the caller passes in-bounds offsets (constants).
    fn put(&self, off: usize, src: &[u8]) {
        if off
            .checked_add(src.len())
            .is_none_or(|end| end > JOURNAL_LEN)
        {
            return;
        }
        // SAFETY: in bounds (checked); the journal is written by this thread only, and the
        // bytes written are never inside a word accessed atomically at the same time (the
        // atomic words have their own offsets).
        unsafe {
            let dst = self.map.as_ptr().add(off);
            for (i, b) in src.iter().enumerate() {
                std::ptr::write_volatile(dst.add(i), *b);
            }
        }
    }

    /// The journal copied into private memory: the header, and every slot whose state word is
    /// not `FREE` (free slots stay zero in the copy, which reads as `FREE`). Each byte is read at
    /// most once; the parse looks only at the copy.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![0u8; JOURNAL_LEN];
        self.copy_words(0, HEADER_SIZE, &mut out);
        for slot in 0..JOURNAL_SLOTS as u16 {
            let base = slot_base(slot);
            if self.word32(base + S_STATE).load(Ordering::Acquire) != FREE {
                self.copy_words(base, SLOT_SIZE, &mut out);
            }
        }
        out
    }

    /// Copies `[off, off + len)` of the journal into the same range of `out`, in aligned u64
    /// volatile reads (`off` and `len` multiples of 8).
    fn copy_words(&self, off: usize, len: usize, out: &mut [u8]) {
        const WORD: usize = std::mem::size_of::<u64>();
        let Some(dst) = out.get_mut(off..off.saturating_add(len)) else {
            return;
        };
        if off % WORD != 0 || off.saturating_add(len) > JOURNAL_LEN {
            return;
        }
        let src = self.map.as_ptr().cast::<u64>();
        for (i, chunk) in dst.chunks_exact_mut(WORD).enumerate() {
            // SAFETY: word `off / 8 + i` lies inside the JOURNAL_LEN-byte mapping (checked
            // above), which is page-aligned, so the u64 read is aligned. Volatile because a
            // misbehaving process might still write the file; what is read is validated later.
            let w = unsafe { std::ptr::read_volatile(src.add(off / WORD + i)) };
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
    }

    /// Writes a fresh journal for a ring whose tail (and fetch position) is `tail`: every slot
    /// free, the identity, generation 1. The magic goes last, so a crash during this leaves no
    /// valid journal (and recovery falls back to a ring reset).
    pub fn init(&self, ident: RingIdent, tail: u32) {
        self.put(H_MAGIC, &[0u8; 8]);
        compiler_fence(Ordering::SeqCst);
        for slot in 0..JOURNAL_SLOTS as u16 {
            self.word32(slot_base(slot) + S_STATE)
                .store(FREE, Ordering::Relaxed);
        }
        let mut hdr = [0u8; 48];
        hdr[H_VERSION..H_VERSION + 4].copy_from_slice(&VERSION.to_ne_bytes());
        hdr[H_SLOTS..H_SLOTS + 4].copy_from_slice(&(JOURNAL_SLOTS as u32).to_ne_bytes());
        hdr[H_SLOT_SIZE..H_SLOT_SIZE + 4].copy_from_slice(&(SLOT_SIZE as u32).to_ne_bytes());
        hdr[H_MAP_LEN..H_MAP_LEN + 8].copy_from_slice(&ident.map_len.to_ne_bytes());
        hdr[H_CMDR_OFF..H_CMDR_OFF + 4].copy_from_slice(&ident.cmdr_off.to_ne_bytes());
        hdr[H_CMDR_SIZE..H_CMDR_SIZE + 4].copy_from_slice(&ident.cmdr_size.to_ne_bytes());
        hdr[H_FLAGS..H_FLAGS + 4].copy_from_slice(&u32::from(ident.flags).to_ne_bytes());
        hdr[H_MAGIC..H_MAGIC + 8].copy_from_slice(&MAGIC);
        let s = header_sum(&hdr);
        hdr[H_SUM..H_SUM + 4].copy_from_slice(&s.to_ne_bytes());
        self.put(H_VERSION, hdr.get(H_VERSION..).unwrap_or_default());
        self.word64(H_GENERATION).store(1, Ordering::Relaxed);
        self.set_fetch(tail, None);
        self.set_tail(tail);
        // Release: everything above is in place before the magic makes the journal valid.
        std::sync::atomic::fence(Ordering::Release);
        self.put(H_MAGIC, &MAGIC);
        compiler_fence(Ordering::SeqCst);
    }

    /// Stores the fetch word.
    pub(crate) fn set_fetch(&self, pos: u32, pending: Option<u16>) {
        self.word64(H_FETCH)
            .store(fetch_word(pos, pending), Ordering::Release);
    }

    /// Stores the informational tail word.
    pub(crate) fn set_tail(&self, tail: u32) {
        self.word32(H_TAIL).store(tail, Ordering::Release);
    }

    /// Adds one to the generation (each worker that takes the journal over).
    pub(crate) fn bump_generation(&self, to: u64) {
        self.word64(H_GENERATION).store(to, Ordering::Release);
    }

    /// Journals a fetched request into `slot` and makes it live (`FETCHED`). The caller stored
    /// the pending fetch word before and commits the new fetch position after.
    pub(crate) fn write_request(&self, slot: u16, req: &JournalRequest<'_>) {
        let base = slot_base(slot);
        let (flags, iovs, n_iov, n_bidi) = request_shape(req);
        let cdb: &[u8] = if flags & SlotFlags::INVALID != 0 {
            &[]
        } else {
            req.cdb
        };
        let cdb = cdb
            .get(..cdb.len().min(SCSI_MAX_VARLEN_CDB_SIZE))
            .unwrap_or_default();
        let cdb_len = cdb.len() as u16;
        self.put(base + S_CMD_ID, &req.cmd_id.to_ne_bytes());
        self.put(base + S_FLAGS, &flags.to_ne_bytes());
        self.put(base + S_CDB_LEN, &cdb_len.to_ne_bytes());
        self.put(base + S_N_IOV, &n_iov.to_ne_bytes());
        self.put(base + S_N_BIDI, &n_bidi.to_ne_bytes());
        self.put(base + S_CDB, cdb);
        let mut iov_bytes = Vec::with_capacity(iovs.len() * 16);
        for v in &iovs {
            iov_bytes.extend_from_slice(&v.base.to_ne_bytes());
            iov_bytes.extend_from_slice(&v.len.to_ne_bytes());
        }
        self.put(base + S_IOVECS, &iov_bytes);
        let s = req_sum(req.cmd_id, flags, cdb, n_iov, n_bidi, &iov_bytes);
        self.put(base + S_REQ_SUM, &s.to_ne_bytes());
        // Release: the request above is complete before the slot is seen live.
        self.word32(base + S_STATE)
            .store(FETCHED, Ordering::Release);
    }

    /// Journals the response of the command in `slot` (`DONE`).
    pub(crate) fn write_response(&self, slot: u16, resp: &JournalResponse) {
        let base = slot_base(slot);
        let rsp_flags = u8::from(resp.read_len.is_some());
        let read_len = resp.read_len.unwrap_or(0);
        self.put(base + S_RSP_FLAGS, &[rsp_flags, resp.status]);
        self.put(base + S_READ_LEN, &read_len.to_ne_bytes());
        self.put(base + S_SENSE, &resp.sense);
        let s = rsp_sum(rsp_flags, resp.status, read_len, &resp.sense);
        self.put(base + S_RSP_SUM, &s.to_ne_bytes());
        self.word32(base + S_STATE).store(DONE, Ordering::Release);
    }

    /// Marks the command in `slot` as having its response written into the ring slot at
    /// `rsp_off` (`COMPLETING`). Must come before the ring write; see the module documentation.
    pub(crate) fn mark_completing(&self, slot: u16, rsp_off: u32) {
        let base = slot_base(slot);
        self.put(base + S_RSP_OFF, &rsp_off.to_ne_bytes());
        self.put(base + S_RSP_OFF_CHECK, &(!rsp_off).to_ne_bytes());
        self.word32(base + S_STATE)
            .store(COMPLETING, Ordering::Release);
        // The ring write that follows must not be moved before the state store by the
        // compiler: a crash between them must never leave a written response unjournaled.
        compiler_fence(Ordering::SeqCst);
    }

    /// Sets a slot's state (freeing a slot, or turning `COMPLETING` back into `DONE`).
    pub(crate) fn set_state(&self, slot: u16, state: u32) {
        self.word32(slot_base(slot) + S_STATE)
            .store(state, Ordering::Release);
    }
}

fn header_sum(hdr: &[u8]) -> u32 {
    sum(
        SEED_HEADER,
        &[
            hdr.get(..H_SUM).unwrap_or_default(),
            hdr.get(H_SUM + 4..H_GENERATION).unwrap_or_default(),
        ],
    )
}

fn req_sum(cmd_id: u16, flags: u16, cdb: &[u8], n_iov: u16, n_bidi: u16, iovs: &[u8]) -> u32 {
    sum(
        SEED_REQ,
        &[
            &cmd_id.to_ne_bytes(),
            &flags.to_ne_bytes(),
            &(cdb.len() as u16).to_ne_bytes(),
            &n_iov.to_ne_bytes(),
            &n_bidi.to_ne_bytes(),
            cdb,
            iovs,
        ],
    )
}

fn rsp_sum(rsp_flags: u8, status: u8, read_len: u32, sense: &[u8]) -> u32 {
    sum(
        SEED_RSP,
        &[&[rsp_flags, status], &read_len.to_ne_bytes(), sense],
    )
}

/// What [`Journal::write_request`] records.
#[derive(Debug)]
pub(crate) struct JournalRequest<'a> {
    pub cmd_id: u16,
    pub invalid: bool,
    pub cdb: &'a [u8],
    pub iovecs: &'a [IoVec],
    pub bidi_iovecs: &'a [IoVec],
}

/// The iovecs to store, the flags and the counts: `OVERFLOW` (and nothing stored) when they do
/// not fit.
fn request_shape(req: &JournalRequest<'_>) -> (u16, Vec<IoVec>, u16, u16) {
    if req.invalid {
        return (SlotFlags::INVALID, Vec::new(), 0, 0);
    }
    let total = req.iovecs.len() + req.bidi_iovecs.len();
    if total > MAX_JOURNAL_IOVECS {
        return (SlotFlags::OVERFLOW, Vec::new(), 0, 0);
    }
    let all: Vec<IoVec> = req.iovecs.iter().chain(req.bidi_iovecs).copied().collect();
    (
        0,
        all,
        req.iovecs.len() as u16,
        req.bidi_iovecs.len() as u16,
    )
}

/// A response as journaled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JournalResponse {
    pub status: u8,
    pub read_len: Option<u32>,
    pub sense: [u8; TCMU_SENSE_BUFFERSIZE],
}

// ---- the untrusted parse --------------------------------------------------------------------

/// A journal snapshot, parsed and checked field by field (but not yet against the ring).
#[derive(Debug)]
pub(crate) struct Parsed {
    pub generation: u64,
    pub fetch_pos: u32,
    pub pending: Option<u16>,
    pub slots: Vec<ParsedSlot>,
}

/// One live slot.
#[derive(Debug, Clone)]
pub(crate) struct ParsedSlot {
    pub index: u16,
    pub cmd_id: u16,
    pub state: LiveState,
    pub flags: u16,
    pub cdb: Vec<u8>,
    pub iovecs: Vec<IoVec>,
    pub bidi_iovecs: Vec<IoVec>,
}

/// The state of a live slot, with what each state carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LiveState {
    Fetched,
    Done(JournalResponse),
    Completing(JournalResponse, u32),
}

/// Parses and checks a snapshot taken by [`Journal::snapshot`] against the ring's identity.
/// Every failure says what was wrong.
pub(crate) fn parse(snap: &[u8], ident: RingIdent) -> Result<Parsed, String> {
    if snap.len() != JOURNAL_LEN {
        return Err(format!("snapshot of {} bytes", snap.len()));
    }
    let hdr = snap.get(..H_GENERATION).ok_or("short header")?;
    if hdr.get(H_MAGIC..H_MAGIC + 8) != Some(&MAGIC[..]) {
        return Err("no journal magic (never initialised, or overwritten)".into());
    }
    let stored = rd_u32(snap, H_SUM).ok_or("short header")?;
    if stored != header_sum(hdr) {
        return Err("header checksum mismatch".into());
    }
    let field = |off| rd_u32(snap, off).ok_or_else(|| "short header".to_string());
    if field(H_VERSION)? != VERSION {
        return Err(format!("layout version {}", field(H_VERSION)?));
    }
    if field(H_SLOTS)? != JOURNAL_SLOTS as u32 || field(H_SLOT_SIZE)? != SLOT_SIZE as u32 {
        return Err("slot geometry differs from this build".into());
    }
    let map_len = rd_u64(snap, H_MAP_LEN).ok_or("short header")?;
    let got = RingIdent {
        map_len,
        cmdr_off: field(H_CMDR_OFF)?,
        cmdr_size: field(H_CMDR_SIZE)?,
        flags: field(H_FLAGS)? as u16,
    };
    if got != ident || field(H_FLAGS)? > u32::from(u16::MAX) {
        return Err(format!(
            "journal belongs to another ring ({got:?}, this one is {ident:?})"
        ));
    }
    let generation = rd_u64(snap, H_GENERATION).ok_or("short header")?;
    let fw = rd_u64(snap, H_FETCH).ok_or("short header")?;
    let (fetch_pos, pending) =
        parse_fetch_word(fw).ok_or_else(|| format!("fetch word {fw:#018x} fails its check"))?;
    if let Some(p) = pending
        && usize::from(p) >= JOURNAL_SLOTS
    {
        return Err(format!("pending slot {p} out of range"));
    }
    let mut slots = Vec::new();
    for index in 0..JOURNAL_SLOTS as u16 {
        if pending == Some(index) {
            continue;
        }
        let base = slot_base(index);
        let raw = snap
            .get(base..base + SLOT_SIZE)
            .ok_or("slot outside the snapshot")?;
        if let Some(s) = parse_slot(raw, index)? {
            slots.push(s);
        }
    }
    Ok(Parsed {
        generation,
        fetch_pos,
        pending,
        slots,
    })
}

fn parse_slot(raw: &[u8], index: u16) -> Result<Option<ParsedSlot>, String> {
    let bad = |why: &str| format!("slot {index}: {why}");
    let state = rd_u32(raw, S_STATE).ok_or_else(|| bad("short"))?;
    if state == FREE {
        return Ok(None);
    }
    if !(FETCHED..=COMPLETING).contains(&state) {
        return Err(bad(&format!("unknown state {state}")));
    }
    let u16_at = |off| rd_u16(raw, off).ok_or_else(|| bad("short"));
    let cmd_id = u16_at(S_CMD_ID)?;
    let flags = u16_at(S_FLAGS)?;
    let cdb_len = usize::from(u16_at(S_CDB_LEN)?);
    let n_iov = u16_at(S_N_IOV)?;
    let n_bidi = u16_at(S_N_BIDI)?;
    if flags & !SlotFlags::KNOWN != 0 || flags == SlotFlags::KNOWN {
        return Err(bad(&format!("flags {flags:#x}")));
    }
    if cdb_len > SCSI_MAX_VARLEN_CDB_SIZE {
        return Err(bad(&format!("CDB length {cdb_len}")));
    }
    let total = usize::from(n_iov) + usize::from(n_bidi);
    if total > MAX_JOURNAL_IOVECS
        || (flags != 0 && (total != 0 || (flags == SlotFlags::INVALID && cdb_len != 0)))
    {
        return Err(bad(&format!(
            "{n_iov}+{n_bidi} iovecs with flags {flags:#x}"
        )));
    }
    let cdb = raw
        .get(S_CDB..S_CDB + cdb_len)
        .ok_or_else(|| bad("CDB outside the slot"))?;
    let iov_bytes = raw
        .get(S_IOVECS..S_IOVECS + 16 * total)
        .ok_or_else(|| bad("iovecs outside the slot"))?;
    let stored = rd_u32(raw, S_REQ_SUM).ok_or_else(|| bad("short"))?;
    if stored != req_sum(cmd_id, flags, cdb, n_iov, n_bidi, iov_bytes) {
        return Err(bad("request checksum mismatch"));
    }
    if flags != SlotFlags::INVALID {
        let want = super::layout::scsi_command_size(cdb);
        if want != Some(cdb_len) {
            return Err(bad(&format!("CDB of {cdb_len} bytes for its opcode")));
        }
    }
    let mut all = Vec::with_capacity(total);
    for i in 0..total {
        let base = rd_u64(iov_bytes, 16 * i).ok_or_else(|| bad("short iovec"))?;
        let len = rd_u64(iov_bytes, 16 * i + 8).ok_or_else(|| bad("short iovec"))?;
        all.push(IoVec { base, len });
    }
    let bidi_iovecs = all.split_off(usize::from(n_iov));
    let live = match state {
        FETCHED => LiveState::Fetched,
        _ => {
            let rsp_flags = *raw.get(S_RSP_FLAGS).ok_or_else(|| bad("short"))?;
            let status = *raw.get(S_STATUS).ok_or_else(|| bad("short"))?;
            let read_len = rd_u32(raw, S_READ_LEN).ok_or_else(|| bad("short"))?;
            let sense_bytes = raw
                .get(S_SENSE..S_SENSE + TCMU_SENSE_BUFFERSIZE)
                .ok_or_else(|| bad("short"))?;
            let stored = rd_u32(raw, S_RSP_SUM).ok_or_else(|| bad("short"))?;
            if rsp_flags > 1 || stored != rsp_sum(rsp_flags, status, read_len, sense_bytes) {
                return Err(bad("response checksum mismatch"));
            }
            let mut sense = [0u8; TCMU_SENSE_BUFFERSIZE];
            sense.copy_from_slice(sense_bytes);
            let resp = JournalResponse {
                status,
                read_len: (rsp_flags == 1).then_some(read_len),
                sense,
            };
            if state == DONE {
                LiveState::Done(resp)
            } else {
                let off = rd_u32(raw, S_RSP_OFF).ok_or_else(|| bad("short"))?;
                let check = rd_u32(raw, S_RSP_OFF_CHECK).ok_or_else(|| bad("short"))?;
                if check != !off {
                    return Err(bad("completion offset fails its check"));
                }
                LiveState::Completing(resp, off)
            }
        }
    };
    Ok(Some(ParsedSlot {
        index,
        cmd_id,
        state: live,
        flags,
        cdb: cdb.to_vec(),
        iovecs: all,
        bidi_iovecs,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::memfd::{MFdFlags, memfd_create};
    use std::os::fd::AsFd;

    fn journal() -> (std::os::fd::OwnedFd, Journal) {
        let fd = memfd_create("j", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, JOURNAL_LEN as i64).unwrap();
        let j = Journal::map(fd.as_fd()).unwrap();
        (fd, j)
    }

    const IDENT: RingIdent = RingIdent {
        map_len: 1 << 20,
        cmdr_off: 128,
        cmdr_size: 65408,
        flags: 7,
    };

    #[test]
    fn wrong_size_is_refused() {
        let fd = memfd_create("j", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, 4096).unwrap();
        assert!(matches!(
            Journal::map(fd.as_fd()),
            Err(JournalError::Size { got: 4096 })
        ));
    }

    #[test]
    fn fetch_word_round_trips_and_detects_flips() {
        for (pos, pending) in [
            (0, None),
            (8, Some(0)),
            (65400, Some(511)),
            (u32::MAX, None),
        ] {
            let w = fetch_word(pos, pending);
            assert_eq!(parse_fetch_word(w), Some((pos, pending)));
            for bit in 0..64 {
                assert_eq!(parse_fetch_word(w ^ (1 << bit)), None, "bit {bit}");
            }
        }
    }

    #[test]
    fn fresh_journal_parses_empty_and_checks_identity() {
        let (_fd, j) = journal();
        assert!(parse(&j.snapshot(), IDENT).unwrap_err().contains("magic"));
        j.init(IDENT, 64);
        let p = parse(&j.snapshot(), IDENT).unwrap();
        assert_eq!((p.fetch_pos, p.pending, p.generation), (64, None, 1));
        assert!(p.slots.is_empty());
        let other = RingIdent {
            cmdr_size: 4096,
            ..IDENT
        };
        assert!(
            parse(&j.snapshot(), other)
                .unwrap_err()
                .contains("another ring")
        );
    }

    #[test]
    fn slots_round_trip_through_every_state() {
        let (_fd, j) = journal();
        j.init(IDENT, 0);
        let iovs = [IoVec {
            base: 70000,
            len: 4096,
        }];
        let cdb = [0x28u8, 0, 0, 0, 0, 1, 0, 0, 8, 0];
        j.set_fetch(0, Some(3));
        j.write_request(
            3,
            &JournalRequest {
                cmd_id: 42,
                invalid: false,
                cdb: &cdb,
                iovecs: &iovs,
                bidi_iovecs: &[],
            },
        );
        // Pending: the slot does not count yet.
        let p = parse(&j.snapshot(), IDENT).unwrap();
        assert_eq!(p.pending, Some(3));
        assert!(p.slots.is_empty());
        j.set_fetch(136, None);
        let p = parse(&j.snapshot(), IDENT).unwrap();
        assert_eq!(p.slots.len(), 1);
        let s = &p.slots[0];
        assert_eq!(
            (s.index, s.cmd_id, s.state.clone()),
            (3, 42, LiveState::Fetched)
        );
        assert_eq!(
            (s.cdb.as_slice(), s.iovecs.as_slice()),
            (&cdb[..], &iovs[..])
        );
        let mut sense = [0u8; TCMU_SENSE_BUFFERSIZE];
        sense[0] = 0x70;
        let resp = JournalResponse {
            status: 2,
            read_len: Some(512),
            sense,
        };
        j.write_response(3, &resp);
        assert_eq!(
            parse(&j.snapshot(), IDENT).unwrap().slots[0].state,
            LiveState::Done(resp.clone())
        );
        j.mark_completing(3, 0);
        assert_eq!(
            parse(&j.snapshot(), IDENT).unwrap().slots[0].state,
            LiveState::Completing(resp, 0)
        );
        j.set_state(3, FREE);
        assert!(parse(&j.snapshot(), IDENT).unwrap().slots.is_empty());
    }

    #[test]
    fn overflowing_and_invalid_requests_keep_no_iovecs() {
        let (_fd, j) = journal();
        j.init(IDENT, 0);
        let many: Vec<IoVec> = (0..MAX_JOURNAL_IOVECS as u64 + 1)
            .map(|i| IoVec {
                base: 70000 + 4096 * i,
                len: 4096,
            })
            .collect();
        j.write_request(
            0,
            &JournalRequest {
                cmd_id: 1,
                invalid: false,
                cdb: &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0],
                iovecs: &many,
                bidi_iovecs: &[],
            },
        );
        j.write_request(
            1,
            &JournalRequest {
                cmd_id: 2,
                invalid: true,
                cdb: &[],
                iovecs: &[],
                bidi_iovecs: &[],
            },
        );
        let p = parse(&j.snapshot(), IDENT).unwrap();
        assert_eq!(p.slots[0].flags, SlotFlags::OVERFLOW);
        assert!(p.slots[0].iovecs.is_empty());
        assert_eq!(p.slots[1].flags, SlotFlags::INVALID);
        assert!(p.slots[1].cdb.is_empty());
    }

    #[test]
    fn any_single_byte_change_in_a_live_slot_or_the_header_is_detected_or_harmless() {
        let (_fd, j) = journal();
        j.init(IDENT, 0);
        j.write_request(
            0,
            &JournalRequest {
                cmd_id: 9,
                invalid: false,
                cdb: &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0],
                iovecs: &[IoVec {
                    base: 70000,
                    len: 512,
                }],
                bidi_iovecs: &[],
            },
        );
        j.write_response(
            0,
            &JournalResponse {
                status: 0,
                read_len: None,
                sense: [0; TCMU_SENSE_BUFFERSIZE],
            },
        );
        let good = j.snapshot();
        let want = parse(&good, IDENT).unwrap();
        for off in (0..HEADER_SIZE).chain(HEADER_SIZE..HEADER_SIZE + SLOT_SIZE) {
            let mut snap = good.clone();
            snap[off] ^= 0x5a;
            if let Ok(p) = parse(&snap, IDENT) {
                // Only bytes nobody reads may change without notice (the generation, the
                // informational tail, padding, the unused tails of the CDB and iovec areas).
                assert_eq!(p.fetch_pos, want.fetch_pos, "offset {off}");
                assert_eq!(p.slots.len(), want.slots.len(), "offset {off}");
                assert_eq!(p.slots[0].cmd_id, 9, "offset {off}");
                assert_eq!(p.slots[0].state, want.slots[0].state, "offset {off}");
                assert_eq!(p.slots[0].cdb, want.slots[0].cdb, "offset {off}");
                assert_eq!(p.slots[0].iovecs, want.slots[0].iovecs, "offset {off}");
            }
        }
    }
}
