//! The worker runtime's end-to-end path with the jail on: `src/bin/jailed-runtime.rs` is started
//! through the supervisor's real spawn path (stage one before exec) with the default policy,
//! enters stage two like every worker, and serves SCSI commands through the built-in `ram` and
//! `file` handlers on simulated rings. It must finish cleanly: a system call missing from an
//! allow-list would kill it with SIGSYS, and the failure names the call when the kernel log has
//! it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use tcmu_warden_policy::jail::JailSpec;
use tcmu_warden_policy::{JailSettings, SeccompMode};
use tcmu_warden_proto::ToWorker;
use tcmu_warden_supervisor::jail;
use tcmu_warden_supervisor::worker::{WorkerProcess, describe_exit};

fn run_jailed(settings: &JailSettings) {
    let exe = Path::new(env!("CARGO_BIN_EXE_jailed-runtime"));
    let spec = JailSpec::new(exe, settings, &[]);
    let prepared = jail::prepare(&spec).unwrap();
    let started = prepared.status.prepared_at;
    let mut worker =
        WorkerProcess::spawn(exe, "jailed-runtime", None, Some(prepared.stage_one)).unwrap();
    worker
        .send(&ToWorker::Hello {
            worker: "jailed-runtime".into(),
            subtypes: vec!["ram".into(), "file".into()],
            jail: Some(prepared.stage_two),
        })
        .unwrap();
    let pid = worker.pid();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = worker.try_reap().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the jailed runtime did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    if status.signal() == Some(libc::SIGSYS) {
        panic!(
            "the jailed runtime was killed by seccomp: {}",
            jail::kernel_log_violation(pid, started, Duration::from_secs(1))
                .unwrap_or_else(|| "system call not named".into())
        );
    }
    assert!(
        status.success(),
        "jailed runtime: {}",
        describe_exit(status)
    );
}

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn runtime_serves_ram_and_file_devices_under_the_default_jail() {
    if !root() {
        eprintln!("needs root (namespaces, capability drops); skipping");
        return;
    }
    run_jailed(&JailSettings::default());
}

#[test]
fn runtime_serves_under_a_user_switch_and_tight_limits() {
    if !root() {
        eprintln!("needs root; skipping");
        return;
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        eprintln!("no user nobody; skipping");
        return;
    };
    let mut settings = JailSettings::default();
    settings.user = Some(tcmu_warden_policy::jail::settings::Id {
        name: "nobody".into(),
        id: nobody.uid.as_raw(),
    });
    settings.group = Some(tcmu_warden_policy::jail::settings::Id {
        name: "nogroup".into(),
        id: nobody.gid.as_raw(),
    });
    settings.rlimits.open_files = 64;
    settings.rlimits.address_space = Some(4 << 30);
    settings.seccomp_action = SeccompMode::Kill;
    run_jailed(&settings);
}
