//! # tcmu-warden policy: what may be served, and how
//!
//! tcmu-warden serves Linux SCSI disks from userspace through TCMU, the kernel's `user`
//! backstore of LIO (the Linux SCSI target). Each TCMU device names a *subtype* (the kind of
//! handler that serves it: `file`, `ram`, ...) and a *cfgstring* (handler-specific; for `file`,
//! the path of the backing file). Whoever creates LIO backstores chooses both, so the daemon
//! decides, from this configuration, which devices it serves and what they may touch.
//!
//! This crate owns:
//! - the configuration schema ([`Config`], parsed from TOML by [`Config::load`], with errors that
//!   name file, line and column),
//! - admission ([`Config::admit`], [`Config::open_backing`]): whether a device is served, and
//!   opening its backing store without ever leaving the allowed directories,
//! - the jail ([`jail`]): the effective confinement of each worker ([`JailSpec`]), its seccomp
//!   filters and landlock ruleset, built here and applied by the supervisor (stage one) and the
//!   worker (stage two).
//!
//! It never talks to workers or the kernel's TCMU interface; the supervisor does that with the
//! answers it gets here.
//!
//! ## The configuration file
//!
//! A commented example lives in `docs/tcmu-warden.example.toml`. Unknown sections and keys are
//! errors, so a typo never silently changes behaviour.
//!
//! ```toml
//! [daemon]
//! # The worker executable. Default: `tcmu-warden-worker` in the directory of the running
//! # `tcmu-warden`. Must be absolute.
//! worker_exe = "/usr/libexec/tcmu-warden/tcmu-warden-worker"
//! # Where sysfs is mounted: `class/uio` and `kernel/config` (configfs) are looked up under it.
//! # Default "/sys". Tests point it at a fake tree.
//! sysfs_root = "/sys"
//! # Where the `uioN` device nodes are. Default "/dev".
//! dev_root = "/dev"
//! # "text" (human-readable, stderr), "json" (one object per line, stderr) or "journald"
//! # (native journal entries). Default: journald when JOURNAL_STREAM is set (started by
//! # systemd with output to the journal), text otherwise.
//! log_format = "text"
//! # Where each device's in-flight journal lives (a tmpfs: it must survive a supervisor restart,
//! # and need not survive a reboot). Default "/run/tcmu-warden/journal".
//! journal_dir = "/run/tcmu-warden/journal"
//! # Worker lifecycle. Durations take a unit: ms, s, m, h.
//! heartbeat_interval = "5s"       # how often a serving worker is pinged
//! heartbeat_timeout = "10s"       # a worker that does not answer a ping this long is killed
//! restart_backoff_initial = "100ms" # delay before restarting a crashed worker, doubling...
//! restart_backoff_max = "30s"     # ...up to this
//! quarantine_after = 5            # this many crashes within quarantine_window: no more
//! quarantine_window = "10m"       # restarts; the worker's devices stay blocked and failed
//! # The control socket `tcmu-warden status` talks to (root only). Default
//! # "/run/tcmu-warden/control.sock".
//! control_socket = "/run/tcmu-warden/control.sock"
//! # At shutdown, how long in-flight SCSI commands may take to finish before workers are
//! # killed, in seconds (1..=3600). Default 30.
//! drain_timeout = 30
//! # Which copy of the kernel's device events to follow: "udev" (sent once udev created
//! # /dev/uioN), "kernel", or "auto" (default: udev's when systemd-udevd runs).
//! uevent_source = "auto"
//!
//! # Devices of subtype `file`: the cfgstring is an absolute path to a regular file or a block
//! # device. Without this section every `file` device is refused.
//! [handler.file]
//! # Required, non-empty. Directories whose files (at any depth) may back devices, or paths
//! # allowed exactly (typically a block device such as /dev/disk/by-id/wwn-0x5000c500a1b2c3d4).
//! # Absolute, no `..`. Symlinks *inside* a directory may not lead out of it.
//! allow_paths = ["/var/lib/tcmu", "/srv/disks"]
//! # "subtype" (default): one worker process serves every `file` device.
//! # "device": one worker process per device.
//! isolation = "subtype"
//!
//! # Devices of subtype `ram`: volatile, held in the worker's memory. Without this section every
//! # `ram` device is refused.
//! [handler.ram]
//! # Optional cap on a device's size: an integer (bytes) or a string such as "64GiB", "512MiB",
//! # "10GB" (see [`size`] for the units).
//! max_size = "64GiB"
//!
//! # A third-party subtype: its own worker executable, built on the worker runtime.
//! [handler.qcow]
//! exe = "/usr/libexec/qcow-worker"    # required for a subtype the built-in worker lacks
//! backing = "fd"                      # "fd": cfgstring is a path under allow_paths, opened by
//! allow_paths = ["/srv/qcow"]         # the supervisor and passed; "none" (default): no backing
//! ```
//!
//! ## The jail keys
//! The `[jail]` section holds the defaults of every worker (and is exactly the jail of the
//! worker that serves refused devices); each `[handler.<subtype>]` section may override any key
//! (`rlimits` entry by entry). See [`jail`] and `docs/security.md`.
//!
//! ```toml
//! [jail]
//! user = "tcmu"                 # name or number; default: the supervisor's (root)
//! group = "tcmu"                # default: the user's primary group
//! read_paths = []               # read-only landlock grants
//! write_paths = []              # read-write (never execute) landlock grants
//! network = "none"              # or "tcp" with connect_ports = [3260]
//! syscalls = []                 # extra names for the stage-two seccomp allow-list
//! namespaces = ["ipc", "net", "uts"]   # default; "net" only without TCP; also "mount", "cgroup"
//! landlock = "required"         # or "best-effort"
//! seccomp_action = "kill"       # or "log": a debugging aid, NOT FOR PRODUCTION
//! io_uring = false
//! rlimits = { open_files = 4096, core_size = 0, address_space = "64GiB", processes = 256 }
//! ```
//!
//! A device whose subtype has no section, whose cfgstring the rules refuse, or that has no
//! subtype at all is *refused*. A device created while the daemon runs is refused to the kernel:
//! the administrator's configfs `enable` write fails with an error, and the log says why. A
//! device that already existed when the daemon started is still handed to a worker that
//! answers every SCSI command with NOT READY, so initiators fail at once rather than time out.

pub mod admit;
pub mod config;
pub mod duration;
pub mod jail;
pub mod size;

pub use admit::{Admission, PolicyError};
pub use config::{
    Config, ConfigError, DEFAULT_CONTROL_SOCKET, DEFAULT_DRAIN_TIMEOUT_SECS, DaemonConfig,
    FileHandlerConfig, HandlerPolicy, Isolation, KNOWN_SUBTYPES, Lifecycle, LogFormat,
    RamHandlerConfig, UeventSource,
};
pub use duration::{DurationError, HumanDuration, format_duration, parse_duration};
pub use jail::JailSpec;
pub use jail::settings::{Backing, JailSettings, LandlockMode, Network, SeccompMode};
pub use size::{ByteSize, SizeError, format_size, parse_size};
