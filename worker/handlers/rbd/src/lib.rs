//! tcmu-warden's Ceph RBD (RADOS Block Device) client for the rbd handler.
//!
//! It owns the librbd/librados binding (`ffi`, private, with safe types in [`client`]) and the
//! cfgstring parser ([`cfgstring`]). It must never be linked into the file worker: only the rbd
//! worker executable depends on it, so librbd is loaded only where it is needed.

pub mod cfgstring;
pub mod client;
mod ffi;

pub use cfgstring::{CfgError, RbdConfig, parse};
pub use client::{AioDone, CawDone, CawOutcome, Cluster, Image, IoCtx, RbdError};
