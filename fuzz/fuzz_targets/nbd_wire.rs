//! The NBD client's decoders against arbitrary server bytes: the handshake as a whole (the
//! input is everything the "server" sends; what the client writes goes nowhere), and each
//! transmission-phase decoder on its own. Nothing may panic, allocate beyond the bounds in
//! `tcmu_warden_nbd::wire`, or accept a chunk outside its request.
#![no_main]

use std::io::{Cursor, Read, Write};

use libfuzzer_sys::fuzz_target;
use tcmu_warden_nbd::handshake::negotiate;
use tcmu_warden_nbd::wire;

/// A fake server: reads come from the fuzz input, writes are discarded.
struct Fake<'a>(Cursor<&'a [u8]>);

impl Read for Fake<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Fake<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => {
            let _ = negotiate(&mut Fake(Cursor::new(rest)), "disk");
        }
        1 => {
            // A chunk header and payload answering a read at a fuzzed place.
            if rest.len() < 28 {
                return;
            }
            let (head, payload) = rest.split_at(28);
            let mut h16 = [0u8; 16];
            h16.copy_from_slice(&head[..16]);
            let req_offset = u64::from_be_bytes(head[16..24].try_into().unwrap_or_default());
            let req_len = u32::from_be_bytes(head[24..28].try_into().unwrap_or_default());
            if let Ok(h) = wire::parse_chunk_rest(&h16) {
                let payload = payload.get(..h.len as usize).unwrap_or(payload);
                if let Ok(chunk) = wire::parse_chunk(&h, payload, req_offset, req_len) {
                    match chunk {
                        wire::Chunk::Data { at, data } => {
                            assert!(at + data.len() as u64 <= u64::from(req_len));
                        }
                        wire::Chunk::Hole { at, len } => {
                            assert!(at + u64::from(len) <= u64::from(req_len));
                        }
                        _ => {}
                    }
                }
            }
        }
        _ => {
            let _ = wire::parse_info(rest);
            if let Some(m) = rest.get(..4) {
                let _ = wire::reply_kind([m[0], m[1], m[2], m[3]]);
            }
            if let Some(h) = rest.get(..20).and_then(|h| <&[u8; 20]>::try_from(h).ok()) {
                let _ = wire::parse_option_reply_header(h);
            }
        }
    }
});
