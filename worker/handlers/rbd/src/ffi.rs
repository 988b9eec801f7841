//! The raw librados/librbd C interface: only the functions this crate calls, transcribed from
//! `/usr/include/rados/librados.h` and `/usr/include/rbd/librbd.h` (Ceph 16, Debian bookworm).
//!
//! This module owns the `extern "C"` declarations and nothing else; it must never be used outside
//! `crate::client`, which wraps every call in a safe type.

use libc::{c_char, c_int, c_void, size_t, ssize_t};

/// `rados_t`: an opaque cluster handle.
pub type RadosT = *mut c_void;
/// `rados_ioctx_t`: an opaque pool I/O context.
pub type RadosIoctxT = *mut c_void;
/// `rbd_image_t`: an opaque open image.
pub type RbdImageT = *mut c_void;
/// `rbd_completion_t`: an opaque asynchronous completion.
pub type RbdCompletionT = *mut c_void;
/// `rbd_callback_t`: called once on a librbd thread when an aio completes.
pub type RbdCallbackT = Option<unsafe extern "C" fn(cb: RbdCompletionT, arg: *mut c_void)>;

/// `RBD_FEATURE_EXCLUSIVE_LOCK` from `rbd/features.h`.
pub const RBD_FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
/// `RBD_LOCK_MODE_EXCLUSIVE` from `rbd_lock_mode_t`.
pub const RBD_LOCK_MODE_EXCLUSIVE: c_int = 0;

unsafe extern "C" {
    pub fn rados_create2(
        pcluster: *mut RadosT,
        clustername: *const c_char,
        name: *const c_char,
        flags: u64,
    ) -> c_int;
    pub fn rados_conf_read_file(cluster: RadosT, path: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: RadosT, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_connect(cluster: RadosT) -> c_int;
    pub fn rados_shutdown(cluster: RadosT);
    pub fn rados_ioctx_create(
        cluster: RadosT,
        pool_name: *const c_char,
        ioctx: *mut RadosIoctxT,
    ) -> c_int;
    pub fn rados_ioctx_destroy(io: RadosIoctxT);

    pub fn rbd_open(
        io: RadosIoctxT,
        name: *const c_char,
        image: *mut RbdImageT,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_close(image: RbdImageT) -> c_int;
    pub fn rbd_get_size(image: RbdImageT, size: *mut u64) -> c_int;
    pub fn rbd_get_features(image: RbdImageT, features: *mut u64) -> c_int;
    pub fn rbd_is_exclusive_lock_owner(image: RbdImageT, is_owner: *mut c_int) -> c_int;
    pub fn rbd_lock_acquire(image: RbdImageT, lock_mode: c_int) -> c_int;

    pub fn rbd_aio_create_completion(
        cb_arg: *mut c_void,
        complete_cb: RbdCallbackT,
        c: *mut RbdCompletionT,
    ) -> c_int;
    pub fn rbd_aio_get_return_value(c: RbdCompletionT) -> ssize_t;
    pub fn rbd_aio_release(c: RbdCompletionT);
    pub fn rbd_aio_read(
        image: RbdImageT,
        off: u64,
        len: size_t,
        buf: *mut c_char,
        c: RbdCompletionT,
    ) -> c_int;
    pub fn rbd_aio_write(
        image: RbdImageT,
        off: u64,
        len: size_t,
        buf: *const c_char,
        c: RbdCompletionT,
    ) -> c_int;
    pub fn rbd_aio_discard(image: RbdImageT, off: u64, len: u64, c: RbdCompletionT) -> c_int;
    pub fn rbd_aio_writesame(
        image: RbdImageT,
        off: u64,
        len: size_t,
        buf: *const c_char,
        data_len: size_t,
        c: RbdCompletionT,
        op_flags: c_int,
    ) -> c_int;
    pub fn rbd_aio_compare_and_write(
        image: RbdImageT,
        off: u64,
        len: size_t,
        cmp_buf: *const c_char,
        buf: *const c_char,
        c: RbdCompletionT,
        mismatch_off: *mut u64,
        op_flags: c_int,
    ) -> ssize_t;
    pub fn rbd_aio_flush(image: RbdImageT, c: RbdCompletionT) -> c_int;
}
