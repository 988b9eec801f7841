//! # The jail keys of the configuration, validated
//!
//! [`JailSettings`] is what the `[jail]` section (defaults for every worker) and each
//! `[handler.<subtype>]` section (overrides for that subtype's workers) say about confinement:
//! who the worker runs as, which paths it may touch, whether it may use the network, extra
//! system calls, resource limits, namespaces, and how strict landlock and seccomp are. The
//! configuration parser ([`crate::config`]) builds it; [`crate::jail::JailSpec`] turns it into
//! the effective jail of one worker.
//!
//! This module owns the types and their defaults; it never touches the kernel.

use std::fmt;
use std::path::PathBuf;

/// What happens when a worker's requested landlock restrictions cannot all be enforced by the
/// running kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LandlockMode {
    /// The worker is not started unless every landlock feature its policy needs is enforced
    /// (the default).
    #[default]
    Required,
    /// The worker starts with whatever the kernel enforces, and the gap is reported.
    BestEffort,
}

impl LandlockMode {
    /// The configuration-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LandlockMode::Required => "required",
            LandlockMode::BestEffort => "best-effort",
        }
    }

    /// Parses the configuration-file spelling.
    pub fn from_name(name: &str) -> Option<LandlockMode> {
        match name {
            "required" => Some(LandlockMode::Required),
            "best-effort" => Some(LandlockMode::BestEffort),
            _ => None,
        }
    }
}

/// What the seccomp filters do with a system call they forbid: defined by the process contract
/// (it travels to the worker in its stage-two request), configured here.
pub use tcmu_warden_proto::SeccompMode;

/// Network access of a worker.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Network {
    /// No sockets at all (the default): `socket(2)` is on the stage-one deny-list.
    #[default]
    None,
    /// TCP client connections to these ports only (landlock ABI 4, Linux 6.7, restricts the
    /// ports; on older kernels only `landlock = "best-effort"` starts such a worker, and then
    /// any port is reachable).
    Tcp {
        /// Ports the worker may connect to.
        connect_ports: Vec<u16>,
    },
}

/// A namespace the worker gets a fresh, empty copy of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Namespace {
    /// System V IPC and POSIX message queues.
    Ipc,
    /// The network stack: a new one has only a down loopback interface.
    Net,
    /// Host and domain name.
    Uts,
    /// The mount table (a private copy; nothing is unmounted).
    Mount,
    /// The cgroup root view.
    Cgroup,
}

impl Namespace {
    /// Every namespace a policy may name.
    pub const ALL: [Namespace; 5] = [
        Namespace::Ipc,
        Namespace::Net,
        Namespace::Uts,
        Namespace::Mount,
        Namespace::Cgroup,
    ];

    /// The configuration-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Namespace::Ipc => "ipc",
            Namespace::Net => "net",
            Namespace::Uts => "uts",
            Namespace::Mount => "mount",
            Namespace::Cgroup => "cgroup",
        }
    }

    /// Parses the configuration-file spelling.
    pub fn from_name(name: &str) -> Option<Namespace> {
        Namespace::ALL.into_iter().find(|n| n.as_str() == name)
    }

    /// The `CLONE_NEW*` flag that `unshare(2)` takes for it.
    pub fn clone_flag(self) -> libc::c_int {
        match self {
            Namespace::Ipc => libc::CLONE_NEWIPC,
            Namespace::Net => libc::CLONE_NEWNET,
            Namespace::Uts => libc::CLONE_NEWUTS,
            Namespace::Mount => libc::CLONE_NEWNS,
            Namespace::Cgroup => libc::CLONE_NEWCGROUP,
        }
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Resource limits of a worker (soft and hard limit alike, so it cannot raise them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimits {
    /// `RLIMIT_NOFILE`: open descriptors (default 4096).
    pub open_files: u64,
    /// `RLIMIT_AS`: bytes of address space (default: unlimited). A `ram` worker needs room for
    /// every device it holds.
    pub address_space: Option<u64>,
    /// `RLIMIT_NPROC`: processes and threads of the worker's *user*, counted across every
    /// process of that user (default: unlimited; the kernel never applies it to uid 0).
    pub processes: Option<u64>,
    /// `RLIMIT_CORE`: largest core dump in bytes (default 0: a worker's memory holds device
    /// data, so it is not dumped).
    pub core_size: u64,
}

impl Default for Rlimits {
    fn default() -> Self {
        Rlimits {
            open_files: 4096,
            address_space: None,
            processes: None,
            core_size: 0,
        }
    }
}

/// A user or group, as written and as resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Id {
    /// As written in the configuration (a name, or a number).
    pub name: String,
    /// The numeric id.
    pub id: u32,
}

/// The confinement of a worker, as configured. See the crate documentation for each key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSettings {
    /// The user to run as (`None`: the supervisor's own, normally root; root without any
    /// capability still owns root's files, so landlock is what keeps it off them).
    pub user: Option<Id>,
    /// The group to run as (`None`: the user's primary group, or the supervisor's).
    pub group: Option<Id>,
    /// Paths (and everything beneath) the worker may read.
    pub read_paths: Vec<PathBuf>,
    /// Paths (and everything beneath) the worker may read, write, create and remove (never
    /// execute).
    pub write_paths: Vec<PathBuf>,
    /// Network access.
    pub network: Network,
    /// Extra system calls for the stage-two allow-list (by name).
    pub syscalls: Vec<String>,
    /// Resource limits.
    pub rlimits: Rlimits,
    /// Namespaces to unshare; `None` means the default for the network setting
    /// ([`JailSettings::effective_namespaces`]).
    pub namespaces: Option<Vec<Namespace>>,
    /// Landlock strictness.
    pub landlock: LandlockMode,
    /// Seccomp's answer to a violation.
    pub seccomp_action: SeccompMode,
    /// Whether the worker may create io_uring instances. io_uring operations are not seen by
    /// seccomp (landlock still checks the files it opens), so this is off by default and a
    /// handler that turns it on should restrict its rings (`IORING_REGISTER_RESTRICTIONS`).
    pub io_uring: bool,
    /// Threads of the worker's shared I/O pool, which runs the commands that may block
    /// (`None`: the worker's default, 4). The worker's thread count is this plus one (its
    /// event loop), whatever the number of devices.
    pub io_threads: Option<u16>,
}

impl Default for JailSettings {
    fn default() -> Self {
        JailSettings {
            user: None,
            group: None,
            read_paths: Vec::new(),
            write_paths: Vec::new(),
            network: Network::None,
            syscalls: Vec::new(),
            rlimits: Rlimits::default(),
            namespaces: None,
            landlock: LandlockMode::Required,
            seccomp_action: SeccompMode::Kill,
            io_uring: false,
            io_threads: None,
        }
    }
}

impl JailSettings {
    /// The namespaces the worker gets: the configured ones, or by default `ipc`, `uts` and
    /// (without network access) `net`.
    pub fn effective_namespaces(&self) -> Vec<Namespace> {
        match &self.namespaces {
            Some(list) => list.clone(),
            None => match self.network {
                Network::None => vec![Namespace::Ipc, Namespace::Net, Namespace::Uts],
                Network::Tcp { .. } => vec![Namespace::Ipc, Namespace::Uts],
            },
        }
    }
}

/// How a device's backing store reaches the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// The cfgstring is a path beneath `allow_paths`; the supervisor opens it and passes the open
    /// descriptor, so the worker itself is granted no access to `allow_paths` at all.
    Fd,
    /// The device has no backing store the supervisor knows of.
    None,
}

impl Backing {
    /// The configuration-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Backing::Fd => "fd",
            Backing::None => "none",
        }
    }

    /// Parses the configuration-file spelling.
    pub fn from_name(name: &str) -> Option<Backing> {
        match name {
            "fd" => Some(Backing::Fd),
            "none" => Some(Backing::None),
            _ => None,
        }
    }
}
