//! Safe types over librados/librbd: [`Cluster`], [`IoCtx`], [`Image`] and asynchronous I/O whose
//! completion owns its buffer until librbd's callback fires.
//!
//! This module owns every `unsafe` call into `crate::ffi`; it must never hand a raw handle out.

use std::ffi::{CString, c_void};
use std::sync::Arc;

use crate::ffi;

/// A librados/librbd call failed with this negative errno.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RbdError {
    #[error("{call} failed: errno {errno}")]
    Call { call: &'static str, errno: i32 },
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    #[error(
        "the image lacks the exclusive-lock feature (rbd feature enable POOL/IMAGE exclusive-lock)"
    )]
    NoExclusiveLock,
}

fn check(call: &'static str, rc: i32) -> Result<(), RbdError> {
    if rc < 0 {
        Err(RbdError::Call { call, errno: -rc })
    } else {
        Ok(())
    }
}

fn cstr(what: &'static str, s: &str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Nul(what))
}

/// A connected cluster handle (`rados_t`); shut down on drop.
pub struct Cluster {
    raw: ffi::RadosT,
}

// SAFETY: librados cluster handles are thread-safe (documented in librados.h: "the handle
// may be used from multiple threads").
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// Creates a handle for client `id` (e.g. "admin"), reads `conf` if given, applies `options`
    /// and connects.
    pub fn connect(
        id: &str,
        conf: Option<&str>,
        options: &[(&str, &str)],
    ) -> Result<Arc<Self>, RbdError> {
        // rados_create2 takes the full entity name ("client.admin"), not the bare id.
        let id = cstr("id", &format!("client.{id}"))?;
        let mut raw: ffi::RadosT = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out pointer; the names are NUL-terminated and live across the call.
        check("rados_create2", unsafe {
            ffi::rados_create2(&mut raw, c"ceph".as_ptr(), id.as_ptr(), 0)
        })?;
        let this = Cluster { raw };
        if let Some(conf) = conf {
            let conf = cstr("conf", conf)?;
            // SAFETY: `this.raw` is a live unconnected handle; `conf` is NUL-terminated.
            check("rados_conf_read_file", unsafe {
                ffi::rados_conf_read_file(this.raw, conf.as_ptr())
            })?;
        }
        for (k, v) in options {
            let (k, v) = (cstr("option", k)?, cstr("option value", v)?);
            // SAFETY: live handle; both strings NUL-terminated and alive across the call.
            check("rados_conf_set", unsafe {
                ffi::rados_conf_set(this.raw, k.as_ptr(), v.as_ptr())
            })?;
        }
        // SAFETY: live handle, configured above.
        check("rados_connect", unsafe { ffi::rados_connect(this.raw) })?;
        Ok(Arc::new(this))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: `raw` came from rados_create2 and every IoCtx holds an Arc to us, so none is left.
        unsafe { ffi::rados_shutdown(self.raw) }
    }
}

/// A pool I/O context (`rados_ioctx_t`); keeps its cluster alive.
pub struct IoCtx {
    raw: ffi::RadosIoctxT,
    _cluster: Arc<Cluster>,
}

// SAFETY: librados I/O contexts are thread-safe for the calls made here (rbd_open).
unsafe impl Send for IoCtx {}
// SAFETY: as above.
unsafe impl Sync for IoCtx {}

impl IoCtx {
    /// Opens pool `pool`.
    pub fn open(cluster: &Arc<Cluster>, pool: &str) -> Result<Arc<Self>, RbdError> {
        let pool = cstr("pool", pool)?;
        let mut raw: ffi::RadosIoctxT = std::ptr::null_mut();
        // SAFETY: connected cluster handle, NUL-terminated name, valid out pointer.
        check("rados_ioctx_create", unsafe {
            ffi::rados_ioctx_create(cluster.raw, pool.as_ptr(), &mut raw)
        })?;
        Ok(Arc::new(IoCtx {
            raw,
            _cluster: cluster.clone(),
        }))
    }
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: `raw` came from rados_ioctx_create; every Image holds an Arc to us.
        unsafe { ffi::rados_ioctx_destroy(self.raw) }
    }
}

/// An open RBD image (`rbd_image_t`). librbd images are thread-safe; closing waits for
/// in-flight aio.
pub struct Image {
    raw: ffi::RbdImageT,
    _ioctx: Arc<IoCtx>,
}

// SAFETY: librbd serialises internally; an image handle may be used from any thread.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

/// What an aio hands back: librbd's return value (bytes read for a read, 0 for a completed
/// write, discard or flush, or a negative errno) and the buffer.
pub type AioDone = Box<dyn FnOnce(isize, Vec<u8>) + Send + 'static>;

/// A COMPARE AND WRITE's outcome, handed to its [`CawDone`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CawOutcome {
    /// The data matched and the write was applied.
    Written,
    /// Byte `offset` (from the start of the range) differed; nothing was written.
    Miscompare { offset: u64 },
    /// librbd failed with this errno.
    Failed(i32),
}

/// What a compare-and-write hands back.
pub type CawDone = Box<dyn FnOnce(CawOutcome) + Send + 'static>;

struct AioState {
    buf: Vec<u8>,
    /// Written by librbd on a miscompare; read in the callback (the box keeps it in place).
    mismatch_off: u64,
    done: Done,
}

enum Done {
    Plain(AioDone),
    Caw(CawDone),
}

unsafe extern "C" fn aio_callback(c: ffi::RbdCompletionT, arg: *mut c_void) {
    // SAFETY: `arg` is the Box<AioState> leaked in `Image::submit`; librbd calls us exactly once.
    let state = unsafe { Box::from_raw(arg.cast::<AioState>()) };
    // SAFETY: `c` is the completion librbd just finished; it is released once, here.
    let rv = unsafe { ffi::rbd_aio_get_return_value(c) };
    // SAFETY: as above; no use of `c` follows.
    unsafe { ffi::rbd_aio_release(c) };
    let AioState {
        buf,
        mismatch_off,
        done,
    } = *state;
    match done {
        Done::Plain(done) => done(rv, buf),
        Done::Caw(done) => done(match rv {
            rv if rv >= 0 => CawOutcome::Written,
            rv if rv == -(libc::EILSEQ as isize) => CawOutcome::Miscompare {
                offset: mismatch_off,
            },
            rv => CawOutcome::Failed(i32::try_from(-rv).unwrap_or(libc::EIO)),
        }),
    }
}

enum Op {
    Read,
    Write,
    Discard(u64),
    Flush,
    WriteSame(u64),
    Caw,
}

impl Image {
    /// Opens image `name` in `ioctx` (head, no snapshot).
    pub fn open(ioctx: &Arc<IoCtx>, name: &str) -> Result<Self, RbdError> {
        let name = cstr("image", name)?;
        let mut raw: ffi::RbdImageT = std::ptr::null_mut();
        // SAFETY: live ioctx, NUL-terminated name, null snapshot = head, valid out pointer.
        check("rbd_open", unsafe {
            ffi::rbd_open(ioctx.raw, name.as_ptr(), &mut raw, std::ptr::null())
        })?;
        Ok(Image {
            raw,
            _ioctx: ioctx.clone(),
        })
    }

    /// The image size in bytes.
    pub fn size(&self) -> Result<u64, RbdError> {
        let mut size = 0u64;
        // SAFETY: open image, valid out pointer.
        check("rbd_get_size", unsafe {
            ffi::rbd_get_size(self.raw, &mut size)
        })?;
        Ok(size)
    }

    /// The image feature bits (`RBD_FEATURE_*`).
    pub fn features(&self) -> Result<u64, RbdError> {
        let mut f = 0u64;
        // SAFETY: open image, valid out pointer.
        check("rbd_get_features", unsafe {
            ffi::rbd_get_features(self.raw, &mut f)
        })?;
        Ok(f)
    }

    /// Refuses an image without the exclusive-lock feature.
    pub fn require_exclusive_lock(&self) -> Result<(), RbdError> {
        if self.features()? & ffi::RBD_FEATURE_EXCLUSIVE_LOCK == 0 {
            return Err(RbdError::NoExclusiveLock);
        }
        Ok(())
    }

    /// Whether this client currently owns the exclusive lock.
    pub fn is_lock_owner(&self) -> Result<bool, RbdError> {
        let mut owner = 0;
        // SAFETY: open image, valid out pointer.
        check("rbd_is_exclusive_lock_owner", unsafe {
            ffi::rbd_is_exclusive_lock_owner(self.raw, &mut owner)
        })?;
        Ok(owner != 0)
    }

    /// Takes the exclusive lock (blocks until granted or refused).
    pub fn acquire_lock(&self) -> Result<(), RbdError> {
        // SAFETY: open image.
        check("rbd_lock_acquire", unsafe {
            ffi::rbd_lock_acquire(self.raw, ffi::RBD_LOCK_MODE_EXCLUSIVE)
        })
    }

    /// Reads `len` bytes at `off`; `done` gets the filled buffer.
    pub fn aio_read(&self, off: u64, len: usize, done: AioDone) -> Result<(), RbdError> {
        self.submit(Op::Read, off, vec![0; len], Done::Plain(done))
    }

    /// Writes `buf` at `off`; `done` gets the buffer back.
    pub fn aio_write(&self, off: u64, buf: Vec<u8>, done: AioDone) -> Result<(), RbdError> {
        self.submit(Op::Write, off, buf, Done::Plain(done))
    }

    /// Discards (unmaps) `len` bytes at `off`.
    pub fn aio_discard(&self, off: u64, len: u64, done: AioDone) -> Result<(), RbdError> {
        self.submit(Op::Discard(len), off, Vec::new(), Done::Plain(done))
    }

    /// Writes `pattern` repeatedly over `len` bytes at `off` (WRITE SAME); `len` must be a
    /// multiple of the pattern length.
    pub fn aio_writesame(
        &self,
        off: u64,
        len: u64,
        pattern: Vec<u8>,
        done: AioDone,
    ) -> Result<(), RbdError> {
        self.submit(Op::WriteSame(len), off, pattern, Done::Plain(done))
    }

    /// COMPARE AND WRITE: if the `cmp.len()` bytes at `off` equal `cmp`, writes `data` (same
    /// length) there, atomically in librbd.
    pub fn aio_compare_and_write(
        &self,
        off: u64,
        cmp: &[u8],
        data: &[u8],
        done: CawDone,
    ) -> Result<(), RbdError> {
        if cmp.len() != data.len() {
            return Err(RbdError::Call {
                call: "rbd_aio_compare_and_write",
                errno: libc::EINVAL,
            });
        }
        let mut buf = Vec::with_capacity(cmp.len() * 2);
        buf.extend_from_slice(cmp);
        buf.extend_from_slice(data);
        self.submit(Op::Caw, off, buf, Done::Caw(done))
    }

    /// Flushes librbd's cache to the OSDs (durability for FUA / SYNCHRONIZE CACHE).
    pub fn aio_flush(&self, done: AioDone) -> Result<(), RbdError> {
        self.submit(Op::Flush, 0, Vec::new(), Done::Plain(done))
    }

    fn submit(&self, op: Op, off: u64, buf: Vec<u8>, done: Done) -> Result<(), RbdError> {
        let state = Box::into_raw(Box::new(AioState {
            buf,
            mismatch_off: 0,
            done,
        }));
        let mut c: ffi::RbdCompletionT = std::ptr::null_mut();
        // SAFETY: `state` is a live leaked box reclaimed by exactly one of aio_callback or the
        // error paths below; `aio_callback` matches rbd_callback_t.
        let rc =
            unsafe { ffi::rbd_aio_create_completion(state.cast(), Some(aio_callback), &mut c) };
        if rc < 0 {
            // SAFETY: no completion exists, so the callback never fires; we reclaim the box.
            drop(unsafe { Box::from_raw(state) });
            return Err(RbdError::Call {
                call: "rbd_aio_create_completion",
                errno: -rc,
            });
        }
        // SAFETY: the buffer lives in the heap-allocated `state` until the callback runs, so its
        // pointer stays valid for the whole aio (so does `mismatch_off`, which librbd writes on a
        // miscompare; a CAW buffer is compare half then write half, split at len / 2); the image
        // is open; `c` is fresh.
        let rc = unsafe {
            let b = &mut (*state).buf;
            match op {
                Op::Read => ffi::rbd_aio_read(self.raw, off, b.len(), b.as_mut_ptr().cast(), c),
                Op::Write => ffi::rbd_aio_write(self.raw, off, b.len(), b.as_ptr().cast(), c),
                Op::Discard(len) => ffi::rbd_aio_discard(self.raw, off, len, c),
                Op::Flush => ffi::rbd_aio_flush(self.raw, c),
                Op::WriteSame(len) => match usize::try_from(len) {
                    Ok(len) => {
                        ffi::rbd_aio_writesame(self.raw, off, len, b.as_ptr().cast(), b.len(), c, 0)
                    }
                    Err(_) => -libc::EINVAL,
                },
                Op::Caw => {
                    let half = b.len() / 2;
                    let rc = ffi::rbd_aio_compare_and_write(
                        self.raw,
                        off,
                        half,
                        b.as_ptr().cast(),
                        b.as_ptr().add(half).cast(),
                        c,
                        &mut (*state).mismatch_off,
                        0,
                    );
                    i32::try_from(rc).unwrap_or(-libc::EIO)
                }
            }
        };
        if rc < 0 {
            // SAFETY: librbd refused the request before dispatch, so the callback will not fire:
            // release the completion and reclaim the state.
            unsafe {
                ffi::rbd_aio_release(c);
                drop(Box::from_raw(state));
            }
            return Err(RbdError::Call {
                call: "rbd_aio",
                errno: -rc,
            });
        }
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: `raw` came from rbd_open; rbd_close waits for in-flight aio.
        unsafe { ffi::rbd_close(self.raw) };
    }
}
