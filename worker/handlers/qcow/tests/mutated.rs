//! Random and mutated images fed to the parser and the read path: never a
//! panic, only typed errors (the in-tree stand-in for the `qcow_image` fuzz
//! target, since cargo-fuzz is not installed on every host).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use proptest::prelude::*;
use std::process::Command;
use tcmu_warden_qcow::{Error, Image};

/// A small valid image written by qemu (compressed + plain clusters), the
/// seed the mutations start from.
fn seed() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.qcow2");
    let dst = dir.path().join("c.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-f", "qcow2", "-o", "cluster_size=4096"])
        .arg(&src)
        .arg("1M")
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x3c 0 64k"])
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("qemu-img")
        .args(["convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096"])
        .arg(&src)
        .arg(&dst)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::read(dst).unwrap()
}

/// Opens and reads a bounded set of ranges; returns the first error.
fn exercise(bytes: Vec<u8>) -> Result<(), Error> {
    let img = Image::open(bytes, None)?;
    let size = img.header().size;
    let _ = img.backing_name();
    let mut buf = vec![0u8; 8192];
    for off in [0, 4096 - 100, size / 2, size.saturating_sub(8192)] {
        let n = (size.saturating_sub(off)).min(8192) as usize;
        img.read(&mut buf[..n], off)?;
    }
    Ok(())
}

#[test]
fn seed_is_read_correctly() {
    let bytes = seed();
    let img = Image::open(bytes, None).unwrap();
    let mut b = vec![0u8; 65536 + 4096];
    img.read(&mut b, 0).unwrap();
    assert!(b[..65536].iter().all(|&x| x == 0x3c));
    assert!(b[65536..].iter().all(|&x| x == 0));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn mutated_images_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16),
        truncate in any::<Option<prop::sample::Index>>(),
    ) {
        let mut bytes = SEED.with(|s| s.clone());
        for (i, v) in flips {
            let i = i.index(bytes.len());
            bytes[i] = v;
        }
        if let Some(t) = truncate {
            let t = t.index(bytes.len());
            bytes.truncate(t);
        }
        let _ = exercise(bytes);
    }

    #[test]
    fn random_bytes_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        // Without the magic nothing is accepted.
        prop_assume!(bytes.get(..4) != Some(&[0x51, 0x46, 0x49, 0xfb][..]));
        prop_assert!(Image::open(bytes, None).is_err());
    }
}

thread_local! {
    static SEED: Vec<u8> = seed();
}
