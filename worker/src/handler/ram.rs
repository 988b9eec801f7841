//! # The `ram` handler: a sparse in-memory device
//!
//! For tests and benchmarks. The device's size comes from `dev_size`; memory is allocated in
//! 64 KiB chunks on first write, unwritten space reads as zeros, and UNMAP drops whole chunks (and
//! zeroes the partial ones at the edges). Chunks live in sharded maps so concurrent commands on
//! different regions do not contend on one lock. The data is gone when the worker exits: a `ram`
//! device has nothing to make durable, so `flush` is a no-op.
//!
//! It must never allocate beyond the device size (every offset is range-checked).

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tcmu_warden_sdk::{DeviceConfig, Handler, HandlerCaps, HandlerError, HandlerFactory};

/// Bytes per allocation chunk.
pub const CHUNK: u64 = 64 * 1024;
const SHARDS: usize = 64;

/// Builds `ram` handlers. The cfgstring is ignored (conventionally empty).
pub struct RamFactory;

impl HandlerFactory for RamFactory {
    fn subtype(&self) -> &str {
        "ram"
    }

    fn open(
        &self,
        dev: &DeviceConfig,
        _backing: Option<OwnedFd>,
    ) -> Result<Arc<dyn Handler>, HandlerError> {
        Ok(Arc::new(RamHandler::new(dev.dev_size)))
    }
}

type Shard = RwLock<HashMap<u64, Box<[u8]>>>;

/// A sparse in-memory device.
pub struct RamHandler {
    size: AtomicU64,
    shards: Vec<Shard>,
    granularity: u32,
}

impl std::fmt::Debug for RamHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamHandler")
            .field("size", &self.size.load(Ordering::Relaxed))
            .finish()
    }
}

fn out_of_range() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "access beyond the end of the ram device",
    )
}

impl RamHandler {
    /// A zero-filled device of `size` bytes.
    pub fn new(size: u64) -> RamHandler {
        RamHandler {
            size: AtomicU64::new(size),
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            granularity: (CHUNK / 512) as u32,
        }
    }

    /// Bytes of memory currently allocated for data.
    pub fn allocated_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.read().map(|m| m.len() as u64).unwrap_or(0) * CHUNK)
            .sum()
    }

    fn shard(&self, chunk: u64) -> Option<&Shard> {
        self.shards.get((chunk % SHARDS as u64) as usize)
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.checked_add(len).ok_or_else(out_of_range)?;
        if end > self.size.load(Ordering::Acquire) {
            Err(out_of_range())
        } else {
            Ok(())
        }
    }

    /// Calls `f(chunk, offset_in_chunk, n, done)` for each chunk piece of `[offset, offset+len)`.
    fn pieces(
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, usize, usize, usize) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut pos = offset;
        let end = offset + len;
        let mut done = 0usize;
        while pos < end {
            let chunk = pos / CHUNK;
            let within = (pos % CHUNK) as usize;
            let n = ((CHUNK - within as u64).min(end - pos)) as usize;
            f(chunk, within, n, done)?;
            pos += n as u64;
            done += n;
        }
        Ok(())
    }

    fn read_into(&self, offset: u64, dst: &mut [u8]) -> io::Result<()> {
        Self::pieces(offset, dst.len() as u64, |chunk, within, n, done| {
            let out = dst.get_mut(done..done + n).ok_or_else(out_of_range)?;
            let shard = self.shard(chunk).ok_or_else(out_of_range)?;
            let map = shard
                .read()
                .map_err(|_| io::Error::other("ram shard lock poisoned"))?;
            match map.get(&chunk).and_then(|c| c.get(within..within + n)) {
                Some(src) => out.copy_from_slice(src),
                None => out.fill(0),
            }
            Ok(())
        })
    }

    fn write_from(&self, offset: u64, src: &[u8]) -> io::Result<()> {
        Self::pieces(offset, src.len() as u64, |chunk, within, n, done| {
            let from = src.get(done..done + n).ok_or_else(out_of_range)?;
            let shard = self.shard(chunk).ok_or_else(out_of_range)?;
            let mut map = shard
                .write()
                .map_err(|_| io::Error::other("ram shard lock poisoned"))?;
            let c = map
                .entry(chunk)
                .or_insert_with(|| vec![0u8; CHUNK as usize].into_boxed_slice());
            c.get_mut(within..within + n)
                .ok_or_else(out_of_range)?
                .copy_from_slice(from);
            Ok(())
        })
    }
}

impl Handler for RamHandler {
    fn nonblocking(&self) -> bool {
        // Memory copies under short per-shard locks: never waits for I/O.
        true
    }

    fn caps(&self) -> HandlerCaps {
        HandlerCaps {
            unmap: true,
            unmap_granularity: self.granularity,
            unmap_reads_zero: true,
        }
    }

    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check(offset, total)?;
        let mut pos = offset;
        for b in bufs.iter_mut() {
            self.read_into(pos, b)?;
            pos += b.len() as u64;
        }
        Ok(())
    }

    fn write(&self, offset: u64, bufs: &[IoSlice<'_>], _durable: bool) -> io::Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check(offset, total)?;
        let mut pos = offset;
        for b in bufs {
            self.write_from(pos, b)?;
            pos += b.len() as u64;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        Self::pieces(offset, len, |chunk, within, n, _| {
            let shard = self.shard(chunk).ok_or_else(out_of_range)?;
            let mut map = shard
                .write()
                .map_err(|_| io::Error::other("ram shard lock poisoned"))?;
            if n as u64 == CHUNK {
                map.remove(&chunk);
            } else if let Some(c) = map.get_mut(&chunk) {
                c.get_mut(within..within + n)
                    .ok_or_else(out_of_range)?
                    .fill(0);
            }
            Ok(())
        })
    }

    /// Allocated means the 64 KiB chunk holding the byte exists; the extent runs over every
    /// following chunk in the same state.
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Option<(bool, u64)>> {
        if len == 0 {
            return Ok(Some((false, 0)));
        }
        let end = offset.saturating_add(len);
        let present = |chunk: u64| -> io::Result<bool> {
            let shard = self.shard(chunk).ok_or_else(out_of_range)?;
            let map = shard
                .read()
                .map_err(|_| io::Error::other("ram shard lock poisoned"))?;
            Ok(map.contains_key(&chunk))
        };
        let first = offset / CHUNK;
        let state = present(first)?;
        let mut chunk = first + 1;
        while chunk.saturating_mul(CHUNK) < end && present(chunk)? == state {
            chunk += 1;
        }
        let run = chunk.saturating_mul(CHUNK).min(end) - offset;
        Ok(Some((state, run)))
    }

    fn resize(&self, new_size: u64) -> io::Result<()> {
        let old = self.size.swap(new_size, Ordering::AcqRel);
        if new_size < old {
            // Drop what now lies beyond the end, so a later grow reads zeros there.
            let first_gone = new_size.div_ceil(CHUNK);
            for shard in &self.shards {
                let mut map = shard
                    .write()
                    .map_err(|_| io::Error::other("ram shard lock poisoned"))?;
                map.retain(|&k, _| k < first_gone);
            }
            if new_size % CHUNK != 0 {
                let last = new_size / CHUNK;
                if let Some(shard) = self.shard(last) {
                    let mut map = shard
                        .write()
                        .map_err(|_| io::Error::other("ram shard lock poisoned"))?;
                    if let Some(c) = map.get_mut(&last)
                        && let Some(tail) = c.get_mut((new_size % CHUNK) as usize..)
                    {
                        tail.fill(0);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_read_write_unmap() {
        let h = RamHandler::new(1 << 30);
        assert_eq!(h.allocated_bytes(), 0);
        let mut z = vec![1u8; 8192];
        h.read(123_456, &mut [IoSliceMut::new(&mut z)]).unwrap();
        assert!(z.iter().all(|&b| b == 0));
        // A write straddling a chunk boundary, from two slices.
        let a = vec![0xAAu8; 5000];
        let b = vec![0xBBu8; 5000];
        let off = CHUNK - 4000;
        h.write(off, &[IoSlice::new(&a), IoSlice::new(&b)], true)
            .unwrap();
        assert_eq!(h.allocated_bytes(), 2 * CHUNK);
        let mut back = vec![0u8; 10000];
        h.read(off, &mut [IoSliceMut::new(&mut back)]).unwrap();
        assert_eq!(&back[..5000], &a[..]);
        assert_eq!(&back[5000..], &b[..]);
        h.unmap(0, 2 * CHUNK).unwrap();
        assert_eq!(h.allocated_bytes(), 0);
        h.read(off, &mut [IoSliceMut::new(&mut back)]).unwrap();
        assert!(back.iter().all(|&x| x == 0));
    }

    #[test]
    fn allocation_follows_chunks() {
        let h = RamHandler::new(16 * CHUNK);
        assert_eq!(
            h.allocation(0, 16 * CHUNK).unwrap(),
            Some((false, 16 * CHUNK))
        );
        h.write(3 * CHUNK + 10, &[IoSlice::new(&[1u8; 100])], false)
            .unwrap();
        h.write(4 * CHUNK, &[IoSlice::new(&[1u8; 100])], false)
            .unwrap();
        assert_eq!(
            h.allocation(0, 16 * CHUNK).unwrap(),
            Some((false, 3 * CHUNK))
        );
        assert_eq!(
            h.allocation(3 * CHUNK + 5, 16 * CHUNK).unwrap(),
            Some((true, 2 * CHUNK - 5))
        );
        assert_eq!(h.allocation(5 * CHUNK, 100).unwrap(), Some((false, 100)));
        h.unmap(3 * CHUNK, 2 * CHUNK).unwrap();
        assert_eq!(
            h.allocation(0, 16 * CHUNK).unwrap(),
            Some((false, 16 * CHUNK))
        );
    }

    #[test]
    fn bounds_are_enforced() {
        let h = RamHandler::new(4096);
        let mut buf = [0u8; 512];
        assert!(
            h.read(4096 - 511, &mut [IoSliceMut::new(&mut buf)])
                .is_err()
        );
        assert!(
            h.write(u64::MAX - 10, &[IoSlice::new(&buf)], false)
                .is_err()
        );
        assert!(h.read(4096 - 512, &mut [IoSliceMut::new(&mut buf)]).is_ok());
    }

    #[test]
    fn shrink_then_grow_reads_zeros() {
        let h = RamHandler::new(4 * CHUNK);
        h.write(0, &[IoSlice::new(&vec![9u8; (4 * CHUNK) as usize])], false)
            .unwrap();
        h.resize(CHUNK + 100).unwrap();
        h.resize(4 * CHUNK).unwrap();
        let mut back = vec![0u8; (4 * CHUNK) as usize];
        h.read(0, &mut [IoSliceMut::new(&mut back)]).unwrap();
        assert!(back[..(CHUNK + 100) as usize].iter().all(|&x| x == 9));
        assert!(back[(CHUNK + 100) as usize..].iter().all(|&x| x == 0));
    }
}
