//! # tcmu-warden policy: the jail both sides of the wire build
//!
//! tcmu-warden serves Linux SCSI disks from userspace through TCMU, the kernel's `user`
//! backstore of LIO (the Linux SCSI target). Each TCMU device names a *subtype* (the kind of
//! handler that serves it: `file`, `ram`, ...) and is served by a *worker* process that runs
//! confined. Both the supervisor (which confines a worker before `exec`) and the worker (which
//! adds its own seccomp allow-list once it is up) need the same description of that jail.
//!
//! This crate owns:
//! - the jail ([`jail`]): the effective confinement of each worker ([`JailSpec`]), built from
//!   [`JailSettings`] (which the supervisor's configuration file fills in, or a test builds
//!   directly), its seccomp filters and landlock ruleset, built here and applied by the
//!   supervisor (stage one) and the worker (stage two);
//! - byte sizes with units ([`size`]), shared by the jail's limits and the configuration.
//!
//! It does not parse the configuration file and does not admit devices: that is the
//! supervisor's `config` module, which the untrusted worker never links. It never talks to
//! workers or the kernel's TCMU interface.

pub mod jail;
pub mod size;

pub use jail::JailSpec;
pub use jail::settings::{Backing, JailSettings, LandlockMode, Network, SeccompMode};
pub use size::{ByteSize, SizeError, format_size, parse_size};
