//! # The jail: what confines each worker
//!
//! A worker runs handler code the operator may not have written, fed by SCSI commands from
//! initiators the operator does not control. It is confined in two stages (the threat model is
//! in `docs/security.md`):
//!
//! 1. **Stage one**, applied by the supervisor in the forked child before `exec` (see the
//!    supervisor's `jail` module): a new session, only the control socket and stdio kept, an
//!    empty environment, fresh namespaces, resource limits, the configured uid/gid, every
//!    capability dropped, `no_new_privs`, a landlock ruleset ([`landlock`]) and a seccomp
//!    deny-list ([`seccomp::stage_one`]). The worker executable is confined from its first
//!    instruction.
//! 2. **Stage two**, applied by the worker runtime on all its threads once it is up and before
//!    it serves a device: a seccomp allow-list ([`seccomp::stage_two`]) of what the runtime and
//!    its handlers declare they need.
//!
//! This module turns a handler's [`JailSettings`] into a [`JailSpec`], the effective jail of one
//! worker, and describes it for `tcmu-warden policy check`. It builds filters and rulesets but
//! never applies them.

pub mod landlock;
pub mod seccomp;
pub mod settings;
pub mod syscalls;

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use crate::size::format_size;
use landlock::{FsRule, Grant, LandlockReport};
use seccomp::StageOneOptions;
use settings::{JailSettings, LandlockMode, Network, SeccompMode};

/// Where shared libraries and the dynamic loader's cache live: readable (never writable or
/// executable) by every worker. Paths that do not exist are skipped.
pub const DEFAULT_LIBRARY_PATHS: &[&str] = &[
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
    "/etc/ld.so.cache",
];

/// System calls a TCP client needs beyond the runtime's (stage two).
const TCP_SYSCALLS: &[&str] = &[
    "socket",
    "connect",
    "getsockopt",
    "setsockopt",
    "getsockname",
    "getpeername",
    "shutdown",
];

/// What the supervisor tells a worker about its stage two (in its `Hello`): part of the process
/// contract, defined in the wire crate.
pub use tcmu_warden_proto::StageTwoRequest;

/// The effective jail of one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSpec {
    /// The executable the worker runs.
    pub exe: PathBuf,
    /// Its ELF interpreter (dynamic loader), if it has one.
    pub interpreter: Option<PathBuf>,
    /// The settings it came from.
    pub settings: JailSettings,
    /// Landlock's file-system rules, in order.
    pub fs_rules: Vec<FsRule>,
    /// What stage one depends on.
    pub stage_one: StageOneOptions,
    /// What the worker is told about stage two.
    pub stage_two: StageTwoRequest,
    /// With `backing = "fd"`: the backing stores' directories, which the worker is *not* granted
    /// (listed in `policy check` so nobody wonders).
    pub backing_paths: Vec<PathBuf>,
}

impl JailSpec {
    /// The jail of a worker running `exe` under `settings`. `backing_paths` are the
    /// `allow_paths` of a `backing = "fd"` handler (for the description only).
    pub fn new(exe: &Path, settings: &JailSettings, backing_paths: &[PathBuf]) -> JailSpec {
        let interpreter = elf_interpreter(exe);
        let mut fs_rules = vec![FsRule {
            path: exe.to_path_buf(),
            grant: Grant::Execute,
            required: true,
        }];
        if let Some(interp) = &interpreter {
            fs_rules.push(FsRule {
                path: interp.clone(),
                grant: Grant::Execute,
                required: true,
            });
        }
        for lib in DEFAULT_LIBRARY_PATHS {
            fs_rules.push(FsRule {
                path: PathBuf::from(lib),
                grant: Grant::ReadFiles,
                required: false,
            });
        }
        for path in &settings.read_paths {
            fs_rules.push(FsRule {
                path: path.clone(),
                grant: Grant::Read,
                required: true,
            });
        }
        for path in &settings.write_paths {
            fs_rules.push(FsRule {
                path: path.clone(),
                grant: Grant::Write,
                required: true,
            });
        }
        let mut extra = settings.syscalls.clone();
        if matches!(settings.network, Network::Tcp { .. }) {
            extra.extend(TCP_SYSCALLS.iter().map(|s| (*s).to_owned()));
        }
        if settings.io_uring {
            extra.extend(seccomp::IO_URING.iter().map(|s| (*s).to_owned()));
        }
        extra.sort();
        extra.dedup();
        JailSpec {
            exe: exe.to_path_buf(),
            interpreter,
            settings: settings.clone(),
            fs_rules,
            stage_one: StageOneOptions {
                network: settings.network.clone(),
                io_uring: settings.io_uring,
            },
            stage_two: StageTwoRequest {
                action: settings.seccomp_action,
                syscalls: extra,
                io_threads: settings.io_threads,
            },
            backing_paths: backing_paths.to_vec(),
        }
    }

    /// The user id the worker runs as (`None`: the supervisor's).
    pub fn uid(&self) -> Option<u32> {
        self.settings.user.as_ref().map(|u| u.id)
    }

    /// The group id the worker runs as (`None`: the supervisor's).
    pub fn gid(&self) -> Option<u32> {
        self.settings.group.as_ref().map(|g| g.id)
    }

    /// A human-readable account of the jail, for `tcmu-warden policy check`. `report` is what
    /// landlock would enforce on the running kernel.
    pub fn describe(&self, report: &LandlockReport) -> String {
        let s = &self.settings;
        let mut out = String::new();
        let _ = writeln!(out, "    exe          {}", self.exe.display());
        let who = |id: &Option<settings::Id>, what: &str| match id {
            Some(id) if id.name == id.id.to_string() => format!("{what} {}", id.id),
            Some(id) => format!("{what} {} ({})", id.id, id.name),
            None => format!("{what} of the supervisor"),
        };
        let _ = writeln!(
            out,
            "    runs as      {}, {}, no supplementary groups",
            who(&s.user, "uid"),
            who(&s.group, "gid")
        );
        let _ = writeln!(
            out,
            "    privileges   no capabilities (bounding, ambient, inheritable, permitted, \
             effective all empty), no_new_privs, new session, empty environment"
        );
        let spaces: Vec<&str> = s
            .effective_namespaces()
            .iter()
            .map(|n| n.as_str())
            .collect();
        let _ = writeln!(
            out,
            "    namespaces   {}",
            if spaces.is_empty() {
                "none".to_owned()
            } else {
                spaces.join(", ")
            }
        );
        let opt = |v: Option<u64>, f: fn(u64) -> String| v.map_or("unlimited".to_owned(), f);
        let _ = writeln!(
            out,
            "    rlimits      open_files {}, address_space {}, processes {}, core_size {}",
            s.rlimits.open_files,
            opt(s.rlimits.address_space, format_size),
            opt(s.rlimits.processes, |n| n.to_string()),
            format_size(s.rlimits.core_size),
        );
        let net = match &s.network {
            Network::None => "none (socket(2) denied)".to_owned(),
            Network::Tcp { connect_ports } => format!(
                "TCP connect to ports {}",
                connect_ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let _ = writeln!(out, "    network      {net}");
        let _ = writeln!(
            out,
            "    io_uring     {}",
            if s.io_uring { "allowed" } else { "denied" }
        );
        let _ = writeln!(
            out,
            "    landlock     {} (this kernel: {})",
            s.landlock.as_str(),
            report.summary()
        );
        if s.landlock == LandlockMode::Required && !report.missing_needed.is_empty() {
            let _ = writeln!(
                out,
                "                 WORKERS WILL NOT START on this kernel: landlock = \"required\""
            );
        }
        for rule in &self.fs_rules {
            let note = if !rule.required && !rule.path.exists() {
                " (absent, skipped)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "      {:<24} {}{note}",
                rule.grant.as_str(),
                rule.path.display()
            );
        }
        let _ = writeln!(out, "      {:<24} every other path", "nothing");
        for path in &self.backing_paths {
            let _ = writeln!(
                out,
                "      {:<24} {} (backing stores arrive as open descriptors)",
                "nothing",
                path.display()
            );
        }
        let action = match s.seccomp_action {
            SeccompMode::Kill => "kill the worker (SIGSYS)",
            SeccompMode::Log => {
                "stage two: log and fail with ENOSYS -- DEBUGGING AID, NOT FOR PRODUCTION; \
                 stage one: kill"
            }
        };
        let _ = writeln!(out, "    seccomp      on a violation: {action}");
        let _ = writeln!(
            out,
            "      stage one denies: {}",
            seccomp::stage_one_names(&self.stage_one).join(", ")
        );
        let _ = writeln!(
            out,
            "      stage two allows: {}, plus what the worker's handlers declare",
            seccomp::stage_two_names(&self.stage_two.syscalls).join(", ")
        );
        out
    }
}

/// The `PT_INTERP` path of a 64-bit little-endian ELF executable (the dynamic loader the kernel
/// maps along with it), or `None` for anything else (a static executable, a script, unreadable).
pub fn elf_interpreter(exe: &Path) -> Option<PathBuf> {
    const PT_INTERP: u32 = 3;
    let mut file = std::fs::File::open(exe).ok()?;
    let mut head = [0u8; 64];
    file.read_exact(&mut head).ok()?;
    // Magic, 64-bit class, little-endian.
    if head.get(..4)? != b"\x7fELF" || *head.get(4)? != 2 || *head.get(5)? != 1 {
        return None;
    }
    let u16_at = |b: &[u8], o: usize| -> Option<u16> {
        Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
    };
    let u32_at = |b: &[u8], o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
    };
    let u64_at = |b: &[u8], o: usize| -> Option<u64> {
        Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
    };
    let phoff = u64_at(&head, 32)?;
    let phentsize = usize::from(u16_at(&head, 54)?);
    let phnum = usize::from(u16_at(&head, 56)?);
    if phentsize < 56 || phnum > 256 {
        return None;
    }
    let mut table = vec![0u8; phentsize.checked_mul(phnum)?];
    read_at(&file, &mut table, phoff)?;
    for i in 0..phnum {
        let ph = table.get(i * phentsize..(i + 1) * phentsize)?;
        if u32_at(ph, 0)? != PT_INTERP {
            continue;
        }
        let offset = u64_at(ph, 8)?;
        let size = usize::try_from(u64_at(ph, 32)?).ok()?;
        if size == 0 || size > 4096 {
            return None;
        }
        let mut name = vec![0u8; size];
        read_at(&file, &mut name, offset)?;
        let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
        name.truncate(end);
        let path =
            PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(name));
        return path.is_absolute().then_some(path);
    }
    None
}

fn read_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> Option<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset).ok()
}

#[cfg(test)]
mod tests;
