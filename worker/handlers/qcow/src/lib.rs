//! qcow2 image reading for the `qcow` handler (issue 12 section 2): the
//! first, read-only piece.
//!
//! What this module owns: parsing a qcow2 header (versions 2 and 3), the L1
//! and L2 tables, and turning a guest byte range into data: allocated
//! clusters are read from the image, unallocated clusters come from the
//! backing image (a [`Storage`] the caller passes, already opened: this
//! library never opens a path) or read as zeros, zero clusters read as zeros,
//! compressed clusters are inflated (zlib = raw deflate, and zstd).
//!
//! What it must never do: trust the image. Every field is bounds-checked
//! before use: offsets must lie inside the file and be cluster aligned where
//! the specification says so, table lengths are capped
//! ([`MAX_L1_ENTRIES`]), no allocation is sized by an unchecked header field,
//! and every failure is a typed [`Error`], never a panic.
//!
//! Refused clearly at [`Image::open`]: unknown incompatible feature bits,
//! the dirty bit (bit 0: refcounts may be stale after a crash with
//! `lazy_refcounts`; we refuse rather than repair — run `qemu-img check -r
//! all`), the corrupt bit, external data files, extended L2 entries,
//! encryption, cluster sizes outside 512 B..2 MiB.
//!
//! Not done yet: writing (cluster allocation with crash-safe ordering),
//! discard, snapshot-aware copy-on-write. The image is served read-only.
//!
//! Why not a crate such as `qcow2-rs`: it is young, async-runtime bound and
//! does its own path opening; the read path is small enough to own and audit
//! here, while decompression uses well-kept crates (`miniz_oxide`, pure Rust
//! deflate; `ruzstd`, pure Rust zstd), so no C dependency enters the worker.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;

/// The qcow2 magic, "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// The largest L1 table accepted (32 MiB of entries): bounds memory.
pub const MAX_L1_ENTRIES: u32 = 4 * 1024 * 1024;
/// Mask of the host offset bits (9..=55) of L1 and standard L2 entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
const KNOWN_INCOMPAT: u64 = 0b1_1111;

/// A typed failure reading an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a qcow2 image (bad magic {0:#x})")]
    BadMagic(u32),
    #[error("unsupported qcow2 version {0}")]
    Version(u32),
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    #[error("unknown incompatible feature bits {0:#x}")]
    UnknownIncompatible(u64),
    #[error("corrupt image: {0}")]
    Corrupt(&'static str),
    #[error("read past the end of the virtual disk")]
    OutOfRange,
}

/// Somewhere bytes can be read at an offset: the image file or a backing
/// image. Implemented for [`File`] and for `Vec<u8>` (tests, fuzzing).
pub trait Storage {
    /// Fills `buf` from `offset`; bytes past the end read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error>;
    /// The storage's length in bytes.
    fn byte_len(&self) -> Result<u64, Error>;
}

impl Storage for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let mut rest = buf;
        let mut pos = offset;
        while !rest.is_empty() {
            let n = FileExt::read_at(self, rest, pos)?;
            if n == 0 {
                rest.fill(0);
                break;
            }
            rest = rest.get_mut(n..).unwrap_or_default();
            pos += n as u64;
        }
        Ok(())
    }
    fn byte_len(&self) -> Result<u64, Error> {
        Ok(self.metadata()?.len())
    }
}

impl Storage for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        buf.fill(0);
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let avail = self.get(start..).unwrap_or_default();
        for (d, s) in buf.iter_mut().zip(avail) {
            *d = *s;
        }
        Ok(())
    }
    fn byte_len(&self) -> Result<u64, Error> {
        Ok(self.len() as u64)
    }
}

/// How compressed clusters are encoded (header field `compression_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (qcow2 calls it zlib).
    Zlib,
    /// Zstandard frames.
    Zstd,
}

/// The parsed, validated header fields this library uses.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub nb_snapshots: u32,
    pub incompatible: u64,
    pub compression: Compression,
}

fn be32(b: &[u8], at: usize) -> Result<u32, Error> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or(Error::Corrupt("header too short"))
}
fn be64(b: &[u8], at: usize) -> Result<u64, Error> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or(Error::Corrupt("header too short"))
}

impl Header {
    /// Parses and validates the first bytes of an image (at least 104 for
    /// version 3, 72 for version 2). `file_len` bounds every offset.
    pub fn parse(b: &[u8], file_len: u64) -> Result<Header, Error> {
        let magic = be32(b, 0)?;
        if magic != MAGIC {
            return Err(Error::BadMagic(magic));
        }
        let version = be32(b, 4)?;
        if version != 2 && version != 3 {
            return Err(Error::Version(version));
        }
        let cluster_bits = be32(b, 20)?;
        if !(9..=21).contains(&cluster_bits) {
            return Err(Error::Unsupported("cluster size outside 512 B..2 MiB"));
        }
        if be32(b, 32)? != 0 {
            return Err(Error::Unsupported("encrypted image"));
        }
        let (incompatible, compression) = if version == 3 {
            let inc = be64(b, 72)?;
            if inc & !KNOWN_INCOMPAT != 0 {
                return Err(Error::UnknownIncompatible(inc & !KNOWN_INCOMPAT));
            }
            if inc & 1 != 0 {
                return Err(Error::Unsupported(
                    "dirty bit set (lazy refcounts not flushed): run qemu-img check -r all",
                ));
            }
            if inc & 2 != 0 {
                return Err(Error::Unsupported("image marked corrupt"));
            }
            if inc & 4 != 0 {
                return Err(Error::Unsupported("external data file"));
            }
            if inc & 16 != 0 {
                return Err(Error::Unsupported("extended L2 entries"));
            }
            let header_length = be32(b, 100)?;
            let comp = if inc & 8 != 0 {
                if header_length <= 104 {
                    return Err(Error::Corrupt("compression bit without compression_type"));
                }
                match b.get(104) {
                    Some(0) => Compression::Zlib,
                    Some(1) => Compression::Zstd,
                    _ => return Err(Error::Unsupported("unknown compression type")),
                }
            } else {
                Compression::Zlib
            };
            (inc, comp)
        } else {
            (0, Compression::Zlib)
        };
        let l1_size = be32(b, 36)?;
        if l1_size > MAX_L1_ENTRIES {
            return Err(Error::Unsupported("L1 table too large"));
        }
        let l1_table_offset = be64(b, 40)?;
        let cluster = 1u64 << cluster_bits;
        if l1_table_offset % cluster != 0
            || l1_table_offset
                .checked_add(u64::from(l1_size) * 8)
                .is_none_or(|end| end > file_len)
        {
            return Err(Error::Corrupt("L1 table outside the file"));
        }
        let size = be64(b, 24)?;
        // Every guest cluster must have an L1 slot.
        let l2_entries = cluster / 8;
        let needed = size.div_ceil(cluster).div_ceil(l2_entries);
        if needed > u64::from(l1_size) {
            return Err(Error::Corrupt("L1 table too small for the disk size"));
        }
        Ok(Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            backing_file_offset: be64(b, 8)?,
            backing_file_size: be32(b, 16)?,
            nb_snapshots: be32(b, 60)?,
            incompatible,
            compression,
        })
    }
}

/// An open qcow2 image, served read-only.
pub struct Image<S: Storage> {
    file: S,
    file_len: u64,
    header: Header,
    l1: Vec<u64>,
    backing: Option<Box<dyn Storage + Send + Sync>>,
}

impl<S: Storage> Image<S> {
    /// Opens an image; `backing` is the already-opened backing image, if
    /// the image names one (see [`Image::backing_name`]).
    pub fn open(file: S, backing: Option<Box<dyn Storage + Send + Sync>>) -> Result<Self, Error> {
        let file_len = file.byte_len()?;
        let mut hdr = [0u8; 112];
        file.read_at(&mut hdr, 0)?;
        let header = Header::parse(&hdr, file_len)?;
        let mut raw = vec![0u8; header.l1_size as usize * 8];
        file.read_at(&mut raw, header.l1_table_offset)?;
        let l1 = raw
            .chunks_exact(8)
            .map(|c| c.try_into().map(u64::from_be_bytes).unwrap_or(0))
            .collect();
        Ok(Image {
            file,
            file_len,
            header,
            l1,
            backing,
        })
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The backing file name stored in the header (bounded to 1023 bytes),
    /// for the supervisor to resolve; `None` without a backing file.
    pub fn backing_name(&self) -> Result<Option<Vec<u8>>, Error> {
        let h = &self.header;
        if h.backing_file_offset == 0 {
            return Ok(None);
        }
        if h.backing_file_size == 0 || h.backing_file_size > 1023 {
            return Err(Error::Corrupt("backing file name length"));
        }
        if h.backing_file_offset
            .checked_add(u64::from(h.backing_file_size))
            .is_none_or(|e| e > self.file_len)
        {
            return Err(Error::Corrupt("backing file name outside the file"));
        }
        let mut name = vec![0u8; h.backing_file_size as usize];
        self.file.read_at(&mut name, h.backing_file_offset)?;
        Ok(Some(name))
    }

    fn cluster_size(&self) -> u64 {
        1 << self.header.cluster_bits
    }

    fn checked_host(&self, off: u64, what: &'static str) -> Result<u64, Error> {
        if off % self.cluster_size() != 0
            || off.checked_add(self.cluster_size()).is_none_or(|e| {
                e > self.file_len.div_ceil(self.cluster_size()) * self.cluster_size()
            })
        {
            return Err(Error::Corrupt(what));
        }
        Ok(off)
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(Error::OutOfRange)?;
        if end > self.header.size {
            return Err(Error::OutOfRange);
        }
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_cluster = pos % cs;
            let n = ((cs - in_cluster) as usize).min(buf.len() - done);
            let part = buf.get_mut(done..done + n).ok_or(Error::OutOfRange)?;
            self.read_in_cluster(part, pos)?;
            done += n;
        }
        Ok(())
    }

    fn read_in_cluster(&self, out: &mut [u8], pos: u64) -> Result<(), Error> {
        let cs = self.cluster_size();
        let bits = self.header.cluster_bits;
        let l2_entries = cs / 8;
        let cluster_index = pos >> bits;
        let l1_index =
            usize::try_from(cluster_index / l2_entries).map_err(|_| Error::OutOfRange)?;
        let l2_index = cluster_index % l2_entries;
        let in_cluster = pos % cs;
        let l1e = self
            .l1
            .get(l1_index)
            .copied()
            .ok_or(Error::Corrupt("L1 index"))?;
        let l2_off = l1e & OFFSET_MASK;
        let l2e = if l2_off == 0 {
            0
        } else {
            let l2_off = self.checked_host(l2_off, "L2 table offset")?;
            let mut e = [0u8; 8];
            self.file.read_at(&mut e, l2_off + l2_index * 8)?;
            u64::from_be_bytes(e)
        };
        if l2e & L2_COMPRESSED != 0 {
            let data = self.read_compressed(l2e)?;
            let start = in_cluster as usize;
            let src = data
                .get(start..start + out.len())
                .ok_or(Error::Corrupt("compressed cluster short"))?;
            out.copy_from_slice(src);
            return Ok(());
        }
        if self.header.version == 3 && l2e & L2_ZERO != 0 {
            out.fill(0);
            return Ok(());
        }
        let host = l2e & OFFSET_MASK;
        if host == 0 {
            match &self.backing {
                Some(b) => b.read_at(out, pos)?,
                None => out.fill(0),
            }
            return Ok(());
        }
        let host = self.checked_host(host, "data cluster offset")?;
        self.file.read_at(out, host + in_cluster)
    }

    fn read_compressed(&self, l2e: u64) -> Result<Vec<u8>, Error> {
        let bits = self.header.cluster_bits;
        let x = 62 - (bits - 8);
        let off = l2e & ((1u64 << x) - 1);
        let sectors = (l2e & ((1u64 << 62) - 1)) >> x;
        let len = (sectors + 1) * 512 - (off % 512);
        if off.checked_add(len).is_none_or(|e| e > self.file_len + 512)
            || len > 2 * self.cluster_size() + 512
        {
            return Err(Error::Corrupt("compressed cluster outside the file"));
        }
        let mut raw = vec![0u8; len as usize];
        self.file.read_at(&mut raw, off)?;
        let cs = self.cluster_size() as usize;
        let mut data = match self.header.compression {
            Compression::Zlib => miniz_oxide::inflate::decompress_to_vec_with_limit(&raw, cs)
                .map_err(|_| Error::Corrupt("bad deflate data"))?,
            Compression::Zstd => {
                let mut src: &[u8] = &raw;
                let dec = ruzstd::decoding::StreamingDecoder::new(&mut src)
                    .map_err(|_| Error::Corrupt("bad zstd frame"))?;
                let mut v = Vec::with_capacity(cs);
                dec.take(cs as u64)
                    .read_to_end(&mut v)
                    .map_err(|_| Error::Corrupt("bad zstd data"))?;
                v
            }
        };
        if data.len() != cs {
            data.resize(cs, 0);
        }
        Ok(data)
    }
}
