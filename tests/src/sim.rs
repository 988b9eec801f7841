//! # A userspace imitation of the kernel's side of a TCMU device
//!
//! [`KernelSim`] plays the part of `drivers/target/target_core_user.c` for tests: it owns a memfd
//! laid out exactly like a TCMU device's UIO map (mailbox at offset 0, command ring at
//! [`SimConfig::ring_off`], data area right after the ring), queues SCSI commands into the ring
//! the way the kernel does, and reaps completions the way the kernel does. The worker side gets a
//! [`SimDevice`]: the memfd (to map, like map 0 of `/dev/uioN`) and an *event fd* standing in for
//! the UIO fd's read/write semantics.
//!
//! This module owns the simulated kernel side and nothing of the worker: it never calls the
//! worker's ring engine. It is deliberately an independent implementation of the layout (its
//! offsets are spelled out here again, not imported), so that it checks the engine rather than
//! agreeing with it by construction. It must never panic on anything the worker wrote: a worker
//! that misbehaves gets an error, as a ring the real kernel marks broken.
//!
//! ## What it imitates, step by step
//! - **Queueing** ([`KernelSim::submit`], [`KernelSim::submit_bidi`], [`KernelSim::submit_tmr`]):
//!   like `queue_cmd_ring`/`queue_tmr_ring`. Data space is allocated in blocks of
//!   [`SimConfig::block_size`] bytes, lowest free block first (like the kernel's data bitmap), so
//!   a command's blocks are often scattered; consecutive blocks merge into one iovec, and iovecs
//!   are further split at [`SimConfig::max_iov_len`] to exercise scatter-gather. The entry is
//!   sized like the kernel's (`max(48 + 16 * iovecs, 112)` plus the CDB rounded up to 8), the CDB
//!   sits right after the iovec array, a PAD entry fills the end of the ring when the entry does
//!   not fit there, ring space keeps one byte free (so full and empty differ), and `cmd_head` is
//!   published with a Release store. A request larger than half the ring is refused, as the
//!   kernel refuses it. Command ids are the lowest free id from 1 to 0xffff, as the kernel
//!   allocates them, so an id comes back as soon as its command is reaped (or, with
//!   [`SimConfig::cyclic_ids`], the next free id after the last one handed out, so that a
//!   stale completion of an old command names an id nobody has: recovery tests use this to
//!   catch double completions). Data-in space is filled with [`SIM_POISON`] so that bytes the
//!   worker never wrote are recognisable.
//! - **Waking the worker** ([`KernelSim::kick`]): like `uio_event_notify`: the worker's event fd
//!   polls readable and a 4-byte read returns an event count.
//! - **Being notified** ([`KernelSim::wait_notified`]): the worker's 4-byte writes to its event
//!   fd, like its writes to `/dev/uioN`.
//! - **Reaping** ([`KernelSim::reap`]): like `tcmu_handle_completions`: Acquire-load `cmd_tail`,
//!   walk from the last cleaned offset up to it by each slot's own length, skip PAD and TMR
//!   entries, and look each slot's `cmd_id` up among the commands in flight. Data-in bytes are
//!   copied out as the kernel's `gather_data_area` would: only `read_len` bytes when the slot has
//!   `TCMU_UFLAG_READ_LEN` and a nonzero `read_len`, none for a CHECK CONDITION without it.
//! - **The `action/` attributes** ([`KernelSim::set_blocked`], [`KernelSim::reset_ring`]): like
//!   `block_dev` (new commands are refused with BUSY; what is in the ring stays) and `reset_ring`
//!   (only on a blocked device, as recent kernels require: every command in flight completes
//!   with BUSY, or CHECK CONDITION for level 2, and `cmd_head = cmd_tail = 0`).
//!
//! ## Stricter than the kernel
//! Where the kernel would misbehave or silently trust userspace, the simulator reports
//! [`SimError::Broken`] and refuses to reap any more: an unknown `cmd_id` (the kernel marks the
//! ring broken too), a `cmd_tail` that is not inside the published part of the ring or not on an
//! entry boundary, a slot whose `len_op` was changed, and, when the device does not advertise
//! `CAP_OOOC`, a slot completed with another command's id.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

// The kernel's layout (`include/uapi/linux/target_core_user.h`), restated independently.
const MB_VERSION: usize = 0;
const MB_FLAGS: usize = 2;
const MB_CMDR_OFF: usize = 4;
const MB_CMDR_SIZE: usize = 8;
const MB_CMD_HEAD: usize = 12;
const MB_CMD_TAIL: usize = 64;
const MAILBOX_SIZE: u32 = 128;
const MAILBOX_VERSION: u16 = 2;

const OP_PAD: u32 = 0;
const OP_CMD: u32 = 1;
const OP_TMR: u32 = 2;
const OP_MASK: u32 = 7;
const ALIGN: usize = 8;

const CMD_ENTRY_SIZE: usize = 112; // sizeof(struct tcmu_cmd_entry)
const IOV_ARRAY: usize = 48;
const IOV_SIZE: usize = 16;
const TMR_ENTRY_SIZE: usize = 32;

/// Out-of-order completion allowed (`TCMU_MAILBOX_FLAG_CAP_OOOC`).
pub const CAP_OOOC: u16 = 1;
/// `rsp.read_len` honoured (`TCMU_MAILBOX_FLAG_CAP_READ_LEN`).
pub const CAP_READ_LEN: u16 = 2;
/// TMR entries sent (`TCMU_MAILBOX_FLAG_CAP_TMR`).
pub const CAP_TMR: u16 = 4;
/// `TCMU_UFLAG_UNKNOWN_OP`.
pub const UFLAG_UNKNOWN_OP: u8 = 1;
/// `TCMU_UFLAG_READ_LEN`.
pub const UFLAG_READ_LEN: u8 = 2;
/// SCSI CHECK CONDITION status.
pub const CHECK_CONDITION: u8 = 0x02;
/// The byte data-in space is filled with before the worker gets it.
pub const SIM_POISON: u8 = 0xa5;

/// Shape of the simulated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// Offset of the command ring in the map (`cmdr_off`); the kernel uses 128, right after
    /// the mailbox. A multiple of 8, at least 128.
    pub ring_off: u32,
    /// Ring size in bytes (`cmdr_size`): a multiple of 8, need not be a power of two.
    pub ring_size: u32,
    /// Data-area size in bytes: a multiple of `block_size`.
    pub data_size: usize,
    /// Data allocation unit (the kernel's `data_pages_per_blk * PAGE_SIZE`).
    pub block_size: usize,
    /// Mailbox flags ([`CAP_OOOC`], [`CAP_READ_LEN`], [`CAP_TMR`]).
    pub flags: u16,
    /// Longest iovec the simulator writes; longer runs are split. `usize::MAX`: no splitting.
    pub max_iov_len: usize,
    /// Allocate command ids cyclically (the next free id after the last one) instead of the
    /// kernel's lowest-free policy.
    pub cyclic_ids: bool,
}

impl Default for SimConfig {
    /// A small device like the kernel's default layout in miniature: mailbox, a 64 KiB - 128
    /// ring, 1 MiB of 4 KiB data blocks, the flags of a 6.x kernel without KEEP_BUF.
    fn default() -> Self {
        SimConfig {
            ring_off: MAILBOX_SIZE,
            ring_size: 64 * 1024 - MAILBOX_SIZE,
            data_size: 1024 * 1024,
            block_size: 4096,
            flags: CAP_OOOC | CAP_READ_LEN | CAP_TMR,
            max_iov_len: usize::MAX,
            cyclic_ids: false,
        }
    }
}

/// The worker's end of a simulated device: what the supervisor would hand a worker.
#[derive(Debug)]
pub struct SimDevice {
    /// The map to `mmap` (shared, offset 0, exactly `map_len` bytes).
    pub map_fd: OwnedFd,
    /// Its size, as `/sys/class/uio/uioN/maps/map0/size` would say.
    pub map_len: usize,
    /// Stands in for the UIO fd: polls readable when kicked; `read` 4 bytes to consume a
    /// wake-up (an event count), `write` 4 bytes to notify the simulated kernel. A
    /// `SOCK_SEQPACKET` socket, blocking like a UIO fd.
    pub event_fd: OwnedFd,
}

/// Where things are in the simulated map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimLayout {
    /// Ring offset in the map.
    pub ring_off: u32,
    /// Ring size.
    pub ring_size: u32,
    /// Start of the data area in the map.
    pub data_off: u64,
    /// Total map length.
    pub map_len: usize,
}

/// Errors of the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// No room in the ring or the data area right now; reap completions and retry.
    #[error("no room in the ring or the data area")]
    Full,
    /// The request can never be queued (bad CDB, too large, both data directions on `submit`).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The worker broke the protocol; the simulated ring is broken for good.
    #[error("ring broken: {0}")]
    Broken(String),
    /// The device is blocked (`block_dev`): the kernel answers new commands BUSY.
    #[error("device blocked: the command was answered BUSY")]
    Blocked,
    /// Setting up the device or the event channel failed.
    #[error("simulator I/O: {0}")]
    Io(#[from] io::Error),
}

/// A command the simulated kernel got back from the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// Its id.
    pub cmd_id: u16,
    /// SCSI status (CHECK CONDITION if the worker set `TCMU_UFLAG_UNKNOWN_OP`, as the kernel
    /// does).
    pub status: u8,
    /// The whole 96-byte sense buffer for CHECK CONDITION, else empty.
    pub sense: Vec<u8>,
    /// `rsp.read_len` when the worker set `TCMU_UFLAG_READ_LEN`.
    pub read_len: Option<u32>,
    /// The data-in bytes the kernel would hand the initiator.
    pub data_in: Vec<u8>,
}

/// One command in flight (queued, not yet reaped).
#[derive(Debug)]
struct SimCmd {
    blocks: Vec<usize>,
    data_in: Vec<(u64, u64)>,
    data_in_len: usize,
    bidi: bool,
    /// iovecs in the entry (data-out and data-in).
    n_iov: usize,
}

/// One entry written and not yet reaped.
#[derive(Debug, Clone, Copy)]
struct Written {
    pos: u32,
    len_op: u32,
    /// The id written into a CMD entry, for the in-order check.
    cmd_id: u16,
}

/// The simulator's own mapping of the memfd.
struct Shm {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain shared memory behind a raw pointer; the protocol (Release/Acquire on the two
// indexes) orders all accesses with the worker, and `KernelSim` takes `&mut self` for every
// access of its own, so one thread at a time uses the pointer.
unsafe impl Send for Shm {}

impl Shm {
    fn check(&self, off: usize, n: usize) -> Result<(), SimError> {
        match off.checked_add(n) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(SimError::Broken(format!(
                "access [{off}, +{n}) outside the {}-byte map",
                self.len
            ))),
        }
    }

    fn write(&self, off: usize, src: &[u8]) -> Result<(), SimError> {
        self.check(off, src.len())?;
        // SAFETY: in bounds (checked); volatile because the worker maps the same memory. The
        // simulator only writes parts the protocol gives to the kernel side (beyond cmd_head, or
        // free data blocks).
        unsafe {
            let dst = self.ptr.as_ptr().add(off);
            for (i, b) in src.iter().enumerate() {
                std::ptr::write_volatile(dst.add(i), *b);
            }
        }
        Ok(())
    }

    fn fill(&self, off: usize, n: usize, byte: u8) -> Result<(), SimError> {
        self.check(off, n)?;
        // SAFETY: as in `write`.
        unsafe {
            let dst = self.ptr.as_ptr().add(off);
            for i in 0..n {
                std::ptr::write_volatile(dst.add(i), byte);
            }
        }
        Ok(())
    }

    fn read(&self, off: usize, dst: &mut [u8]) -> Result<(), SimError> {
        self.check(off, dst.len())?;
        // SAFETY: in bounds (checked); volatile as the worker may write the memory.
        unsafe {
            let src = self.ptr.as_ptr().add(off);
            for (i, b) in dst.iter_mut().enumerate() {
                *b = std::ptr::read_volatile(src.add(i));
            }
        }
        Ok(())
    }

    fn u32_at(&self, off: usize) -> Result<u32, SimError> {
        let mut b = [0u8; 4];
        self.read(off, &mut b)?;
        Ok(u32::from_ne_bytes(b))
    }

    fn word(&self, off: usize) -> &AtomicU32 {
        // SAFETY: only called with MB_CMD_HEAD or MB_CMD_TAIL, 4-aligned words inside the
        // mailbox at the start of the page-aligned map (which is at least 128 bytes long); the
        // reference is bounded by `&self`, during which the map stays mapped.
        unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(off).cast::<u32>()) }
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: the region `KernelSim::new` mapped, unmapped once; nothing borrows it past
        // the simulator's lifetime.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

/// The simulated kernel side of one TCMU device. See the module documentation.
pub struct KernelSim {
    cfg: SimConfig,
    shm: Shm,
    layout: SimLayout,
    /// `cmd_head` as the simulator last published it.
    head: u32,
    /// Ring offset up to which completions have been reaped (the kernel's `cmdr_last_cleaned`).
    last_cleaned: u32,
    written: VecDeque<Written>,
    in_flight: HashMap<u16, SimCmd>,
    free_blocks: Vec<bool>,
    broken: Option<String>,
    /// `submit_corrupt` was called: the head is no longer the simulator's to manage.
    corrupted: bool,
    /// `block_dev` is set.
    blocked: bool,
    /// The last id handed out (for cyclic allocation).
    last_id: u16,
    events: UnixDatagram,
    event_count: AtomicU32,
}

impl std::fmt::Debug for KernelSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelSim")
            .field("layout", &self.layout)
            .field("head", &self.head)
            .field("last_cleaned", &self.last_cleaned)
            .field("in_flight", &self.in_flight.len())
            .field("broken", &self.broken)
            .finish()
    }
}

fn bad(why: impl Into<String>) -> SimError {
    SimError::BadRequest(why.into())
}

/// CDB length from the opcode, like the kernel's `scsi_command_size()`.
fn cdb_len(cdb: &[u8]) -> Option<usize> {
    let op = *cdb.first()?;
    if op == 0x7f {
        return Some(8 + usize::from(*cdb.get(7)?));
    }
    Some(match op >> 5 {
        0 => 6,
        1 | 2 => 10,
        3 | 5 => 12,
        4 => 16,
        _ => 10,
    })
}

fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    if let Some(dst) = buf.get_mut(off..off + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

impl KernelSim {
    /// Creates the memfd and the event channel, writes the mailbox, and returns the simulator
    /// and the worker's end.
    pub fn new(cfg: SimConfig) -> Result<(KernelSim, SimDevice), SimError> {
        if cfg.ring_off < MAILBOX_SIZE || cfg.ring_off as usize % ALIGN != 0 {
            return Err(bad("ring_off must be a multiple of 8, at least 128"));
        }
        if cfg.ring_size < 256 || cfg.ring_size as usize % ALIGN != 0 {
            return Err(bad("ring_size must be a multiple of 8, at least 256"));
        }
        if cfg.block_size == 0 || cfg.data_size % cfg.block_size != 0 {
            return Err(bad("data_size must be a multiple of a nonzero block_size"));
        }
        if cfg.max_iov_len == 0 {
            return Err(bad("max_iov_len must be nonzero"));
        }
        let data_off = u64::from(cfg.ring_off) + u64::from(cfg.ring_size);
        let map_len = usize::try_from(data_off)
            .ok()
            .and_then(|d| d.checked_add(cfg.data_size))
            .ok_or_else(|| bad("map too large"))?;

        let map_fd = memfd_create("tcmu-sim", MFdFlags::MFD_CLOEXEC).map_err(io::Error::from)?;
        let flen = i64::try_from(map_len).map_err(|_| bad("map too large"))?;
        nix::unistd::ftruncate(&map_fd, flen).map_err(io::Error::from)?;
        let nz = NonZeroUsize::new(map_len).ok_or_else(|| bad("empty map"))?;
        // SAFETY: a fresh shared mapping of our own memfd at an address of the kernel's choice;
        // it affects no existing object and is owned (and unmapped) by `Shm`.
        let ptr = unsafe {
            mmap(
                None,
                nz,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                map_fd.as_fd(),
                0,
            )
        }
        .map_err(io::Error::from)?;
        let shm = Shm {
            ptr: ptr.cast(),
            len: map_len,
        };
        shm.write(MB_VERSION, &MAILBOX_VERSION.to_ne_bytes())?;
        shm.write(MB_FLAGS, &cfg.flags.to_ne_bytes())?;
        shm.write(MB_CMDR_OFF, &cfg.ring_off.to_ne_bytes())?;
        shm.write(MB_CMDR_SIZE, &cfg.ring_size.to_ne_bytes())?;
        shm.word(MB_CMD_HEAD).store(0, Ordering::Release);
        shm.word(MB_CMD_TAIL).store(0, Ordering::Release);

        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let events = UnixDatagram::from(ours);
        events.set_nonblocking(true)?;

        let blocks = cfg.data_size / cfg.block_size;
        let layout = SimLayout {
            ring_off: cfg.ring_off,
            ring_size: cfg.ring_size,
            data_off,
            map_len,
        };
        let sim = KernelSim {
            cfg,
            shm,
            layout,
            head: 0,
            last_cleaned: 0,
            written: VecDeque::new(),
            in_flight: HashMap::new(),
            free_blocks: vec![true; blocks],
            broken: None,
            corrupted: false,
            blocked: false,
            last_id: 0,
            events,
            event_count: AtomicU32::new(0),
        };
        let dev = SimDevice {
            map_fd,
            map_len,
            event_fd: theirs,
        };
        Ok((sim, dev))
    }

    /// Where things are in the map.
    pub fn layout(&self) -> SimLayout {
        self.layout
    }

    /// The mailbox flags.
    pub fn flags(&self) -> u16 {
        self.cfg.flags
    }

    /// Commands queued and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// `cmd_head` (what the simulator published).
    pub fn cmd_head(&self) -> u32 {
        self.shm.word(MB_CMD_HEAD).load(Ordering::Acquire)
    }

    /// `cmd_tail` (what the worker published).
    pub fn cmd_tail(&self) -> u32 {
        self.shm.word(MB_CMD_TAIL).load(Ordering::Acquire)
    }

    /// The offset up to which completions have been reaped.
    pub fn last_cleaned(&self) -> u32 {
        self.last_cleaned
    }

    /// Whether everything queued was completed and reaped: head == tail == last cleaned and no
    /// command in flight.
    pub fn is_drained(&self) -> bool {
        let head = self.cmd_head();
        head == self.cmd_tail() && head == self.last_cleaned && self.in_flight.is_empty()
    }

    /// Why the ring is broken, if it is.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// How many iovecs (data-out and data-in) the entry of in-flight command `cmd_id` has.
    pub fn iov_count(&self, cmd_id: u16) -> Option<usize> {
        self.in_flight.get(&cmd_id).map(|c| c.n_iov)
    }

    /// The ids of the commands in flight, sorted.
    pub fn in_flight_ids(&self) -> Vec<u16> {
        let mut ids: Vec<u16> = self.in_flight.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Whether `block_dev` is set.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// `action/block_dev`: while blocked, [`KernelSim::submit`] refuses new commands with
    /// [`SimError::Blocked`] (the kernel answers them BUSY); commands already in the ring stay.
    pub fn set_blocked(&mut self, blocked: bool) {
        self.blocked = blocked;
    }

    /// `action/reset_ring` with `err_level` 1 (every command in flight completes BUSY) or 2
    /// (CHECK CONDITION, sense not modelled), then `cmd_head = cmd_tail = 0`, and a broken ring is
    /// usable again. Like recent kernels, refuses unless the device is blocked. Returns the
    /// commands it completed, by id.
    pub fn reset_ring(&mut self, err_level: u8) -> Result<Vec<Completed>, SimError> {
        if !self.blocked {
            return Err(bad("reset_ring needs block_dev first"));
        }
        let status = match err_level {
            1 => 0x08,
            2 => CHECK_CONDITION,
            other => return Err(bad(format!("reset_ring level {other}"))),
        };
        let mut ids = self.in_flight_ids();
        ids.sort_unstable();
        let mut out = Vec::new();
        for id in ids {
            if let Some(cmd) = self.in_flight.remove(&id) {
                self.free(&cmd.blocks);
                out.push(Completed {
                    cmd_id: id,
                    status,
                    sense: Vec::new(),
                    read_len: None,
                    data_in: Vec::new(),
                });
            }
        }
        self.written.clear();
        self.head = 0;
        self.last_cleaned = 0;
        self.broken = None;
        self.corrupted = false;
        self.shm.word(MB_CMD_TAIL).store(0, Ordering::Release);
        self.shm.word(MB_CMD_HEAD).store(0, Ordering::Release);
        Ok(out)
    }

    /// Free bytes in the ring, the kernel's way: one byte always stays unused.
    fn ring_free(&self) -> u32 {
        let size = self.cfg.ring_size;
        let used = (self.head % size + size - self.last_cleaned) % size;
        size - used - 1
    }

    /// Ring offset an entry of `len` bytes would get now, and whether a PAD goes first; `Full`
    /// if it does not fit.
    fn place(&self, len: usize) -> Result<(u32, bool), SimError> {
        if self.corrupted {
            return Err(bad(
                "the ring was corrupted on purpose; nothing more can be queued",
            ));
        }
        let size = self.cfg.ring_size;
        let len32 = u32::try_from(len).map_err(|_| bad("entry too large"))?;
        if len32 > size / 2 {
            return Err(bad(format!(
                "an entry of {len} bytes is more than half of the {size}-byte ring"
            )));
        }
        let to_end = size - self.head;
        let (needed, pos, pad) = if to_end >= len32 {
            (len32, self.head, false)
        } else {
            (len32 + to_end, 0, true)
        };
        if needed > self.ring_free() {
            return Err(SimError::Full);
        }
        Ok((pos, pad))
    }

    /// The map offset where an entry of `len` bytes would be written now (after a PAD if the
    /// ring's end is too close). For building raw entries whose `cdb_off` or iovecs point at
    /// particular places.
    pub fn next_entry_offset(&self, len: usize) -> Result<u64, SimError> {
        let (pos, _) = self.place(len)?;
        Ok(u64::from(self.cfg.ring_off) + u64::from(pos))
    }

    /// Writes `entry` (header included, `len_op` already set) at the head, padding first if
    /// needed, and publishes it.
    fn push(&mut self, entry: &[u8], cmd_id: u16) -> Result<u32, SimError> {
        let (pos, pad) = self.place(entry.len())?;
        let ring = self.cfg.ring_off as usize;
        if pad {
            let pad_len = self.cfg.ring_size - self.head;
            let mut hdr = [0u8; 8];
            put(&mut hdr, 0, &(pad_len | OP_PAD).to_ne_bytes());
            self.shm.write(ring + self.head as usize, &hdr)?;
            self.written.push_back(Written {
                pos: self.head,
                len_op: pad_len | OP_PAD,
                cmd_id: 0,
            });
        }
        self.shm.write(ring + pos as usize, entry)?;
        let len_op = u32::from_ne_bytes(
            entry
                .get(0..4)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| bad("entry shorter than a header"))?,
        );
        self.written.push_back(Written {
            pos,
            len_op,
            cmd_id,
        });
        // Entries are at most half the ring, so this never wraps past the end.
        self.head = (pos + (len_op & !OP_MASK)) % self.cfg.ring_size;
        // Release: the entry (and its data) is complete before the worker can see the new head.
        self.shm
            .word(MB_CMD_HEAD)
            .store(self.head, Ordering::Release);
        Ok(pos)
    }

    /// The lowest id in 1..=0xffff not in flight, like the kernel's
    /// `xa_alloc(..., XA_LIMIT(1, 0xffff))`: ids are reused as soon as they are reaped. With
    /// [`SimConfig::cyclic_ids`], the first free id after the last one handed out.
    fn alloc_id(&mut self) -> Result<u16, SimError> {
        let id = if self.cfg.cyclic_ids {
            let start = u32::from(self.last_id);
            (1..=0xffffu32)
                .map(|i| ((start + i - 1) % 0xffff + 1) as u16)
                .find(|id| !self.in_flight.contains_key(id))
        } else {
            (1..=u16::MAX).find(|id| !self.in_flight.contains_key(id))
        }
        .ok_or(SimError::Full)?;
        self.last_id = id;
        Ok(id)
    }

    /// Takes the lowest free blocks for `n` bytes; `None` when there are not enough.
    fn alloc_blocks(&mut self, n: usize) -> Option<Vec<usize>> {
        let want = n.div_ceil(self.cfg.block_size);
        let picked: Vec<usize> = self
            .free_blocks
            .iter()
            .enumerate()
            .filter(|(_, free)| **free)
            .map(|(i, _)| i)
            .take(want)
            .collect();
        if picked.len() < want {
            return None;
        }
        for &b in &picked {
            if let Some(f) = self.free_blocks.get_mut(b) {
                *f = false;
            }
        }
        Some(picked)
    }

    fn free(&mut self, blocks: &[usize]) {
        for &b in blocks {
            if let Some(f) = self.free_blocks.get_mut(b) {
                *f = true;
            }
        }
    }

    /// iovecs for `n` bytes laid over `blocks`: consecutive blocks merge, long runs are split.
    fn iovecs(&self, blocks: &[usize], n: usize) -> Vec<(u64, u64)> {
        let bs = self.cfg.block_size;
        let mut runs: Vec<(usize, usize)> = Vec::new(); // (first block, bytes)
        let mut left = n;
        for &b in blocks {
            let take = left.min(bs);
            if take == 0 {
                break;
            }
            match runs.last_mut() {
                Some((first, bytes)) if *first + *bytes / bs == b && *bytes % bs == 0 => {
                    *bytes += take;
                }
                _ => runs.push((b, take)),
            }
            left -= take;
        }
        let mut out = Vec::new();
        for (first, mut bytes) in runs {
            let mut base = self.layout.data_off + (first * bs) as u64;
            while bytes > 0 {
                let piece = bytes.min(self.cfg.max_iov_len);
                out.push((base, piece as u64));
                base += piece as u64;
                bytes -= piece;
            }
        }
        out
    }

    /// Queues a command with data-out bytes or a data-in length (not both: see
    /// [`KernelSim::submit_bidi`]) and returns its id. The CDB must be as long as its opcode
    /// says. `Full` leaves everything as it was.
    pub fn submit(
        &mut self,
        cdb: &[u8],
        data_out: &[u8],
        data_in_len: usize,
    ) -> Result<u16, SimError> {
        if !data_out.is_empty() && data_in_len > 0 {
            return Err(bad(
                "a command has data-out or data-in; use submit_bidi for both",
            ));
        }
        self.submit_cmd(cdb, data_out, data_in_len, false)
    }

    /// Queues a bidirectional command: `data_out` in the first `iov_cnt` iovecs, `data_in_len`
    /// bytes of data-in space in the next `iov_bidi_cnt`.
    pub fn submit_bidi(
        &mut self,
        cdb: &[u8],
        data_out: &[u8],
        data_in_len: usize,
    ) -> Result<u16, SimError> {
        self.submit_cmd(cdb, data_out, data_in_len, true)
    }

    fn submit_cmd(
        &mut self,
        cdb: &[u8],
        data_out: &[u8],
        data_in_len: usize,
        bidi: bool,
    ) -> Result<u16, SimError> {
        if cdb_len(cdb) != Some(cdb.len()) || cdb.len() > 260 {
            return Err(bad(format!(
                "a CDB of {} bytes does not match its opcode's length",
                cdb.len()
            )));
        }
        if self.blocked {
            return Err(SimError::Blocked);
        }
        let total_blocks = self.free_blocks.len();
        let need = data_out.len().div_ceil(self.cfg.block_size)
            + data_in_len.div_ceil(self.cfg.block_size);
        if need > total_blocks {
            return Err(bad(format!(
                "{need} data blocks needed, the data area has {total_blocks}"
            )));
        }
        let out_blocks = self.alloc_blocks(data_out.len()).ok_or(SimError::Full)?;
        let Some(in_blocks) = self.alloc_blocks(data_in_len) else {
            self.free(&out_blocks);
            return Err(SimError::Full);
        };
        let out_iov = self.iovecs(&out_blocks, data_out.len());
        let in_iov = self.iovecs(&in_blocks, data_in_len);
        let n_iov = out_iov.len() + in_iov.len();
        let base = (IOV_ARRAY + IOV_SIZE * n_iov).max(CMD_ENTRY_SIZE);
        let size = base + cdb.len().next_multiple_of(ALIGN);
        let placed = self
            .place(size)
            .and_then(|(pos, _)| Ok((pos, self.alloc_id()?)));
        let (pos, id) = match placed {
            Ok(p) => p,
            Err(e) => {
                self.free(&out_blocks);
                self.free(&in_blocks);
                return Err(e);
            }
        };

        // Data first: the Release store of the head in `push` publishes it with the entry.
        let mut done = 0;
        for &(b, l) in &out_iov {
            let chunk = data_out.get(done..done + l as usize).unwrap_or_default();
            self.shm.write(b as usize, chunk)?;
            done += l as usize;
        }
        for &(b, l) in &in_iov {
            self.shm.fill(b as usize, l as usize, SIM_POISON)?;
        }

        let mut e = vec![0u8; size];
        put(&mut e, 0, &(size as u32 | OP_CMD).to_ne_bytes());
        put(&mut e, 4, &id.to_ne_bytes());
        let (n_out, n_in) = if bidi {
            (out_iov.len(), in_iov.len())
        } else {
            (n_iov, 0)
        };
        put(&mut e, 8, &(n_out as u32).to_ne_bytes());
        put(&mut e, 12, &(n_in as u32).to_ne_bytes());
        let cdb_off = u64::from(self.cfg.ring_off) + u64::from(pos) + base as u64;
        put(&mut e, 24, &cdb_off.to_ne_bytes());
        for (i, (b, l)) in out_iov.iter().chain(&in_iov).enumerate() {
            put(&mut e, IOV_ARRAY + IOV_SIZE * i, &b.to_ne_bytes());
            put(&mut e, IOV_ARRAY + IOV_SIZE * i + 8, &l.to_ne_bytes());
        }
        put(&mut e, base, cdb);
        self.push(&e, id)?;
        let mut blocks = out_blocks;
        blocks.extend(in_blocks);
        self.in_flight.insert(
            id,
            SimCmd {
                blocks,
                data_in: in_iov,
                data_in_len,
                bidi,
                n_iov,
            },
        );
        Ok(id)
    }

    /// Queues a task-management entry naming `cmd_ids` (which stay in flight: the worker still
    /// completes them).
    pub fn submit_tmr(&mut self, tmr_type: u8, cmd_ids: &[u16]) -> Result<(), SimError> {
        let size = (TMR_ENTRY_SIZE + 2 * cmd_ids.len()).next_multiple_of(ALIGN);
        let mut e = vec![0u8; size];
        put(&mut e, 0, &(size as u32 | OP_TMR).to_ne_bytes());
        put(&mut e, 8, &[tmr_type]);
        put(&mut e, 12, &(cmd_ids.len() as u32).to_ne_bytes());
        for (i, id) in cmd_ids.iter().enumerate() {
            put(&mut e, TMR_ENTRY_SIZE + 2 * i, &id.to_ne_bytes());
        }
        self.push(&e, 0)?;
        Ok(())
    }

    /// Queues an arbitrary entry, for robustness tests. `bytes` is the whole entry, header
    /// included, a nonzero multiple of 8 long; the simulator sets the header's length to
    /// `bytes.len()` (keeping the type bits of `bytes[0]`) and, for a CMD entry, its `cmd_id` to
    /// a freshly allocated id, which it returns. Everything else (iovecs, `cdb_off`, counts) is
    /// written as given, however wrong. A CMD queued this way has no data space; the worker
    /// must still complete it.
    pub fn submit_raw_entry(&mut self, bytes: &[u8]) -> Result<Option<u16>, SimError> {
        if bytes.is_empty() || bytes.len() % ALIGN != 0 {
            return Err(bad("a raw entry is a nonzero multiple of 8 bytes"));
        }
        let op = u32::from(bytes.first().copied().unwrap_or(0)) & OP_MASK;
        let mut e = bytes.to_vec();
        put(&mut e, 0, &(bytes.len() as u32 | op).to_ne_bytes());
        let id = if op == OP_CMD {
            let id = self.alloc_id()?;
            put(&mut e, 4, &id.to_ne_bytes());
            Some(id)
        } else {
            None
        };
        self.push(&e, id.unwrap_or(0))?;
        if let Some(id) = id {
            self.in_flight.insert(
                id,
                SimCmd {
                    blocks: Vec::new(),
                    data_in: Vec::new(),
                    data_in_len: 0,
                    bidi: false,
                    n_iov: 0,
                },
            );
        }
        Ok(id)
    }

    /// Writes `bytes` at the head unchecked (clipped at the ring's end) and moves the published
    /// head forward by `head_advance` bytes *without* reducing it modulo the ring size or
    /// checking its alignment, so the new head may be out of range: for tests of corrupt rings.
    /// The simulator's bookkeeping does not follow: after this, queue nothing more; only the
    /// worker's reaction is meaningful, and [`KernelSim::reap`] reports the ring broken if the
    /// worker moves the tail into the corrupt part.
    pub fn submit_corrupt(&mut self, bytes: &[u8], head_advance: u32) -> Result<(), SimError> {
        let to_end = (self.cfg.ring_size - self.head.min(self.cfg.ring_size)) as usize;
        let clipped = bytes.get(..to_end.min(bytes.len())).unwrap_or_default();
        self.shm
            .write(self.cfg.ring_off as usize + self.head as usize, clipped)?;
        self.head = self.head.wrapping_add(head_advance);
        self.corrupted = true;
        self.shm
            .word(MB_CMD_HEAD)
            .store(self.head, Ordering::Release);
        Ok(())
    }

    /// Wakes the worker, like `uio_event_notify`: its event fd becomes readable, and a 4-byte
    /// read returns the event count.
    pub fn kick(&self) -> io::Result<()> {
        let count = self
            .event_count
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        match self.events.send(&count.to_ne_bytes()) {
            Ok(_) => Ok(()),
            // The worker has unread wake-ups already; one more would change nothing.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Waits up to `timeout` for the worker to notify (write to its event fd); drains every
    /// pending notification. True if there was at least one. A notification that is not exactly
    /// 4 bytes is an `InvalidData` error (a real UIO fd would refuse it with `EINVAL`); a worker
    /// that closed its end is `UnexpectedEof`.
    pub fn wait_notified(&self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.events.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, ms) {
                Ok(0) => return Ok(false),
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let mut got = false;
        let mut buf = [0u8; 64];
        loop {
            match self.events.recv(&mut buf) {
                Ok(4) => got = true,
                Ok(0) => {
                    if got {
                        return Ok(true);
                    }
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the worker closed its event fd",
                    ));
                }
                Ok(n) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("worker wrote {n} bytes to its event fd, not 4"),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(got),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn broken_err(&mut self, why: String) -> SimError {
        self.broken = Some(why.clone());
        SimError::Broken(why)
    }

    /// Reaps completions like the kernel's `tcmu_handle_completions` (see the module
    /// documentation) and frees their ring and data space. Returns them in ring order.
    pub fn reap(&mut self) -> Result<Vec<Completed>, SimError> {
        if let Some(why) = &self.broken {
            return Err(SimError::Broken(why.clone()));
        }
        let size = self.cfg.ring_size;
        // Acquire pairs with the worker's Release store: its responses and data-in bytes are
        // visible below.
        let tail = self.cmd_tail();
        if tail >= size || tail as usize % ALIGN != 0 {
            return Err(self.broken_err(format!("cmd_tail {tail} is not an aligned ring offset")));
        }
        let dist = |from: u32, to: u32| {
            let size = u64::from(size);
            ((u64::from(to) + size - u64::from(from) % size) % size) as u32
        };
        if dist(self.last_cleaned, tail) > dist(self.last_cleaned, self.head) {
            return Err(self.broken_err(format!(
                "cmd_tail {tail} is beyond cmd_head {} (last cleaned {})",
                self.head, self.last_cleaned
            )));
        }
        let ring = self.cfg.ring_off as usize;
        let mut out = Vec::new();
        while self.last_cleaned != tail {
            let pos = self.last_cleaned;
            let Some(w) = self.written.front().copied() else {
                return Err(self.broken_err(format!("no entry at {pos}")));
            };
            let len_op = self.shm.u32_at(ring + pos as usize)?;
            if w.pos != pos || w.len_op != len_op {
                return Err(self.broken_err(format!(
                    "slot at {pos}: len_op {len_op:#x}, the simulator wrote {:#x} at {}",
                    w.len_op, w.pos
                )));
            }
            let len = len_op & !OP_MASK;
            if len > dist(pos, tail) {
                return Err(self.broken_err(format!(
                    "cmd_tail {tail} is inside the entry at {pos} ({len} bytes)"
                )));
            }
            self.written.pop_front();
            let next = (pos + len) % size;
            if len_op & OP_MASK != OP_CMD {
                self.last_cleaned = next;
                continue;
            }
            let mut rsp = [0u8; CMD_ENTRY_SIZE];
            self.shm.read(ring + pos as usize, &mut rsp)?;
            let [
                _,
                _,
                _,
                _,
                id0,
                id1,
                _,
                uflags,
                mut status,
                _,
                _,
                _,
                r0,
                r1,
                r2,
                r3,
                sense @ ..,
            ] = rsp;
            let cmd_id = u16::from_ne_bytes([id0, id1]);
            let read_len = u32::from_ne_bytes([r0, r1, r2, r3]);
            if self.cfg.flags & CAP_OOOC == 0 && cmd_id != w.cmd_id {
                return Err(self.broken_err(format!(
                    "slot of command {} completed as {cmd_id} without CAP_OOOC",
                    w.cmd_id
                )));
            }
            let Some(cmd) = self.in_flight.remove(&cmd_id) else {
                return Err(self.broken_err(format!("cmd_id {cmd_id} not found")));
            };
            if uflags & UFLAG_UNKNOWN_OP != 0 {
                status = CHECK_CONDITION;
            }
            let has_read_len = uflags & UFLAG_READ_LEN != 0;
            let read_len_valid = has_read_len && read_len != 0 && !cmd.bidi;
            let sense = if status == CHECK_CONDITION {
                sense.to_vec()
            } else {
                Vec::new()
            };
            let want = if uflags & UFLAG_UNKNOWN_OP != 0
                || (status == CHECK_CONDITION && !read_len_valid)
            {
                0
            } else if read_len_valid {
                cmd.data_in_len.min(read_len as usize)
            } else {
                cmd.data_in_len
            };
            let mut data_in = Vec::with_capacity(want);
            for &(b, l) in &cmd.data_in {
                let n = (l as usize).min(want - data_in.len());
                if n == 0 {
                    break;
                }
                let mut chunk = vec![0u8; n];
                self.shm.read(b as usize, &mut chunk)?;
                data_in.extend_from_slice(&chunk);
            }
            self.free(&cmd.blocks);
            out.push(Completed {
                cmd_id,
                status,
                sense,
                read_len: has_read_len.then_some(read_len),
                data_in,
            });
            self.last_cleaned = next;
        }
        Ok(out)
    }
}
