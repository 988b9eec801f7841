//! The `qcow` handler: serves a qcow2 image, read-only so far, through the SDK's blocking
//! block methods, on top of `tcmu-warden-qcow`.
//!
//! What it owns: mapping the SDK's reads onto [`tcmu_warden_qcow::Image`]. It never opens a
//! path: the image arrives as the descriptor the supervisor opened. Writes, UNMAP and images
//! with a backing file are refused (writes fail with `EROFS`, which the emulation reports as a
//! write error; a backing file fails the open with a clear message), until the write path
//! and the supervisor's backing-chain admission are built.
//!
//! Why its own executable: it keeps the qcow2 parser and the decompressors out of the
//! built-in worker, and a parser bug is confined to this worker's jail.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use tcmu_warden_qcow::Image;
use tcmu_warden_sdk::{DeviceConfig, Handler, HandlerError, HandlerFactory};

/// Builds `qcow` handlers; the cfgstring is tcmu-runner's, `qcow//path/to/image.qcow2`
/// (the supervisor resolves and opens the path).
#[derive(Debug, Default, Clone, Copy)]
pub struct QcowFactory;

impl HandlerFactory for QcowFactory {
    fn subtype(&self) -> &str {
        "qcow"
    }

    fn needs_backing_fd(&self) -> bool {
        true
    }

    fn syscalls(&self) -> &[&'static str] {
        &["pread64", "fstat", "newfstatat", "statx"]
    }

    fn open(
        &self,
        dev: &DeviceConfig,
        backing: Option<OwnedFd>,
    ) -> Result<Arc<dyn Handler>, HandlerError> {
        let fd = backing.ok_or(HandlerError::NoBacking)?;
        let bad = |why: String| HandlerError::Config {
            cfgstring: dev.cfgstring.clone(),
            why,
        };
        let image = Image::open(File::from(fd), None).map_err(|e| bad(e.to_string()))?;
        if image
            .backing_name()
            .map_err(|e| bad(e.to_string()))?
            .is_some()
        {
            return Err(bad(
                "images with a backing file are not served yet (the supervisor does not pass \
                 the backing chain)"
                    .into(),
            ));
        }
        if image.header().size < dev.dev_size {
            return Err(bad(format!(
                "dev_size {} is larger than the image's virtual size {}",
                dev.dev_size,
                image.header().size
            )));
        }
        Ok(Arc::new(QcowHandler { image }))
    }
}

/// One device served from a qcow2 image.
pub struct QcowHandler {
    image: Image<File>,
}

impl Handler for QcowHandler {
    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let mut pos = offset;
        for b in bufs.iter_mut() {
            self.image
                .read(b, pos)
                .map_err(|e| io::Error::other(e.to_string()))?;
            pos = pos.saturating_add(b.len() as u64);
        }
        Ok(())
    }

    fn write(&self, _offset: u64, _bufs: &[IoSlice<'_>], _durable: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(30)) // EROFS: the write path is not built yet.
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}
