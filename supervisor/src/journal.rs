//! # The devices' in-flight journals, as files
//!
//! Each served device has a journal: a small file (exactly [`JOURNAL_BYTES`] long) in which its
//! worker's ring engine records what it has taken off the command ring and not yet finished (the
//! layout belongs to the worker: `tcmu_warden_worker::ring::journal`). After a worker crash, its
//! successor reads that record to finish exactly the commands left in flight.
//!
//! The files live under `daemon.journal_dir` (default `/run/tcmu-warden/journal`), one per
//! backstore, at `<journal_dir>/user_<hba>/<name>`. `/run` is a tmpfs: the files outlive the
//! supervisor process, so a restarted supervisor that finds a device still configured in the
//! kernel finds its journal too and recovers it, and they vanish at reboot together with the
//! kernel's rings. A memfd would not survive the supervisor (workers die with it).
//!
//! The supervisor never interprets a journal. It creates it (mode 0600, directories 0700, never
//! following a symlink), keeps one descriptor per device and sends it to the device's worker
//! (which maps it), truncates it back to zeros when the ring is reset, and deletes it when the
//! device is released. It never maps it either: a worker could shrink the file, and a mapping
//! over a shrunk file faults on access; a worker is handed a descriptor and takes that risk only
//! for itself.
//!
//! This module must never write anything but zeros into a journal.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub use tcmu_warden_proto::JOURNAL_BYTES;

/// Where the journals live.
#[derive(Debug, Clone)]
pub struct JournalStore {
    dir: PathBuf,
}

/// A device's journal, opened.
#[derive(Debug)]
pub struct OpenJournal {
    /// The supervisor's descriptor.
    pub file: File,
    /// The file was already there, the right size: a previous worker (perhaps under a previous
    /// supervisor) may have recorded commands in it, so the next worker must recover from it.
    pub existed: bool,
    /// Where it is.
    pub path: PathBuf,
}

impl JournalStore {
    /// Journals under `dir` (created on first use).
    pub fn new(dir: impl Into<PathBuf>) -> JournalStore {
        JournalStore { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<dir>/user_<hba>/<name>`, or `None` when `name` cannot be a single file name.
    pub fn path(&self, hba: u32, name: &str) -> Option<PathBuf> {
        let ok = !name.is_empty()
            && name != "."
            && name != ".."
            && name.len() <= 255
            && !name.contains(['/', '\0']);
        ok.then(|| self.dir.join(format!("user_{hba}")).join(name))
    }

    /// Opens (creating if needed) the journal of backstore `user_<hba>/<name>`. A file of any
    /// other size than [`JOURNAL_BYTES`] is resized to it and reported as existing (its content
    /// is then rejected by the worker, and the ring is reset).
    pub fn open(&self, hba: u32, name: &str) -> io::Result<OpenJournal> {
        let path = self.path(hba, name).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} cannot name a journal file"),
            )
        })?;
        if let Some(parent) = path.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a regular file", path.display()),
            ));
        }
        let existed = meta.len() != 0;
        if meta.len() != JOURNAL_BYTES {
            file.set_len(JOURNAL_BYTES)?;
        }
        Ok(OpenJournal {
            file,
            existed,
            path,
        })
    }

    /// Zeroes a journal (after the ring was reset, nothing it records is true any more): the
    /// next worker starts it fresh.
    pub fn zero(file: &File) -> io::Result<()> {
        file.set_len(0)?;
        file.set_len(JOURNAL_BYTES)
    }

    /// Deletes the journal of a released device (best effort: a missing file is fine).
    pub fn remove(&self, hba: u32, name: &str) -> io::Result<()> {
        let Some(path) = self.path(hba, name) else {
            return Ok(());
        };
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Deletes every journal whose backstore is not in `keep` (devices removed while no
    /// supervisor ran). Returns the paths removed.
    pub fn prune(&self, keep: &[(u32, String)]) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        let Ok(hbas) = fs::read_dir(&self.dir) else {
            return removed;
        };
        for hba_dir in hbas.filter_map(Result::ok) {
            let hba_name = hba_dir.file_name().to_string_lossy().into_owned();
            let Some(hba) = hba_name
                .strip_prefix("user_")
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(files) = fs::read_dir(hba_dir.path()) else {
                continue;
            };
            for f in files.filter_map(Result::ok) {
                let name = f.file_name().to_string_lossy().into_owned();
                if !keep.iter().any(|(h, n)| *h == hba && *n == name)
                    && fs::remove_file(f.path()).is_ok()
                {
                    removed.push(f.path());
                }
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn create_reopen_zero_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let store = JournalStore::new(tmp.path().join("j"));
        let j = store.open(1, "disk0").unwrap();
        assert!(!j.existed);
        assert_eq!(j.path, tmp.path().join("j/user_1/disk0"));
        assert_eq!(j.file.metadata().unwrap().len(), JOURNAL_BYTES);
        assert_eq!(
            j.file.metadata().unwrap().permissions().mode() & 0o777,
            0o600
        );
        let dir_mode = fs::metadata(tmp.path().join("j/user_1"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        (&j.file).write_all(b"state").unwrap();
        drop(j);
        let again = store.open(1, "disk0").unwrap();
        assert!(again.existed, "a restarted supervisor finds the journal");
        JournalStore::zero(&again.file).unwrap();
        let mut head = [1u8; 5];
        std::os::unix::fs::FileExt::read_exact_at(&again.file, &mut head, 0).unwrap();
        assert_eq!(head, [0; 5]);
        assert_eq!(again.file.metadata().unwrap().len(), JOURNAL_BYTES);
        store.remove(1, "disk0").unwrap();
        assert!(!again.path.exists());
        store.remove(1, "disk0").unwrap();
    }

    #[test]
    fn unsafe_names_and_symlinks_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let store = JournalStore::new(tmp.path());
        for bad in ["", ".", "..", "a/b", "x\0y"] {
            assert!(store.path(1, bad).is_none(), "{bad:?}");
            assert!(store.open(1, bad).is_err());
        }
        fs::create_dir_all(tmp.path().join("user_2")).unwrap();
        let target = tmp.path().join("elsewhere");
        fs::write(&target, b"precious").unwrap();
        std::os::unix::fs::symlink(&target, tmp.path().join("user_2/link")).unwrap();
        assert!(store.open(2, "link").is_err());
        assert_eq!(fs::read(&target).unwrap(), b"precious");
    }

    #[test]
    fn prune_keeps_only_live_devices() {
        let tmp = tempfile::tempdir().unwrap();
        let store = JournalStore::new(tmp.path());
        store.open(1, "a").unwrap();
        store.open(1, "b").unwrap();
        store.open(3, "a").unwrap();
        let removed = store.prune(&[(1, "a".into())]);
        assert_eq!(removed.len(), 2);
        assert!(store.path(1, "a").unwrap().exists());
        assert!(!store.path(1, "b").unwrap().exists());
        assert!(!store.path(3, "a").unwrap().exists());
    }
}
