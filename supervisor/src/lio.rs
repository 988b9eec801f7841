//! # Writing LIO's knobs: module parameters and per-device actions
//!
//! Two kinds of kernel files the daemon writes (all looked up under the configured sysfs root,
//! so tests use a fake tree):
//! - `module/target_core_user/parameters/block_netlink` and `reset_netlink`: with
//!   `block_netlink=1` the kernel refuses new netlink requests (the configfs write fails with
//!   `EAGAIN` instead of waiting for a daemon); `reset_netlink=1` fails every request still
//!   waiting for an answer, e.g. one a previous daemon never answered. The daemon blocks and
//!   resets at start-up, unblocks once it listens, and blocks again when it stops, so a
//!   configfs writer never waits forever on a daemon that is not there. Older kernels lack the
//!   parameters: that is logged and not an error.
//! - A device's `action/block_dev` (1: the kernel stops queueing new commands on the ring; they
//!   wait in the kernel) and `action/reset_ring` (1: every command still on the ring completes
//!   with BUSY, which initiators retry), used to drain at shutdown.
//!
//! This module only writes files; it never decides when.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// `<sysfs_root>/module/target_core_user/parameters/<name>`.
pub fn module_param_path(sysfs_root: &Path, name: &str) -> PathBuf {
    sysfs_root
        .join("module/target_core_user/parameters")
        .join(name)
}

/// Writes `value` to an existing kernel attribute file (never creates one). `Ok(false)`: the
/// file does not exist.
pub fn write_attr(path: &Path, value: &str) -> io::Result<bool> {
    let mut file = match OpenOptions::new().write(true).truncate(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    file.write_all(value.as_bytes())?;
    Ok(true)
}

/// Sets a `target_core_user` module parameter, logging the outcome. Returns whether it was set.
pub fn set_module_param(sysfs_root: &Path, name: &str, value: &str) -> bool {
    let path = module_param_path(sysfs_root, name);
    match write_attr(&path, value) {
        Ok(true) => {
            tracing::debug!(param = name, value, "set target_core_user parameter");
            true
        }
        Ok(false) => {
            tracing::info!(
                param = name,
                path = %path.display(),
                "this kernel has no such target_core_user parameter; continuing without it"
            );
            false
        }
        Err(e) => {
            tracing::warn!(param = name, path = %path.display(), error = %e, "cannot set a target_core_user parameter");
            false
        }
    }
}

/// Writes `value` to a device's `action/<action>` in configfs (`dir` is the device's configfs
/// directory). Logged; returns whether it was written.
pub fn device_action(dir: &Path, device: &str, action: &str, value: &str) -> bool {
    let path = dir.join("action").join(action);
    match write_attr(&path, value) {
        Ok(true) => {
            tracing::debug!(device, action, value, "device action written");
            true
        }
        Ok(false) => {
            tracing::debug!(device, action, path = %path.display(), "device has no such action file");
            false
        }
        Err(e) => {
            tracing::warn!(device, action, value, error = %e, "device action failed");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_only_existing_files() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        assert!(!set_module_param(root, "block_netlink", "1"));
        assert!(!module_param_path(root, "block_netlink").exists());
        let p = module_param_path(root, "block_netlink");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "0\n").unwrap();
        assert!(set_module_param(root, "block_netlink", "1"));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "1");

        let dev = root.join("dev0");
        assert!(!device_action(&dev, "uio0", "block_dev", "1"));
        std::fs::create_dir_all(dev.join("action")).unwrap();
        std::fs::write(dev.join("action/block_dev"), "").unwrap();
        assert!(device_action(&dev, "uio0", "block_dev", "1"));
        assert_eq!(
            std::fs::read_to_string(dev.join("action/block_dev")).unwrap(),
            "1"
        );
    }
}
