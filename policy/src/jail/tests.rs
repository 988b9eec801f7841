//! Tests of the jail schema and of every filter and ruleset in a real (forked) process.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::landlock::{Enforcement, Feature, LandlockReport};
use super::seccomp::{self, PID_PLACEHOLDER, StageOneOptions};
use super::settings::Network;
use super::*;

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
