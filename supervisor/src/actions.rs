//! # The backstore's `action/` attributes in configfs
//!
//! `<configfs>/core/user_<hba>/<name>/action/` holds the knobs the kernel gives a TCMU daemon to
//! steer a device's command ring:
//!
//! - `block_dev`: `1` stops the kernel from queueing new commands into the ring (initiators get
//!   BUSY and retry; commands already in the ring stay, and completions are still reaped); `0`
//!   resumes. The supervisor blocks a device while no worker serves it (a crash, a restart) and
//!   unblocks it once the successor reported the device ready.
//! - `reset_ring`: `1` completes every command in the ring with BUSY (retryable), `2` with CHECK
//!   CONDITION, and rewinds `cmd_head` and `cmd_tail` to 0. Recent kernels refuse it unless the
//!   device is blocked. The supervisor uses it when a journal cannot be trusted.
//!
//! Paths are built under the configured `sysfs_root` (configfs is `kernel/config/target` there),
//! so tests use a fake tree. This module only writes these two attributes; it never reads the
//! ring.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::discovery::configfs_dir;

/// `action/<attr>` of backstore `user_<hba>/<name>`.
pub fn action_path(sysfs_root: &Path, hba: u32, name: &str, attr: &str) -> PathBuf {
    configfs_dir(sysfs_root, hba, name)
        .join("action")
        .join(attr)
}

/// Writes `value` to `action/<attr>` in one `write` (configfs attributes take one write each).
/// The file must exist: configfs attributes are never created.
fn write_action(
    sysfs_root: &Path,
    hba: u32,
    name: &str,
    attr: &str,
    value: &str,
) -> io::Result<()> {
    let path = action_path(sysfs_root, hba, name, attr);
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    f.write_all(value.as_bytes())
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// `block_dev = 1` (`true`) or `0`.
pub fn block_dev(sysfs_root: &Path, hba: u32, name: &str, block: bool) -> io::Result<()> {
    write_action(
        sysfs_root,
        hba,
        name,
        "block_dev",
        if block { "1" } else { "0" },
    )
}

/// `reset_ring = 1`: every command in the ring completes BUSY, head and tail rewind to 0.
pub fn reset_ring(sysfs_root: &Path, hba: u32, name: &str) -> io::Result<()> {
    write_action(sysfs_root, hba, name, "reset_ring", "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_under_the_configured_root() {
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
        assert!(
            err.to_string().contains("user_4/none/action/block_dev"),
            "{err}"
        );
    }
}
