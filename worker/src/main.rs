//! `tcmu-warden-worker`: the built-in worker executable, serving the `file` and `ram` subtypes.
//!
//! Started only by the `tcmu-warden` supervisor, which passes the control socket as the
//! descriptor named in `TCMU_WARDEN_FD`.

use std::process::ExitCode;

fn main() -> ExitCode {
    tcmu_warden_worker::worker_main(tcmu_warden_worker::handler::builtin_factories())
}
