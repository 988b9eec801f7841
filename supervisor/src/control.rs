//! # The control socket and `tcmu-warden status`
//!
//! The daemon listens on a unix stream socket (`[daemon] control_socket`, default
//! `/run/tcmu-warden/control.sock`, created mode 0600 in a 0700 directory). Only root may talk
//! to it: every connection's peer credentials (`SO_PEERCRED`) are checked at accept, and a peer
//! whose uid is neither 0 nor the daemon's own is dropped.
//!
//! The protocol is newline-delimited JSON: one request object per line, answered by one response
//! object per line, in order.
//!
//! ```text
//! → {"request":"status"}
//! ← {"ok":true,"status":{"daemon":{...},"policy":{...},"devices":[...],"workers":[...]}}
//! → {"request":"version"}
//! ← {"ok":true,"version":"0.1.0"}
//! → {"request":"lift_quarantine","worker":"file"}
//! ← {"ok":true,"lift":{"worker":"file","devices":["uio0 (user_1/disk0)"]}}
//! → {"request":"lift_quarantine","worker":"ram"}
//! ← {"ok":false,"error":"worker \"ram\" is not quarantined"}
//! → {"request":"reboot"}
//! ← {"ok":false,"error":"unknown variant `reboot`, expected one of `status`, `version`, `lift_quarantine`"}
//! ```
//!
//! `lift_quarantine` (what `tcmu-warden quarantine lift <worker>` sends) lifts the quarantine of
//! a worker that crashed too often (see [`crate::daemon::quarantine`]). Its `worker` field is
//! required there and refused on the other requests; it must be a worker name as the status
//! report shows it: 1 to [`MAX_NAME_LEN`] bytes, no control characters.
//!
//! Limits: a request line is at most [`MAX_REQUEST`] bytes (a longer one is answered with an
//! error and the connection closed), at most [`MAX_CONNECTIONS`] connections are open at once,
//! and a connection idle for [`IDLE_TIMEOUT`] is closed. The server never blocks: the daemon's
//! event loop polls the listener and each connection, and answers are queued and written as the
//! peer reads them.
//!
//! This module owns the socket, the request decoding ([`parse_request`], total: never panics;
//! [`fuzz`] runs it), the report schema ([`StatusReport`]), the client ([`query`]) and the
//! human rendering ([`render_status`]). It never builds a report itself: the daemon does.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::PollFlags;
use serde::{Deserialize, Serialize};
use tcmu_warden_policy::format_size;
use tcmu_warden_proto::MAX_NAME_LEN;

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 4096;
/// Longest response a client accepts.
pub const MAX_RESPONSE: usize = 16 << 20;
/// Most connections open at once; more are refused.
pub const MAX_CONNECTIONS: usize = 8;
/// A connection that sends nothing (or reads nothing) for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which descriptor of the control server is ready: the listening socket, or the connection
/// with this id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlToken {
    /// The listening socket (a connection to accept).
    Listener,
    /// An accepted connection.
    Conn(u64),
}

/// Errors of the control socket, server or client side.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A socket or file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Another daemon answers on the socket.
    #[error("another daemon is listening on {}", .0.display())]
    InUse(PathBuf),
    /// The daemon's answer is not valid.
    #[error("bad answer from the daemon: {0}")]
    BadAnswer(String),
    /// The daemon answered with an error.
    #[error("the daemon says: {0}")]
    Refused(String),
}

/// Why a request line was refused (the client is told this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The line is longer than [`MAX_REQUEST`].
    #[error("request longer than {MAX_REQUEST} bytes")]
    TooLong,
    /// Not a request object (serde's own words: unknown request, field or type).
    #[error("{0}")]
    Malformed(String),
    /// `worker` given with a request that takes none.
    #[error("`worker` is only accepted with `lift_quarantine`")]
    UnexpectedWorker,
    /// `lift_quarantine` without a `worker`.
    #[error("`lift_quarantine` needs a `worker`")]
    MissingWorker,
    /// The worker name is empty.
    #[error("the worker name is empty")]
    EmptyWorkerName,
    /// The worker name is too long.
    #[error("the worker name is longer than {MAX_NAME_LEN} bytes")]
    LongWorkerName,
    /// The worker name holds control characters.
    #[error("the worker name holds control characters")]
    ControlInWorkerName,
}

/// A request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The full status report.
    Status,
    /// The daemon's version.
    Version,
    /// Lift the quarantine of the worker with this name.
    LiftQuarantine {
        /// The worker's name, as the status report shows it.
        worker: String,
    },
}

/// What a request line names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Status,
    Version,
    LiftQuarantine,
}

/// A request line: `{"request": "<name>"}`, plus `"worker"` for `lift_quarantine`, and nothing
/// else.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    request: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    worker: Option<String>,
}

impl Envelope {
    fn of(request: &Request) -> Envelope {
        match request {
            Request::Status => Envelope {
                request: Kind::Status,
                worker: None,
            },
            Request::Version => Envelope {
                request: Kind::Version,
                worker: None,
            },
            Request::LiftQuarantine { worker } => Envelope {
                request: Kind::LiftQuarantine,
                worker: Some(worker.clone()),
            },
        }
    }

    fn into_request(self) -> Result<Request, RequestError> {
        match (self.request, self.worker) {
            (Kind::Status, None) => Ok(Request::Status),
            (Kind::Version, None) => Ok(Request::Version),
            (Kind::Status | Kind::Version, Some(_)) => Err(RequestError::UnexpectedWorker),
            (Kind::LiftQuarantine, None) => Err(RequestError::MissingWorker),
            (Kind::LiftQuarantine, Some(worker)) => {
                check_worker_name(&worker)?;
                Ok(Request::LiftQuarantine { worker })
            }
        }
    }
}

/// A worker name from a client: 1 to [`MAX_NAME_LEN`] bytes, no control characters.
fn check_worker_name(name: &str) -> Result<(), RequestError> {
    if name.is_empty() {
        return Err(RequestError::EmptyWorkerName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(RequestError::LongWorkerName);
    }
    if name.chars().any(char::is_control) {
        return Err(RequestError::ControlInWorkerName);
    }
    Ok(())
}

/// A response.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The answer to `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusReport>,
    /// The answer to `version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The answer to `lift_quarantine`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lift: Option<LiftReport>,
}

/// What a lifted quarantine set in motion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiftReport {
    /// The worker whose quarantine was lifted.
    pub worker: String,
    /// Its devices (`uioN (user_<hba>/<name>)`), handed back to a new worker of it.
    pub devices: Vec<String>,
}

impl Response {
    /// A failure answer.
    pub fn error(why: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(why.into()),
            ..Response::default()
        }
    }
}

/// Everything `tcmu-warden status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The daemon itself.
    pub daemon: DaemonReport,
    /// The policy in force.
    pub policy: PolicyReport,
    /// Every device managed, by id.
    pub devices: Vec<DeviceReport>,
    /// Every worker, by name.
    pub workers: Vec<WorkerReport>,
}

/// The daemon's own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonReport {
    /// Version of the running binary.
    pub version: String,
    /// Its process id.
    pub pid: u32,
    /// The configuration file.
    pub config: String,
    /// How many times the configuration was (re)loaded successfully; 1 at start.
    pub config_generation: u32,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Whether a shutdown is under way.
    pub shutting_down: bool,
    /// Which uevents are followed: `udev`, `kernel` or `off`.
    pub uevents: String,
    /// The TCM-USER netlink channel: `connected`, `unavailable` or `off`.
    pub netlink: String,
}

/// The policy in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyReport {
    /// Subtypes served.
    pub served: Vec<String>,
    /// The worker executable new workers run.
    pub worker_exe: String,
    /// `[handler.file]`.
    pub file: Option<FilePolicy>,
    /// `[handler.ram]`.
    pub ram: Option<RamPolicy>,
}

/// `[handler.file]` in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePolicy {
    /// `allow_paths`.
    pub allow_paths: Vec<String>,
    /// `isolation`.
    pub isolation: String,
}

/// `[handler.ram]` in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamPolicy {
    /// `max_size` in bytes.
    pub max_size: Option<u64>,
}

/// One device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReport {
    /// Supervisor-assigned id.
    pub id: u64,
    /// `uioN`.
    pub uio: String,
    /// `user_<hba>/<name>`.
    pub backstore: String,
    /// Handler subtype.
    pub subtype: Option<String>,
    /// Handler configuration string.
    pub cfgstring: String,
    /// Size in bytes.
    pub size: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Volatile write cache advertised.
    pub write_cache: bool,
    /// Name of its worker.
    pub worker: String,
    /// Its worker's process id, while the worker runs.
    pub worker_pid: Option<u32>,
    /// `queued`, `sent`, `ready`, `failed`, `removing`, `orphaned`, `recovering` or
    /// `quarantined`. A `quarantined` device that is not `blocked` is answered by the refusals
    /// worker (`home_worker` names its own, quarantined worker): it fails fast with NOT READY;
    /// one that is `blocked` has no worker answering for it, and its initiators wait.
    pub state: String,
    /// Whether the supervisor holds it blocked (`action/block_dev`), e.g. while its worker is
    /// restarted.
    pub blocked: bool,
    /// How many times a new worker recovered it from its in-flight journal.
    pub recoveries: u32,
    /// How many times its ring had to be reset (in-flight commands answered BUSY).
    pub resets: u32,
    /// Why it answers NOT READY: the policy refused it, or its worker is quarantined.
    pub refusal: Option<String>,
    /// The quarantined worker it belongs to, while the refusals worker answers for it.
    #[serde(default)]
    pub home_worker: Option<String>,
    /// Why its worker could not serve it.
    pub failure: Option<String>,
    /// Commands completed (from the worker's last answer to a ping).
    pub commands: Option<u64>,
    /// Commands completed with an error status.
    pub errors: Option<u64>,
    /// Bytes read by initiators.
    pub bytes_read: Option<u64>,
    /// Bytes written by initiators.
    pub bytes_written: Option<u64>,
}

/// One worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Its name.
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// `handshaking`, `ready`, `shutting-down`, `closing`, `killed` or `exited`.
    pub state: String,
    /// Subtypes assigned.
    pub subtypes: Vec<String>,
    /// Devices assigned, by id (a quarantined worker's also while the refusals worker answers
    /// for them).
    pub devices: Vec<u64>,
    /// How many times a worker under this name was started again after a crash.
    pub restarts: u32,
    /// Crashes of workers under this name, ever.
    pub crashes: u32,
    /// Why it was killed, or how it ended if that was not a clean exit.
    pub last_crash: Option<String>,
    /// Why it is quarantined (crashed too often; not restarted until an operator lifts the
    /// quarantine with `tcmu-warden quarantine lift <name>`), if it is.
    pub quarantined: Option<String>,
    /// How many times an operator lifted its quarantine.
    #[serde(default)]
    pub lifts: u32,
    /// What its jail enforces (landlock ABI and coverage, seccomp mode, capabilities,
    /// no_new_privs, uid), or `None` for a worker started without one (`--no-jail`).
    pub jail: Option<String>,
}

/// Decodes one request line (without its newline). Never panics.
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    if line.len() > MAX_REQUEST {
        return Err(RequestError::TooLong);
    }
    serde_json::from_slice::<Envelope>(line)
        .map_err(|e| RequestError::Malformed(e.to_string()))
        .and_then(Envelope::into_request)
}

/// Fuzz entry point: decodes `data` as a request. Never panics on its own account; it panics
/// (a fuzzing finding) only if a request decoded from `data` breaks the decoder's promises: a
/// `lift_quarantine` with a worker name [`check_worker_name`] refuses, or a request that does not
/// decode the same again once encoded.
pub fn fuzz(data: &[u8]) {
    let Ok(request) = parse_request(data) else {
        return;
    };
    if let Request::LiftQuarantine { worker } = &request {
        assert!(
            check_worker_name(worker).is_ok(),
            "accepted the worker name {worker:?}"
        );
    }
    let line = serde_json::to_vec(&Envelope::of(&request)).unwrap_or_default();
    assert_eq!(
        parse_request(&line),
        Ok(request),
        "a decoded request does not survive encoding"
    );
}

struct Conn {
    id: u64,
    stream: UnixStream,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    deadline: Instant,
    /// Close once `outbuf` is written and every request is answered.
    closing: bool,
    /// Requests handed out by `service` and not answered yet.
    unanswered: usize,
}

impl Conn {
    fn done(&self) -> bool {
        self.closing && self.outbuf.is_empty() && self.unanswered == 0
    }
}

/// The listening socket and its open connections.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    conns: Vec<Conn>,
    next_id: u64,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.path)
            .field("connections", &self.conns.len())
            .finish()
    }
}

impl ControlServer {
    /// Creates the socket at `path` (and its directory, mode 0700, if missing). A stale socket
    /// left by a dead daemon is replaced; one a live daemon answers on is an error.
    pub fn bind(path: &Path) -> Result<ControlServer, ControlError> {
        let io_err = |what: &'static str| {
            let path = path.to_path_buf();
            move |source| ControlError::Io { what, path, source }
        };
        if let Some(dir) = path.parent()
            && !dir.exists()
        {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err("creating the directory of"))?;
        }
        if let Ok(meta) = fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ControlError::Io {
                    what: "refusing to replace",
                    path: path.to_path_buf(),
                    source: io::Error::new(io::ErrorKind::AlreadyExists, "not a socket"),
                });
            }
            if UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse(path.to_path_buf()));
            }
            fs::remove_file(path).map_err(io_err("removing the stale socket"))?;
        }
        let listener = UnixListener::bind(path).map_err(io_err("binding"))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(io_err("setting the mode of"))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("configuring"))?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            conns: Vec::new(),
            next_id: 1,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What to poll: the listener first, then each connection.
    pub fn poll_fds(&self) -> Vec<(ControlToken, BorrowedFd<'_>, PollFlags)> {
        let mut v = vec![(
            ControlToken::Listener,
            self.listener.as_fd(),
            PollFlags::POLLIN,
        )];
        for c in &self.conns {
            let mut flags = PollFlags::empty();
            if !c.closing {
                flags |= PollFlags::POLLIN;
            }
            if !c.outbuf.is_empty() {
                flags |= PollFlags::POLLOUT;
            }
            v.push((ControlToken::Conn(c.id), c.stream.as_fd(), flags));
        }
        v
    }

    /// Handles readiness (the tokens of the [`ControlServer::poll_fds`] entries found ready):
    /// accepts, reads, writes and closes. Returns the requests received, by connection.
    pub fn service(&mut self, ready: &[ControlToken]) -> Vec<(u64, Result<Request, RequestError>)> {
        let mut requests: Vec<(u64, Result<Request, RequestError>)> = Vec::new();
        let now = Instant::now();
        for conn in &mut self.conns {
            if !ready.contains(&ControlToken::Conn(conn.id)) {
                continue;
            }
            flush(conn);
            if !conn.closing {
                read_requests(conn, now, &mut requests);
            }
        }
        if ready.contains(&ControlToken::Listener) {
            self.accept_all(now);
        }
        for conn in &mut self.conns {
            conn.unanswered += requests.iter().filter(|(id, _)| *id == conn.id).count();
        }
        // A connection with a request still to answer stays until `respond`.
        self.conns.retain(|c| !c.done());
        requests
    }

    fn accept_all(&mut self, now: Instant) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    return;
                }
            };
            let cred =
                nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials);
            let me = nix::unistd::geteuid().as_raw();
            match cred {
                Ok(c) if c.uid() == 0 || c.uid() == me => {}
                Ok(c) => {
                    tracing::warn!(
                        uid = c.uid(),
                        pid = c.pid(),
                        "control connection from a non-root user refused"
                    );
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a control peer's credentials; refused");
                    continue;
                }
            }
            if self.conns.len() >= MAX_CONNECTIONS {
                tracing::warn!("too many control connections; one refused");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            self.conns.push(Conn {
                id: self.next_id,
                stream,
                inbuf: Vec::new(),
                outbuf: Vec::new(),
                deadline: now + IDLE_TIMEOUT,
                closing: false,
                unanswered: 0,
            });
            self.next_id += 1;
        }
    }

    /// Queues the answer to a request of connection `id` and writes what the peer takes now.
    pub fn respond(&mut self, id: u64, response: &Response) {
        let Some(conn) = self.conns.iter_mut().find(|c| c.id == id) else {
            return;
        };
        conn.unanswered = conn.unanswered.saturating_sub(1);
        match serde_json::to_vec(response) {
            Ok(mut bytes) => {
                bytes.push(b'\n');
                conn.outbuf.extend_from_slice(&bytes);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a control response");
                conn.closing = true;
            }
        }
        conn.deadline = Instant::now() + IDLE_TIMEOUT;
        flush(conn);
        self.conns.retain(|c| !c.done());
    }

    /// Closes connections past their deadline.
    pub fn expire(&mut self, now: Instant) {
        self.conns.retain(|c| c.deadline > now);
    }

    /// The earliest connection deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.iter().map(|c| c.deadline).min()
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn flush(conn: &mut Conn) {
    while !conn.outbuf.is_empty() {
        match conn.stream.write(&conn.outbuf) {
            Ok(0) => {
                conn.outbuf.clear();
                conn.closing = true;
            }
            Ok(n) => {
                conn.outbuf.drain(..n.min(conn.outbuf.len()));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                conn.outbuf.clear();
                conn.closing = true;
            }
        }
    }
}

fn read_requests(
    conn: &mut Conn,
    now: Instant,
    out: &mut Vec<(u64, Result<Request, RequestError>)>,
) {
    let mut buf = [0u8; 4096];
    loop {
        match conn.stream.read(&mut buf) {
            Ok(0) => {
                conn.closing = true;
                break;
            }
            Ok(n) => {
                conn.inbuf
                    .extend_from_slice(buf.get(..n).unwrap_or_default());
                conn.deadline = now + IDLE_TIMEOUT;
                // Enough for this turn: an over-long line, or several requests' worth (the
                // rest waits in the socket, which stays readable).
                if conn.inbuf.len() > 4 * MAX_REQUEST
                    || (conn.inbuf.len() > MAX_REQUEST + 1 && !conn.inbuf.contains(&b'\n'))
                {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                conn.closing = true;
                conn.outbuf.clear();
                return;
            }
        }
    }
    while let Some(nl) = conn.inbuf.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = conn.inbuf.drain(..=nl).collect();
        let line = line.get(..nl).unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        out.push((conn.id, parse_request(line)));
    }
    if conn.inbuf.len() > MAX_REQUEST {
        conn.inbuf.clear();
        out.push((conn.id, Err(RequestError::TooLong)));
        conn.closing = true;
    }
}

/// Sends one request to the daemon at `path` and returns its answer (an `ok: false` answer is
/// [`ControlError::Refused`]).
pub fn query(path: &Path, request: Request, timeout: Duration) -> Result<Response, ControlError> {
    let io_err = |what: &'static str| {
        let path = path.to_path_buf();
        move |source| ControlError::Io { what, path, source }
    };
    let mut stream = UnixStream::connect(path).map_err(io_err("connecting to"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(io_err("configuring"))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(io_err("configuring"))?;
    let mut line = serde_json::to_vec(&Envelope::of(&request))
        .map_err(|e| ControlError::BadAnswer(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err("writing to"))?;
    let mut reader = BufReader::new(stream.take(MAX_RESPONSE as u64));
    let mut answer = Vec::new();
    reader
        .read_until(b'\n', &mut answer)
        .map_err(io_err("reading from"))?;
    if answer.last() != Some(&b'\n') {
        return Err(ControlError::BadAnswer(
            "the answer is incomplete or too long".into(),
        ));
    }
    let response: Response =
        serde_json::from_slice(&answer).map_err(|e| ControlError::BadAnswer(e.to_string()))?;
    if !response.ok {
        return Err(ControlError::Refused(
            response.error.unwrap_or_else(|| "unspecified error".into()),
        ));
    }
    Ok(response)
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// The human-readable form of a status report.
pub fn render_status(r: &StatusReport) -> String {
    let mut out = String::new();
    let d = &r.daemon;
    let _ = writeln!(
        out,
        "tcmu-warden {} (pid {}), up {}s{}",
        d.version,
        d.pid,
        d.uptime_secs,
        if d.shutting_down {
            ", SHUTTING DOWN"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "config {} (generation {}); uevents: {}; netlink: {}",
        d.config, d.config_generation, d.uevents, d.netlink
    );
    let p = &r.policy;
    let _ = writeln!(
        out,
        "\npolicy: serves [{}]; worker {}",
        p.served.join(", "),
        p.worker_exe
    );
    if let Some(f) = &p.file {
        let _ = writeln!(
            out,
            "  file: isolation {}, allow_paths [{}]",
            f.isolation,
            f.allow_paths.join(", ")
        );
    }
    if let Some(ram) = &p.ram {
        let _ = writeln!(
            out,
            "  ram: max_size {}",
            ram.max_size.map_or_else(|| "none".to_owned(), format_size)
        );
    }
    let _ = writeln!(out, "\ndevices ({}):", r.devices.len());
    for dev in &r.devices {
        let _ = writeln!(
            out,
            "  {:<7} {:<24} {:<9} {:<8} size {:<9} worker {} (pid {}) commands {} errors {}",
            dev.uio,
            dev.backstore,
            dev.state,
            dev.subtype.as_deref().unwrap_or("-"),
            format_size(dev.size),
            dev.worker,
            opt(dev.worker_pid),
            opt(dev.commands),
            opt(dev.errors),
        );
        if !dev.cfgstring.is_empty() {
            let _ = writeln!(out, "          cfgstring {:?}", dev.cfgstring);
        }
        match (&dev.home_worker, dev.state.as_str(), dev.blocked) {
            (Some(home), "quarantined", false) => {
                let _ = writeln!(
                    out,
                    "          quarantined with worker {home}: fails fast (NOT READY, 02/04/03) until `tcmu-warden quarantine lift {home}`"
                );
            }
            (_, "quarantined", true) => {
                let _ = writeln!(
                    out,
                    "          quarantined and BLOCKED: no worker answers for it now (the refusals worker has not taken it yet, or cannot); initiators wait"
                );
            }
            _ => {}
        }
        if let Some(why) = &dev.refusal {
            let _ = writeln!(out, "          refused: {why}");
        }
        if let Some(why) = &dev.failure {
            let _ = writeln!(out, "          failed: {why}");
        }
    }
    let _ = writeln!(out, "\nworkers ({}):", r.workers.len());
    for w in &r.workers {
        let _ = writeln!(
            out,
            "  {:<16} pid {:<8} {:<13} restarts {} devices {:?}",
            w.name, w.pid, w.state, w.restarts, w.devices
        );
        if let Some(why) = &w.last_crash {
            let _ = writeln!(out, "                   last crash: {why}");
        }
        if let Some(why) = &w.quarantined {
            let _ = writeln!(
                out,
                "                   QUARANTINED: {why}; lift with `tcmu-warden quarantine lift {}`",
                w.name
            );
        }
        if w.lifts > 0 {
            let _ = writeln!(
                out,
                "                   quarantine lifted {} times",
                w.lifts
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_decode_strictly() {
        assert_eq!(
            parse_request(br#"{"request":"status"}"#),
            Ok(Request::Status)
        );
        assert_eq!(
            parse_request(br#"{"request":"version"}"#),
            Ok(Request::Version)
        );
        assert!(
            parse_request(br#"{"request":"reboot"}"#)
                .unwrap_err()
                .to_string()
                .contains("reboot")
        );
        assert!(parse_request(br#"{"request":"status","x":1}"#).is_err());
        assert_eq!(
            parse_request(br#"{"request":"lift_quarantine","worker":"file:user_1/d0"}"#),
            Ok(Request::LiftQuarantine {
                worker: "file:user_1/d0".into()
            })
        );
        let refused = |line: &[u8], why: &str| {
            let err = parse_request(line).unwrap_err();
            assert!(err.to_string().contains(why), "{err}");
        };
        refused(br#"{"request":"lift_quarantine"}"#, "needs a `worker`");
        refused(br#"{"request":"lift_quarantine","worker":""}"#, "empty");
        refused(
            br#"{"request":"lift_quarantine","worker":"a\nb"}"#,
            "control characters",
        );
        refused(
            format!(
                r#"{{"request":"lift_quarantine","worker":"{}"}}"#,
                "w".repeat(MAX_NAME_LEN + 1)
            )
            .as_bytes(),
            "longer than",
        );
        refused(
            br#"{"request":"lift_quarantine","worker":7}"#,
            "invalid type",
        );
        refused(br#"{"request":"status","worker":"file"}"#, "only accepted");
        refused(
            br#"{"request":"lift_quarantine","worker":"f","x":1}"#,
            "unknown field",
        );
        assert!(parse_request(b"status").is_err());
        assert!(parse_request(&vec![b' '; MAX_REQUEST + 1]).is_err());
    }

    fn connect(path: &Path) -> BufReader<UnixStream> {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        BufReader::new(s)
    }

    /// Turns the server until `n` requests arrived (answering each with its echo).
    fn serve(server: &mut ControlServer, n: usize) -> Vec<Result<Request, RequestError>> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = Vec::new();
        while got.len() < n {
            assert!(Instant::now() < deadline, "requests never arrived");
            let ready: Vec<ControlToken> =
                server.poll_fds().into_iter().map(|(t, _, _)| t).collect();
            for (id, req) in server.service(&ready) {
                let resp = match &req {
                    Ok(Request::Version) => Response {
                        ok: true,
                        version: Some("v".into()),
                        ..Response::default()
                    },
                    Ok(Request::Status) => Response::error("no status here"),
                    Ok(Request::LiftQuarantine { worker }) => Response {
                        ok: true,
                        lift: Some(LiftReport {
                            worker: worker.clone(),
                            devices: Vec::new(),
                        }),
                        ..Response::default()
                    },
                    Err(e) => Response::error(e.to_string()),
                };
                server.respond(id, &resp);
                got.push(req);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        got
    }

    #[test]
    fn serves_newline_delimited_json() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sub/control.sock");
        let mut server = ControlServer::bind(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);

        let mut c = connect(&path);
        c.get_mut()
            .write_all(b"{\"request\":\"version\"}\n\n{\"request\":\"bogus\"}\n")
            .unwrap();
        let got = serve(&mut server, 2);
        assert_eq!(got[0], Ok(Request::Version));
        assert!(got[1].is_err());
        let mut line = String::new();
        c.read_line(&mut line).unwrap();
        let r: Response = serde_json::from_str(&line).unwrap();
        assert_eq!(r.version.as_deref(), Some("v"));
        line.clear();
        c.read_line(&mut line).unwrap();
        let r: Response = serde_json::from_str(&line).unwrap();
        assert!(!r.ok);
        assert!(r.error.unwrap().contains("bogus"));

        // Several requests, then a half-close: every one is answered before the server closes.
        let mut c3 = connect(&path);
        c3.get_mut()
            .write_all(b"{\"request\":\"version\"}\n{\"request\":\"version\"}\n{\"request\":\"version\"}\n")
            .unwrap();
        c3.get_mut().shutdown(std::net::Shutdown::Write).unwrap();
        serve(&mut server, 3);
        let mut rest = String::new();
        c3.read_to_string(&mut rest).unwrap();
        assert_eq!(
            rest.lines()
                .filter(|l| l.contains("\"version\":\"v\""))
                .count(),
            3,
            "{rest}"
        );

        // An over-long request is answered with an error and the connection closed.
        let mut c2 = connect(&path);
        c2.get_mut()
            .write_all(&vec![b'x'; MAX_REQUEST + 10])
            .unwrap();
        let got = serve(&mut server, 1);
        assert!(got[0].as_ref().unwrap_err().to_string().contains("longer"));
        let mut rest = String::new();
        c2.read_to_string(&mut rest).unwrap();
        assert!(rest.contains("\"ok\":false"), "{rest}");

        // A second daemon cannot take the socket over; a stale one is replaced.
        assert!(matches!(
            ControlServer::bind(&path),
            Err(ControlError::InUse(_))
        ));
        drop(server);
        assert!(!path.exists());
        let stale = UnixListener::bind(&path).unwrap();
        drop(stale);
        let _again = ControlServer::bind(&path).unwrap();
    }

    #[test]
    fn idle_connections_expire() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("c.sock");
        let mut server = ControlServer::bind(&path).unwrap();
        let mut c = connect(&path);
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.next_deadline().is_none() {
            assert!(Instant::now() < deadline);
            let ready: Vec<ControlToken> =
                server.poll_fds().into_iter().map(|(t, _, _)| t).collect();
            server.service(&ready);
        }
        server.expire(Instant::now() + IDLE_TIMEOUT + Duration::from_secs(1));
        assert!(server.next_deadline().is_none());
        let mut rest = Vec::new();
        assert_eq!(c.read_to_end(&mut rest).unwrap(), 0);
    }

    #[test]
    fn query_reports_refusals() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("c.sock");
        let mut server = ControlServer::bind(&path).unwrap();
        let p = path.clone();
        let client = std::thread::spawn(move || {
            (
                query(&p, Request::Version, Duration::from_secs(30)),
                query(&p, Request::Status, Duration::from_secs(30)),
            )
        });
        serve(&mut server, 2);
        let (v, s) = client.join().unwrap();
        assert_eq!(v.unwrap().version.as_deref(), Some("v"));
        assert!(matches!(s, Err(ControlError::Refused(ref why)) if why == "no status here"));
        assert!(matches!(
            query(
                &tmp.path().join("none"),
                Request::Status,
                Duration::from_secs(1)
            ),
            Err(ControlError::Io { .. })
        ));
    }

    /// The committed fuzzing corpus (`fuzz/corpus/supervisor_control`) replays without a
    /// finding, and holds decodable `lift_quarantine` requests.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/supervisor_control");
        let mut lifts = 0;
        for entry in fs::read_dir(&dir).unwrap() {
            let data = fs::read(entry.unwrap().path()).unwrap();
            fuzz(&data);
            lifts += usize::from(matches!(
                parse_request(&data),
                Ok(Request::LiftQuarantine { .. })
            ));
        }
        assert!(
            lifts >= 2,
            "{lifts} lift_quarantine requests in {}",
            dir.display()
        );
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            fuzz(&data);
        }

        #[test]
        fn lift_requests_take_only_printable_bounded_names(worker in ".{0,300}") {
            let line = serde_json::json!({"request": "lift_quarantine", "worker": worker}).to_string();
            fuzz(line.as_bytes());
            let valid = !worker.is_empty()
                && worker.len() <= MAX_NAME_LEN
                && !worker.chars().any(char::is_control);
            prop_assert_eq!(parse_request(line.as_bytes()).is_ok(), valid, "{}", line);
        }
    }
}
