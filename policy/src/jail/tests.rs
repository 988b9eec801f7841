//! Tests of the jail schema and of every filter and ruleset in a real (forked) process.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::landlock::{Enforcement, Feature, LandlockReport};
use super::seccomp::{self, PID_PLACEHOLDER, StageOneOptions};
use super::settings::{Id, Namespace, Network, Rlimits};
use super::*;
use crate::config::{Config, ConfigError};

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str(text, Path::new("/etc/w.toml"))
}

fn error_at(text: &str) -> (usize, String) {
    match parse(text).unwrap_err() {
        ConfigError::Invalid {
            line: Some(l),
            message,
            ..
        } => (l, message),
        other => panic!("unexpected error {other:?}"),
    }
}

#[test]
fn jail_defaults_and_handler_overrides() {
    let cfg = parse(
        r#"
[jail]
user = "root"
read_paths = ["/usr/share", "/usr/share/"]
write_paths = ["/var/log/tcmu"]
rlimits = { open_files = 512, core_size = "1MiB" }
landlock = "best-effort"

[handler.file]
allow_paths = ["/srv/disks"]
isolation = "device"
user = 0
group = "0"
namespaces = ["ipc", "mount"]
rlimits = { address_space = "8GiB", processes = 64 }
seccomp_action = "log"
syscalls = ["sync_file_range", "fadvise64", "sync_file_range"]

[handler.qcow]
exe = "/usr/libexec/qcow-worker"
backing = "fd"
allow_paths = ["/srv/qcow"]
network = "tcp"
connect_ports = [3260, 3260, 4420]
io_uring = true
"#,
    )
    .unwrap();
    // [jail] holds the defaults.
    assert_eq!(
        cfg.jail.user,
        Some(Id {
            name: "root".into(),
            id: 0
        })
    );
    assert_eq!(cfg.jail.group.as_ref().map(|g| g.id), Some(0));
    assert_eq!(cfg.jail.read_paths, vec![PathBuf::from("/usr/share")]);
    assert_eq!(cfg.jail.rlimits.open_files, 512);
    assert_eq!(cfg.jail.rlimits.core_size, 1 << 20);
    assert_eq!(cfg.jail.landlock, LandlockMode::BestEffort);
    assert_eq!(cfg.jail.seccomp_action, SeccompMode::Kill);

    // A handler overrides key by key (rlimits entry by entry) and inherits the rest.
    let file = cfg.handler("file").unwrap();
    assert_eq!(file.backing, Backing::Fd);
    assert_eq!(file.isolation, crate::Isolation::Device);
    assert_eq!(file.jail.write_paths, vec![PathBuf::from("/var/log/tcmu")]);
    assert_eq!(file.jail.landlock, LandlockMode::BestEffort);
    assert_eq!(file.jail.seccomp_action, SeccompMode::Log);
    assert_eq!(
        file.jail.rlimits,
        Rlimits {
            open_files: 512,
            address_space: Some(8 << 30),
            processes: Some(64),
            core_size: 1 << 20,
        }
    );
    assert_eq!(
        file.jail.effective_namespaces(),
        vec![Namespace::Ipc, Namespace::Mount]
    );
    assert_eq!(file.jail.syscalls, vec!["sync_file_range", "fadvise64"]);

    // A third-party subtype with its own executable, backing descriptors and TCP.
    let qcow = cfg.handler("qcow").unwrap();
    assert_eq!(
        qcow.exe.as_deref(),
        Some(Path::new("/usr/libexec/qcow-worker"))
    );
    assert_eq!(qcow.allow_paths, vec![PathBuf::from("/srv/qcow")]);
    assert_eq!(
        qcow.jail.network,
        Network::Tcp {
            connect_ports: vec![3260, 4420]
        }
    );
    assert!(qcow.jail.io_uring);
    // Without "net": a TCP worker keeps the host's network.
    assert_eq!(
        qcow.jail.effective_namespaces(),
        vec![Namespace::Ipc, Namespace::Uts]
    );
    assert_eq!(cfg.served_subtypes(), vec!["file", "qcow"]);
    assert!(cfg.serves("qcow"));

    // No section at all: every default.
    let cfg = parse("[handler.ram]\n").unwrap();
    let ram = cfg.handler("ram").unwrap();
    assert_eq!(ram.backing, Backing::None);
    assert_eq!(ram.jail, JailSettings::default());
    assert_eq!(
        ram.jail.effective_namespaces(),
        vec![Namespace::Ipc, Namespace::Net, Namespace::Uts]
    );
    assert_eq!(ram.jail.rlimits.open_files, 4096);
    assert_eq!(ram.jail.landlock, LandlockMode::Required);
}

#[test]
fn jail_errors_name_key_and_line() {
    let cases: &[(&str, usize, &str)] = &[
        ("[jail]\nuser = 'no-such-user-here'\n", 2, "no such user"),
        ("[jail]\ngroup = 'no-such-group-here'\n", 2, "no such group"),
        ("[jail]\nuser = -1\n", 2, "not an id"),
        (
            "[jail]\nsyscalls = ['read',\n 'mount']\n",
            3,
            "denied to every worker",
        ),
        (
            "[jail]\nsyscalls = ['frobnicate']\n",
            2,
            "not a system call",
        ),
        ("[jail]\nsyscalls = ['socket']\n", 2, "network"),
        (
            "[jail]\nsyscalls = ['io_uring_setup']\n",
            2,
            "io_uring = true",
        ),
        (
            "[jail]\nconnect_ports = [80]\n",
            2,
            "needs network = \"tcp\"",
        ),
        ("[jail]\nnetwork = 'tcp'\n", 2, "needs connect_ports"),
        (
            "[jail]\nnetwork = 'tcp'\nconnect_ports = [0]\n",
            3,
            "not a TCP port",
        ),
        ("[jail]\nnetwork = 'udp'\n", 2, "\"udp\""),
        (
            "[jail]\nnetwork = 'tcp'\nconnect_ports = [80]\nnamespaces = ['net']\n",
            4,
            "new \"net\" namespace",
        ),
        ("[jail]\nnamespaces = ['pid']\n", 2, "\"pid\" is not one of"),
        ("[jail]\nlandlock = 'maybe'\n", 2, "\"maybe\""),
        ("[jail]\nseccomp_action = 'trap'\n", 2, "\"trap\""),
        ("[jail]\nrlimits = { open_files = 3 }\n", 2, "minimum of 16"),
        (
            "[jail]\nrlimits = { address_space = '1MiB' }\n",
            2,
            "too small",
        ),
        (
            "[jail]\nrlimits = { nofile = 3 }\n",
            2,
            "unknown field `nofile`",
        ),
        ("[jail]\nread_paths = ['etc']\n", 2, "jail.read_paths"),
        (
            "[jail]\nexe = '/bin/w'\n",
            2,
            "belongs in a [handler.<subtype>]",
        ),
        ("[jail]\nallow_paths = ['/a']\n", 2, "belongs in a [handler"),
        ("\n[handler.qcow]\nisolation = 'device'\n", 2, "needs exe"),
        (
            "[handler.file]\nallow_paths = ['/a']\nbacking = 'none'\n",
            3,
            "needs backing = \"fd\"",
        ),
        (
            "[handler.ram]\nbacking = 'fd'\n",
            2,
            "needs backing = \"none\"",
        ),
        (
            "[handler.x]\nexe = '/w'\nallow_paths = ['/a']\n",
            3,
            "only applies with backing = \"fd\"",
        ),
        (
            "[handler.x]\nexe = '/w'\nbacking = 'fd'\n",
            1,
            "needs allow_paths",
        ),
        (
            "[handler.file]\nallow_paths = ['/a']\nmax_size = '1GiB'\n",
            3,
            "only [handler.ram]",
        ),
        ("[handler.'a b']\nexe = '/w'\n", 1, "not a subtype name"),
        (
            "[handler.file]\nallow_paths = ['/a']\nuser = 'no-such-user-here'\n",
            3,
            "handler.file.user",
        ),
    ];
    for (text, line, needle) in cases {
        let (got_line, msg) = error_at(text);
        assert!(msg.contains(needle), "{text:?}: {msg}");
        assert_eq!(got_line, *line, "{text:?}: {msg}");
    }
}

#[test]
fn third_party_backing_is_admitted_by_its_own_allow_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().canonicalize().unwrap();
    std::fs::write(dir.join("a.qcow2"), b"x").unwrap();
    let text = format!(
        "[handler.qcow]\nexe = '/w'\nbacking = 'fd'\nallow_paths = [{:?}]\n",
        dir.display().to_string()
    );
    let cfg = parse(&text).unwrap();
    let cfgstring = dir.join("a.qcow2").display().to_string();
    let admitted = cfg.admit(Some("qcow"), &cfgstring, 1 << 20).unwrap();
    assert!(admitted.into_backing().is_some());
    let err = cfg.admit(Some("qcow"), "/etc/passwd", 1 << 20).unwrap_err();
    assert_eq!(err.rule(), "handler.qcow.allow_paths");
    // `file` is not served: its section is absent.
    let err = cfg.admit(Some("file"), &cfgstring, 1 << 20).unwrap_err();
    assert_eq!(err.rule(), "handler.file");
}

#[test]
fn stage_two_request_round_trips() {
    let req = StageTwoRequest {
        action: SeccompMode::Log,
        syscalls: vec!["fsync".into(), "sync_file_range".into()],
    };
    assert_eq!(req.to_env(), "seccomp=log;syscalls=fsync,sync_file_range");
    assert_eq!(StageTwoRequest::from_env(&req.to_env()).unwrap(), req);
    let bare = StageTwoRequest::from_env("seccomp=kill;syscalls=").unwrap();
    assert_eq!(bare.action, SeccompMode::Kill);
    assert!(bare.syscalls.is_empty());
    assert!(StageTwoRequest::from_env("syscalls=a").is_err());
    assert!(StageTwoRequest::from_env("seccomp=kill;frob=1").is_err());
    assert!(StageTwoRequest::from_env("seccomp=maybe").is_err());
}

#[test]
fn spec_grants_exe_loader_libraries_and_configured_paths_only() {
    let exe = std::env::current_exe().unwrap();
    let settings = JailSettings {
        read_paths: vec![PathBuf::from("/usr/share")],
        write_paths: vec![PathBuf::from("/var/tmp")],
        syscalls: vec!["fsync".into()],
        network: Network::Tcp {
            connect_ports: vec![3260],
        },
        ..JailSettings::default()
    };
    let spec = JailSpec::new(&exe, &settings, &[PathBuf::from("/srv/disks")]);
    let interp = spec.interpreter.clone().expect("test binaries are dynamic");
    assert!(interp.exists(), "{}", interp.display());
    let grants: Vec<(PathBuf, landlock::Grant)> = spec
        .fs_rules
        .iter()
        .map(|r| (r.path.clone(), r.grant))
        .collect();
    assert!(grants.contains(&(exe.clone(), landlock::Grant::Execute)));
    assert!(grants.contains(&(interp, landlock::Grant::Execute)));
    assert!(grants.contains(&(PathBuf::from("/usr/share"), landlock::Grant::Read)));
    assert!(grants.contains(&(PathBuf::from("/var/tmp"), landlock::Grant::Write)));
    assert!(grants.contains(&(PathBuf::from("/usr/lib"), landlock::Grant::ReadFiles)));
    // The backing-store directory is not granted: descriptors arrive instead.
    assert!(!grants.iter().any(|(p, _)| p == Path::new("/srv/disks")));
    assert!(spec.stage_two.syscalls.contains(&"connect".to_owned()));
    assert!(spec.stage_two.syscalls.contains(&"fsync".to_owned()));

    let text = spec.describe(&LandlockReport::for_abi(2, &settings.network));
    assert!(text.contains("TCP connect to ports 3260"), "{text}");
    assert!(text.contains("WORKERS WILL NOT START"), "{text}");
    assert!(
        text.contains("nothing                  /srv/disks"),
        "{text}"
    );
    assert!(text.contains("stage one denies:"), "{text}");
    assert!(text.contains("ptrace"), "{text}");
    assert!(text.contains("no capabilities"), "{text}");

    // Not an ELF file: no interpreter.
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), b"#!/bin/sh\n").unwrap();
    assert_eq!(elf_interpreter(tmp.path()), None);
    assert_eq!(elf_interpreter(Path::new("/nonexistent")), None);
}

#[test]
fn landlock_reports_needed_and_extra_features_per_abi() {
    let none = Network::None;
    let tcp = Network::Tcp {
        connect_ports: vec![1],
    };
    // Debian 12's 6.1: ABI 2. File-system control is all the default policy needs.
    let r = LandlockReport::for_abi(2, &none);
    assert_eq!(r.enforcement(), Enforcement::Full);
    assert_eq!(r.enforced, vec![Feature::Filesystem, Feature::Refer]);
    assert_eq!(
        r.missing_extras,
        vec![
            Feature::Truncate,
            Feature::Tcp,
            Feature::IoctlDev,
            Feature::Scopes
        ]
    );
    // ... but TCP port control needs ABI 4.
    let r = LandlockReport::for_abi(2, &tcp);
    assert_eq!(r.enforcement(), Enforcement::Partial);
    assert_eq!(r.missing_needed, vec![Feature::Tcp]);
    let r = LandlockReport::for_abi(6, &tcp);
    assert_eq!(r.enforcement(), Enforcement::Full);
    assert!(r.missing_extras.is_empty() && r.missing_needed.is_empty());
    assert_eq!(
        LandlockReport::for_abi(0, &none).enforcement(),
        Enforcement::None
    );
    assert!(
        LandlockReport::for_abi(2, &tcp)
            .summary()
            .contains("needed missing: tcp")
    );
}

#[test]
fn extra_syscall_checks() {
    assert!(seccomp::check_extra_syscall("fsync").is_ok());
    for denied in seccomp::ALWAYS_DENIED {
        if syscalls::number_of(denied).is_some() {
            assert!(seccomp::check_extra_syscall(denied).is_err(), "{denied}");
        }
    }
    assert_eq!(
        syscalls::name_of(syscalls::number_of("getpid").unwrap()),
        Some("getpid")
    );
    assert_eq!(syscalls::name_of(-1), None);
}

#[test]
fn syscall_table_names_follow_libc_constants() {
    let table = syscalls::table();
    // Names are the libc constants' without `SYS_`, sorted, each number named once.
    assert!(table.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(table.iter().all(|(name, _)| !name.starts_with("SYS_")));
    assert_eq!(syscalls::number_of("openat"), Some(libc::SYS_openat));
    assert_eq!(
        syscalls::number_of("rt_sigreturn"),
        Some(libc::SYS_rt_sigreturn)
    );
    let mut numbers: Vec<i64> = table.iter().map(|(_, nr)| *nr).collect();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(numbers.len(), table.len());
    #[cfg(target_arch = "x86_64")]
    assert_eq!(syscalls::number_of("_sysctl"), Some(libc::SYS__sysctl));
    #[cfg(target_arch = "aarch64")]
    assert_eq!(syscalls::number_of("open"), None);
}

#[test]
fn stage_one_marks_pid_slots_and_patches_them() {
    let mut one = seccomp::stage_one(&StageOneOptions {
        network: Network::None,
        io_uring: false,
    })
    .unwrap();
    assert_eq!(one.programs.len(), 2);
    // kill, rt_sigqueueinfo, tgkill, rt_tgsigqueueinfo, pidfd_open, prlimit64, four sched_*,
    // setpriority and ioprio_set each compare the pid once.
    assert_eq!(one.pid_slots.len(), 12, "{:?}", one.pid_slots);
    one.patch_pid(4242);
    let still: usize = one.programs[0]
        .iter()
        .filter(|i| i.k == PID_PLACEHOLDER)
        .count();
    assert_eq!(still, 0);
    for &(p, i) in &one.pid_slots {
        assert_eq!(one.programs[p][i].k, 4242);
    }
}

// ---- filters and rulesets in real processes ---------------------------------------------------

/// How a forked child ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Exit(i32),
    Signal(i32),
}

/// Forks; the child runs `body` (async-signal-safe calls only: the test harness is
/// multithreaded) and exits with its return value.
fn in_child(body: impl FnOnce() -> i32) -> Ended {
    // SAFETY: fork in a test; the child only runs `body`, which makes raw system calls on
    // memory prepared before the fork, and then _exit.
    // SAFETY: a raw system call with integer arguments or NULL pointers.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let code = body();
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid);
    if libc::WIFSIGNALED(status) {
        Ended::Signal(libc::WTERMSIG(status))
    } else {
        Ended::Exit(libc::WEXITSTATUS(status))
    }
}

fn install(prog: &[seccompiler::sock_filter]) -> bool {
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).unwrap(),
        filter: prog.as_ptr().cast_mut().cast(),
    };
    // SAFETY: prctl and seccomp read the filter from memory that outlives the call.
    unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
            && libc::syscall(libc::SYS_seccomp, 1, 0, &fprog as *const libc::sock_fprog) == 0
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

#[test]
fn stage_one_kills_denied_calls_and_allows_the_rest() {
    let opts = StageOneOptions {
        network: Network::None,
        io_uring: false,
    };
    let prepared = seccomp::stage_one(&opts).unwrap();
    let parent = std::process::id() as libc::pid_t;
    let run = |probe: fn(libc::pid_t) -> i32| {
        let mut one = prepared.clone();
        in_child(move || {
            // SAFETY: getpid has no preconditions.
            let me = unsafe { libc::getpid() };
            one.patch_pid(u32::try_from(me).unwrap_or(0));
            if !one.programs.iter().all(|p| install(p)) {
                return 100;
            }
            probe(parent)
        })
    };
    // SAFETY (all probes): raw system calls with integer arguments or NULL pointers.
    assert_eq!(
        // SAFETY: a raw system call with integer arguments or NULL pointers.
        run(|_| unsafe { libc::unshare(libc::CLONE_NEWUSER) }),
        Ended::Signal(libc::SIGSYS)
    );
    assert_eq!(
        // SAFETY: a raw system call with integer arguments or NULL pointers.
        run(|p| unsafe { libc::kill(p, 0) }),
        Ended::Signal(libc::SIGSYS),
        "signalling the parent"
    );
    assert_eq!(
        // SAFETY: a raw system call with integer arguments or NULL pointers.
        run(|_| unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0) }),
        Ended::Signal(libc::SIGSYS)
    );
    assert_eq!(
        // SAFETY: a raw system call with integer arguments or NULL pointers.
        run(|_| unsafe { libc::setuid(0) }),
        Ended::Signal(libc::SIGSYS)
    );
    assert_eq!(
        // SAFETY: a raw system call with integer arguments or NULL pointers.
        run(|_| unsafe { libc::syscall(libc::SYS_clone, libc::CLONE_NEWNET, 0, 0, 0, 0) as i32 }),
        Ended::Signal(libc::SIGSYS)
    );
    // clone3 fails with ENOSYS (so the C library falls back to clone).
    assert_eq!(
        run(|_| {
            // SAFETY: a raw system call with integer arguments or NULL pointers.
            let rc = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) };
            if rc < 0 && errno() == libc::ENOSYS {
                0
            } else {
                1
            }
        }),
        Ended::Exit(0)
    );
    // Signalling itself and ordinary calls still work.
    assert_eq!(
        // SAFETY: a raw system call with integer arguments or NULL pointers.
        run(|_| unsafe {
            let me = libc::getpid();
            if libc::kill(me, 0) == 0 && libc::getppid() > 0 {
                7
            } else {
                1
            }
        }),
        Ended::Exit(7)
    );
}

#[test]
fn stage_two_allows_its_list_and_kills_or_traps_the_rest() {
    // Compiled before the fork (the child must not allocate). The pid only matters to the
    // kill/tgkill rules, and no probe below signals itself.
    let kill_progs = seccomp::stage_two(&["fsync"], 4_000_000, SeccompMode::Kill).unwrap();
    assert_eq!(
        kill_progs.len(),
        2,
        "allow-list and the EACCES rule for opens"
    );
    let kill_run = |probe: fn() -> i32| {
        let progs = kill_progs.clone();
        in_child(move || {
            if progs.iter().all(|p| install(p)) {
                probe()
            } else {
                101
            }
        })
    };
    // SAFETY (all probes): raw system calls with integer arguments.
    assert_eq!(
        // SAFETY: a raw system call with integer arguments or NULL pointers.
        kill_run(|| if unsafe { libc::getpid() } > 0 { 9 } else { 1 }),
        Ended::Exit(9)
    );
    assert_eq!(
        // SAFETY: a raw system call with integer arguments or NULL pointers.
        kill_run(|| if unsafe { libc::fsync(2) } >= -1 {
            5
        } else {
            1
        }),
        Ended::Exit(5),
        "a declared extra is allowed"
    );
    assert_eq!(
        // SAFETY: a raw system call with integer arguments or NULL pointers.
        kill_run(|| unsafe { libc::getppid() }),
        Ended::Signal(libc::SIGSYS),
        "getppid is on no list"
    );
    assert_eq!(
        // SAFETY: a raw system call with integer arguments or NULL pointers.
        kill_run(|| unsafe { libc::kill(1, 0) }),
        Ended::Signal(libc::SIGSYS)
    );
    // Log mode: the call is trapped (SIGSYS delivered; here left at its default action, which
    // ends the process) rather than killed by the kernel.
    // Opening a path fails like landlock would answer, without killing.
    assert_eq!(
        kill_run(|| {
            // SAFETY: open with a static C string.
            let fd = unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
            if fd < 0 && errno() == libc::EACCES {
                4
            } else {
                1
            }
        }),
        Ended::Exit(4)
    );
    // A handler that declares openat gets it for real (landlock then decides).
    let open_progs = seccomp::stage_two(&["openat"], 4_000_000, SeccompMode::Kill).unwrap();
    assert_eq!(open_progs.len(), 1);
    let log_progs = seccomp::stage_two(&[], 4_000_000, SeccompMode::Log).unwrap();
    let trapped = in_child(move || {
        if !log_progs.iter().all(|p| install(p)) {
            return 101;
        }
        // SAFETY: a raw system call with no arguments.
        unsafe { libc::getppid() }
    });
    assert_eq!(trapped, Ended::Signal(libc::SIGSYS));
}

#[test]
fn landlock_ruleset_confines_a_real_process() {
    if landlock::abi() == 0 {
        eprintln!("landlock unavailable on this kernel; skipping");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().canonicalize().unwrap();
    std::fs::write(dir.join("ok"), b"fine").unwrap();
    let rules = vec![landlock::FsRule {
        path: dir.clone(),
        grant: landlock::Grant::Read,
        required: true,
    }];
    let prepared = landlock::prepare(&rules, &Network::None).unwrap();
    assert_eq!(prepared.report.enforcement(), Enforcement::Full);
    let fd = prepared.fd.unwrap();
    let raw = fd.as_raw_fd();
    let ok = std::ffi::CString::new(dir.join("ok").display().to_string()).unwrap();
    let made = std::ffi::CString::new(dir.join("new").display().to_string()).unwrap();
    let ended = in_child(move || {
        // SAFETY: raw system calls on a descriptor and C strings prepared before the fork.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::syscall(libc::SYS_landlock_restrict_self, raw, 0) != 0
            {
                return 100;
            }
            let allowed = libc::open(ok.as_ptr(), libc::O_RDONLY);
            let passwd = libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY);
            let passwd_errno = errno();
            let create = libc::open(made.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o600);
            let create_errno = errno();
            if allowed >= 0
                && passwd < 0
                && passwd_errno == libc::EACCES
                && create < 0
                && create_errno == libc::EACCES
            {
                0
            } else {
                1
            }
        }
    });
    assert_eq!(ended, Ended::Exit(0));
    assert!(!dir.join("new").exists());

    // A configured path that does not exist is an error, not a silent skip.
    let missing = vec![landlock::FsRule {
        path: dir.join("absent"),
        grant: landlock::Grant::Read,
        required: true,
    }];
    assert!(landlock::prepare(&missing, &Network::None).is_err());
    let optional = vec![landlock::FsRule {
        path: dir.join("absent"),
        grant: landlock::Grant::ReadFiles,
        required: false,
    }];
    let p = landlock::prepare(&optional, &Network::None).unwrap();
    assert_eq!(p.skipped, vec![dir.join("absent")]);
}
