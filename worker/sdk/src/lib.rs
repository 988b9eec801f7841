//! # tcmu-warden handler SDK
//!
//! Everything a *handler* author depends on, and nothing else. A **handler** serves one
//! *subtype* of TCMU backstore (`file`, `ram`, `zero`, `rbd`...): the administrator configures a
//! device as `dev_config=<subtype>/<cfgstring>`, the tcmu-warden supervisor hands it to the
//! worker that serves that subtype, and the worker's runtime fetches the device's SCSI commands
//! from the kernel's ring and executes them, with the handler holding the data. This crate
//! holds the [`Handler`] and [`HandlerFactory`] traits, [`DeviceConfig`] and [`HandlerCaps`], the
//! command types a handler sees ([`Command`], [`Pending`], [`CommandResult`], [`DataBuf`]), the
//! block requests of the asynchronous block I/O ([`BlockRequest`], [`BlockOp`]), and
//! sense data ([`Sense`], with the constructors of every sense the tcmu-warden emulation uses).
//! It depends on no configuration schema, no policy, no supervisor and no SCSI emulation: a
//! handler crate depends on this one, and its binary on `tcmu-warden-worker` for `worker_main`
//! alone. `docs/handlers.md` walks through an example handler step by step.
//!
//! ## Three shapes of handler
//! - **Blocking** (`file`, `ram`): implement [`Handler::read`], [`Handler::write`] and
//!   [`Handler::flush`] (and optionally [`Handler::unmap`], [`Handler::allocation`]). The
//!   worker's SCSI emulation answers every command (READ, WRITE, INQUIRY, MODE SENSE, UNMAP,
//!   COMPARE AND WRITE...) on top of them, calling them on the worker's shared pool of I/O
//!   threads, or, for a handler that declares [`Handler::nonblocking`] (`ram`), right on the
//!   worker's event-loop thread, without a thread hand-off.
//! - **Asynchronous** (a network or io_uring handler keeping hundreds of commands in flight
//!   from one thread): list the opcodes it answers itself in [`Handler::implemented_opcodes`]
//!   and override [`Handler::submit`]. It receives each such command as a [`Pending`], starts
//!   the work, returns at once, and later answers with [`Pending::complete`] from any thread,
//!   for instance its one completion thread, in any order. Every other opcode is still emulated
//!   on top of the blocking methods.
//!   A handler that answers some opcodes itself but blocks while doing it implements
//!   [`Handler::execute`] instead: the default [`Handler::submit`] calls it and completes
//!   (the blocking adapter).
//! - **Asynchronous block I/O** (a network handler that wants the worker's SCSI emulation but
//!   not a thread per request, as tcmu-runner's async read/write/flush/unmap): override
//!   [`Handler::submit_io`]. The emulation decodes and checks every command (ranges, transfer
//!   length, FUA, the write cache's durability, reserved bits) and hands the handler
//!   [`BlockRequest`]s: read, write (with `durable`), flush, unmap ([`BlockOp`]). The handler
//!   starts each, returns at once, and later calls [`BlockRequest::complete`] from any thread.
//!   The default [`Handler::submit_io`] runs the blocking methods, so blocking handlers need
//!   not know it exists. READ, WRITE, WRITE AND VERIFY without BYTCHK, SYNCHRONIZE CACHE,
//!   UNMAP and a WRITE SAME that deallocates hold no I/O thread while their requests are in
//!   flight; the commands that read, compare and write under one lock or step through a range
//!   (COMPARE AND WRITE, ORWRITE, VERIFY, a WRITE SAME that writes, FORMAT UNIT, EXTENDED
//!   COPY) submit their requests from an I/O thread and wait for each there. Only
//!   [`Handler::allocation`] (GET LBA STATUS) stays a blocking call.
//!
//! Why a completion handle and not a future: the backends this is for (librbd's `aio_*`
//! callbacks, an NBD client's reply reader, io_uring completion queues) already signal
//! completion on a thread of their own; a handle they can move into their callback and consume
//! there needs no executor in the worker, no waker plumbing and no pinning of ring-backed
//! buffers, and "answered exactly once" is the ownership of one value (consumed by
//! [`Pending::complete`], answered by its `Drop` otherwise) rather than a property of an
//! executor. A handler that prefers `async` code can run its own executor and complete from it.
//!
//! ## Rules a handler follows
//! - **Threads.** Every [`Handler`] method may be called concurrently from several of the
//!   worker's I/O threads, which all its devices share (use interior mutability);
//!   [`Handler::submit`] too. A handler declaring [`Handler::nonblocking`] is also called on the
//!   worker's event-loop thread, which serves every device of the worker: it must then never
//!   wait there. [`Pending`] is
//!   `Send`: [`Pending::complete`] may be called on any thread, including one the handler made
//!   or a library's callback thread, and never blocks for long. [`Handler::submit_io`] is
//!   called on an I/O thread, or, for a command's second step (the flush after an UNMAP on a
//!   device without a write cache), on the thread that completed its previous request; it
//!   returns quickly and never waits for the handler's own completions.
//!   [`BlockRequest::complete`], like [`Pending::complete`], may be called on any thread; the
//!   answer it produces reaches the kernel's ring only through the worker's event-loop thread.
//!   [`HandlerFactory::open`] is called on the worker's main thread.
//! - **Exactly one answer.** [`Pending::complete`] consumes the handle (and
//!   [`BlockRequest::complete`] its request: the same rules hold for block requests, a dropped
//!   one failing its command with 04/44/00). A handle dropped
//!   without an answer (forgotten, lost in a panic, or still queued when the handler itself is
//!   dropped) completes its command with CHECK CONDITION, HARDWARE ERROR / INTERNAL TARGET
//!   FAILURE (sense 04/44/00, [`CommandResult::internal_error`]) and the runtime logs it: the
//!   initiator gets an error, never a hang. A panic in any handler method also ends its command
//!   that way, and the device carries on.
//! - **Data buffers** belong to the command until it is answered: fill a data-in buffer before
//!   [`Pending::complete`]; after it, they are gone. A [`BlockRequest`]'s buffer likewise
//!   belongs to the request until [`BlockRequest::complete`].
//! - **Durability.** [`Handler::write`] with `durable == true` returns only once the data would
//!   survive power loss (the device has no volatile write cache, or the initiator set FUA).
//!   [`Handler::flush`] makes every completed write durable. A handler answering WRITEs itself
//!   owes the same, and so does one answering [`BlockOp::Write`] requests with `durable` set:
//!   it completes them only once durable; a [`BlockOp::Flush`] covers every write completed
//!   before the flush was submitted.
//! - [`Handler::read`] fills every byte it is asked for; reading beyond the end of a backing
//!   store that is shorter than the device returns zeros.
//! - **Never panic on command input**: errors are returned and become sense data
//!   ([`Sense`] has a constructor for each sense a handler is likely to need: MEDIUM ERROR,
//!   DATA PROTECT, ILLEGAL REQUEST with a field pointer, ...).
//! - **Blocking the device.** A handler that cannot take new commands for a while (its
//!   backend is reconnecting) calls [`DeviceBlock::block`] on the switch from
//!   [`Pending::device_block`] (it may keep a clone), answers or holds what it has, and calls
//!   [`DeviceBlock::unblock`] when it can go on. While blocked, the runtime fetches no new
//!   command; the kernel keeps them queued and the initiator waits. Commands it answers BUSY
//!   ([`CommandResult::busy`]) are retried by the initiator.
//! - **System calls.** The worker runs under a seccomp allow-list: list in
//!   [`HandlerFactory::syscalls`] every system call the handler makes beyond the runtime's.
//!
//! This crate owns the handler-facing API; it never decodes CDBs on a handler's behalf, never
//! touches the ring, and never links anything a handler does not need.

pub mod block;
pub mod buf;
mod command;
mod completion;
mod handler;
pub mod sense;

pub use block::{BlockDoneFn, BlockOp, BlockRequest};
pub use buf::{BufOwner, DataBuf};
pub use command::{Command, CommandResult, status};
pub use completion::{Answer, BlockSwitch, CompleteFn, DeviceBlock, Pending};
pub use handler::{DeviceConfig, Handler, HandlerCaps, HandlerError, HandlerFactory};
pub use sense::Sense;
