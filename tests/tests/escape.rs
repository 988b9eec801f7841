//! The escape suite: a hostile worker (`src/bin/hostile-worker.rs`, built on the real worker
//! runtime) is started by the real supervisor, under the jail of a policy, and tries to break
//! out. Every attempt runs in a worker of its own (`isolation = "device"`), and each is a
//! separate assertion that it failed the way the policy says: an errno (landlock's `EACCES`, a
//! missing capability's `EPERM`) reported by the worker, or the worker killed by SIGSYS, with
//! the supervisor naming the system call.
//!
//! The tests print the table that `docs/security.md` records (`cargo test -p tcmu-warden-tests
//! --test escape -- --nocapture`).
//!
//! Needs: root (the supervisor's privileges), a kernel with landlock and seccomp. Without
//! root, the suite says so and skips.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::fmt::Write as _;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tcmu_warden_supervisor::config::Config;
use tcmu_warden_supervisor::daemon::{DevicePhase, Options, Supervisor, WorkerPhase};
use tcmu_warden_supervisor::discovery::fake::FakeDevice;

/// One supervisor at a time: the suite starts a few dozen workers.
static SERIAL: Mutex<()> = Mutex::new(());

const HOSTILE: &str = env!("CARGO_BIN_EXE_hostile-worker");

/// What the supervisor records for a seccomp kill whose audit record it could not find.
const UNNAMED: &str = "unknown system call";

/// Whether the supervisor can read the kernel log (where seccomp kills are named).
fn kmsg_readable() -> bool {
    fs::File::open("/dev/kmsg").is_ok()
}

/// How many SIGSYS deaths the supervisor named.
fn named_kills(results: &[(String, Outcome, u32)]) -> usize {
    results
        .iter()
        .filter(|(_, o, _)| matches!(o, Outcome::Died { violation: Some(v), .. } if v != UNNAMED))
        .count()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    sysfs: PathBuf,
    dev: PathBuf,
    data: PathBuf,
    next_uio: usize,
    /// attempt -> uio
    attempts: Vec<(String, String)>,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let f = Fixture {
            sysfs: root.join("sys"),
            dev: root.join("dev"),
            data: root.join("data"),
            root,
            _tmp: tmp,
            next_uio: 0,
            attempts: Vec::new(),
        };
        for d in [&f.sysfs, &f.dev, &f.data] {
            fs::create_dir_all(d).unwrap();
        }
        f
    }

    /// A `file` device whose backing file `data/<attempt>.img` (holding `content`) selects the
    /// hostile worker's attempt.
    fn attempt(&mut self, attempt: &str, content: &str) {
        let uio = format!("uio{}", self.next_uio);
        self.next_uio += 1;
        let backing = self.data.join(format!("{attempt}.img"));
        fs::write(&backing, content).unwrap();
        let dev_config = format!("file/{}", backing.display());
        FakeDevice::new(&uio, 1, attempt, Some(&dev_config))
            .write(&self.sysfs)
            .unwrap();
        fs::write(self.dev.join(&uio), format!("UIO:{uio}")).unwrap();
        self.attempts.push((attempt.to_owned(), uio));
    }

    /// The configuration of [`Fixture::start`]. Each attempt is judged by its worker's first
    /// death, so a dead worker is not restarted while the test watches (a restart, and after
    /// repeated crashes the quarantine's hand-over to the refusals worker, which cannot map
    /// these fake uio nodes, would replace what the test reads).
    fn config(&self, extra: &str) -> Config {
        let text = format!(
            "[daemon]\nworker_exe = {:?}\nsysfs_root = {:?}\ndev_root = {:?}\n\
             restart_backoff_initial = '1h'\nrestart_backoff_max = '1h'\n\
             [handler.file]\nallow_paths = [{:?}]\nisolation = 'device'\n{extra}",
            HOSTILE,
            self.sysfs.display().to_string(),
            self.dev.display().to_string(),
            self.data.display().to_string(),
        );
        Config::from_toml_str(&text, Path::new("escape.toml")).unwrap()
    }

    /// A supervisor over this tree running the hostile worker under `[handler.file]` with the
    /// given extra keys (the default policy when empty).
    fn start(&self, extra: &str) -> Supervisor {
        let config = self.config(extra);
        let mut opts = Options::from_config(&config).unwrap();
        opts.handshake_timeout = Duration::from_secs(60);
        opts.reply_timeout = Duration::from_secs(60);
        opts.shutdown_timeout = Duration::from_secs(30);
        let mut sup = Supervisor::new(config, opts).unwrap();
        sup.start().unwrap();
        sup
    }
}

/// How an attempt ended.
#[derive(Debug, Clone)]
enum Outcome {
    /// The worker survived and reported this (the part after `ESCAPE attempt=<name> `).
    Reported(String),
    /// The worker died.
    Died {
        status: ExitStatus,
        /// The system call the supervisor named, for a seccomp kill.
        violation: Option<String>,
    },
}

impl Outcome {
    fn describe(&self) -> String {
        match self {
            Outcome::Reported(r) => r.clone(),
            Outcome::Died { status, violation } => match status.signal() {
                Some(libc::SIGSYS) => format!(
                    "killed by SIGSYS ({})",
                    violation.as_deref().unwrap_or("syscall not named")
                ),
                Some(sig) => format!("killed by signal {sig}"),
                None => format!("exited with {:?}", status.code()),
            },
        }
    }
}

/// Turns the loop until every attempt has an outcome; returns them by attempt name.
fn run_all(sup: &mut Supervisor, f: &Fixture) -> Vec<(String, Outcome, u32)> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut done = Vec::new();
        for (attempt, uio) in &f.attempts {
            let Some(dev) = sup.device_by_uio(uio) else {
                continue;
            };
            let Some(worker) = sup.worker(&dev.worker) else {
                continue;
            };
            let outcome = match (&dev.phase, worker.phase) {
                (_, WorkerPhase::Exited) => Some(Outcome::Died {
                    status: worker.exit.unwrap(),
                    violation: worker.jail.as_ref().and_then(|j| j.violation.clone()),
                }),
                (DevicePhase::Failed(reason), _) => {
                    let marker = format!("ESCAPE attempt={attempt} ");
                    let at = reason
                        .find(&marker)
                        .unwrap_or_else(|| panic!("{attempt}: unexpected failure {reason}"));
                    Some(Outcome::Reported(reason[at + marker.len()..].to_owned()))
                }
                _ => None,
            };
            if let Some(o) = outcome {
                done.push((attempt.clone(), o, worker.pid));
            }
        }
        if done.len() == f.attempts.len() {
            return done;
        }
        assert!(
            Instant::now() < deadline,
            "attempts without an outcome after 120 s: {:?}\n{:#?}",
            f.attempts
                .iter()
                .filter(|(a, _)| !done.iter().any(|(d, _, _)| d == a))
                .collect::<Vec<_>>(),
            sup.workers()
        );
        sup.poll_once(Duration::from_millis(50)).unwrap();
    }
}

fn finish(mut sup: Supervisor) {
    sup.begin_shutdown();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sup.is_finished() {
        assert!(Instant::now() < deadline, "shutdown did not finish");
        sup.poll_once(Duration::from_millis(50)).unwrap();
    }
}

/// What an attempt must end in.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Reported as blocked with this errno.
    Errno(i32),
    /// Killed by SIGSYS, the supervisor naming this system call.
    Sigsys(&'static str),
}

fn check(results: &[(String, Outcome, u32)], expected: &[(&str, Expect)]) -> Vec<String> {
    let mut failures = Vec::new();
    for (attempt, expect) in expected {
        let Some((_, outcome, _)) = results.iter().find(|(a, _, _)| a == attempt) else {
            failures.push(format!("{attempt}: no outcome"));
            continue;
        };
        let ok = match (expect, outcome) {
            (Expect::Errno(e), Outcome::Reported(r)) => {
                r.starts_with(&format!("result=blocked errno={e} "))
            }
            // The name comes from the kernel's audit record, which the kernel rate-limits
            // (printk_ratelimit: 10 per 5 s): when it has one, it must be the right call.
            (Expect::Sigsys(name), Outcome::Died { status, violation }) => {
                status.signal() == Some(libc::SIGSYS)
                    && violation
                        .as_deref()
                        .is_some_and(|v| v.starts_with(&format!("{name} (nr ")) || v == UNNAMED)
            }
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "{attempt}: expected {expect:?}, got {}",
                outcome.describe()
            ));
        }
    }
    failures
}

/// The outcomes as a markdown table. The worker's pid finds the kernel's audit record of a
/// seccomp kill (`type=1326 ... pid=N ... syscall=NR`) when the supervisor could not name it.
fn table(title: &str, results: &[(String, Outcome, u32)]) -> String {
    let mut out = format!("\n{title}\n| attempt | outcome | worker pid |\n|---|---|---|\n");
    for (attempt, outcome, pid) in results {
        let _ = writeln!(out, "| {attempt} | {} | {pid} |", outcome.describe());
    }
    out
}

/// The escape attempts of the issue, with the default policy (no user switch: the worker runs
/// as uid 0 without any capability).
#[test]
fn default_policy_stops_every_escape() {
    if !is_root() {
        eprintln!("the escape suite needs root (the supervisor's privileges); skipping");
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();

    let mut f = Fixture::new();
    f.attempt("victim", "VICTIM DATA");
    f.attempt("idle", "");
    for name in [
        "shadow",
        "write_outside",
        "other_backing",
        "netlink",
        "ptrace",
        "signal",
        "mount",
        "userns",
        "exec",
        "setuid",
        "bpf",
        "io_uring",
        "environ",
        "rlimit",
        "rlimit_supervisor",
        "chmod",
        "fds",
        "undeclared",
        "panic",
        "abort",
    ] {
        f.attempt(name, "");
    }
    f.attempt("tcp", &format!("port={port}"));
    let mut sup = f.start("");
    let results = run_all(&mut sup, &f);
    println!(
        "{}",
        table("default policy (uid 0, no capabilities)", &results)
    );

    // While the idle worker lives: what /proc says about it.
    let idle_pid = results.iter().find(|(a, _, _)| a == "idle").unwrap().2;
    let status = fs::read_to_string(format!("/proc/{idle_pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {name} in\n{status}"))
    };
    assert_eq!(field("Seccomp"), "2");
    assert_eq!(field("NoNewPrivs"), "1");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(set), "0000000000000000", "{set}");
    }
    // Stage one's two filters and the worker's own stage two.
    assert_eq!(field("Seccomp_filters"), "3");
    let idle = sup.worker("file:user_1/idle").unwrap();
    let jail = idle.jail.unwrap();
    assert_eq!(jail.stage_two(), Some(true));
    assert!(jail.mismatches().is_empty(), "{:?}", jail.mismatches());

    let mut failures = check(
        &results,
        &[
            ("shadow", Expect::Errno(libc::EACCES)),
            ("write_outside", Expect::Errno(libc::EACCES)),
            ("other_backing", Expect::Errno(libc::EACCES)),
            ("tcp", Expect::Sigsys("socket")),
            ("netlink", Expect::Sigsys("socket")),
            ("ptrace", Expect::Sigsys("ptrace")),
            ("signal", Expect::Sigsys("kill")),
            ("mount", Expect::Sigsys("mount")),
            ("userns", Expect::Sigsys("unshare")),
            ("exec", Expect::Errno(libc::EACCES)),
            ("setuid", Expect::Sigsys("setuid")),
            ("bpf", Expect::Sigsys("bpf")),
            ("io_uring", Expect::Sigsys("io_uring_setup")),
            ("environ", Expect::Errno(libc::EACCES)),
            ("rlimit", Expect::Errno(libc::EPERM)),
            ("rlimit_supervisor", Expect::Sigsys("prlimit64")),
            ("chmod", Expect::Sigsys("chmod")),
            ("undeclared", Expect::Sigsys("sysinfo")),
        ],
    );
    assert!(!f.root.join("escaped-write").exists());

    // The descriptor table holds stdio, the channel, the device's uio node and its own backing
    // file: nothing else.
    match &results.iter().find(|(a, _, _)| a == "fds").unwrap().1 {
        Outcome::Reported(r) => {
            let list = r.split("fds=").nth(1).unwrap().split(' ').next().unwrap();
            let entries: Vec<(i32, String)> = list
                .split(',')
                .filter(|e| !e.is_empty())
                .map(|e| {
                    let (fd, kind) = e.split_once('=').unwrap();
                    (fd.parse().unwrap(), kind.to_owned())
                })
                .collect();
            let fds: Vec<i32> = entries.iter().map(|(fd, _)| *fd).collect();
            assert_eq!(fds.len(), 6, "{r}");
            assert_eq!(&fds[..4], &[0, 1, 2, 3], "{r}");
            assert_eq!(entries[3].1, "sock", "{r}");
            let ident = |p: &Path| {
                let m = fs::metadata(p).unwrap();
                format!("{}:{}", m.dev(), m.ino())
            };
            let uio = &f.attempts.iter().find(|(a, _)| a == "fds").unwrap().1;
            let expected_uio = ident(&f.dev.join(uio));
            let expected_backing = ident(&f.data.join("fds.img"));
            let rest: Vec<&str> = entries[4..].iter().map(|(_, k)| k.as_str()).collect();
            assert!(rest.contains(&expected_uio.as_str()), "{r}");
            assert!(rest.contains(&expected_backing.as_str()), "{r}");
        }
        other => failures.push(format!("fds: {}", other.describe())),
    }

    // A panic still ends as a panic (exit 101), an abort as SIGABRT: never SIGSYS.
    match &results.iter().find(|(a, _, _)| a == "panic").unwrap().1 {
        Outcome::Died { status, .. } if status.code() == Some(101) => {}
        other => failures.push(format!(
            "panic: expected exit 101, got {}",
            other.describe()
        )),
    }
    match &results.iter().find(|(a, _, _)| a == "abort").unwrap().1 {
        Outcome::Died { status, .. } if status.signal() == Some(libc::SIGABRT) => {}
        other => failures.push(format!("abort: expected SIGABRT, got {}", other.describe())),
    }
    // The victim's data is untouched.
    assert_eq!(
        fs::read_to_string(f.data.join("victim.img")).unwrap(),
        "VICTIM DATA"
    );
    drop(listener);
    finish(sup);
    assert!(
        failures.is_empty(),
        "escapes not stopped as expected:\n{}",
        failures.join("\n")
    );
}

/// `seccomp_action = "log"`: a call outside the allow-list fails with ENOSYS and the worker
/// lives on (and logs it); stage one's deny-list still kills.
#[test]
fn log_mode_reports_and_survives_but_stage_one_still_kills() {
    if !is_root() {
        eprintln!("needs root; skipping");
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut f = Fixture::new();
    f.attempt("undeclared", "");
    f.attempt("ptrace", "");
    let mut sup = f.start("seccomp_action = 'log'\n");
    let results = run_all(&mut sup, &f);
    println!("{}", table("seccomp_action = \"log\"", &results));
    let failures = check(
        &results,
        &[
            ("undeclared", Expect::Errno(libc::ENOSYS)),
            ("ptrace", Expect::Sigsys("ptrace")),
        ],
    );
    let worker = sup.worker("file:user_1/undeclared").unwrap();
    assert_eq!(worker.phase, WorkerPhase::Ready);
    finish(sup);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `network = "tcp"` with `connect_ports`: landlock (ABI 4, Linux 6.7) lets the worker reach the
/// listed port and nothing else; other socket kinds stay denied by stage one. On an older kernel
/// (Debian 12's 6.1 has ABI 2) the policy says what must happen instead: with `landlock =
/// "required"` (the default) the worker is not started at all, and with `"best-effort"` it
/// starts with the port rule unenforced (reported as `partial`), stage one still holding.
#[test]
fn tcp_policy_reaches_only_its_ports() {
    if !is_root() {
        eprintln!("needs root; skipping");
        return;
    }
    let abi = tcmu_warden_policy::jail::landlock::abi();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let allowed = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let allowed_port = allowed.local_addr().unwrap().port();
    let other_port = other.local_addr().unwrap().port();
    let extra = format!("network = 'tcp'\nconnect_ports = [{allowed_port}]\n");
    let failures = if abi >= 4 {
        tcp_ports_enforced(&extra, allowed_port, other_port)
    } else {
        tcp_ports_unenforceable(abi, &extra, other_port)
    };
    drop((allowed, other));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Landlock ABI 4 or later: an unlisted port is refused, the listed one reached.
fn tcp_ports_enforced(extra: &str, allowed_port: u16, other_port: u16) -> Vec<String> {
    // An unlisted port first (one attempt per fixture: attempts are named by their file).
    let mut f = Fixture::new();
    f.attempt("tcp", &format!("port={other_port}"));
    f.attempt("netlink", "");
    let mut sup = f.start(extra);
    let results = run_all(&mut sup, &f);
    println!("{}", table("network = \"tcp\", other port", &results));
    let mut failures = check(
        &results,
        &[
            ("tcp", Expect::Errno(libc::EACCES)),
            ("netlink", Expect::Sigsys("socket")),
        ],
    );
    finish(sup);

    // The listed port is reachable.
    let mut f2 = Fixture::new();
    f2.attempt("tcp", &format!("port={allowed_port}"));
    let mut sup = f2.start(extra);
    let results = run_all(&mut sup, &f2);
    println!("{}", table("network = \"tcp\", listed port", &results));
    match &results[0].1 {
        Outcome::Reported(r) if r.starts_with("result=ESCAPED") => {}
        other => failures.push(format!(
            "listed port: expected a connection, got {}",
            other.describe()
        )),
    }
    finish(sup);
    failures
}

/// Landlock below ABI 4: port rules cannot be enforced.
fn tcp_ports_unenforceable(abi: u32, extra: &str, other_port: u16) -> Vec<String> {
    use tcmu_warden_policy::jail::landlock::{Enforcement, Feature};
    let mut failures = Vec::new();

    // `landlock = "required"`: the supervisor refuses to start the worker, and says why.
    let mut f = Fixture::new();
    f.attempt("tcp", &format!("port={other_port}"));
    let config = f.config(extra);
    let spec = config.jail_for(Some("file"), Path::new(HOSTILE));
    let refusal = match tcmu_warden_supervisor::jail::prepare(&spec) {
        Ok(_) => {
            panic!("landlock ABI {abi}: a TCP policy was prepared under landlock = \"required\"")
        }
        Err(err) => err.to_string(),
    };
    assert!(refusal.contains("needed missing: tcp"), "{refusal}");
    let mut sup = f.start(extra);
    let uio = &f.attempts[0].1;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let dev = sup.device_by_uio(uio);
        if dev
            .as_ref()
            .is_some_and(|d| d.phase == DevicePhase::Orphaned)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the device was not left unserved: {dev:#?}\n{:#?}",
            sup.workers()
        );
        sup.poll_once(Duration::from_millis(50)).unwrap();
    }
    let workers = sup.workers();
    if !workers.is_empty() {
        failures.push(format!("required: a worker was started: {workers:#?}"));
    }
    println!(
        "\nnetwork = \"tcp\", landlock = \"required\", landlock ABI {abi}\n\
         | attempt | outcome | worker pid |\n|---|---|---|\n| tcp | worker not started: {refusal} | none |"
    );
    finish(sup);

    // `landlock = "best-effort"`: the worker starts, its jail reported partial (TCP missing);
    // the port rule is not enforced (the connection goes through), stage one still is.
    let mut f = Fixture::new();
    f.attempt("tcp", &format!("port={other_port}"));
    f.attempt("netlink", "");
    f.attempt("idle", "");
    let mut sup = f.start(&format!("{extra}landlock = 'best-effort'\n"));
    let results = run_all(&mut sup, &f);
    println!(
        "{}",
        table(
            &format!(
                "network = \"tcp\", landlock = \"best-effort\", landlock ABI {abi}, other port"
            ),
            &results
        )
    );
    failures.extend(check(&results, &[("netlink", Expect::Sigsys("socket"))]));
    match &results.iter().find(|(a, _, _)| a == "tcp").unwrap().1 {
        Outcome::Reported(r) if r.starts_with("result=ESCAPED") => {}
        other => failures.push(format!(
            "best-effort, ABI {abi}: expected the unenforced port rule to let the connection \
             through, got {}",
            other.describe()
        )),
    }
    let jail = sup.worker("file:user_1/idle").unwrap().jail.unwrap();
    assert_eq!(jail.landlock.abi, abi);
    assert_eq!(jail.landlock.enforcement(), Enforcement::Partial);
    assert_eq!(jail.landlock.missing_needed, vec![Feature::Tcp]);
    assert_eq!(jail.stage_two(), Some(true));
    assert!(jail.mismatches().is_empty(), "{:?}", jail.mismatches());
    finish(sup);
    failures
}

/// With `user`/`group` set, the worker runs as that user, still without capabilities.
#[test]
fn user_switch_runs_the_worker_as_nobody() {
    if !is_root() {
        eprintln!("needs root; skipping");
        return;
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        eprintln!("no user nobody; skipping");
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut f = Fixture::new();
    f.attempt("idle", "");
    f.attempt("shadow", "");
    f.attempt("setuid", "");
    let mut sup = f.start("user = 'nobody'\n");
    let results = run_all(&mut sup, &f);
    println!("{}", table("user = \"nobody\"", &results));
    let failures = check(
        &results,
        &[
            ("shadow", Expect::Errno(libc::EACCES)),
            ("setuid", Expect::Sigsys("setuid")),
        ],
    );
    let idle = sup.worker("file:user_1/idle").unwrap();
    let jail = idle.jail.clone().unwrap();
    let seen = jail.observed.clone().unwrap();
    let uid = nobody.uid.as_raw();
    assert_eq!(seen.uid, [uid; 4]);
    assert_eq!(seen.gid, [nobody.gid.as_raw(); 4]);
    assert!(seen.caps_empty(), "{}", seen.caps_summary());
    assert_eq!(jail.stage_two(), Some(true));
    finish(sup);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Whether an audit daemon runs (it takes the audit records off the kernel log).
fn auditd_running() -> bool {
    fs::read_dir("/proc").is_ok_and(|dir| {
        dir.filter_map(Result::ok)
            .any(|e| fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "auditd"))
    })
}

/// The supervisor names the system call of a seccomp kill from the kernel's audit record. The
/// kernel rate-limits those records (10 per 5 s, shared with every other seccomp kill on the
/// machine), so a kill right after a burst of others may go unnamed: the test repeats a single
/// kill until one is named (generous deadline), and then the name must be right.
#[test]
fn seccomp_kills_are_named_from_the_kernel_log() {
    if !is_root() || !kmsg_readable() || auditd_running() {
        eprintln!("needs root, a readable /dev/kmsg and no auditd; skipping");
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut f = Fixture::new();
        f.attempt("ptrace", "");
        let mut sup = f.start("");
        let results = run_all(&mut sup, &f);
        finish(sup);
        assert_eq!(
            check(&results, &[("ptrace", Expect::Sigsys("ptrace"))]),
            Vec::<String>::new()
        );
        if named_kills(&results) == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no seccomp kill was named within 90 s: {:?}",
            results
        );
        // Pace the retries (each one is a kill the rate limit counts).
        std::thread::sleep(Duration::from_millis(500));
    }
}
