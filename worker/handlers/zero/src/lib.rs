//! # `zero`: an example tcmu-warden handler
//!
//! A device of the `zero` subtype reads as zeros and discards what is written to it, like
//! `/dev/zero` behind a SCSI disk (Linux's `null_blk` does the same for block devices). It is the
//! example that `docs/handlers.md` walks through: a handler crate that depends on the handler
//! SDK (`tcmu-warden-sdk`) alone, plus `tcmu-warden-worker` for `worker_main` in its binary
//! (`src/main.rs`).
//!
//! Its cfgstring (the part of `dev_config=zero/<cfgstring>` after the subtype) is either empty
//! or `async`:
//! - empty: the *blocking* shape. The handler implements [`Handler::read`], [`Handler::write`],
//!   [`Handler::flush`] and [`Handler::unmap`]; the worker's SCSI emulation answers every
//!   command on top of them.
//! - `async`: the handler also answers READ(10) and READ(16) itself
//!   ([`Handler::implemented_opcodes`]), asynchronously: [`Handler::submit`] checks the CDB and
//!   queues the command to the device's completion thread, which fills the data with zeros and
//!   answers it through its [`Pending`] handle. This is the shape of a network handler, whose
//!   completions arrive on a thread of the network library's.
//!
//! It never panics on command input: a READ outside the device ends in ILLEGAL REQUEST / LOGICAL
//! BLOCK ADDRESS OUT OF RANGE (05/21/00), a transfer length beyond the device's limit in INVALID
//! FIELD IN CDB (05/24/00) pointing at the length field.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::OwnedFd;
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};

use tcmu_warden_sdk::{
    CommandResult, DeviceConfig, Handler, HandlerCaps, HandlerError, HandlerFactory, Pending, Sense,
};

/// READ(10).
pub const READ_10: u8 = 0x28;
/// READ(16).
pub const READ_16: u8 = 0x88;

/// Builds `zero` handlers.
#[derive(Debug, Default, Clone, Copy)]
pub struct ZeroFactory;

impl HandlerFactory for ZeroFactory {
    fn subtype(&self) -> &str {
        "zero"
    }

    /// A `zero` device has no backing store: the supervisor opens nothing for it.
    fn needs_backing_fd(&self) -> bool {
        false
    }

    /// Nothing beyond the worker runtime's own calls: the completion thread is an ordinary
    /// thread (the runtime makes threads too) waiting on a channel (futex). A handler that calls
    /// `io_uring_enter` or `sendmsg` lists the name here; see `docs/handlers.md`.
    fn syscalls(&self) -> &[&'static str] {
        &[]
    }

    fn open(
        &self,
        dev: &DeviceConfig,
        _backing: Option<OwnedFd>,
    ) -> Result<Arc<dyn Handler>, HandlerError> {
        let mode = Mode::parse(&dev.cfgstring)?;
        Ok(Arc::new(ZeroHandler::new(dev, mode)?))
    }
}

/// What the cfgstring selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Blocking: every command is emulated on top of read/write/flush/unmap.
    Blocking,
    /// READ(10) and READ(16) are answered asynchronously by the handler's completion thread.
    Async,
}

impl Mode {
    /// Parses a cfgstring: empty, or `async`.
    pub fn parse(cfgstring: &str) -> Result<Mode, HandlerError> {
        match cfgstring.trim() {
            "" => Ok(Mode::Blocking),
            "async" => Ok(Mode::Async),
            _ => Err(HandlerError::Config {
                cfgstring: cfgstring.to_owned(),
                why: "expected nothing or \"async\"".into(),
            }),
        }
    }
}

/// One `zero` device.
#[derive(Debug)]
pub struct ZeroHandler {
    block_size: u64,
    num_blocks: u64,
    /// Largest READ in blocks (0: no limit).
    max_blocks: u64,
    /// With [`Mode::Async`], the queue to the completion thread. The thread ends when the
    /// handler is dropped (the sender with it), after answering what it was given.
    queue: Option<Mutex<Sender<Queued>>>,
}

/// A READ waiting for the completion thread: the command and its byte length.
#[derive(Debug)]
struct Queued {
    cmd: Pending,
    len: usize,
}

impl ZeroHandler {
    /// A handler for `dev`; with [`Mode::Async`] this starts the device's completion thread.
    pub fn new(dev: &DeviceConfig, mode: Mode) -> Result<ZeroHandler, HandlerError> {
        let queue = match mode {
            Mode::Blocking => None,
            Mode::Async => {
                let (tx, rx) = channel::<Queued>();
                std::thread::Builder::new()
                    .name(format!("zero-{}", dev.name))
                    .spawn(move || {
                        // The one completion thread: answers in the order it receives, from a
                        // thread that is not the one that submitted.
                        for Queued { mut cmd, len } in rx {
                            cmd.data_mut().fill(0, len, 0);
                            cmd.complete(CommandResult::good());
                        }
                    })?;
                Some(Mutex::new(tx))
            }
        };
        Ok(ZeroHandler {
            block_size: u64::from(dev.block_size.max(1)),
            num_blocks: dev.num_blocks(),
            max_blocks: u64::from(dev.max_sectors),
            queue,
        })
    }

    /// The byte length of a READ(10)/READ(16), or the sense it ends in.
    fn read_length(&self, cdb: &[u8]) -> Result<usize, Sense> {
        let field = |range: std::ops::Range<usize>| -> Result<u64, Sense> {
            let bytes = cdb.get(range).ok_or(Sense::invalid_field_in_cdb(0, None))?;
            Ok(bytes.iter().fold(0u64, |n, &b| (n << 8) | u64::from(b)))
        };
        let (lba, blocks, len_byte) = match cdb.first() {
            Some(&READ_10) => (field(2..6)?, field(7..9)?, 7),
            Some(&READ_16) => (field(2..10)?, field(10..14)?, 10),
            _ => return Err(Sense::invalid_opcode()),
        };
        if self.max_blocks != 0 && blocks > self.max_blocks {
            return Err(Sense::invalid_field_in_cdb(len_byte, None));
        }
        match lba.checked_add(blocks) {
            Some(end) if lba < self.num_blocks && end <= self.num_blocks => {}
            _ => return Err(Sense::lba_out_of_range()),
        }
        usize::try_from(blocks.saturating_mul(self.block_size))
            .map_err(|_| Sense::invalid_field_in_cdb(len_byte, None))
    }
}

impl Handler for ZeroHandler {
    fn caps(&self) -> HandlerCaps {
        HandlerCaps {
            unmap: true,
            unmap_granularity: 1,
            unmap_reads_zero: true,
        }
    }

    fn read(&self, _offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        for b in bufs {
            b.fill(0);
        }
        Ok(())
    }

    fn write(&self, _offset: u64, _bufs: &[IoSlice<'_>], _durable: bool) -> io::Result<()> {
        // Discarded, and "durable" at once: there is nothing to lose.
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn unmap(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// Nothing is ever allocated: GET LBA STATUS reports every block deallocated.
    fn allocation(&self, _offset: u64, len: u64) -> io::Result<Option<(bool, u64)>> {
        Ok(Some((false, len.max(1))))
    }

    fn implemented_opcodes(&self) -> &[u8] {
        if self.queue.is_some() {
            &[READ_10, READ_16]
        } else {
            &[]
        }
    }

    fn submit(&self, cmd: Pending) {
        let len = match self.read_length(cmd.cdb()) {
            Ok(len) => len,
            Err(sense) => return cmd.complete(CommandResult::check(sense)),
        };
        let Some(queue) = &self.queue else {
            // Not reached: without a queue no opcode is implemented. Answer rather than assume.
            return cmd.complete(CommandResult::invalid_opcode());
        };
        let queue = queue.lock().unwrap_or_else(PoisonError::into_inner);
        // If the completion thread is gone, the command comes back inside the error and is
        // dropped here, which answers it with HARDWARE ERROR (the SDK's rule).
        let _ = queue.send(Queued { cmd, len });
    }
}
