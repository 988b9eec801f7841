//! # tcmu-warden supervisor
//!
//! The privileged half of tcmu-warden. LIO (the Linux SCSI target) can hand a disk's SCSI
//! commands to userspace through TCMU, its `user` backstore: each such device appears as a UIO
//! device (`/dev/uioN`) holding a shared-memory command ring. The supervisor finds those devices,
//! decides from its configuration whether to serve each one, and hands each device's open
//! `/dev/uioN` (plus, for file-backed devices, the open backing file) to a *worker* process that
//! does the actual SCSI work. Workers are treated as hostile: the supervisor validates everything
//! they say and kills any that misbehave, without ever going down itself.
//!
//! Where things live:
//! - [`cli`]: the command line (`tcmu-warden run|check-config|status`).
//! - [`discovery`]: the start-up scan of sysfs and configfs.
//! - [`worker`]: starting one worker process and talking to it.
//! - [`jail`]: stage one of a worker's confinement, applied between fork and exec.
//! - [`daemon`]: the coordinator ([`daemon::Supervisor`]) over the device table and the worker
//!   table, and the typed event loop; worker lifecycle (heartbeats, crash handling, restarts,
//!   quarantine) in `daemon::lifecycle` and `daemon::quarantine`; the hot-plug state machine
//!   (uevents, `TCM-USER` requests, pending adoptions, reconfiguration) in [`daemon::hotplug`];
//!   the control socket, status report, reload and systemd in [`daemon::admin`].
//! - [`journal`]: the devices' in-flight journal files (what a crashed worker left running).
//! - [`uevent`] and [`netlink`]: the kernel's device events (uevents) and its `TCM-USER`
//!   generic netlink requests, decoded with bounds checks.
//! - [`control`]: the control socket and the `status` report; [`sdnotify`]: systemd
//!   readiness and watchdog; [`reload`]: what a `SIGHUP` changes; [`lio`]: the one writer of
//!   LIO's knobs (module parameters, `block_dev`, `reset_ring`).
//! - [`fuzz`]: entry points for fuzzing every decoder of untrusted input.
//! - [`logging`]: text, JSON or journald output.
//!
//! The binary, `tcmu-warden`, is a thin layer over these (`src/main.rs`).

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod discovery;
pub mod fuzz;
pub mod jail;
pub mod journal;
pub mod lio;
pub mod logging;
pub mod netlink;
pub mod reload;
pub mod sdnotify;
pub mod uevent;
pub mod worker;
