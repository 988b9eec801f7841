//! # Serving a worker's devices: one event loop and one shared I/O pool
//!
//! A worker serves all its devices from a fixed set of threads, whatever their number: one
//! *event-loop thread* ([`Engine`]) and one shared pool of *I/O threads*, its size set by
//! configuration ([`DeviceOptions::io_threads`]):
//!
//! ```text
//!   kernel ──(cmd_head, uio event)──▶ event loop ──cheap commands──▶ Emulator ──▶ Handler (inline)
//!                                         │ └──────blocking commands──▶ I/O pool ──▶ Emulator ──▶ Handler
//!   kernel ◀──(cmd_tail, 4-byte write)── event loop ◀──answers (channel + one shared eventfd)──┘
//! ```
//!
//! The event loop waits in `epoll` on every device's UIO descriptor and on one eventfd of its
//! own (typed tokens, [`Token`]). It is the only code that touches the rings (and their
//! in-flight journals): when a device's descriptor is readable it fetches every new entry and
//! either runs the command right there (*inline*: what [`Emulator::runs_inline`] says cannot
//! block: the emulation's own SPC commands, and the block I/O of a handler that declares itself
//! [`tcmu_warden_sdk::Handler::nonblocking`], such as `ram`) or hands it to the pool. I/O
//! threads only see a command's own CDB and data buffers: each wraps its command in the SDK's
//! completion handle ([`Pending`]) and submits it to the emulator; a handler may keep the handle
//! and answer later from any thread, and so may the emulation's asynchronous block path
//! ([`tcmu_warden_sdk::Handler::submit_io`]). Every answer goes through the same path: counted,
//! sent on the engine's completion channel, and, from a thread other than the loop, the loop
//! woken through its eventfd (one write per batch: a flag says whether a wake-up is already
//! pending). The loop writes answers back (out of order, as they finish) and notifies each
//! device's kernel once per batch, only when its tail moved. A handle dropped unanswered answers
//! its command with HARDWARE ERROR / INTERNAL TARGET FAILURE (04/44/00), so every command is
//! answered exactly once. A handler can also block its device ([`DeviceBlock`]): the loop then
//! fetches nothing new from that device until it is unblocked, and keeps delivering answers.
//!
//! Idle devices cost nothing: the loop sleeps in `epoll_wait` with no timeout unless a device is
//! draining (then it wakes every 100 ms to check the drain deadline), or unless a device's
//! descriptor cannot be polled (`epoll` refuses regular files, which some tests pass in place of
//! a UIO node): such a device is served every round, and the loop wakes every millisecond. There
//! is no busy-polling: it was not tried (issue 11 asks for it only where it measurably helps).
//!
//! A device can also start from a [`Recovery`] (a ring rebuilt from a dead worker's journal):
//! before fetching anything new, its recovered commands that are safe to run twice (see
//! [`super::replay`]) are executed again and the others answered BUSY, so that each command the
//! kernel still waits for is completed exactly once.
//!
//! [`DeviceRunner::start`] keeps the earlier one-device shape for tests and tools: it starts a
//! private engine (one loop thread, its own pool) that ends with the device.
//!
//! This module must never block the event loop on a handler that may block, and never let a
//! handler's failure (an error or even a panic, inline or on the pool) take a device down: every
//! command ends with a SCSI status. When a device ends abnormally, its commands still queued for
//! the pool are abandoned rather than executed: their results could no longer be delivered.

use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
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

/// Tuning of an engine (a worker's, or a [`DeviceRunner::start`]'s private one).
#[derive(Debug, Clone, Copy)]
pub struct DeviceOptions {
    /// Threads of the shared I/O pool, executing blocking commands concurrently (at least 1).
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

/// Called once on the event-loop thread when the device stops, with how it ended.
pub type OnExit = Box<dyn FnOnce(&Result<(), DeviceError>) + Send>;

/// What an `epoll` event's data names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    /// The engine's own eventfd: control messages or answers from other threads.
    Wake,
    /// A device's UIO descriptor (by engine-local device id, never 0).
    Device(u64),
}

impl Token {
    fn encode(self) -> u64 {
        match self {
            Token::Wake => 0,
            Token::Device(id) => id,
        }
    }

    fn decode(v: u64) -> Token {
        if v == 0 {
            Token::Wake
        } else {
            Token::Device(v)
        }
    }
}

/// One answer for the loop.
struct Done {
    dev: u64,
    cmd_id: u16,
    result: CommandResult,
}

/// What the loop is told by the engine's handles.
enum Ctl {
    Add(Box<NewDevice>),
    Stop(u64),
    /// The handler unblocked the device: fetch what waited meanwhile.
    Kick(u64),
    Shutdown,
}

struct NewDevice {
    id: u64,
    ring: Ring,
    recovered: Vec<Recovered>,
    event: OwnedFd,
    shared: Arc<DevShared>,
    on_exit: OnExit,
    result: Sender<Result<(), DeviceError>>,
    finished: Arc<AtomicBool>,
}

/// What the loop, the pool and the answers share.
struct Shared {
    wake: EventFd,
    /// A wake-up is written and not yet consumed: further senders need not write again.
    signalled: AtomicBool,
    ctl: Mutex<Vec<Ctl>>,
    done_tx: Sender<Done>,
}

thread_local! {
    /// Set on an event-loop thread: answers given there need no wake-up (the loop reaps its
    /// completion channel after running commands inline).
    static ON_LOOP: Cell<bool> = const { Cell::new(false) };
}

impl Shared {
    fn wake(&self) {
        if ON_LOOP.with(Cell::get) {
            return;
        }
        if !self.signalled.swap(true, Ordering::SeqCst) {
            let _ = self.wake.write(1);
        }
    }

    fn control(&self, msg: Ctl) {
        self.ctl
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(msg);
        // Control messages always write: the loop may be this thread only for Kick.
        if !self.signalled.swap(true, Ordering::SeqCst) {
            let _ = self.wake.write(1);
        }
    }
}

/// One device as the pool and its answers see it.
struct DevShared {
    id: u64,
    name: Arc<str>,
    emulator: Arc<Emulator>,
    counters: Arc<Counters>,
    /// The device ended: queued commands are not executed.
    abandoned: AtomicBool,
    block: DeviceBlock,
    /// Whether the handler has blocked the device.
    blocked: Arc<RingBlock>,
    engine: Arc<Shared>,
}

/// One command for the I/O pool.
struct Job {
    dev: Arc<DevShared>,
    cmd: RingCommand,
    /// A command the previous worker had accepted and the recovery runs again: it was issued
    /// before the restart, so the restart's unit attention is not reported to it.
    replay: bool,
}

struct EngineCore {
    shared: Arc<Shared>,
    next_id: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
    count: usize,
}

impl Drop for EngineCore {
    fn drop(&mut self) {
        self.shared.control(Ctl::Shutdown);
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for t in threads {
            if t.join().is_err() {
                warn!("an engine thread panicked");
            }
        }
    }
}

/// A worker's event loop and I/O pool, serving any number of devices. Cheap to clone; the
/// threads end (after the devices still served are abandoned) when the last clone and the last
/// [`DeviceRunner`] started on it are gone.
#[derive(Clone)]
pub struct Engine {
    core: Arc<EngineCore>,
}

impl Engine {
    /// Starts the event-loop thread and `opts.io_threads` I/O threads.
    pub fn new(opts: DeviceOptions) -> io::Result<Engine> {
        let wake =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        epoll
            .add(
                wake.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, Token::Wake.encode()),
            )
            .map_err(io::Error::from)?;
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
        let shared = Arc::new(Shared {
            wake,
            signalled: AtomicBool::new(false),
            ctl: Mutex::new(Vec::new()),
            done_tx,
        });
        let mut threads = Vec::new();
        let n = opts.io_threads.max(1);
        for i in 0..n {
            let (rx, shared) = (job_rx.clone(), shared.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("io-{i}"))
                    .spawn(move || io_loop(&rx, &shared))?,
            );
        }
        drop(job_rx);
        let sh = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("events".into())
                .spawn(move || {
                    ON_LOOP.with(|c| c.set(true));
                    let mut l = Loop {
                        epoll,
                        shared: sh,
                        done_rx,
                        jobs: job_tx,
                        devices: HashMap::new(),
                        touched: Vec::new(),
                        always_ready: Vec::new(),
                        stopping: 0,
                    };
                    l.run();
                })?,
        );
        Ok(Engine {
            core: Arc::new(EngineCore {
                shared,
                next_id: AtomicU64::new(1),
                threads: Mutex::new(threads),
                count: n + 1,
            }),
        })
    }

    /// The engine's threads: the event loop and the I/O pool.
    pub fn threads(&self) -> usize {
        self.core.count
    }

    /// Starts serving `ring` on this engine. `event` is the descriptor the kernel signals new
    /// commands on and that we write to after completing (the `/dev/uioN` itself on a real
    /// system).
    pub fn start(
        &self,
        name: String,
        ring: Ring,
        event: OwnedFd,
        emulator: Arc<Emulator>,
        on_exit: OnExit,
    ) -> io::Result<DeviceRunner> {
        self.start_with(name, ring, Vec::new(), event, emulator, on_exit, None)
    }

    /// Starts serving a ring rebuilt by [`Ring::recover`]: its recovered commands are finished
    /// first (re-executed when replay-safe, else answered BUSY), then the ring is served as
    /// usual. The recovery's re-delivered responses are announced to the kernel at once.
    pub fn start_recovered(
        &self,
        name: String,
        recovery: Recovery,
        event: OwnedFd,
        emulator: Arc<Emulator>,
        on_exit: OnExit,
    ) -> io::Result<DeviceRunner> {
        self.start_with(
            name,
            recovery.ring,
            recovery.commands,
            event,
            emulator,
            on_exit,
            None,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn start_with(
        &self,
        name: String,
        ring: Ring,
        recovered: Vec<Recovered>,
        event: OwnedFd,
        emulator: Arc<Emulator>,
        on_exit: OnExit,
        private: Option<Engine>,
    ) -> io::Result<DeviceRunner> {
        set_nonblocking(&event)?;
        let id = self.core.next_id.fetch_add(1, Ordering::Relaxed);
        let dev_name: Arc<str> = Arc::from(name.as_str());
        let block = Arc::new(RingBlock {
            dev: dev_name.clone(),
            id,
            blocked: AtomicBool::new(false),
            shared: self.core.shared.clone(),
        });
        let counters = Arc::new(Counters::default());
        let shared = Arc::new(DevShared {
            id,
            name: dev_name,
            emulator,
            counters: counters.clone(),
            abandoned: AtomicBool::new(false),
            block: DeviceBlock::new(block.clone()),
            blocked: block,
            engine: self.core.shared.clone(),
        });
        let (result, result_rx) = crossbeam_channel::bounded(1);
        let finished = Arc::new(AtomicBool::new(false));
        self.core.shared.control(Ctl::Add(Box::new(NewDevice {
            id,
            ring,
            recovered,
            event,
            shared,
            on_exit,
            result,
            finished: finished.clone(),
        })));
        Ok(DeviceRunner {
            name,
            id,
            engine: Some(private.unwrap_or_else(|| self.clone())),
            counters,
            finished,
            result: result_rx,
            stopped: false,
        })
    }
}

/// A device served by an [`Engine`]. Dropping it without [`DeviceRunner::stop`] stops it too.
pub struct DeviceRunner {
    name: String,
    id: u64,
    engine: Option<Engine>,
    counters: Arc<Counters>,
    finished: Arc<AtomicBool>,
    result: Receiver<Result<(), DeviceError>>,
    stopped: bool,
}

impl DeviceRunner {
    /// Starts serving `ring` on a private engine of its own (one event-loop thread and
    /// `opts.io_threads` I/O threads) that ends with the device. A worker serving several
    /// devices uses one [`Engine`] for all of them instead.
    pub fn start(
        name: String,
        ring: Ring,
        event: OwnedFd,
        emulator: Arc<Emulator>,
        opts: DeviceOptions,
        on_exit: OnExit,
    ) -> io::Result<DeviceRunner> {
        let engine = Engine::new(opts)?;
        engine.start_with(
            name,
            ring,
            Vec::new(),
            event,
            emulator,
            on_exit,
            Some(engine.clone()),
        )
    }

    /// [`Engine::start_recovered`] on a private engine, as [`DeviceRunner::start`].
    pub fn start_recovered(
        name: String,
        recovery: Recovery,
        event: OwnedFd,
        emulator: Arc<Emulator>,
        opts: DeviceOptions,
        on_exit: OnExit,
    ) -> io::Result<DeviceRunner> {
        let engine = Engine::new(opts)?;
        engine.start_with(
            name,
            recovery.ring,
            recovery.commands,
            event,
            emulator,
            on_exit,
            Some(engine.clone()),
        )
    }

    /// The device's counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Whether the device has ended (stopped or failed).
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// Stops fetching, lets in-flight commands finish (up to the drain deadline), and returns
    /// how the device ended. A private engine's threads are joined before this returns.
    pub fn stop(mut self) -> Result<(), DeviceError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), DeviceError> {
        self.stopped = true;
        let Some(engine) = self.engine.take() else {
            return Ok(());
        };
        engine.core.shared.control(Ctl::Stop(self.id));
        let r = self.result.recv().unwrap_or_else(|_| {
            Err(DeviceError::Io(io::Error::other(
                "the event loop ended without an answer",
            )))
        });
        if let Err(e) = &r {
            debug!(device = %self.name, error = %e, "device ended with an error");
        }
        // The last handle of a private engine joins its threads here.
        drop(engine);
        r
    }
}

impl Drop for DeviceRunner {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.shutdown();
        }
    }
}

/// How long a stopping device waits for in-flight commands.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// Events taken per `epoll_wait`.
const EVENTS: usize = 64;

/// A device as the event loop holds it.
struct LoopDevice {
    ring: Ring,
    event: OwnedFd,
    shared: Arc<DevShared>,
    on_exit: Option<OnExit>,
    result: Sender<Result<(), DeviceError>>,
    finished: Arc<AtomicBool>,
    stopping: Option<Instant>,
    /// `epoll` refused its descriptor (a regular file, which `poll` reports as always ready,
    /// as some tests pass in place of a UIO node): it is served every round instead.
    always_ready: bool,
    /// Answered or fetched in this round: notify its kernel and check its drain.
    touched: bool,
}

struct Loop {
    epoll: Epoll,
    shared: Arc<Shared>,
    done_rx: Receiver<Done>,
    jobs: Sender<Job>,
    devices: HashMap<u64, LoopDevice>,
    touched: Vec<u64>,
    /// Devices served every round (see [`LoopDevice::always_ready`]).
    always_ready: Vec<u64>,
    /// Devices draining towards their stop.
    stopping: usize,
}

impl Loop {
    fn run(&mut self) {
        let mut events = [EpollEvent::empty(); EVENTS];
        let mut ready: Vec<(u64, bool)> = Vec::new();
        loop {
            let timeout = if !self.always_ready.is_empty() {
                EpollTimeout::from(1u16)
            } else if self.stopping > 0 {
                EpollTimeout::from(100u16)
            } else {
                EpollTimeout::NONE
            };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => {
                    error!(error = %e, "the event loop cannot wait; failing every device");
                    let ids: Vec<u64> = self.devices.keys().copied().collect();
                    for id in ids {
                        self.end(id, Err(DeviceError::Io(e.into())));
                    }
                    return;
                }
            };
            let mut woken = false;
            ready.clear();
            ready.extend(self.always_ready.iter().map(|&id| (id, false)));
            for ev in events.iter().take(n) {
                match Token::decode(ev.data()) {
                    Token::Wake => woken = true,
                    Token::Device(id) => {
                        let hangup = ev
                            .events()
                            .intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR);
                        ready.push((id, hangup));
                    }
                }
            }
            if woken {
                let _ = self.shared.wake.read();
                self.shared.signalled.store(false, Ordering::SeqCst);
                let msgs = std::mem::take(
                    &mut *self
                        .shared
                        .ctl
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner),
                );
                for m in msgs {
                    match m {
                        Ctl::Add(d) => self.add(*d),
                        Ctl::Stop(id) => {
                            if let Some(d) = self.devices.get_mut(&id) {
                                if d.stopping.is_none() {
                                    d.stopping = Some(Instant::now());
                                    self.stopping += 1;
                                }
                                mark(&mut self.touched, id, d);
                            }
                        }
                        Ctl::Kick(id) => ready.push((id, false)),
                        Ctl::Shutdown => {
                            let ids: Vec<u64> = self.devices.keys().copied().collect();
                            for id in ids {
                                self.end(
                                    id,
                                    Err(DeviceError::Io(io::Error::other(
                                        "the worker's engine shut down",
                                    ))),
                                );
                            }
                            return;
                        }
                    }
                }
            }
            // Completions first: they free ring space for the kernel.
            self.reap();
            for &(id, hangup) in &ready {
                if hangup {
                    // A UIO device whose backstore was deleted polls as an error (the
                    // simulator's socket as a hang-up): nothing more will arrive on this ring.
                    if self.devices.contains_key(&id) {
                        self.end(id, Err(DeviceError::Gone));
                    }
                    continue;
                }
                let r = match self.devices.get_mut(&id) {
                    Some(d) => {
                        mark(&mut self.touched, id, d);
                        serve(d, &self.jobs)
                    }
                    None => continue,
                };
                if let Err(e) = r {
                    self.end(id, Err(e));
                }
            }
            // Answers given inline while serving.
            self.reap();
            self.finish_round();
        }
    }

    fn add(&mut self, d: NewDevice) {
        let NewDevice {
            id,
            mut ring,
            recovered,
            event,
            shared,
            on_exit,
            result,
            finished,
        } = d;
        let mut always_ready = false;
        let registered = match self.epoll.add(
            event.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, Token::Device(id).encode()),
        ) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EPERM) => {
                debug!(device = %shared.name, "descriptor cannot be polled; serving it every round");
                always_ready = true;
                self.always_ready.push(id);
                Ok(())
            }
            Err(e) => Err(DeviceError::Io(e.into())),
        };
        let started =
            registered.and_then(|()| finish_recovered(&shared, &mut ring, recovered, &self.jobs));
        let dev = LoopDevice {
            ring,
            event,
            shared,
            on_exit: Some(on_exit),
            result,
            finished,
            stopping: None,
            always_ready,
            touched: false,
        };
        self.devices.insert(id, dev);
        if let Err(e) = started {
            self.end(id, Err(e));
            return;
        }
        if let Some(d) = self.devices.get_mut(&id) {
            mark(&mut self.touched, id, d);
            // Entries may already wait (the kernel's event may have come before we listened).
            if let Err(e) = serve(d, &self.jobs) {
                self.end(id, Err(e));
            }
        }
    }

    /// Writes every answer waiting on the completion channel into its ring.
    fn reap(&mut self) {
        while let Ok(Done {
            dev,
            cmd_id,
            result,
        }) = self.done_rx.try_recv()
        {
            let Some(d) = self.devices.get_mut(&dev) else {
                // The device ended meanwhile: nobody can deliver this answer.
                continue;
            };
            mark(&mut self.touched, dev, d);
            if let Err(e) = complete(&mut d.ring, cmd_id, &result) {
                self.end(dev, Err(e.into()));
            }
        }
    }

    /// Notifies each touched device's kernel once, and ends the devices whose drain is over.
    fn finish_round(&mut self) {
        let touched = std::mem::take(&mut self.touched);
        for id in &touched {
            let Some(d) = self.devices.get_mut(id) else {
                continue;
            };
            d.touched = false;
            // One notification per batch, and only when the tail really moved (without
            // CAP_OOOC an early completion may wait for an older command).
            if d.ring.take_tail_moved()
                && let Err(e) = notify(&d.event)
            {
                self.end(*id, Err(e.into()));
            }
        }
        self.touched = touched;
        self.touched.clear();
        if self.stopping == 0 {
            return;
        }
        let draining: Vec<(u64, usize, Instant)> = self
            .devices
            .iter()
            .filter_map(|(&id, d)| d.stopping.map(|t| (id, d.ring.in_flight(), t)))
            .collect();
        for (id, in_flight, started) in draining {
            if in_flight == 0 {
                self.end(id, Ok(()));
            } else if started.elapsed() > DRAIN_DEADLINE {
                self.end(id, Err(DeviceError::DrainTimeout(in_flight)));
            }
        }
    }

    /// The device ends: it leaves the loop, its queued commands are abandoned, `on_exit` runs
    /// and its runner learns how it ended.
    fn end(&mut self, id: u64, r: Result<(), DeviceError>) {
        let Some(mut d) = self.devices.remove(&id) else {
            return;
        };
        if d.always_ready {
            self.always_ready.retain(|&x| x != id);
        } else {
            let _ = self.epoll.delete(d.event.as_fd());
        }
        if d.stopping.is_some() {
            self.stopping -= 1;
        }
        let dev = &d.shared.name;
        match &r {
            Ok(()) => info!(device = %dev, "device stopped"),
            Err(e) => {
                d.shared.abandoned.store(true, Ordering::Release);
                if matches!(e, DeviceError::Gone) {
                    warn!(device = %dev, "device removed by the kernel; no longer served");
                } else {
                    error!(device = %dev, error = %e, "device failed");
                }
            }
        }
        if let Some(on_exit) = d.on_exit.take() {
            on_exit(&r);
        }
        d.finished.store(true, Ordering::Release);
        let _ = d.result.send(r);
    }
}

fn mark(touched: &mut Vec<u64>, id: u64, d: &mut LoopDevice) {
    if !d.touched {
        d.touched = true;
        touched.push(id);
    }
}

/// One wake-up of a device: consumes its event, and fetches and dispatches every new entry
/// (unless it is stopping or blocked).
fn serve(d: &mut LoopDevice, jobs: &Sender<Job>) -> Result<(), DeviceError> {
    d.ring.crash_point(CrashPoint::LoopTop)?;
    drain_event(&d.event)?;
    if d.stopping.is_some() || d.shared.blocked.is_blocked() {
        return Ok(());
    }
    while let Some(entry) = d.ring.fetch()? {
        match entry {
            Fetched::Cmd(cmd) => dispatch(&d.shared, &mut d.ring, cmd, false, jobs)?,
            Fetched::Tmr(tmr) => {
                // Aborted commands still complete normally; the kernel ignores their status
                // once it has answered the task management request.
                debug!(device = %d.shared.name, tmr_type = tmr.tmr_type, commands = tmr.cmd_ids.len(),
                       "task management notification");
            }
            Fetched::Invalid { cmd_id, why } => {
                warn!(device = %d.shared.name, cmd_id, why = %why, "malformed ring entry failed");
                complete(&mut d.ring, cmd_id, &internal_error())?;
            }
        }
    }
    Ok(())
}

/// Runs a command inline when it cannot block, else queues it for the pool.
fn dispatch(
    dev: &Arc<DevShared>,
    ring: &mut Ring,
    cmd: RingCommand,
    replay: bool,
    jobs: &Sender<Job>,
) -> Result<(), DeviceError> {
    if dev.emulator.runs_inline(&cmd.cdb) {
        execute(dev, cmd, replay);
        return Ok(());
    }
    if let Err(e) = jobs.send(Job {
        dev: dev.clone(),
        cmd,
        replay,
    }) {
        // No I/O thread left: fail the command rather than lose it.
        let id = e.0.cmd.cmd_id;
        complete(ring, id, &internal_error())?;
    }
    Ok(())
}

/// Submits one command to its emulator, on whichever thread calls this.
fn execute(dev: &Arc<DevShared>, cmd: RingCommand, replay: bool) {
    let RingCommand {
        cmd_id,
        cdb,
        data,
        bidi_in,
        ..
    } = cmd;
    let op = cdb.first().copied().unwrap_or(0);
    let len = data.len() as u64;
    let answer = answer_fn(dev, cmd_id, op, len);
    let pending = Pending::new(cdb, data, bidi_in, dev.block.clone(), answer);
    // A panic drops the command's handle on the way out, which answers it (04/44/00).
    if catch_unwind(AssertUnwindSafe(|| dev.emulator.submit(pending, replay))).is_err() {
        error!(device = %dev.name, opcode = op, "command handler panicked; failing the command");
    }
}

fn io_loop(jobs: &Receiver<Job>, _shared: &Arc<Shared>) {
    for Job { dev, cmd, replay } in jobs {
        if dev.abandoned.load(Ordering::Acquire) {
            // The device is gone: nobody could deliver the result.
            continue;
        }
        execute(&dev, cmd, replay);
    }
}

/// The completion of one command: counts it and hands its answer to the event loop, from
/// whichever thread answers it (the loop itself, an I/O thread, or a handler's own).
fn answer_fn(dev: &Arc<DevShared>, cmd_id: u16, op: u8, len: u64) -> CompleteFn {
    let dev = dev.clone();
    Box::new(move |result: CommandResult, how: Answer| {
        if how == Answer::Dropped {
            warn!(device = %dev.name, cmd_id, opcode = op,
                  "command dropped without an answer; failing it (HARDWARE ERROR, 04/44/00)");
        }
        let counters = &dev.counters;
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
        let shared = &dev.engine;
        if shared
            .done_tx
            .send(Done {
                dev: dev.id,
                cmd_id,
                result,
            })
            .is_ok()
        {
            shared.wake();
        }
    })
}

/// The loop's side of [`DeviceBlock`]: while set, it fetches no new command from the device.
struct RingBlock {
    dev: Arc<str>,
    id: u64,
    blocked: AtomicBool,
    shared: Arc<Shared>,
}

impl BlockSwitch for RingBlock {
    fn set_blocked(&self, blocked: bool) {
        if self.blocked.swap(blocked, Ordering::AcqRel) != blocked {
            if blocked {
                warn!(device = %self.dev, "the handler blocked the device: no new commands are fetched");
            } else {
                info!(device = %self.dev, "the handler unblocked the device");
                // Wake the loop to fetch what waited meanwhile.
                self.shared.control(Ctl::Kick(self.id));
            }
        }
    }

    fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::Acquire)
    }
}

/// Hands the recovered commands to the pool or runs them inline (replay-safe ones), or answers
/// them BUSY.
fn finish_recovered(
    dev: &Arc<DevShared>,
    ring: &mut Ring,
    recovered: Vec<Recovered>,
    jobs: &Sender<Job>,
) -> Result<(), DeviceError> {
    if recovered.is_empty() {
        return Ok(());
    }
    let name = &dev.name;
    let (mut replayed, mut busy, mut invalid) = (0usize, 0usize, 0usize);
    for r in recovered {
        match r {
            Recovered::Pending(cmd) if is_replay_safe(&cmd.cdb) => {
                replayed += 1;
                dispatch(dev, ring, cmd, true, jobs)?;
            }
            Recovered::Pending(cmd) => {
                busy += 1;
                debug!(device = %name, cmd_id = cmd.cmd_id, opcode = cmd.cdb.first().copied().unwrap_or(0),
                       "recovered command is not safe to run twice; answering BUSY");
                ring.complete_command(cmd, &Completion::status(status::BUSY))?;
            }
            Recovered::Unreplayable { cmd_id, cdb } => {
                busy += 1;
                debug!(device = %name, cmd_id, opcode = cdb.first().copied().unwrap_or(0),
                       "recovered command's data layout was not journaled; answering BUSY");
                ring.complete(cmd_id, &Completion::status(status::BUSY))?;
            }
            Recovered::Invalid { cmd_id } => {
                invalid += 1;
                complete(ring, cmd_id, &internal_error())?;
            }
        }
    }
    info!(device = %name, replayed, busy, invalid, "finishing the commands the previous worker left running");
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
