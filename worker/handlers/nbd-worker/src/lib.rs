//! # `nbd`: a TCMU device served from an NBD export
//!
//! A device configured as `dev_config=nbd/<URI>` (`nbd://host[:port]/export` or
//! `nbd+unix:///export?socket=/path`, see [`tcmu_warden_nbd::uri`]) is served from the NBD
//! export the URI names, through one pipelined connection of [`tcmu_warden_nbd::Client`].
//!
//! The handler takes the SDK's asynchronous block path ([`Handler::submit_io`]): the worker's
//! SCSI emulation decodes and checks every command and hands over [`BlockRequest`]s, which go
//! out as NBD requests at once (any number in flight) and complete from the connection's reader
//! thread:
//! - read -> `NBD_CMD_READ`; write -> `NBD_CMD_WRITE`;
//! - a durable write (FUA, or any write on a device with WCE=0) -> `NBD_CMD_WRITE` with
//!   `NBD_CMD_FLAG_FUA` when the export honours FUA, else the write and then `NBD_CMD_FLUSH`:
//!   the request completes only once the server acknowledged it durably. An export that takes
//!   neither FUA nor FLUSH says by the protocol that its writes are durable when answered;
//! - flush (SYNCHRONIZE CACHE) -> `NBD_CMD_FLUSH` (GOOD at once if the export takes no flush);
//! - unmap (UNMAP, WRITE SAME with UNMAP) -> `NBD_CMD_WRITE_ZEROES` (without `NO_HOLE`, so the
//!   server may deallocate) where the export takes it, which makes unmapped blocks read as
//!   zeros; else `NBD_CMD_TRIM`; neither: the device is not thin-provisioned;
//! - requests over the export's maximum request size are split.
//!
//! ## Server loss
//! When the connection breaks, every request in flight and every new one is *held* (their
//! commands stay outstanding, so the kernel's ring fills and the initiator waits) while the
//! device's reconnect thread connects again with backoff (0.1 s doubling to 2 s). On success the
//! held requests are sent again, whole: every NBD request here is idempotent (a read, a write of
//! the same bytes at the same place, a flush, a trim, a zeroing), and the emulation's range lock
//! keeps an overlapping write from slipping in between, so a retried request never corrupts
//! data. A request held longer than [`HOLD_LIMIT`] (20 s, below the kernel's 30 s command
//! timeout) fails with `ENOTCONN`, which the emulation answers NOT READY / LOGICAL UNIT NOT
//! ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION (02/04/0A): Linux maps it to a transport
//! error, which dm-multipath fails over on. A reconnected export must still be at least as
//! large as the device and writable if it was; otherwise the handler keeps retrying (and
//! failing held requests after the bound).
//!
//! With WCE=1, writes the server acknowledged before it went away but that no flush covered are
//! as durable as the server made them (a killed `nbdkit` or `qemu-nbd` leaves them in the host's
//! page cache; a server host that loses power may lose them, as a volatile cache does).
//!
//! ## Connections and the jail
//! The worker connects itself: TCP under the jail's `network = "tcp"` with `connect_ports`.
//! Unix sockets are connected by path too, which the jail's stage one refuses (it allows
//! AF_INET/AF_INET6 stream sockets only): `nbd+unix://` needs the supervisor to pass the
//! connected socket, not built yet (see `docs/security.md`, "The nbd worker"). The host of
//! a TCP URI should be an IP address: a name is resolved with the C library's resolver, which
//! the jail usually leaves nothing to read.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tcmu_warden_nbd::{Client, Endpoint, NbdError, Request, Stream, Target};
use tcmu_warden_sdk::{
    BlockOp, BlockRequest, DeviceConfig, Handler, HandlerCaps, HandlerError, HandlerFactory,
};

/// How long a request waits for a lost server before it fails with NOT READY.
pub const HOLD_LIMIT: Duration = Duration::from_secs(20);
/// Bound on connecting and on the handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Builds `nbd` handlers.
#[derive(Debug, Default, Clone, Copy)]
pub struct NbdFactory;

impl HandlerFactory for NbdFactory {
    fn subtype(&self) -> &str {
        "nbd"
    }

    /// The worker connects itself; the supervisor opens nothing.
    fn needs_backing_fd(&self) -> bool {
        false
    }

    fn syscalls(&self) -> &[&'static str] {
        &[
            // A TCP or Unix stream socket to the server (made non-blocking and close-on-exec
            // at creation, so no ioctl(FIONBIO) is needed for the connect timeout).
            "socket",
            // Connecting it; the jail's network setting (net namespace, landlock ports from
            // ABI 4) decides where a TCP connect may go.
            "connect",
            // SO_ERROR after a non-blocking connect.
            "getsockopt",
            // TCP_NODELAY, and the handshake's SO_RCVTIMEO/SO_SNDTIMEO.
            "setsockopt",
            // Ending a broken connection so its reader thread wakes up.
            "shutdown",
        ]
    }

    fn open(
        &self,
        dev: &DeviceConfig,
        _backing: Option<OwnedFd>,
    ) -> Result<Arc<dyn Handler>, HandlerError> {
        Ok(Arc::new(NbdHandler::open(dev)?))
    }
}

/// Parses a cfgstring into the target, or the reason it is refused.
pub fn parse_cfgstring(cfgstring: &str) -> Result<Target, HandlerError> {
    tcmu_warden_nbd::uri::parse(cfgstring).map_err(|e| HandlerError::Config {
        cfgstring: e.uri.clone(),
        why: e.why,
    })
}

/// Connects a stream to `endpoint` within `timeout`. An IP address is connected directly
/// (socket, non-blocking connect, poll, SO_ERROR: no resolver, no ioctl); a host name goes
/// through the C library's resolver.
pub fn connect_stream(endpoint: &Endpoint, timeout: Duration) -> Result<Stream, NbdError> {
    match endpoint {
        Endpoint::Tcp { host, port } => match host.parse::<IpAddr>() {
            Ok(ip) => {
                let s = connect_tcp(SocketAddr::new(ip, *port), timeout)?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Err(_) => Stream::connect(endpoint, timeout),
        },
        Endpoint::Unix { .. } => Stream::connect(endpoint, timeout),
    }
}

fn connect_tcp(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6, connect, getsockopt, socket,
        sockopt,
    };
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let connected = match addr {
        SocketAddr::V4(a) => connect(raw, &SockaddrIn::from(a)),
        SocketAddr::V6(a) => connect(raw, &SockaddrIn6::from(a)),
    };
    match connected {
        Ok(()) => {}
        Err(nix::errno::Errno::EINPROGRESS) => {
            let deadline = Instant::now() + timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::from(io::ErrorKind::TimedOut));
                }
                let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
                match poll(&mut fds, PollTimeout::from(ms)) {
                    Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                    Ok(_) => break,
                    Err(e) => return Err(e.into()),
                }
            }
            let err = getsockopt(&fd, sockopt::SocketError)?;
            if err != 0 {
                return Err(io::Error::from_raw_os_error(err));
            }
        }
        Err(e) => return Err(e.into()),
    }
    fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_RDWR))?;
    Ok(TcpStream::from(fd))
}

/// One `nbd` device.
pub struct NbdHandler {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NbdHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdHandler")
            .field("device", &self.inner.name)
            .field("target", &self.inner.target)
            .finish_non_exhaustive()
    }
}

struct Inner {
    name: String,
    target: Target,
    dev_size: u64,
    read_only: bool,
    use_zeroes: bool,
    state: Mutex<State>,
    wake: Condvar,
    shutdown: AtomicBool,
}

struct State {
    client: Option<Arc<Client>>,
    /// The connection broke: the reconnect thread replaces it.
    down: bool,
    held: VecDeque<(BlockRequest, Instant)>,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds a request until the server is back (or [`HOLD_LIMIT`] after `since`).
    fn hold(&self, req: BlockRequest, since: Instant, broken: Option<&Arc<Client>>) {
        let mut st = self.state();
        if let (Some(b), Some(c)) = (broken, &st.client)
            && Arc::ptr_eq(b, c)
        {
            st.down = true;
        }
        if st.client.is_none() {
            st.down = true;
        }
        st.held.push_back((req, since));
        drop(st);
        self.wake.notify_all();
    }
}

/// One NBD request of a block request.
struct Part {
    at: usize,
    req: Request,
}

/// A block request in flight: its parts complete into it.
struct Flight {
    req: Mutex<Option<BlockRequest>>,
    left: Mutex<(usize, Option<io::Error>, bool)>,
    since: Instant,
    /// After the parts: a flush (a durable write on an export without FUA).
    then_flush: bool,
}

impl NbdHandler {
    /// Parses the cfgstring, connects, checks the export against the device and starts the
    /// reconnect thread.
    pub fn open(dev: &DeviceConfig) -> Result<NbdHandler, HandlerError> {
        let target = parse_cfgstring(&dev.cfgstring)?;
        let config = |why: String| HandlerError::Config {
            cfgstring: dev.cfgstring.clone(),
            why,
        };
        let client = connect(&target).map_err(|e| config(format!("connecting: {e}")))?;
        let ex = *client.export();
        if dev.dev_size > ex.size {
            return Err(config(format!(
                "the device has {} bytes but the export only {}",
                dev.dev_size, ex.size
            )));
        }
        tracing::info!(
            device = %dev.name, size = ex.size, read_only = ex.read_only(),
            fua = ex.can_fua(), flush = ex.can_flush(), trim = ex.can_trim(),
            write_zeroes = ex.can_write_zeroes(), "nbd export connected"
        );
        let inner = Arc::new(Inner {
            name: dev.name.clone(),
            target,
            dev_size: dev.dev_size,
            read_only: ex.read_only(),
            use_zeroes: ex.can_write_zeroes(),
            state: Mutex::new(State {
                client: Some(Arc::new(client)),
                down: false,
                held: VecDeque::new(),
            }),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
        });
        let for_thread = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name(format!("nbd-{}", dev.name))
            .spawn(move || reconnect_loop(&for_thread))?;
        Ok(NbdHandler {
            inner,
            thread: Some(thread),
        })
    }

    /// Whether the connection is down and being re-established.
    pub fn reconnecting(&self) -> bool {
        self.inner.state().down
    }
}

impl Drop for NbdHandler {
    fn drop(&mut self) {
        self.inner.shutdown.store(true, Ordering::SeqCst);
        self.inner.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn connect(target: &Target) -> Result<Client, NbdError> {
    let stream = connect_stream(&target.endpoint, CONNECT_TIMEOUT)?;
    Client::handshake(stream, &target.export, CONNECT_TIMEOUT)
}

fn reconnect_loop(inner: &Arc<Inner>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let (old, expired) = {
            let mut st = inner.state();
            while !st.down && !inner.shutdown.load(Ordering::SeqCst) {
                st = inner.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
            let stopping = inner.shutdown.load(Ordering::SeqCst);
            let old = if st.down || stopping {
                st.client.take()
            } else {
                None
            };
            let now = Instant::now();
            let mut expired = Vec::new();
            let mut kept = VecDeque::new();
            for (req, since) in st.held.drain(..) {
                if inner.shutdown.load(Ordering::SeqCst) || now.duration_since(since) >= HOLD_LIMIT
                {
                    expired.push(req);
                } else {
                    kept.push_back((req, since));
                }
            }
            st.held = kept;
            (old, expired)
        };
        // Dropped outside the lock: its pending requests come back through `hold`.
        if let Some(old) = old {
            if !inner.shutdown.load(Ordering::SeqCst) {
                tracing::warn!(device = %inner.name, why = ?old.broken(), "nbd connection lost, reconnecting");
            }
            drop(old);
        }
        if !expired.is_empty() {
            tracing::warn!(device = %inner.name, requests = expired.len(),
                "nbd server still away: failing held requests NOT READY");
        }
        for req in expired {
            req.complete(Err(io::Error::from_raw_os_error(libc::ENOTCONN)));
        }
        if inner.shutdown.load(Ordering::SeqCst) {
            // What the old connection handed back is dropped with the handler (answered
            // HARDWARE ERROR by the SDK's rule), never left waiting.
            let held: Vec<_> = inner.state().held.drain(..).collect();
            drop(held);
            return;
        }
        match connect(&inner.target).and_then(|c| {
            let ex = c.export();
            if ex.size < inner.dev_size || (ex.read_only() && !inner.read_only) {
                Err(NbdError::Refused(format!(
                    "the export came back with {} bytes{}",
                    ex.size,
                    if ex.read_only() { ", read-only" } else { "" }
                )))
            } else {
                Ok(c)
            }
        }) {
            Ok(client) => {
                let client = Arc::new(client);
                let held: Vec<_> = {
                    let mut st = inner.state();
                    st.client = Some(Arc::clone(&client));
                    st.down = false;
                    st.held.drain(..).collect()
                };
                tracing::info!(device = %inner.name, resent = held.len(), "nbd connection re-established");
                backoff = BACKOFF_MIN;
                for (req, since) in held {
                    start(inner, req, since);
                }
            }
            Err(e) => {
                tracing::debug!(device = %inner.name, error = %e, "nbd reconnect failed");
                let st = inner.state();
                let _ = inner
                    .wake
                    .wait_timeout(st, backoff)
                    .unwrap_or_else(PoisonError::into_inner);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

fn io_error(e: &NbdError) -> io::Error {
    match e {
        NbdError::Server { code, .. } => match *code {
            1 => io::Error::from_raw_os_error(libc::EPERM),
            28 => io::Error::from_raw_os_error(libc::ENOSPC),
            22 => io::Error::from_raw_os_error(libc::EINVAL),
            95 => io::Error::from_raw_os_error(libc::EOPNOTSUPP),
            _ => io::Error::from_raw_os_error(libc::EIO),
        },
        NbdError::Unsupported(why) if why.contains("read-only") => {
            io::Error::from_raw_os_error(libc::EROFS)
        }
        other => io::Error::other(other.to_string()),
    }
}

/// The NBD requests a block request becomes, and whether a flush follows them.
fn plan(inner: &Inner, client: &Client, req: &BlockRequest) -> (Vec<Part>, bool) {
    let ex = client.export();
    let max = u64::from(ex.max_request().max(4096));
    let split = |offset: u64, len: u64, make: &dyn Fn(u64, u32) -> Request| {
        let mut parts = Vec::new();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(max);
            parts.push(Part {
                at: usize::try_from(done).unwrap_or(usize::MAX),
                req: make(
                    offset.saturating_add(done),
                    u32::try_from(n).unwrap_or(u32::MAX),
                ),
            });
            done += n;
        }
        parts
    };
    let len = req.len() as u64;
    match req.op() {
        BlockOp::Read { offset } => (
            split(offset, len, &|offset, len| Request::Read { offset, len }),
            false,
        ),
        BlockOp::Write { offset, durable } => {
            let fua = durable && ex.can_fua();
            let parts = split(offset, len, &|offset, n| {
                let at =
                    usize::try_from(offset.saturating_sub(req_offset(req))).unwrap_or(usize::MAX);
                let mut data = vec![0u8; n as usize];
                req.copy_out(at, &mut data);
                Request::Write { offset, data, fua }
            });
            (parts, durable && !fua && ex.can_flush())
        }
        BlockOp::Flush => {
            if ex.can_flush() {
                (
                    vec![Part {
                        at: 0,
                        req: Request::Flush,
                    }],
                    false,
                )
            } else {
                (Vec::new(), false)
            }
        }
        BlockOp::Unmap { offset, len } => {
            let use_zeroes = inner.use_zeroes;
            (
                split(offset, len, &|offset, len| {
                    if use_zeroes {
                        Request::WriteZeroes {
                            offset,
                            len,
                            fua: false,
                            no_hole: false,
                        }
                    } else {
                        Request::Trim {
                            offset,
                            len,
                            fua: false,
                        }
                    }
                }),
                false,
            )
        }
    }
}

fn req_offset(req: &BlockRequest) -> u64 {
    match req.op() {
        BlockOp::Read { offset }
        | BlockOp::Write { offset, .. }
        | BlockOp::Unmap { offset, .. } => offset,
        BlockOp::Flush => 0,
    }
}

/// Sends a block request on the current connection, or holds it.
fn start(inner: &Arc<Inner>, req: BlockRequest, since: Instant) {
    let client = {
        let st = inner.state();
        match (&st.client, st.down) {
            (Some(c), false) => Arc::clone(c),
            _ => {
                drop(st);
                return inner.hold(req, since, None);
            }
        }
    };
    if inner.read_only && matches!(req.op(), BlockOp::Write { .. } | BlockOp::Unmap { .. }) {
        return req.complete(Err(io::Error::from_raw_os_error(libc::EROFS)));
    }
    let (parts, then_flush) = plan(inner, &client, &req);
    if parts.is_empty() {
        return req.complete(Ok(()));
    }
    send(inner, &client, req, since, parts, then_flush);
}

fn send(
    inner: &Arc<Inner>,
    client: &Arc<Client>,
    req: BlockRequest,
    since: Instant,
    parts: Vec<Part>,
    then_flush: bool,
) {
    let flight = Arc::new(Flight {
        req: Mutex::new(Some(req)),
        left: Mutex::new((parts.len(), None, false)),
        since,
        then_flush,
    });
    for Part { at, req: nreq } in parts {
        let (f, i, c) = (Arc::clone(&flight), Arc::clone(inner), Arc::clone(client));
        let is_read = matches!(nreq, Request::Read { .. });
        let done = Box::new(move |r: Result<Vec<u8>, NbdError>| {
            let outcome = match r {
                Ok(data) => {
                    if is_read
                        && let Some(req) = f
                            .req
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .as_mut()
                    {
                        req.copy_in(at, &data);
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            };
            part_done(&i, &c, &f, outcome);
        });
        if let Err(e) = client.submit(nreq, done) {
            // Not sent, and its callback dropped: account for it here.
            part_done(inner, client, &flight, Err(e));
        }
    }
}

fn part_done(inner: &Arc<Inner>, client: &Arc<Client>, f: &Arc<Flight>, r: Result<(), NbdError>) {
    let last = {
        let mut left = f.left.lock().unwrap_or_else(PoisonError::into_inner);
        match r {
            Ok(()) => {}
            Err(NbdError::Disconnected(_)) => left.2 = true,
            Err(e) => {
                tracing::warn!(device = %inner.name, error = %e, "nbd request failed");
                if left.1.is_none() {
                    left.1 = Some(io_error(&e));
                }
            }
        }
        left.0 = left.0.saturating_sub(1);
        (left.0 == 0).then(|| (left.1.take(), left.2))
    };
    let Some((error, lost)) = last else { return };
    let Some(req) = f.req.lock().unwrap_or_else(PoisonError::into_inner).take() else {
        return;
    };
    if lost {
        // Sent again, whole, on the next connection.
        return inner.hold(req, f.since, Some(client));
    }
    if let Some(e) = error {
        return req.complete(Err(e));
    }
    if f.then_flush {
        return send(
            inner,
            client,
            req,
            f.since,
            vec![Part {
                at: 0,
                req: Request::Flush,
            }],
            false,
        );
    }
    req.complete(Ok(()));
}

impl Handler for NbdHandler {
    fn caps(&self) -> HandlerCaps {
        let thin = !self.inner.read_only
            && self
                .inner
                .state()
                .client
                .as_ref()
                .is_some_and(|c| c.export().can_trim() || c.export().can_write_zeroes());
        HandlerCaps {
            unmap: thin,
            unmap_granularity: if thin { 1 } else { 0 },
            unmap_reads_zero: thin && self.inner.use_zeroes,
        }
    }

    fn submit_io(&self, req: BlockRequest) {
        start(&self.inner, req, Instant::now());
    }

    // The blocking methods are not used: every block operation comes through `submit_io`.
    fn read(&self, _offset: u64, _bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    fn write(&self, _offset: u64, _bufs: &[io::IoSlice<'_>], _durable: bool) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    fn flush(&self) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}
