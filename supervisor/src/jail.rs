//! # Stage one: confining a worker between `fork` and `exec`
//!
//! The supervisor is multithreaded (its logging and any library may own threads), and a forked
//! child of a multithreaded process has only the forking thread: any lock another thread held
//! at the fork (the allocator's, stdio's, a `Mutex`) stays locked forever in the child. So the
//! child may only run *async-signal-safe* code until `exec`: raw system calls on memory that
//! already exists, and nothing that allocates, locks or formats.
//!
//! Hence the split:
//! - [`prepare`], in the supervisor before the fork, does everything that allocates or can
//!   fail in interesting ways: it opens the landlock rule paths and creates the ruleset (a
//!   descriptor), compiles the seccomp filters to BPF, reads the last capability number, decides
//!   the uid/gid and rlimits, and checks that a `landlock = "required"` policy is enforceable.
//! - [`StageOne::apply`], in the child, only issues raw system calls on those precomputed values,
//!   in an order that works: namespaces, rlimits, securebits, the capability bounding set (needs
//!   `CAP_SETPCAP`, so before the uid change), supplementary groups, gid, uid, ambient
//!   capabilities, the remaining capability sets (`capset` to all-empty), the parent-death
//!   signal again (changing credentials clears it), `no_new_privs`, landlock, and seccomp last
//!   (its deny-list forbids several of the calls before it). The only "patching" it does is
//!   storing its own pid into the already-allocated filter (see the policy crate's `seccomp`
//!   module).
//!
//! After the fact, [`observe`] reads `/proc/<pid>/status` of the running worker so the
//! supervisor can verify, rather than assume, what is in force; [`kernel_log_violation`] finds
//! the kernel's audit record of a seccomp kill to name the offending system call.
//!
//! This module never decides policy (the policy crate's [`JailSpec`] does) and never runs in
//! the worker after `exec` (stage two is the worker's own).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tcmu_warden_policy::jail::landlock::{self as ll, Enforcement, LandlockReport};
use tcmu_warden_policy::jail::seccomp::{self, FilterError, StageOneOptions};
use tcmu_warden_policy::jail::syscalls;
use tcmu_warden_policy::{JailSpec, LandlockMode, SeccompMode};
use tcmu_warden_proto::StageTwoRequest;

/// Errors preparing a worker's stage-one jail (applied between fork and exec): the worker is not
/// started, and this says why. Not the worker's own `tcmu_warden_worker::jail::JailError`, which
/// is about installing stage two inside the worker.
#[derive(Debug, thiserror::Error)]
pub enum StageOneError {
    /// `landlock = "required"` and the kernel cannot enforce what the policy needs.
    #[error(
        "landlock = \"required\" but this kernel cannot enforce the policy ({}); set \
         landlock = \"best-effort\" to start the worker anyway",
        .0.summary()
    )]
    LandlockRequired(LandlockReport),
    /// The landlock ruleset could not be built (a configured path is missing, ...).
    #[error(transparent)]
    Landlock(#[from] ll::LandlockError),
    /// The seccomp filter could not be compiled.
    #[error(transparent)]
    Filter(#[from] FilterError),
    /// The policy asks for a user or group switch the supervisor has no privilege for.
    #[error("the policy runs the worker as uid {uid}/gid {gid}, but the supervisor lacks {cap}")]
    Privilege {
        /// The uid asked for.
        uid: u32,
        /// The gid asked for.
        gid: u32,
        /// The missing capability.
        cap: &'static str,
    },
    /// Reading this process's own state failed.
    #[error("reading the supervisor's own credentials: {0}")]
    SelfState(io::Error),
}

/// What the supervisor expects of a worker's jail and, once it said Hello, what it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailStatus {
    /// What landlock enforces on this kernel.
    pub landlock: LandlockReport,
    /// The policy's landlock mode.
    pub landlock_mode: LandlockMode,
    /// What a seccomp violation does.
    pub seccomp_action: SeccompMode,
    /// Stage-one filters installed before exec (stage two adds at least one).
    pub stage_one_filters: u32,
    /// The uid the worker runs as.
    pub uid: u32,
    /// The gid the worker runs as.
    pub gid: u32,
    /// Whether the capability sets were emptied (false only for a supervisor that had no
    /// capabilities to drop).
    pub caps_dropped: bool,
    /// What `/proc/<pid>/status` showed after the handshake.
    pub observed: Option<ProcJail>,
    /// The seccomp violation that killed the worker, if one did: the system call's name (or
    /// number) when the kernel log had it.
    pub violation: Option<String>,
    /// When the jail was prepared (just before the spawn): kernel audit records older than this
    /// belong to an earlier process that had the same pid.
    pub prepared_at: SystemTime,
}

impl JailStatus {
    /// Whether the worker installed its stage-two filter (known after the handshake).
    pub fn stage_two(&self) -> Option<bool> {
        let observed = self.observed.as_ref()?;
        Some(
            observed
                .seccomp_filters
                .is_some_and(|n| n > self.stage_one_filters),
        )
    }

    /// Differences between what was applied and what `/proc` shows, as messages; empty when the
    /// jail is in force.
    pub fn mismatches(&self) -> Vec<String> {
        let Some(o) = &self.observed else {
            return vec!["not observed yet".into()];
        };
        let mut out = Vec::new();
        if o.seccomp_mode != 2 {
            out.push(format!(
                "Seccomp: {} (expected 2, filter mode)",
                o.seccomp_mode
            ));
        }
        if o.seccomp_filters
            .is_some_and(|n| n < self.stage_one_filters)
        {
            out.push(format!(
                "Seccomp_filters: {:?} (expected at least {})",
                o.seccomp_filters, self.stage_one_filters
            ));
        }
        if !o.no_new_privs {
            out.push("NoNewPrivs: 0".into());
        }
        if self.caps_dropped && !o.caps_empty() {
            out.push(format!("capabilities left: {}", o.caps_summary()));
        }
        if o.uid != [self.uid; 4] {
            out.push(format!(
                "Uid: {:?} (expected {} everywhere)",
                o.uid, self.uid
            ));
        }
        if o.gid != [self.gid; 4] {
            out.push(format!(
                "Gid: {:?} (expected {} everywhere)",
                o.gid, self.gid
            ));
        }
        out
    }
}

impl fmt::Display for JailStatus {
    /// One line for logs and `status`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "landlock {} [{}]; seccomp {}",
            self.landlock.summary(),
            self.landlock_mode.as_str(),
            self.seccomp_action.as_str()
        )?;
        match &self.observed {
            Some(o) => write!(
                f,
                " (mode {}, {} filters, stage two {}); no_new_privs {}; capabilities {}; uid {} gid {}",
                o.seccomp_mode,
                o.seccomp_filters
                    .map_or_else(|| "?".to_owned(), |n| n.to_string()),
                if self.stage_two() == Some(true) {
                    "on"
                } else {
                    "MISSING"
                },
                u8::from(o.no_new_privs),
                o.caps_summary(),
                o.uid[1],
                o.gid[1]
            ),
            None => write!(f, "; uid {} gid {} (not yet verified)", self.uid, self.gid),
        }
    }
}

/// The jail-relevant lines of `/proc/<pid>/status`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcJail {
    /// `Seccomp:` 0 none, 1 strict, 2 filter.
    pub seccomp_mode: u32,
    /// `Seccomp_filters:` (Linux 5.9 and later).
    pub seccomp_filters: Option<u32>,
    /// `NoNewPrivs:`.
    pub no_new_privs: bool,
    /// `CapInh`, `CapPrm`, `CapEff`, `CapBnd`, `CapAmb`.
    pub caps: [u64; 5],
    /// `Uid:` real, effective, saved, filesystem.
    pub uid: [u32; 4],
    /// `Gid:` real, effective, saved, filesystem.
    pub gid: [u32; 4],
}

impl ProcJail {
    /// Parses the text of a `status` file.
    pub fn parse(text: &str) -> ProcJail {
        let mut out = ProcJail::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            let hex = || u64::from_str_radix(value, 16).unwrap_or(u64::MAX);
            let ids = || {
                let mut ids = [u32::MAX; 4];
                for (slot, v) in ids.iter_mut().zip(value.split_whitespace()) {
                    *slot = v.parse().unwrap_or(u32::MAX);
                }
                ids
            };
            match key {
                "Seccomp" => out.seccomp_mode = value.parse().unwrap_or(u32::MAX),
                "Seccomp_filters" => out.seccomp_filters = value.parse().ok(),
                "NoNewPrivs" => out.no_new_privs = value == "1",
                "CapInh" => out.caps[0] = hex(),
                "CapPrm" => out.caps[1] = hex(),
                "CapEff" => out.caps[2] = hex(),
                "CapBnd" => out.caps[3] = hex(),
                "CapAmb" => out.caps[4] = hex(),
                "Uid" => out.uid = ids(),
                "Gid" => out.gid = ids(),
                _ => {}
            }
        }
        out
    }

    /// Whether every capability set is empty.
    pub fn caps_empty(&self) -> bool {
        self.caps.iter().all(|c| *c == 0)
    }

    /// `none`, or the sets that are not empty with their capabilities' names.
    pub fn caps_summary(&self) -> String {
        if self.caps_empty() {
            return "none".into();
        }
        let names = [
            "inheritable",
            "permitted",
            "effective",
            "bounding",
            "ambient",
        ];
        let mut parts = Vec::new();
        for (set, bits) in names.iter().zip(self.caps) {
            if bits == 0 {
                continue;
            }
            let mut caps: Vec<String> = caps::all()
                .into_iter()
                .filter(|c| c.index() < 64 && bits & (1u64 << c.index()) != 0)
                .map(|c| c.to_string().to_lowercase())
                .collect();
            caps.sort();
            parts.push(format!("{set}={}", caps.join(",")));
        }
        parts.join(" ")
    }
}

/// Reads the jail-relevant state of process `pid`.
pub fn observe(pid: u32) -> io::Result<ProcJail> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(ProcJail::parse(&text))
}

/// A resource limit to set: `(resource, limit)`.
type Limit = (libc::__rlimit_resource_t, libc::rlimit64);

/// Everything the child needs, precomputed. Moved into the `pre_exec` closure; the child uses
/// it in place (no allocation), the parent drops it after the spawn (closing the landlock
/// ruleset descriptor).
pub struct StageOne {
    namespaces: libc::c_int,
    limits: Vec<Limit>,
    /// Whether this process has `CAP_SETPCAP` (bounding set, securebits).
    setpcap: bool,
    /// Whether it has `CAP_SETGID` / `CAP_SETUID`.
    setgid: bool,
    setuid: bool,
    last_cap: libc::c_ulong,
    uid: libc::uid_t,
    gid: libc::gid_t,
    landlock: Option<OwnedFd>,
    seccomp: seccomp::StageOne,
    parent: libc::pid_t,
}

impl fmt::Debug for StageOne {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StageOne")
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("namespaces", &self.namespaces)
            .field("landlock", &self.landlock.is_some())
            .finish_non_exhaustive()
    }
}

/// A prepared jail: the child's part, what the worker is told, and the supervisor's record.
#[derive(Debug)]
pub struct Prepared {
    /// To hand to [`crate::worker::WorkerProcess::spawn`].
    pub stage_one: StageOne,
    /// Stage two, for the worker's `Hello`.
    pub stage_two: StageTwoRequest,
    /// To keep with the worker.
    pub status: JailStatus,
}

const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SETPCAP: u32 = 8;

/// `SECBIT_NOROOT` and its lock (root gains no capabilities at exec), the lock on `KEEP_CAPS`
/// (left off), and `SECBIT_NO_CAP_AMBIENT_RAISE` with its lock.
const SECUREBITS: libc::c_ulong = (1 << 0) | (1 << 1) | (1 << 5) | (1 << 6) | (1 << 7);

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// This process's effective capabilities, as a 64-bit mask.
fn own_effective_caps() -> io::Result<u64> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData structures (version 3) into `data`, which has room for
    // exactly two.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from(data[0].effective) | (u64::from(data[1].effective) << 32))
}

fn last_cap() -> libc::c_ulong {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// Builds everything stage one needs for `spec`, before the fork. Fails when the worker must
/// not start (the error says why).
pub fn prepare(spec: &JailSpec) -> Result<Prepared, StageOneError> {
    let settings = &spec.settings;
    let ruleset = ll::prepare(&spec.fs_rules, &settings.network)?;
    check_required(settings.landlock, &ruleset.report)?;
    let seccomp = seccomp::stage_one(&StageOneOptions {
        network: settings.network.clone(),
        io_uring: settings.io_uring,
    })?;
    let caps = own_effective_caps().map_err(StageOneError::SelfState)?;
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    let (my_uid, my_gid, me) = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
        nix::unistd::getpid().as_raw(),
    );
    let uid = spec.uid().unwrap_or(my_uid);
    let gid = spec.gid().unwrap_or(my_gid);
    if uid != my_uid && !has(CAP_SETUID) {
        return Err(StageOneError::Privilege {
            uid,
            gid,
            cap: "CAP_SETUID",
        });
    }
    if gid != my_gid && !has(CAP_SETGID) {
        return Err(StageOneError::Privilege {
            uid,
            gid,
            cap: "CAP_SETGID",
        });
    }
    let namespaces = settings
        .effective_namespaces()
        .iter()
        .fold(0, |flags, ns| flags | ns.clone_flag());
    let limit = |v: u64| libc::rlimit64 {
        rlim_cur: v,
        rlim_max: v,
    };
    let r = &settings.rlimits;
    let mut limits: Vec<Limit> = vec![
        (libc::RLIMIT_NOFILE, limit(r.open_files)),
        (libc::RLIMIT_CORE, limit(r.core_size)),
    ];
    if let Some(v) = r.address_space {
        limits.push((libc::RLIMIT_AS, limit(v)));
    }
    if let Some(v) = r.processes {
        limits.push((libc::RLIMIT_NPROC, limit(v)));
    }
    // The child installs the channel as descriptor 3 (dup2) before applying the jail: the
    // ruleset must not sit at a number that dup2 could overwrite.
    let landlock = match ruleset.fd {
        Some(fd) => Some(above_low_numbers(fd).map_err(StageOneError::SelfState)?),
        None => None,
    };
    let stage_one_filters = u32::try_from(seccomp.programs.len()).unwrap_or(u32::MAX);
    let status = JailStatus {
        landlock: ruleset.report,
        landlock_mode: settings.landlock,
        seccomp_action: settings.seccomp_action,
        stage_one_filters,
        uid,
        gid,
        caps_dropped: caps != 0,
        observed: None,
        violation: None,
        prepared_at: SystemTime::now(),
    };
    Ok(Prepared {
        stage_one: StageOne {
            namespaces,
            limits,
            setpcap: has(CAP_SETPCAP),
            setgid: has(CAP_SETGID),
            setuid: has(CAP_SETUID),
            last_cap: last_cap(),
            uid,
            gid,
            landlock,
            seccomp,
            parent: me,
        },
        stage_two: spec.stage_two.clone(),
        status,
    })
}

/// With `landlock = "required"`, refuses a report that is not fully enforced.
pub fn check_required(mode: LandlockMode, report: &LandlockReport) -> Result<(), StageOneError> {
    if mode == LandlockMode::Required && report.enforcement() != Enforcement::Full {
        return Err(StageOneError::LandlockRequired(report.clone()));
    }
    Ok(())
}

/// Moves `fd` to a number above the ones the child rearranges (stdio and the channel), keeping
/// it close-on-exec.
fn above_low_numbers(fd: OwnedFd) -> io::Result<OwnedFd> {
    let min = tcmu_warden_proto::process::WORKER_CHANNEL_FD + 1;
    if fd.as_raw_fd() >= min {
        return Ok(fd);
    }
    let raw = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min))
        .map_err(io::Error::from)?;
    // SAFETY: F_DUPFD_CLOEXEC just returned `raw`, a new descriptor owned by nothing else.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) })
}

/// Writes a fixed message to stderr: async-signal-safe (one `write`, no formatting), so the
/// child can say which step failed before it gives up.
fn child_note(msg: &'static str) {
    // SAFETY: writing a static byte string to descriptor 2.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

/// Fails the step `what` with the current errno.
fn step(ok: bool, what: &'static str) -> io::Result<()> {
    if ok {
        Ok(())
    } else {
        // Read errno first: the note's write may change it.
        let err = io::Error::last_os_error();
        child_note(what);
        Err(err)
    }
}

impl StageOne {
    /// Applies stage one to the calling process. **Only for the forked child, before `exec`.**
    ///
    /// Async-signal-safe: raw system calls on fields computed by [`prepare`], one store of the
    /// pid into the (already allocated) seccomp program, and `io::Error` values built from an
    /// errno (which does not allocate). On failure the child writes one fixed line naming the
    /// step to stderr and the error's errno reaches the supervisor's `spawn`.
    pub fn apply(&mut self) -> io::Result<()> {
        // SAFETY: every call below is a raw system call whose pointer arguments point
        // at fields of `self` or locals that live across the call; none allocates or takes a
        // lock in this process.
        unsafe {
            if self.namespaces != 0 {
                step(
                    libc::unshare(self.namespaces) == 0,
                    "tcmu-warden: jail: unshare (namespaces) failed\n",
                )?;
            }
            for (resource, limit) in &self.limits {
                step(
                    libc::prlimit64(0, *resource, limit, std::ptr::null_mut()) == 0,
                    "tcmu-warden: jail: setting an rlimit failed\n",
                )?;
            }
            if self.setpcap {
                step(
                    libc::prctl(libc::PR_SET_SECUREBITS, SECUREBITS, 0, 0, 0) == 0,
                    "tcmu-warden: jail: PR_SET_SECUREBITS failed\n",
                )?;
                // The bounding set first: dropping from it needs CAP_SETPCAP, which the uid
                // change or the capset below would take away.
                for cap in 0..=self.last_cap {
                    let rc = libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
                    if rc != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                        return step(false, "tcmu-warden: jail: PR_CAPBSET_DROP failed\n");
                    }
                }
            }
            if self.setgid {
                step(
                    libc::setgroups(0, std::ptr::null()) == 0,
                    "tcmu-warden: jail: setgroups failed\n",
                )?;
                step(
                    libc::setresgid(self.gid, self.gid, self.gid) == 0,
                    "tcmu-warden: jail: setresgid failed\n",
                )?;
            }
            if self.setuid {
                step(
                    libc::setresuid(self.uid, self.uid, self.uid) == 0,
                    "tcmu-warden: jail: setresuid failed\n",
                )?;
            }
            step(
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL,
                    0,
                    0,
                    0,
                ) == 0,
                "tcmu-warden: jail: clearing ambient capabilities failed\n",
            )?;
            let header = CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            let empty = [CapData::default(); 2];
            step(
                libc::syscall(libc::SYS_capset, &header, empty.as_ptr()) == 0,
                "tcmu-warden: jail: capset failed\n",
            )?;
            // A credential change clears the parent-death signal: arm it again, and make sure
            // the supervisor did not die in between.
            step(
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == 0,
                "tcmu-warden: jail: PR_SET_PDEATHSIG failed\n",
            )?;
            if libc::getppid() != self.parent {
                child_note("tcmu-warden: jail: the supervisor went away\n");
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            step(
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0,
                "tcmu-warden: jail: PR_SET_NO_NEW_PRIVS failed\n",
            )?;
            if let Some(fd) = &self.landlock {
                step(
                    libc::syscall(libc::SYS_landlock_restrict_self, fd.as_raw_fd(), 0u32) == 0,
                    "tcmu-warden: jail: landlock_restrict_self failed\n",
                )?;
            }
            let me = u32::try_from(libc::getpid()).unwrap_or(u32::MAX);
            self.seccomp.patch_pid(me);
            for program in &self.seccomp.programs {
                let fprog = libc::sock_fprog {
                    len: u16::try_from(program.len()).unwrap_or(u16::MAX),
                    filter: program.as_ptr().cast_mut().cast(),
                };
                step(
                    libc::syscall(
                        libc::SYS_seccomp,
                        libc::SECCOMP_SET_MODE_FILTER,
                        0u32,
                        &fprog as *const libc::sock_fprog,
                    ) == 0,
                    "tcmu-warden: jail: installing the seccomp filter failed\n",
                )?;
            }
        }
        Ok(())
    }
}

/// Looks up the kernel's audit record of the seccomp kill of process `pid` (type 1326) in the
/// kernel log, and names its system call: `ptrace (nr 101)`, or just the number. Records
/// stamped before `since` (the worker's start) are ignored: they belong to an earlier process
/// that had the same pid.
///
/// The kernel logs seccomp kills (`kernel.seccomp.actions_logged` includes `kill_process` by
/// default) through the audit subsystem: to the kernel log when no audit daemon runs, to the
/// audit log otherwise, and rate-limited (`printk_ratelimit`: 10 lines per 5 s). Reading
/// `/dev/kmsg` needs `CAP_SYSLOG` when `dmesg_restrict` is set. So this works for a root
/// supervisor without auditd, and returns `None` otherwise; then the record is in
/// `/var/log/audit/audit.log` (`type=SECCOMP`).
///
/// Without an audit daemon the record is printed by the kernel's audit thread (`kauditd`), not
/// by the dying task, so it can reach the log a moment after the worker has been reaped: the
/// log is read again, every 20 ms, for up to `patience` (the caller's event loop waits that long
/// at most, once per seccomp kill; restarts are rate-limited by backoff and quarantine).
pub fn kernel_log_violation(pid: u32, since: SystemTime, patience: Duration) -> Option<String> {
    let end = std::time::Instant::now() + patience;
    let nr = loop {
        match seccomp_record_in_kmsg(pid, since) {
            Ok(Some(nr)) => break nr,
            // The log cannot be read at all: waiting would not help.
            Err(_) => return None,
            Ok(None) if std::time::Instant::now() >= end => return None,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    Some(match syscalls::name_of(nr) {
        Some(name) => format!("{name} (nr {nr})"),
        None => format!("system call nr {nr}"),
    })
}

/// One pass over `/dev/kmsg`: the system call number of the newest matching seccomp record,
/// `Ok(None)` if there is none yet, `Err(())` if the log cannot be opened.
fn seccomp_record_in_kmsg(pid: u32, since: SystemTime) -> Result<Option<i64>, io::Error> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut kmsg = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/kmsg")?;
    // Audit stamps are wall-clock seconds; allow for their millisecond rounding.
    let since = since
        .checked_sub(Duration::from_secs(1))
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let mut found = None;
    let mut buf = vec![0u8; 8192];
    // Each read returns one record; the kernel's buffer holds a bounded number of them.
    for _ in 0..1_000_000 {
        let n = match kmsg.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            // Records overwritten while we read: carry on with the next one.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPIPE) | Some(libc::EINTR)) => {
                continue;
            }
            Err(_) => break,
        };
        let Some(record) = buf.get(..n) else {
            break;
        };
        if let Some(nr) = parse_seccomp_record(&String::from_utf8_lossy(record), pid, since) {
            found = Some(nr);
        }
    }
    Ok(found)
}

/// The system call number of a kernel-log line that is the audit record of a seccomp action
/// on process `pid`, stamped at or after `since` (seconds since the epoch).
fn parse_seccomp_record(line: &str, pid: u32, since: u64) -> Option<i64> {
    if !line.contains("type=1326") {
        return None;
    }
    let pid_field = format!("pid={pid}");
    let mut words = line.split_whitespace();
    if !words.clone().any(|w| w == pid_field) {
        return None;
    }
    // audit(1795419172.946:22):
    let stamp = line
        .split("audit(")
        .nth(1)?
        .split('.')
        .next()?
        .parse::<u64>()
        .ok()?;
    if stamp < since {
        return None;
    }
    words
        .find_map(|w| w.strip_prefix("syscall="))
        .and_then(|nr| nr.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_status_is_parsed() {
        let text = "Name:\tw\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\n\
                    CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
                    CapEff:\t0000000000000000\nCapBnd:\t0000000000000000\n\
                    CapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\n\
                    Seccomp_filters:\t3\n";
        let p = ProcJail::parse(text);
        assert_eq!(p.seccomp_mode, 2);
        assert_eq!(p.seccomp_filters, Some(3));
        assert!(p.no_new_privs);
        assert!(p.caps_empty());
        assert_eq!(p.caps_summary(), "none");
        assert_eq!(p.uid, [1000; 4]);
        assert_eq!(p.gid, [100; 4]);

        let root = ProcJail::parse("CapEff:\t0000000000200000\nCapBnd:\t0000000000000001\n");
        assert_eq!(
            root.caps_summary(),
            "effective=cap_sys_admin bounding=cap_chown"
        );
    }

    #[test]
    fn audit_records_are_matched_by_pid_and_time() {
        let line = "5,339,2151421117,-;audit: type=1326 audit(1795417205.458:2): \
                    auid=4294967295 uid=0 gid=0 ses=4294967295 pid=20904 comm=\"w\" \
                    exe=\"/w\" sig=31 arch=c000003e syscall=101 compat=0 ip=0x7f code=0x80000000";
        assert_eq!(parse_seccomp_record(line, 20904, 1_795_417_205), Some(101));
        assert_eq!(parse_seccomp_record(line, 20904, 0), Some(101));
        // Another process, or an earlier one with the same pid.
        assert_eq!(parse_seccomp_record(line, 2090, 0), None);
        assert_eq!(parse_seccomp_record(line, 20904, 1_795_417_206), None);
        assert_eq!(
            parse_seccomp_record("audit: type=1400 pid=20904 syscall=1", 20904, 0),
            None
        );
    }

    #[test]
    fn required_landlock_refuses_what_the_kernel_cannot_enforce() {
        use tcmu_warden_policy::Network;
        let tcp = Network::Tcp {
            connect_ports: vec![3260],
        };
        // Debian 12's 6.1 (ABI 2): the default policy is fully enforced...
        let r = LandlockReport::for_abi(2, &Network::None);
        assert!(check_required(LandlockMode::Required, &r).is_ok());
        // ... a TCP policy is not, and the error says what is missing and what to do.
        let r = LandlockReport::for_abi(2, &tcp);
        let err = check_required(LandlockMode::Required, &r).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("needed missing: tcp"), "{text}");
        assert!(text.contains("best-effort"), "{text}");
        assert!(check_required(LandlockMode::BestEffort, &r).is_ok());
        // No landlock at all.
        let none = LandlockReport::for_abi(0, &Network::None);
        assert!(check_required(LandlockMode::Required, &none).is_err());
        assert!(check_required(LandlockMode::BestEffort, &none).is_ok());
        assert!(check_required(LandlockMode::Required, &LandlockReport::for_abi(6, &tcp)).is_ok());
    }

    #[test]
    fn mismatches_name_what_is_wrong() {
        let mut status = JailStatus {
            landlock: LandlockReport::for_abi(6, &tcmu_warden_policy::Network::None),
            landlock_mode: LandlockMode::Required,
            seccomp_action: SeccompMode::Kill,
            stage_one_filters: 2,
            uid: 0,
            gid: 0,
            caps_dropped: true,
            observed: None,
            violation: None,
            prepared_at: SystemTime::now(),
        };
        assert_eq!(status.stage_two(), None);
        status.observed = Some(ProcJail {
            seccomp_mode: 2,
            seccomp_filters: Some(3),
            no_new_privs: true,
            caps: [0; 5],
            uid: [0; 4],
            gid: [0; 4],
        });
        assert!(status.mismatches().is_empty());
        assert_eq!(status.stage_two(), Some(true));
        assert!(status.to_string().contains("stage two on"), "{status}");

        status.observed = Some(ProcJail {
            seccomp_mode: 0,
            seccomp_filters: Some(0),
            no_new_privs: false,
            caps: [0, 0, 1 << 21, 0, 0],
            uid: [0, 1, 0, 0],
            gid: [0; 4],
        });
        let m = status.mismatches().join("; ");
        assert!(m.contains("Seccomp: 0"), "{m}");
        assert!(m.contains("NoNewPrivs: 0"), "{m}");
        assert!(m.contains("cap_sys_admin"), "{m}");
        assert!(m.contains("Uid"), "{m}");
        assert_eq!(status.stage_two(), Some(false));
    }
}
