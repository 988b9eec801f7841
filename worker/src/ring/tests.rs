//! Unit tests of the ring engine against a hand-driven ring in a memfd.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sys::memfd::{MFdFlags, memfd_create};

use super::layout::*;
use super::*;

const RING_OFF: usize = 128;
const OOOC_ALL: u16 =
    TCMU_MAILBOX_FLAG_CAP_OOOC | TCMU_MAILBOX_FLAG_CAP_READ_LEN | TCMU_MAILBOX_FLAG_CAP_TMR;

/// A minimal kernel stand-in: writes entries and moves cmd_head by hand.
struct Dev {
    _fd: OwnedFd,
    map: Arc<Mapping>,
    size: u32,
    data_off: u64,
    head: u32,
    next_id: u16,
    data_next: u64,
    /// Map offset of the last entry pushed.
    last_off: usize,
}

impl Dev {
    fn new(size: u32, data_size: usize, flags: u16) -> Dev {
        let fd = memfd_create("ring-unit", MFdFlags::MFD_CLOEXEC).unwrap();
        let len = RING_OFF + size as usize + data_size;
        nix::unistd::ftruncate(&fd, len as i64).unwrap();
        let map = Mapping::map(fd.as_fd(), len).unwrap();
        let d = Dev {
            _fd: fd,
            map,
            size,
            data_off: (RING_OFF + size as usize) as u64,
            head: 0,
            next_id: 1,
            data_next: 0,
            last_off: 0,
        };
        d.w(MB_VERSION, &TCMU_MAILBOX_VERSION.to_ne_bytes());
        d.w(MB_FLAGS, &flags.to_ne_bytes());
        d.w(MB_CMDR_OFF, &(RING_OFF as u32).to_ne_bytes());
        d.w(MB_CMDR_SIZE, &size.to_ne_bytes());
        d
    }

    fn ring(&self) -> Ring {
        Ring::new(self.map.clone()).unwrap()
    }

    fn w(&self, off: usize, b: &[u8]) {
        assert!(off + b.len() <= self.map.len());
        // SAFETY: in bounds (asserted); the test is single-threaded over this mapping.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.map.as_ptr().add(off), b.len()) }
    }

    fn r(&self, off: usize, n: usize) -> Vec<u8> {
        assert!(off + n <= self.map.len());
        let mut v = vec![0u8; n];
        // SAFETY: in bounds (asserted); the test is single-threaded over this mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.map.as_ptr().add(off), v.as_mut_ptr(), n) }
        v
    }

    fn word(&self, off: usize) -> &AtomicU32 {
        // SAFETY: only called for the two 4-aligned index words inside the mailbox.
        unsafe { AtomicU32::from_ptr(self.map.as_ptr().add(off).cast()) }
    }

    fn set_head(&mut self, h: u32) {
        self.head = h;
        self.word(MB_CMD_HEAD).store(h, Ordering::Release);
    }

    fn mb_tail(&self) -> u32 {
        self.word(MB_CMD_TAIL).load(Ordering::Acquire)
    }

    /// Map offset where an entry of `len` bytes will go (after a PAD if needed).
    fn next_off(&self, len: usize) -> usize {
        if (self.size - self.head) as usize >= len {
            RING_OFF + self.head as usize
        } else {
            RING_OFF
        }
    }

    /// Writes `entry` (header included) at the head, padding first if needed; publishes it.
    fn push(&mut self, entry: &[u8]) -> usize {
        let len = entry.len() as u32;
        if self.size - self.head < len {
            let pad = self.size - self.head;
            self.w(
                RING_OFF + self.head as usize,
                &(pad | TCMU_OP_PAD).to_ne_bytes(),
            );
            self.w(RING_OFF + self.head as usize + 4, &[0; 4]);
            self.head = 0;
        }
        let off = RING_OFF + self.head as usize;
        self.w(off, entry);
        self.last_off = off;
        self.set_head((self.head + len) % self.size);
        off
    }

    /// Allocates `n` bytes of the data area and fills them with `fill`.
    fn alloc(&mut self, n: usize, fill: &[u8]) -> IoVec {
        let base = self.data_off + self.data_next;
        self.data_next += n as u64;
        assert!(base as usize + n <= self.map.len());
        self.w(base as usize, &fill[..n.min(fill.len())]);
        IoVec {
            base,
            len: n as u64,
        }
    }

    fn id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// A CMD entry as the kernel builds it, then `mutate`d (given the entry's map offset).
    fn cmd_with(
        &mut self,
        cdb: &[u8],
        iovs: &[IoVec],
        counts: (u32, u32, u32),
        mutate: impl FnOnce(&mut Vec<u8>, u64),
    ) -> u16 {
        let id = self.id();
        let n = iovs.len();
        let size = cmd_entry_size(n, cdb.len());
        let base = size - cdb.len().next_multiple_of(8);
        let off = self.next_off(size);
        let mut e = vec![0u8; size];
        e[0..4].copy_from_slice(&(size as u32 | TCMU_OP_CMD).to_ne_bytes());
        e[4..6].copy_from_slice(&id.to_ne_bytes());
        e[8..12].copy_from_slice(&counts.0.to_ne_bytes());
        e[12..16].copy_from_slice(&counts.1.to_ne_bytes());
        e[16..20].copy_from_slice(&counts.2.to_ne_bytes());
        e[24..32].copy_from_slice(&((off + base) as u64).to_ne_bytes());
        for (i, v) in iovs.iter().enumerate() {
            e[48 + 16 * i..56 + 16 * i].copy_from_slice(&v.base.to_ne_bytes());
            e[56 + 16 * i..64 + 16 * i].copy_from_slice(&v.len.to_ne_bytes());
        }
        e[base..base + cdb.len()].copy_from_slice(cdb);
        mutate(&mut e, off as u64);
        let at = self.push(&e);
        assert_eq!(at, off);
        id
    }

    fn cmd(&mut self, cdb: &[u8], iovs: &[IoVec]) -> u16 {
        self.cmd_with(cdb, iovs, (iovs.len() as u32, 0, 0), |_, _| {})
    }

    fn tmr(&mut self, tmr_type: u8, ids: &[u16]) -> usize {
        let size = tmr_entry_size(ids.len());
        let mut e = vec![0u8; size];
        e[0..4].copy_from_slice(&(size as u32 | TCMU_OP_TMR).to_ne_bytes());
        e[8] = tmr_type;
        e[12..16].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
        for (i, id) in ids.iter().enumerate() {
            e[32 + 2 * i..34 + 2 * i].copy_from_slice(&id.to_ne_bytes());
        }
        self.push(&e)
    }

    /// (cmd_id, uflags, status, read_len, sense) of the slot at map offset `off`.
    fn slot(&self, off: usize) -> (u16, u8, u8, u32, Vec<u8>) {
        let b = self.r(off, TCMU_CMD_ENTRY_MIN_SIZE);
        (
            u16::from_ne_bytes([b[4], b[5]]),
            b[7],
            b[8],
            u32::from_ne_bytes(b[12..16].try_into().unwrap()),
            b[16..112].to_vec(),
        )
    }

    fn len_op(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.r(off, 4).try_into().unwrap())
    }
}

const READ10: [u8; 10] = [0x28, 0, 0, 0, 0, 1, 0, 0, 8, 0];
const WRITE10: [u8; 10] = [0x2a, 0, 0, 0, 0, 2, 0, 0, 1, 0];
const TUR: [u8; 6] = [0; 6];

fn expect_cmd(f: Option<Fetched>) -> RingCommand {
    match f {
        Some(Fetched::Cmd(c)) => c,
        other => panic!("expected a command, got {other:?}"),
    }
}

fn expect_invalid(f: Option<Fetched>) -> (u16, String) {
    match f {
        Some(Fetched::Invalid { cmd_id, why }) => (cmd_id, why),
        other => panic!("expected an invalid entry, got {other:?}"),
    }
}

#[test]
fn layout_matches_the_kernel_header() {
    assert_eq!(
        (MB_VERSION, MB_FLAGS, MB_CMDR_OFF, MB_CMDR_SIZE),
        (0, 2, 4, 8)
    );
    assert_eq!((MB_CMD_HEAD, MB_CMD_TAIL, TCMU_MAILBOX_SIZE), (12, 64, 128));
    assert_eq!(
        (
            HDR_LEN_OP,
            HDR_CMD_ID,
            HDR_KFLAGS,
            HDR_UFLAGS,
            TCMU_HDR_SIZE
        ),
        (0, 4, 6, 7, 8)
    );
    assert_eq!(
        (
            REQ_IOV_CNT,
            REQ_IOV_BIDI_CNT,
            REQ_IOV_DIF_CNT,
            REQ_CDB_OFF,
            REQ_IOV
        ),
        (8, 12, 16, 24, 48)
    );
    assert_eq!(
        (
            RSP_SCSI_STATUS,
            RSP_READ_LEN,
            RSP_SENSE_BUFFER,
            TCMU_SENSE_BUFFERSIZE
        ),
        (8, 12, 16, 96)
    );
    assert_eq!(TCMU_CMD_ENTRY_MIN_SIZE, 112);
    assert_eq!(
        (TMR_TYPE, TMR_CMD_CNT, TMR_CMD_IDS, TCMU_TMR_ENTRY_SIZE),
        (8, 12, 32, 32)
    );
    assert_eq!(
        (TCMU_OP_PAD, TCMU_OP_CMD, TCMU_OP_TMR, TCMU_OP_MASK),
        (0, 1, 2, 7)
    );
    assert_eq!(
        (
            TCMU_MAILBOX_FLAG_CAP_OOOC,
            TCMU_MAILBOX_FLAG_CAP_READ_LEN,
            TCMU_MAILBOX_FLAG_CAP_TMR,
            TCMU_MAILBOX_FLAG_CAP_KEEP_BUF
        ),
        (1, 2, 4, 8)
    );
    assert_eq!(
        (
            TCMU_UFLAG_UNKNOWN_OP,
            TCMU_UFLAG_READ_LEN,
            TCMU_UFLAG_KEEP_BUF
        ),
        (1, 2, 4)
    );
    // Entry sizes: the fixed part is at least 112 bytes, then the CDB rounded up to 8.
    assert_eq!(cmd_entry_size(0, 6), 120);
    assert_eq!(cmd_entry_size(4, 10), 128);
    assert_eq!(cmd_entry_size(5, 16), 128 + 16);
    assert_eq!(cmd_entry_size(1, 260), 112 + 264);
    assert_eq!(tmr_entry_size(0), 32);
    assert_eq!(tmr_entry_size(4), 40);
    assert_eq!(tmr_entry_size(5), 48);
}

#[test]
fn cdb_length_follows_the_opcode_group() {
    let len = |op: u8| scsi_command_size(&[op, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(len(0x00), Some(6));
    assert_eq!(len(0x12), Some(6));
    assert_eq!(len(0x28), Some(10));
    assert_eq!(len(0x5a), Some(10));
    assert_eq!(len(0x60), Some(12));
    assert_eq!(len(0x88), Some(16));
    assert_eq!(len(0xa0), Some(12));
    assert_eq!(len(0xc0), Some(10));
    assert_eq!(len(0xff), Some(10));
    assert_eq!(scsi_command_size(&[0x7f, 0, 0, 0, 0, 0, 0, 24]), Some(32));
    assert_eq!(scsi_command_size(&[0x7f, 0, 0, 0, 0, 0, 0, 252]), Some(260));
    assert_eq!(scsi_command_size(&[0x7f, 0, 0, 0, 0, 0, 0, 253]), None);
    assert_eq!(scsi_command_size(&[0x7f, 0, 0]), None);
    assert_eq!(scsi_command_size(&[]), None);
}

#[test]
fn mailbox_is_validated() {
    let d = Dev::new(1024, 4096, OOOC_ALL);
    assert!(Ring::new(d.map.clone()).is_ok());

    let bad = |poke: &dyn Fn(&Dev)| {
        let d = Dev::new(1024, 4096, OOOC_ALL);
        poke(&d);
        matches!(Ring::new(d.map.clone()), Err(RingError::Mailbox(_)))
    };
    assert!(bad(&|d| d.w(MB_VERSION, &1u16.to_ne_bytes())));
    assert!(bad(&|d| d.w(MB_CMDR_OFF, &64u32.to_ne_bytes())));
    assert!(bad(&|d| d.w(MB_CMDR_OFF, &132u32.to_ne_bytes())));
    assert!(bad(&|d| d.w(MB_CMDR_SIZE, &1020u32.to_ne_bytes())));
    assert!(bad(&|d| d.w(MB_CMDR_SIZE, &0u32.to_ne_bytes())));
    assert!(bad(
        &|d| d.w(MB_CMDR_SIZE, &(1024u32 + 4096 + 8).to_ne_bytes())
    ));
    assert!(bad(&|d| d.w(MB_CMDR_SIZE, &u32::MAX.to_ne_bytes())));
    assert!(bad(&|d| d.w(MB_CMD_TAIL, &1024u32.to_ne_bytes())));
    assert!(bad(&|d| d.w(MB_CMD_TAIL, &12u32.to_ne_bytes())));

    // A whole-map ring (no data area) is acceptable.
    let d = Dev::new(1024, 0, 0);
    assert!(Ring::new(d.map.clone()).is_ok());
}

#[test]
fn tiny_mapping_is_refused() {
    let fd = memfd_create("tiny", MFdFlags::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&fd, 64).unwrap();
    let map = Mapping::map(fd.as_fd(), 64).unwrap();
    assert_eq!(map.len(), 64);
    assert!(matches!(Ring::new(map), Err(RingError::Mailbox(_))));
    assert!(matches!(
        Mapping::map(fd.as_fd(), 0),
        Err(RingError::MapSize { len: 0 })
    ));
}

#[test]
fn fetches_a_write_and_completes_it() {
    let mut d = Dev::new(1024, 4096, OOOC_ALL);
    let a = d.alloc(5, b"hello");
    let b = d.alloc(3, b"abc");
    let id = d.cmd(&WRITE10, &[a, b]);
    let off = RING_OFF;
    let mut ring = d.ring();
    assert_eq!(ring.flags(), OOOC_ALL);
    assert_eq!(ring.ring_size(), 1024);
    let cmd = expect_cmd(ring.fetch().unwrap());
    assert_eq!(cmd.cmd_id, id);
    assert_eq!(cmd.cdb, WRITE10);
    assert_eq!(cmd.iovecs, vec![a, b]);
    assert!(cmd.bidi_in.is_none());
    assert_eq!(cmd.data.to_vec(), b"helloabc");
    assert_eq!(cmd.data.segment_count(), 2);
    assert!(ring.fetch().unwrap().is_none());
    assert_eq!(ring.in_flight(), 1);
    assert_eq!(ring.in_flight_ids(), vec![id]);
    assert_eq!(ring.fetch_pos(), d.head);
    assert_eq!(ring.tail(), 0);
    assert!(!ring.take_tail_moved());

    let len_op = d.len_op(off);
    ring.complete_command(cmd, &Completion::status(0)).unwrap();
    assert_eq!(ring.in_flight(), 0);
    assert_eq!(d.mb_tail(), d.head);
    assert_eq!(ring.tail(), d.head);
    assert!(ring.take_tail_moved());
    assert!(!ring.take_tail_moved());
    let (sid, uflags, status, read_len, sense) = d.slot(off);
    assert_eq!((sid, uflags, status, read_len), (id, 0, 0, 0));
    assert!(
        sense.iter().all(|&b| b == 0),
        "stale request bytes in sense"
    );
    assert_eq!(d.len_op(off), len_op);
}

#[test]
fn data_in_is_written_through_to_shared_memory() {
    let mut d = Dev::new(1024, 4096, OOOC_ALL);
    let a = d.alloc(4, &[0xee; 4]);
    let b = d.alloc(4, &[0xee; 4]);
    let id = d.cmd(&READ10, &[a, b]);
    let mut ring = d.ring();
    let mut cmd = expect_cmd(ring.fetch().unwrap());
    assert_eq!(cmd.data.copy_from(0, b"01234567"), 8);
    drop(cmd);
    assert_eq!(d.r(a.base as usize, 4), b"0123");
    assert_eq!(d.r(b.base as usize, 4), b"4567");
    ring.complete(
        id,
        &Completion {
            status: 0,
            sense: &[],
            read_len: Some(6),
        },
    )
    .unwrap();
    let (sid, uflags, status, read_len, _) = d.slot(RING_OFF);
    assert_eq!(
        (sid, uflags, status, read_len),
        (id, TCMU_UFLAG_READ_LEN, 0, 6)
    );
}

#[test]
fn read_len_needs_the_capability() {
    let mut d = Dev::new(1024, 4096, TCMU_MAILBOX_FLAG_CAP_OOOC);
    let a = d.alloc(8, &[0; 8]);
    let id = d.cmd(&READ10, &[a]);
    let mut ring = d.ring();
    drop(expect_cmd(ring.fetch().unwrap()));
    ring.complete(
        id,
        &Completion {
            status: 0,
            sense: &[],
            read_len: Some(3),
        },
    )
    .unwrap();
    let (_, uflags, _, read_len, _) = d.slot(RING_OFF);
    assert_eq!((uflags, read_len), (0, 0));
}

#[test]
fn sense_is_truncated_and_zero_padded() {
    let mut d = Dev::new(1024, 4096, OOOC_ALL);
    let id1 = d.cmd(&TUR, &[]);
    let id2 = d.cmd(&TUR, &[]);
    let mut ring = d.ring();
    drop(ring.fetch().unwrap());
    drop(ring.fetch().unwrap());
    let long: Vec<u8> = (0..200).map(|i| i as u8 + 1).collect();
    ring.complete(
        id1,
        &Completion {
            status: 2,
            sense: &long,
            read_len: None,
        },
    )
    .unwrap();
    ring.complete(
        id2,
        &Completion {
            status: 2,
            sense: &[0x70, 0, 5],
            read_len: None,
        },
    )
    .unwrap();
    let (_, _, status, _, sense) = d.slot(RING_OFF);
    assert_eq!(status, 2);
    assert_eq!(sense, long[..96]);
    let second = RING_OFF + cmd_entry_size(0, 6);
    let (_, _, _, _, sense) = d.slot(second);
    assert_eq!(&sense[..3], &[0x70, 0, 5]);
    assert!(sense[3..].iter().all(|&b| b == 0));
}

#[test]
fn bidi_splits_iovecs_and_ignores_dif() {
    let mut d = Dev::new(2048, 4096, OOOC_ALL);
    let out1 = d.alloc(4, b"OUT1");
    let out2 = d.alloc(2, b"O2");
    let in1 = d.alloc(6, &[0; 6]);
    let dif = d.alloc(8, &[0; 8]);
    let id = d.cmd_with(&WRITE10, &[out1, out2, in1, dif], (2, 1, 1), |_, _| {});
    let mut ring = d.ring();
    let mut cmd = expect_cmd(ring.fetch().unwrap());
    assert_eq!(cmd.cmd_id, id);
    assert_eq!(cmd.iovecs, vec![out1, out2]);
    assert_eq!(cmd.bidi_iovecs, vec![in1]);
    assert_eq!(cmd.data.to_vec(), b"OUT1O2");
    let bidi = cmd.bidi_in.as_mut().unwrap();
    assert_eq!(bidi.len(), 6);
    bidi.copy_from(0, b"INDATA");
    drop(cmd);
    assert_eq!(d.r(in1.base as usize, 6), b"INDATA");
    ring.complete(id, &Completion::status(0)).unwrap();

    // A dif iovec outside the data area still makes the entry invalid.
    let bad = IoVec { base: 0, len: 8 };
    let id = d.cmd_with(&WRITE10, &[out1, bad], (1, 0, 1), |_, _| {});
    let (cid, why) = expect_invalid(ring.fetch().unwrap());
    assert_eq!(cid, id);
    assert!(why.contains("outside the data area"), "{why}");
}

#[test]
fn malicious_entries_are_invalid_and_the_ring_keeps_working() {
    let mut d = Dev::new(4096, 4096, OOOC_ALL);
    let good = d.alloc(16, &[7; 16]);
    let data_end = d.map.len() as u64;
    let data_off = d.data_off;
    type Mutation = Box<dyn FnOnce(&mut Vec<u8>, u64)>;
    let cases: Vec<(&str, Vec<IoVec>, Mutation)> = vec![
        (
            "iovec below the data area (inside the ring)",
            vec![IoVec {
                base: RING_OFF as u64,
                len: 8,
            }],
            Box::new(|_, _| {}),
        ),
        (
            "iovec past the end of the map",
            vec![IoVec {
                base: data_end - 4,
                len: 8,
            }],
            Box::new(|_, _| {}),
        ),
        (
            "iovec whose end wraps around",
            vec![IoVec {
                base: data_off,
                len: u64::MAX,
            }],
            Box::new(|_, _| {}),
        ),
        (
            "iov_cnt overflowing the entry",
            vec![good],
            Box::new(|e, _| e[8..12].copy_from_slice(&u32::MAX.to_ne_bytes())),
        ),
        (
            "iov counts summing past the entry",
            vec![good],
            Box::new(|e, _| {
                e[12..16].copy_from_slice(&(u32::MAX / 2).to_ne_bytes());
                e[16..20].copy_from_slice(&(u32::MAX / 2).to_ne_bytes());
            }),
        ),
        (
            "cdb_off beyond the map",
            vec![good],
            Box::new(|e, _| e[24..32].copy_from_slice(&u64::MAX.to_ne_bytes())),
        ),
        (
            "cdb_off in the data area",
            vec![good],
            Box::new(move |e, _| e[24..32].copy_from_slice(&data_off.to_ne_bytes())),
        ),
        (
            "cdb_off inside the iovec array",
            vec![good],
            Box::new(|e, off| e[24..32].copy_from_slice(&(off + 48).to_ne_bytes())),
        ),
        (
            "cdb_off before the entry",
            vec![good],
            Box::new(|e, off| e[24..32].copy_from_slice(&(off - 8).to_ne_bytes())),
        ),
        (
            "CDB running past the entry end",
            vec![good],
            Box::new(|e, off| {
                let len = e.len();
                e[len - 8] = 0x28; // a 10-byte CDB in the last 8 bytes
                e[24..32].copy_from_slice(&(off + len as u64 - 8).to_ne_bytes())
            }),
        ),
        (
            "variable-length CDB longer than the entry",
            vec![good],
            Box::new(|e, _| {
                let at = 112;
                e[at] = 0x7f;
                e[at + 7] = 200;
            }),
        ),
        (
            "variable-length CDB longer than 260 bytes",
            vec![good],
            Box::new(|e, _| {
                let at = 112;
                e[at] = 0x7f;
                e[at + 7] = 255;
            }),
        ),
    ];
    let mut ring = d.ring();
    for (what, iovs, mutate) in cases {
        let id = d.cmd_with(&READ10, &iovs, (iovs.len() as u32, 0, 0), mutate);
        let (cid, why) = expect_invalid(ring.fetch().unwrap());
        assert_eq!(cid, id, "{what}");
        assert!(!why.is_empty());
        assert_eq!(ring.in_flight(), 1, "{what}");
        ring.complete(
            id,
            &Completion {
                status: 2,
                sense: &[0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24],
                read_len: None,
            },
        )
        .unwrap();
        let (sid, _, status, _, sense) = d.slot(d.last_off);
        assert_eq!((sid, status, sense[12]), (id, 2, 0x24), "{what}");
        assert_eq!(d.mb_tail(), d.head, "{what}");
        // The ring still works: a good command right after.
        let id = d.cmd(&READ10, &[good]);
        let cmd = expect_cmd(ring.fetch().unwrap());
        assert_eq!(cmd.cmd_id, id, "{what}");
        assert_eq!(cmd.data.to_vec(), [7; 16]);
        ring.complete_command(cmd, &Completion::status(0)).unwrap();
        assert_eq!(d.mb_tail(), d.head);
    }
}

#[test]
fn overlapping_data_is_refused_while_the_owner_is_in_flight() {
    let mut d = Dev::new(2048, 4096, OOOC_ALL);
    let a = d.alloc(64, &[1; 64]);
    let inside = IoVec {
        base: a.base + 16,
        len: 8,
    };
    let first = d.cmd(&WRITE10, &[a]);
    let second = d.cmd(&WRITE10, &[inside]);
    let mut ring = d.ring();
    let cmd = expect_cmd(ring.fetch().unwrap());
    let (id, why) = expect_invalid(ring.fetch().unwrap());
    assert_eq!(id, second);
    assert!(why.contains("overlaps"), "{why}");
    ring.complete(id, &Completion::status(2)).unwrap();
    // Overlap inside one command.
    let b = d.alloc(32, &[2; 32]);
    let third = d.cmd(
        &WRITE10,
        &[
            b,
            IoVec {
                base: b.base + 31,
                len: 1,
            },
        ],
    );
    let (id, _) = expect_invalid(ring.fetch().unwrap());
    assert_eq!(id, third);
    ring.complete(id, &Completion::status(2)).unwrap();
    // Once the first command is done its pages may be handed out again.
    ring.complete_command(cmd, &Completion::status(0)).unwrap();
    assert_ne!(first, 0);
    let again = d.cmd(&WRITE10, &[inside, b]);
    let cmd = expect_cmd(ring.fetch().unwrap());
    assert_eq!(cmd.cmd_id, again);
    // Zero-length iovecs never clash.
    let zero = d.cmd(
        &WRITE10,
        &[IoVec {
            base: b.base,
            len: 0,
        }],
    );
    let z = expect_cmd(ring.fetch().unwrap());
    assert_eq!(z.cmd_id, zero);
    assert!(z.data.is_empty());
}

#[test]
fn broken_headers_are_errors_not_panics() {
    // (description, raw header bytes written at head, head advance)
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("length 0", vec![TCMU_OP_CMD as u8, 0, 0, 0, 1, 0, 0, 0], 8),
        (
            "length past the ring end",
            {
                let mut h = ((1024 + 8) as u32 | TCMU_OP_CMD).to_ne_bytes().to_vec();
                h.extend([1, 0, 0, 0]);
                h
            },
            8,
        ),
        (
            "length past cmd_head",
            {
                let mut h = (256u32 | TCMU_OP_CMD).to_ne_bytes().to_vec();
                h.extend([1, 0, 0, 0]);
                h
            },
            128,
        ),
        (
            "unknown type",
            {
                let mut h = (128u32 | 5).to_ne_bytes().to_vec();
                h.extend([1, 0, 0, 0]);
                h
            },
            128,
        ),
        (
            "CMD too short for a response",
            {
                let mut h = (64u32 | TCMU_OP_CMD).to_ne_bytes().to_vec();
                h.extend([1, 0, 0, 0]);
                h
            },
            64,
        ),
        (
            "TMR shorter than its fixed part",
            {
                let mut h = (16u32 | TCMU_OP_TMR).to_ne_bytes().to_vec();
                h.extend([0, 0, 0, 0]);
                h
            },
            16,
        ),
        ("cmd_head not aligned", vec![], 4),
        ("cmd_head past the ring", vec![], 2048),
    ];
    for (what, hdr, adv) in cases {
        let mut d = Dev::new(1024, 4096, OOOC_ALL);
        // One good command in flight first.
        let good = d.cmd(&TUR, &[]);
        let mut ring = d.ring();
        let cmd = expect_cmd(ring.fetch().unwrap());
        let pos = d.head;
        d.w(RING_OFF + pos as usize, &hdr);
        if adv >= 1024 {
            d.word(MB_CMD_HEAD).store(adv, Ordering::Release);
        } else {
            d.set_head(pos + adv);
        }
        for _ in 0..2 {
            match ring.fetch() {
                Err(RingError::Corrupt { pos: p, why }) => {
                    assert_eq!(p, pos, "{what}");
                    assert!(!why.is_empty());
                }
                other => panic!("{what}: expected Corrupt, got {other:?}"),
            }
        }
        assert_eq!(ring.fetch_pos(), pos, "{what}");
        // Completing what was already fetched still works.
        ring.complete_command(cmd, &Completion::status(0)).unwrap();
        assert_eq!(d.mb_tail(), pos, "{what}");
        assert_eq!(d.slot(RING_OFF).0, good);
    }
}

#[test]
fn duplicate_cmd_id_in_flight_is_corrupt() {
    let mut d = Dev::new(1024, 4096, OOOC_ALL);
    let id = d.cmd(&TUR, &[]);
    d.next_id = id;
    d.cmd(&TUR, &[]);
    let mut ring = d.ring();
    expect_cmd(ring.fetch().unwrap());
    assert!(matches!(ring.fetch(), Err(RingError::Corrupt { .. })));
}

#[test]
fn wrap_with_pad() {
    // Ring of 1000 bytes (not a power of two); 120-byte TUR entries.
    let mut d = Dev::new(1000, 4096, OOOC_ALL);
    let mut ring = d.ring();
    for round in 0..30 {
        let id = d.cmd(&TUR, &[]);
        let cmd = expect_cmd(ring.fetch().unwrap());
        assert_eq!(cmd.cmd_id, id, "round {round}");
        assert!(ring.fetch().unwrap().is_none());
        ring.complete_command(cmd, &Completion::status(0)).unwrap();
        assert_eq!(ring.tail(), d.head, "round {round}");
        assert_eq!(d.mb_tail(), d.head, "round {round}");
        assert_eq!(ring.in_flight(), 0);
    }
    // 30 * 120 = 3600 bytes went through a 1000-byte ring: it wrapped (1000 / 120 = 8 entries,
    // then a 40-byte PAD) several times.
}

#[test]
fn pad_is_passed_with_the_command_after_it() {
    let mut d = Dev::new(1000, 4096, OOOC_ALL);
    let mut ring = d.ring();
    // Move the ring to offset 960 with completed commands.
    for _ in 0..8 {
        d.cmd(&TUR, &[]);
        let c = expect_cmd(ring.fetch().unwrap());
        ring.complete_command(c, &Completion::status(0)).unwrap();
    }
    assert_eq!(ring.tail(), 960);
    let id = d.cmd(&TUR, &[]);
    assert_eq!(d.len_op(RING_OFF + 960), 40 | TCMU_OP_PAD);
    let c = expect_cmd(ring.fetch().unwrap());
    assert_eq!(c.cmd_id, id);
    assert_eq!(ring.fetch_pos(), 120);
    // The PAD alone was passed at once: nothing older was outstanding.
    assert_eq!(ring.tail(), 0);
    assert_eq!(d.mb_tail(), 0);
    ring.complete_command(c, &Completion::status(0)).unwrap();
    assert_eq!(d.mb_tail(), 120);
}

#[test]
fn pad_behind_an_unfinished_command_waits() {
    let mut d = Dev::new(1000, 4096, OOOC_ALL);
    let mut ring = d.ring();
    for _ in 0..7 {
        d.cmd(&TUR, &[]);
        let c = expect_cmd(ring.fetch().unwrap());
        ring.complete_command(c, &Completion::status(0)).unwrap();
    }
    assert_eq!(ring.tail(), 840);
    let a = d.cmd(&TUR, &[]); // 840..960
    let b = d.cmd(&TUR, &[]); // PAD 960..1000, then 0..120
    let ca = expect_cmd(ring.fetch().unwrap());
    let cb = expect_cmd(ring.fetch().unwrap());
    assert_eq!((ca.cmd_id, cb.cmd_id), (a, b));
    // Completing b first (OOOC) fills a's slot, moves the tail past it and the PAD.
    ring.complete_command(cb, &Completion::status(0)).unwrap();
    assert_eq!(d.mb_tail(), 0);
    assert_eq!(d.slot(RING_OFF + 840).0, b);
    ring.complete_command(ca, &Completion::status(0)).unwrap();
    assert_eq!(d.mb_tail(), 120);
    assert_eq!(d.slot(RING_OFF).0, a);
}

#[test]
fn tmr_entries_are_decoded_and_passed() {
    let mut d = Dev::new(2048, 4096, OOOC_ALL);
    let mut ring = d.ring();
    let x = d.cmd(&TUR, &[]);
    let tmr_off = d.tmr(tmr::TCMU_TMR_ABORT_TASK, &[x, 77]);
    let cx = expect_cmd(ring.fetch().unwrap());
    match ring.fetch().unwrap() {
        Some(Fetched::Tmr(t)) => {
            assert_eq!(t.tmr_type, tmr::TCMU_TMR_ABORT_TASK);
            assert_eq!(t.cmd_ids, vec![x, 77]);
        }
        other => panic!("expected TMR, got {other:?}"),
    }
    assert_eq!(ring.in_flight(), 1);
    // The TMR sits behind x: the tail does not pass it yet.
    assert_eq!(d.mb_tail(), 0);
    ring.complete_command(cx, &Completion::status(0)).unwrap();
    assert_eq!(d.mb_tail(), d.head);
    assert_eq!(d.len_op(tmr_off), 40 | TCMU_OP_TMR, "TMR entry untouched");

    // With nothing outstanding, a TMR is passed as soon as it is fetched.
    d.tmr(tmr::TCMU_TMR_LUN_RESET, &[]);
    assert!(
        matches!(ring.fetch().unwrap(), Some(Fetched::Tmr(t)) if t.cmd_ids.is_empty() && t.tmr_type == 5)
    );
    assert_eq!(d.mb_tail(), d.head);
    assert!(ring.take_tail_moved());

    // cmd_cnt larger than the entry: only the ids that fit.
    let off = d.tmr(tmr::TCMU_TMR_ABORT_TASK_SET, &[1, 2, 3]);
    d.w(off + TMR_CMD_CNT, &1000u32.to_ne_bytes());
    match ring.fetch().unwrap() {
        Some(Fetched::Tmr(t)) => assert_eq!(t.cmd_ids, vec![1, 2, 3, 0]),
        other => panic!("expected TMR, got {other:?}"),
    }
}

#[test]
fn out_of_order_completion_relabels_the_oldest_slot() {
    let mut d = Dev::new(2048, 4096, OOOC_ALL);
    let mut ring = d.ring();
    let ids: Vec<u16> = (0..3).map(|_| d.cmd(&TUR, &[])).collect();
    let offs: Vec<usize> = (0..3).map(|i| RING_OFF + 120 * i).collect();
    let cmds: Vec<RingCommand> = (0..3).map(|_| expect_cmd(ring.fetch().unwrap())).collect();
    let len_ops: Vec<u32> = offs.iter().map(|&o| d.len_op(o)).collect();
    let mut cmds = cmds.into_iter();
    let (c0, c1, c2) = (
        cmds.next().unwrap(),
        cmds.next().unwrap(),
        cmds.next().unwrap(),
    );
    ring.complete_command(c2, &Completion::status(0x08))
        .unwrap();
    assert_eq!(d.slot(offs[0]).0, ids[2]);
    assert_eq!(d.slot(offs[0]).2, 0x08);
    assert_eq!(d.mb_tail(), 120);
    assert_eq!(ring.in_flight_ids(), vec![ids[0], ids[1]]);
    ring.complete_command(c0, &Completion::status(0)).unwrap();
    assert_eq!(d.slot(offs[1]).0, ids[0]);
    assert_eq!(d.mb_tail(), 240);
    ring.complete_command(c1, &Completion::status(2)).unwrap();
    assert_eq!(d.slot(offs[2]).0, ids[1]);
    assert_eq!(d.slot(offs[2]).2, 2);
    assert_eq!(d.mb_tail(), 360);
    for (o, l) in offs.iter().zip(len_ops) {
        assert_eq!(d.len_op(*o), l, "len_op must survive the response");
    }
}

#[test]
fn in_order_mode_holds_early_completions() {
    let mut d = Dev::new(2048, 4096, TCMU_MAILBOX_FLAG_CAP_READ_LEN);
    let mut ring = d.ring();
    let ids: Vec<u16> = (0..3).map(|_| d.cmd(&TUR, &[])).collect();
    let t = d.tmr(tmr::TCMU_TMR_ABORT_TASK, &[ids[0]]);
    let cmds: Vec<RingCommand> = (0..3).map(|_| expect_cmd(ring.fetch().unwrap())).collect();
    assert!(matches!(ring.fetch().unwrap(), Some(Fetched::Tmr(_))));
    let mut it = cmds.into_iter();
    let (c0, c1, c2) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());

    ring.complete_command(c2, &Completion::status(0x28))
        .unwrap();
    assert_eq!(d.mb_tail(), 0);
    assert!(!ring.take_tail_moved());
    assert_eq!(ring.awaiting_older_ids(), vec![ids[2]]);
    assert_eq!(ring.in_flight_ids(), vec![ids[0], ids[1]]);
    assert_eq!(d.slot(RING_OFF).2, 0, "nothing written yet");
    // Completing it twice is refused.
    assert!(matches!(
        ring.complete(ids[2], &Completion::status(0)),
        Err(RingError::NotInFlight(_))
    ));

    ring.complete_command(c0, &Completion::status(0)).unwrap();
    assert_eq!(d.mb_tail(), 120);
    assert!(ring.take_tail_moved());
    assert_eq!(d.slot(RING_OFF).0, ids[0]);

    ring.complete_command(
        c1,
        &Completion {
            status: 0,
            sense: &[],
            read_len: Some(9),
        },
    )
    .unwrap();
    // All three written in their own slots, and the tail passed the TMR too.
    assert_eq!(d.mb_tail(), d.head);
    assert_eq!(d.head as usize, t - RING_OFF + 40);
    assert_eq!(d.slot(RING_OFF + 120).0, ids[1]);
    assert_eq!(d.slot(RING_OFF + 120).1, TCMU_UFLAG_READ_LEN);
    assert_eq!(d.slot(RING_OFF + 120).3, 9);
    assert_eq!(d.slot(RING_OFF + 240).0, ids[2]);
    assert_eq!(d.slot(RING_OFF + 240).2, 0x28);
    assert!(ring.awaiting_older_ids().is_empty());
    assert_eq!(ring.in_flight(), 0);
}

#[test]
fn completion_errors_leave_the_ring_alone() {
    let mut d = Dev::new(1024, 4096, OOOC_ALL);
    let a = d.alloc(8, &[0; 8]);
    let id = d.cmd(&READ10, &[a]);
    let mut ring = d.ring();
    let before = d.r(RING_OFF, 128);
    assert!(matches!(
        ring.complete(id, &Completion::status(0)),
        Err(RingError::NotInFlight(i)) if i == id
    ));
    let cmd = expect_cmd(ring.fetch().unwrap());
    assert!(matches!(
        ring.complete(id + 1, &Completion::status(0)),
        Err(RingError::NotInFlight(_))
    ));
    // The command's buffer is alive: completion is refused.
    assert!(matches!(
        ring.complete(id, &Completion::status(0)),
        Err(RingError::BuffersInUse(i)) if i == id
    ));
    // Even when only the buffer (moved out of the command) is alive.
    let RingCommand { data, .. } = cmd;
    assert!(matches!(
        ring.complete(id, &Completion::status(0)),
        Err(RingError::BuffersInUse(_))
    ));
    assert_eq!(d.r(RING_OFF, 128), before);
    assert_eq!(d.mb_tail(), 0);
    assert_eq!(ring.in_flight(), 1);
    // Dropped on another thread: then it completes.
    std::thread::spawn(move || drop(data)).join().unwrap();
    ring.complete(id, &Completion::status(0)).unwrap();
    assert_eq!(d.mb_tail(), d.head);
}

#[test]
fn starts_at_the_current_tail() {
    let mut d = Dev::new(1000, 4096, OOOC_ALL);
    d.head = 480;
    d.word(MB_CMD_TAIL).store(480, Ordering::Release);
    d.set_head(480);
    let mut ring = d.ring();
    assert_eq!((ring.fetch_pos(), ring.tail()), (480, 480));
    assert!(ring.fetch().unwrap().is_none());
    let id = d.cmd(&TUR, &[]);
    let c = expect_cmd(ring.fetch().unwrap());
    assert_eq!(c.cmd_id, id);
    ring.complete_command(c, &Completion::status(0)).unwrap();
    assert_eq!(d.mb_tail(), 600);
}

#[test]
fn buffers_keep_the_mapping_alive() {
    let mut d = Dev::new(1024, 4096, OOOC_ALL);
    let a = d.alloc(4, b"keep");
    d.cmd(&WRITE10, &[a]);
    let mut ring = d.ring();
    let mut cmd = expect_cmd(ring.fetch().unwrap());
    drop(ring);
    let Dev { map, _fd, .. } = d;
    drop(map);
    drop(_fd);
    assert_eq!(cmd.data.to_vec(), b"keep");
    cmd.data.copy_from(0, b"more");
    assert_eq!(cmd.data.to_vec(), b"more");
}

#[test]
fn variable_length_cdb() {
    let mut d = Dev::new(2048, 4096, OOOC_ALL);
    let mut cdb = vec![0u8; 32];
    cdb[0] = 0x7f;
    cdb[7] = 24;
    cdb[31] = 0xaa;
    let id = d.cmd(&cdb, &[]);
    let mut ring = d.ring();
    let c = expect_cmd(ring.fetch().unwrap());
    assert_eq!(c.cmd_id, id);
    assert_eq!(c.cdb, cdb);
}

// ---- journal and recovery -----------------------------------------------------------------

fn journal_fd() -> OwnedFd {
    let fd = memfd_create("journal-unit", MFdFlags::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&fd, journal::JOURNAL_LEN as i64).unwrap();
    fd
}

fn journal_of(fd: &OwnedFd) -> Journal {
    Journal::map(fd.as_fd()).unwrap()
}

fn recover(d: &Dev, jfd: &OwnedFd) -> Result<Recovery, RecoverError> {
    Ring::recover(d.map.clone(), journal_of(jfd))
}

fn expect_pending(r: Recovered) -> RingCommand {
    match r {
        Recovered::Pending(c) => c,
        other => panic!("expected a pending command, got {other:?}"),
    }
}

/// The example: Y (older) runs, X (newer) completes into Y's slot at the tail; then the
/// worker dies. Replaying from the tail would complete X twice and lose Y; recovery must hand
/// back Y alone, and its completion must land in the one remaining slot.
#[test]
fn recovery_returns_the_command_whose_slot_was_taken() {
    let mut d = Dev::new(2048, 8192, OOOC_ALL);
    let jfd = journal_fd();
    let mut ring = Ring::with_journal(d.map.clone(), journal_of(&jfd)).unwrap();
    let buf = d.alloc(4096, &[7; 4096]);
    let y = d.cmd(&READ10, &[buf]);
    let x = d.cmd(&TUR, &[]);
    let cy = expect_cmd(ring.fetch().unwrap());
    let cx = expect_cmd(ring.fetch().unwrap());
    assert_eq!((cy.cmd_id, cx.cmd_id), (y, x));
    ring.complete_command(cx, &Completion::status(0)).unwrap();
    // X's answer went into Y's slot, and the tail passed it.
    assert_eq!(d.slot(RING_OFF).0, x);
    let tail = d.mb_tail();
    assert_ne!(tail, 0);
    // The worker dies with Y running.
    drop(cy);
    drop(ring);

    let rec = recover(&d, &jfd).unwrap();
    assert_eq!(rec.report.pending, 1);
    assert_eq!(rec.report.redelivered, 0);
    assert_eq!((rec.report.tail, rec.report.fetch_pos), (tail, d.head));
    let mut ring = rec.ring;
    let mut cmds = rec.commands.into_iter();
    let c = expect_pending(cmds.next().unwrap());
    assert!(cmds.next().is_none());
    assert_eq!(c.cmd_id, y);
    assert_eq!(c.cdb, READ10);
    assert_eq!(c.iovecs, vec![buf]);
    assert_eq!(
        c.data.to_vec(),
        vec![7; 4096],
        "the buffer is rebuilt over the same bytes"
    );
    assert!(!ring.take_tail_moved(), "nothing was re-delivered");
    ring.complete_command(c, &Completion::status(0)).unwrap();
    // Y's answer goes into the slot that still held X's request.
    let x_slot = RING_OFF + tail as usize;
    assert_eq!(d.slot(x_slot).0, y);
    assert_eq!(d.mb_tail(), d.head);
    assert!(ring.fetch().unwrap().is_none());
}

/// A worker dies after writing responses into ring slots but before storing the tail: the
/// responses are delivered again, each exactly once, and the running command comes back.
#[test]
fn responses_written_but_not_published_are_redelivered() {
    let mut d = Dev::new(4096, 4096, OOOC_ALL);
    let jfd = journal_fd();
    let mut ring = Ring::with_journal(d.map.clone(), journal_of(&jfd)).unwrap();
    let ids: Vec<u16> = (0..3).map(|_| d.cmd(&TUR, &[])).collect();
    let cmds: Vec<RingCommand> = (0..3).map(|_| expect_cmd(ring.fetch().unwrap())).collect();
    // Die right after the first response is written into the ring.
    ring.set_crash_plan(Arc::new(CrashPlan::new(
        Some(CrashPoint::ResponseWritten),
        1,
    )));
    let mut it = cmds.into_iter();
    let (c0, _c1, c2) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    drop(c0);
    let err = ring
        .complete_command(c2, &Completion::status(0x28))
        .unwrap_err();
    assert!(matches!(
        err,
        RingError::Crashed(CrashPoint::ResponseWritten)
    ));
    assert_eq!(d.slot(RING_OFF).0, ids[2], "the response is in the ring");
    assert_eq!(d.mb_tail(), 0, "but the tail never moved");
    // A dead engine writes nothing more.
    assert!(matches!(ring.fetch(), Err(RingError::Crashed(_))));
    drop(ring);

    let rec = recover(&d, &jfd).unwrap();
    assert_eq!(rec.report.redelivered, 1);
    assert_eq!(rec.report.pending, 2);
    let mut ring = rec.ring;
    assert!(ring.take_tail_moved());
    assert_eq!(d.mb_tail(), 120);
    assert_eq!((d.slot(RING_OFF).0, d.slot(RING_OFF).2), (ids[2], 0x28));
    let mut pending: Vec<RingCommand> = rec.commands.into_iter().map(expect_pending).collect();
    pending.sort_by_key(|c| c.cmd_id);
    assert_eq!(
        pending.iter().map(|c| c.cmd_id).collect::<Vec<_>>(),
        vec![ids[0], ids[1]]
    );
    for c in pending {
        ring.complete_command(c, &Completion::status(0)).unwrap();
    }
    assert_eq!(d.mb_tail(), d.head);
    let labels: Vec<u16> = (0..3).map(|i| d.slot(RING_OFF + 120 * i).0).collect();
    let mut sorted = labels.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted, ids,
        "each command answered in exactly one slot: {labels:?}"
    );
}

/// A worker dies after storing the tail but before freeing the journal slots: the kernel has
/// those answers, so recovery must not deliver them again.
#[test]
fn published_completions_are_not_redelivered() {
    let mut d = Dev::new(4096, 4096, OOOC_ALL);
    let jfd = journal_fd();
    let mut ring = Ring::with_journal(d.map.clone(), journal_of(&jfd)).unwrap();
    let ids: Vec<u16> = (0..2).map(|_| d.cmd(&TUR, &[])).collect();
    let c0 = expect_cmd(ring.fetch().unwrap());
    let c1 = expect_cmd(ring.fetch().unwrap());
    ring.set_crash_plan(Arc::new(CrashPlan::new(Some(CrashPoint::TailStored), 1)));
    assert!(matches!(
        ring.complete_command(c1, &Completion::status(0)),
        Err(RingError::Crashed(CrashPoint::TailStored))
    ));
    assert_eq!(d.mb_tail(), 120);
    drop((c0, ring));
    let rec = recover(&d, &jfd).unwrap();
    assert_eq!((rec.report.redelivered, rec.report.already_done), (0, 1));
    let mut ring = rec.ring;
    assert!(!ring.take_tail_moved());
    let c = expect_pending(rec.commands.into_iter().next().unwrap());
    assert_eq!(c.cmd_id, ids[0]);
    ring.complete_command(c, &Completion::status(0)).unwrap();
    assert_eq!(d.mb_tail(), d.head);
}

/// A fetch journaled but not committed is dropped, and its entry is fetched again.
#[test]
fn an_uncommitted_fetch_is_fetched_again() {
    let mut d = Dev::new(4096, 4096, OOOC_ALL);
    let jfd = journal_fd();
    let mut ring = Ring::with_journal(d.map.clone(), journal_of(&jfd)).unwrap();
    let a = d.cmd(&TUR, &[]);
    let b = d.cmd(&WRITE10, &[]);
    let ca = expect_cmd(ring.fetch().unwrap());
    ring.set_crash_plan(Arc::new(CrashPlan::new(
        Some(CrashPoint::FetchJournaled),
        1,
    )));
    assert!(matches!(ring.fetch(), Err(RingError::Crashed(_))));
    drop((ca, ring));
    let rec = recover(&d, &jfd).unwrap();
    assert!(rec.report.dropped_uncommitted_fetch);
    assert_eq!(rec.report.pending, 1);
    let mut ring = rec.ring;
    let ca = expect_pending(rec.commands.into_iter().next().unwrap());
    assert_eq!(ca.cmd_id, a);
    let cb = expect_cmd(ring.fetch().unwrap());
    assert_eq!(cb.cmd_id, b);
    ring.complete_command(cb, &Completion::status(0)).unwrap();
    ring.complete_command(ca, &Completion::status(0)).unwrap();
    assert_eq!(d.mb_tail(), d.head);
}

/// In-order mode: a finished command waiting for an older one keeps its computed answer.
#[test]
fn held_back_responses_survive_in_order_mode() {
    let mut d = Dev::new(4096, 4096, TCMU_MAILBOX_FLAG_CAP_READ_LEN);
    let jfd = journal_fd();
    let mut ring = Ring::with_journal(d.map.clone(), journal_of(&jfd)).unwrap();
    let ids: Vec<u16> = (0..2).map(|_| d.cmd(&TUR, &[])).collect();
    let c0 = expect_cmd(ring.fetch().unwrap());
    let c1 = expect_cmd(ring.fetch().unwrap());
    ring.complete_command(c1, &Completion::status(0x28))
        .unwrap();
    assert_eq!(d.mb_tail(), 0);
    drop((c0, ring));
    let rec = recover(&d, &jfd).unwrap();
    assert_eq!((rec.report.redelivered, rec.report.pending), (1, 1));
    let mut ring = rec.ring;
    assert!(
        !ring.take_tail_moved(),
        "still held behind the older command"
    );
    let c0 = expect_pending(rec.commands.into_iter().next().unwrap());
    assert_eq!(c0.cmd_id, ids[0]);
    ring.complete_command(c0, &Completion::status(0)).unwrap();
    assert_eq!(d.mb_tail(), d.head);
    assert_eq!(
        (d.slot(RING_OFF + 120).0, d.slot(RING_OFF + 120).2),
        (ids[1], 0x28)
    );
}

#[test]
fn inconsistent_journals_are_refused() {
    let mut d = Dev::new(4096, 4096, OOOC_ALL);
    // Never initialised.
    let jfd = journal_fd();
    let err = recover(&d, &jfd).unwrap_err();
    assert!(err.to_string().contains("magic"), "{err}");

    // A fetch position beyond cmd_head (as after the kernel reset the ring under us).
    let mut ring = Ring::with_journal(d.map.clone(), journal_of(&jfd)).unwrap();
    d.cmd(&TUR, &[]);
    let c = expect_cmd(ring.fetch().unwrap());
    drop((c, ring));
    d.word(MB_CMD_TAIL).store(0, Ordering::Release);
    d.set_head(0);
    let err = recover(&d, &jfd).unwrap_err();
    assert!(err.to_string().contains("not between"), "{err}");

    // The command slot count and the journal disagree: a journaled command vanished.
    let mut d = Dev::new(4096, 4096, OOOC_ALL);
    let jfd = journal_fd();
    let mut ring = Ring::with_journal(d.map.clone(), journal_of(&jfd)).unwrap();
    d.cmd(&TUR, &[]);
    d.cmd(&TUR, &[]);
    let c0 = expect_cmd(ring.fetch().unwrap());
    let c1 = expect_cmd(ring.fetch().unwrap());
    drop((c0, c1, ring));
    // Free the first slot by hand (the state word of slot 0).
    let f = std::fs::File::from(jfd.try_clone().unwrap());
    std::os::unix::fs::FileExt::write_all_at(&f, &0u32.to_ne_bytes(), journal::HEADER_SIZE as u64)
        .unwrap();
    let err = recover(&d, &jfd).unwrap_err();
    assert!(err.to_string().contains("command slots"), "{err}");
}

/// Garbage anywhere in a journal never makes recovery panic; it either is refused or (when it
/// only touched bytes recovery does not use) gives the same result as the intact journal.
#[test]
fn random_damage_is_refused_or_harmless() {
    let mut d = Dev::new(4096, 65536, OOOC_ALL);
    let jfd = journal_fd();
    let mut ring = Ring::with_journal(d.map.clone(), journal_of(&jfd)).unwrap();
    let mut keep = Vec::new();
    for i in 0..6 {
        let b = d.alloc(512, &[i; 512]);
        d.cmd(&WRITE10, &[b]);
        keep.push(expect_cmd(ring.fetch().unwrap()));
    }
    // Two finish; one of them into the oldest slot.
    let c5 = keep.pop().unwrap();
    ring.complete_command(c5, &Completion::status(0)).unwrap();
    drop((keep, ring));
    let f = std::fs::File::from(jfd.try_clone().unwrap());
    let good = journal_of(&jfd).snapshot();
    let base = {
        let r = recover(&d, &jfd).unwrap();
        let mut ids: Vec<u16> = r.commands.iter().map(Recovered::cmd_id).collect();
        ids.sort_unstable();
        ids
    };
    // Recovery rewrites the journal in place; each round below writes a damaged copy of the
    // original back first. Nothing is re-delivered (the finished command is already past the
    // tail), so the ring is the same for every round.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let live = journal::HEADER_SIZE + 8 * journal::SLOT_SIZE;
    for _ in 0..200 {
        let mut snap = good.clone();
        for _ in 0..(next() % 4 + 1) {
            let at = (next() as usize) % live;
            snap[at] = next() as u8;
        }
        std::os::unix::fs::FileExt::write_all_at(&f, &snap, 0).unwrap();
        match recover(&d, &jfd) {
            Err(RecoverError::Inconsistent(_)) => {}
            Err(other) => panic!("unexpected error {other}"),
            Ok(r) => {
                let mut ids: Vec<u16> = r.commands.iter().map(Recovered::cmd_id).collect();
                ids.sort_unstable();
                assert_eq!(ids, base);
            }
        }
    }
    // All garbage: refused.
    let junk: Vec<u8> = (0..journal::JOURNAL_LEN).map(|_| next() as u8).collect();
    std::os::unix::fs::FileExt::write_all_at(&f, &junk, 0).unwrap();
    assert!(matches!(
        recover(&d, &jfd),
        Err(RecoverError::Inconsistent(_))
    ));
}

#[test]
fn a_full_journal_holds_commands_back_in_the_ring() {
    let mut d = Dev::new(1 << 20, 4096, OOOC_ALL);
    let jfd = journal_fd();
    let mut ring = Ring::with_journal(d.map.clone(), journal_of(&jfd)).unwrap();
    for _ in 0..journal::JOURNAL_SLOTS + 1 {
        d.cmd(&TUR, &[]);
    }
    let mut held = Vec::new();
    for _ in 0..journal::JOURNAL_SLOTS {
        held.push(expect_cmd(ring.fetch().unwrap()));
    }
    assert!(ring.fetch().unwrap().is_none(), "no journal slot left");
    let c = held.pop().unwrap();
    ring.complete_command(c, &Completion::status(0)).unwrap();
    let last = expect_cmd(ring.fetch().unwrap());
    assert_eq!(last.cmd_id as usize, journal::JOURNAL_SLOTS + 1);
}
