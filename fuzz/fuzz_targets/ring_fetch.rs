//! The ring is shared memory; every byte the worker reads from it is untrusted. Arbitrary
//! mailbox indexes and ring contents must give fetched commands, `Invalid` entries or a ring
//! error, never a panic or an out-of-bounds access.
#![no_main]

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use libfuzzer_sys::fuzz_target;
use tcmu_warden_worker::ring::{Completion, Fetched, Mapping, Ring};

const MAP_LEN: usize = 16 * 4096;
const RING_OFF: u32 = 128;
const RING_SIZE: u32 = 8192 - 128;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    // SAFETY: memfd_create with a static NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"ring".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: memfd_create returned a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own descriptor.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), MAP_LEN as i64) }, 0);
    let map = Mapping::map(fd.as_fd(), MAP_LEN).expect("map");
    // Mailbox: version 2, flags from the input, the fixed ring geometry, head from the input.
    let mut mb = [0u8; 128];
    mb[0..2].copy_from_slice(&2u16.to_ne_bytes());
    mb[2..4].copy_from_slice(&u16::from(data[0] & 0x0f).to_ne_bytes());
    mb[4..8].copy_from_slice(&RING_OFF.to_ne_bytes());
    mb[8..12].copy_from_slice(&RING_SIZE.to_ne_bytes());
    let head = u32::from_ne_bytes([data[1], data[2], data[3], data[4]]) % (RING_SIZE + 64);
    mb[12..16].copy_from_slice(&head.to_ne_bytes());
    let ring_bytes = &data[5..];
    // SAFETY: the mapping is MAP_LEN bytes long and nobody else uses it yet.
    unsafe {
        std::ptr::copy_nonoverlapping(mb.as_ptr(), map.as_ptr(), mb.len());
        let n = ring_bytes.len().min(RING_SIZE as usize);
        std::ptr::copy_nonoverlapping(ring_bytes.as_ptr(), map.as_ptr().add(RING_OFF as usize), n);
    }
    let Ok(mut ring) = Ring::new(map) else { return };
    let mut ids = Vec::new();
    for _ in 0..64 {
        match ring.fetch() {
            Ok(Some(Fetched::Cmd(c))) => ids.push(c.cmd_id),
            Ok(Some(Fetched::Invalid { cmd_id, .. })) => ids.push(cmd_id),
            Ok(Some(Fetched::Tmr(_))) => {}
            Ok(None) | Err(_) => break,
        }
    }
    for id in ids.into_iter().rev() {
        let _ = ring.complete(id, &Completion { status: 0, sense: &[], read_len: Some(1) });
    }
});
