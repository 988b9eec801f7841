//! The librbd binding against a throwaway one-node cluster: aio round trips with 256 in flight,
//! discard, flush, `rbd export` equals what was written, an image without exclusive-lock refused.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::sync::mpsc;

use tcmu_warden_rbd::{CawOutcome, Cluster, Image, IoCtx, RbdError};

#[test]
fn aio_against_a_one_node_cluster() {
    let Some(cl) = common::TestCluster::start(16789) else {
        return;
    };
    cl.rbd(&["create", "--size", "64M", "rbd/img0"]);
    cl.rbd(&[
        "create",
        "--size",
        "8M",
        "--image-feature",
        "layering",
        "rbd/nolock",
    ]);
    let conf = cl.conf.to_str().unwrap();
    let cluster = Cluster::connect("admin", Some(conf), &[("rados_osd_op_timeout", "30")]).unwrap();
    let io = IoCtx::open(&cluster, "rbd").unwrap();

    let bare = Image::open(&io, "nolock").unwrap();
    assert_eq!(
        bare.require_exclusive_lock(),
        Err(RbdError::NoExclusiveLock)
    );
    drop(bare);

    let img = Image::open(&io, "img0").unwrap();
    assert_eq!(img.size().unwrap(), 64 << 20);
    img.require_exclusive_lock().unwrap();

    // 256 writes of 4 KiB in flight at once, each a distinct pattern.
    let (tx, rx) = mpsc::channel();
    for i in 0..256u64 {
        let tx = tx.clone();
        let buf = vec![(i % 251) as u8 + 1; 4096];
        img.aio_write(
            i * 4096,
            buf,
            Box::new(move |rv, _| tx.send((i, rv)).unwrap()),
        )
        .unwrap();
    }
    for _ in 0..256 {
        let (i, rv) = rx.recv().unwrap();
        assert_eq!(rv, 0, "write {i}: librbd reports 0 for a completed write");
    }
    assert!(
        img.is_lock_owner().unwrap(),
        "the first write takes the exclusive lock"
    );
    img.aio_flush(Box::new(move |rv, _| tx.send((0, rv)).unwrap()))
        .unwrap();
    assert_eq!(rx.recv().unwrap().1, 0);

    // Read them back, 256 in flight.
    let (rtx, rrx) = mpsc::channel();
    for i in 0..256u64 {
        let rtx = rtx.clone();
        img.aio_read(
            i * 4096,
            4096,
            Box::new(move |rv, buf| rtx.send((i, rv, buf)).unwrap()),
        )
        .unwrap();
    }
    for _ in 0..256 {
        let (i, rv, buf) = rrx.recv().unwrap();
        assert_eq!(rv, 4096);
        assert!(buf.iter().all(|&b| b == (i % 251) as u8 + 1), "read {i}");
    }

    // Discard blocks 16..32 (64 KiB, librbd's default rbd_discard_granularity_bytes: smaller
    // discards may be skipped, which UNMAP allows with LBPRZ=0); they read back as zeros.
    img.aio_discard(
        65536,
        65536,
        Box::new(move |rv, _| rtx.send((0, rv, Vec::new())).unwrap()),
    )
    .unwrap();
    assert_eq!(rrx.recv().unwrap().1, 0);
    let (ztx, zrx) = mpsc::channel();
    img.aio_read(
        65536,
        65536,
        Box::new(move |rv, buf| ztx.send((rv, buf)).unwrap()),
    )
    .unwrap();
    let (rv, buf) = zrx.recv().unwrap();
    assert_eq!(rv, 65536);
    assert!(buf.iter().all(|&b| b == 0));
    // WRITE SAME: a 512-byte pattern over blocks 32..34 (8 KiB).
    let pattern: Vec<u8> = (0..512u32).map(|i| (i % 7) as u8 + 0x40).collect();
    let (wtx, wrx) = mpsc::channel();
    let w2 = wtx.clone();
    img.aio_writesame(
        32 * 4096,
        8192,
        pattern.clone(),
        Box::new(move |rv, _| w2.send(rv).unwrap()),
    )
    .unwrap();
    assert_eq!(wrx.recv().unwrap(), 0);

    // COMPARE AND WRITE on the first 512 bytes of block 40 (holds 41 from the first pass; librbd 16
    // refuses a compare-and-write longer than one 512-byte sector with EINVAL): a match writes, a miscompare
    // reports the first differing byte and writes nothing.
    let (ctx, crx) = mpsc::channel();
    let old = vec![41u8; 512];
    let new = vec![0xAAu8; 512];
    let c2 = ctx.clone();
    img.aio_compare_and_write(
        40 * 4096,
        &old,
        &new,
        Box::new(move |o| c2.send(o).unwrap()),
    )
    .unwrap();
    assert_eq!(crx.recv().unwrap(), CawOutcome::Written);
    let mut wrong = vec![0xAAu8; 512];
    wrong[100] = 0;
    img.aio_compare_and_write(
        40 * 4096,
        &wrong,
        &old,
        Box::new(move |o| ctx.send(o).unwrap()),
    )
    .unwrap();
    assert_eq!(crx.recv().unwrap(), CawOutcome::Miscompare { offset: 100 });
    drop(img);

    // `rbd export` sees exactly what was written.
    let out = cl.dir.path().join("export.raw");
    cl.rbd(&["export", "rbd/img0", out.to_str().unwrap()]);
    let exported = std::fs::read(&out).unwrap();
    assert_eq!(exported.len(), 64 << 20);
    for i in 0..256usize {
        let want = if (16..32).contains(&i) {
            0
        } else if i == 32 || i == 33 || i == 40 {
            continue;
        } else {
            (i % 251) as u8 + 1
        };
        assert!(
            exported[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&b| b == want),
            "block {i}"
        );
    }
    assert!(
        exported[40 * 4096..40 * 4096 + 512]
            .iter()
            .all(|&b| b == 0xAA)
    );
    assert!(
        exported[40 * 4096 + 512..41 * 4096]
            .iter()
            .all(|&b| b == 41)
    );
    for (k, b) in exported[32 * 4096..34 * 4096].iter().enumerate() {
        assert_eq!(*b, pattern[k % 512], "write same byte {k}");
    }
    assert!(exported[256 * 4096..].iter().all(|&b| b == 0));
}
