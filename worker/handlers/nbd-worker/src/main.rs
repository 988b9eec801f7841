//! `tcmu-warden-nbd`: a worker executable serving the `nbd` subtype.
//!
//! Started only by the `tcmu-warden` supervisor, for devices of a `[handler.nbd]` section whose
//! `exe` names this file; `worker_main` speaks the supervisor's protocol, enters the jail's
//! stage two with the allow-list [`tcmu_warden_nbd_worker::NbdFactory`] declares, and serves.

use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    tcmu_warden_worker::worker_main(vec![Arc::new(tcmu_warden_nbd_worker::NbdFactory)])
}
