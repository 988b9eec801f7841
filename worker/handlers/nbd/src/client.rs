//! # A pipelined NBD client connection
//!
//! [`Client`] owns one connection in the transmission phase. Any thread may [`Client::submit`]
//! a request with a completion callback; requests go out at once (under a write lock, so they
//! never interleave on the wire) and any number may be in flight. One reader thread per
//! connection decodes the server's replies, matches them to requests by cookie, and calls each
//! request's callback exactly once: with the data (reads) or nothing (everything else), or with
//! an error. The callback runs on the reader thread and must not block for long.
//!
//! The server is untrusted: a reply for no pending request, a chunk outside its request, a
//! read not fully covered, a payload over the bounds in [`crate::wire`], or a broken stream
//! ends the connection. Every request still pending then completes with
//! [`NbdError::Disconnected`], and later submissions fail at once; reconnecting is the caller's
//! decision (it owns the retry policy towards the initiator).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::NbdError;
use crate::handshake::{self, Export};
use crate::uri::{Endpoint, Target};
use crate::wire::{self, Chunk, ReplyKind};

/// A connected stream, TCP or Unix.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// A Unix socket (connected by the worker, or handed over by the supervisor).
    Unix(UnixStream),
}

impl Stream {
    /// Connects to an endpoint, with a connect timeout for TCP.
    pub fn connect(endpoint: &Endpoint, timeout: Duration) -> Result<Stream, NbdError> {
        match endpoint {
            Endpoint::Tcp { host, port } => {
                let mut last = None;
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last
                    .unwrap_or_else(|| io::Error::other(format!("{host}: no address")))
                    .into())
            }
            Endpoint::Unix { socket } => Ok(Stream::Unix(UnixStream::connect(socket)?)),
        }
    }

    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Sets both timeouts (`None`: block forever).
    pub fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u32,
    },
    /// Write `data` at `offset`; with `fua`, durable before the answer.
    Write {
        /// Byte offset.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
        /// Forced unit access.
        fua: bool,
    },
    /// Make every answered write durable.
    Flush,
    /// Discard a range (reads of it are then unspecified until written).
    Trim {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u32,
        /// Forced unit access.
        fua: bool,
    },
    /// Zero a range without sending zeroes; with `no_hole`, keep it allocated.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u32,
        /// Forced unit access.
        fua: bool,
        /// Keep the range allocated.
        no_hole: bool,
    },
}

/// A request's completion: the data of a read (empty for the other requests), or why it
/// failed. Called exactly once, on the connection's reader thread.
pub type Done = Box<dyn FnOnce(Result<Vec<u8>, NbdError>) + Send>;

struct Pending {
    kind: u16,
    offset: u64,
    len: u32,
    data: Vec<u8>,
    covered: u64,
    error: Option<NbdError>,
    done: Done,
}

#[derive(Default)]
struct State {
    next_cookie: u64,
    pending: HashMap<u64, Pending>,
    broken: Option<String>,
}

struct Shared {
    writer: Mutex<Stream>,
    state: Mutex<State>,
    export: Export,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the connection: every pending request completes with `Disconnected`.
    fn fail(&self, why: String) {
        let drained: Vec<Pending> = {
            let mut st = self.state();
            if st.broken.is_none() {
                st.broken = Some(why.clone());
            }
            st.pending.drain().map(|(_, p)| p).collect()
        };
        self.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown();
        for p in drained {
            (p.done)(Err(NbdError::Disconnected(why.clone())));
        }
    }
}

/// A connection in the transmission phase.
pub struct Client {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("export", &self.shared.export)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `target` and negotiates its export. `timeout` bounds the connection and the
    /// handshake; the transmission phase has no read timeout (requests may legitimately wait).
    pub fn connect(target: &Target, timeout: Duration) -> Result<Client, NbdError> {
        let stream = Stream::connect(&target.endpoint, timeout)?;
        Client::handshake(stream, &target.export, timeout)
    }

    /// Negotiates `export` over an already connected stream.
    pub fn handshake(
        mut stream: Stream,
        export: &str,
        timeout: Duration,
    ) -> Result<Client, NbdError> {
        stream.set_timeouts(Some(timeout))?;
        let info = handshake::negotiate(&mut stream, export)?;
        stream.set_timeouts(None)?;
        let reader_stream = stream.try_clone()?;
        let shared = Arc::new(Shared {
            writer: Mutex::new(stream),
            state: Mutex::new(State::default()),
            export: info,
        });
        let for_reader = Arc::clone(&shared);
        let reader = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || read_replies(&for_reader, reader_stream))?;
        Ok(Client {
            shared,
            reader: Some(reader),
        })
    }

    /// What the handshake agreed on.
    pub fn export(&self) -> &Export {
        &self.shared.export
    }

    /// Requests waiting for their reply.
    pub fn in_flight(&self) -> usize {
        self.shared.state().pending.len()
    }

    /// Why the connection ended, if it did.
    pub fn broken(&self) -> Option<String> {
        self.shared.state().broken.clone()
    }

    /// Sends a request; `done` is called once its reply (or the connection's end) arrives. A
    /// request the export cannot take (beyond its size, a write to a read-only export, a
    /// command it did not advertise, over the request size limit) is refused here, before
    /// anything is sent, and `done` is not called.
    pub fn submit(&self, req: Request, done: Done) -> Result<(), NbdError> {
        let ex = &self.shared.export;
        let (kind, flags, offset, len) = match &req {
            Request::Read { offset, len } => (wire::CMD_READ, 0, *offset, *len),
            Request::Write { offset, data, fua } => {
                let len = u32::try_from(data.len())
                    .map_err(|_| NbdError::Unsupported("a write over 4 GiB".into()))?;
                (wire::CMD_WRITE, fua_flag(ex, *fua)?, *offset, len)
            }
            Request::Flush => {
                if !ex.can_flush() {
                    return Err(NbdError::Unsupported("the server takes no FLUSH".into()));
                }
                (wire::CMD_FLUSH, 0, 0, 0)
            }
            Request::Trim { offset, len, fua } => {
                if !ex.can_trim() {
                    return Err(NbdError::Unsupported("the server takes no TRIM".into()));
                }
                (wire::CMD_TRIM, fua_flag(ex, *fua)?, *offset, *len)
            }
            Request::WriteZeroes {
                offset,
                len,
                fua,
                no_hole,
            } => {
                if !ex.can_write_zeroes() {
                    return Err(NbdError::Unsupported(
                        "the server takes no WRITE_ZEROES".into(),
                    ));
                }
                let hole = if *no_hole { wire::CMD_FLAG_NO_HOLE } else { 0 };
                (
                    wire::CMD_WRITE_ZEROES,
                    fua_flag(ex, *fua)? | hole,
                    *offset,
                    *len,
                )
            }
        };
        if kind != wire::CMD_READ && kind != wire::CMD_FLUSH && ex.read_only() {
            return Err(NbdError::Unsupported("the export is read-only".into()));
        }
        if kind != wire::CMD_FLUSH {
            if len == 0 {
                return Err(NbdError::Unsupported("an empty request".into()));
            }
            if offset
                .checked_add(u64::from(len))
                .is_none_or(|end| end > ex.size)
            {
                return Err(NbdError::Unsupported(format!(
                    "[{offset}, +{len}) is beyond the export's {} bytes",
                    ex.size
                )));
            }
            let limited = matches!(kind, wire::CMD_READ | wire::CMD_WRITE);
            if limited && len > ex.max_request() {
                return Err(NbdError::Unsupported(format!(
                    "{len} bytes in one request, the server takes at most {}",
                    ex.max_request()
                )));
            }
        }
        let cookie = {
            let mut st = self.shared.state();
            if let Some(why) = &st.broken {
                return Err(NbdError::Disconnected(why.clone()));
            }
            let cookie = st.next_cookie;
            st.next_cookie = st.next_cookie.wrapping_add(1);
            let data = if kind == wire::CMD_READ {
                vec![0u8; len as usize]
            } else {
                Vec::new()
            };
            st.pending.insert(
                cookie,
                Pending {
                    kind,
                    offset,
                    len,
                    data,
                    covered: 0,
                    error: None,
                    done,
                },
            );
            cookie
        };
        let header = wire::encode_request(flags, kind, cookie, offset, len);
        let sent = {
            let mut w = self.shared.writer.lock().unwrap_or_else(|p| p.into_inner());
            match &req {
                Request::Write { data, .. } => {
                    w.write_all(&header).and_then(|()| w.write_all(data))
                }
                _ => w.write_all(&header),
            }
        };
        if let Err(e) = sent {
            // The request is pending: failing the connection completes it.
            self.shared.fail(format!("sending a request: {e}"));
        }
        Ok(())
    }
}

fn fua_flag(ex: &Export, fua: bool) -> Result<u16, NbdError> {
    match (fua, ex.can_fua()) {
        (false, _) => Ok(0),
        (true, true) => Ok(wire::CMD_FLAG_FUA),
        (true, false) => Err(NbdError::Unsupported(
            "the server does not honour FUA".into(),
        )),
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        {
            let mut w = self.shared.writer.lock().unwrap_or_else(|p| p.into_inner());
            // A soft disconnect when nothing is pending; either way the stream is closed.
            if self.shared.state().pending.is_empty() {
                let _ = w.write_all(&wire::encode_request(0, wire::CMD_DISC, 0, 0, 0));
            }
        }
        self.shared.fail("the client closed the connection".into());
        if let Some(r) = self.reader.take() {
            // The last handle may be dropped by a completion callback, on the reader thread
            // itself: it ends on its own once the stream is shut down, and cannot join itself.
            if r.thread().id() != std::thread::current().id() {
                let _ = r.join();
            }
        }
    }
}

fn read_replies(shared: &Shared, mut s: Stream) {
    let why = loop {
        match read_one(shared, &mut s) {
            Ok(()) => {}
            Err(e) => break e.to_string(),
        }
    };
    shared.fail(why);
}

/// Reads and dispatches one reply (or one chunk).
fn read_one(shared: &Shared, s: &mut Stream) -> Result<(), NbdError> {
    let mut magic = [0u8; 4];
    s.read_exact(&mut magic)?;
    match wire::reply_kind(magic)? {
        ReplyKind::Simple => {
            let mut rest = [0u8; 12];
            s.read_exact(&mut rest)?;
            let (error, cookie) = wire::parse_simple_rest(&rest)?;
            let mut p = take(shared, cookie)?;
            if p.kind == wire::CMD_READ {
                if shared.export.structured_replies {
                    return Err(NbdError::Protocol(
                        "a simple reply to a read after structured replies were agreed".into(),
                    ));
                }
                if error == 0 {
                    // Without structured replies the data follows; on error nothing does.
                    if let Err(e) = s.read_exact(&mut p.data) {
                        // Keep the request pending so the connection's end completes it.
                        shared.state().pending.insert(cookie, p);
                        return Err(e.into());
                    }
                }
            }
            complete(
                p,
                (error != 0).then(|| NbdError::Server {
                    code: error,
                    message: String::new(),
                }),
            );
            Ok(())
        }
        ReplyKind::Structured => {
            if !shared.export.structured_replies {
                return Err(NbdError::Protocol(
                    "a structured reply that was not negotiated".into(),
                ));
            }
            let mut rest = [0u8; 16];
            s.read_exact(&mut rest)?;
            let h = wire::parse_chunk_rest(&rest)?;
            let mut payload = vec![0u8; h.len as usize];
            s.read_exact(&mut payload)?;
            let mut p = take(shared, h.cookie)?;
            let chunk = match wire::parse_chunk(&h, &payload, p.offset, p.len) {
                Ok(c) => c,
                Err(e) => {
                    shared.state().pending.insert(h.cookie, p);
                    return Err(e.into());
                }
            };
            let bad = |p: Pending, why: &str| {
                shared.state().pending.insert(h.cookie, p);
                Err(NbdError::Protocol(why.to_owned()))
            };
            match chunk {
                Chunk::None => {}
                Chunk::Data { .. } | Chunk::Hole { .. } if p.kind != wire::CMD_READ => {
                    return bad(p, "a data or hole chunk for a request that is not a read");
                }
                Chunk::Data { at, data } => {
                    let start = at as usize;
                    match p.data.get_mut(start..start + data.len()) {
                        Some(dst) => dst.copy_from_slice(data),
                        None => return bad(p, "a data chunk outside its read"),
                    }
                    p.covered += data.len() as u64;
                }
                Chunk::Hole { at, len } => {
                    let start = at as usize;
                    match p.data.get_mut(start..start + len as usize) {
                        Some(dst) => dst.fill(0),
                        None => return bad(p, "a hole chunk outside its read"),
                    }
                    p.covered += u64::from(len);
                }
                Chunk::Error { code, message } => {
                    if p.error.is_none() {
                        p.error = Some(NbdError::Server { code, message });
                    }
                }
            }
            if h.flags & wire::REPLY_FLAG_DONE == 0 {
                shared.state().pending.insert(h.cookie, p);
                return Ok(());
            }
            if p.error.is_none() && p.kind == wire::CMD_READ && p.covered != u64::from(p.len) {
                let why = format!(
                    "a read of {} bytes answered with {} bytes of data and holes",
                    p.len, p.covered
                );
                return bad(p, &why);
            }
            let error = p.error.take();
            complete(p, error);
            Ok(())
        }
    }
}

fn take(shared: &Shared, cookie: u64) -> Result<Pending, NbdError> {
    shared
        .state()
        .pending
        .remove(&cookie)
        .ok_or_else(|| NbdError::Protocol(format!("a reply for no pending request ({cookie})")))
}

fn complete(p: Pending, error: Option<NbdError>) {
    match error {
        Some(e) => (p.done)(Err(e)),
        None => (p.done)(Ok(p.data)),
    }
}
