//! # Scatter-gather data buffers
//!
//! [`DataBuf`] is the one type through which command data moves: a list of byte segments that a
//! command may read (data-out, from the initiator) or fill (data-in, to the initiator). On the real
//! data path the segments are the iovecs of a ring entry, pointing into the shared data area of the
//! UIO mapping; in tests they are ordinary heap memory.
//!
//! This module owns the only raw-pointer access to command data. It must never hand out a slice
//! that outlives the buffer, and never touch bytes outside the segments it was built from: the
//! constructor for shared memory is `unsafe` and its caller (the ring engine) vouches that every
//! segment lies inside the mapping and belongs to this one command until it is completed.

use std::io::{IoSlice, IoSliceMut};
use std::ptr::NonNull;
use std::sync::Arc;

/// Keeps the memory behind a [`DataBuf`] alive (the mapping, or a test's heap buffers).
pub trait BufOwner: Send + Sync {}
impl<T: Send + Sync> BufOwner for T {}

#[derive(Clone, Copy, Debug)]
struct Seg {
    ptr: NonNull<u8>,
    len: usize,
}

/// A scatter-gather list of bytes owned by one command.
pub struct DataBuf {
    segs: Vec<Seg>,
    len: usize,
    _owner: Arc<dyn BufOwner>,
}

impl std::fmt::Debug for DataBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataBuf")
            .field("segments", &self.segs.len())
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: a DataBuf is the exclusive accessor of its segments for the life of one command (the
// kernel does not touch a command's data pages until it is completed, and the ring engine builds
// exactly one DataBuf per command direction), and the memory is kept alive by `_owner`, which is
// itself Send + Sync. Moving it to another thread therefore moves exclusive access along with it.
unsafe impl Send for DataBuf {}
// SAFETY: shared references only allow reads (copy_to, io_slices); all writes need `&mut self`.
unsafe impl Sync for DataBuf {}

struct HeapSegments(#[allow(dead_code)] Vec<Box<[u8]>>);

impl DataBuf {
    /// An empty buffer (commands without data).
    pub fn empty() -> DataBuf {
        DataBuf {
            segs: Vec::new(),
            len: 0,
            _owner: Arc::new(()),
        }
    }

    /// A buffer over heap segments of the given sizes, zero-filled. For tests and emulation.
    pub fn zeroed(seg_lens: &[usize]) -> DataBuf {
        Self::from_segments(seg_lens.iter().map(|&n| vec![0u8; n]).collect())
    }

    /// A buffer over the given heap segments.
    pub fn from_segments(segments: Vec<Vec<u8>>) -> DataBuf {
        let mut boxes: Vec<Box<[u8]>> = segments.into_iter().map(Vec::into_boxed_slice).collect();
        let segs: Vec<Seg> = boxes
            .iter_mut()
            .filter(|b| !b.is_empty())
            .map(|b| Seg {
                ptr: NonNull::from(&mut b[..]).cast(),
                len: b.len(),
            })
            .collect();
        let len = segs.iter().map(|s| s.len).sum();
        // Moving the boxes into the owner does not move their heap allocations.
        DataBuf {
            segs,
            len,
            _owner: Arc::new(HeapSegments(boxes)),
        }
    }

    /// A buffer over raw segments of shared memory.
    ///
    /// # Safety
    /// Every `(ptr, len)` must be valid for reads and writes for as long as `owner` lives, must not
    /// overlap any other segment of this or any other live `DataBuf`, and nothing else may access
    /// that memory while this buffer exists (the kernel leaves a command's data pages alone until
    /// the command is completed).
    pub unsafe fn from_raw(segments: &[(NonNull<u8>, usize)], owner: Arc<dyn BufOwner>) -> DataBuf {
        let segs: Vec<Seg> = segments
            .iter()
            .filter(|(_, len)| *len > 0)
            .map(|&(ptr, len)| Seg { ptr, len })
            .collect();
        let len = segs.iter().map(|s| s.len).sum();
        DataBuf {
            segs,
            len,
            _owner: owner,
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of segments.
    pub fn segment_count(&self) -> usize {
        self.segs.len()
    }

    /// Visits the pieces of `[offset, offset+len)` clipped to the buffer, as (segment, start, n).
    fn walk(&self, offset: usize, len: usize, mut f: impl FnMut(Seg, usize, usize, usize)) {
        let mut skip = offset;
        let mut left = len.min(self.len.saturating_sub(offset));
        let mut done = 0;
        for seg in &self.segs {
            if left == 0 {
                break;
            }
            if skip >= seg.len {
                skip -= seg.len;
                continue;
            }
            let n = (seg.len - skip).min(left);
            f(*seg, skip, n, done);
            done += n;
            left -= n;
            skip = 0;
        }
    }

    /// Copies `src` into the buffer starting at `offset`; returns how many bytes fit.
    pub fn copy_from(&mut self, offset: usize, src: &[u8]) -> usize {
        let mut copied = 0;
        self.walk(offset, src.len(), |seg, start, n, done| {
            if let Some(from) = src.get(done..done + n) {
                // SAFETY: `start + n <= seg.len` (walk clips to the segment), the segment is valid
                // for writes while `self` lives (constructor contract), `&mut self` gives exclusive
                // access, and `src` is ordinary memory that cannot overlap a buffer we own.
                unsafe {
                    std::ptr::copy_nonoverlapping(from.as_ptr(), seg.ptr.as_ptr().add(start), n)
                };
                copied += n;
            }
        });
        copied
    }

    /// Copies bytes from the buffer starting at `offset` into `dst`; returns how many were copied.
    pub fn copy_to(&self, offset: usize, dst: &mut [u8]) -> usize {
        let mut copied = 0;
        let want = dst.len();
        self.walk(offset, want, |seg, start, n, done| {
            if let Some(to) = dst.get_mut(done..done + n) {
                // SAFETY: `start + n <= seg.len`, the segment is valid for reads while `self` lives,
                // and `dst` is a distinct exclusive borrow.
                unsafe {
                    std::ptr::copy_nonoverlapping(seg.ptr.as_ptr().add(start), to.as_mut_ptr(), n)
                };
                copied += n;
            }
        });
        copied
    }

    /// Fills `[offset, offset+len)` (clipped) with `byte`.
    pub fn fill(&mut self, offset: usize, len: usize, byte: u8) {
        self.walk(offset, len, |seg, start, n, _| {
            // SAFETY: as in `copy_from`: in bounds of the segment and exclusively ours.
            unsafe { std::ptr::write_bytes(seg.ptr.as_ptr().add(start), byte, n) };
        });
    }

    /// The whole buffer as one vector (copies).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        self.copy_to(0, &mut v);
        v
    }

    /// `[offset, offset+len)` (clipped) as I/O slices for `pwritev`-style calls.
    pub fn io_slices(&self, offset: usize, len: usize) -> Vec<IoSlice<'_>> {
        let mut out = Vec::new();
        self.walk(offset, len, |seg, start, n, _| {
            // SAFETY: in bounds, valid for reads while the returned slices borrow `self`, and no
            // `&mut self` method can run while they exist.
            let s = unsafe { std::slice::from_raw_parts(seg.ptr.as_ptr().add(start), n) };
            out.push(IoSlice::new(s));
        });
        out
    }

    /// `[offset, offset+len)` (clipped) as mutable I/O slices for `preadv`-style calls.
    pub fn io_slices_mut(&mut self, offset: usize, len: usize) -> Vec<IoSliceMut<'_>> {
        let mut out = Vec::new();
        self.walk(offset, len, |seg, start, n, _| {
            // SAFETY: in bounds, valid for writes, and the slices borrow `self` mutably, so they are
            // the only access for their lifetime; segments never overlap each other.
            let s = unsafe { std::slice::from_raw_parts_mut(seg.ptr.as_ptr().add(start), n) };
            out.push(IoSliceMut::new(s));
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn copies_across_segments() {
        let mut b = DataBuf::zeroed(&[3, 0, 5, 2]);
        assert_eq!(b.len(), 10);
        assert_eq!(b.segment_count(), 3);
        assert_eq!(b.copy_from(2, b"abcdefghijk"), 8);
        assert_eq!(b.to_vec(), b"\0\0abcdefgh");
        let mut out = [0u8; 4];
        assert_eq!(b.copy_to(7, &mut out), 3);
        assert_eq!(&out[..3], b"fgh");
        b.fill(0, 3, b'z');
        assert_eq!(b.to_vec(), b"zzzbcdefgh");
        let sl = b.io_slices(1, 5);
        let joined: Vec<u8> = sl.iter().flat_map(|s| s.iter().copied()).collect();
        assert_eq!(joined, b"zzbcd");
        assert_eq!(b.copy_from(100, b"x"), 0);
    }

    proptest! {
        #[test]
        fn copy_matches_flat_model(segs in proptest::collection::vec(0usize..40, 0..6),
                                   off in 0usize..120, data in proptest::collection::vec(any::<u8>(), 0..120)) {
            let mut b = DataBuf::zeroed(&segs);
            let mut model = vec![0u8; b.len()];
            let n = b.copy_from(off, &data);
            let expect = data.len().min(model.len().saturating_sub(off));
            prop_assert_eq!(n, expect);
            if n > 0 { model[off..off + n].copy_from_slice(&data[..n]); }
            prop_assert_eq!(b.to_vec(), model);
        }
    }
}
