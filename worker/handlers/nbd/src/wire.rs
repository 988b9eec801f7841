//! # The NBD wire format: constants, encoders and bounded decoders
//!
//! Everything the client sends or receives, as pure functions over byte slices: no I/O here, so
//! the decoders can be fuzzed on their own. Every number on the wire is big-endian ("network
//! byte order").
//!
//! Terms: the *handshake* (or option haggling) is the first phase of a connection, in which the
//! client picks an export and features with *options* (`NBD_OPT_*`) that the server answers
//! with *option replies* (`NBD_REP_*`). The *transmission* phase follows: *requests*
//! (`NBD_CMD_*`, each tagged with a 64-bit *cookie* the reply repeats) and *replies*, either
//! *simple* (a status and, for a read, the data) or *structured* (one or more *chunks*, the
//! last flagged `DONE`).
//!
//! Everything received is untrusted: decoders check magic numbers, lengths against fixed
//! bounds, and offsets against the request they answer, and return [`WireError`] instead of
//! panicking or allocating what a peer asks for.

use thiserror::Error;

/// `NBDMAGIC`: the first 8 bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, and the prefix of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server may omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`, please.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Option: enter transmission on this export (old way; cannot fail gracefully).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end negotiation without transmission.
pub const OPT_ABORT: u32 = 2;
/// Option: enter transmission on this export, with information replies first.
pub const OPT_GO: u32 = 7;
/// Option: ask for structured replies in the transmission phase.
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply: success (and the end of this option's replies).
pub const REP_ACK: u32 = 1;
/// Option reply: information about the export (`NBD_INFO_*`), more replies follow.
pub const REP_INFO: u32 = 3;
/// Bit 31 of an option reply type marks an error.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option reply error: the option is not supported.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option reply error: the server requires TLS.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Option reply error: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;

/// Information type: size and transmission flags of the export.
pub const INFO_EXPORT: u16 = 0;
/// Information type: the export's block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the other flags are valid.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server takes `NBD_CMD_FLUSH`.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the server honours `NBD_CMD_FLAG_FUA`.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the server takes `NBD_CMD_TRIM`.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: the server takes `NBD_CMD_WRITE_ZEROES`.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: several connections to this export see each other's flushed writes.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Request type: read.
pub const CMD_READ: u16 = 0;
/// Request type: write (data follows the header).
pub const CMD_WRITE: u16 = 1;
/// Request type: soft disconnect.
pub const CMD_DISC: u16 = 2;
/// Request type: make every completed write durable.
pub const CMD_FLUSH: u16 = 3;
/// Request type: discard a range.
pub const CMD_TRIM: u16 = 4;
/// Request type: write zeroes to a range without sending them.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Request flag: durable before the reply (forced unit access).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Request flag (write zeroes): the range must stay allocated.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Structured reply flag: the last chunk of this reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured chunk type: no payload (a successful end).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Structured chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured chunk type: a range that reads as zeroes.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Bit 15 of a chunk type marks an error chunk.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// Structured chunk type: an error for the whole request.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
/// Structured chunk type: an error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

/// Longest string (export name, error message) either side may send.
pub const MAX_STRING: usize = 4096;
/// Longest option reply payload this client accepts.
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Largest single request this client sends (and so the largest data a reply may carry).
pub const MAX_REQUEST_BYTES: u32 = 32 * 1024 * 1024;

/// What is wrong with bytes a server sent.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// A magic number did not match.
    #[error("bad magic {got:#x} where {what} was expected")]
    Magic {
        /// Which magic.
        what: &'static str,
        /// What came instead.
        got: u64,
    },
    /// Fewer bytes than the structure needs.
    #[error("{what}: {got} bytes, at least {need} needed")]
    Short {
        /// The structure.
        what: &'static str,
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A length field is over its bound.
    #[error("{what}: length {got} exceeds {max}")]
    TooLong {
        /// The field.
        what: &'static str,
        /// The length announced.
        got: u64,
        /// The bound.
        max: u64,
    },
    /// A field holds a value the protocol forbids here.
    #[error("{0}")]
    Invalid(String),
}

fn be_u16(b: &[u8], at: usize, what: &'static str) -> Result<u16, WireError> {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_be_bytes)
        .ok_or(WireError::Short {
            what,
            got: b.len(),
            need: at + 2,
        })
}

fn be_u32(b: &[u8], at: usize, what: &'static str) -> Result<u32, WireError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or(WireError::Short {
            what,
            got: b.len(),
            need: at + 4,
        })
}

fn be_u64(b: &[u8], at: usize, what: &'static str) -> Result<u64, WireError> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or(WireError::Short {
            what,
            got: b.len(),
            need: at + 8,
        })
}

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags (18 bytes).
pub fn parse_greeting(b: &[u8; 18]) -> Result<u16, WireError> {
    let magic = be_u64(b, 0, "greeting")?;
    if magic != NBD_MAGIC {
        return Err(WireError::Magic {
            what: "NBDMAGIC",
            got: magic,
        });
    }
    let opt = be_u64(b, 8, "greeting")?;
    if opt != IHAVEOPT {
        return Err(WireError::Magic {
            what: "IHAVEOPT (oldstyle servers are not supported)",
            got: opt,
        });
    }
    be_u16(b, 16, "greeting")
}

/// An option the client sends: `IHAVEOPT`, option, length, data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// `NBD_OPT_GO`'s data: the export name and the information types asked for.
pub fn encode_go(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + export.len() + 2 * infos.len());
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        out.extend_from_slice(&i.to_be_bytes());
    }
    out
}

/// The fixed 20-byte header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this answers.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply: u32,
    /// Payload length that follows (bounded by [`MAX_OPTION_REPLY`]).
    pub len: u32,
}

/// Decodes an option reply header.
pub fn parse_option_reply_header(b: &[u8; 20]) -> Result<OptionReplyHeader, WireError> {
    let magic = be_u64(b, 0, "option reply")?;
    if magic != OPT_REPLY_MAGIC {
        return Err(WireError::Magic {
            what: "option reply magic",
            got: magic,
        });
    }
    let h = OptionReplyHeader {
        option: be_u32(b, 8, "option reply")?,
        reply: be_u32(b, 12, "option reply")?,
        len: be_u32(b, 16, "option reply")?,
    };
    if h.len > MAX_OPTION_REPLY {
        return Err(WireError::TooLong {
            what: "option reply",
            got: u64::from(h.len),
            max: u64::from(MAX_OPTION_REPLY),
        });
    }
    Ok(h)
}

/// Block size constraints of an export (`NBD_INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest addressable unit (a power of two, 1 to 64 KiB).
    pub minimum: u32,
    /// What the server prefers (a power of two, at least `minimum`).
    pub preferred: u32,
    /// Largest payload of one request.
    pub maximum: u32,
}

/// One `NBD_REP_INFO` payload this client understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    /// Size in bytes and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// `TFLAG_*`.
        flags: u16,
    },
    /// Block size constraints.
    BlockSize(BlockSizes),
    /// A type this client did not ask for or does not know: ignored.
    Other(u16),
}

/// Decodes an `NBD_REP_INFO` payload.
pub fn parse_info(payload: &[u8]) -> Result<Info, WireError> {
    let kind = be_u16(payload, 0, "info")?;
    match kind {
        INFO_EXPORT => {
            if payload.len() != 12 {
                return Err(WireError::Invalid(format!(
                    "NBD_INFO_EXPORT of {} bytes, expected 12",
                    payload.len()
                )));
            }
            Ok(Info::Export {
                size: be_u64(payload, 2, "info export")?,
                flags: be_u16(payload, 10, "info export")?,
            })
        }
        INFO_BLOCK_SIZE => {
            if payload.len() != 14 {
                return Err(WireError::Invalid(format!(
                    "NBD_INFO_BLOCK_SIZE of {} bytes, expected 14",
                    payload.len()
                )));
            }
            let sizes = BlockSizes {
                minimum: be_u32(payload, 2, "info block size")?,
                preferred: be_u32(payload, 6, "info block size")?,
                maximum: be_u32(payload, 10, "info block size")?,
            };
            let pow2 = |v: u32| v.is_power_of_two();
            if !pow2(sizes.minimum)
                || sizes.minimum > 65536
                || !pow2(sizes.preferred)
                || sizes.preferred < sizes.minimum
                || sizes.maximum < sizes.minimum
            {
                return Err(WireError::Invalid(format!(
                    "inconsistent block sizes {sizes:?}"
                )));
            }
            Ok(Info::BlockSize(sizes))
        }
        other => Ok(Info::Other(other)),
    }
}

/// The reply to `NBD_OPT_EXPORT_NAME` (no option reply framing): size and flags, then 124 zero
/// bytes unless `NO_ZEROES` was agreed (the caller reads those).
pub fn parse_export_name_reply(b: &[u8; 10]) -> Result<(u64, u16), WireError> {
    Ok((be_u64(b, 0, "export reply")?, be_u16(b, 8, "export reply")?))
}

/// A request header (28 bytes); a write's data follows it.
pub fn encode_request(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut out = [0u8; 28];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..24].copy_from_slice(&offset.to_be_bytes());
    out[24..28].copy_from_slice(&len.to_be_bytes());
    out
}

/// The start of any reply: which kind it is. A simple reply header is 16 bytes, a structured
/// chunk header 20; both begin with a 4-byte magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// 12 more header bytes: error, cookie.
    Simple,
    /// 16 more header bytes: flags, type, cookie, payload length.
    Structured,
}

/// Which reply a 4-byte magic announces.
pub fn reply_kind(magic: [u8; 4]) -> Result<ReplyKind, WireError> {
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => Ok(ReplyKind::Simple),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyKind::Structured),
        other => Err(WireError::Magic {
            what: "reply magic",
            got: u64::from(other),
        }),
    }
}

/// The rest of a simple reply header: (error, cookie).
pub fn parse_simple_rest(b: &[u8; 12]) -> Result<(u32, u64), WireError> {
    Ok((be_u32(b, 0, "simple reply")?, be_u64(b, 4, "simple reply")?))
}

/// The rest of a structured chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `REPLY_FLAG_*`.
    pub flags: u16,
    /// `REPLY_TYPE_*`.
    pub kind: u16,
    /// The request it answers.
    pub cookie: u64,
    /// Payload length (bounded by [`MAX_REQUEST_BYTES`] + 8).
    pub len: u32,
}

/// Decodes the 16 bytes after a structured reply magic.
pub fn parse_chunk_rest(b: &[u8; 16]) -> Result<ChunkHeader, WireError> {
    let h = ChunkHeader {
        flags: be_u16(b, 0, "chunk")?,
        kind: be_u16(b, 2, "chunk")?,
        cookie: be_u64(b, 4, "chunk")?,
        len: be_u32(b, 12, "chunk")?,
    };
    let max = MAX_REQUEST_BYTES + 8;
    if h.len > max {
        return Err(WireError::TooLong {
            what: "chunk payload",
            got: u64::from(h.len),
            max: u64::from(max),
        });
    }
    Ok(h)
}

/// A decoded chunk payload, checked against the request it answers (`req_offset`,
/// `req_len`): data and holes must lie inside the request.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// Nothing (a successful end).
    None,
    /// Data for `[offset, offset + data.len())`, relative to the request start.
    Data {
        /// Byte position inside the request.
        at: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// Zeroes for `[at, at + len)`, relative to the request start.
    Hole {
        /// Byte position inside the request.
        at: u64,
        /// Length.
        len: u32,
    },
    /// The request failed with this errno-style code.
    Error {
        /// `NBD_E*` (errno values: EIO 5, ENOSPC 28, ...).
        code: u32,
        /// The server's message (lossily decoded, bounded).
        message: String,
    },
}

/// Decodes and checks a chunk's payload.
pub fn parse_chunk<'a>(
    h: &ChunkHeader,
    payload: &'a [u8],
    req_offset: u64,
    req_len: u32,
) -> Result<Chunk<'a>, WireError> {
    let inside = |off: u64, len: u64| -> Result<u64, WireError> {
        let at = off.checked_sub(req_offset).ok_or_else(|| {
            WireError::Invalid(format!("chunk at {off} before the request at {req_offset}"))
        })?;
        if at
            .checked_add(len)
            .is_none_or(|end| end > u64::from(req_len))
        {
            return Err(WireError::Invalid(format!(
                "chunk [{off}, +{len}) outside the request [{req_offset}, +{req_len})"
            )));
        }
        Ok(at)
    };
    match h.kind {
        REPLY_TYPE_NONE => {
            if !payload.is_empty() || h.flags & REPLY_FLAG_DONE == 0 {
                return Err(WireError::Invalid(
                    "NBD_REPLY_TYPE_NONE with a payload or without DONE".into(),
                ));
            }
            Ok(Chunk::None)
        }
        REPLY_TYPE_OFFSET_DATA => {
            let off = be_u64(payload, 0, "offset data")?;
            let data = payload.get(8..).unwrap_or_default();
            if data.is_empty() {
                return Err(WireError::Invalid(
                    "empty NBD_REPLY_TYPE_OFFSET_DATA".into(),
                ));
            }
            let at = inside(off, data.len() as u64)?;
            Ok(Chunk::Data { at, data })
        }
        REPLY_TYPE_OFFSET_HOLE => {
            if payload.len() != 12 {
                return Err(WireError::Invalid(format!(
                    "NBD_REPLY_TYPE_OFFSET_HOLE of {} bytes",
                    payload.len()
                )));
            }
            let off = be_u64(payload, 0, "offset hole")?;
            let len = be_u32(payload, 8, "offset hole")?;
            if len == 0 {
                return Err(WireError::Invalid(
                    "empty NBD_REPLY_TYPE_OFFSET_HOLE".into(),
                ));
            }
            let at = inside(off, u64::from(len))?;
            Ok(Chunk::Hole { at, len })
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            let code = be_u32(payload, 0, "error chunk")?;
            let mlen = usize::from(be_u16(payload, 4, "error chunk")?);
            let message = payload.get(6..6 + mlen).ok_or(WireError::Short {
                what: "error chunk message",
                got: payload.len(),
                need: 6 + mlen,
            })?;
            let tail = payload.len() - 6 - mlen;
            let expected_tail = if h.kind == REPLY_TYPE_ERROR_OFFSET {
                8
            } else {
                0
            };
            if tail != expected_tail {
                return Err(WireError::Invalid(format!(
                    "error chunk with {tail} trailing bytes"
                )));
            }
            if code == 0 {
                return Err(WireError::Invalid("error chunk with error 0".into()));
            }
            let message =
                String::from_utf8_lossy(message.get(..MAX_STRING.min(mlen)).unwrap_or_default())
                    .into_owned();
            Ok(Chunk::Error { code, message })
        }
        kind if kind & REPLY_TYPE_FLAG_ERROR != 0 => {
            // An error type this client does not know: still an error (the spec says so).
            let code = be_u32(payload, 0, "error chunk").unwrap_or(5);
            Ok(Chunk::Error {
                code: if code == 0 { 5 } else { code },
                message: format!("error chunk of unknown type {kind:#x}"),
            })
        }
        kind => Err(WireError::Invalid(format!(
            "unexpected structured reply type {kind} (not negotiated)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(kind: u16, flags: u16, len: u32) -> ChunkHeader {
        ChunkHeader {
            flags,
            kind,
            cookie: 1,
            len,
        }
    }

    #[test]
    fn greeting_and_option_framing() {
        let mut g = [0u8; 18];
        g[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
        g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        g[16..].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_greeting(&g), Ok(3));
        g[8..16].copy_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
        assert!(matches!(parse_greeting(&g), Err(WireError::Magic { .. })));
        let opt = encode_option(OPT_GO, &encode_go("disk", &[INFO_BLOCK_SIZE]));
        assert_eq!(&opt[..8], &IHAVEOPT.to_be_bytes());
        assert_eq!(&opt[8..12], &OPT_GO.to_be_bytes());
        assert_eq!(&opt[12..16], &(4 + 4 + 2 + 2u32).to_be_bytes());
        assert_eq!(&opt[20..24], b"disk");
    }

    #[test]
    fn option_replies_are_bounded() {
        let mut h = [0u8; 20];
        h[..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        h[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        h[12..16].copy_from_slice(&REP_INFO.to_be_bytes());
        h[16..20].copy_from_slice(&12u32.to_be_bytes());
        assert_eq!(
            parse_option_reply_header(&h),
            Ok(OptionReplyHeader {
                option: OPT_GO,
                reply: REP_INFO,
                len: 12
            })
        );
        h[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            parse_option_reply_header(&h),
            Err(WireError::TooLong { .. })
        ));
    }

    #[test]
    fn infos() {
        let mut e = vec![0, 0];
        e.extend_from_slice(&(1u64 << 30).to_be_bytes());
        e.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH).to_be_bytes());
        assert_eq!(
            parse_info(&e),
            Ok(Info::Export {
                size: 1 << 30,
                flags: TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH
            })
        );
        assert!(parse_info(&e[..11]).is_err());
        let mut b = vec![0, 3];
        for v in [512u32, 4096, 1 << 25] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        assert!(matches!(parse_info(&b), Ok(Info::BlockSize(_))));
        b[2..6].copy_from_slice(&3u32.to_be_bytes());
        assert!(parse_info(&b).is_err());
        assert_eq!(parse_info(&[0, 9, 1, 2]), Ok(Info::Other(9)));
        assert!(parse_info(&[0]).is_err());
    }

    #[test]
    fn chunks_must_stay_inside_their_request() {
        let mut p = 1000u64.to_be_bytes().to_vec();
        p.extend_from_slice(&[7; 100]);
        let h = chunk(REPLY_TYPE_OFFSET_DATA, 0, p.len() as u32);
        assert_eq!(
            parse_chunk(&h, &p, 900, 200),
            Ok(Chunk::Data {
                at: 100,
                data: &[7; 100]
            })
        );
        assert!(parse_chunk(&h, &p, 900, 150).is_err(), "past the end");
        assert!(parse_chunk(&h, &p, 1001, 200).is_err(), "before the start");
        let mut hole = u64::MAX.to_be_bytes().to_vec();
        hole.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(
            parse_chunk(&chunk(REPLY_TYPE_OFFSET_HOLE, 0, 12), &hole, 0, 4096).is_err(),
            "overflow"
        );
        let mut err = 5u32.to_be_bytes().to_vec();
        err.extend_from_slice(&3u16.to_be_bytes());
        err.extend_from_slice(b"bad");
        assert_eq!(
            parse_chunk(&chunk(REPLY_TYPE_ERROR, REPLY_FLAG_DONE, 9), &err, 0, 1),
            Ok(Chunk::Error {
                code: 5,
                message: "bad".into()
            })
        );
        err.push(0);
        assert!(parse_chunk(&chunk(REPLY_TYPE_ERROR, REPLY_FLAG_DONE, 10), &err, 0, 1).is_err());
        assert!(parse_chunk(&chunk(REPLY_TYPE_NONE, 0, 0), &[], 0, 1).is_err());
        assert_eq!(
            parse_chunk(&chunk(REPLY_TYPE_NONE, REPLY_FLAG_DONE, 0), &[], 0, 1),
            Ok(Chunk::None)
        );
        assert!(parse_chunk(&chunk(5, REPLY_FLAG_DONE, 0), &[], 0, 1).is_err());
    }

    #[test]
    fn request_header_layout() {
        let r = encode_request(CMD_FLAG_FUA, CMD_WRITE, 0x0102_0304_0506_0708, 4096, 512);
        assert_eq!(&r[..4], &REQUEST_MAGIC.to_be_bytes());
        assert_eq!(&r[4..6], &[0, 1]);
        assert_eq!(&r[6..8], &[0, 1]);
        assert_eq!(&r[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&r[24..28], &512u32.to_be_bytes());
    }
}
