//! Tests of the SCSI emulation against an in-memory handler.

mod block;
mod caw;
mod copy;
mod inquiry;
mod medium;
mod misc;
mod mode;
mod prop;
mod rsoc;
mod scsi2_lun;

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use super::sense::key;
use super::{Command, CommandResult, Emulator, Sense, status};
use tcmu_warden_sdk::DataBuf;
use tcmu_warden_sdk::{DeviceConfig, Handler, HandlerCaps};

pub const BS: usize = 512;

/// One call the handler saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Read {
        off: u64,
        len: usize,
        slices: usize,
    },
    Write {
        off: u64,
        len: usize,
        slices: usize,
        durable: bool,
    },
    Flush,
    Unmap {
        off: u64,
        len: u64,
    },
}

/// A Vec-backed handler that records every call and can be told to fail.
pub struct MemHandler {
    pub data: Mutex<Vec<u8>>,
    pub caps: HandlerCaps,
    pub calls: Mutex<Vec<Call>>,
    pub flushes: AtomicUsize,
    pub writes: AtomicUsize,
    pub fail_read: Mutex<Option<io::Error>>,
    pub fail_write: Mutex<Option<io::Error>>,
    pub fail_flush: Mutex<Option<io::Error>>,
    pub opcodes: Vec<u8>,
    /// Yield inside reads, widening race windows for the concurrency tests.
    pub slow_reads: bool,
    /// Interleaving detector: per-block write generation, and per-thread the generations seen
    /// by that thread's last read.
    gens: Mutex<Vec<u64>>,
    last_read: Mutex<HashMap<ThreadId, (usize, Vec<u64>)>>,
    pub interleavings: AtomicUsize,
}

fn clone_err(e: &Option<io::Error>) -> Option<io::Error> {
    e.as_ref().map(|e| match e.raw_os_error() {
        Some(n) => io::Error::from_raw_os_error(n),
        None => io::Error::new(e.kind(), e.to_string()),
    })
}

impl MemHandler {
    pub fn new(size: usize, caps: HandlerCaps) -> MemHandler {
        MemHandler {
            data: Mutex::new(vec![0; size]),
            caps,
            calls: Mutex::new(Vec::new()),
            flushes: AtomicUsize::new(0),
            writes: AtomicUsize::new(0),
            fail_read: Mutex::new(None),
            fail_write: Mutex::new(None),
            fail_flush: Mutex::new(None),
            opcodes: Vec::new(),
            slow_reads: false,
            gens: Mutex::new(vec![0; size / BS]),
            last_read: Mutex::new(HashMap::new()),
            interleavings: AtomicUsize::new(0),
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    pub fn clear_calls(&self) {
        self.calls.lock().unwrap().clear();
    }

    pub fn bytes(&self, off: usize, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[off..off + len].to_vec()
    }

    pub fn fill(&self, off: usize, bytes: &[u8]) {
        self.data.lock().unwrap()[off..off + bytes.len()].copy_from_slice(bytes);
    }

    pub fn write_calls(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| matches!(c, Call::Write { .. }))
            .collect()
    }

    /// For each write so far, in order, whether it was asked to be durable.
    pub fn write_durability(&self) -> Vec<bool> {
        self.write_calls()
            .iter()
            .map(|c| matches!(c, Call::Write { durable: true, .. }))
            .collect()
    }
}

impl Handler for MemHandler {
    fn caps(&self) -> HandlerCaps {
        self.caps
    }

    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        if let Some(e) = clone_err(&self.fail_read.lock().unwrap()) {
            return Err(e);
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        self.calls.lock().unwrap().push(Call::Read {
            off: offset,
            len: total,
            slices: bufs.len(),
        });
        {
            let data = self.data.lock().unwrap();
            let mut pos = offset as usize;
            for b in bufs.iter_mut() {
                for byte in b.iter_mut() {
                    *byte = data.get(pos).copied().unwrap_or(0);
                    pos += 1;
                }
            }
            let gens = self.gens.lock().unwrap();
            let first = offset as usize / BS;
            let last = (offset as usize + total).div_ceil(BS).min(gens.len());
            let seen = gens[first.min(last)..last].to_vec();
            self.last_read
                .lock()
                .unwrap()
                .insert(std::thread::current().id(), (first, seen));
        }
        if self.slow_reads {
            for _ in 0..20 {
                std::thread::yield_now();
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, bufs: &[IoSlice<'_>], durable: bool) -> io::Result<()> {
        if let Some(e) = clone_err(&self.fail_write.lock().unwrap()) {
            return Err(e);
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut data = self.data.lock().unwrap();
        if offset as usize + total > data.len() {
            return Err(io::Error::other("write beyond the end of the store"));
        }
        // A read-then-write on one thread (COMPARE AND WRITE) must see no foreign write to the
        // blocks between its read and its write.
        let mut gens = self.gens.lock().unwrap();
        if let Some((first, seen)) = self
            .last_read
            .lock()
            .unwrap()
            .remove(&std::thread::current().id())
        {
            if seen
                .iter()
                .enumerate()
                .any(|(i, g)| gens.get(first + i) != Some(g))
            {
                self.interleavings.fetch_add(1, Ordering::SeqCst);
            }
        }
        let mut pos = offset as usize;
        for b in bufs {
            data[pos..pos + b.len()].copy_from_slice(b);
            pos += b.len();
        }
        let first = offset as usize / BS;
        let last = (offset as usize + total).div_ceil(BS);
        for g in &mut gens[first..last] {
            *g += 1;
        }
        drop(gens);
        drop(data);
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.calls.lock().unwrap().push(Call::Write {
            off: offset,
            len: total,
            slices: bufs.len(),
            durable,
        });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if let Some(e) = clone_err(&self.fail_flush.lock().unwrap()) {
            return Err(e);
        }
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.calls.lock().unwrap().push(Call::Flush);
        Ok(())
    }

    fn unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        assert!(self.caps.unmap, "unmap called on a handler without unmap");
        let mut data = self.data.lock().unwrap();
        data[offset as usize..(offset + len) as usize].fill(0);
        drop(data);
        self.calls
            .lock()
            .unwrap()
            .push(Call::Unmap { off: offset, len });
        Ok(())
    }

    fn implemented_opcodes(&self) -> &[u8] {
        &self.opcodes
    }

    fn execute(&self, cmd: &mut Command<'_>) -> CommandResult {
        // Answers with its own marker, so tests can tell who answered.
        cmd.data.copy_from(0, b"handler");
        let mut r = CommandResult::good();
        r.read_len = Some(7);
        r
    }
}

pub fn cfg(blocks: u64) -> DeviceConfig {
    DeviceConfig {
        name: "disk0".into(),
        subtype: "file".into(),
        cfgstring: "/var/lib/disk0.img".into(),
        dev_size: blocks * BS as u64,
        block_size: BS as u32,
        max_sectors: 128,
        write_cache: false,
        unit_serial: "6c1f1a0e-9f3b-4c5d-8e7f-0123456789ab".into(),
    }
}

/// An emulator over a 2048-block (1 MiB) in-memory device, plus its handler.
pub struct Dev {
    pub emu: Emulator,
    pub h: Arc<MemHandler>,
}

impl Dev {
    pub fn new() -> Dev {
        Dev::with(cfg(2048), HandlerCaps::default(), |_| {})
    }

    pub fn thin() -> Dev {
        Dev::with(
            cfg(2048),
            HandlerCaps {
                unmap: true,
                unmap_granularity: 8,
                unmap_reads_zero: true,
            },
            |_| {},
        )
    }

    /// A 64-block thin-provisioned device whose unmapped blocks do not read back as zeroes,
    /// with no preferred unmap granularity.
    pub fn thin_unzeroed() -> Dev {
        Dev::with(
            cfg(64),
            HandlerCaps {
                unmap: true,
                unmap_granularity: 0,
                unmap_reads_zero: false,
            },
            |_| {},
        )
    }

    pub fn with(c: DeviceConfig, caps: HandlerCaps, tweak: impl FnOnce(&mut MemHandler)) -> Dev {
        let mut h = MemHandler::new(c.dev_size as usize, caps);
        tweak(&mut h);
        let h = Arc::new(h);
        Dev {
            emu: Emulator::new(&c, h.clone()),
            h,
        }
    }

    /// Runs a command without data.
    pub fn run(&self, cdb: &[u8]) -> CommandResult {
        let mut d = DataBuf::empty();
        self.run_buf(cdb, &mut d)
    }

    pub fn run_buf(&self, cdb: &[u8], data: &mut DataBuf) -> CommandResult {
        self.emu.execute(&mut Command {
            cdb,
            data,
            bidi_in: None,
        })
    }

    /// Runs a data-in command with a `len`-byte buffer; returns the result and the buffer.
    pub fn run_in(&self, cdb: &[u8], len: usize) -> (CommandResult, Vec<u8>) {
        let mut d = DataBuf::from_segments(vec![vec![0xAA; len]]);
        let r = self.run_buf(cdb, &mut d);
        (r, d.to_vec())
    }

    /// Runs a data-in command and returns exactly the bytes transferred (asserting GOOD).
    pub fn data_in(&self, cdb: &[u8], len: usize) -> Vec<u8> {
        let (r, mut v) = self.run_in(cdb, len);
        assert_good(&r);
        if let Some(n) = r.read_len {
            v.truncate(n as usize);
        }
        v
    }

    /// Runs a data-out command.
    pub fn run_out(&self, cdb: &[u8], data: &[u8]) -> CommandResult {
        let mut d = DataBuf::from_segments(vec![data.to_vec()]);
        self.run_buf(cdb, &mut d)
    }
}

#[track_caller]
pub fn assert_good(r: &CommandResult) {
    assert_eq!(r.status, status::GOOD, "expected GOOD, got {r:?}");
    assert!(r.sense.is_none());
}

#[track_caller]
pub fn assert_sense(r: &CommandResult, k: u8, asc: u8, ascq: u8) -> Sense {
    assert_eq!(
        r.status,
        status::CHECK_CONDITION,
        "expected CHECK CONDITION, got {r:?}"
    );
    let s = r.sense.expect("sense data");
    assert_eq!((s.key, s.asc, s.ascq), (k, asc, ascq), "sense {s:?}");
    s
}

/// Asserts INVALID FIELD IN CDB pointing at `byte`/`bit`, and checks the encoded SKS bytes.
#[track_caller]
pub fn assert_bad_cdb_field(r: &CommandResult, byte: u16, bit: u8) {
    let s = assert_sense(r, key::ILLEGAL_REQUEST, 0x24, 0x00);
    let b = s.to_bytes();
    assert_eq!(
        b[15],
        0x80 | 0x40 | 0x08 | bit,
        "SKSV, C/D, BPV, bit in {b:02x?}"
    );
    assert_eq!(
        u16::from_be_bytes([b[16], b[17]]),
        byte,
        "field pointer in {b:02x?}"
    );
}

/// Asserts INVALID FIELD IN PARAMETER LIST pointing at `byte`/`bit` (C/D = 0).
#[track_caller]
pub fn assert_bad_param_field(r: &CommandResult, byte: u16, bit: u8) {
    let s = assert_sense(r, key::ILLEGAL_REQUEST, 0x26, 0x00);
    let b = s.to_bytes();
    assert_eq!(
        b[15],
        0x80 | 0x08 | bit,
        "SKSV, C/D=0, BPV, bit in {b:02x?}"
    );
    assert_eq!(
        u16::from_be_bytes([b[16], b[17]]),
        byte,
        "field pointer in {b:02x?}"
    );
}

#[track_caller]
pub fn assert_lba_out_of_range(r: &CommandResult) {
    assert_sense(r, key::ILLEGAL_REQUEST, 0x21, 0x00);
}

// ---- CDB builders ----

pub fn rw10(opcode: u8, lba: u32, blocks: u16, flags: u8) -> Vec<u8> {
    let mut c = vec![opcode, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&blocks.to_be_bytes());
    c.push(0);
    c
}

pub fn rw12(opcode: u8, lba: u32, blocks: u32, flags: u8) -> Vec<u8> {
    let mut c = vec![opcode, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&blocks.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

pub fn rw16(opcode: u8, lba: u64, blocks: u32, flags: u8) -> Vec<u8> {
    let mut c = vec![opcode, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&blocks.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

pub fn rw6(opcode: u8, lba: u32, blocks: u8) -> Vec<u8> {
    let l = lba.to_be_bytes();
    vec![opcode, l[1] & 0x1F, l[2], l[3], blocks, 0]
}

pub fn inquiry(evpd: bool, page: u8, alloc: u16) -> Vec<u8> {
    let a = alloc.to_be_bytes();
    vec![0x12, u8::from(evpd), page, a[0], a[1], 0]
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
