//! Arbitrary CDBs and data never panic, and always end in GOOD or a well-formed CHECK CONDITION.

use super::*;
use crate::scsi::table::OPS;
use proptest::prelude::*;

fn small_dev(caps: HandlerCaps, wce: bool) -> Dev {
    let mut c = cfg(64);
    c.max_sectors = 16;
    c.write_cache = wce;
    Dev::with(c, caps, |_| {})
}

/// Checks the result's shape.
fn well_formed(r: &CommandResult) -> Result<(), TestCaseError> {
    match r.status {
        status::GOOD => prop_assert!(r.sense.is_none()),
        status::CHECK_CONDITION => {
            let s = r.sense.expect("CHECK CONDITION carries sense");
            let b = s.to_bytes();
            prop_assert!(b.len() <= 96);
            prop_assert!(b[0] == 0x70 || b[0] == 0xF0, "response code {:02x}", b[0]);
            prop_assert!(
                matches!(b[2], 0x02..=0x07 | 0x0A | 0x0B | 0x0E),
                "sense key {:x}",
                b[2]
            );
            prop_assert_eq!(b[7] as usize, b.len() - 8);
            let d = s.to_descriptor_bytes();
            prop_assert!(d.len() <= 96);
            prop_assert_eq!(d[0], 0x72);
        }
        other => prop_assert!(false, "unexpected status {other:#x}"),
    }
    Ok(())
}

/// CDBs starting with an opcode the table knows, with field bytes drawn from values that make
/// it past the first checks often (small LBAs and lengths).
fn known_cdb() -> impl Strategy<Value = Vec<u8>> {
    let ops: Vec<u8> = OPS.iter().map(|o| o.opcode).collect();
    (
        proptest::sample::select(ops),
        proptest::collection::vec(
            prop_oneof![
                Just(0u8),
                Just(1),
                Just(2),
                Just(0x08),
                Just(0x10),
                Just(0x3F),
                Just(0x80),
                Just(0xFF),
                any::<u8>()
            ],
            0..=31,
        ),
    )
        .prop_map(|(op, rest)| {
            let mut c = vec![op];
            c.extend(rest);
            c
        })
}

fn any_cdb() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![proptest::collection::vec(any::<u8>(), 1..=32), known_cdb()]
}

fn data_out() -> impl Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec(
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..600),
            proptest::collection::vec(Just(0u8), 0..2100),
        ],
        0..4,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_commands_never_panic(
        cdb in any_cdb(),
        segs in data_out(),
        thin in any::<bool>(),
        wce in any::<bool>(),
        ua in any::<bool>(),
    ) {
        let caps = if thin {
            HandlerCaps { unmap: true, unmap_granularity: 1, unmap_reads_zero: true }
        } else {
            HandlerCaps::default()
        };
        let d = small_dev(caps, wce);
        if ua {
            d.emu.power_on_reset();
        }
        let mut buf = DataBuf::from_segments(segs);
        let len = buf.len();
        let r = d.run_buf(&cdb, &mut buf);
        well_formed(&r)?;
        if let Some(n) = r.read_len {
            prop_assert!(n as usize <= len);
        }
        // The device still works afterwards.
        let r = d.run(&[0, 0, 0, 0, 0, 0]);
        well_formed(&r)?;
    }

    #[test]
    fn refused_devices_never_panic(cdb in any_cdb(), segs in data_out()) {
        let emu = Emulator::refused(&cfg(64), "refused");
        let mut buf = DataBuf::from_segments(segs);
        let r = emu.execute(&mut Command { cdb: &cdb, data: &mut buf, bidi_in: None });
        well_formed(&r)?;
        if r.status == status::CHECK_CONDITION && !matches!(cdb[0], 0x03 | 0x12 | 0xA0) {
            let s = r.sense.unwrap();
            prop_assert_eq!((s.key, s.asc, s.ascq), (0x02, 0x04, 0x03));
        }
    }
}

/// Runs `cdb` through [`Emulator::submit`] (the runtime's entry: the asynchronous block path
/// where the table has one) with a data buffer holding `segs`, over memory this function owns;
/// returns the answer and the buffer's bytes afterwards.
fn submit_with(emu: &Emulator, cdb: &[u8], segs: &[Vec<u8>]) -> (CommandResult, Vec<u8>) {
    use std::ptr::NonNull;
    use tcmu_warden_sdk::{DeviceBlock, Pending};
    let mut store: Vec<u8> = segs.concat();
    let base = store.as_mut_ptr();
    let mut raw = Vec::new();
    let mut at = 0usize;
    for s in segs {
        // SAFETY: `at + s.len() <= store.len()`, so the pointer stays inside `store`.
        let p = unsafe { base.add(at) };
        raw.push((NonNull::new(p).unwrap(), s.len()));
        at += s.len();
    }
    // SAFETY: the segments are disjoint pieces of `store`, which is neither moved nor touched
    // until the command is answered below, and the answer comes after the buffer is released
    // (`Pending` drops its buffers before calling its completion).
    let buf = unsafe { DataBuf::from_raw(&raw, Arc::new(())) };
    let answer = Arc::new(Mutex::new(None));
    let a = answer.clone();
    let p = Pending::new(
        cdb.to_vec(),
        buf,
        None,
        DeviceBlock::detached(),
        Box::new(move |r, _| *a.lock().unwrap() = Some(r)),
    );
    emu.submit(p, false);
    // The in-memory handler completes every block request before returning.
    let r = answer
        .lock()
        .unwrap()
        .take()
        .expect("answered before submit returned");
    (r, store)
}

/// Well-formed block commands (the ones with an asynchronous path, and COMPARE AND WRITE) near
/// the end of a 64-block device, with their data-out split into segments: most get past the
/// checks and reach the handler.
fn block_command() -> impl Strategy<Value = (Vec<u8>, Vec<Vec<u8>>)> {
    let ops = vec![
        0x08u8, 0x0A, 0x28, 0x2A, 0x2E, 0x35, 0x41, 0x42, 0x88, 0x89, 0x8A, 0x8E, 0x91, 0x93, 0xA8,
        0xAA, 0xAE,
    ];
    (
        proptest::sample::select(ops),
        0u64..70,
        0u32..20,
        proptest::sample::select(vec![0u8, 0x08, 0x02, 0x04, 0x10, 0x01, 0x0A]),
        proptest::collection::vec((0u64..70, 0u32..12), 0..4),
        prop_oneof![Just(None), (0usize..2100).prop_map(Some)],
        any::<u8>(),
        proptest::collection::vec(1usize..700, 0..3),
    )
        .prop_map(|(op, lba, blocks, flags, descs, data_len, seed, cuts)| {
            let mut cdb = match op {
                0x08 | 0x0A => vec![
                    op,
                    (lba >> 16) as u8 & 0x1F,
                    (lba >> 8) as u8,
                    lba as u8,
                    blocks as u8,
                    0,
                ],
                0x28 | 0x2A | 0x2E | 0x35 | 0x41 | 0x42 => {
                    let mut c = vec![op, flags, 0, 0, 0, 0, 0, 0, 0, 0];
                    c[2..6].copy_from_slice(&(lba as u32).to_be_bytes());
                    c[7..9].copy_from_slice(&(blocks as u16).to_be_bytes());
                    c
                }
                0xA8 | 0xAA | 0xAE => {
                    let mut c = vec![op, flags, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                    c[2..6].copy_from_slice(&(lba as u32).to_be_bytes());
                    c[6..10].copy_from_slice(&blocks.to_be_bytes());
                    c
                }
                _ => {
                    let mut c = vec![op, flags, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                    c[2..10].copy_from_slice(&lba.to_be_bytes());
                    c[10..14].copy_from_slice(&blocks.to_be_bytes());
                    c
                }
            };
            let data = if op == 0x42 {
                cdb[1] = 0;
                let mut list = vec![0u8; 8];
                for (l, b) in &descs {
                    list.extend_from_slice(&l.to_be_bytes());
                    list.extend_from_slice(&b.to_be_bytes());
                    list.extend_from_slice(&[0; 4]);
                }
                let n = list.len() as u16;
                list[0..2].copy_from_slice(&(n - 2).to_be_bytes());
                list[2..4].copy_from_slice(&(n - 8).to_be_bytes());
                cdb[7..9].copy_from_slice(&n.to_be_bytes());
                list
            } else if op == 0x89 {
                // COMPARE AND WRITE: one block-count byte.
                cdb[10..14].copy_from_slice(&[0, 0, 0, blocks as u8 % 4]);
                let want = 2 * (blocks as usize % 4) * BS;
                let mut d = pattern(data_len.unwrap_or(want), seed);
                if seed % 2 == 0 {
                    // Often compare with what the medium holds (seeded with `seed` below).
                    let first = (want / 2).min(d.len());
                    let off = lba as usize * BS;
                    let medium = pattern(64 * BS, seed);
                    if off + first <= medium.len() {
                        d[..first].copy_from_slice(&medium[off..off + first]);
                    }
                }
                d
            } else if matches!(op, 0x35 | 0x91) {
                Vec::new()
            } else if matches!(op, 0x41 | 0x93) {
                if seed % 3 == 0 {
                    vec![0; BS]
                } else {
                    pattern(data_len.unwrap_or(BS), seed)
                }
            } else {
                let blocks = if op == 0x08 || op == 0x0A {
                    if blocks == 0 { 256 } else { blocks }
                } else {
                    blocks
                };
                pattern(data_len.unwrap_or(blocks as usize * BS), seed)
            };
            let mut segs = Vec::new();
            let mut rest = &data[..];
            for c in cuts {
                let c = c.min(rest.len());
                segs.push(rest[..c].to_vec());
                rest = &rest[c..];
            }
            segs.push(rest.to_vec());
            (cdb, segs)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    /// The runtime's path (asynchronous block I/O for READ, WRITE, SYNCHRONIZE CACHE, UNMAP...)
    /// and the synchronous `execute` decide alike: same answer, same data-in bytes, same handler
    /// calls in the same order, same medium afterwards.
    #[test]
    fn the_asynchronous_path_answers_as_the_synchronous_one(
        (cdb, segs) in prop_oneof![block_command(), (known_cdb(), data_out())],
        thin in any::<bool>(),
        wce in any::<bool>(),
    ) {
        let caps = if thin {
            HandlerCaps { unmap: true, unmap_granularity: 1, unmap_reads_zero: true }
        } else {
            HandlerCaps::default()
        };
        let (sync, async_) = (small_dev(caps, wce), small_dev(caps, wce));
        let size = 64 * BS;
        let medium = pattern(size, segs.concat().first().copied().unwrap_or(0));
        sync.h.fill(0, &medium);
        async_.h.fill(0, &medium);
        let mut buf = DataBuf::from_segments(segs.clone());
        let r_sync = sync.run_buf(&cdb, &mut buf);
        let (r_async, bytes) = submit_with(&async_.emu, &cdb, &segs);
        prop_assert_eq!(&r_async, &r_sync);
        prop_assert_eq!(bytes, buf.to_vec());
        prop_assert_eq!(async_.h.calls(), sync.h.calls());
        prop_assert_eq!(async_.h.bytes(0, size), sync.h.bytes(0, size));
    }
}
