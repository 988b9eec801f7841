//! The `qcow` handler through the SDK's block methods, on images qemu wrote.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::OwnedFd;
use std::process::Command;
use tcmu_warden_qcow_worker::QcowFactory;
use tcmu_warden_sdk::{DeviceConfig, HandlerError, HandlerFactory};

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}");
}

fn dev(size: u64) -> DeviceConfig {
    DeviceConfig {
        name: "q0".into(),
        subtype: "qcow".into(),
        cfgstring: "/img.qcow2".into(),
        dev_size: size,
        block_size: 512,
        max_sectors: 128,
        write_cache: false,
        unit_serial: "q0".into(),
    }
}

#[test]
fn reads_what_qemu_wrote_and_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    let p = img.to_str().unwrap();
    run("qemu-img", &["create", "-f", "qcow2", p, "8M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x42 1M 128k", p],
    );
    let fd = OwnedFd::from(File::open(&img).unwrap());
    let h = QcowFactory.open(&dev(8 << 20), Some(fd)).unwrap();
    let mut a = vec![9u8; 4096];
    let mut b = vec![9u8; 8192];
    h.read(
        (1 << 20) - 4096,
        &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)],
    )
    .unwrap();
    assert!(a.iter().all(|&x| x == 0));
    assert!(b.iter().all(|&x| x == 0x42));
    let e = h.write(0, &[IoSlice::new(&[1u8; 512])], true).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(30));
}

#[test]
fn refuses_backing_file_and_oversized_dev() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("b.qcow2");
    let top = dir.path().join("t.qcow2");
    run(
        "qemu-img",
        &["create", "-f", "qcow2", base.to_str().unwrap(), "8M"],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ],
    );
    let fd = OwnedFd::from(File::open(&top).unwrap());
    assert!(matches!(
        QcowFactory.open(&dev(8 << 20), Some(fd)),
        Err(HandlerError::Config { .. })
    ));
    let fd = OwnedFd::from(File::open(&base).unwrap());
    assert!(matches!(
        QcowFactory.open(&dev(16 << 20), Some(fd)),
        Err(HandlerError::Config { .. })
    ));
    assert!(matches!(
        QcowFactory.open(&dev(8 << 20), None),
        Err(HandlerError::NoBacking)
    ));
}
