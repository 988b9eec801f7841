//! # The handshake: fixed newstyle negotiation up to the transmission phase
//!
//! The client insists on *fixed newstyle* (every server of the last decade speaks it), asks
//! for structured replies (`NBD_OPT_STRUCTURED_REPLY`: reads can then report errors and holes
//! without ambiguity), and enters transmission with `NBD_OPT_GO`, asking for the export's block
//! size constraints. A server that does not know `NBD_OPT_GO` gets `NBD_OPT_EXPORT_NAME`
//! instead, the older way in.
//!
//! Every reply is read with a bounded length ([`crate::wire::MAX_OPTION_REPLY`]); the number of
//! replies to one option is bounded too, so a hostile server cannot keep the client in
//! negotiation forever (the caller also sets a socket timeout).

use std::io::{Read, Write};

use crate::NbdError;
use crate::wire::{self, BlockSizes, Info};

/// Most option replies accepted for one option.
const MAX_REPLIES_PER_OPTION: usize = 64;

/// What the handshake agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Export {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`wire::TFLAG_*`).
    pub flags: u16,
    /// The server's block size constraints, if it sent them.
    pub block_sizes: Option<BlockSizes>,
    /// Whether replies are structured.
    pub structured_replies: bool,
}

impl Export {
    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// The export refuses writes.
    pub fn read_only(&self) -> bool {
        self.has(wire::TFLAG_READ_ONLY)
    }

    /// The server takes `NBD_CMD_FLUSH` (without it, writes are durable when answered, or the
    /// server has no cache to flush).
    pub fn can_flush(&self) -> bool {
        self.has(wire::TFLAG_SEND_FLUSH)
    }

    /// The server honours FUA on writes.
    pub fn can_fua(&self) -> bool {
        self.has(wire::TFLAG_SEND_FUA)
    }

    /// The server takes `NBD_CMD_TRIM`.
    pub fn can_trim(&self) -> bool {
        self.has(wire::TFLAG_SEND_TRIM)
    }

    /// The server takes `NBD_CMD_WRITE_ZEROES`.
    pub fn can_write_zeroes(&self) -> bool {
        self.has(wire::TFLAG_SEND_WRITE_ZEROES)
    }

    /// Several connections to the export are consistent with each other.
    pub fn can_multi_conn(&self) -> bool {
        self.has(wire::TFLAG_CAN_MULTI_CONN)
    }

    /// Largest payload one request may carry: the server's maximum if it gave one, else the
    /// 32 MiB the protocol lets a client assume, never more than this client's own bound.
    pub fn max_request(&self) -> u32 {
        self.block_sizes
            .map_or(wire::MAX_REQUEST_BYTES, |b| b.maximum)
            .min(wire::MAX_REQUEST_BYTES)
    }
}

fn read_array<const N: usize, S: Read>(s: &mut S) -> Result<[u8; N], NbdError> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

/// One option reply: header and payload.
fn read_option_reply<S: Read>(s: &mut S, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
    let h = wire::parse_option_reply_header(&read_array::<20, _>(s)?)?;
    if h.option != option {
        return Err(NbdError::Protocol(format!(
            "reply to option {} while option {option} was asked",
            h.option
        )));
    }
    let mut payload = vec![0u8; h.len as usize];
    s.read_exact(&mut payload)?;
    Ok((h.reply, payload))
}

/// The text of an error reply (servers may explain themselves), for the log.
fn error_text(reply: u32, payload: &[u8]) -> String {
    let msg = String::from_utf8_lossy(payload.get(..wire::MAX_STRING).unwrap_or(payload));
    let name = match reply {
        wire::REP_ERR_UNSUP => "unsupported",
        wire::REP_ERR_TLS_REQD => "TLS required",
        wire::REP_ERR_UNKNOWN => "unknown export",
        r if r == wire::REP_FLAG_ERROR | 2 => "refused by policy",
        r if r == wire::REP_FLAG_ERROR | 3 => "invalid",
        r if r == wire::REP_FLAG_ERROR | 4 => "not supported on this platform",
        r if r == wire::REP_FLAG_ERROR | 7 => "server shutting down",
        _ => "error",
    };
    if msg.is_empty() {
        format!("{name} ({reply:#x})")
    } else {
        format!("{name} ({reply:#x}): {msg}")
    }
}

/// Negotiates `export` on a freshly connected stream, up to the transmission phase.
pub fn negotiate<S: Read + Write>(s: &mut S, export: &str) -> Result<Export, NbdError> {
    let hs_flags = wire::parse_greeting(&read_array::<18, _>(s)?)?;
    if hs_flags & wire::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Protocol(
            "the server does not speak fixed newstyle negotiation".into(),
        ));
    }
    let no_zeroes = hs_flags & wire::FLAG_NO_ZEROES != 0;
    let mut client_flags = wire::CLIENT_FIXED_NEWSTYLE;
    if no_zeroes {
        client_flags |= wire::CLIENT_NO_ZEROES;
    }
    s.write_all(&client_flags.to_be_bytes())?;

    // Structured replies, if the server has them.
    s.write_all(&wire::encode_option(wire::OPT_STRUCTURED_REPLY, &[]))?;
    let (reply, payload) = read_option_reply(s, wire::OPT_STRUCTURED_REPLY)?;
    let structured_replies = match reply {
        wire::REP_ACK => true,
        wire::REP_ERR_TLS_REQD => {
            return Err(NbdError::Refused(
                "the server requires TLS, which this handler does not support yet".into(),
            ));
        }
        r if r & wire::REP_FLAG_ERROR != 0 => false,
        r => {
            return Err(NbdError::Protocol(format!(
                "unexpected reply {r:#x} to NBD_OPT_STRUCTURED_REPLY ({} bytes)",
                payload.len()
            )));
        }
    };

    // NBD_OPT_GO, or NBD_OPT_EXPORT_NAME if the server lacks it.
    s.write_all(&wire::encode_option(
        wire::OPT_GO,
        &wire::encode_go(export, &[wire::INFO_BLOCK_SIZE]),
    ))?;
    let mut export_info = None;
    let mut block_sizes = None;
    for _ in 0..MAX_REPLIES_PER_OPTION {
        let (reply, payload) = read_option_reply(s, wire::OPT_GO)?;
        match reply {
            wire::REP_INFO => match wire::parse_info(&payload)? {
                Info::Export { size, flags } => export_info = Some((size, flags)),
                Info::BlockSize(b) => block_sizes = Some(b),
                Info::Other(_) => {}
            },
            wire::REP_ACK => {
                let (size, flags) = export_info.ok_or_else(|| {
                    NbdError::Protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into())
                })?;
                return finish(size, flags, block_sizes, structured_replies);
            }
            wire::REP_ERR_UNSUP => {
                return export_name(s, export, no_zeroes, structured_replies);
            }
            r if r & wire::REP_FLAG_ERROR != 0 => {
                return Err(NbdError::Refused(format!(
                    "export {export:?}: {}",
                    error_text(r, &payload)
                )));
            }
            r => {
                return Err(NbdError::Protocol(format!(
                    "unexpected reply {r:#x} to NBD_OPT_GO"
                )));
            }
        }
    }
    Err(NbdError::Protocol(format!(
        "more than {MAX_REPLIES_PER_OPTION} replies to NBD_OPT_GO"
    )))
}

fn export_name<S: Read + Write>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
    structured_replies: bool,
) -> Result<Export, NbdError> {
    s.write_all(&wire::encode_option(
        wire::OPT_EXPORT_NAME,
        export.as_bytes(),
    ))?;
    let (size, flags) = wire::parse_export_name_reply(&read_array::<10, _>(s)?)?;
    if !no_zeroes {
        let _zeroes: [u8; 124] = read_array(s)?;
    }
    finish(size, flags, None, structured_replies)
}

fn finish(
    size: u64,
    flags: u16,
    block_sizes: Option<BlockSizes>,
    structured_replies: bool,
) -> Result<Export, NbdError> {
    if flags & wire::TFLAG_HAS_FLAGS == 0 {
        return Err(NbdError::Protocol(
            "transmission flags without NBD_FLAG_HAS_FLAGS".into(),
        ));
    }
    if i64::try_from(size).is_err() {
        return Err(NbdError::Protocol(format!(
            "export size {size} is too large"
        )));
    }
    Ok(Export {
        size,
        flags,
        block_sizes,
        structured_replies,
    })
}
