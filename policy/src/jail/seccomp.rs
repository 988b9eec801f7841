//! # The seccomp filters of both stages
//!
//! Seccomp lets a process hand the kernel a small BPF program that inspects every system call
//! (its number and raw arguments, never memory behind pointers) and decides: allow, fail with an
//! errno, send SIGSYS, or kill. Filters stack: once installed they cannot be removed, a later
//! filter can only be stricter, and for every call the strictest answer of all installed
//! filters wins (kill beats trap beats errno beats allow).
//!
//! - **Stage one** ([`stage_one`]) is a *deny-list* of what no handler may ever do, installed by
//!   the supervisor in the forked child before `exec`, so a worker executable is confined from
//!   its first instruction even if it never cooperates. Everything not listed is allowed (the
//!   dynamic loader, libc start-up and any runtime must work unchanged).
//! - **Stage two** ([`stage_two`]) is an *allow-list* the worker installs on all its threads
//!   once its runtime is up and before it serves a device: the calls the runtime needs, plus
//!   what its handlers declare, plus the policy's extras. Anything else kills the worker.
//!
//! Both are compiled with `seccompiler` into plain vectors of BPF instructions, so the
//! supervisor can build stage one before it forks and install it in the child with one raw
//! system call and no allocation.
//!
//! ## Process ids inside a filter
//! Signals, priorities and resource limits may only target the worker itself. A filter
//! compares against constants, and the child's pid is not known before `fork`, so stage one is
//! compiled with [`PID_PLACEHOLDER`] and [`StageOne::pid_slots`] lists the instructions the child
//! patches with its own pid (a plain store into memory it already owns) before installing.
//!
//! This module owns the lists and their compilation; it never installs a filter (the supervisor
//! and the worker do that).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::settings::{Network, SeccompMode};
use super::syscalls::number_of;

/// Stands for the worker's pid in stage one until the child patches it in. Larger than any pid
/// Linux can hand out (`PID_MAX_LIMIT` is 2^22), so no real comparison ever uses it.
pub const PID_PLACEHOLDER: u32 = 0x7fff_5eed;

/// BPF `JMP | JEQ | K`: the instruction the placeholder compares in.
const BPF_JEQ_K: u16 = 0x15;

/// Errors building a filter.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// seccompiler refused the rules (a bug here, not a policy problem).
    #[error("compiling a seccomp filter: {0}")]
    Compile(String),
    /// A system call name unknown on this architecture.
    #[error("unknown system call {0:?}")]
    Unknown(String),
}

/// System calls stage one refuses outright, whatever the arguments. Names that do not exist on
/// the build architecture are skipped.
pub const ALWAYS_DENIED: &[&str] = &[
    // Mounting and changing the root: mount tables, new-style mount API.
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    // Reaching into other processes.
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "kcmp",
    "process_madvise",
    "process_mrelease",
    "migrate_pages",
    "move_pages",
    "tkill",
    // The kernel itself: new kernels, modules, reboot, swap, clocks, names, logs.
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "syslog",
    "vhangup",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "sethostname",
    "setdomainname",
    "iopl",
    "ioperm",
    "lookup_dcookie",
    "personality",
    "uselib",
    "_sysctl",
    "nfsservctl",
    // Kernel attack surface no handler needs.
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "fanotify_init",
    "add_key",
    "request_key",
    "keyctl",
    // New namespaces (the supervisor creates the ones the policy asks for).
    "unshare",
    "setns",
    // Identity: the supervisor chose the worker's ids and capabilities for good.
    "setuid",
    "setgid",
    "setreuid",
    "setregid",
    "setresuid",
    "setresgid",
    "setfsuid",
    "setfsgid",
    "setgroups",
    "capset",
    // Opening files by handle bypasses path checks.
    "open_by_handle_at",
    "name_to_handle_at",
    // Changing metadata by path, which landlock does not check (a worker running as uid 0
    // owns root's files): modes, owners, extended attributes, times, truncation, device nodes.
    "truncate",
    "chmod",
    "fchmodat",
    "fchmodat2",
    "chown",
    "lchown",
    "fchownat",
    "setxattr",
    "lsetxattr",
    "removexattr",
    "lremovexattr",
    "utime",
    "utimes",
    "futimesat",
    "mknod",
    "mknodat",
];

/// The io_uring calls, denied unless the policy sets `io_uring = true`.
pub const IO_URING: &[&str] = &["io_uring_setup", "io_uring_enter", "io_uring_register"];

/// Calls stage one allows only with some arguments (documented at [`stage_one`]).
pub const CONDITIONAL: &[&str] = &[
    "clone",
    "kill",
    "tgkill",
    "rt_sigqueueinfo",
    "rt_tgsigqueueinfo",
    "pidfd_open",
    "prlimit64",
    "setpriority",
    "sched_setaffinity",
    "sched_setscheduler",
    "sched_setparam",
    "sched_setattr",
    "ioprio_set",
    "ioctl",
    "utimensat",
    "socket",
];

/// Whether a policy may add `name` to the stage-two allow-list: it must exist on this
/// architecture and not be refused by stage one anyway. The error says why not.
pub fn check_extra_syscall(name: &str) -> Result<(), String> {
    if number_of(name).is_none() {
        return Err(format!(
            "{name:?} is not a system call on this architecture"
        ));
    }
    if ALWAYS_DENIED.contains(&name) {
        return Err(format!(
            "{name:?} is denied to every worker (stage one) and cannot be allowed"
        ));
    }
    if IO_URING.contains(&name) {
        return Err(format!("{name:?}: set io_uring = true instead"));
    }
    if name == "socket" || name == "connect" {
        return Err(format!(
            "{name:?}: set network = \"tcp\" and connect_ports instead"
        ));
    }
    Ok(())
}

/// What stage one depends on besides the fixed lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageOneOptions {
    /// Network access: with TCP, `socket(AF_INET/AF_INET6, SOCK_STREAM)` is allowed.
    pub network: Network,
    /// Whether io_uring may be used.
    pub io_uring: bool,
}

/// The compiled stage one.
#[derive(Debug, Clone)]
pub struct StageOne {
    /// The filters, to install in order (the deny-list, then the `clone3` rule).
    pub programs: Vec<BpfProgram>,
    /// `(program, instruction)` positions holding [`PID_PLACEHOLDER`], to patch with the
    /// worker's pid before installing.
    pub pid_slots: Vec<(usize, usize)>,
}

impl StageOne {
    /// Replaces the placeholder with `pid` in every slot. Allocation-free: the child calls it
    /// between `fork` and `exec`.
    pub fn patch_pid(&mut self, pid: u32) {
        for &(p, i) in &self.pid_slots {
            if let Some(insn) = self.programs.get_mut(p).and_then(|prog| prog.get_mut(i)) {
                insn.k = pid;
            }
        }
    }
}

fn arch() -> TargetArch {
    #[cfg(target_arch = "x86_64")]
    {
        TargetArch::x86_64
    }
    #[cfg(target_arch = "aarch64")]
    {
        TargetArch::aarch64
    }
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, FilterError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(|e| FilterError::Compile(e.to_string()))
}

fn cond64(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, FilterError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| FilterError::Compile(e.to_string()))
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, FilterError> {
    SeccompRule::new(conditions).map_err(|e| FilterError::Compile(e.to_string()))
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, FilterError> {
    let filter = SeccompFilter::new(rules, mismatch, matched, arch())
        .map_err(|e| FilterError::Compile(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| FilterError::Compile(e.to_string()))
}

/// Rules matching when `arg` (a pid) is neither `pid` nor 0 ("myself" in most calls).
fn not_self_or_zero(arg: u8, pid: u32) -> Result<SeccompRule, FilterError> {
    rule(vec![
        cond(arg, SeccompCmpOp::Ne, u64::from(pid))?,
        cond(arg, SeccompCmpOp::Ne, 0)?,
    ])
}

fn not_self(arg: u8, pid: u32) -> Result<SeccompRule, FilterError> {
    rule(vec![cond(arg, SeccompCmpOp::Ne, u64::from(pid))?])
}

/// The namespace flags `clone(2)` may not carry (`CLONE_NEWTIME` shares its bit with the exit
/// signal in `clone`, so only `clone3` could set it, and `clone3` is refused).
const CLONE_NAMESPACE_FLAGS: [libc::c_int; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
];

/// `ioctl` requests refused on any descriptor: pushing input into a terminal (the worker's
/// stderr may be the operator's terminal) and the Linux console's multiplexed request.
const DENIED_IOCTLS: [u64; 2] = [libc::TIOCSTI, libc::TIOCLINUX];

fn insert(
    rules: &mut BTreeMap<i64, Vec<SeccompRule>>,
    name: &str,
    list: Vec<SeccompRule>,
) -> Result<(), FilterError> {
    if let Some(nr) = number_of(name) {
        rules.entry(nr).or_default().extend(list);
    }
    Ok(())
}

/// The conditional rules of stage one, as deny rules (a match kills). `pid` is the worker's
/// pid or [`PID_PLACEHOLDER`].
fn conditional_denials(
    opts: &StageOneOptions,
    pid: u32,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, FilterError> {
    let mut rules = BTreeMap::new();
    // clone: no namespace flags (threads and plain forks stay possible).
    let mut clone = Vec::new();
    for flag in CLONE_NAMESPACE_FLAGS {
        let bits = u64::from(flag.unsigned_abs());
        clone.push(rule(vec![cond(0, SeccompCmpOp::MaskedEq(bits), bits)?])?);
    }
    insert(&mut rules, "clone", clone)?;
    // Signals: only to itself (pid 0 is its own process group, which is itself alone after
    // setsid).
    insert(&mut rules, "kill", vec![not_self_or_zero(0, pid)?])?;
    insert(
        &mut rules,
        "rt_sigqueueinfo",
        vec![not_self_or_zero(0, pid)?],
    )?;
    insert(&mut rules, "tgkill", vec![not_self(0, pid)?])?;
    insert(&mut rules, "rt_tgsigqueueinfo", vec![not_self(0, pid)?])?;
    insert(&mut rules, "pidfd_open", vec![not_self(0, pid)?])?;
    // Limits and scheduling: only its own.
    insert(&mut rules, "prlimit64", vec![not_self_or_zero(0, pid)?])?;
    for name in [
        "sched_setaffinity",
        "sched_setscheduler",
        "sched_setparam",
        "sched_setattr",
    ] {
        insert(&mut rules, name, vec![not_self_or_zero(0, pid)?])?;
    }
    // setpriority(which, who): only PRIO_PROCESS of itself (PRIO_USER would reach every
    // process of its uid, the supervisor's too when both are root).
    insert(
        &mut rules,
        "setpriority",
        vec![
            rule(vec![cond(
                0,
                SeccompCmpOp::Ne,
                u64::from(libc::PRIO_PROCESS),
            )?])?,
            not_self_or_zero(1, pid)?,
        ],
    )?;
    // ioprio_set(which, who, prio): only IOPRIO_WHO_PROCESS (1) of itself.
    insert(
        &mut rules,
        "ioprio_set",
        vec![
            rule(vec![cond(0, SeccompCmpOp::Ne, 1)?])?,
            not_self_or_zero(1, pid)?,
        ],
    )?;
    let mut ioctl = Vec::new();
    for req in DENIED_IOCTLS {
        ioctl.push(rule(vec![cond(1, SeccompCmpOp::Eq, req)?])?);
    }
    insert(&mut rules, "ioctl", ioctl)?;
    // utimensat with a path changes times by path; with a NULL path it is futimens.
    insert(
        &mut rules,
        "utimensat",
        vec![rule(vec![cond64(1, SeccompCmpOp::Ne, 0)?])?],
    )?;
    // Sockets: none, or TCP streams when the policy grants TCP.
    match &opts.network {
        Network::None => insert(&mut rules, "socket", Vec::new())?,
        Network::Tcp { .. } => {
            let mut socket = vec![rule(vec![
                cond(0, SeccompCmpOp::Ne, libc::AF_INET.unsigned_abs().into())?,
                cond(0, SeccompCmpOp::Ne, libc::AF_INET6.unsigned_abs().into())?,
            ])?];
            // The type's low four bits: anything but SOCK_STREAM (1).
            for kind in 0..16u64 {
                if kind != libc::SOCK_STREAM.unsigned_abs().into() {
                    socket.push(rule(vec![cond(1, SeccompCmpOp::MaskedEq(0xf), kind)?])?);
                }
            }
            insert(&mut rules, "socket", socket)?;
        }
    }
    Ok(rules)
}

/// Stage one: the deny-list of the module documentation (kill on a match), then a second
/// filter making `clone3` fail with `ENOSYS`. `clone3` passes its flags in memory, where no
/// filter can look, so it is refused and the C library falls back to `clone`, whose flags stage
/// one checks.
///
/// Besides [`ALWAYS_DENIED`] (and [`IO_URING`] unless `opts.io_uring`), stage one refuses:
/// `clone` with a namespace flag; `kill`, `tgkill`, `rt_sigqueueinfo`, `rt_tgsigqueueinfo`,
/// `pidfd_open` aimed at any process but the worker; `prlimit64`, `sched_set*`, `setpriority`,
/// `ioprio_set` on any process but the worker; `ioctl(TIOCSTI)` and `ioctl(TIOCLINUX)`;
/// `utimensat` with a path; `socket` (all of it with `network = "none"`; anything but TCP
/// streams otherwise).
///
/// Every violation kills: stage one is the floor no policy mode relaxes.
pub fn stage_one(opts: &StageOneOptions) -> Result<StageOne, FilterError> {
    let mut rules = conditional_denials(opts, PID_PLACEHOLDER)?;
    for name in ALWAYS_DENIED
        .iter()
        .chain(IO_URING.iter().filter(|_| !opts.io_uring))
    {
        if let Some(nr) = number_of(name) {
            // An empty rule list matches unconditionally (and replaces any conditional one).
            rules.insert(nr, Vec::new());
        }
    }
    let deny = compile(rules, SeccompAction::Allow, SeccompAction::KillProcess)?;
    let pid_slots = deny
        .iter()
        .enumerate()
        .filter(|(_, insn)| insn.code == BPF_JEQ_K && insn.k == PID_PLACEHOLDER)
        .map(|(i, _)| (0, i))
        .collect();
    let mut clone3 = BTreeMap::new();
    insert(&mut clone3, "clone3", Vec::new())?;
    let enosys = compile(
        clone3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS.unsigned_abs()),
    )?;
    Ok(StageOne {
        programs: vec![deny, enosys],
        pid_slots,
    })
}

/// What the worker runtime itself needs: threads, memory, signals, time, the supervisor channel
/// (`recvmsg`/`sendmsg`), each device's ring (`mmap` of the passed uio descriptor, `poll`,
/// 4-byte `read`/`write`, an `eventfd` per device), and logging to stderr. Names missing on an
/// architecture are skipped.
pub const RUNTIME_SYSCALLS: &[&str] = &[
    // memory
    "brk",
    "mmap",
    "munmap",
    "mremap",
    "mprotect",
    "madvise",
    // threads and synchronisation
    "clone",
    "clone3",
    "futex",
    "set_robust_list",
    "rseq",
    "set_tid_address",
    "sched_yield",
    "sched_getaffinity",
    "exit",
    "exit_group",
    "getpid",
    "gettid",
    // signals (the panic and abort paths, stack-overflow guard)
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sigaltstack",
    "restart_syscall",
    // descriptors the worker was given or made
    "read",
    "write",
    "readv",
    "writev",
    "close",
    "fcntl",
    "fstat",
    "newfstatat",
    "statx",
    "lseek",
    "poll",
    "ppoll",
    "eventfd2",
    // the event loop over every device's ring (runtime/device.rs): epoll_create1 once per
    // engine, epoll_ctl to add and remove a device's uio descriptor, epoll_wait (epoll_pwait
    // where the C library implements epoll_wait with it, as on aarch64) to sleep until one is
    // ready
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "recvmsg",
    "sendmsg",
    "recvfrom",
    "sendto",
    // time and randomness
    "clock_gettime",
    "clock_getres",
    "clock_nanosleep",
    "nanosleep",
    "gettimeofday",
    "getrandom",
    // adding filters (only ever restricts further; stage two installs more than one)
    "seccomp",
    // identity queries (harmless, used by logging and libc)
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
];

/// `prctl` options the runtime uses: thread names, naming anonymous mappings (newer C
/// libraries name thread stacks; on kernels without it the call fails harmlessly), and
/// `PR_SET_NO_NEW_PRIVS` (a one-way restriction that `seccompiler` repeats before installing
/// each further filter).
const PRCTL_OPTIONS: [libc::c_int; 4] = [
    libc::PR_SET_NAME,
    libc::PR_GET_NAME,
    PR_SET_VMA,
    libc::PR_SET_NO_NEW_PRIVS,
];

/// `PR_SET_VMA` (Linux 5.17), not in every `libc` release.
const PR_SET_VMA: libc::c_int = 0x5356_4d41;

/// Calls that open a file by path. A worker whose handlers do not declare them gets `EACCES`
/// from stage two instead of being killed: the C library probes files on its own (glibc reads
/// `/sys/devices/system/cpu/online` when a new thread first allocates), and landlock would
/// refuse those paths anyway, so failing the call like landlock does keeps such probes harmless.
pub const OPEN_CALLS: &[&str] = &["open", "openat", "openat2", "creat"];

/// Stage two: the allow-list. `extra` are names to allow unconditionally besides
/// [`RUNTIME_SYSCALLS`] (the handlers' declarations and the policy's additions); `pid` is the
/// worker's own pid, the only target `kill`, `tgkill` and `rt_sigqueueinfo` may name. A call
/// outside the list kills the process ([`SeccompMode::Kill`]) or raises SIGSYS
/// ([`SeccompMode::Log`], for the worker's handler to report; the call fails with `ENOSYS`).
///
/// `clone3` is on the list because stage one already makes it fail with `ENOSYS` (the strictest
/// answer wins), so that thread creation falls back to `clone`.
///
/// Unknown names in `extra` are an error (the caller decides whether to skip them).
///
/// Returns the filters to install, in order: the allow-list, then (unless `extra` names one of
/// [`OPEN_CALLS`]) a filter making the path-opening calls fail with `EACCES`.
pub fn stage_two(
    extra: &[&str],
    pid: u32,
    mode: SeccompMode,
) -> Result<Vec<BpfProgram>, FilterError> {
    let opens_declared = extra.iter().any(|n| OPEN_CALLS.contains(n));
    let mut allowed: Vec<&str> = extra.to_vec();
    if !opens_declared {
        allowed.extend(OPEN_CALLS);
    }
    let mut programs = vec![allow_list(&allowed, pid, mode)?];
    if !opens_declared {
        let mut opens = BTreeMap::new();
        for name in OPEN_CALLS {
            insert(&mut opens, name, Vec::new())?;
        }
        programs.push(compile(
            opens,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES.unsigned_abs()),
        )?);
    }
    Ok(programs)
}

fn allow_list(extra: &[&str], pid: u32, mode: SeccompMode) -> Result<BpfProgram, FilterError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for name in RUNTIME_SYSCALLS {
        if let Some(nr) = number_of(name) {
            rules.insert(nr, Vec::new());
        }
    }
    let self_only = |arg: u8| -> Result<SeccompRule, FilterError> {
        rule(vec![cond(arg, SeccompCmpOp::Eq, u64::from(pid))?])
    };
    insert(&mut rules, "tgkill", vec![self_only(0)?])?;
    insert(&mut rules, "kill", vec![self_only(0)?])?;
    insert(&mut rules, "rt_sigqueueinfo", vec![self_only(0)?])?;
    let mut prctl = Vec::new();
    for option in PRCTL_OPTIONS {
        prctl.push(rule(vec![cond(
            0,
            SeccompCmpOp::Eq,
            u64::from(option.unsigned_abs()),
        )?])?);
    }
    insert(&mut rules, "prctl", prctl)?;
    for name in extra {
        let Some(nr) = number_of(name) else {
            if OPEN_CALLS.contains(name) {
                // Not every architecture has every one of them (aarch64 lacks `open`).
                continue;
            }
            return Err(FilterError::Unknown((*name).to_owned()));
        };
        // A declared name is allowed whatever its arguments (stage one still applies).
        rules.insert(nr, Vec::new());
    }
    let mismatch = match mode {
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Trap,
    };
    compile(rules, mismatch, SeccompAction::Allow)
}

/// The names stage two allows with the given extras, sorted (for `policy check`).
pub fn stage_two_names(extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = RUNTIME_SYSCALLS
        .iter()
        .filter(|n| number_of(n).is_some())
        .map(|n| (*n).to_owned())
        .chain(
            [
                "tgkill (own pid)",
                "kill (own pid)",
                "rt_sigqueueinfo (own pid)",
                "prctl (thread names)",
            ]
            .iter()
            .map(|s| (*s).to_owned()),
        )
        .chain(extra.iter().cloned())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The names stage one refuses, sorted, with the conditional ones marked (for `policy check`).
pub fn stage_one_names(opts: &StageOneOptions) -> Vec<String> {
    let mut names: Vec<String> = ALWAYS_DENIED
        .iter()
        .chain(IO_URING.iter().filter(|_| !opts.io_uring))
        .filter(|n| number_of(n).is_some())
        .map(|n| (*n).to_owned())
        .collect();
    let conditional = [
        "clone (namespace flags)",
        "clone3 (ENOSYS: falls back to clone)",
        "kill/tgkill/rt_sigqueueinfo/rt_tgsigqueueinfo/pidfd_open (other processes)",
        "prlimit64/sched_set*/setpriority/ioprio_set (other processes)",
        "ioctl (TIOCSTI, TIOCLINUX)",
        "utimensat (with a path)",
    ];
    names.extend(conditional.iter().map(|s| (*s).to_owned()));
    names.push(match opts.network {
        Network::None => "socket (all)".to_owned(),
        Network::Tcp { .. } => "socket (anything but AF_INET/AF_INET6 streams)".to_owned(),
    });
    names.sort();
    names
}
