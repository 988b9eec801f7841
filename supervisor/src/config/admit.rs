//! # Admission: may this device be served, and with what backing store?
//!
//! The supervisor asks [`Config::admit`] about every TCMU device it finds. The answer is either a
//! refusal ([`PolicyError`], which names the rule that refused) or the go-ahead, with the backing
//! store already opened for subtypes whose cfgstring names a path (`file`).
//!
//! ## Opening a backing path without being fooled
//! The cfgstring of a `file` device is chosen by whoever configured the LIO backstore; the
//! supervisor opens it with root's privileges and hands the descriptor to a confined worker. So
//! the path must not be able to reach anything outside `handler.file.allow_paths`, whatever
//! symlinks or `..` components it contains and however the tree changes while it is opened:
//!
//! 1. A lexical check first: the path must be absolute, free of `..`, and lie under an
//!    `allow_paths` entry (component-wise). A path that fails is refused before anything is
//!    opened, with a message saying so.
//! 2. The allowed directory is opened `O_PATH | O_DIRECTORY` (the administrator wrote that path,
//!    so a symlink in it is trusted), and the rest of the path is resolved *by the kernel*
//!    relative to it with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`. Any symlink or `..`
//!    that would leave the directory makes the kernel fail the open (`EXDEV`), so there is no
//!    check-then-open race.
//! 3. The target is first opened `O_PATH` and its type checked (regular file or block device
//!    only, so no FIFO, socket or character device is ever opened for I/O), then opened
//!    `O_RDWR` the same way, and the two are compared by device and inode number: if the file
//!    was swapped in between, the open is refused.
//!
//! An `allow_paths` entry that *is* the cfgstring (a block device listed exactly, for instance
//! `/dev/disk/by-id/wwn-...`) is opened directly, following its symlinks, because the
//! administrator named it.
//!
//! This module never reads or writes the data of a backing store, and never opens anything the
//! lexical check refused, not even with `O_PATH`.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat};

use crate::config::{Config, PathError, normalize_absolute};
use tcmu_warden_policy::jail::settings::Backing;
use tcmu_warden_policy::size::format_size;

/// Why a device is refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The device has no `dev_config`, so no subtype to serve it with.
    #[error("the device has no dev_config, so no handler subtype")]
    NoSubtype,
    /// No `[handler.<subtype>]` section.
    #[error(
        "subtype {subtype:?} is not served: the configuration has no [handler.{subtype}] section"
    )]
    NotServed {
        /// The subtype.
        subtype: String,
    },
    /// The cfgstring is not an absolute path.
    #[error("cfgstring {path:?} is not an absolute path")]
    NotAbsolute {
        /// The cfgstring.
        path: String,
    },
    /// The cfgstring is not a usable path for another reason.
    #[error("cfgstring {path:?} is refused: {why}")]
    BadPath {
        /// The cfgstring.
        path: String,
        /// Why.
        why: PathError,
    },
    /// The path lies outside every `allow_paths` entry.
    #[error("{path:?} is outside allow_paths [{allowed}]")]
    OutsideAllowPaths {
        /// The subtype whose `allow_paths` refused.
        subtype: String,
        /// The normalized path.
        path: PathBuf,
        /// The configured entries, for the message.
        allowed: String,
    },
    /// The path (or the allowed directory it lies in) does not exist.
    #[error("{path:?} does not exist")]
    NotFound {
        /// The path.
        path: PathBuf,
    },
    /// Resolution would leave the allowed directory (symlink or `..` escape, or a magic link).
    #[error("{path:?} resolves outside its allowed directory {dir:?} ({how})")]
    Escapes {
        /// The subtype whose `allow_paths` refused.
        subtype: String,
        /// The path.
        path: PathBuf,
        /// The allowed directory.
        dir: PathBuf,
        /// What the kernel said.
        how: &'static str,
    },
    /// The target is neither a regular file nor a block device.
    #[error("{path:?} is a {kind}; only regular files and block devices can back a device")]
    WrongType {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// The target changed between the type check and the open.
    #[error("{path:?} was replaced while it was being opened")]
    Changed {
        /// The path.
        path: PathBuf,
    },
    /// Opening failed for another reason.
    #[error("opening {path:?}: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A `ram` device larger than `max_size`.
    #[error("device size {} exceeds handler.ram.max_size {}", format_size(*dev_size), format_size(*max_size))]
    TooLarge {
        /// The device's size in bytes.
        dev_size: u64,
        /// The configured cap.
        max_size: u64,
    },
}

impl PolicyError {
    /// The rule that refused, for logs (`rule=` field): a configuration key
    /// (`handler.<subtype>`, `handler.file.allow_paths`, `handler.ram.max_size`), `cfgstring`
    /// (a path that is unusable as written), `dev_config` (no subtype) or `backing store` (an
    /// allowed path that cannot be opened).
    pub fn rule(&self) -> String {
        match self {
            PolicyError::NoSubtype => "dev_config".into(),
            PolicyError::NotServed { subtype } => format!("handler.{subtype}"),
            PolicyError::NotAbsolute { .. } | PolicyError::BadPath { .. } => "cfgstring".into(),
            PolicyError::TooLarge { .. } => "handler.ram.max_size".into(),
            PolicyError::OutsideAllowPaths { subtype, .. }
            | PolicyError::Escapes { subtype, .. } => format!("handler.{subtype}.allow_paths"),
            PolicyError::NotFound { .. }
            | PolicyError::WrongType { .. }
            | PolicyError::Changed { .. }
            | PolicyError::Open { .. } => "backing store".into(),
        }
    }
}

/// The go-ahead for a device.
#[derive(Debug)]
pub enum Admission {
    /// Serve it; the handler needs no backing descriptor.
    NoBacking,
    /// Serve it with this backing store (opened read-write, close-on-exec).
    Backing(OwnedFd),
}

impl Admission {
    /// The backing descriptor, if any.
    pub fn into_backing(self) -> Option<OwnedFd> {
        match self {
            Admission::NoBacking => None,
            Admission::Backing(fd) => Some(fd),
        }
    }
}

/// How many times an `openat2` that reports a possible rename race (`EAGAIN`) is retried.
const RACE_RETRIES: usize = 8;

impl Config {
    /// Decides whether a device of `subtype` with `cfgstring` and `dev_size` bytes may be served,
    /// opening its backing store if the subtype has one. `subtype` is `None` for a device without
    /// `dev_config`.
    pub fn admit(
        &self,
        subtype: Option<&str>,
        cfgstring: &str,
        dev_size: u64,
    ) -> Result<Admission, PolicyError> {
        let subtype = subtype.ok_or(PolicyError::NoSubtype)?;
        let handler = self
            .handlers
            .get(subtype)
            .ok_or_else(|| PolicyError::NotServed {
                subtype: subtype.to_owned(),
            })?;
        if let Some(max_size) = handler.max_size
            && dev_size > max_size
        {
            return Err(PolicyError::TooLarge { dev_size, max_size });
        }
        match handler.backing {
            Backing::Fd => self
                .open_backing(subtype, cfgstring)
                .map(Admission::Backing),
            Backing::None => Ok(Admission::NoBacking),
        }
    }

    /// Opens the backing store a cfgstring names (for a subtype with `backing = "fd"`, such as
    /// `file`), read-write and close-on-exec, refusing anything outside the subtype's
    /// `allow_paths` (see the module documentation for how).
    pub fn open_backing(&self, subtype: &str, cfgstring: &str) -> Result<OwnedFd, PolicyError> {
        let allow_paths = match self.handlers.get(subtype) {
            Some(h) if h.backing == Backing::Fd => &h.allow_paths,
            _ => {
                return Err(PolicyError::NotServed {
                    subtype: subtype.to_owned(),
                });
            }
        };
        if !cfgstring.starts_with('/') {
            return Err(PolicyError::NotAbsolute {
                path: cfgstring.to_owned(),
            });
        }
        let path = normalize_absolute(cfgstring).map_err(|why| PolicyError::BadPath {
            path: cfgstring.to_owned(),
            why,
        })?;
        let entry = allow_paths
            .iter()
            .filter(|entry| path.starts_with(entry))
            .max_by_key(|entry| entry.components().count())
            .ok_or_else(|| PolicyError::OutsideAllowPaths {
                subtype: subtype.to_owned(),
                path: path.clone(),
                allowed: allow_paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        if &path == entry {
            open_exact(subtype, &path)
        } else {
            let rel = path.strip_prefix(entry).map_err(|_| PolicyError::BadPath {
                path: cfgstring.to_owned(),
                why: PathError::Unsplittable,
            })?;
            open_beneath(subtype, entry, rel, &path)
        }
    }
}

/// Opens an `allow_paths` entry named exactly (the administrator chose it, symlinks and all).
fn open_exact(subtype: &str, path: &Path) -> Result<OwnedFd, PolicyError> {
    let how = |flags: OFlag| {
        OpenHow::new()
            .flags(open_flags(flags))
            .resolve(ResolveFlag::RESOLVE_NO_MAGICLINKS)
    };
    let open_with = |flags: OFlag| {
        retry_race(|| openat2(nix::fcntl::AT_FDCWD, path, how(flags)))
            .map_err(|e| open_error(e, subtype, path, path))
    };
    checked_open(path, open_with)
}

/// Opens `rel` beneath the allowed directory `dir`, letting the kernel refuse any escape.
fn open_beneath(
    subtype: &str,
    dir: &Path,
    rel: &Path,
    full: &Path,
) -> Result<OwnedFd, PolicyError> {
    let dirfd = open(
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::ENOENT => PolicyError::NotFound {
            path: dir.to_path_buf(),
        },
        other => PolicyError::Open {
            path: dir.to_path_buf(),
            source: std::io::Error::from(other),
        },
    })?;
    let how = |flags: OFlag| {
        OpenHow::new()
            .flags(open_flags(flags))
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS)
    };
    let open_with = |flags: OFlag| {
        retry_race(|| openat2(dirfd.as_fd(), rel, how(flags)))
            .map_err(|e| open_error(e, subtype, full, dir))
    };
    checked_open(full, open_with)
}

/// The full open flags: `openat2` refuses any flag besides `O_CLOEXEC`, `O_DIRECTORY` and
/// `O_NOFOLLOW` together with `O_PATH`, so `O_NOCTTY` is only added to real opens.
fn open_flags(flags: OFlag) -> OFlag {
    if flags.contains(OFlag::O_PATH) {
        flags | OFlag::O_CLOEXEC
    } else {
        flags | OFlag::O_CLOEXEC | OFlag::O_NOCTTY
    }
}

/// The O_PATH, type-check, O_RDWR, same-inode sequence shared by both open paths.
fn checked_open(
    path: &Path,
    open_with: impl Fn(OFlag) -> Result<OwnedFd, PolicyError>,
) -> Result<OwnedFd, PolicyError> {
    let probe = open_with(OFlag::O_PATH)?;
    let before = stat_of(&probe, path)?;
    check_type(&before, path)?;
    let fd = open_with(OFlag::O_RDWR)?;
    let after = stat_of(&fd, path)?;
    check_type(&after, path)?;
    if (before.st_dev, before.st_ino) != (after.st_dev, after.st_ino) {
        return Err(PolicyError::Changed {
            path: path.to_path_buf(),
        });
    }
    Ok(fd)
}

fn retry_race(mut f: impl FnMut() -> nix::Result<OwnedFd>) -> nix::Result<OwnedFd> {
    let mut last = Errno::EAGAIN;
    for _ in 0..RACE_RETRIES {
        match f() {
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => last = Errno::EAGAIN,
            other => return other,
        }
    }
    Err(last)
}

fn open_error(e: Errno, subtype: &str, path: &Path, dir: &Path) -> PolicyError {
    match e {
        Errno::ENOENT => PolicyError::NotFound {
            path: path.to_path_buf(),
        },
        Errno::EXDEV => PolicyError::Escapes {
            subtype: subtype.to_owned(),
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            how: "a symlink or `..` leads out of it",
        },
        Errno::ELOOP => PolicyError::Escapes {
            subtype: subtype.to_owned(),
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            how: "a magic link or a symlink loop",
        },
        Errno::ENOSYS | Errno::E2BIG => PolicyError::Open {
            path: path.to_path_buf(),
            source: std::io::Error::other(
                "the kernel lacks openat2 (Linux 5.6 or later is required)",
            ),
        },
        other => PolicyError::Open {
            path: path.to_path_buf(),
            source: std::io::Error::from(other),
        },
    }
}

fn stat_of(fd: &OwnedFd, path: &Path) -> Result<FileStat, PolicyError> {
    fstat(fd.as_fd()).map_err(|e| PolicyError::Open {
        path: path.to_path_buf(),
        source: std::io::Error::from(e),
    })
}

fn check_type(st: &FileStat, path: &Path) -> Result<(), PolicyError> {
    let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
    let name = if kind == SFlag::S_IFREG || kind == SFlag::S_IFBLK {
        return Ok(());
    } else if kind == SFlag::S_IFDIR {
        "directory"
    } else if kind == SFlag::S_IFCHR {
        "character device"
    } else if kind == SFlag::S_IFIFO {
        "FIFO"
    } else if kind == SFlag::S_IFSOCK {
        "socket"
    } else if kind == SFlag::S_IFLNK {
        "symbolic link"
    } else {
        "special file"
    };
    Err(PolicyError::WrongType {
        path: path.to_path_buf(),
        kind: name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::symlink;

    struct Tree {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        cfg: Config,
    }

    /// root/allowed/{disk.img, sub/inner.img, up -> .., abs -> /root/secret, loop -> loop}
    /// root/secret
    fn tree() -> Tree {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let allowed = root.join("allowed");
        fs::create_dir_all(allowed.join("sub")).unwrap();
        fs::write(allowed.join("disk.img"), b"inside").unwrap();
        fs::write(allowed.join("sub/inner.img"), b"nested").unwrap();
        fs::write(root.join("secret"), b"outside").unwrap();
        symlink("..", allowed.join("up")).unwrap();
        symlink(root.join("secret"), allowed.join("abs")).unwrap();
        symlink("sub/inner.img", allowed.join("rel-link.img")).unwrap();
        symlink("loop", allowed.join("loop")).unwrap();
        let text = format!(
            "[handler.file]\nallow_paths = [{:?}, {:?}]\n[handler.ram]\nmax_size = '1MiB'\n",
            allowed.display().to_string(),
            root.join("exact.img").display().to_string(),
        );
        let cfg = Config::from_toml_str(&text, Path::new("test.toml")).unwrap();
        Tree {
            _tmp: tmp,
            root,
            cfg,
        }
    }

    fn read_all(fd: OwnedFd) -> String {
        let mut f = fs::File::from(fd);
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        s
    }

    fn open(t: &Tree, rel: &str) -> Result<OwnedFd, PolicyError> {
        t.cfg
            .open_backing("file", &format!("{}/{rel}", t.root.display()))
    }

    #[test]
    fn inside_is_opened_read_write() {
        let t = tree();
        let fd = open(&t, "allowed/disk.img").unwrap();
        let mut f = fs::File::from(fd);
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "inside");
        f.rewind().unwrap();
        f.write_all(b"INSIDE").unwrap();
        assert_eq!(
            fs::read(t.root.join("allowed/disk.img")).unwrap(),
            b"INSIDE"
        );
        let flags = nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_eq!(flags & nix::libc::FD_CLOEXEC, nix::libc::FD_CLOEXEC);
    }

    #[test]
    fn nested_and_inner_symlinks_are_fine() {
        let t = tree();
        assert_eq!(
            read_all(open(&t, "allowed/sub/inner.img").unwrap()),
            "nested"
        );
        assert_eq!(
            read_all(open(&t, "allowed//./sub/inner.img").unwrap()),
            "nested"
        );
        assert_eq!(
            read_all(open(&t, "allowed/rel-link.img").unwrap()),
            "nested"
        );
    }

    #[test]
    fn outside_is_refused_lexically() {
        let t = tree();
        let err = open(&t, "secret").unwrap_err();
        assert!(
            matches!(err, PolicyError::OutsideAllowPaths { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("outside allow_paths"), "{err}");
        assert_eq!(err.rule(), "handler.file.allow_paths");
        // A sibling whose name merely starts with the allowed directory's name.
        fs::write(t.root.join("allowed-not"), b"x").unwrap();
        let err = open(&t, "allowed-not").unwrap_err();
        assert!(
            matches!(err, PolicyError::OutsideAllowPaths { .. }),
            "{err}"
        );
    }

    #[test]
    fn symlink_escape_is_refused_by_the_kernel() {
        let t = tree();
        let err = open(&t, "allowed/abs").unwrap_err();
        assert!(matches!(err, PolicyError::Escapes { .. }), "{err}");
        let err = open(&t, "allowed/up/secret").unwrap_err();
        assert!(matches!(err, PolicyError::Escapes { .. }), "{err}");
        assert_eq!(err.rule(), "handler.file.allow_paths");
        assert_eq!(fs::read(t.root.join("secret")).unwrap(), b"outside");
    }

    #[test]
    fn dotdot_is_refused() {
        let t = tree();
        let err = open(&t, "allowed/../secret").unwrap_err();
        assert!(matches!(err, PolicyError::BadPath { .. }), "{err}");
        assert!(err.to_string().contains(".."), "{err}");
        assert_eq!(err.rule(), "cfgstring");
        let err = open(&t, "allowed/sub/../disk.img").unwrap_err();
        assert!(matches!(err, PolicyError::BadPath { .. }), "{err}");
    }

    #[test]
    fn relative_and_empty_are_refused() {
        let t = tree();
        for cfg in ["disk.img", "allowed/disk.img", "", "./x"] {
            let err = t.cfg.open_backing("file", cfg).unwrap_err();
            assert!(
                matches!(err, PolicyError::NotAbsolute { .. }),
                "{cfg}: {err}"
            );
        }
    }

    #[test]
    fn nonexistent_is_a_clear_error() {
        let t = tree();
        let err = open(&t, "allowed/missing.img").unwrap_err();
        assert!(matches!(err, PolicyError::NotFound { .. }), "{err}");
        assert_eq!(err.rule(), "backing store");
        assert!(err.to_string().contains("missing.img"), "{err}");
        assert!(err.to_string().contains("does not exist"), "{err}");
        // An exactly-listed entry that does not exist.
        let err = open(&t, "exact.img").unwrap_err();
        assert!(matches!(err, PolicyError::NotFound { .. }), "{err}");
    }

    #[test]
    fn exact_entry_is_opened() {
        let t = tree();
        fs::write(t.root.join("exact.img"), b"exact").unwrap();
        assert_eq!(read_all(open(&t, "exact.img").unwrap()), "exact");
        // Nothing beneath an exact (non-directory) entry.
        let err = open(&t, "exact.img/x").unwrap_err();
        assert!(matches!(err, PolicyError::Open { .. }), "{err}");
    }

    #[test]
    fn wrong_types_are_refused() {
        let t = tree();
        let err = open(&t, "allowed/sub").unwrap_err();
        assert!(
            matches!(
                err,
                PolicyError::WrongType {
                    kind: "directory",
                    ..
                }
            ),
            "{err}"
        );
        nix::unistd::mkfifo(
            &t.root.join("allowed/fifo"),
            Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let err = open(&t, "allowed/fifo").unwrap_err();
        assert!(
            matches!(err, PolicyError::WrongType { kind: "FIFO", .. }),
            "{err}"
        );
        let err = open(&t, "allowed/loop").unwrap_err();
        assert!(matches!(err, PolicyError::Escapes { .. }), "{err}");
    }

    #[test]
    fn admission_rules() {
        let t = tree();
        let path = format!("{}/allowed/disk.img", t.root.display());
        assert!(matches!(
            t.cfg.admit(Some("file"), &path, 4096).unwrap(),
            Admission::Backing(_)
        ));
        assert!(matches!(
            t.cfg.admit(Some("ram"), "", 1 << 20).unwrap(),
            Admission::NoBacking
        ));
        let err = t.cfg.admit(Some("ram"), "", (1 << 20) + 1).unwrap_err();
        assert!(matches!(err, PolicyError::TooLarge { .. }), "{err}");
        assert_eq!(err.rule(), "handler.ram.max_size");
        let err = t.cfg.admit(Some("qcow"), "/x", 4096).unwrap_err();
        assert!(matches!(err, PolicyError::NotServed { .. }), "{err}");
        assert_eq!(err.rule(), "handler.qcow");
        let err = t.cfg.admit(None, "", 4096).unwrap_err();
        assert!(matches!(err, PolicyError::NoSubtype), "{err}");

        let only_ram = Config::from_toml_str("[handler.ram]\n", Path::new("t")).unwrap();
        let err = only_ram.admit(Some("file"), &path, 4096).unwrap_err();
        assert!(matches!(err, PolicyError::NotServed { .. }), "{err}");
        let none = Config::from_toml_str("", Path::new("t")).unwrap();
        assert!(matches!(
            none.admit(Some("ram"), "", 1).unwrap_err(),
            PolicyError::NotServed { .. }
        ));
    }

    #[test]
    fn missing_allowed_directory_is_not_found() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("gone");
        let text = format!(
            "[handler.file]\nallow_paths = [{:?}]\n",
            dir.display().to_string()
        );
        let cfg = Config::from_toml_str(&text, Path::new("t")).unwrap();
        let err = cfg
            .open_backing("file", &format!("{}/disk.img", dir.display()))
            .unwrap_err();
        assert!(matches!(err, PolicyError::NotFound { .. }), "{err}");
    }
}
