//! # The wire between the supervisor and its workers
//!
//! The supervisor (privileged, trusted) and each worker (confined, *untrusted*) talk over one
//! `SOCK_SEQPACKET` unix socket pair. Every datagram is one [`postcard`]-encoded [`Frame`]: a
//! protocol version and one message. Open file descriptors (the `/dev/uioN` of a device, the
//! backing file the supervisor opened on the worker's behalf, its journal) travel beside a
//! message as `SCM_RIGHTS` ancillary data; the message declares which ones come, and both sides
//! handle them by name ([`DeviceFds`]), never by position.
//!
//! This crate owns the whole contract between the supervisor and a worker process:
//! - how a worker is started ([`process`]: its channel descriptor, its environment, stage two of
//!   its jail),
//! - the message types ([`ToWorker`], [`FromWorker`]) and their field limits,
//! - the descriptors that travel with them, by name ([`DeviceFds`]),
//! - [`validate`](ToWorker::validate)-ion of every decoded message,
//! - [`Channel`], which sends and receives frames with their file descriptors.
//!
//! It must never trust a peer: every decode is bounded by [`MAX_MESSAGE_BYTES`], every received
//! file descriptor is owned (and made close-on-exec) at once, and a message whose descriptor count
//! does not match what it declares is an error, not a guess. Nothing here panics on peer input.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;

use sendfd::{RecvWithFd, SendWithFd};
use serde::{Deserialize, Serialize};

pub mod process;

pub use process::{SeccompMode, StageTwoRequest};

/// Version of this protocol. A worker built from another version is refused at the handshake.
///
/// History: 1 = the first wire; 2 = the in-flight journal ([`DeviceSpec::journal`], its
/// descriptor after the others), [`FromWorker::RecoveryFailed`], [`ToWorker::Reconfig`],
/// [`FromWorker::Reconfigured`], [`FromWorker::ReconfigFailed`], and validated
/// [`DeviceStats`] in [`FromWorker::Pong`]; 3 = stage two of the jail in [`ToWorker::Hello`]
/// ([`process::StageTwoRequest`]) instead of the `TCMU_WARDEN_JAIL` environment text; 4 = the
/// I/O pool's size in it ([`process::StageTwoRequest::io_threads`]).
pub const PROTOCOL_VERSION: u16 = 4;

/// Largest encoded frame either side accepts. Anything larger ends the conversation.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// Most file descriptors one message may carry.
pub const MAX_FDS: usize = 4;

/// Longest accepted name-like string (subtype, device name, uio name, unit serial).
pub const MAX_NAME_LEN: usize = 256;

/// Longest accepted cfgstring. The kernel's own limit for `dev_config` is 2048 bytes.
pub const MAX_CFGSTRING_LEN: usize = 4096;

/// Longest accepted free-text reason in a failure report.
pub const MAX_REASON_LEN: usize = 1024;

/// Most devices one worker may report statistics for in one message.
pub const MAX_DEVICES_PER_WORKER: usize = 256;

/// Exact size in bytes of a device's in-flight journal (see [`JournalMode`]): the supervisor
/// creates the file with this length, the worker refuses a journal of any other length. The
/// layout inside belongs to the worker's ring engine (`tcmu_warden_worker::ring::journal`),
/// which checks at compile time that it fills exactly this many bytes.
pub const JOURNAL_BYTES: u64 = 1024 + 512 * 1024;

/// What the worker is to do with a device's in-flight journal.
///
/// The journal is a small shared-memory file, one per device, in which the worker records what
/// it has taken off the command ring and not yet finished (see the worker's `ring::journal`).
/// It outlives the worker, and (kept under `/run`) the supervisor too, so that a successor can
/// finish exactly the commands the predecessor left in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JournalMode {
    /// No journal travels with the device: a crash of the worker can only be recovered by
    /// resetting the ring (every in-flight command answered BUSY).
    None,
    /// A freshly created (all-zero) journal: start at the ring's current tail and initialise
    /// the journal before fetching anything. Only for a ring no command waits in (nobody
    /// fetched from it, or it was just reset); otherwise answer [`FromWorker::RecoveryFailed`].
    Fresh,
    /// A journal a previous worker wrote: validate it against the ring, finish what it records,
    /// and resume. If it is inconsistent, answer [`FromWorker::RecoveryFailed`] and do not serve
    /// the device; the supervisor then resets the ring and sends it again with `Fresh`.
    Recover,
}

/// Errors of the wire.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The socket failed.
    #[error("socket I/O: {0}")]
    Io(#[from] io::Error),
    /// The peer closed its end.
    #[error("peer closed the connection")]
    Closed,
    /// A frame was larger than [`MAX_MESSAGE_BYTES`].
    #[error("message larger than {MAX_MESSAGE_BYTES} bytes")]
    Oversized,
    /// A frame did not decode.
    #[error("undecodable message: {0}")]
    Decode(#[from] postcard::Error),
    /// The peer speaks another protocol version.
    #[error("protocol version {got}, expected {PROTOCOL_VERSION}")]
    Version {
        /// The version the peer sent.
        got: u16,
    },
    /// A field is out of its allowed range.
    #[error("invalid field {field}: {why}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// The message came with another number of file descriptors than it declares.
    #[error("message carries {got} file descriptors, expected {expected}")]
    FdCount {
        /// Descriptors that arrived.
        got: usize,
        /// Descriptors the message declares.
        expected: usize,
    },
}

/// Everything a worker needs to know about one TCMU device. Sent with [`ToWorker::AddDevice`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSpec {
    /// Supervisor-assigned identifier, unique for the supervisor's lifetime.
    pub id: u64,
    /// The UIO device, e.g. `uio0`.
    pub uio: String,
    /// The LIO HBA index (`user_<hba>` in configfs).
    pub hba: u32,
    /// The backstore's name in configfs.
    pub name: String,
    /// The handler subtype (`file`, `ram`, ...).
    pub subtype: String,
    /// The handler-specific configuration string.
    pub cfgstring: String,
    /// Exact length of the UIO mapping (`maps/map0/size`).
    pub map_size: u64,
    /// Device size in bytes (`attrib/dev_size`).
    pub dev_size: u64,
    /// Logical block size in bytes (`attrib/hw_block_size`).
    pub block_size: u32,
    /// Largest transfer in blocks (`attrib/hw_max_sectors`).
    pub max_sectors: u32,
    /// Whether the device advertises a volatile write cache (`attrib/emulate_write_cache`).
    pub write_cache: bool,
    /// The unit serial number (`wwn/vpd_unit_serial`), used for VPD pages 0x80 and 0x83.
    pub unit_serial: String,
    /// Whether a backing-store descriptor follows the UIO descriptor.
    pub has_backing_fd: bool,
    /// Set when the policy refuses this device: the worker must not open any handler for it and
    /// completes every command with NOT READY sense, so initiators fail fast instead of timing out.
    pub refusal: Option<String>,
    /// The in-flight journal: unless [`JournalMode::None`], its descriptor (a file of exactly
    /// [`JOURNAL_BYTES`] bytes) comes last.
    pub journal: JournalMode,
}

impl DeviceSpec {
    /// How many file descriptors accompany an [`ToWorker::AddDevice`] for this spec: the UIO
    /// device, then the backing store if [`DeviceSpec::has_backing_fd`], then the journal unless
    /// [`DeviceSpec::journal`] is [`JournalMode::None`].
    pub fn fd_count(&self) -> usize {
        1 + usize::from(self.has_backing_fd) + usize::from(self.journal != JournalMode::None)
    }

    /// Checks every field against its limits.
    pub fn validate(&self) -> Result<(), ProtoError> {
        check_name("uio", &self.uio)?;
        check_name("name", &self.name)?;
        check_name("subtype", &self.subtype)?;
        check_name("unit_serial", &self.unit_serial)?;
        check_len("cfgstring", &self.cfgstring, MAX_CFGSTRING_LEN)?;
        if !(512..=65536).contains(&self.block_size) || !self.block_size.is_power_of_two() {
            return Err(invalid(
                "block_size",
                format!("{} is not a power of two in 512..=65536", self.block_size),
            ));
        }
        if self.max_sectors == 0 {
            return Err(invalid("max_sectors", "must be at least 1".into()));
        }
        if self.map_size < 4096 || self.map_size > (1 << 40) {
            return Err(invalid(
                "map_size",
                format!("{} is out of range", self.map_size),
            ));
        }
        if let Some(why) = &self.refusal {
            check_len("refusal", why, MAX_REASON_LEN)?;
            if self.has_backing_fd {
                return Err(invalid(
                    "has_backing_fd",
                    "a refused device has no backing store".into(),
                ));
            }
        }
        if self.dev_size < u64::from(self.block_size) {
            return Err(invalid(
                "dev_size",
                format!("{} holds no whole block", self.dev_size),
            ));
        }
        Ok(())
    }
}

/// Per-device counters a worker reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStats {
    /// The device.
    pub id: u64,
    /// Commands completed.
    pub commands: u64,
    /// Commands completed with a status other than GOOD.
    pub errors: u64,
    /// Bytes read by initiators.
    pub bytes_read: u64,
    /// Bytes written by initiators.
    pub bytes_written: u64,
}

impl DeviceStats {
    /// Checks the counters for consistency: a command that failed was also completed.
    pub fn validate(&self) -> Result<(), ProtoError> {
        if self.errors > self.commands {
            return Err(invalid(
                "stats",
                format!(
                    "device {}: {} errors out of {} commands",
                    self.id, self.errors, self.commands
                ),
            ));
        }
        Ok(())
    }
}

/// Messages from the supervisor to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// First message: the supervisor's version and the worker's assignment.
    Hello {
        /// Name the supervisor gives this worker (for logs).
        worker: String,
        /// Subtypes this worker is to serve.
        subtypes: Vec<String>,
        /// Stage two of the worker's jail, which it installs before it answers (and so before
        /// any device is served). `None` only when the supervisor runs without jails
        /// (`--no-jail`, a debugging aid).
        jail: Option<StageTwoRequest>,
    },
    /// Serve a device. Carries [`DeviceSpec::fd_count`] descriptors: the UIO device, then the
    /// backing store if [`DeviceSpec::has_backing_fd`].
    AddDevice(DeviceSpec),
    /// Stop serving a device and close its descriptors.
    RemoveDevice {
        /// The device.
        id: u64,
    },
    /// The kernel changed a served device's size or write-cache setting (LIO's
    /// `RECONFIG_DEVICE`). Answered with [`FromWorker::Reconfigured`] once the change is in
    /// effect, or [`FromWorker::ReconfigFailed`]. At least one field is set.
    Reconfig {
        /// The device.
        id: u64,
        /// The new device size in bytes: the handler is resized first, then READ CAPACITY
        /// reports the new size and initiators get a CAPACITY DATA HAS CHANGED unit attention.
        dev_size: Option<u64>,
        /// The new volatile write-cache setting (WCE).
        write_cache: Option<bool>,
    },
    /// Liveness probe; answered with [`FromWorker::Pong`].
    Ping {
        /// Echoed back.
        seq: u64,
    },
    /// Finish in-flight commands and exit.
    Shutdown,
}

/// Messages from a worker to the supervisor. Every one is untrusted input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromWorker {
    /// Answer to [`ToWorker::Hello`].
    Hello {
        /// The worker's process id as it sees it.
        pid: u32,
        /// Subtypes the worker can serve.
        subtypes: Vec<String>,
    },
    /// The device is mapped and being served.
    DeviceReady {
        /// The device.
        id: u64,
    },
    /// The device could not be served.
    DeviceFailed {
        /// The device.
        id: u64,
        /// Why, for the log.
        reason: String,
    },
    /// The device was released after [`ToWorker::RemoveDevice`].
    DeviceRemoved {
        /// The device.
        id: u64,
    },
    /// The worker cannot serve the device's ring as it is: it came with [`JournalMode::Recover`]
    /// and its journal does not agree with the ring (or cannot be used), or it came without a
    /// journal to recover from ([`JournalMode::Fresh`] or [`JournalMode::None`]) and commands
    /// already wait in the ring, which someone else fetched from. The worker serves nothing for
    /// it; the supervisor resets the ring (every in-flight command completes BUSY) and sends the
    /// device again.
    RecoveryFailed {
        /// The device.
        id: u64,
        /// What was inconsistent, for the log.
        reason: String,
    },
    /// A [`ToWorker::Reconfig`] is in effect.
    Reconfigured {
        /// The device.
        id: u64,
    },
    /// A [`ToWorker::Reconfig`] could not be applied; the device keeps its previous settings.
    ReconfigFailed {
        /// The device.
        id: u64,
        /// Why, for the log.
        reason: String,
    },
    /// Answer to [`ToWorker::Ping`], with counters.
    Pong {
        /// The probe's sequence number.
        seq: u64,
        /// Counters of every device the worker serves.
        stats: Vec<DeviceStats>,
    },
}

fn invalid(field: &'static str, why: String) -> ProtoError {
    ProtoError::Invalid { field, why }
}

fn check_len(field: &'static str, s: &str, max: usize) -> Result<(), ProtoError> {
    if s.len() > max {
        return Err(invalid(
            field,
            format!("{} bytes, at most {max} allowed", s.len()),
        ));
    }
    if s.chars().any(|c| c == '\0') {
        return Err(invalid(field, "contains a NUL byte".into()));
    }
    Ok(())
}

fn check_name(field: &'static str, s: &str) -> Result<(), ProtoError> {
    check_len(field, s, MAX_NAME_LEN)?;
    if s.chars().any(char::is_control) {
        return Err(invalid(field, "contains control characters".into()));
    }
    Ok(())
}

/// A message type that can be checked after decoding and says how many descriptors it carries.
pub trait Message: Serialize + for<'de> Deserialize<'de> {
    /// Checks every field against its limits.
    fn validate(&self) -> Result<(), ProtoError>;
    /// How many file descriptors travel with this message.
    fn fd_count(&self) -> usize;
}

impl Message for ToWorker {
    fn validate(&self) -> Result<(), ProtoError> {
        match self {
            ToWorker::Hello {
                worker,
                subtypes,
                jail,
            } => {
                check_name("worker", worker)?;
                if subtypes.len() > 64 {
                    return Err(invalid("subtypes", "more than 64".into()));
                }
                subtypes
                    .iter()
                    .try_for_each(|s| check_name("subtypes", s))?;
                jail.as_ref().map_or(Ok(()), StageTwoRequest::validate)
            }
            ToWorker::AddDevice(spec) => spec.validate(),
            ToWorker::Reconfig {
                dev_size,
                write_cache,
                ..
            } => {
                if dev_size.is_none() && write_cache.is_none() {
                    return Err(invalid("reconfig", "changes nothing".into()));
                }
                if dev_size.is_some_and(|n| n < 512) {
                    return Err(invalid(
                        "dev_size",
                        "smaller than the smallest block size (512)".into(),
                    ));
                }
                Ok(())
            }
            ToWorker::RemoveDevice { .. } | ToWorker::Ping { .. } | ToWorker::Shutdown => Ok(()),
        }
    }

    fn fd_count(&self) -> usize {
        match self {
            ToWorker::AddDevice(spec) => spec.fd_count(),
            _ => 0,
        }
    }
}

impl Message for FromWorker {
    fn validate(&self) -> Result<(), ProtoError> {
        match self {
            FromWorker::Hello { subtypes, .. } => {
                if subtypes.len() > 64 {
                    return Err(invalid("subtypes", "more than 64".into()));
                }
                subtypes.iter().try_for_each(|s| check_name("subtypes", s))
            }
            FromWorker::DeviceFailed { reason, .. }
            | FromWorker::RecoveryFailed { reason, .. }
            | FromWorker::ReconfigFailed { reason, .. } => {
                check_len("reason", reason, MAX_REASON_LEN)
            }
            FromWorker::Pong { stats, .. } => {
                if stats.len() > MAX_DEVICES_PER_WORKER {
                    return Err(invalid("stats", format!("{} entries", stats.len())));
                }
                let mut ids: Vec<u64> = stats.iter().map(|s| s.id).collect();
                ids.sort_unstable();
                if ids.windows(2).any(|w| w.first() == w.get(1)) {
                    return Err(invalid("stats", "a device is reported twice".into()));
                }
                stats.iter().try_for_each(DeviceStats::validate)
            }
            FromWorker::DeviceReady { .. }
            | FromWorker::DeviceRemoved { .. }
            | FromWorker::Reconfigured { .. } => Ok(()),
        }
    }

    fn fd_count(&self) -> usize {
        0
    }
}

/// One datagram on the wire.
#[derive(Debug, Serialize, Deserialize)]
struct Frame<T> {
    version: u16,
    body: T,
}

/// Encodes a message into one frame. Fails if the frame would exceed [`MAX_MESSAGE_BYTES`].
pub fn encode<T: Message>(msg: &T) -> Result<Vec<u8>, ProtoError> {
    msg.validate()?;
    let frame = Frame {
        version: PROTOCOL_VERSION,
        body: msg,
    };
    let bytes = postcard::to_stdvec(&frame)?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(ProtoError::Oversized);
    }
    Ok(bytes)
}

/// Decodes and validates one frame. Never panics, whatever the bytes.
pub fn decode<T: Message>(bytes: &[u8]) -> Result<T, ProtoError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(ProtoError::Oversized);
    }
    let (frame, rest): (Frame<T>, &[u8]) = postcard::take_from_bytes(bytes)?;
    if frame.version != PROTOCOL_VERSION {
        return Err(ProtoError::Version { got: frame.version });
    }
    if !rest.is_empty() {
        return Err(invalid("frame", format!("{} trailing bytes", rest.len())));
    }
    frame.body.validate()?;
    Ok(frame.body)
}

/// One end of a supervisor–worker connection: a `SOCK_SEQPACKET` unix socket.
///
/// The socket is held as a [`UnixDatagram`] only because that is the std type the `sendfd` crate
/// sends and receives descriptors on; with `SOCK_SEQPACKET` underneath, `send`/`recvmsg` keep
/// message boundaries exactly as they do for datagrams, and the connection is reliable and ordered.
#[derive(Debug)]
pub struct Channel {
    sock: UnixDatagram,
}

impl Channel {
    /// A connected pair of channels (close-on-exec on both ends).
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two ints for socketpair to fill.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socketpair succeeded, so both descriptors are open and owned by nobody else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((Channel::from_fd(a), Channel::from_fd(b)))
    }

    /// Wraps an already connected `SOCK_SEQPACKET` socket (e.g. inherited by a worker).
    pub fn from_fd(fd: OwnedFd) -> Channel {
        Channel {
            sock: UnixDatagram::from(fd),
        }
    }

    /// The underlying descriptor (for polling).
    pub fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Borrowed descriptor.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Sets or clears non-blocking mode.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.sock.set_nonblocking(on)
    }

    /// Sets a receive timeout (`None`: block forever).
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(t)
    }

    /// Sends one message that carries no descriptors (every message but
    /// [`ToWorker::AddDevice`], which goes with [`Channel::send_device`]).
    pub fn send<T: Message>(&self, msg: &T) -> Result<(), ProtoError> {
        self.send_with(msg, &[])
    }

    /// Sends [`ToWorker::AddDevice`] for `spec` with its descriptors, each named. They must be
    /// the ones `spec` declares: a backing store exactly when [`DeviceSpec::has_backing_fd`], a
    /// journal exactly when [`DeviceSpec::journal`] is not [`JournalMode::None`].
    pub fn send_device(
        &self,
        spec: &DeviceSpec,
        fds: &DeviceFds<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<(), ProtoError> {
        if fds.backing.is_some() != spec.has_backing_fd {
            return Err(invalid(
                "has_backing_fd",
                format!(
                    "declares {}, a backing descriptor is {}",
                    spec.has_backing_fd,
                    if fds.backing.is_some() {
                        "given"
                    } else {
                        "missing"
                    }
                ),
            ));
        }
        if fds.journal.is_some() != (spec.journal != JournalMode::None) {
            return Err(invalid(
                "journal",
                format!(
                    "mode {:?}, a journal descriptor is {}",
                    spec.journal,
                    if fds.journal.is_some() {
                        "given"
                    } else {
                        "missing"
                    }
                ),
            ));
        }
        self.send_with(&ToWorker::AddDevice(spec.clone()), &fds.in_wire_order())
    }

    fn send_with<T: Message>(
        &self,
        msg: &T,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), ProtoError> {
        if fds.len() != msg.fd_count() {
            return Err(ProtoError::FdCount {
                got: fds.len(),
                expected: msg.fd_count(),
            });
        }
        let bytes = encode(msg)?;
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let sent = if raw.is_empty() {
            self.sock.send(&bytes)?
        } else {
            self.sock.send_with_fd(&bytes, &raw)?
        };
        if sent != bytes.len() {
            return Err(ProtoError::Io(io::Error::new(
                io::ErrorKind::WriteZero,
                "short send",
            )));
        }
        Ok(())
    }

    /// Receives one message and the descriptors that came with it, validated.
    ///
    /// Every descriptor is owned and made close-on-exec before anything else looks at the message,
    /// so an error path never leaks one. The descriptors come unnamed ([`Fds`]); the receiver of
    /// an [`ToWorker::AddDevice`] names them with [`DeviceFds::claim`].
    pub fn recv<T: Message>(&self) -> Result<(T, Fds), ProtoError> {
        let mut buf = vec![0u8; MAX_MESSAGE_BYTES + 1];
        let mut raw = [-1 as RawFd; MAX_FDS + 1];
        let (n, nfds) = self.sock.recv_with_fd(&mut buf, &mut raw)?;
        let mut fds = Vec::with_capacity(nfds);
        for &fd in raw.iter().take(nfds) {
            if fd >= 0 {
                // SAFETY: the kernel just installed this descriptor in our table for us alone.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                set_cloexec(&owned)?;
                fds.push(owned);
            }
        }
        if n == 0 && nfds == 0 {
            return Err(ProtoError::Closed);
        }
        if n > MAX_MESSAGE_BYTES {
            return Err(ProtoError::Oversized);
        }
        let msg: T = decode(buf.get(..n).unwrap_or_default())?;
        if fds.len() != msg.fd_count() {
            return Err(ProtoError::FdCount {
                got: fds.len(),
                expected: msg.fd_count(),
            });
        }
        Ok((msg, Fds(fds)))
    }
}

/// The descriptors that travel with [`ToWorker::AddDevice`], each by name. On the wire they are
/// `SCM_RIGHTS` ancillary data in one fixed order, which only this type knows: nobody on either
/// side picks "the second descriptor".
#[derive(Debug)]
pub struct DeviceFds<F> {
    /// The device's `/dev/uioN`: the ring's mapping and its wake-ups.
    pub uio: F,
    /// The backing store the supervisor opened (subtypes with `backing = "fd"`), if any.
    pub backing: Option<F>,
    /// The in-flight journal (a file of exactly [`JOURNAL_BYTES`]), unless the spec's
    /// [`DeviceSpec::journal`] is [`JournalMode::None`].
    pub journal: Option<F>,
}

impl<'a> DeviceFds<std::os::fd::BorrowedFd<'a>> {
    fn in_wire_order(&self) -> Vec<std::os::fd::BorrowedFd<'a>> {
        std::iter::once(self.uio)
            .chain(self.backing)
            .chain(self.journal)
            .collect()
    }
}

impl DeviceFds<OwnedFd> {
    /// Names the descriptors that came with `spec`'s [`ToWorker::AddDevice`], as the spec
    /// declares them. A count that does not match is an error (and the descriptors are closed).
    pub fn claim(spec: &DeviceSpec, fds: Fds) -> Result<DeviceFds<OwnedFd>, ProtoError> {
        let expected = spec.fd_count();
        let got = fds.len();
        if got != expected {
            return Err(ProtoError::FdCount { got, expected });
        }
        let mut it = fds.0.into_iter();
        let uio = it.next().ok_or(ProtoError::FdCount { got, expected })?;
        let backing = if spec.has_backing_fd {
            Some(it.next().ok_or(ProtoError::FdCount { got, expected })?)
        } else {
            None
        };
        let journal = if spec.journal == JournalMode::None {
            None
        } else {
            Some(it.next().ok_or(ProtoError::FdCount { got, expected })?)
        };
        Ok(DeviceFds {
            uio,
            backing,
            journal,
        })
    }
}

/// Descriptors received with a message and not yet named. Dropping it closes them; only the
/// message's own descriptor type ([`DeviceFds::claim`]) opens it.
#[derive(Debug, Default)]
pub struct Fds(Vec<OwnedFd>);

impl Fds {
    /// How many arrived.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none arrived.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with an integer argument.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    fn spec() -> DeviceSpec {
        DeviceSpec {
            id: 7,
            uio: "uio0".into(),
            hba: 1,
            name: "disk0".into(),
            subtype: "file".into(),
            cfgstring: "/var/lib/img".into(),
            map_size: 1 << 30,
            dev_size: 1 << 30,
            block_size: 512,
            max_sectors: 128,
            write_cache: false,
            unit_serial: "abc".into(),
            has_backing_fd: true,
            refusal: None,
            journal: JournalMode::None,
        }
    }

    fn read_back(fd: OwnedFd) -> String {
        let mut f = std::fs::File::from(fd);
        f.rewind().unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn roundtrip_with_descriptors() {
        let (a, b) = Channel::pair().unwrap();
        let mut f1 = tempfile::tempfile().unwrap();
        let mut f2 = tempfile::tempfile().unwrap();
        f1.write_all(b"hello").unwrap();
        f2.write_all(b"backing").unwrap();
        let sp = spec();
        a.send_device(
            &sp,
            &DeviceFds {
                uio: f1.as_fd(),
                backing: Some(f2.as_fd()),
                journal: None,
            },
        )
        .unwrap();
        let (got, fds): (ToWorker, _) = b.recv().unwrap();
        assert_eq!(got, ToWorker::AddDevice(sp.clone()));
        assert_eq!(fds.len(), 2);
        let named = DeviceFds::claim(&sp, fds).unwrap();
        assert!(named.journal.is_none());
        // SAFETY: F_GETFD on an owned descriptor.
        let flags = unsafe { libc::fcntl(named.uio.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        assert_eq!(read_back(named.uio), "hello");
        assert_eq!(read_back(named.backing.unwrap()), "backing");
    }

    #[test]
    fn descriptors_must_match_what_the_spec_declares() {
        let (a, _b) = Channel::pair().unwrap();
        let f = tempfile::tempfile().unwrap();
        let sp = spec();
        // The spec declares a backing store: sending without one is refused, and so is a
        // journal the spec does not declare.
        let missing = a.send_device(
            &sp,
            &DeviceFds {
                uio: f.as_fd(),
                backing: None,
                journal: None,
            },
        );
        assert!(matches!(
            missing,
            Err(ProtoError::Invalid {
                field: "has_backing_fd",
                ..
            })
        ));
        let extra = a.send_device(
            &sp,
            &DeviceFds {
                uio: f.as_fd(),
                backing: Some(f.as_fd()),
                journal: Some(f.as_fd()),
            },
        );
        assert!(matches!(
            extra,
            Err(ProtoError::Invalid {
                field: "journal",
                ..
            })
        ));
        // A message that declares descriptors cannot go without them.
        assert!(matches!(
            a.send(&ToWorker::AddDevice(sp)),
            Err(ProtoError::FdCount {
                got: 0,
                expected: 2
            })
        ));
    }

    #[test]
    fn descriptor_count_mismatch_is_refused() {
        let (a, b) = Channel::pair().unwrap();
        // Bypass the send-side check by encoding by hand.
        let bytes = encode(&ToWorker::AddDevice(spec())).unwrap();
        a.sock.send(&bytes).unwrap();
        let err = b.recv::<ToWorker>().unwrap_err();
        assert!(
            matches!(
                err,
                ProtoError::FdCount {
                    got: 0,
                    expected: 2
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        let (a, b) = Channel::pair().unwrap();
        a.sock.send(&vec![0xffu8; MAX_MESSAGE_BYTES + 100]).unwrap();
        assert!(matches!(b.recv::<FromWorker>(), Err(ProtoError::Oversized)));
        a.sock.send(&[1, 2, 3, 250, 250, 250]).unwrap();
        assert!(b.recv::<FromWorker>().is_err());
        drop(a);
        assert!(matches!(b.recv::<FromWorker>(), Err(ProtoError::Closed)));
    }

    #[test]
    fn wrong_version_is_refused() {
        let frame = Frame {
            version: PROTOCOL_VERSION + 1,
            body: FromWorker::DeviceReady { id: 1 },
        };
        let bytes = postcard::to_stdvec(&frame).unwrap();
        assert!(matches!(
            decode::<FromWorker>(&bytes),
            Err(ProtoError::Version { .. })
        ));
    }

    fn frame<T: Serialize>(body: T) -> Vec<u8> {
        postcard::to_stdvec(&Frame {
            version: PROTOCOL_VERSION,
            body,
        })
        .unwrap()
    }

    #[test]
    fn reconfig_round_trips_and_is_validated() {
        let msg = ToWorker::Reconfig {
            id: 3,
            dev_size: Some(2 << 30),
            write_cache: None,
        };
        assert_eq!(decode::<ToWorker>(&encode(&msg).unwrap()).unwrap(), msg);
        let empty = ToWorker::Reconfig {
            id: 3,
            dev_size: None,
            write_cache: None,
        };
        assert!(encode(&empty).is_err());
        assert!(decode::<ToWorker>(&frame(&empty)).is_err());
        let tiny = ToWorker::Reconfig {
            id: 3,
            dev_size: Some(100),
            write_cache: Some(true),
        };
        assert!(decode::<ToWorker>(&frame(&tiny)).is_err());
        for ok in [
            FromWorker::Reconfigured { id: 3 },
            FromWorker::ReconfigFailed {
                id: 3,
                reason: "no space".into(),
            },
        ] {
            assert_eq!(decode::<FromWorker>(&encode(&ok).unwrap()).unwrap(), ok);
        }
        let long = FromWorker::ReconfigFailed {
            id: 3,
            reason: "z".repeat(MAX_REASON_LEN + 1),
        };
        assert!(decode::<FromWorker>(&frame(&long)).is_err());
    }

    #[test]
    fn pong_statistics_are_validated() {
        let stat = |id, commands, errors| DeviceStats {
            id,
            commands,
            errors,
            ..DeviceStats::default()
        };
        let good = FromWorker::Pong {
            seq: 9,
            stats: vec![stat(1, 10, 2), stat(2, 0, 0)],
        };
        assert_eq!(decode::<FromWorker>(&frame(&good)).unwrap(), good);
        let twice = FromWorker::Pong {
            seq: 9,
            stats: vec![stat(1, 10, 2), stat(1, 10, 2)],
        };
        assert!(decode::<FromWorker>(&frame(&twice)).is_err());
        let impossible = FromWorker::Pong {
            seq: 9,
            stats: vec![stat(1, 1, 2)],
        };
        assert!(decode::<FromWorker>(&frame(&impossible)).is_err());
        let too_many = FromWorker::Pong {
            seq: 9,
            stats: (0..=MAX_DEVICES_PER_WORKER as u64)
                .map(|i| stat(i, 0, 0))
                .collect(),
        };
        assert!(decode::<FromWorker>(&frame(&too_many)).is_err());
    }

    #[test]
    fn journal_descriptor_comes_last() {
        let (a, b) = Channel::pair().unwrap();
        let mut s = spec();
        s.journal = JournalMode::Recover;
        assert_eq!(s.fd_count(), 3);
        s.has_backing_fd = false;
        assert_eq!(s.fd_count(), 2);
        let mut uio = tempfile::tempfile().unwrap();
        let mut journal = tempfile::tempfile().unwrap();
        uio.write_all(b"uio").unwrap();
        journal.write_all(b"journal").unwrap();
        let msg = ToWorker::AddDevice(s.clone());
        a.send_device(
            &s,
            &DeviceFds {
                uio: uio.as_fd(),
                backing: None,
                journal: Some(journal.as_fd()),
            },
        )
        .unwrap();
        let (got, fds): (ToWorker, _) = b.recv().unwrap();
        assert_eq!(got, msg);
        let named = DeviceFds::claim(&s, fds).unwrap();
        assert!(named.backing.is_none());
        assert_eq!(read_back(named.uio), "uio");
        assert_eq!(read_back(named.journal.unwrap()), "journal");
        // A journal-carrying spec sent with one descriptor too few is refused on receipt.
        let bytes = encode(&msg).unwrap();
        a.sock.send_with_fd(&bytes, &[uio.as_raw_fd()]).unwrap();
        assert!(matches!(
            b.recv::<ToWorker>(),
            Err(ProtoError::FdCount {
                got: 1,
                expected: 2
            })
        ));
    }

    #[test]
    fn recovery_failed_is_bounded_like_other_reasons() {
        let ok = FromWorker::RecoveryFailed {
            id: 3,
            reason: "fetch position outside the ring".into(),
        };
        assert_eq!(decode::<FromWorker>(&encode(&ok).unwrap()).unwrap(), ok);
        let long = FromWorker::RecoveryFailed {
            id: 3,
            reason: "z".repeat(MAX_REASON_LEN + 1),
        };
        assert!(encode(&long).is_err());
        let bytes = postcard::to_stdvec(&Frame {
            version: PROTOCOL_VERSION,
            body: long,
        })
        .unwrap();
        assert!(matches!(
            decode::<FromWorker>(&bytes),
            Err(ProtoError::Invalid {
                field: "reason",
                ..
            })
        ));
    }

    proptest::proptest! {
        /// Whatever bytes a worker sends, decoding returns (never panics), and anything that
        /// decodes is valid and re-encodes to a frame that decodes to the same message.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Ok(msg) = decode::<FromWorker>(&bytes) {
                proptest::prop_assert!(msg.validate().is_ok());
                let again = encode(&msg).unwrap();
                proptest::prop_assert_eq!(decode::<FromWorker>(&again).unwrap(), msg);
            }
            let _ = decode::<ToWorker>(&bytes);
        }

        /// Prefixing valid frames with the version and mutating single bytes never panics.
        #[test]
        fn mutated_valid_frames_never_panic(at in 0usize..64, byte in proptest::prelude::any::<u8>()) {
            for msg in [
                FromWorker::Pong { seq: 9, stats: vec![DeviceStats { id: 1, ..DeviceStats::default() }] },
                FromWorker::RecoveryFailed { id: 2, reason: "why".into() },
                FromWorker::Hello { pid: 5, subtypes: vec!["file".into()] },
            ] {
                let mut bytes = encode(&msg).unwrap();
                if let Some(b) = bytes.get_mut(at) {
                    *b = byte;
                }
                let _ = decode::<FromWorker>(&bytes);
            }
        }
    }

    #[test]
    fn hello_carries_stage_two_and_refuses_a_bad_list() {
        let (a, b) = Channel::pair().unwrap();
        let hello = ToWorker::Hello {
            worker: "file".into(),
            subtypes: vec!["file".into()],
            jail: Some(StageTwoRequest {
                action: SeccompMode::Log,
                syscalls: vec!["fsync".into()],
                io_threads: None,
            }),
        };
        a.send(&hello).unwrap();
        assert_eq!(b.recv::<ToWorker>().unwrap().0, hello);
        let bad = ToWorker::Hello {
            worker: "file".into(),
            subtypes: vec![],
            jail: Some(StageTwoRequest {
                action: SeccompMode::Kill,
                syscalls: vec!["read;write".into()],
                io_threads: None,
            }),
        };
        let bytes = postcard::to_stdvec(&Frame {
            version: PROTOCOL_VERSION,
            body: bad,
        })
        .unwrap();
        assert!(matches!(
            decode::<ToWorker>(&bytes),
            Err(ProtoError::Invalid {
                field: "jail.syscalls",
                ..
            })
        ));
    }

    #[test]
    fn field_limits_are_enforced() {
        let mut s = spec();
        s.block_size = 1000;
        assert!(s.validate().is_err());
        let mut s = spec();
        s.cfgstring = "x".repeat(MAX_CFGSTRING_LEN + 1);
        assert!(s.validate().is_err());
        let long = FromWorker::DeviceFailed {
            id: 1,
            reason: "y".repeat(MAX_REASON_LEN + 1),
        };
        let bytes = postcard::to_stdvec(&Frame {
            version: PROTOCOL_VERSION,
            body: long,
        })
        .unwrap();
        assert!(decode::<FromWorker>(&bytes).is_err());
    }
}
