//! # The handler traits and what a handler learns about its device
//!
//! [`HandlerFactory`] builds a [`Handler`] for each device of its subtype, from a
//! [`DeviceConfig`] (the device's name, size, block size and cfgstring) and, for subtypes whose
//! factory says [`HandlerFactory::needs_backing_fd`], a descriptor the supervisor opened.
//! See the crate documentation for the rules a handler follows.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::block::{BlockRequest, run_blocking};
use crate::command::{Command, CommandResult};
use crate::completion::Pending;

/// What a handler learns about its device when it is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// The backstore's name in configfs.
    pub name: String,
    /// The subtype (first element of `dev_config`).
    pub subtype: String,
    /// The rest of `dev_config`: handler-specific (the **cfgstring**).
    pub cfgstring: String,
    /// Device size in bytes.
    pub dev_size: u64,
    /// Logical block size in bytes (a power of two, 512..=65536).
    pub block_size: u32,
    /// Largest transfer in blocks: MAXIMUM TRANSFER LENGTH in the block limits VPD page, and
    /// longer READ/WRITE-family commands are INVALID FIELD IN CDB (0: no limit). The worker
    /// runtime derives it from the kernel's `hw_max_sectors` (with a floor, see
    /// `tcmu_warden_worker::runtime::MIN_MAX_TRANSFER_BYTES`).
    pub max_sectors: u32,
    /// Whether the device advertises a volatile write cache (WCE=1).
    pub write_cache: bool,
    /// Unit serial number, for VPD pages 0x80 and 0x83.
    pub unit_serial: String,
}

impl DeviceConfig {
    /// Number of whole logical blocks on the device.
    pub fn num_blocks(&self) -> u64 {
        self.dev_size / u64::from(self.block_size.max(1))
    }
}

/// Capabilities a handler advertises, which shape the emulated VPD pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HandlerCaps {
    /// The handler implements [`Handler::unmap`] (thin provisioning, UNMAP, WRITE SAME with UNMAP).
    pub unmap: bool,
    /// Unmap granularity in logical blocks (0: not reported).
    pub unmap_granularity: u32,
    /// Unmapped blocks read back as zeros.
    pub unmap_reads_zero: bool,
}

/// Errors opening a handler.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The cfgstring is not acceptable to this handler.
    #[error("bad cfgstring {cfgstring:?}: {why}")]
    Config {
        /// The offending cfgstring.
        cfgstring: String,
        /// Why.
        why: String,
    },
    /// The handler needs a backing-store descriptor that the supervisor did not pass.
    #[error("no backing store was passed for this device")]
    NoBacking,
    /// Opening or inspecting the backing store failed.
    #[error("backing store: {0}")]
    Io(#[from] io::Error),
}

/// One device's data store. See the crate documentation for the rules.
///
/// The block methods ([`Handler::read`], [`Handler::write`], [`Handler::flush`],
/// [`Handler::unmap`], [`Handler::allocation`]) are the *blocking* shape: the worker's SCSI
/// emulation calls them on one of the worker's I/O threads (or its event loop, for a [`Handler::nonblocking`] handler) and waits. The command methods
/// ([`Handler::implemented_opcodes`], [`Handler::submit`], [`Handler::execute`]) let a handler
/// answer whole SCSI commands itself, asynchronously through [`Handler::submit`] or blocking
/// through [`Handler::execute`]. Between the two sits [`Handler::submit_io`]: the emulation's
/// block I/O, asynchronous, which by default runs the blocking block methods.
pub trait Handler: Send + Sync {
    /// What the handler supports beyond read/write/flush.
    fn caps(&self) -> HandlerCaps {
        HandlerCaps::default()
    }

    /// Whether every call the runtime makes for a command ([`Handler::submit_io`] and the
    /// blocking block methods behind its default, [`Handler::submit`]) returns within
    /// microseconds, never waiting for a disk, a network or another thread (an in-memory
    /// store, or a handler whose `submit_io`/`submit` only queue the work). The worker then
    /// runs such commands on its event-loop thread, with no hand-off to an I/O thread; with
    /// `false` (the default) they run on the worker's shared I/O pool, so a slow handler never
    /// holds up other devices. Read once, when the device is opened. Declaring `true` for a
    /// handler that does block stalls every device of the worker while it blocks.
    fn nonblocking(&self) -> bool {
        false
    }

    /// Reads `bufs` full from byte `offset` of the device.
    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()>;

    /// Writes all of `bufs` at byte `offset`; with `durable`, returns only once it is durable.
    fn write(&self, offset: u64, bufs: &[IoSlice<'_>], durable: bool) -> io::Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// Deallocates `[offset, offset+len)`; afterwards it reads as zeros if
    /// [`HandlerCaps::unmap_reads_zero`]. Only called when [`HandlerCaps::unmap`] is set.
    fn unmap(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// Whether the storage at byte `offset` is allocated, and for how many bytes from `offset`
    /// (at least 1, at most `len`) that stays the same: `Some((allocated, bytes))`. GET LBA
    /// STATUS reports unallocated blocks as deallocated. `None`: the handler cannot tell (every
    /// block is then reported as mapped). Only called when [`HandlerCaps::unmap`] is set.
    fn allocation(&self, _offset: u64, _len: u64) -> io::Result<Option<(bool, u64)>> {
        Ok(None)
    }

    /// Starts one block operation of the SCSI emulation (read, write, flush or unmap; see
    /// [`BlockRequest`]) and completes it, now or later and from any thread, with
    /// [`BlockRequest::complete`].
    ///
    /// Every block I/O of the emulation goes through here: READ, WRITE, SYNCHRONIZE CACHE and
    /// UNMAP hand their request over and free the I/O thread at once, holding the command (and
    /// its range lock) until the request completes; the commands the emulation runs blocking
    /// (COMPARE AND WRITE, VERIFY, WRITE SAME...) submit here too and wait on their I/O thread.
    ///
    /// Called on one of the worker's I/O threads (its event-loop thread for a [`Handler::nonblocking`] handler), or (for the second step of a command, such
    /// as the flush after an UNMAP on a device without a write cache) on the thread that
    /// completed the command's previous request. It must return quickly and must never wait for
    /// the handler's own completions. The default runs the request on [`Handler::read`],
    /// [`Handler::write`], [`Handler::flush`] or [`Handler::unmap`] right here and completes it
    /// before returning ([`crate::block::run_blocking`]): blocking handlers keep working
    /// unchanged. A handler that overrides it may implement the blocking methods as errors.
    fn submit_io(&self, req: BlockRequest) {
        run_blocking(self, req);
    }

    /// The device was resized to `new_size` bytes.
    fn resize(&self, _new_size: u64) -> io::Result<()> {
        Ok(())
    }

    /// SCSI opcodes (CDB byte 0) this handler executes itself, through [`Handler::submit`]
    /// (which by default calls [`Handler::execute`]). Read once, when the device is opened.
    fn implemented_opcodes(&self) -> &[u8] {
        &[]
    }

    /// Starts a command whose opcode is in [`Handler::implemented_opcodes`]; the handler answers
    /// it, now or later and from any thread, with [`Pending::complete`].
    ///
    /// Called on one of the worker's I/O threads (its event-loop thread for a [`Handler::nonblocking`] handler), after the runtime has checked what applies to
    /// every command (a refused device, a pending unit attention). It should return quickly: an
    /// asynchronous handler queues the command (to librbd, an NBD socket, io_uring...) and
    /// returns. The default runs [`Handler::execute`] right here and completes with its result:
    /// the blocking adapter.
    fn submit(&self, mut cmd: Pending) {
        let result = self.execute(&mut cmd.command());
        cmd.complete(result);
    }

    /// Executes a command whose opcode is in [`Handler::implemented_opcodes`], blocking: used by
    /// the default [`Handler::submit`], and by callers that run commands synchronously (the SCSI
    /// emulation's unit tests and fuzzers). A handler that overrides [`Handler::submit`] may
    /// leave this as it is.
    fn execute(&self, _cmd: &mut Command<'_>) -> CommandResult {
        CommandResult::invalid_opcode()
    }
}

/// Builds handlers of one subtype.
pub trait HandlerFactory: Send + Sync {
    /// The subtype served, e.g. `"file"`.
    fn subtype(&self) -> &str;

    /// Whether devices of this subtype come with a backing-store descriptor opened by the
    /// supervisor (the cfgstring names a path the policy must allow).
    fn needs_backing_fd(&self) -> bool {
        false
    }

    /// System calls this subtype's handlers make beyond what the worker runtime needs, by name
    /// as in `<asm/unistd.h>` (e.g. `"pwritev2"`). The worker's stage-two seccomp filter allows
    /// exactly the runtime's calls, these, and the policy's `syscalls`; anything else kills the
    /// worker, and a name the worker does not know refuses to start it. Calls the stage-one
    /// deny-list refuses (mount, ptrace, ...) stay refused whatever is declared.
    fn syscalls(&self) -> &[&'static str] {
        &[]
    }

    /// Opens the handler for one device. `backing` is the descriptor the supervisor opened, if any.
    fn open(
        &self,
        dev: &DeviceConfig,
        backing: Option<OwnedFd>,
    ) -> Result<Arc<dyn Handler>, HandlerError>;
}
