//! Integration tests of the supervisor's worker management, against a fake worker.
//!
//! This test binary is two programs. Run by cargo, it is a small test runner (`harness = false`
//! in Cargo.toml). Started by the supervisor as a worker (it finds `TCMU_WARDEN_FD` in its
//! environment), it is a fake worker that speaks the real protocol over fd 3. The supervisor
//! starts it through a symlink whose file name selects the fake's behaviour (`echo`, `garbage`,
//! ...; `garbage@file` misbehaves only as the worker named `file`), and the fake appends what it
//! received (descriptor contents included) to `<symlink>.log`, which the tests read.
//!
//! Tests assert through the supervisor's public state (`devices()`, `workers()`), the fake's log
//! and the supervisor's captured log lines, and wait by turning the supervisor's event loop until
//! a condition holds (with a generous deadline), never by sleeping.

// A test program (clippy's in-test allowances do not reach a `harness = false` binary): a panic
// here is a failed test, caught and reported by the runner below.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::ffi::OsStr;
use std::fmt::Debug;
use std::fs::{self, OpenOptions};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tcmu_warden_proto::{DeviceFds, FromWorker, JOURNAL_BYTES, JournalMode, ProtoError, ToWorker};
use tcmu_warden_supervisor::config::Config;
use tcmu_warden_supervisor::control::{ControlServer, StatusReport, render_status};
use tcmu_warden_supervisor::daemon::quarantine::LiftError;
use tcmu_warden_supervisor::daemon::{DevicePhase, Options, Supervisor, WorkerPhase};
use tcmu_warden_supervisor::discovery::fake::FakeDevice;

use common::{
    FakeWorker, Fixture, assert_contains, harness, phase_of, read_all, until, until_ready,
};

fn main() -> ExitCode {
    harness::main(
        fake_worker::main,
        common::tests![
            handshake_and_add_device_carry_the_right_fds,
            worker_gets_a_scrubbed_environment_and_only_its_fds,
            refused_devices_are_logged_and_still_served,
            garbage_kills_only_that_worker,
            reply_for_a_foreign_device_kills_the_worker,
            message_before_hello_kills_the_worker,
            silent_worker_is_killed_at_the_handshake_deadline,
            crashing_worker_is_reaped_and_its_devices_kept,
            worker_closing_its_channel_is_killed_after_grace,
            worker_without_the_subtype_gets_refusals,
            device_failure_is_recorded_and_logged_escaped,
            remove_device_round_trip_closes_the_uio_fd,
            device_isolation_gives_each_device_a_worker,
            orderly_shutdown_reaps_every_worker,
            stubborn_worker_is_killed_at_the_shutdown_deadline,
            heartbeat_timeout_kills_a_hung_worker_and_the_successor_recovers,
            crash_is_restarted_with_backoff_then_quarantined,
            quarantined_devices_fail_fast_and_serve_again_once_lifted,
            sigsys_is_reported_as_a_sandbox_violation,
            restarted_supervisor_recovers_devices_from_their_journals,
            inconsistent_journal_falls_back_to_a_ring_reset,
            busy_ring_without_a_journal_is_reset_before_it_is_served,
            recovery_failed_after_a_reset_kills_the_worker,
            heartbeats_carry_the_device_counters,
            oversized_and_out_of_order_messages_kill_and_restart,
            workers_are_jailed_and_the_jail_is_verified,
            an_unenforceable_jail_keeps_the_worker_from_starting,
            no_jail_switch_starts_workers_unconfined,
            binary_check_config,
            binary_policy_check,
            binary_runs_and_stops_on_sigterm,
        ],
    )
}

// ---- fixture ----------------------------------------------------------------------------------

/// The workers tests' additions: plain devices, journals, `action/` files, and an in-process
/// supervisor with tweakable options.
impl Fixture {
    /// A fixture holding one `ram` device: `uio0`, backstore `user_2/scratch`.
    fn with_scratch_ram() -> Fixture {
        let f = Fixture::new();
        f.device("uio0", 2, "scratch", Some("ram/"));
        f
    }

    /// A TCMU device in sysfs/configfs, and its "uio node" (a regular file reading `UIO:<uio>`).
    fn device(&self, uio: &str, hba: u32, name: &str, dev_config: Option<&str>) {
        FakeDevice::new(uio, hba, name, dev_config)
            .write(&self.sysfs)
            .unwrap();
        fs::write(self.dev.join(uio), format!("UIO:{uio}")).unwrap();
    }

    /// A `file` device backed by `data/<name>.img`.
    fn file_device(&self, uio: &str, name: &str) {
        let path = self.backing(&format!("{name}.img"));
        self.device(uio, 1, name, Some(&format!("file/{}", path.display())));
    }

    /// The journal file of backstore `user_<hba>/<name>`.
    fn journal(&self, hba: u32, name: &str) -> PathBuf {
        self.journals().join(format!("user_{hba}")).join(name)
    }

    /// What the supervisor last wrote to `action/<attr>` of `user_<hba>/<name>`.
    fn action(&self, hba: u32, name: &str, attr: &str) -> String {
        fs::read_to_string(tcmu_warden_supervisor::lio::action_path(
            &self.sysfs,
            hba,
            name,
            attr,
        ))
        .unwrap()
    }

    /// A supervisor that has scanned the tree, with the given fake-worker mode and handlers.
    fn start(&self, mode: &str, handlers: &str, tweak: impl FnOnce(&mut Options)) -> Supervisor {
        let text = self.config_text(mode, "", handlers);
        let config = Config::from_toml_str(&text, Path::new("test.toml")).unwrap();
        let mut opts = Options::from_config(&config).unwrap();
        opts.handshake_timeout = Duration::from_secs(20);
        opts.reply_timeout = Duration::from_secs(20);
        opts.shutdown_timeout = Duration::from_secs(20);
        opts.exit_grace = Duration::from_secs(20);
        tweak(&mut opts);
        let mut sup = Supervisor::new(config, opts).unwrap();
        sup.start().unwrap();
        sup
    }
}

fn worker_phase(sup: &Supervisor, name: &str) -> Option<WorkerPhase> {
    sup.worker(name).map(|w| w.phase)
}

/// Turns the event loop until worker `name` has exited and been reaped.
fn until_exited(sup: &mut Supervisor, name: &str, what: &str) {
    until(sup, what, |s| {
        worker_phase(s, name) == Some(WorkerPhase::Exited)
    });
}

fn assert_quarantined(sup: &Supervisor, uio: &str) {
    let phase = phase_of(sup, uio);
    assert!(
        matches!(phase, Some(DevicePhase::Quarantined(_))),
        "{uio} is {phase:?}"
    );
}

/// Where an open descriptor of this process points.
fn fd_target(fd: BorrowedFd<'_>) -> PathBuf {
    fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap()
}

/// Whether any descriptor of this process points at `path`.
fn process_has_open(path: &Path) -> bool {
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| fs::read_link(e.path()).is_ok_and(|t| t == path))
}

fn assert_some_line<T: Debug>(text: &str, parts: &[&str], ctx: T) {
    assert!(
        text.lines().any(|l| parts.iter().all(|p| l.contains(p))),
        "no line contains all of {parts:?} in:\n{text}\n({ctx:?})"
    );
}

// ---- tests ------------------------------------------------------------------------------------

fn handshake_and_add_device_carry_the_right_fds() {
    let f = Fixture::new();
    f.file_device("uio0", "disk0");
    f.device("uio1", 2, "scratch", Some("ram/"));
    let mut sup = f.start("echo", &f.handlers(None), |_| {});
    until(&mut sup, "both devices are served", |s| {
        phase_of(s, "uio0") == Some(DevicePhase::Ready)
            && phase_of(s, "uio1") == Some(DevicePhase::Ready)
    });

    let file = sup.worker("file").unwrap();
    assert_eq!(file.phase, WorkerPhase::Ready);
    assert_eq!(file.supported, Some(vec!["file".to_owned()]));
    let ram = sup.worker("ram").unwrap();
    assert_eq!(ram.phase, WorkerPhase::Ready);
    assert_ne!(file.pid, ram.pid);
    assert_eq!(sup.workers().len(), 2);

    let log = f.log("echo");
    assert_some_line(&log, &["hello worker=file", "subtypes=[\"file\"]"], ());
    assert_some_line(&log, &["hello worker=ram", "subtypes=[\"ram\"]"], ());
    // The file device came with exactly its uio node, its backing file and a fresh journal.
    let journal_len = format!("journal_len=Some({JOURNAL_BYTES})");
    assert_some_line(
        &log,
        &[
            "add worker=file",
            "uio=uio0",
            "nfds=3",
            "uio_content=\"UIO:uio0\"",
            "backing=Some(\"BACKING:disk0.img\")",
            "refusal=None",
            "journal=Fresh",
            &journal_len,
            "blocked=\"\"",
        ],
        (),
    );
    // The ram device with its uio node and journal only.
    assert_some_line(
        &log,
        &[
            "add worker=ram",
            "uio=uio1",
            "nfds=2",
            "uio_content=\"UIO:uio1\"",
            "backing=None",
            "journal=Fresh",
        ],
        (),
    );
    assert!(f.journal(1, "disk0").exists());
    assert!(f.journal(2, "scratch").exists());
    // The spec carries what discovery read.
    assert_some_line(
        &log,
        &[
            "uio=uio0",
            "hba=1",
            "name=disk0",
            "map_size=1082130432",
            "dev_size=1073741824",
            "block_size=512",
            "serial=6b1e2f4c-9a2d-4c1e-8f00-0123456789ab",
        ],
        (),
    );

    // The supervisor still holds its own descriptor of each uio node.
    for (uio, d) in [("uio0", "uio0"), ("uio1", "uio1")] {
        let id = sup.device_by_uio(uio).unwrap().id;
        assert_eq!(fd_target(sup.uio_fd(id).unwrap()), f.dev.join(d));
    }
}

fn worker_gets_a_scrubbed_environment_and_only_its_fds() {
    let f = Fixture::with_scratch_ram();
    f.file_device("uio1", "disk0");
    let mut sup = f.start("echo", &f.handlers(None), |o| {
        o.worker_log_format = Some(tcmu_warden_supervisor::config::LogFormat::Json);
    });
    until(&mut sup, "both devices are served", |s| {
        phase_of(s, "uio0") == Some(DevicePhase::Ready)
            && phase_of(s, "uio1") == Some(DevicePhase::Ready)
    });
    let log = f.log("echo");
    let hellos: Vec<&str> = log.lines().filter(|l| l.starts_with("hello ")).collect();
    assert_eq!(hellos.len(), 2, "{log}");
    for line in hellos {
        // Only stdin, stdout, stderr and the channel: not the uio node or backing file of
        // another device, not the other worker's channel.
        assert_contains(line, "fds=[0, 1, 2, 3]");
        assert_contains(line, "fd3=socket");
        assert_contains(line, "TCMU_WARDEN_FD=3");
        assert_contains(line, "TCMU_WARDEN_LOG_FORMAT=json");
        // The worker's stage-two settings (the jail is on by default) are not in the
        // environment: they come in the Hello (checked below).
        assert!(!line.contains("TCMU_WARDEN_JAIL"), "{line}");
        let env = line
            .split("env=[")
            .nth(1)
            .unwrap()
            .split(']')
            .next()
            .unwrap();
        for var in env.split(", ").filter(|v| !v.is_empty()) {
            let key = var.trim_matches('"').split('=').next().unwrap();
            assert!(
                ["TCMU_WARDEN_FD", "TCMU_WARDEN_LOG_FORMAT", "RUST_LOG"].contains(&key),
                "unexpected variable {var} in {line}"
            );
        }
    }
    assert_some_line(&log, &["stage two worker=ram jail=kill syscalls="], ());
    assert_some_line(&log, &["stage two worker=file jail=kill syscalls="], ());
}

fn refused_devices_are_logged_and_still_served() {
    let f = Fixture::new();
    let outside_dir = f.dev.parent().unwrap().join("elsewhere");
    fs::create_dir_all(&outside_dir).unwrap();
    let outside = outside_dir.join("secret.img");
    fs::write(&outside, "SECRET").unwrap();
    f.device(
        "uio0",
        1,
        "outside",
        Some(&format!("file/{}", outside.display())),
    );
    f.device("uio1", 1, "qc", Some("qcow//images/a.qcow2"));
    f.device("uio2", 1, "bare", None);
    let escape = format!("{}/../elsewhere/secret.img", f.data.display());
    f.device("uio3", 1, "dotdot", Some(&format!("file/{escape}")));
    harness::take_logs();
    let mut sup = f.start("echo", &f.handlers(None), |_| {});
    until(&mut sup, "all four devices are served", |s| {
        ["uio0", "uio1", "uio2", "uio3"]
            .iter()
            .all(|u| phase_of(s, u) == Some(DevicePhase::Ready))
    });

    let d0 = sup.device_by_uio("uio0").unwrap();
    assert_eq!(d0.worker, "file");
    assert!(!d0.has_backing);
    assert_contains(d0.refusal.as_deref().unwrap(), "outside allow_paths");
    let d3 = sup.device_by_uio("uio3").unwrap();
    assert_eq!(d3.worker, "file");
    assert_contains(d3.refusal.as_deref().unwrap(), "..");
    for uio in ["uio1", "uio2"] {
        let d = sup.device_by_uio(uio).unwrap();
        assert_eq!(d.worker, "refused", "{d:?}");
        assert!(d.refusal.is_some());
    }
    let refused = sup.worker("refused").unwrap();
    assert!(refused.subtypes.is_empty());
    assert!(sup.worker("qcow").is_none());

    let log = f.log("echo");
    assert_some_line(&log, &["hello worker=refused", "subtypes=[]"], ());
    for uio in ["uio0", "uio1", "uio2", "uio3"] {
        assert_some_line(
            &log,
            &[
                &format!("uio={uio} "),
                "nfds=2",
                "backing=None",
                "refusal=Some(",
            ],
            uio,
        );
    }
    assert!(!log.contains("SECRET"), "{log}");

    let logs = harness::take_logs();
    let warn = "device refused by policy";
    assert_some_line(
        &logs,
        &[
            "WARN",
            warn,
            "device=uio0",
            &outside.display().to_string(),
            "rule=handler.file.allow_paths",
        ],
        (),
    );
    assert_some_line(
        &logs,
        &[
            "WARN",
            warn,
            "device=uio1",
            "/images/a.qcow2",
            "rule=handler.qcow",
        ],
        (),
    );
    assert_some_line(&logs, &["WARN", warn, "device=uio2", "rule=dev_config"], ());
    assert_some_line(&logs, &["WARN", warn, "device=uio3", "rule=cfgstring"], ());
}

fn garbage_kills_only_that_worker() {
    let f = Fixture::new();
    f.file_device("uio0", "disk0");
    f.device("uio1", 2, "scratch", Some("ram/"));
    let mut sup = f.start("garbage@file", &f.handlers(None), |o| {
        o.lifecycle.restart_backoff_initial = Duration::from_millis(10);
        o.lifecycle.quarantine_after = 2;
    });
    until(
        &mut sup,
        "the file worker is killed, restarted, killed again and quarantined; ram is served",
        |s| {
            s.worker("file").is_some_and(|w| w.quarantined.is_some())
                && phase_of(s, "uio1") == Some(DevicePhase::Ready)
        },
    );
    let file = sup.worker("file").unwrap();
    assert_eq!(file.phase, WorkerPhase::Exited);
    assert_contains(file.kill_reason.as_deref().unwrap(), "protocol violation");
    assert_contains(
        file.last_crash.as_deref().unwrap(),
        "killed by the supervisor",
    );
    assert_eq!(file.exit.unwrap().signal(), Some(libc::SIGKILL));
    assert_eq!((file.total_crashes, file.restarts), (2, 1));
    assert_quarantined(&sup, "uio0");
    assert_eq!(
        f.log("garbage@file")
            .lines()
            .filter(|l| l.starts_with("add worker=file"))
            .count(),
        2,
        "the successor got the device too"
    );
    // The ring of the orphaned device stays open in the supervisor.
    let id = sup.device_by_uio("uio0").unwrap().id;
    assert_eq!(fd_target(sup.uio_fd(id).unwrap()), f.dev.join("uio0"));

    // The supervisor carries on: more turns, the other worker unaffected.
    for _ in 0..5 {
        sup.poll_once(Duration::from_millis(10)).unwrap();
    }
    assert_eq!(worker_phase(&sup, "ram"), Some(WorkerPhase::Ready));
    assert_eq!(phase_of(&sup, "uio1"), Some(DevicePhase::Ready));
}

fn reply_for_a_foreign_device_kills_the_worker() {
    let f = Fixture::with_scratch_ram();
    let mut sup = f.start("impostor", &f.handlers(None), |o| {
        o.lifecycle.quarantine_after = 1;
    });
    until_exited(&mut sup, "ram", "the impostor is reaped");
    let w = sup.worker("ram").unwrap();
    assert_contains(w.kill_reason.as_deref().unwrap(), "does not own");
    assert_quarantined(&sup, "uio0");
}

fn message_before_hello_kills_the_worker() {
    let f = Fixture::with_scratch_ram();
    let mut sup = f.start("early", &f.handlers(None), |o| {
        o.lifecycle.quarantine_after = 1;
    });
    until_exited(&mut sup, "ram", "the early talker is reaped");
    let w = sup.worker("ram").unwrap();
    assert_contains(
        w.kill_reason.as_deref().unwrap(),
        "sent DeviceReady before answering Hello",
    );
    assert_eq!(w.supported, None);
}

fn silent_worker_is_killed_at_the_handshake_deadline() {
    let f = Fixture::with_scratch_ram();
    let mut sup = f.start("silent", &f.handlers(None), |o| {
        o.handshake_timeout = Duration::from_millis(300);
        o.lifecycle.quarantine_after = 1;
    });
    assert_eq!(worker_phase(&sup, "ram"), Some(WorkerPhase::Handshaking));
    assert_eq!(phase_of(&sup, "uio0"), Some(DevicePhase::Queued));
    until_exited(&mut sup, "ram", "the silent worker is reaped");
    let w = sup.worker("ram").unwrap();
    assert_contains(w.kill_reason.as_deref().unwrap(), "no answer to Hello");
    assert_quarantined(&sup, "uio0");
}

fn crashing_worker_is_reaped_and_its_devices_kept() {
    let f = Fixture::new();
    f.file_device("uio0", "disk0");
    let mut sup = f.start("crash", &f.handlers(None), |o| {
        o.lifecycle.quarantine_after = 1;
    });
    until_exited(&mut sup, "file", "the crashed worker is reaped");
    let w = sup.worker("file").unwrap();
    assert_eq!(w.exit.unwrap().code(), Some(3));
    assert_eq!(w.kill_reason, None);
    assert_eq!(w.last_crash.as_deref(), Some("exit code 3"));
    until(
        &mut sup,
        "the refusals worker crashes too and is quarantined",
        |s| s.worker("refused").is_some_and(|w| w.quarantined.is_some()),
    );
    let d = sup.device_by_uio("uio0").unwrap();
    assert!(matches!(d.phase, DevicePhase::Quarantined(_)), "{d:?}");
    // The refusals worker (the same crashing fake here) was asked to answer for it, crashed
    // too and is quarantined as well: nothing answers for the device, so it stays blocked,
    // and its ring is kept (the supervisor's descriptor stays open).
    assert_eq!(d.worker, "refused");
    assert_eq!(d.home.as_deref(), Some("file"));
    assert!(d.blocked);
    assert_eq!(f.action(1, "disk0", "block_dev"), "1");
    assert_eq!(fd_target(sup.uio_fd(d.id).unwrap()), f.dev.join("uio0"));
    let r = sup.status_report();
    assert_eq!(r.devices[0].state, "quarantined");
    assert!(r.devices[0].blocked);
    assert_contains(&render_status(&r), "quarantined and BLOCKED");
}

fn worker_closing_its_channel_is_killed_after_grace() {
    let f = Fixture::with_scratch_ram();
    let mut sup = f.start("hangup", &f.handlers(None), |o| {
        o.exit_grace = Duration::from_millis(300);
        o.lifecycle.quarantine_after = 1;
    });
    until_exited(&mut sup, "ram", "the hung-up worker is reaped");
    let w = sup.worker("ram").unwrap();
    assert_contains(w.kill_reason.as_deref().unwrap(), "closed its channel");
    assert_eq!(w.exit.unwrap().signal(), Some(libc::SIGKILL));
    assert_some_line(&f.log("hangup"), &["hangup worker=ram"], ());
    assert_quarantined(&sup, "uio0");
}

fn worker_without_the_subtype_gets_refusals() {
    let f = Fixture::new();
    f.file_device("uio0", "disk0");
    let mut sup = f.start("nofile", &f.handlers(None), |_| {});
    until_ready(&mut sup, "uio0", "the device is served");
    let d = sup.device_by_uio("uio0").unwrap();
    assert_contains(
        d.refusal.as_deref().unwrap(),
        "has no handler for subtype \"file\"",
    );
    assert!(!d.has_backing);
    assert_some_line(
        &f.log("nofile"),
        &[
            "add worker=file",
            "nfds=2",
            "backing=None",
            "no handler for subtype",
        ],
        (),
    );
}

fn device_failure_is_recorded_and_logged_escaped() {
    let f = Fixture::with_scratch_ram();
    harness::take_logs();
    let mut sup = f.start("failing", &f.handlers(None), |_| {});
    until(&mut sup, "the device failed", |s| {
        matches!(phase_of(s, "uio0"), Some(DevicePhase::Failed(_)))
    });
    assert_eq!(
        phase_of(&sup, "uio0"),
        Some(DevicePhase::Failed("backing store\nis on fire".into()))
    );
    assert_eq!(worker_phase(&sup, "ram"), Some(WorkerPhase::Ready));
    let logs = harness::take_logs();
    assert_some_line(
        &logs,
        &[
            "worker cannot serve the device",
            "device=uio0",
            "backing store\\nis on fire",
        ],
        (),
    );
}

fn remove_device_round_trip_closes_the_uio_fd() {
    let f = Fixture::with_scratch_ram();
    let mut sup = f.start("echo", &f.handlers(None), |_| {});
    until_ready(&mut sup, "uio0", "the device is served");
    let node = f.dev.join("uio0");
    assert!(process_has_open(&node));
    let id = sup.device_by_uio("uio0").unwrap().id;
    assert!(sup.remove_device(id));
    assert_eq!(phase_of(&sup, "uio0"), Some(DevicePhase::Removing));
    let journal = f.journal(2, "scratch");
    assert!(journal.exists());
    until(&mut sup, "the device is released", |s| {
        s.device(id).is_none()
    });
    assert!(!process_has_open(&node));
    assert!(!journal.exists(), "a released device's journal is deleted");
    assert_some_line(
        &f.log("echo"),
        &["remove worker=ram", &format!("id={id}")],
        (),
    );
    assert_eq!(worker_phase(&sup, "ram"), Some(WorkerPhase::Ready));
}

fn device_isolation_gives_each_device_a_worker() {
    let f = Fixture::new();
    f.file_device("uio0", "d0");
    f.file_device("uio1", "d1");
    let handlers = format!(
        "[handler.file]\nallow_paths = [{:?}]\nisolation = 'device'\n",
        f.data.display().to_string()
    );
    let mut sup = f.start("echo", &handlers, |_| {});
    until(&mut sup, "both devices are served", |s| {
        phase_of(s, "uio0") == Some(DevicePhase::Ready)
            && phase_of(s, "uio1") == Some(DevicePhase::Ready)
    });
    let w0 = sup.worker("file:user_1/d0").unwrap();
    let w1 = sup.worker("file:user_1/d1").unwrap();
    assert_ne!(w0.pid, w1.pid);
    assert_eq!(w0.devices, vec![sup.device_by_uio("uio0").unwrap().id]);
    assert_eq!(w1.devices, vec![sup.device_by_uio("uio1").unwrap().id]);
    let log = f.log("echo");
    assert_some_line(
        &log,
        &["add worker=file:user_1/d0", "uio=uio0", "BACKING:d0.img"],
        (),
    );
    assert_some_line(
        &log,
        &["add worker=file:user_1/d1", "uio=uio1", "BACKING:d1.img"],
        (),
    );
}

fn orderly_shutdown_reaps_every_worker() {
    let f = Fixture::new();
    f.file_device("uio0", "disk0");
    f.device("uio1", 2, "scratch", Some("ram/"));
    let mut sup = f.start("echo", &f.handlers(None), |_| {});
    until(&mut sup, "both devices are served", |s| {
        phase_of(s, "uio0") == Some(DevicePhase::Ready)
            && phase_of(s, "uio1") == Some(DevicePhase::Ready)
    });
    assert!(!sup.is_finished());
    sup.begin_shutdown();
    until(&mut sup, "the shutdown completes", Supervisor::is_finished);
    for w in sup.workers() {
        assert_eq!(w.phase, WorkerPhase::Exited, "{w:?}");
        assert!(w.exit.unwrap().success(), "{w:?}");
        assert_eq!(w.kill_reason, None);
    }
    let log = f.log("echo");
    assert_some_line(&log, &["shutdown worker=file"], ());
    assert_some_line(&log, &["shutdown worker=ram"], ());
}

fn stubborn_worker_is_killed_at_the_shutdown_deadline() {
    let f = Fixture::with_scratch_ram();
    let mut sup = f.start("stubborn", &f.handlers(None), |o| {
        o.shutdown_timeout = Duration::from_millis(300);
    });
    until_ready(&mut sup, "uio0", "the device is served");
    sup.begin_shutdown();
    until(&mut sup, "the shutdown completes", Supervisor::is_finished);
    let w = sup.worker("ram").unwrap();
    assert_eq!(w.phase, WorkerPhase::Exited);
    assert_contains(w.kill_reason.as_deref().unwrap(), "after Shutdown");
    assert_eq!(w.exit.unwrap().signal(), Some(libc::SIGKILL));
    assert_some_line(&f.log("stubborn"), &["shutdown worker=ram"], ());
}

fn add_lines<'a>(log: &'a str, uio: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|l| l.starts_with("add ") && l.contains(&format!("uio={uio} ")))
        .collect()
}

fn heartbeat_timeout_kills_a_hung_worker_and_the_successor_recovers() {
    let f = Fixture::with_scratch_ram();
    harness::take_logs();
    let mut sup = f.start("hangonce", &f.handlers(None), |o| {
        o.lifecycle.heartbeat_interval = Duration::from_millis(50);
        o.lifecycle.heartbeat_timeout = Duration::from_millis(300);
        o.lifecycle.restart_backoff_initial = Duration::from_millis(20);
    });
    until(&mut sup, "the hung worker is killed and replaced", |s| {
        s.worker("ram").is_some_and(|w| w.restarts == 1)
    });
    until_ready(&mut sup, "uio0", "the successor serves the device");
    let w = sup.worker("ram").unwrap();
    assert_eq!(w.total_crashes, 1);
    assert_contains(w.last_crash.as_deref().unwrap(), "no answer to heartbeat");
    assert!(w.quarantined.is_none());
    let log = f.log("hangonce");
    assert_some_line(&log, &["hang worker=ram"], ());
    let adds = add_lines(&log, "uio0");
    assert_eq!(adds.len(), 2, "{log}");
    // The first worker got a fresh journal; the successor the same journal to recover from,
    // with the device blocked during the hand-over.
    assert_contains(adds[0], "journal=Fresh");
    assert_contains(adds[0], "blocked=\"\"");
    assert_contains(adds[1], "journal=Recover");
    assert_contains(adds[1], "blocked=\"1\"");
    let d = sup.device_by_uio("uio0").unwrap();
    assert!(!d.blocked);
    assert_eq!(d.recoveries, 1);
    assert_eq!(f.action(2, "scratch", "block_dev"), "0");
    let logs = harness::take_logs();
    assert_some_line(
        &logs,
        &[
            "worker crashed",
            "worker=ram",
            "killed by the supervisor: no answer to heartbeat",
            "uio0 (user_2/scratch)",
        ],
        (),
    );
    assert_some_line(&logs, &["device recovered", "device=uio0"], ());
}

fn crash_is_restarted_with_backoff_then_quarantined() {
    let f = Fixture::new();
    f.file_device("uio0", "disk0");
    let mut sup = f.start("crash", &f.handlers(None), |o| {
        o.lifecycle.restart_backoff_initial = Duration::from_millis(20);
        o.lifecycle.restart_backoff_max = Duration::from_millis(80);
        o.lifecycle.quarantine_after = 3;
    });
    // After the first crash a restart is pending, with the device blocked and waiting.
    until(&mut sup, "the first crash is handled", |s| {
        s.worker("file").is_some_and(|w| w.total_crashes >= 1)
    });
    let w = sup.worker("file").unwrap();
    if w.total_crashes == 1 {
        assert!(w.restart_at.is_some(), "{w:?}");
        let d = sup.device_by_uio("uio0").unwrap();
        assert_eq!(d.phase, DevicePhase::Recovering);
        assert!(d.blocked);
    }
    until(&mut sup, "the worker is quarantined", |s| {
        s.worker("file").is_some_and(|w| w.quarantined.is_some())
    });
    let w = sup.worker("file").unwrap();
    assert_eq!((w.total_crashes, w.restarts), (3, 2));
    assert_eq!(w.phase, WorkerPhase::Exited);
    assert!(w.restart_at.is_none());
    assert_eq!(w.last_crash.as_deref(), Some("exit code 3"));
    let d = sup.device_by_uio("uio0").unwrap();
    let DevicePhase::Quarantined(why) = &d.phase else {
        panic!("{d:?}")
    };
    assert_contains(why, "crashed 3 times");
    assert!(d.blocked);
    assert_eq!(f.action(1, "disk0", "block_dev"), "1");
    // Each successor got the device again, the backing file reopened.
    let log = f.log("crash");
    let adds = add_lines(&log, "uio0");
    assert_eq!(adds.len(), 3, "{log}");
    for add in &adds[1..] {
        assert_contains(add, "journal=Recover");
        assert_contains(add, "BACKING:disk0.img");
    }
    // The quarantine holds: more turns start no file worker.
    let pid = w.pid;
    for _ in 0..5 {
        sup.poll_once(Duration::from_millis(20)).unwrap();
    }
    assert_eq!(sup.worker("file").unwrap().pid, pid);
}

/// Runs the `tcmu-warden` binary with `args` while turning the event loop (the binary talks to
/// the supervisor's control socket), and returns what it did.
fn cli_turning(sup: &mut Supervisor, args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let client = std::thread::spawn(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tcmu-warden"))
            .args(&args)
            .output()
            .unwrap()
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client.is_finished() {
        assert!(Instant::now() < deadline, "the client did not finish");
        sup.poll_once(Duration::from_millis(20)).unwrap();
    }
    client.join().unwrap()
}

fn quarantined_devices_fail_fast_and_serve_again_once_lifted() {
    let f = Fixture::new();
    f.file_device("uio0", "disk0");
    f.device("uio1", 2, "scratch", Some("ram/"));
    harness::take_logs();
    let mut sup = f.start("crashuntil@file", &f.handlers(None), |o| {
        o.lifecycle.restart_backoff_initial = Duration::from_millis(10);
        o.lifecycle.quarantine_after = 2;
    });
    let socket = f.root.join("control.sock");
    sup.attach_control(ControlServer::bind(&socket).unwrap());
    let socket = socket.display().to_string();
    until(
        &mut sup,
        "the file worker is quarantined and the refusals worker answers for uio0",
        |s| {
            s.worker("file").is_some_and(|w| w.quarantined.is_some())
                && s.device_by_uio("uio0")
                    .is_some_and(|d| d.phase == DevicePhase::Ready && d.worker == "refused")
        },
    );
    // Answered by the refusals worker (NOT READY at once), so no longer blocked.
    let d = sup.device_by_uio("uio0").unwrap();
    let id = d.id;
    assert!(!d.blocked, "{d:?}");
    assert_eq!(f.action(1, "disk0", "block_dev"), "0");
    assert_eq!(d.home.as_deref(), Some("file"));
    assert!(!d.has_backing);
    assert_eq!(d.journal, JournalMode::Recover);
    let refusal = d.refusal.as_deref().unwrap();
    assert_contains(refusal, "worker file crashed 2 times");
    assert_contains(refusal, "`tcmu-warden quarantine lift file`");
    // It got the device while it was blocked, with the journal the crashed worker left (so it
    // finishes what was in flight, exactly once) and no backing store.
    let log = f.log("crashuntil@file");
    let adds = add_lines(&log, "uio0");
    let refused = adds
        .iter()
        .find(|l| l.contains("worker=refused"))
        .unwrap_or_else(|| panic!("{log}"));
    for part in [
        "nfds=2",
        "backing=None",
        "refusal=Some(\"worker file crashed 2 times",
        "journal=Recover",
        "blocked=\"1\"",
    ] {
        assert_contains(refused, part);
    }
    // The other worker is untouched.
    until_ready(&mut sup, "uio1", "the ram worker serves uio1");
    assert_eq!(sup.device_by_uio("uio1").unwrap().worker, "ram");
    // A device of the quarantined worker that appears now fails fast from the start.
    f.file_device("uio2", "disk1");
    let dev = tcmu_warden_supervisor::discovery::read_device(&f.sysfs, "uio2")
        .unwrap()
        .unwrap();
    let id2 = sup.adopt(dev).unwrap();
    until_ready(&mut sup, "uio2", "the refusals worker answers for uio2");
    let d2 = sup.device(id2).unwrap();
    assert_eq!(
        (d2.worker.as_str(), d2.home.as_deref(), d2.blocked),
        ("refused", Some("file"), false)
    );
    assert_contains(d2.refusal.as_deref().unwrap(), "quarantine lift file");
    let logs = harness::take_logs();
    assert_some_line(
        &logs,
        &[
            "worker quarantined",
            "worker=file",
            "fail fast with NOT READY",
        ],
        (),
    );
    assert_some_line(
        &logs,
        &["handed to the refusals worker", "device=uio0", "02/04/03"],
        (),
    );

    // What `status --json` shows, through the control socket.
    let out = cli_turning(&mut sup, &["status", "--json", "--socket", &socket]);
    assert!(out.status.success(), "{out:?}");
    let r: StatusReport = serde_json::from_slice(&out.stdout).unwrap();
    let dev = r.devices.iter().find(|x| x.uio == "uio0").unwrap();
    assert_eq!(
        (dev.state.as_str(), dev.blocked, dev.worker.as_str()),
        ("quarantined", false, "refused")
    );
    assert_eq!(dev.home_worker.as_deref(), Some("file"));
    let w = r.workers.iter().find(|w| w.name == "file").unwrap();
    assert_contains(w.quarantined.as_deref().unwrap(), "crashed 2 times");
    assert_eq!(
        (w.devices.clone(), w.lifts, w.state.as_str()),
        (vec![id, id2], 0, "exited")
    );
    let text = render_status(&r);
    assert_contains(
        &text,
        "quarantined with worker file: fails fast (NOT READY, 02/04/03) until `tcmu-warden quarantine lift file`",
    );
    assert_contains(&text, "QUARANTINED: worker file crashed 2 times");

    // Wrong names are refused, with a non-zero exit status and a clear message.
    let out = cli_turning(
        &mut sup,
        &["quarantine", "lift", "nosuch", "--socket", &socket],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_contains(
        &stderr,
        "no worker is named \"nosuch\" (workers: file, ram, refused)",
    );
    let out = cli_turning(
        &mut sup,
        &["quarantine", "lift", "ram", "--socket", &socket],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_contains(
        &String::from_utf8_lossy(&out.stderr),
        "worker \"ram\" is not quarantined",
    );
    assert!(matches!(
        sup.lift_quarantine("refused"),
        Err(LiftError::NotQuarantined(_))
    ));

    // The operator fixes the cause and lifts the quarantine: the device is blocked again,
    // released by the refusals worker and handed, with its journal, to a new file worker.
    fs::write(f.bin.join("crashuntil@file.heal"), "").unwrap();
    let out = cli_turning(
        &mut sup,
        &["quarantine", "lift", "file", "--socket", &socket],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_contains(
        &stdout,
        "quarantine of worker file lifted; 2 devices go back to it:",
    );
    assert_contains(&stdout, "uio0 (user_1/disk0)");
    assert_contains(&stdout, "uio2 (user_1/disk1)");
    until(&mut sup, "a new file worker serves uio0 and uio2", |s| {
        ["uio0", "uio2"].iter().all(|uio| {
            s.device_by_uio(uio)
                .is_some_and(|d| d.phase == DevicePhase::Ready && d.worker == "file" && !d.blocked)
        })
    });
    let d2 = sup.device(id2).unwrap();
    assert_eq!((d2.home.clone(), d2.refusal.clone()), (None, None));
    assert_some_line(
        &f.log("crashuntil@file"),
        &["add worker=file", "uio=uio2 ", "BACKING:disk1.img"],
        (),
    );
    let d = sup.device_by_uio("uio0").unwrap();
    assert_eq!((d.id, d.home.clone(), d.refusal.clone()), (id, None, None));
    assert!(d.has_backing);
    assert_eq!(f.action(1, "disk0", "block_dev"), "0");
    let w = sup.worker("file").unwrap();
    assert_eq!(w.phase, WorkerPhase::Ready);
    assert_eq!(
        (w.quarantined.clone(), w.lifts, w.total_crashes),
        (None, 1, 2)
    );
    let log = f.log("crashuntil@file");
    let removed = log
        .lines()
        .position(|l| l == format!("remove worker=refused id={id}"))
        .unwrap_or_else(|| panic!("{log}"));
    let lines: Vec<&str> = log.lines().collect();
    let back = lines
        .iter()
        .rposition(|l| l.starts_with("add worker=file") && l.contains("uio=uio0 "))
        .unwrap();
    assert!(removed < back, "{log}");
    let back = lines[back];
    for part in [
        "backing=Some(\"BACKING:disk0.img\")",
        "refusal=None",
        "journal=Recover",
        "blocked=\"1\"",
    ] {
        assert_contains(back, part);
    }
    let r = sup.status_report();
    let dev = r.devices.iter().find(|x| x.uio == "uio0").unwrap();
    assert_eq!(
        (dev.state.as_str(), dev.blocked, dev.home_worker.clone()),
        ("ready", false, None)
    );
    let w = r.workers.iter().find(|w| w.name == "file").unwrap();
    assert_eq!((w.quarantined.clone(), w.lifts), (None, 1));
    assert_contains(&render_status(&r), "quarantine lifted 1 times");
    // Lifted once; a second lift is an error.
    let out = cli_turning(
        &mut sup,
        &["quarantine", "lift", "file", "--socket", &socket],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_contains(
        &String::from_utf8_lossy(&out.stderr),
        "worker \"file\" is not quarantined",
    );
    assert_some_line(
        &harness::take_logs(),
        &["quarantine lifted by the operator", "worker=file"],
        (),
    );
}

fn sigsys_is_reported_as_a_sandbox_violation() {
    let f = Fixture::with_scratch_ram();
    harness::take_logs();
    let mut sup = f.start("sigsys", &f.handlers(None), |o| {
        o.lifecycle.quarantine_after = 1;
    });
    until_exited(&mut sup, "ram", "the worker is reaped");
    let w = sup.worker("ram").unwrap();
    assert_eq!(w.exit.unwrap().signal(), Some(libc::SIGSYS));
    assert_contains(w.last_crash.as_deref().unwrap(), "sandbox violation");
    assert_some_line(
        &harness::take_logs(),
        &[
            "worker crashed",
            "sandbox violation",
            "SIGSYS",
            "uio0 (user_2/scratch)",
        ],
        (),
    );
}

fn restarted_supervisor_recovers_devices_from_their_journals() {
    let f = Fixture::with_scratch_ram();
    f.file_device("uio1", "disk1");
    // A previous supervisor's journal for uio0 (its content is the worker's business), and a
    // stale one for a backstore that no longer exists.
    let journal = f.journal(2, "scratch");
    fs::create_dir_all(journal.parent().unwrap()).unwrap();
    fs::write(&journal, vec![0x5a; JOURNAL_BYTES as usize]).unwrap();
    let stale = f.journal(9, "gone");
    fs::create_dir_all(stale.parent().unwrap()).unwrap();
    fs::write(&stale, b"old").unwrap();
    let mut sup = f.start("echo", &f.handlers(None), |_| {});
    until(&mut sup, "both devices are served", |s| {
        phase_of(s, "uio0") == Some(DevicePhase::Ready)
            && phase_of(s, "uio1") == Some(DevicePhase::Ready)
    });
    assert!(
        !stale.exists(),
        "the journal of a vanished device is pruned"
    );
    let log = f.log("echo");
    let add0 = add_lines(&log, "uio0");
    assert_eq!(add0.len(), 1);
    assert_contains(add0[0], "journal=Recover");
    assert_contains(add0[0], "blocked=\"1\"");
    let add1 = add_lines(&log, "uio1");
    assert_contains(add1[0], "journal=Fresh");
    assert_contains(add1[0], "blocked=\"\"");
    // The journal was handed over as found, not cleared.
    let content = fs::read(&journal).unwrap();
    assert_eq!(content.len() as u64, JOURNAL_BYTES);
    assert!(content.iter().all(|b| *b == 0x5a));
    let d0 = sup.device_by_uio("uio0").unwrap();
    assert_eq!((d0.recoveries, d0.blocked), (1, false));
    assert_eq!(d0.journal_path.as_deref(), Some(journal.as_path()));
    assert_eq!(f.action(2, "scratch", "block_dev"), "0");
    assert_eq!(f.action(1, "disk1", "block_dev"), "", "never blocked");
}

fn inconsistent_journal_falls_back_to_a_ring_reset() {
    let f = Fixture::with_scratch_ram();
    let journal = f.journal(2, "scratch");
    fs::create_dir_all(journal.parent().unwrap()).unwrap();
    fs::write(&journal, vec![0xee; JOURNAL_BYTES as usize]).unwrap();
    harness::take_logs();
    let mut sup = f.start("needsreset", &f.handlers(None), |_| {});
    until_ready(&mut sup, "uio0", "the device is served");
    let first_add = served_after_one_ring_reset(
        &f,
        &sup,
        "needsreset",
        &[
            "falling back to a ring reset",
            "device=uio0",
            "fetch position outside the ring",
        ],
    );
    assert_contains(&first_add, "journal=Recover");
    let content = fs::read(&journal).unwrap();
    assert_eq!(content.len() as u64, JOURNAL_BYTES);
    assert!(content.iter().all(|b| *b == 0), "the journal is cleared");
}

/// A device adopted with no journal (none existed: a first start, a lost `/run`, another TCMU
/// daemon before us) whose ring already holds commands: the worker refuses to serve it from the
/// tail, and the supervisor resets the ring (blocked first) and hands it over again.
fn busy_ring_without_a_journal_is_reset_before_it_is_served() {
    let f = Fixture::with_scratch_ram();
    harness::take_logs();
    let mut sup = f.start("dirtyring", &f.handlers(None), |_| {});
    until_ready(&mut sup, "uio0", "the device is served");
    let first_add = served_after_one_ring_reset(
        &f,
        &sup,
        "dirtyring",
        &[
            "holds commands no journal accounts for",
            "device=uio0",
            "3 commands wait in the ring",
        ],
    );
    assert_contains(&first_add, "journal=Fresh");
    assert_contains(&first_add, "blocked=\"\"");
}

/// What the ring-reset tests share: the fake worker of `mode` was handed device `uio0`
/// (`user_2/scratch`) twice, the second time blocked and with a fresh journal; the supervisor
/// reset the ring once, unblocked the device, killed no worker, and logged a line with all of
/// `why` and the reset itself. Returns the first hand-over's log line.
fn served_after_one_ring_reset(f: &Fixture, sup: &Supervisor, mode: &str, why: &[&str]) -> String {
    let log = f.log(mode);
    let adds = add_lines(&log, "uio0");
    assert_eq!(adds.len(), 2, "{log}");
    assert_contains(adds[1], "journal=Fresh");
    assert_contains(adds[1], "blocked=\"1\"");
    assert_eq!(f.action(2, "scratch", "reset_ring"), "1");
    assert_eq!(f.action(2, "scratch", "block_dev"), "0");
    let d = sup.device_by_uio("uio0").unwrap();
    assert_eq!((d.resets, d.recoveries, d.blocked), (1, 0, false));
    assert_eq!(sup.worker("ram").unwrap().total_crashes, 0);
    let logs = harness::take_logs();
    assert_some_line(&logs, why, ());
    assert_some_line(&logs, &["ring reset", "device=uio0"], ());
    adds[0].to_owned()
}

/// A ring just reset (and blocked) holds no commands: a worker that still answers
/// `RecoveryFailed` is lying, and would make the supervisor reset the ring forever.
fn recovery_failed_after_a_reset_kills_the_worker() {
    let f = Fixture::with_scratch_ram();
    let mut sup = f.start("liar", &f.handlers(None), |o| {
        o.lifecycle.restart_backoff_initial = Duration::from_secs(60);
    });
    until(&mut sup, "the worker is killed", |s| {
        s.worker("ram").is_some_and(|w| w.total_crashes >= 1)
    });
    let w = sup.worker("ram").unwrap();
    assert_contains(w.kill_reason.as_deref().unwrap(), "just reset");
    let log = f.log("liar");
    let adds = add_lines(&log, "uio0");
    assert_eq!(adds.len(), 2, "{log}");
    let d = sup.device_by_uio("uio0").unwrap();
    assert_eq!(d.resets, 1);
    assert_eq!(d.phase, DevicePhase::Recovering);
    assert!(d.blocked);
}

fn heartbeats_carry_the_device_counters() {
    let f = Fixture::with_scratch_ram();
    let mut sup = f.start("echo", &f.handlers(None), |o| {
        o.lifecycle.heartbeat_interval = Duration::from_millis(20);
        o.lifecycle.heartbeat_timeout = Duration::from_secs(20);
    });
    until(&mut sup, "two heartbeats were answered", |s| {
        s.worker("ram").is_some_and(|w| w.last_pong.is_some())
    });
    let first = sup.worker("ram").unwrap().last_pong.unwrap();
    until(&mut sup, "another heartbeat was answered", |s| {
        s.worker("ram")
            .is_some_and(|w| w.last_pong.is_some_and(|t| t > first))
    });
    let w = sup.worker("ram").unwrap();
    assert_eq!(w.total_crashes, 0);
    assert_eq!(w.phase, WorkerPhase::Ready);
    let id = sup.device_by_uio("uio0").unwrap().id;
    assert_eq!(w.stats.len(), 1);
    assert_eq!(w.stats[0].id, id);
    assert!(w.stats[0].commands > 1001, "{:?}", w.stats);
}

fn oversized_and_out_of_order_messages_kill_and_restart() {
    for (mode, why) in [
        ("oversized", "larger than"),
        ("twice", "DeviceReady for device"),
    ] {
        let f = Fixture::new();
        f.device("uio0", 2, "scratch", Some("ram/"));
        let mut sup = f.start(mode, &f.handlers(None), |o| {
            o.lifecycle.restart_backoff_initial = Duration::from_millis(10);
            o.lifecycle.quarantine_after = 2;
        });
        until(
            &mut sup,
            "the worker is killed, restarted, and quarantined",
            |s| s.worker("ram").is_some_and(|w| w.quarantined.is_some()),
        );
        let w = sup.worker("ram").unwrap();
        assert_contains(w.kill_reason.as_deref().unwrap(), why);
        assert_eq!((w.total_crashes, w.restarts), (2, 1), "{mode}");
        assert_eq!(add_lines(&f.log(mode), "uio0").len(), 2, "{mode}");
    }
}

fn workers_are_jailed_and_the_jail_is_verified() {
    let f = Fixture::new();
    f.file_device("uio0", "disk0");
    f.device("uio1", 2, "scratch", Some("ram/"));
    harness::take_logs();
    let mut sup = f.start("echo", &f.handlers(None), |_| {});
    until(&mut sup, "both devices are served", |s| {
        phase_of(s, "uio0") == Some(DevicePhase::Ready)
            && phase_of(s, "uio1") == Some(DevicePhase::Ready)
    });
    for name in ["file", "ram"] {
        let w = sup.worker(name).unwrap();
        let jail = w.jail.expect("jailed by default");
        // What the supervisor read back from /proc/<pid>/status after the handshake.
        let seen = jail.observed.clone().expect("verified at Hello");
        assert_eq!(seen.seccomp_mode, 2, "{name}");
        assert!(seen.no_new_privs, "{name}");
        assert!(seen.caps_empty(), "{name}: {}", seen.caps_summary());
        assert_eq!(seen.seccomp_filters, Some(jail.stage_one_filters), "{name}");
        assert!(
            jail.mismatches().is_empty(),
            "{name}: {:?}",
            jail.mismatches()
        );
        // The fake worker is not built on the worker runtime: no stage two.
        assert_eq!(jail.stage_two(), Some(false), "{name}");
        assert!(jail.landlock.abi > 0);
        // And independently of the supervisor's own check:
        let status = fs::read_to_string(format!("/proc/{}/status", w.pid)).unwrap();
        assert_some_line(&status, &["Seccomp:", "2"], name);
        assert_some_line(&status, &["NoNewPrivs:", "1"], name);
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_some_line(&status, &[set, "0000000000000000"], name);
        }
    }
    // Stage two's request reached each worker in its Hello (the process contract), not in its
    // environment.
    let hellos = f.log("echo");
    assert_some_line(&hellos, &["stage two worker=file jail=kill syscalls="], ());
    assert_some_line(&hellos, &["stage two worker=ram jail=kill syscalls="], ());
    let logs = harness::take_logs();
    assert_some_line(
        &logs,
        &["worker jailed (stage one)", "worker=file", "landlock_abi="],
        (),
    );
    assert_some_line(
        &logs,
        &["worker jail verified", "worker=ram", "seccomp_mode=2"],
        (),
    );
    assert_some_line(
        &logs,
        &[
            "WARN",
            "did not install its stage-two seccomp allow-list",
            "worker=file",
        ],
        (),
    );
}

fn an_unenforceable_jail_keeps_the_worker_from_starting() {
    let f = Fixture::with_scratch_ram();
    harness::take_logs();
    // A read path that does not exist cannot be granted: the worker is not started unconfined,
    // it is not started at all, and the log says why.
    let handlers = "[handler.ram]\nread_paths = ['/nonexistent/tcmu-warden-test']\n";
    let sup = f.start("echo", handlers, |_| {});
    assert!(sup.worker("ram").is_none());
    assert_eq!(phase_of(&sup, "uio0"), Some(DevicePhase::Orphaned));
    let logs = harness::take_logs();
    assert_some_line(
        &logs,
        &[
            "ERROR",
            "its jail cannot be enforced",
            "worker=ram",
            "/nonexistent/tcmu-warden-test",
        ],
        (),
    );
    assert!(f.log("echo").is_empty(), "a worker ran: {}", f.log("echo"));
}

fn no_jail_switch_starts_workers_unconfined() {
    let f = Fixture::with_scratch_ram();
    harness::take_logs();
    let mut sup = f.start("echo", &f.handlers(None), |o| o.unconfined = true);
    until_ready(&mut sup, "uio0", "the device is served");
    let w = sup.worker("ram").unwrap();
    assert!(w.jail.is_none());
    let status = fs::read_to_string(format!("/proc/{}/status", w.pid)).unwrap();
    assert_some_line(&status, &["Seccomp:", "0"], ());
    let log = f.log("echo");
    assert!(!log.contains("TCMU_WARDEN_JAIL"), "{log}");
    assert_some_line(&log, &["stage two worker=ram jail=none"], ());
    assert_some_line(
        &harness::take_logs(),
        &["WARN", "WITHOUT ITS JAIL", "NOT FOR PRODUCTION"],
        (),
    );
}

/// Runs `tcmu-warden <args>` to completion; returns its exit code, stdout and stderr.
fn cli(args: &[&OsStr]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tcmu-warden"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// A configuration file checked by `tcmu-warden <command>`: the shipped example passes, with
/// the returned stdout; `bad` (written to a file) fails, and the returned stderr names the file
/// and `bad_line`.
fn check_files(command: &[&str], bad: &str, bad_line: usize) -> (String, String) {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/tcmu-warden.example.toml");
    let mut args: Vec<&OsStr> = command.iter().map(OsStr::new).collect();
    args.push(example.as_os_str());
    let (code, stdout, stderr) = cli(&args);
    assert_eq!(code, Some(0), "{stderr}");
    assert_contains(&stdout, "valid");

    let f = Fixture::new();
    let path = f.data.join("bad.toml");
    fs::write(&path, bad).unwrap();
    args.pop();
    args.push(path.as_os_str());
    let (code, _, stderr) = cli(&args);
    assert_eq!(code, Some(1), "{stderr}");
    assert_contains(&stderr, &format!("{}:{bad_line}:", path.display()));
    (stdout, stderr)
}

fn binary_policy_check() {
    let (stdout, stderr) =
        check_files(&["policy", "check"], "[jail]\n\nsyscalls = ['ptrace']\n", 3);
    assert_contains(&stdout, "[handler.file]");
    assert_contains(&stdout, "[handler.ram]");
    assert_contains(&stdout, "stage one denies:");
    assert_contains(&stdout, "landlock on this kernel:");
    assert_contains(&stderr, "denied to every worker");
}

fn binary_check_config() {
    let (stdout, stderr) = check_files(
        &["check-config"],
        "[daemon]\n\n[handler.file]\nallow_paths = ['relative']\n",
        4,
    );
    assert_contains(&stdout, "file  isolation = subtype");
    assert_contains(&stdout, "allow /var/lib/tcmu");
    assert_contains(&stdout, "ram   max_size = 64GiB");
    assert_contains(&stdout, "journal_dir = /run/tcmu-warden/journal");
    assert_contains(
        &stdout,
        "restarts after 100ms doubling to 30s; quarantine after 5 crashes within 10m",
    );
    assert_contains(&stderr, "not an absolute path");

    let (code, stdout, _) = cli(&[OsStr::new("--version")]);
    assert_eq!(code, Some(0));
    assert_contains(&stdout, env!("CARGO_PKG_VERSION"));
}

fn binary_runs_and_stops_on_sigterm() {
    let f = Fixture::new();
    f.file_device("uio0", "disk0");
    f.device("uio1", 2, "scratch", Some("ram/"));
    let config = f.data.join("warden.toml");
    fs::write(&config, f.config_text("echo", "", &f.handlers(None))).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tcmu-warden"))
        .args(["run", "--foreground", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while f
        .log("echo")
        .lines()
        .filter(|l| l.starts_with("add "))
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "devices never reached the workers"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the daemon exited early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the daemon did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status:?}\n{stderr}");
    assert_contains(&stderr, "termination requested");
    assert_contains(&stderr, "tcmu-warden stopped");
    let log = f.log("echo");
    assert_some_line(&log, &["shutdown worker=file"], ());
    assert_some_line(&log, &["shutdown worker=ram"], ());
}

// ---- the fake worker --------------------------------------------------------------------------

mod fake_worker {
    use super::*;

    /// Runs as a worker. The file name we were started as selects the behaviour.
    pub fn main() -> ExitCode {
        // What we were started with, before opening anything ourselves.
        let fds = open_fds();
        // The worker's jail keeps /proc out of reach, so the descriptor is inspected directly.
        let fd3 = if is_socket(3) { "socket:" } else { "" };
        let mut env: Vec<String> = std::env::vars()
            .map(|(k, v)| {
                if k == "RUST_LOG" {
                    k
                } else {
                    format!("{k}={v}")
                }
            })
            .collect();
        env.sort();

        let fake = FakeWorker::from_env();
        let (mode, target) = match fake.mode.split_once('@') {
            Some((m, t)) => (m.to_owned(), Some(t.to_owned())),
            None => (fake.mode.clone(), None),
        };
        let Some((worker, subtypes)) = fake.hello() else {
            return ExitCode::from(4);
        };
        let kind = if fd3.starts_with("socket:") {
            "socket"
        } else {
            "other"
        };
        fake.log(format!(
            "hello worker={worker} subtypes={subtypes:?} env={env:?} fds={fds:?} fd3={kind}"
        ));
        let active = target.as_deref().is_none_or(|t| t == worker);
        let mode = if active { mode.as_str() } else { "echo" };

        match mode {
            "silent" => {
                // Never answer; leave when the supervisor closes its end or kills us.
                while fake.chan.recv::<ToWorker>().is_ok() {}
                return ExitCode::SUCCESS;
            }
            "early" => fake.send(FromWorker::DeviceReady { id: 1 }),
            _ => {}
        }
        let offered = if mode == "nofile" {
            subtypes.iter().filter(|s| *s != "file").cloned().collect()
        } else {
            subtypes.clone()
        };
        fake.send(FromWorker::Hello {
            pid: std::process::id(),
            subtypes: offered,
        });
        if mode == "hangup" {
            // Take the first device, then close the channel but keep running until killed.
            let _first = fake.chan.recv::<ToWorker>();
            fake.log(format!("hangup worker={worker}"));
            drop(fake);
            loop {
                std::thread::park();
            }
        }

        let mut held: Vec<(u64, DeviceFds<OwnedFd>)> = Vec::new();
        loop {
            let (msg, fds) = match fake.chan.recv::<ToWorker>() {
                Ok(m) => m,
                Err(ProtoError::Closed) => return ExitCode::SUCCESS,
                Err(e) => {
                    fake.log(format!("recv error {e}"));
                    return ExitCode::from(2);
                }
            };
            match msg {
                ToWorker::AddDevice(spec) => {
                    let nfds = fds.len();
                    let Ok(named) = DeviceFds::claim(&spec, fds) else {
                        fake.log(format!(
                            "add worker={worker} id={} bad descriptors",
                            spec.id
                        ));
                        return ExitCode::from(2);
                    };
                    let uio = read_all(&named.uio);
                    let backing = named.backing.as_ref().map(read_all);
                    let journal_len = named.journal.as_ref().map(|fd| {
                        fs::File::from(fd.try_clone().unwrap())
                            .metadata()
                            .unwrap()
                            .len()
                    });
                    // What the supervisor had written to block_dev when it handed us the device.
                    let sysfs = fake.sysfs();
                    let blocked = fs::read_to_string(tcmu_warden_supervisor::lio::action_path(
                        &sysfs,
                        spec.hba,
                        &spec.name,
                        "block_dev",
                    ))
                    .unwrap_or_default();
                    fake.log(format!(
                        "add worker={worker} id={} uio={} nfds={} uio_content={:?} backing={:?} \
                         refusal={:?} hba={} name={} map_size={} dev_size={} block_size={} \
                         serial={} journal={:?} journal_len={journal_len:?} blocked={blocked:?}",
                        spec.id,
                        spec.uio,
                        nfds,
                        uio,
                        backing,
                        spec.refusal,
                        spec.hba,
                        spec.name,
                        spec.map_size,
                        spec.dev_size,
                        spec.block_size,
                        spec.unit_serial,
                        spec.journal,
                    ));
                    held.push((spec.id, named));
                    // `...once` modes misbehave only in the first process of the test.
                    let once_marker = PathBuf::from(format!("{}.once", fake.argv0.display()));
                    let first = mode.ends_with("once")
                        && OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .open(&once_marker)
                            .is_ok();
                    // `crashuntil` crashes until the test "fixes" it (creates `<symlink>.heal`).
                    let healed = PathBuf::from(format!("{}.heal", fake.argv0.display())).exists();
                    let mode = match mode {
                        "hangonce" if first => "hang",
                        "crashonce" if first => "crash",
                        "crashuntil" if !healed => "crash",
                        "crashuntil" => "echo",
                        m if m.ends_with("once") => "echo",
                        m => m,
                    };
                    match mode {
                        "garbage" => {
                            let dup = nix::unistd::dup(fake.chan.fd()).unwrap();
                            let raw = UnixDatagram::from(dup);
                            raw.send(&[0xde, 0xad, 0xbe, 0xef, 0xff, 0xff]).unwrap();
                        }
                        "oversized" => {
                            let dup = nix::unistd::dup(fake.chan.fd()).unwrap();
                            let raw = UnixDatagram::from(dup);
                            let frame = vec![0u8; tcmu_warden_proto::MAX_MESSAGE_BYTES + 100];
                            raw.send(&frame).unwrap();
                        }
                        "twice" => {
                            fake.send(FromWorker::DeviceReady { id: spec.id });
                            fake.send(FromWorker::DeviceReady { id: spec.id });
                        }
                        "impostor" => fake.send(FromWorker::DeviceReady { id: spec.id + 1000 }),
                        "crash" => std::process::exit(3),
                        "sigsys" => {
                            // What the seccomp filter does to a forbidden system call.
                            // SAFETY: raising a signal in this (single-threaded) fake.
                            unsafe { libc::raise(libc::SIGSYS) };
                            std::process::exit(9);
                        }
                        "hang" => {
                            fake.send(FromWorker::DeviceReady { id: spec.id });
                            fake.log(format!("hang worker={worker}"));
                            // Alive, but never reads (or answers) anything again.
                            loop {
                                std::thread::park();
                            }
                        }
                        "needsreset" if spec.journal == JournalMode::Recover => {
                            fake.send(FromWorker::RecoveryFailed {
                                id: spec.id,
                                reason: "fetch position outside the ring".into(),
                            })
                        }
                        // Commands wait in the ring until the supervisor resets it (which it
                        // does with the device blocked).
                        "dirtyring" if spec.journal != JournalMode::Recover && blocked != "1" => {
                            fake.send(FromWorker::RecoveryFailed {
                                id: spec.id,
                                reason: "3 commands wait in the ring (cmd_tail 0, cmd_head \
                                             384) and no journal records which of them are \
                                             still outstanding"
                                    .into(),
                            })
                        }
                        "liar" => fake.send(FromWorker::RecoveryFailed {
                            id: spec.id,
                            reason: "commands wait in the ring".into(),
                        }),
                        "failing" => fake.send(FromWorker::DeviceFailed {
                            id: spec.id,
                            reason: "backing store\nis on fire".into(),
                        }),
                        _ => fake.send(FromWorker::DeviceReady { id: spec.id }),
                    }
                }
                ToWorker::RemoveDevice { id } => {
                    held.retain(|(held_id, _)| *held_id != id);
                    fake.log(format!("remove worker={worker} id={id}"));
                    fake.send(FromWorker::DeviceRemoved { id });
                }
                ToWorker::Reconfig { id, .. } => fake.send(FromWorker::Reconfigured { id }),
                ToWorker::Ping { seq } => fake.send(FromWorker::Pong {
                    seq,
                    // Made-up counters the test can recognise.
                    stats: held
                        .iter()
                        .map(|(id, _)| tcmu_warden_proto::DeviceStats {
                            id: *id,
                            commands: 1000 + seq,
                            ..Default::default()
                        })
                        .collect(),
                }),
                ToWorker::Shutdown => {
                    fake.log(format!("shutdown worker={worker}"));
                    if mode != "stubborn" {
                        return ExitCode::SUCCESS;
                    }
                }
                ToWorker::Hello { .. } => {
                    fake.log("second Hello".into());
                    return ExitCode::from(4);
                }
            }
        }
    }

    /// Descriptor numbers open in this process. Probed one by one (`/proc/self/fd` is out of
    /// the jail's reach), up to a bound far above anything the supervisor could leak.
    fn open_fds() -> Vec<i32> {
        // SAFETY: F_GETFD only queries the descriptor table.
        (0..4096)
            .filter(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } >= 0)
            .collect()
    }

    /// Whether `fd` is a socket.
    fn is_socket(fd: i32) -> bool {
        // SAFETY: fstat writes one stat structure into `st`, which we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let rc = unsafe { libc::fstat(fd, &mut st) };
        rc == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
    }
}
