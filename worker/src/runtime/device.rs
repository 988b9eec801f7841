//! # Serving one device: the ring thread and its I/O threads
//!
//! Each device gets one *ring thread* and a small pool of *I/O threads*:
//!
//! ```text
//!   kernel ──(cmd_head, uio event)──▶ ring thread ──jobs──▶ I/O threads ──▶ Emulator ──▶ Handler
//!   kernel ◀──(cmd_tail, 4-byte write)── ring thread ◀──answers + eventfd wake──┘   (any thread)
//! ```
//!
//! The ring thread is the only code that touches the ring (and its in-flight journal): it waits
//! for the kernel's event, fetches every new entry, hands commands to the pool, writes finished
//! commands back (out of order, as they finish), and notifies the kernel once per batch. I/O
//! threads only see a command's own CDB and data buffers: each wraps its command in the SDK's
//! completion handle ([`Pending`]) and submits it to the emulator. The emulation answers on the
//! I/O thread; a handler that implements an opcode itself may keep the handle and answer later
//! from any thread of its own, and so may the emulation itself: READ, WRITE, SYNCHRONIZE CACHE
//! and UNMAP keep the handle in the continuation of their block requests
//! ([`tcmu_warden_sdk::Handler::submit_io`]) and answer when the handler completes them, so an
//! asynchronous handler holds many commands in flight without holding an I/O thread for each. Either way the answer goes through the same path: counted, sent
//! on a channel to the ring thread, and the ring thread woken through an eventfd, so answers
//! from foreign threads reach the ring (and the journal) only through the ring thread, in the
//! order the ring thread receives them. A handle dropped unanswered answers its command with
//! HARDWARE ERROR / INTERNAL TARGET FAILURE (04/44/00), so every command is answered exactly
//! once. A handler can also block the device ([`DeviceBlock`]): the ring thread then fetches no
//! new command until it is unblocked, and keeps delivering answers.
//!
//! A runner can also start from a [`Recovery`] (a ring rebuilt from a dead worker's journal):
//! before fetching anything new, it re-executes the recovered commands that are safe to run twice
//! (see [`super::replay`]) and answers the others BUSY, so that each command the kernel still
//! waits for is completed exactly once.
//!
//! This module must never block the ring thread on a handler, and never let a handler's failure
//! (an error or even a panic) take the device down: every command ends with a SCSI status. When
//! the ring thread ends abnormally, commands still queued for the I/O threads are abandoned
//! rather than executed: their results could no longer be delivered.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tracing::{debug, error, info, warn};

use crate::ring::{
    Completion, CrashPoint, Fetched, Recovered, Recovery, Ring, RingCommand, RingError,
};
use crate::scsi::{CommandResult, Emulator, MediumAccess, Sense, medium_access, status};
use tcmu_warden_sdk::{Answer, BlockSwitch, CompleteFn, DeviceBlock, Pending};

use super::replay::is_replay_safe;

/// Errors that stop a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The ring is unusable (corrupt header, completion refused).
    #[error("ring: {0}")]
    Ring(#[from] RingError),
    /// Waiting for or notifying the kernel failed.
    #[error("event I/O: {0}")]
    Io(#[from] io::Error),
    /// The kernel removed the device (its UIO node reports an error on poll).
    #[error("the kernel removed the device")]
    Gone,
    /// In-flight commands did not finish before the deadline.
    #[error("{0} commands still in flight at the drain deadline")]
    DrainTimeout(usize),
}

/// Tuning of one device's runtime.
#[derive(Debug, Clone, Copy)]
pub struct DeviceOptions {
    /// I/O threads executing commands concurrently.
    pub io_threads: usize,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions { io_threads: 4 }
    }
}

/// Counters of one device (monotonic).
#[derive(Debug, Default)]
pub struct Counters {
    /// Commands completed.
    pub commands: AtomicU64,
    /// Commands completed with a status other than GOOD.
    pub errors: AtomicU64,
    /// Bytes returned to initiators by READ commands.
    pub bytes_read: AtomicU64,
    /// Bytes received from initiators by WRITE commands.
    pub bytes_written: AtomicU64,
}

/// Called once on the ring thread when the device stops, with how it ended.
pub type OnExit = Box<dyn FnOnce(&Result<(), DeviceError>) + Send>;

struct Done {
    cmd_id: u16,
    result: CommandResult,
}

/// A running device. Dropping it without [`DeviceRunner::stop`] stops it too.
pub struct DeviceRunner {
    name: String,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    counters: Arc<Counters>,
    ring_thread: Option<JoinHandle<Result<(), DeviceError>>>,
    io_threads: Vec<JoinHandle<()>>,
}

impl DeviceRunner {
    /// Starts serving `ring`. `event` is the descriptor the kernel signals new commands on and
    /// that we write to after completing (the `/dev/uioN` itself on a real system).
    pub fn start(
        name: String,
        ring: Ring,
        event: OwnedFd,
        emulator: Arc<Emulator>,
        opts: DeviceOptions,
        on_exit: OnExit,
    ) -> io::Result<DeviceRunner> {
        Self::start_with(name, ring, Vec::new(), event, emulator, opts, on_exit)
    }

    /// Starts serving a ring rebuilt by [`Ring::recover`]: its recovered commands are finished
    /// first (re-executed when replay-safe, else answered BUSY), then the ring is served as
    /// usual. The recovery's re-delivered responses are announced to the kernel at once.
    pub fn start_recovered(
        name: String,
        recovery: Recovery,
        event: OwnedFd,
        emulator: Arc<Emulator>,
        opts: DeviceOptions,
        on_exit: OnExit,
    ) -> io::Result<DeviceRunner> {
        Self::start_with(
            name,
            recovery.ring,
            recovery.commands,
            event,
            emulator,
            opts,
            on_exit,
        )
    }

    fn start_with(
        name: String,
        ring: Ring,
        recovered: Vec<Recovered>,
        event: OwnedFd,
        emulator: Arc<Emulator>,
        opts: DeviceOptions,
        on_exit: OnExit,
    ) -> io::Result<DeviceRunner> {
        set_nonblocking(&event)?;
        let wake = Arc::new(EventFd::from_value_and_flags(
            0,
            EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
        )?);
        let stop = Arc::new(AtomicBool::new(false));
        let abandoned = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();

        let dev_name: Arc<str> = Arc::from(name.as_str());
        let block = Arc::new(RingBlock {
            dev: dev_name.clone(),
            blocked: AtomicBool::new(false),
            wake: wake.clone(),
        });
        let handle = DeviceBlock::new(block.clone());
        let mut io_threads = Vec::new();
        for i in 0..opts.io_threads.max(1) {
            let (rx, tx, wake, emu, ctr, gone, handle) = (
                job_rx.clone(),
                done_tx.clone(),
                wake.clone(),
                emulator.clone(),
                counters.clone(),
                abandoned.clone(),
                handle.clone(),
            );
            let dev = dev_name.clone();
            io_threads.push(
                std::thread::Builder::new()
                    .name(format!("io-{i}"))
                    .spawn(move || io_loop(&dev, rx, tx, &wake, &emu, &ctr, &gone, &handle))?,
            );
        }
        drop(done_tx);
        let ring_thread = {
            let (wake, stop, dev) = (wake.clone(), stop.clone(), name.clone());
            std::thread::Builder::new()
                .name("ring".into())
                .spawn(move || {
                    let r = ring_loop(
                        &dev, ring, recovered, &event, &wake, &stop, &block, job_tx, done_rx,
                    );
                    match &r {
                        Ok(()) => info!(device = %dev, "device stopped"),
                        Err(e) => {
                            abandoned.store(true, Ordering::Release);
                            if matches!(e, DeviceError::Gone) {
                                warn!(device = %dev, "device removed by the kernel; no longer served");
                            } else {
                                error!(device = %dev, error = %e, "device failed");
                            }
                        }
                    }
                    on_exit(&r);
                    r
                })?
        };
        Ok(DeviceRunner {
            name,
            stop,
            wake,
            counters,
            ring_thread: Some(ring_thread),
            io_threads,
        })
    }

    /// The device's counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Whether the ring thread has ended (stopped or failed).
    pub fn is_finished(&self) -> bool {
        self.ring_thread
            .as_ref()
            .is_none_or(JoinHandle::is_finished)
    }

    /// Stops fetching, lets in-flight commands finish (up to the drain deadline inside the ring
    /// thread), and joins every thread.
    pub fn stop(mut self) -> Result<(), DeviceError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), DeviceError> {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        let r = match self.ring_thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(DeviceError::Io(io::Error::other("ring thread panicked")))),
            None => Ok(()),
        };
        // The ring thread dropped the job sender on exit, so the I/O threads see a closed channel.
        for t in self.io_threads.drain(..) {
            if t.join().is_err() {
                warn!(device = %self.name, "an I/O thread panicked");
            }
        }
        r
    }
}

impl Drop for DeviceRunner {
    fn drop(&mut self) {
        if self.ring_thread.is_some() {
            let _ = self.shutdown();
        }
    }
}

/// How long a stopping device waits for in-flight commands.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

#[allow(clippy::too_many_arguments)]
fn ring_loop(
    dev: &str,
    mut ring: Ring,
    recovered: Vec<Recovered>,
    event: &OwnedFd,
    wake: &EventFd,
    stop: &AtomicBool,
    block: &RingBlock,
    jobs: Sender<Job>,
    done: Receiver<Done>,
) -> Result<(), DeviceError> {
    finish_recovered(dev, &mut ring, recovered, &jobs)?;
    let mut drain_started: Option<Instant> = None;
    loop {
        ring.crash_point(CrashPoint::LoopTop)?;
        // Completions first: they free ring space for the kernel.
        loop {
            match done.try_recv() {
                Ok(d) => {
                    complete(&mut ring, d.cmd_id, &d.result)?;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if ring.in_flight() > 0 {
                        return Err(DeviceError::Io(io::Error::other(
                            "every I/O thread is gone",
                        )));
                    }
                    break;
                }
            }
        }
        let stopping = stop.load(Ordering::Acquire);
        if !stopping && !block.is_blocked() {
            while let Some(entry) = ring.fetch()? {
                match entry {
                    Fetched::Cmd(cmd) => {
                        if let Err(e) = jobs.send(Job { cmd, replay: false }) {
                            // No I/O thread left: fail the command rather than lose it.
                            let id = e.0.cmd.cmd_id;
                            complete(&mut ring, id, &internal_error())?;
                        }
                    }
                    Fetched::Tmr(tmr) => {
                        // Aborted commands still complete normally; the kernel ignores their
                        // status once it has answered the task management request.
                        debug!(device = %dev, tmr_type = tmr.tmr_type, commands = tmr.cmd_ids.len(),
                               "task management notification");
                    }
                    Fetched::Invalid { cmd_id, why } => {
                        warn!(device = %dev, cmd_id, why = %why, "malformed ring entry failed");
                        complete(&mut ring, cmd_id, &internal_error())?;
                    }
                }
            }
        }
        // One notification per batch, and only when the tail really moved (without CAP_OOOC an
        // early completion may wait for an older command).
        if ring.take_tail_moved() {
            notify(event)?;
        }
        if stopping {
            if ring.in_flight() == 0 {
                return Ok(());
            }
            let started = *drain_started.get_or_insert_with(Instant::now);
            if started.elapsed() > DRAIN_DEADLINE {
                return Err(DeviceError::DrainTimeout(ring.in_flight()));
            }
        }
        let timeout = if stopping {
            PollTimeout::from(100u16)
        } else {
            PollTimeout::NONE
        };
        let mut fds = [
            PollFd::new(event.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(DeviceError::Io(e.into())),
        }
        let hangup = PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL;
        if fds[0].revents().is_some_and(|r| r.intersects(hangup)) {
            // A UIO device whose backstore was deleted polls as an error (the simulator's socket
            // as a hang-up): nothing more will arrive on this ring.
            return Err(DeviceError::Gone);
        }
        drain_event(event)?;
        let _ = wake.read();
    }
}

/// Hands the recovered commands to the I/O threads (replay-safe ones) or answers them BUSY.
fn finish_recovered(
    dev: &str,
    ring: &mut Ring,
    recovered: Vec<Recovered>,
    jobs: &Sender<Job>,
) -> Result<(), DeviceError> {
    if recovered.is_empty() {
        return Ok(());
    }
    let (mut replayed, mut busy, mut invalid) = (0usize, 0usize, 0usize);
    for r in recovered {
        match r {
            Recovered::Pending(cmd) if is_replay_safe(&cmd.cdb) => {
                replayed += 1;
                if let Err(e) = jobs.send(Job { cmd, replay: true }) {
                    let id = e.0.cmd.cmd_id;
                    complete(ring, id, &internal_error())?;
                }
            }
            Recovered::Pending(cmd) => {
                busy += 1;
                debug!(device = %dev, cmd_id = cmd.cmd_id, opcode = cmd.cdb.first().copied().unwrap_or(0),
                       "recovered command is not safe to run twice; answering BUSY");
                ring.complete_command(cmd, &Completion::status(status::BUSY))?;
            }
            Recovered::Unreplayable { cmd_id, cdb } => {
                busy += 1;
                debug!(device = %dev, cmd_id, opcode = cdb.first().copied().unwrap_or(0),
                       "recovered command's data layout was not journaled; answering BUSY");
                ring.complete(cmd_id, &Completion::status(status::BUSY))?;
            }
            Recovered::Invalid { cmd_id } => {
                invalid += 1;
                complete(ring, cmd_id, &internal_error())?;
            }
        }
    }
    info!(device = %dev, replayed, busy, invalid, "finishing the commands the previous worker left running");
    Ok(())
}

fn internal_error() -> CommandResult {
    // HARDWARE ERROR / INTERNAL TARGET FAILURE: the command itself was fine, our side was not.
    CommandResult::internal_error()
}

fn complete(ring: &mut Ring, cmd_id: u16, r: &CommandResult) -> Result<(), RingError> {
    let sense = r.sense.as_ref().map(Sense::to_bytes).unwrap_or_default();
    ring.complete(
        cmd_id,
        &Completion {
            status: r.status,
            sense: &sense,
            read_len: r.read_len,
        },
    )
}

/// One command for the I/O threads.
struct Job {
    cmd: RingCommand,
    /// A command the previous worker had accepted and the recovery runs again: it was issued
    /// before the restart, so the restart's unit attention is not reported to it.
    replay: bool,
}

#[allow(clippy::too_many_arguments)]
fn io_loop(
    dev: &Arc<str>,
    jobs: Receiver<Job>,
    done: Sender<Done>,
    wake: &Arc<EventFd>,
    emulator: &Emulator,
    counters: &Arc<Counters>,
    abandoned: &AtomicBool,
    block: &DeviceBlock,
) {
    for Job { cmd, replay } in jobs {
        if abandoned.load(Ordering::Acquire) {
            // The ring thread is gone: nobody could deliver the result.
            continue;
        }
        let RingCommand {
            cmd_id,
            cdb,
            data,
            bidi_in,
            ..
        } = cmd;
        let op = cdb.first().copied().unwrap_or(0);
        let len = data.len() as u64;
        let answer = answer_fn(dev, cmd_id, op, len, &done, wake, counters);
        let pending = Pending::new(cdb, data, bidi_in, block.clone(), answer);
        // A panic drops the command's handle on the way out, which answers it (04/44/00).
        if catch_unwind(AssertUnwindSafe(|| emulator.submit(pending, replay))).is_err() {
            error!(device = %dev, opcode = op, "command handler panicked; failing the command");
        }
    }
}

/// The completion of one command: counts it and hands its answer to the ring thread, from
/// whichever thread answers it (an I/O thread, or a handler's own).
fn answer_fn(
    dev: &Arc<str>,
    cmd_id: u16,
    op: u8,
    len: u64,
    done: &Sender<Done>,
    wake: &Arc<EventFd>,
    counters: &Arc<Counters>,
) -> CompleteFn {
    let (dev, done, wake, counters) = (dev.clone(), done.clone(), wake.clone(), counters.clone());
    Box::new(move |result: CommandResult, how: Answer| {
        if how == Answer::Dropped {
            warn!(device = %dev, cmd_id, opcode = op,
                  "command dropped without an answer; failing it (HARDWARE ERROR, 04/44/00)");
        }
        counters.commands.fetch_add(1, Ordering::Relaxed);
        if result.status != status::GOOD {
            counters.errors.fetch_add(1, Ordering::Relaxed);
        } else {
            match medium_access(op) {
                MediumAccess::Read => {
                    counters
                        .bytes_read
                        .fetch_add(result.read_len.map_or(len, u64::from), Ordering::Relaxed);
                }
                MediumAccess::Write => {
                    counters.bytes_written.fetch_add(len, Ordering::Relaxed);
                }
                MediumAccess::None => {}
            }
        }
        // The command's data buffers were released before this runs (see `Pending`).
        if done.send(Done { cmd_id, result }).is_ok() {
            let _ = wake.write(1);
        }
    })
}

/// The ring thread's side of [`DeviceBlock`]: while set, it fetches no new command.
struct RingBlock {
    dev: Arc<str>,
    blocked: AtomicBool,
    wake: Arc<EventFd>,
}

impl BlockSwitch for RingBlock {
    fn set_blocked(&self, blocked: bool) {
        if self.blocked.swap(blocked, Ordering::AcqRel) != blocked {
            if blocked {
                warn!(device = %self.dev, "the handler blocked the device: no new commands are fetched");
            } else {
                info!(device = %self.dev, "the handler unblocked the device");
            }
            // Wake the ring thread to fetch what waited meanwhile.
            let _ = self.wake.write(1);
        }
    }

    fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::Acquire)
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own, with an integer argument.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Consumes pending wake-ups: a UIO device returns a 4-byte event count per read.
fn drain_event(fd: &OwnedFd) -> io::Result<()> {
    let mut buf = [0u8; 4];
    loop {
        // SAFETY: reading at most 4 bytes into a 4-byte stack buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(()),
                io::ErrorKind::Interrupted => continue,
                _ => Err(e),
            };
        }
        if n == 0 {
            return Ok(());
        }
    }
}

/// Tells the kernel that completions are waiting: one 4-byte write.
fn notify(fd: &OwnedFd) -> io::Result<()> {
    let one: u32 = 1;
    loop {
        // SAFETY: writing the 4 bytes of a local u32.
        let n = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u32).cast(), 4) };
        if n == 4 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if n < 0 && e.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return Err(if n < 0 {
            e
        } else {
            io::Error::other("short notification write")
        });
    }
}
