//! # tcmu-warden worker runtime
//!
//! The unprivileged half of tcmu-warden. A worker receives TCMU devices (an open `/dev/uioN`
//! and, for some handlers, an open backing store) from the supervisor, maps each device's shared
//! ring, and executes the SCSI commands it finds there.
//!
//! Where things live:
//! - [`ring`]: the kernel's shared-memory layout and the fetch/complete protocol.
//! - [`scsi`]: CDB decoding and emulation of every command a handler does not
//!   implement itself.
//! - [`handler`]: the built-in `file` and `ram` handlers. The traits they implement, and the
//!   command and sense types, are the handler SDK's (`tcmu_warden_sdk`, `worker/sdk/`), which
//!   this crate depends on and re-exports as [`sdk`].
//! - [`jail`]: stage two of the worker's confinement (its own seccomp allow-list).
//! - [`runtime`]: the per-device loop that ties ring, SCSI and handler together, and the worker's
//!   conversation with the supervisor.

pub mod handler;
pub mod jail;
pub mod ring;
pub mod runtime;
pub mod scsi;

pub use runtime::worker_main;
pub use tcmu_warden_sdk as sdk;
