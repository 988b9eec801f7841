//! # LIO's knobs: the one writer of `target_core_user`'s parameters and a backstore's actions
//!
//! Every kernel file the daemon writes goes through this module (paths are built under the
//! configured `sysfs_root`, where configfs is `kernel/config/target`, so tests use a fake tree),
//! opened the same way (`O_WRONLY | O_TRUNC | O_NOFOLLOW | O_CLOEXEC`, never created) and written
//! in one `write` (configfs and sysfs attributes take one write each):
//!
//! - `module/target_core_user/parameters/block_netlink` and `reset_netlink`
//!   ([`ModuleParam`]): with `block_netlink=1` the kernel refuses new netlink requests (the
//!   configfs write fails with `EAGAIN` instead of waiting for a daemon); `reset_netlink=1`
//!   fails every request still waiting for an answer, e.g. one a previous daemon never
//!   answered. The daemon blocks and resets at start-up, unblocks once it listens, and blocks
//!   again when it stops, so a configfs writer never waits forever on a daemon that is not
//!   there. Older kernels lack the parameters: [`set_module_param`] logs that and carries on.
//! - `<configfs>/core/user_<hba>/<name>/action/block_dev` ([`block_dev`]): `1` stops the kernel
//!   from queueing new commands into the ring (initiators get BUSY and retry; commands already
//!   in the ring stay, and completions are still reaped); `0` resumes.
//! - `.../action/reset_ring` ([`reset_ring`]): `1` completes every command in the ring with
//!   BUSY (retryable) and rewinds `cmd_head` and `cmd_tail` to 0. Recent kernels refuse it
//!   unless the device is blocked.
//!
//! This module only writes files; it never decides when, never reads the ring, and keeps no
//! state: whether a device is blocked is a fact of the device table
//! ([`crate::daemon`]), which is the only caller of [`block_dev`] and [`reset_ring`].

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::discovery::configfs_dir;

/// A `target_core_user` module parameter the daemon sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleParam {
    /// `block_netlink`: `1` makes the kernel refuse new netlink requests.
    BlockNetlink,
    /// `reset_netlink`: `1` fails every netlink request still waiting for an answer.
    ResetNetlink,
}

impl ModuleParam {
    /// The parameter's file name.
    pub fn as_str(self) -> &'static str {
        match self {
            ModuleParam::BlockNetlink => "block_netlink",
            ModuleParam::ResetNetlink => "reset_netlink",
        }
    }
}

/// A knob could not be written.
#[derive(Debug, thiserror::Error)]
pub enum KnobError {
    /// The file does not exist (an older kernel, or a device the kernel already deleted).
    #[error("{}: no such kernel attribute", path.display())]
    Missing {
        /// The attribute.
        path: PathBuf,
    },
    /// Opening or writing it failed.
    #[error("{}: {source}", path.display())]
    Write {
        /// The attribute.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

impl KnobError {
    /// Whether the attribute does not exist.
    pub fn is_missing(&self) -> bool {
        matches!(self, KnobError::Missing { .. })
    }
}

/// `<sysfs_root>/module/target_core_user/parameters/<name>`.
pub fn module_param_path(sysfs_root: &Path, param: ModuleParam) -> PathBuf {
    sysfs_root
        .join("module/target_core_user/parameters")
        .join(param.as_str())
}

/// `action/<attr>` of backstore `user_<hba>/<name>`.
pub fn action_path(sysfs_root: &Path, hba: u32, name: &str, attr: &str) -> PathBuf {
    configfs_dir(sysfs_root, hba, name)
        .join("action")
        .join(attr)
}

/// Writes `value` to an existing kernel attribute in one `write` (never creates one).
fn write_attr(path: &Path, value: &str) -> Result<(), KnobError> {
    let mut file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => KnobError::Missing {
                path: path.to_path_buf(),
            },
            _ => KnobError::Write {
                path: path.to_path_buf(),
                source,
            },
        })?;
    file.write_all(value.as_bytes())
        .map_err(|source| KnobError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// Sets a `target_core_user` module parameter, logging the outcome (a kernel without the
/// parameter is not an error). Returns whether it was set.
pub fn set_module_param(sysfs_root: &Path, param: ModuleParam, on: bool) -> bool {
    let path = module_param_path(sysfs_root, param);
    let value = if on { "1" } else { "0" };
    match write_attr(&path, value) {
        Ok(()) => {
            tracing::debug!(
                param = param.as_str(),
                value,
                "set target_core_user parameter"
            );
            true
        }
        Err(KnobError::Missing { .. }) => {
            tracing::info!(
                param = param.as_str(),
                path = %path.display(),
                "this kernel has no such target_core_user parameter; continuing without it"
            );
            false
        }
        Err(e) => {
            tracing::warn!(param = param.as_str(), error = %e, "cannot set a target_core_user parameter");
            false
        }
    }
}

/// `action/block_dev = 1` (`block`) or `0` of backstore `user_<hba>/<name>`.
pub fn block_dev(sysfs_root: &Path, hba: u32, name: &str, block: bool) -> Result<(), KnobError> {
    write_attr(
        &action_path(sysfs_root, hba, name, "block_dev"),
        if block { "1" } else { "0" },
    )
}

/// `action/reset_ring = 1`: every command in the ring completes BUSY, head and tail rewind to 0.
pub fn reset_ring(sysfs_root: &Path, hba: u32, name: &str) -> Result<(), KnobError> {
    write_attr(&action_path(sysfs_root, hba, name, "reset_ring"), "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_only_existing_module_params() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        assert!(!set_module_param(root, ModuleParam::BlockNetlink, true));
        let p = module_param_path(root, ModuleParam::BlockNetlink);
        assert!(!p.exists());
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "0\n").unwrap();
        assert!(set_module_param(root, ModuleParam::BlockNetlink, true));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "1");
    }

    #[test]
    fn writes_actions_under_the_configured_root() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = configfs_dir(tmp.path(), 3, "d").join("action");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("block_dev"), "").unwrap();
        std::fs::write(dir.join("reset_ring"), "").unwrap();
        block_dev(tmp.path(), 3, "d", true).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("block_dev")).unwrap(), "1");
        block_dev(tmp.path(), 3, "d", false).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("block_dev")).unwrap(), "0");
        reset_ring(tmp.path(), 3, "d").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("reset_ring")).unwrap(),
            "1"
        );
        let err = block_dev(tmp.path(), 4, "none", true).unwrap_err();
        assert!(err.is_missing());
        assert!(
            err.to_string().contains("user_4/none/action/block_dev"),
            "{err}"
        );
    }
}
