//! # Worker processes: starting them and talking to them
//!
//! A worker is a separate, unprivileged-to-be process (`tcmu-warden-worker`) that serves the
//! devices of one subtype. This module owns one worker's process and its end of the connection:
//! [`WorkerProcess::spawn`] forks and executes the worker with one end of a
//! [`Channel`] installed as file descriptor 3, and the supervisor keeps the other end.
//!
//! What the child gets, and nothing more:
//! - fd 0 is `/dev/null`; fds 1 and 2 are the supervisor's (so worker logs reach the same place,
//!   the journal under systemd); fd 3 is the channel. Every other descriptor is closed at
//!   `exec`: the supervisor's own are close-on-exec anyway, and any it inherited without the
//!   flag are marked close-on-exec in the child.
//! - An empty environment except `TCMU_WARDEN_FD=3`, `RUST_LOG` (if the supervisor has it),
//!   and `TCMU_WARDEN_LOG_FORMAT` (the supervisor's log format, or its own variable if it has
//!   one): the process contract in `tcmu_warden_proto::process`. Stage two's settings travel in
//!   the worker's `Hello`, not in the environment.
//! - Its own session (`setsid`), so a Ctrl-C on the supervisor's terminal reaches only the
//!   supervisor, which then shuts the workers down in order.
//! - Stage one of its jail (see [`crate::jail`]), applied last before `exec`.
//! - `PR_SET_PDEATHSIG = SIGKILL`: if the supervisor dies, its workers die with it rather than
//!   serving devices nobody supervises. Nothing is lost by that: the kernel keeps each ring when
//!   the last `/dev/uioN` descriptor closes, and a restarted supervisor recovers every device
//!   from the in-flight journal its worker kept (see `crate::daemon::lifecycle`).
//!
//! This module never interprets messages (that is [`crate::daemon`]) and never blocks: the
//! supervisor's end of the channel is non-blocking, [`WorkerProcess::recv`] returns `None` when
//! there is nothing to read, and a full socket buffer is an error the caller treats as a stuck
//! worker. Reaping is [`WorkerProcess::try_reap`], polled from the event loop.

use std::ffi::OsString;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use crate::config::LogFormat;

use crate::jail::StageOne;
use tcmu_warden_proto::{Channel, DeviceFds, DeviceSpec, FromWorker, ProtoError, ToWorker};

use tcmu_warden_proto::process::{CHANNEL_FD_ENV, LOG_FORMAT_ENV, WORKER_CHANNEL_FD};

/// Errors of one worker process, as the supervisor sees it (spawning it, its channel). Not the
/// worker runtime's own `tcmu_warden_worker::runtime::WorkerError`, which is why a worker
/// process stops from the inside.
#[derive(Debug, thiserror::Error)]
pub enum WorkerProcessError {
    /// The process could not be started.
    #[error("starting {}: {source}", exe.display())]
    Spawn {
        /// The executable.
        exe: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The channel failed or the peer broke the protocol.
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// The socket buffer is full: the worker is not reading its messages.
    #[error("the worker is not reading its channel (socket buffer full)")]
    Stuck,
    /// The channel was already closed on our side.
    #[error("the channel to this worker is closed")]
    NoChannel,
}

/// One running (or exited, not yet dropped) worker process and the supervisor's end of its
/// channel.
#[derive(Debug)]
pub struct WorkerProcess {
    name: String,
    child: Child,
    channel: Option<Channel>,
    exit: Option<ExitStatus>,
}

impl WorkerProcess {
    /// Starts `exe` as a worker called `name` (the name is for logs and the Hello message).
    ///
    /// `log_format`: the value of `TCMU_WARDEN_LOG_FORMAT` in the child; `None` passes the
    /// supervisor's own variable through if it is set.
    ///
    /// `jail`: stage one of the worker's jail ([`crate::jail::prepare`]), applied in the child
    /// before `exec`; `None` starts the worker unconfined (a debugging switch, never the
    /// default: see `tcmu-warden run --no-jail`).
    pub fn spawn(
        exe: &Path,
        name: &str,
        log_format: Option<LogFormat>,
        jail: Option<StageOne>,
    ) -> Result<WorkerProcess, WorkerProcessError> {
        let spawn_err = |source: io::Error| WorkerProcessError::Spawn {
            exe: exe.to_path_buf(),
            source,
        };
        let (ours, theirs) = Channel::pair().map_err(spawn_err)?;
        ours.set_nonblocking(true).map_err(spawn_err)?;
        let child_fd = theirs.as_raw_fd();
        let parent_pid = nix::unistd::getpid().as_raw();

        let mut cmd = Command::new(exe);
        cmd.env_clear();
        for (key, value) in worker_environment(log_format) {
            cmd.env(key, value);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        let mut jail = jail;
        // SAFETY: the closure runs in the forked child of a possibly multithreaded process,
        // before exec. It only makes raw system calls that are async-signal-safe (setsid, fcntl,
        // dup2, close_range, prctl, getppid, and in `StageOne::apply` the jail's), allocates
        // nothing, takes no locks, and touches only values computed before the fork (the
        // integers it captured and the prepared jail it owns).
        unsafe {
            cmd.pre_exec(move || {
                // A session (and process group) of its own: a Ctrl-C on the supervisor's
                // terminal reaches only the supervisor, and the worker has no controlling
                // terminal to reach the operator through.
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if child_fd == WORKER_CHANNEL_FD {
                    // dup2 onto itself would keep close-on-exec; clear it instead.
                    if libc::fcntl(child_fd, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(child_fd, WORKER_CHANNEL_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                close_inherited_descriptors();
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before PDEATHSIG was armed.
                if libc::getppid() != parent_pid {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                if let Some(jail) = jail.as_mut() {
                    jail.apply()?;
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(spawn_err)?;
        // Dropping the command drops the prepared jail in this process (its landlock ruleset
        // descriptor is closed here; the child's copy closed at exec).
        drop(cmd);
        drop(theirs);
        Ok(WorkerProcess {
            name: name.to_owned(),
            child,
            channel: Some(ours),
            exit: None,
        })
    }

    /// The worker's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The supervisor's end of the channel, while it is open.
    pub fn channel(&self) -> Option<&Channel> {
        self.channel.as_ref()
    }

    /// How the process ended, once reaped.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exit
    }

    /// Sends one message that carries no descriptors, without blocking.
    pub fn send(&self, msg: &ToWorker) -> Result<(), WorkerProcessError> {
        let channel = self.channel.as_ref().ok_or(WorkerProcessError::NoChannel)?;
        Self::sent(channel.send(msg))
    }

    /// Hands the worker a device with its descriptors, each by name (see
    /// [`Channel::send_device`]).
    pub fn send_device(
        &self,
        spec: &DeviceSpec,
        fds: &DeviceFds<BorrowedFd<'_>>,
    ) -> Result<(), WorkerProcessError> {
        let channel = self.channel.as_ref().ok_or(WorkerProcessError::NoChannel)?;
        Self::sent(channel.send_device(spec, fds))
    }

    fn sent(result: Result<(), ProtoError>) -> Result<(), WorkerProcessError> {
        match result {
            Ok(()) => Ok(()),
            Err(ProtoError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                Err(WorkerProcessError::Stuck)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Receives one message if one is waiting (`Ok(None)` otherwise). Every message is decoded
    /// and validated by the protocol crate; any error means the worker broke the protocol or
    /// closed the connection ([`ProtoError::Closed`], also for a reset connection).
    pub fn recv(&self) -> Result<Option<FromWorker>, WorkerProcessError> {
        let channel = self.channel.as_ref().ok_or(WorkerProcessError::NoChannel)?;
        match channel.recv::<FromWorker>() {
            // FromWorker messages carry no descriptors; the protocol crate refuses any that
            // come anyway, so the vector is empty here.
            Ok((msg, _fds)) => Ok(Some(msg)),
            Err(ProtoError::Io(e)) => match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                // A peer that closes with our messages unread resets the connection.
                io::ErrorKind::ConnectionReset => Err(ProtoError::Closed.into()),
                _ => Err(ProtoError::Io(e).into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// Closes the supervisor's end of the channel.
    pub fn close_channel(&mut self) {
        self.channel = None;
    }

    /// Sends SIGKILL (unless the process was already reaped) and closes the channel.
    ///
    /// The signal goes first: a worker must not see its channel close and get to run its own
    /// exit path before the kill lands.
    pub fn kill(&mut self) -> io::Result<()> {
        let result = if self.exit.is_some() {
            Ok(())
        } else {
            self.child.kill()
        };
        self.close_channel();
        result
    }

    /// Reaps the process if it has exited, without blocking.
    pub fn try_reap(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.exit {
            return Ok(Some(status));
        }
        let status = self.child.try_wait()?;
        if status.is_some() {
            self.exit = status;
        }
        Ok(status)
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if self.exit.is_none() {
            // Never leave a child behind; SIGKILL cannot be ignored, so the wait is short.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Marks every descriptor above the channel's close-on-exec, in the forked child before exec:
/// a descriptor the supervisor itself inherited without the flag must not reach a worker either.
/// (Marking rather than closing keeps the pipe the standard library uses to report a failed
/// `exec` working.)
///
/// Only async-signal-safe system calls: `close_range(CLOSE_RANGE_CLOEXEC)` (Linux 5.11), or one
/// `fcntl` per descriptor number on older kernels.
fn close_inherited_descriptors() {
    let first = (WORKER_CHANNEL_FD + 1) as libc::c_uint;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on descriptors of this
    // forked child.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc != 0 {
        for fd in (WORKER_CHANNEL_FD + 1)..4096 {
            // SAFETY: as above; on a number that is not open this is a harmless EBADF.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
}

/// The complete environment of a worker (the process contract in `tcmu_warden_proto::process`):
/// where its channel is, its log format, and `RUST_LOG` if the supervisor has one. Stage two of
/// the jail is not here: it travels in the worker's `Hello`.
fn worker_environment(log_format: Option<LogFormat>) -> Vec<(&'static str, OsString)> {
    let mut env = vec![(
        CHANNEL_FD_ENV,
        OsString::from(WORKER_CHANNEL_FD.to_string()),
    )];
    if let Some(v) = std::env::var_os("RUST_LOG") {
        env.push(("RUST_LOG", v));
    }
    match log_format {
        Some(f) => env.push((LOG_FORMAT_ENV, OsString::from(f.as_str()))),
        None => {
            if let Some(v) = std::env::var_os(LOG_FORMAT_ENV) {
                env.push((LOG_FORMAT_ENV, v));
            }
        }
    }
    env
}

/// Describes an exit status for logs: `exit code 3`, `killed by signal 9 (SIGKILL)`.
pub fn describe_exit(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("exit code {code}")
    } else if let Some(sig) = status.signal() {
        let name = nix::sys::signal::Signal::try_from(sig)
            .map(|s| s.as_str())
            .unwrap_or("unknown");
        let core = if status.core_dumped() {
            ", core dumped"
        } else {
            ""
        };
        format!("killed by signal {sig} ({name}{core})")
    } else {
        format!("{status}")
    }
}

/// Why a worker went down, for the crash log: the supervisor's own kill reason if it killed the
/// worker, `sandbox violation` for `SIGSYS` (the seccomp filter's answer to a forbidden system
/// call), else how it ended (`killed by signal 11 (SIGSEGV, core dumped)`, `exit code 3`).
pub fn classify_exit(status: ExitStatus, killed_for: Option<&str>) -> String {
    if let Some(why) = killed_for {
        return format!("killed by the supervisor: {why}");
    }
    match status.signal() {
        Some(libc::SIGSYS) => format!(
            "sandbox violation: {} for a forbidden system call",
            describe_exit(status)
        ),
        _ => describe_exit(status),
    }
}

/// Test and future-restart helper: whether `fd` is still an open descriptor of this process.
pub fn fd_is_open(fd: &OwnedFd) -> bool {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_descriptions() {
        assert_eq!(describe_exit(ExitStatus::from_raw(3 << 8)), "exit code 3");
        assert_eq!(
            describe_exit(ExitStatus::from_raw(libc::SIGKILL)),
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(libc::SIGSEGV | 0x80)),
            "killed by signal 11 (SIGSEGV, core dumped)"
        );
    }

    #[test]
    fn crash_causes() {
        assert_eq!(
            classify_exit(ExitStatus::from_raw(libc::SIGSYS | 0x80), None),
            "sandbox violation: killed by signal 31 (SIGSYS, core dumped) for a forbidden system call"
        );
        assert_eq!(
            classify_exit(ExitStatus::from_raw(2 << 8), None),
            "exit code 2"
        );
        assert_eq!(
            classify_exit(
                ExitStatus::from_raw(libc::SIGKILL),
                Some("no answer to a heartbeat")
            ),
            "killed by the supervisor: no answer to a heartbeat"
        );
    }

    #[test]
    fn environment_has_only_the_allowed_keys() {
        let env = worker_environment(Some(LogFormat::Json));
        for (k, _) in &env {
            assert!(
                [CHANNEL_FD_ENV, "RUST_LOG", LOG_FORMAT_ENV].contains(k),
                "unexpected {k}"
            );
        }
        assert!(env.contains(&(CHANNEL_FD_ENV, OsString::from("3"))));
        assert!(env.contains(&(LOG_FORMAT_ENV, OsString::from("json"))));
    }

    #[test]
    fn spawn_failure_names_the_executable() {
        let err =
            WorkerProcess::spawn(Path::new("/nonexistent/worker"), "w", None, None).unwrap_err();
        assert!(matches!(err, WorkerProcessError::Spawn { .. }));
        assert!(err.to_string().contains("/nonexistent/worker"), "{err}");
    }

    #[test]
    fn a_worker_that_exits_is_reaped_and_closes_the_channel() {
        // `true` exits at once without touching fd 3.
        let mut w = WorkerProcess::spawn(Path::new("/bin/true"), "t", None, None).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            if let Some(s) = w.try_reap().unwrap() {
                break s;
            }
            assert!(std::time::Instant::now() < deadline, "never exited");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert!(status.success());
        assert!(matches!(
            w.recv(),
            Err(WorkerProcessError::Proto(ProtoError::Closed))
        ));
        w.kill().unwrap();
        assert!(matches!(w.recv(), Err(WorkerProcessError::NoChannel)));
    }
}
