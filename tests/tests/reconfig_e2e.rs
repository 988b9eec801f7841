//! Reconfiguration end to end without a kernel: the worker's [`apply_reconfig`] (what it does on
//! the supervisor's `Reconfig` message, relayed from the kernel's `RECONFIG_DEVICE`) changes a
//! running device, and the simulated kernel sees the effect through SCSI commands: READ
//! CAPACITY reports the new size after a CAPACITY DATA HAS CHANGED unit attention, writes reach
//! the grown area, and MODE SENSE's caching page shows the new write-cache setting.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::Arc;

use tcmu_warden_tests::{Completed, Rig, SimConfig, sense_triple};
use tcmu_warden_worker::handler::ram::RamHandler;
use tcmu_warden_worker::handler::{DeviceConfig, Handler};
use tcmu_warden_worker::runtime::apply_reconfig;

const BS: u64 = 512;

fn cfg(blocks: u64) -> DeviceConfig {
    DeviceConfig {
        name: "reconfig".into(),
        subtype: "ram".into(),
        cfgstring: String::new(),
        dev_size: blocks * BS,
        block_size: BS as u32,
        max_sectors: 128,
        write_cache: false,
        unit_serial: "reconfig-1".into(),
    }
}

/// A device of `blocks` blocks served through `handler` by a runtime with two I/O threads.
fn rig(blocks: u64, handler: Arc<dyn Handler>) -> Rig {
    Rig::new(&cfg(blocks), handler, SimConfig::default(), 2)
}

/// READ CAPACITY(16).
fn capacity(rig: &mut Rig) -> Completed {
    rig.one(
        &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
        &[],
        32,
    )
}

/// The last LBA READ CAPACITY(16) reports.
fn last_lba(rig: &mut Rig) -> u64 {
    let c = capacity(rig);
    assert_eq!(c.status, 0, "READ CAPACITY failed: {:?}", c.sense);
    u64::from_be_bytes(c.data_in[0..8].try_into().unwrap())
}

/// The write-cache-enable bit of the caching mode page.
fn wce(rig: &mut Rig) -> bool {
    // MODE SENSE(6), DBD, caching page.
    let c = rig.one(&[0x1a, 0x08, 0x08, 0, 64, 0], &[], 64);
    assert_eq!(c.status, 0);
    assert_eq!(c.data_in[4] & 0x3f, 0x08, "caching page");
    c.data_in[6] & 0x04 != 0
}

fn write16(lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = vec![0x8a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn read16(lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = write16(lba, blocks);
    c[0] = 0x88;
    c
}

#[test]
fn growing_reports_the_new_capacity_after_a_unit_attention() {
    let mut rig = rig(2048, Arc::new(RamHandler::new(2048 * BS)));
    assert_eq!(last_lba(&mut rig), 2047);
    // Beyond the end: refused before the resize.
    let w = rig.one(&write16(3000, 1), &[0xab; 512], 0);
    assert_eq!(sense_triple(&w), (0x05, 0x21, 0x00), "LBA out of range");

    apply_reconfig(&rig.emu, Some(4096 * BS), None).unwrap();
    // The next command reports CAPACITY DATA HAS CHANGED once.
    let ua = capacity(&mut rig);
    assert_eq!(sense_triple(&ua), (0x06, 0x2a, 0x09));
    assert_eq!(last_lba(&mut rig), 4095);
    // The grown area is usable.
    let w = rig.one(&write16(3000, 1), &[0xab; 512], 0);
    assert_eq!(w.status, 0);
    let r = rig.one(&read16(3000, 1), &[], 512);
    assert_eq!(r.status, 0);
    assert!(r.data_in.iter().all(|&b| b == 0xab));

    // Shrinking works the same way.
    apply_reconfig(&rig.emu, Some(1024 * BS), None).unwrap();
    assert_eq!(sense_triple(&capacity(&mut rig)), (0x06, 0x2a, 0x09));
    assert_eq!(last_lba(&mut rig), 1023);
    assert_eq!(
        sense_triple(&rig.one(&read16(3000, 1), &[], 512)),
        (0x05, 0x21, 0x00)
    );
}

#[test]
fn write_cache_changes_show_in_the_caching_page() {
    let mut rig = rig(2048, Arc::new(RamHandler::new(2048 * BS)));
    assert!(!wce(&mut rig));
    apply_reconfig(&rig.emu, None, Some(true)).unwrap();
    assert!(wce(&mut rig));
    apply_reconfig(&rig.emu, None, Some(false)).unwrap();
    assert!(!wce(&mut rig));
}

/// A ram handler whose store cannot grow.
struct NoResize(RamHandler);

impl Handler for NoResize {
    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        self.0.read(offset, bufs)
    }
    fn write(&self, offset: u64, bufs: &[IoSlice<'_>], durable: bool) -> io::Result<()> {
        self.0.write(offset, bufs, durable)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
    fn resize(&self, _new_size: u64) -> io::Result<()> {
        Err(io::Error::other("the store cannot grow"))
    }
}

#[test]
fn a_failed_resize_changes_nothing() {
    let mut rig = rig(2048, Arc::new(NoResize(RamHandler::new(2048 * BS))));
    let err = apply_reconfig(&rig.emu, Some(4096 * BS), None).unwrap_err();
    assert!(err.contains("cannot grow"), "{err}");
    // No unit attention, old size.
    assert_eq!(last_lba(&mut rig), 2047);
    let err = apply_reconfig(&rig.emu, Some(100), None).unwrap_err();
    assert!(err.contains("no whole"), "{err}");
    assert_eq!(last_lba(&mut rig), 2047);
}
