//! # tcmu-warden's NBD client
//!
//! NBD (the Network Block Device protocol) lets a client read and write a remote *export* (a
//! disk image, a block device, memory) over TCP or a Unix socket; `qemu-nbd`, `nbdkit` and
//! `nbd-server` are common servers. This crate is the protocol side of tcmu-warden's `nbd`
//! handler, which serves a TCMU device from an export:
//!
//! - [`uri`]: the handler's cfgstring, an NBD URI (`nbd://host:port/export`,
//!   `nbd+unix:///export?socket=/path`);
//! - [`wire`]: the byte format, as bounded pure decoders (fuzzed by `fuzz/fuzz_targets/nbd_wire.rs`);
//! - [`handshake`]: fixed newstyle negotiation with `NBD_OPT_GO` and structured replies;
//! - [`client`]: one connection with any number of requests in flight, completed by callback
//!   from a reader thread, which fits the handler SDK's completion handles.
//!
//! It depends on nothing of tcmu-warden: the handler adapts it to SCSI.

pub mod client;
pub mod handshake;
pub mod uri;
pub mod wire;

pub use client::{Client, Done, Request, Stream};
pub use handshake::Export;
pub use uri::{Endpoint, Target, UriError};

/// Why a connection or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The server sent bytes that are not NBD.
    #[error("malformed reply: {0}")]
    Wire(#[from] wire::WireError),
    /// The server broke the protocol's rules.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The server refused the export or a required option.
    #[error("refused: {0}")]
    Refused(String),
    /// The request cannot be sent to this export.
    #[error("not possible on this export: {0}")]
    Unsupported(String),
    /// The server answered the request with an error (`code` is an errno value: 5 EIO,
    /// 28 ENOSPC, 1 EPERM, 22 EINVAL, 108 ESHUTDOWN...).
    #[error("the server answered error {code}{}{message}", if message.is_empty() { "" } else { ": " })]
    Server {
        /// The errno-style code.
        code: u32,
        /// The server's explanation, if it gave one.
        message: String,
    },
    /// The connection ended before the reply.
    #[error("connection lost: {0}")]
    Disconnected(String),
}
