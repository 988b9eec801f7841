//! # tcmu-warden test support
//!
//! A library for tcmu-warden's integration tests. Its centrepiece is [`sim`], a userspace
//! imitation of the kernel's side of a TCMU device (the shared ring and the UIO event fd), so
//! that the worker's ring engine and runtime can be driven end to end without a kernel; [`rig`]
//! wires it to the worker's device runtime for tests that speak SCSI to a whole device.
//!
//! This crate owns test-support code only; it must never be a dependency of the daemon's
//! binaries.

pub mod rig;
pub mod sim;

pub use rig::{Rig, sense_triple};

pub use sim::{
    CAP_OOOC, CAP_READ_LEN, CAP_TMR, CHECK_CONDITION, Completed, KernelSim, SIM_POISON, SimConfig,
    SimDevice, SimError, SimLayout, UFLAG_READ_LEN, UFLAG_UNKNOWN_OP,
};
