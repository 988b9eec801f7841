//! # The built-in handlers: `file` and `ram`
//!
//! A *handler* serves one *subtype* of TCMU backstore. The traits a handler implements, and the
//! rules it follows, live in the handler SDK (`tcmu_warden_sdk`, `worker/sdk/`), which is all a
//! third-party handler crate depends on; they are re-exported here for the worker's own code.
//! This module holds the two handlers built into `tcmu-warden-worker`, both blocking ones (the
//! SDK's read/write/flush shape): [`file`](mod@file) (a file or block device opened by the
//! supervisor) and [`ram`] (a sparse in-memory device).
//!
//! This module never decodes CDBs (that is [`crate::scsi`]) and never touches the ring.

pub mod file;
pub mod ram;

use std::sync::Arc;

pub use tcmu_warden_sdk::{DeviceConfig, Handler, HandlerCaps, HandlerError, HandlerFactory};

/// The factories of the handlers built into `tcmu-warden-worker`.
pub fn builtin_factories() -> Vec<Arc<dyn HandlerFactory>> {
    vec![Arc::new(file::FileFactory), Arc::new(ram::RamFactory)]
}
