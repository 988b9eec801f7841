//! Reads images whose content qemu wrote and compares with qemu's own raw
//! conversion (`qemu-img convert -O raw`). A missing qemu-img is a
//! failure, not a skip.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::fs::File;
use std::path::Path;
use std::process::Command;
use tcmu_warden_qcow::{Error, Image, Storage};

fn require_qemu() {
    assert!(
        Command::new("qemu-img").arg("--version").output().is_ok(),
        "qemu-img is required for these tests (apt-get install qemu-utils)"
    );
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_patterns(img: &Path, cluster: u64) {
    let p = img.to_str().unwrap();
    for (i, off) in [0u64, cluster / 2, 3 * cluster + 512, 70 * cluster]
        .iter()
        .enumerate()
    {
        let c = format!("write -P {} {} {}", 0x11 + i, off, cluster + 4096);
        run("qemu-io", &["-f", "qcow2", "-c", &c, p]);
    }
}

fn compare_with_raw(img: &Path, backing: Option<Box<dyn Storage + Send + Sync>>) {
    let dir = img.parent().unwrap();
    let raw = dir.join(format!(
        "{}.raw",
        img.file_name().unwrap().to_str().unwrap()
    ));
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    let want = std::fs::read(&raw).unwrap();
    let image = Image::open(File::open(img).unwrap(), backing).unwrap();
    assert_eq!(image.header().size, want.len() as u64);
    let mut got = vec![0u8; want.len()];
    // Odd-sized chunks to cross cluster boundaries.
    let mut off = 0usize;
    while off < got.len() {
        let n = 12_345.min(got.len() - off);
        image.read(&mut got[off..off + n], off as u64).unwrap();
        off += n;
    }
    assert!(
        got == want,
        "content differs from qemu-img convert for {img:?}"
    );
}

fn variant(opts: &str, cluster: u64, size: &str) {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            opts,
            img.to_str().unwrap(),
            size,
        ],
    );
    write_patterns(&img, cluster);
    compare_with_raw(&img, None);
}

#[test]
fn cluster_4k_v3() {
    variant("cluster_size=4096,compat=1.1", 4096, "16M");
}
#[test]
fn cluster_64k_v2() {
    variant("cluster_size=65536,compat=0.10", 65536, "16M");
}
#[test]
fn cluster_2m_v3() {
    variant("cluster_size=2097152,compat=1.1", 2 << 20, "160M");
}

#[test]
fn zero_clusters_read_as_zero() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("z.qcow2");
    let p = img.to_str().unwrap();
    run(
        "qemu-img",
        &["create", "-f", "qcow2", "-o", "cluster_size=65536", p, "4M"],
    );
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0xab 0 1M", p]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -z 65536 131072", p],
    );
    let image = Image::open(File::open(&img).unwrap(), None).unwrap();
    let mut b = vec![1u8; 65536 * 3];
    image.read(&mut b, 0).unwrap();
    assert!(b[..65536].iter().all(|&x| x == 0xab));
    assert!(b[65536..].iter().all(|&x| x == 0));
    compare_with_raw(&img, None);
}

fn compressed(ctype: &str) {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    run(
        "qemu-img",
        &["create", "-f", "qcow2", src.to_str().unwrap(), "8M"],
    );
    write_patterns(&src, 65536);
    let dst = dir.path().join("c.qcow2");
    let o = format!("compression_type={ctype}");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &o,
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
        ],
    );
    compare_with_raw(&dst, None);
}

#[test]
fn compressed_zlib() {
    compressed("zlib");
}
#[test]
fn compressed_zstd() {
    compressed("zstd");
}

#[test]
fn backing_file_read_through() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    run(
        "qemu-img",
        &["create", "-f", "raw", base.to_str().unwrap(), "8M"],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 8M",
            base.to_str().unwrap(),
        ],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            top.to_str().unwrap(),
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x77 1M 100k",
            top.to_str().unwrap(),
        ],
    );
    let probe = Image::open(File::open(&top).unwrap(), None).unwrap();
    assert_eq!(
        probe.backing_name().unwrap().as_deref(),
        Some(&b"base.raw"[..])
    );
    compare_with_raw(&top, Some(Box::new(File::open(&base).unwrap())));
}

#[test]
fn snapshot_image_serves_active_layer() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    let p = img.to_str().unwrap();
    run("qemu-img", &["create", "-f", "qcow2", p, "4M"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x01 0 1M", p]);
    run("qemu-img", &["snapshot", "-c", "snap1", p]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x02 0 64k", p]);
    let image = Image::open(File::open(&img).unwrap(), None).unwrap();
    assert_eq!(image.header().nb_snapshots, 1);
    compare_with_raw(&img, None);
}

#[test]
fn refuses_dirty_lazy_refcount_image() {
    // Build a v3 image and set the dirty bit by hand, as a crash with
    // lazy_refcounts=on leaves it.
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            img.to_str().unwrap(),
            "1M",
        ],
    );
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[79] |= 1;
    assert!(matches!(
        Image::open(bytes.clone(), None),
        Err(Error::Unsupported(_))
    ));
    bytes[79] &= !1;
    bytes[72] |= 0x80;
    assert!(matches!(
        Image::open(bytes, None),
        Err(Error::UnknownIncompatible(_))
    ));
}
