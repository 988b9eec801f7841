//! # The `file` handler: a device backed by a regular file or a block device
//!
//! The cfgstring is the path of the backing store (`dev_config=file//srv/disk0.img`). The worker
//! never opens that path itself: the supervisor checks it against the policy's `allow_paths`,
//! opens it, and passes the open descriptor along with the device. This module only does I/O on
//! that descriptor:
//! - reads with `preadv` (bytes past the end of a short regular file read as zeros),
//! - writes with `pwritev2`, adding `RWF_DSYNC` when the write must be durable before it completes
//!   (the device has no volatile write cache, or the initiator set FUA),
//! - SYNCHRONIZE CACHE with `fdatasync`,
//! - UNMAP (on regular files) by punching holes with `fallocate`, so unmapped blocks read as zeros
//!   and give their space back to the filesystem.
//!
//! It must never open a path, and never treat the cfgstring as anything but a label.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::sync::Arc;

use tracing::warn;

use tcmu_warden_sdk::{DeviceConfig, Handler, HandlerCaps, HandlerError, HandlerFactory};

/// Builds `file` handlers from the descriptor the supervisor passes.
pub struct FileFactory;

impl HandlerFactory for FileFactory {
    fn subtype(&self) -> &str {
        "file"
    }

    fn needs_backing_fd(&self) -> bool {
        true
    }

    fn syscalls(&self) -> &[&'static str] {
        // Positional vectored I/O, durability, hole punching (UNMAP), and BLKGETSIZE64 on a
        // block device.
        &[
            "pread64",
            "preadv",
            "preadv2",
            "pwrite64",
            "pwritev",
            "pwritev2",
            "fdatasync",
            "fsync",
            "fallocate",
            "ioctl",
        ]
    }

    fn open(
        &self,
        dev: &DeviceConfig,
        backing: Option<OwnedFd>,
    ) -> Result<Arc<dyn Handler>, HandlerError> {
        let fd = backing.ok_or(HandlerError::NoBacking)?;
        Ok(Arc::new(FileHandler::new(dev, File::from(fd))?))
    }
}

/// A device whose blocks live in a file or block device.
#[derive(Debug)]
pub struct FileHandler {
    file: File,
    is_block_device: bool,
    caps: HandlerCaps,
}

impl FileHandler {
    /// Wraps an open backing store for `dev`.
    pub fn new(dev: &DeviceConfig, file: File) -> Result<FileHandler, HandlerError> {
        let meta = file.metadata()?;
        let ft = meta.file_type();
        let is_block_device = ft.is_block_device();
        if !ft.is_file() && !is_block_device {
            return Err(HandlerError::Config {
                cfgstring: dev.cfgstring.clone(),
                why: "the backing store is neither a regular file nor a block device".into(),
            });
        }
        if is_block_device {
            let size = block_device_size(&file)?;
            if size < dev.dev_size {
                return Err(HandlerError::Config {
                    cfgstring: dev.cfgstring.clone(),
                    why: format!(
                        "block device holds {size} bytes, the LUN is {} bytes",
                        dev.dev_size
                    ),
                });
            }
        } else if meta.len() < dev.dev_size {
            // A short (even empty) regular file is fine: unwritten blocks read as zeros, like a
            // sparse image. Say so once, because an operator may have made a typo.
            warn!(device = %dev.name, file_size = meta.len(), dev_size = dev.dev_size,
                  "backing file is smaller than the device; the rest reads as zeros");
        }
        let granularity = (meta.blksize() / u64::from(dev.block_size.max(1))).max(1);
        let caps = HandlerCaps {
            unmap: !is_block_device,
            unmap_granularity: u32::try_from(granularity).unwrap_or(1),
            unmap_reads_zero: !is_block_device,
        };
        Ok(FileHandler {
            file,
            is_block_device,
            caps,
        })
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(size)
    }
}

fn as_iovecs(bufs: &[IoSlice<'_>]) -> Vec<libc::iovec> {
    bufs.iter()
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect()
}

/// Most iovecs one system call takes.
const IOV_MAX: usize = 1024;

impl Handler for FileHandler {
    fn caps(&self) -> HandlerCaps {
        self.caps
    }

    fn read(&self, offset: u64, mut bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let mut pos = offset;
        while !bufs.is_empty() {
            let chunk = bufs.len().min(IOV_MAX);
            let iov: Vec<libc::iovec> = bufs
                .iter_mut()
                .take(chunk)
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect();
            let off = libc::off_t::try_from(pos)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: every iovec describes a live, exclusively borrowed buffer from `bufs`, and
            // `iov.len()` is the count passed.
            let n = unsafe {
                libc::preadv(
                    self.file.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len() as libc::c_int,
                    off,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let n = n as usize;
            if n == 0 {
                if self.is_block_device {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "read past the end of the block device",
                    ));
                }
                // Past the end of a short regular file: the rest reads as zeros.
                for b in bufs.iter_mut() {
                    b.fill(0);
                }
                return Ok(());
            }
            pos += n as u64;
            IoSliceMut::advance_slices(&mut bufs, n);
        }
        Ok(())
    }

    fn write(&self, offset: u64, bufs: &[IoSlice<'_>], durable: bool) -> io::Result<()> {
        let flags = if durable { libc::RWF_DSYNC } else { 0 };
        let mut pos = offset;
        let mut owned: Vec<IoSlice<'_>> = bufs.to_vec();
        let mut rest: &mut [IoSlice<'_>] = &mut owned;
        while !rest.is_empty() {
            let chunk = rest.len().min(IOV_MAX);
            let iov = as_iovecs(rest.get(..chunk).unwrap_or_default());
            let off = libc::off_t::try_from(pos)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: every iovec describes a live buffer borrowed from `bufs` for this call, and
            // `iov.len()` is the count passed.
            let n = unsafe {
                libc::pwritev2(
                    self.file.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len() as libc::c_int,
                    off,
                    flags,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            pos += n as u64;
            IoSlice::advance_slices(&mut rest, n as usize);
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// From `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)`: holes (punched by UNMAP, or never written)
    /// are unallocated. A filesystem without those seeks (EINVAL) cannot tell. The file
    /// position they move is never used: all I/O is positional.
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Option<(bool, u64)>> {
        if self.is_block_device {
            return Ok(None);
        }
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let fd = self.file.as_raw_fd();
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // No data at or after `offset`: a hole to the end (or past the end of the file).
                Some(libc::ENXIO) => Ok(Some((false, len))),
                Some(libc::EINVAL) => Ok(None),
                _ => Err(e),
            };
        }
        let data = u64::try_from(data).unwrap_or(u64::MAX);
        if data > offset {
            return Ok(Some((false, (data - offset).min(len))));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, off, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let hole = u64::try_from(hole).unwrap_or(u64::MAX);
        Ok(Some((
            true,
            hole.saturating_sub(offset).clamp(1, len.max(1)),
        )))
    }

    fn unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.is_block_device {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let n =
            libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                n,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn cfg(size: u64) -> DeviceConfig {
        DeviceConfig {
            name: "d".into(),
            subtype: "file".into(),
            cfgstring: "/x".into(),
            dev_size: size,
            block_size: 512,
            max_sectors: 128,
            write_cache: false,
            unit_serial: "s".into(),
        }
    }

    #[test]
    fn short_file_reads_zeros_and_writes_extend() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 100]).unwrap();
        let h = FileHandler::new(&cfg(1 << 20), f).unwrap();
        let mut a = [1u8; 64];
        let mut b = [1u8; 64];
        h.read(64, &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)])
            .unwrap();
        assert!(a[..36].iter().all(|&x| x == 7));
        assert!(a[36..].iter().all(|&x| x == 0));
        assert!(b.iter().all(|&x| x == 0));
        let data: Vec<Vec<u8>> = (0..3).map(|i| vec![i as u8 + 1; 1000]).collect();
        let slices: Vec<IoSlice<'_>> = data.iter().map(|v| IoSlice::new(v)).collect();
        h.write(4096, &slices, true).unwrap();
        let mut back = vec![0u8; 3000];
        h.read(4096, &mut [IoSliceMut::new(&mut back)]).unwrap();
        assert_eq!(&back[..1000], &data[0][..]);
        assert_eq!(&back[2000..], &data[2][..]);
        h.flush().unwrap();
    }

    #[test]
    fn unmap_punches_a_hole_that_reads_zero() {
        let f = tempfile::tempfile().unwrap();
        let h = FileHandler::new(&cfg(1 << 20), f).unwrap();
        assert!(h.caps().unmap && h.caps().unmap_reads_zero);
        h.write(0, &[IoSlice::new(&[0xAB; 65536])], false).unwrap();
        h.unmap(4096, 8192).unwrap();
        let mut back = vec![0u8; 65536];
        h.read(0, &mut [IoSliceMut::new(&mut back)]).unwrap();
        assert!(back[..4096].iter().all(|&x| x == 0xAB));
        assert!(back[4096..12288].iter().all(|&x| x == 0));
        assert!(back[12288..].iter().all(|&x| x == 0xAB));
    }

    #[test]
    fn allocation_reports_data_and_holes() {
        let f = tempfile::tempfile().unwrap();
        let h = FileHandler::new(&cfg(1 << 20), f).unwrap();
        // An empty file: a hole everywhere, also past its end.
        assert_eq!(h.allocation(0, 1 << 20).unwrap(), Some((false, 1 << 20)));
        h.write(64 << 10, &[IoSlice::new(&[7u8; 128 << 10])], true)
            .unwrap();
        h.write(512 << 10, &[IoSlice::new(&[7u8; 4096])], true)
            .unwrap();
        // Some filesystems cannot tell holes from data at all.
        let Some((false, hole)) = h.allocation(0, 1 << 20).unwrap() else {
            return;
        };
        assert!(
            hole <= 64 << 10,
            "hole of {hole} bytes before the first write"
        );
        let (mapped, run) = h.allocation(64 << 10, 1 << 20).unwrap().unwrap();
        assert!(mapped);
        assert!(run >= 128 << 10, "data run of {run} bytes");
        h.unmap(64 << 10, 128 << 10).unwrap();
        let (mapped, run) = h.allocation(64 << 10, 128 << 10).unwrap().unwrap();
        assert!(!mapped && run == 128 << 10, "{mapped} {run}");
    }

    #[test]
    fn refuses_a_directory() {
        let d = tempfile::tempdir().unwrap();
        let f = File::open(d.path()).unwrap();
        assert!(matches!(
            FileHandler::new(&cfg(4096), f),
            Err(HandlerError::Config { .. })
        ));
    }

    #[test]
    fn factory_needs_a_descriptor() {
        assert!(matches!(
            FileFactory.open(&cfg(4096), None),
            Err(HandlerError::NoBacking)
        ));
    }
}
