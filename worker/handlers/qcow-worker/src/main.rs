//! `tcmu-warden-qcow`: a worker executable serving the `qcow` subtype (read-only so far).
//!
//! Started only by the `tcmu-warden` supervisor; `worker_main` speaks the supervisor's
//! protocol, enters the jail's stage two and serves.

use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    tcmu_warden_worker::worker_main(vec![Arc::new(tcmu_warden_qcow_worker::QcowFactory)])
}
