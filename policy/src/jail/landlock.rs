//! # The landlock ruleset of a worker
//!
//! Landlock is a Linux security module any process may use to restrict itself (and everything
//! it later executes) to a set of file hierarchies, TCP ports and, since ABI 6, signal and
//! abstract-socket *scopes*. Its features grew by kernel release (ABI 1: Linux 5.13, file
//! system; 2: 5.19, moving files between directories; 3: 6.2, truncation; 4: 6.7, TCP; 5: 6.10,
//! device ioctls; 6: 6.12, scopes), so what a worker gets depends on the kernel it runs on.
//!
//! [`prepare`] builds the ruleset of one worker *before* the supervisor forks (opening the
//! allowed paths and creating the ruleset allocate and may fail; the child must only call
//! `landlock_restrict_self` on the descriptor) and reports exactly what it will enforce:
//! - the features the policy *needs* ([`Feature::Filesystem`], and [`Feature::Tcp`] when the
//!   policy allows TCP to some ports): with `landlock = "required"`, a missing one refuses the
//!   worker;
//! - the *hardening extras* it asks for where the kernel has them (moving files across
//!   directories, truncation, device ioctls, TCP when the network is off anyway, scopes): stage
//!   one and the dropped capabilities already cover what they would stop, so they are reported,
//!   never required.
//!
//! The `landlock` crate is used in best-effort mode to downgrade the requested rights to what the
//! kernel knows; the running ABI is probed separately ([`abi`]) so the report never relies on the
//! crate's silent downgrade. Configured paths are opened here, and one that cannot be opened is
//! an error, never silently skipped.
//!
//! This module never restricts the calling process.

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath,
    PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, Scope,
};

use super::settings::Network;

/// The newest landlock ABI this crate asks features of.
pub const TARGET_ABI: u32 = 6;

/// A landlock feature a worker's ruleset uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Feature {
    /// File-system access control (ABI 1).
    Filesystem,
    /// Control of renames and links across directories (ABI 2).
    Refer,
    /// Control of truncation (ABI 3).
    Truncate,
    /// TCP connect and bind control (ABI 4).
    Tcp,
    /// Control of ioctls on device files (ABI 5).
    IoctlDev,
    /// Signal and abstract unix socket scoping (ABI 6).
    Scopes,
}

impl Feature {
    /// The ABI that introduced it.
    pub fn abi(self) -> u32 {
        match self {
            Feature::Filesystem => 1,
            Feature::Refer => 2,
            Feature::Truncate => 3,
            Feature::Tcp => 4,
            Feature::IoctlDev => 5,
            Feature::Scopes => 6,
        }
    }

    /// A short name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Feature::Filesystem => "filesystem",
            Feature::Refer => "refer",
            Feature::Truncate => "truncate",
            Feature::Tcp => "tcp",
            Feature::IoctlDev => "ioctl-dev",
            Feature::Scopes => "scopes",
        }
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (ABI {})", self.as_str(), self.abi())
    }
}

/// How completely a worker's landlock policy is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// Every needed feature is enforced.
    Full,
    /// Some needed features are not.
    Partial,
    /// Landlock is unavailable: nothing is enforced.
    None,
}

impl Enforcement {
    /// `full`, `partial` or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::Full => "full",
            Enforcement::Partial => "partial",
            Enforcement::None => "none",
        }
    }
}

impl fmt::Display for Enforcement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a prepared ruleset will enforce on this kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LandlockReport {
    /// The running kernel's landlock ABI (0: unavailable).
    pub abi: u32,
    /// Features the policy needs.
    pub needed: Vec<Feature>,
    /// Features (needed or extra) the kernel enforces.
    pub enforced: Vec<Feature>,
    /// Needed features the kernel lacks.
    pub missing_needed: Vec<Feature>,
    /// Hardening extras the kernel lacks.
    pub missing_extras: Vec<Feature>,
}

impl LandlockReport {
    /// Computes the report for a kernel at `abi` and a policy with `network`.
    pub fn for_abi(abi: u32, network: &Network) -> LandlockReport {
        let mut needed = vec![Feature::Filesystem];
        if matches!(network, Network::Tcp { .. }) {
            needed.push(Feature::Tcp);
        }
        let all = [
            Feature::Filesystem,
            Feature::Refer,
            Feature::Truncate,
            Feature::Tcp,
            Feature::IoctlDev,
            Feature::Scopes,
        ];
        let enforced = all.iter().copied().filter(|f| f.abi() <= abi).collect();
        let missing_needed = needed.iter().copied().filter(|f| f.abi() > abi).collect();
        let missing_extras = all
            .iter()
            .copied()
            .filter(|f| !needed.contains(f) && f.abi() > abi)
            .collect();
        LandlockReport {
            abi,
            needed,
            enforced,
            missing_needed,
            missing_extras,
        }
    }

    /// Full, partial or none.
    pub fn enforcement(&self) -> Enforcement {
        if self.abi == 0 {
            Enforcement::None
        } else if self.missing_needed.is_empty() {
            Enforcement::Full
        } else {
            Enforcement::Partial
        }
    }

    /// One line for logs and `status`: `ABI 6, full (extras missing: none)`.
    pub fn summary(&self) -> String {
        let list = |v: &[Feature]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(", ")
            }
        };
        format!(
            "ABI {}, {} (needed missing: {}; extras missing: {})",
            self.abi,
            self.enforcement(),
            list(&self.missing_needed),
            list(&self.missing_extras)
        )
    }
}

/// The running kernel's landlock ABI version, 0 when landlock is unavailable (not built in, or
/// not enabled at boot).
pub fn abi() -> u32 {
    // SAFETY: landlock_create_ruleset with a NULL attribute, size 0 and the VERSION flag only
    // returns the ABI version (or an error); it reads and writes no memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    u32::try_from(rc).unwrap_or(0)
}

/// What a rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Read and execute (the worker executable and its ELF interpreter).
    Execute,
    /// Read files (shared libraries and the loader's cache).
    ReadFiles,
    /// Read files and list directories (`read_paths`).
    Read,
    /// Read, write, create, remove, truncate; never execute (`write_paths`).
    Write,
}

impl Grant {
    /// For `policy check`.
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::Execute => "read+execute",
            Grant::ReadFiles => "read files",
            Grant::Read => "read",
            Grant::Write => "read+write (no execute)",
        }
    }

    fn access(self, abi: ABI) -> BitFlags<AccessFs> {
        match self {
            Grant::Execute => AccessFs::ReadFile | AccessFs::Execute,
            Grant::ReadFiles => BitFlags::from(AccessFs::ReadFile),
            Grant::Read => AccessFs::ReadFile | AccessFs::ReadDir,
            Grant::Write => AccessFs::from_all(abi) & !BitFlags::from(AccessFs::Execute),
        }
    }
}

/// One file-system rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsRule {
    /// The file or directory (a directory's rule covers everything beneath it).
    pub path: PathBuf,
    /// What it grants.
    pub grant: Grant,
    /// A configured path (an error if it cannot be opened) or a default (skipped if missing).
    pub required: bool,
}

/// Errors preparing a ruleset.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    /// A configured path could not be opened.
    #[error("landlock rule for {}: {why}", path.display())]
    Path {
        /// The path.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The kernel refused the ruleset.
    #[error("creating the landlock ruleset: {0}")]
    Ruleset(String),
}

/// A ruleset ready for `landlock_restrict_self`, and its report.
#[derive(Debug)]
pub struct PreparedRuleset {
    /// The ruleset (close-on-exec); `None` when landlock is unavailable.
    pub fd: Option<OwnedFd>,
    /// What it enforces.
    pub report: LandlockReport,
    /// The default rules that were skipped because their path does not exist.
    pub skipped: Vec<PathBuf>,
}

/// Builds the ruleset: every file-system right of [`TARGET_ABI`] handled (so anything not granted
/// by `rules` is denied), TCP connect and bind handled (allowed only to `network`'s ports), and
/// signal and abstract-socket scoping.
pub fn prepare(rules: &[FsRule], network: &Network) -> Result<PreparedRuleset, LandlockError> {
    let running = abi();
    let report = LandlockReport::for_abi(running, network);
    let target = ABI::V6;
    let err = |e: landlock::RulesetError| LandlockError::Ruleset(e.to_string());
    let ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(target))
        .map_err(err)?
        .handle_access(AccessNet::from_all(target))
        .map_err(err)?
        .scope(Scope::from_all(target))
        .map_err(err)?;
    let mut created = ruleset.create().map_err(err)?;
    let mut skipped = Vec::new();
    for rule in rules {
        let fd = match PathFd::new(&rule.path) {
            Ok(fd) => fd,
            Err(e) if !rule.required => {
                let _ = e;
                skipped.push(rule.path.clone());
                continue;
            }
            Err(e) => {
                return Err(LandlockError::Path {
                    path: rule.path.clone(),
                    why: e.to_string(),
                });
            }
        };
        let mut access = rule.grant.access(target);
        if !rule.path.is_dir() {
            // Directory rights on a file are an error for the kernel.
            access &= AccessFs::from_file(target);
        }
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(err)?;
    }
    if let Network::Tcp { connect_ports } = network {
        for port in connect_ports {
            created = created
                .add_rule(NetPort::new(*port, AccessNet::ConnectTcp))
                .map_err(err)?;
        }
    }
    let fd: Option<OwnedFd> = created.into();
    Ok(PreparedRuleset {
        fd,
        report,
        skipped,
    })
}
