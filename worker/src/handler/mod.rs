//! # Handlers: where a device's data lives
//!
//! A *handler* serves one *subtype* of TCMU backstore (`file`, `ram`, ...). The worker runtime
//! fetches SCSI commands from the ring, and the SCSI emulation ([`crate::scsi`]) turns the ones it
//! emulates into the few block operations of the [`Handler`] trait: read, write, flush and
//! (optionally) unmap. A handler that wants to answer some SCSI commands itself lists their
//! opcodes in [`Handler::implemented_opcodes`] and gets them, CDB and data, in
//! [`Handler::execute`]; the runtime emulates every other command.
//!
//! ## Writing a handler in your own crate
//! Implement [`Handler`] for your device type and [`HandlerFactory`] for something that builds it
//! from a [`DeviceConfig`], then hand your factories to [`crate::worker_main`] in your binary's
//! `main`. The result is a worker executable that speaks the supervisor's protocol and runs under
//! the same jail as the built-in one. List the system calls your handler makes beyond the
//! runtime's in [`HandlerFactory::syscalls`]: the worker's seccomp allow-list is built from them.
//!
//! ## Rules a handler must follow
//! - Methods are called concurrently from several threads; use interior mutability.
//! - [`Handler::write`] with `durable == true` returns only once the data would survive power loss
//!   (the device has no volatile write cache, or the initiator set FUA). [`Handler::flush`] makes
//!   every completed write durable.
//! - [`Handler::read`] fills every byte it is asked for; reading beyond the end of a backing store
//!   that is shorter than the device returns zeros.
//! - A handler never panics on command input; errors are returned and become SCSI sense data.
//!
//! This module owns the trait and the built-in handlers; it never decodes CDBs (that is
//! [`crate::scsi`]) and never touches the ring.

pub mod file;
pub mod ram;

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::scsi::{Command, CommandResult};

/// What a handler learns about its device when it is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// The backstore's name in configfs.
    pub name: String,
    /// The subtype (first element of `dev_config`).
    pub subtype: String,
    /// The rest of `dev_config`: handler-specific.
    pub cfgstring: String,
    /// Device size in bytes.
    pub dev_size: u64,
    /// Logical block size in bytes (a power of two, 512..=65536).
    pub block_size: u32,
    /// Largest transfer in blocks: MAXIMUM TRANSFER LENGTH in the block limits VPD page, and
    /// longer READ/WRITE-family commands are INVALID FIELD IN CDB (0: no limit). From a
    /// [`DeviceSpec`](tcmu_warden_proto::DeviceSpec) it is the device's `hw_max_sectors`, but at
    /// least [`MIN_MAX_TRANSFER_BYTES`] worth of blocks.
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

/// The smallest maximum transfer length a device gets, in bytes: 32 MiB, or a quarter of the
/// device's shared-memory region if that is smaller.
///
/// For a TCMU device `hw_max_sectors` is only a number the kernel hands to userspace: it is 128
/// blocks unless configured otherwise (`target_core_user.c`, `tcmu_configure_device`), and the
/// kernel never checks commands against it (`passthrough_parse_cdb` passes every READ/WRITE
/// through; LIO's own `fileio` backstore does not check its 8 MiB either). The only limit the
/// kernel applies to a TCMU command is the ring's data area (1 GiB by default): a larger command
/// is refused there with INVALID FIELD IN CDB (`tcmu_queue_cmd_ring`). Enforcing 128 blocks
/// would refuse commands the kernel delivers intact, so the limit is raised to this floor, which
/// leaves room for many such commands in flight; a larger configured `hw_max_sectors` is kept.
pub const MIN_MAX_TRANSFER_BYTES: u64 = 32 << 20;

impl From<&tcmu_warden_proto::DeviceSpec> for DeviceConfig {
    fn from(s: &tcmu_warden_proto::DeviceSpec) -> Self {
        DeviceConfig {
            name: s.name.clone(),
            subtype: s.subtype.clone(),
            cfgstring: s.cfgstring.clone(),
            dev_size: s.dev_size,
            block_size: s.block_size,
            max_sectors: if s.max_sectors == 0 {
                0
            } else {
                let floor =
                    MIN_MAX_TRANSFER_BYTES.min(s.map_size / 4) / u64::from(s.block_size.max(1));
                s.max_sectors.max(u32::try_from(floor).unwrap_or(u32::MAX))
            },
            write_cache: s.write_cache,
            unit_serial: s.unit_serial.clone(),
        }
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

/// One device's data store. See the module documentation for the rules.
pub trait Handler: Send + Sync {
    /// What the handler supports beyond read/write/flush.
    fn caps(&self) -> HandlerCaps {
        HandlerCaps::default()
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

    /// The device was resized to `new_size` bytes.
    fn resize(&self, _new_size: u64) -> io::Result<()> {
        Ok(())
    }

    /// SCSI opcodes (CDB byte 0) this handler executes itself through [`Handler::execute`].
    fn implemented_opcodes(&self) -> &[u8] {
        &[]
    }

    /// Executes a command whose opcode is in [`Handler::implemented_opcodes`].
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

    /// System calls this subtype's handlers make beyond what the worker runtime needs (by name,
    /// e.g. `"pwritev2"`). The worker's stage-two seccomp filter allows exactly the runtime's
    /// calls, these, and the policy's `syscalls`; anything else kills the worker. Calls the
    /// stage-one deny-list refuses (mount, ptrace, ...) stay refused whatever is declared.
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

/// The factories of the handlers built into `tcmu-warden-worker`.
pub fn builtin_factories() -> Vec<Arc<dyn HandlerFactory>> {
    vec![Arc::new(file::FileFactory), Arc::new(ram::RamFactory)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(block_size: u32, max_sectors: u32) -> tcmu_warden_proto::DeviceSpec {
        tcmu_warden_proto::DeviceSpec {
            id: 1,
            uio: "uio0".into(),
            hba: 0,
            name: "disk".into(),
            subtype: "file".into(),
            cfgstring: "/srv/disk.img".into(),
            map_size: 1 << 30,
            dev_size: 1 << 30,
            block_size,
            max_sectors,
            write_cache: true,
            unit_serial: "serial".into(),
            has_backing_fd: true,
            refusal: None,
            journal: tcmu_warden_proto::JournalMode::None,
        }
    }

    #[test]
    fn max_transfer_is_at_least_32_mebibytes() {
        // TCMU's default hw_max_sectors (128) is raised to 32 MiB worth of blocks.
        assert_eq!(DeviceConfig::from(&spec(512, 128)).max_sectors, 65536);
        assert_eq!(DeviceConfig::from(&spec(4096, 128)).max_sectors, 8192);
        assert_eq!(DeviceConfig::from(&spec(65536, 1)).max_sectors, 512);
        // A larger configured value is kept.
        assert_eq!(DeviceConfig::from(&spec(512, 100_000)).max_sectors, 100_000);
        // A small shared-memory region (a small data area) lowers the floor to a quarter of it.
        let mut small = spec(512, 128);
        small.map_size = 16 << 20;
        assert_eq!(DeviceConfig::from(&small).max_sectors, 8192);
        small.max_sectors = 10_000;
        assert_eq!(DeviceConfig::from(&small).max_sectors, 10_000);
        // Everything else is copied as it is.
        let c = DeviceConfig::from(&spec(4096, 128));
        assert_eq!(
            (
                c.block_size,
                c.dev_size,
                c.write_cache,
                c.unit_serial.as_str()
            ),
            (4096, 1 << 30, true, "serial")
        );
    }
}
