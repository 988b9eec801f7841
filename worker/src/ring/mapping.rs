//! # The shared mapping of a TCMU device
//!
//! [`Mapping`] owns one `MAP_SHARED` mapping of a UIO device (or, in tests, of a memfd laid out
//! the same way): the mailbox, the command ring and the data area, all in one region that the
//! kernel writes too. It unmaps the region when the last reference goes away; data buffers handed
//! to commands hold such a reference, so the memory under them stays mapped.
//!
//! This module owns the `mmap`/`munmap` calls and nothing else. It must never interpret the
//! contents of the region (that is the engine's job) and never hand out references into it: only
//! a raw base pointer, whose every use is the caller's `unsafe` responsibility.

use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::Arc;

use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use super::RingError;

/// A `MAP_SHARED`, read-write mapping of a whole file descriptor (offset 0, exact length).
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory addressed by a raw pointer; the struct itself has no
// thread-affine state. Every access through the pointer happens in `unsafe` code that does its own
// synchronisation (atomics for the indexes, exclusive ownership for entries and data buffers).
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only exposes the length and the base address.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from offset 0, shared and read-write. For a UIO device `len` must
    /// be exactly the size in `/sys/class/uio/uioN/maps/map0/size`, or the kernel says `EINVAL`.
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> Result<Arc<Mapping>, RingError> {
        let length = NonZeroUsize::new(len).ok_or(RingError::MapSize { len })?;
        // SAFETY: we ask the kernel for a fresh mapping at an address of its choosing, so no
        // existing Rust object is affected; the returned region is owned by the new `Mapping`
        // alone and unmapped exactly once, in `Drop`.
        let ptr = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }
        .map_err(|errno| RingError::Map {
            len,
            source: std::io::Error::from(errno),
        })?;
        Ok(Arc::new(Mapping {
            ptr: ptr.cast(),
            len,
        }))
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a mapping is never empty (zero lengths are refused by [`Mapping::map`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The base address. Dereferencing it is `unsafe`: the memory is shared with the kernel.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe the region `map` created; this is the last reference (we
        // are in `Drop` of the value every Arc points to), and every data buffer into the region
        // holds an Arc, so nothing can use the region after this.
        if let Err(errno) = unsafe { munmap(self.ptr.cast(), self.len) } {
            tracing::warn!(len = self.len, %errno, "munmap of the ring mapping failed");
        }
    }
}
