//! EXTENDED COPY (LID1), RECEIVE COPY RESULTS, and the registry that lets a copy reach the other
//! devices of the process.

use super::*;
use crate::scsi::CopyRegistry;

/// A device in an `Arc`, as the runtime holds them, with its handler.
struct Lu {
    emu: Arc<Emulator>,
    h: Arc<MemHandler>,
}

fn lu(serial: &str, blocks: u64) -> Lu {
    let mut c = cfg(blocks);
    c.unit_serial = serial.into();
    c.name = format!("dev-{serial}");
    let h = Arc::new(MemHandler::new(c.dev_size as usize, HandlerCaps::default()));
    Lu {
        emu: Arc::new(Emulator::new(&c, h.clone())),
        h,
    }
}

impl Lu {
    fn run_out(&self, cdb: &[u8], data: &[u8]) -> CommandResult {
        let mut d = DataBuf::from_segments(vec![data.to_vec()]);
        self.emu.execute(&mut Command {
            cdb,
            data: &mut d,
            bidi_in: None,
        })
    }

    fn run_in(&self, cdb: &[u8], len: usize) -> (CommandResult, Vec<u8>) {
        let mut d = DataBuf::from_segments(vec![vec![0xAA; len]]);
        let r = self.emu.execute(&mut Command {
            cdb,
            data: &mut d,
            bidi_in: None,
        });
        let mut v = d.to_vec();
        if let Some(n) = r.read_len {
            v.truncate(n as usize);
        }
        (r, v)
    }
}

fn xcopy_cdb(param_len: u32) -> Vec<u8> {
    let mut c = vec![0x83, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c.extend_from_slice(&param_len.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

/// An E4h CSCD descriptor naming the device with designator `naa`, block length `bs`.
fn cscd(naa: [u8; 16], bs: u32) -> Vec<u8> {
    let mut d = vec![0xE4, 0x00, 0, 0, 0x01, 0x03, 0x00, 16];
    d.extend_from_slice(&naa);
    d.extend_from_slice(&[0; 4]);
    d.push(0);
    d.extend_from_slice(&bs.to_be_bytes()[1..]);
    assert_eq!(d.len(), 32);
    d
}

/// A block-to-block segment descriptor.
fn seg(src: u16, dst: u16, blocks: u16, src_lba: u64, dst_lba: u64) -> Vec<u8> {
    let mut d = vec![0x02, 0x00, 0x00, 0x18];
    d.extend_from_slice(&src.to_be_bytes());
    d.extend_from_slice(&dst.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(&blocks.to_be_bytes());
    d.extend_from_slice(&src_lba.to_be_bytes());
    d.extend_from_slice(&dst_lba.to_be_bytes());
    assert_eq!(d.len(), 28);
    d
}

/// A parameter list: header (list id, LIST ID USAGE), descriptors, segments.
fn plist(list_id: u8, usage: u8, cscds: &[Vec<u8>], segs: &[Vec<u8>]) -> Vec<u8> {
    let c: Vec<u8> = cscds.concat();
    let s: Vec<u8> = segs.concat();
    let mut p = vec![list_id, usage << 3];
    p.extend_from_slice(&(c.len() as u16).to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(&(s.len() as u32).to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(&c);
    p.extend_from_slice(&s);
    p
}

fn xcopy(l: &Lu, p: &[u8]) -> CommandResult {
    l.run_out(&xcopy_cdb(p.len() as u32), p)
}

fn rcr(sa: u8, list_id: u8, alloc: u32) -> Vec<u8> {
    let mut c = vec![0x84, sa, list_id, 0, 0, 0, 0, 0, 0, 0];
    c.extend_from_slice(&alloc.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

#[test]
fn the_designator_is_the_one_inquiry_reports() {
    let a = lu("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", 64);
    let (r, page) = a.run_in(&inquiry(true, 0x83, 255), 255);
    assert_good(&r);
    assert_eq!(&page[4..8], &[0x01, 0x03, 0x00, 16]);
    assert_eq!(page[8..24], a.emu.designator());
}

#[test]
fn copy_within_one_device() {
    let a = lu("serial-a", 2048);
    let data = pattern(64 * BS, 9);
    a.h.fill(0, &data);
    let naa = a.emu.designator();
    let p = plist(1, 2, &[cscd(naa, BS as u32)], &[seg(0, 0, 64, 0, 1000)]);
    assert_good(&xcopy(&a, &p));
    assert_eq!(a.h.bytes(1000 * BS, 64 * BS), data);
    assert_eq!(a.h.bytes(0, 64 * BS), data, "the source changed");
    // WCE=0: every copy write is durable.
    assert!(a.h.write_durability().iter().all(|durable| *durable));
}

#[test]
fn overlapping_copy_within_one_device_behaves_like_memmove() {
    // Larger than one chunk (1 MiB = 2048 blocks), overlapping in both directions.
    let a = lu("serial-a", 8192);
    let naa = a.emu.designator();
    let data = pattern(3000 * BS, 5);
    a.h.fill(100 * BS, &data);
    let p = plist(0, 3, &[cscd(naa, BS as u32)], &[seg(0, 0, 3000, 100, 600)]);
    assert_good(&xcopy(&a, &p));
    assert_eq!(a.h.bytes(600 * BS, 3000 * BS), data, "forward overlap");
    let p = plist(0, 3, &[cscd(naa, BS as u32)], &[seg(0, 0, 3000, 600, 50)]);
    assert_good(&xcopy(&a, &p));
    assert_eq!(a.h.bytes(50 * BS, 3000 * BS), data, "backward overlap");
}

#[test]
fn copy_between_devices_of_one_registry() {
    let a = lu("serial-a", 2048);
    let b = lu("serial-b", 1024);
    let data = pattern(16 * BS, 7);
    a.h.fill(32 * BS, &data);
    let p = plist(
        1,
        2,
        &[
            cscd(a.emu.designator(), BS as u32),
            cscd(b.emu.designator(), BS as u32),
        ],
        &[seg(0, 1, 16, 32, 1000)],
    );
    // Not registered: the other device is out of reach, nothing is written.
    assert_sense(&xcopy(&a, &p), key::COPY_ABORTED, 0x0D, 0x02);
    assert!(b.h.write_calls().is_empty());

    let reg = CopyRegistry::new();
    reg.register(&a.emu);
    reg.register(&b.emu);
    assert_eq!(reg.len(), 2);
    assert_good(&xcopy(&a, &p));
    assert_eq!(b.h.bytes(1000 * BS, 16 * BS), data);
    // The copy may also be sent to the destination, and go the other way.
    let back = plist(
        2,
        2,
        &[
            cscd(b.emu.designator(), BS as u32),
            cscd(a.emu.designator(), BS as u32),
        ],
        &[seg(0, 1, 16, 1000, 500)],
    );
    assert_good(&xcopy(&b, &back));
    assert_eq!(a.h.bytes(500 * BS, 16 * BS), data);
    // Beyond the end of the smaller device.
    let p = plist(
        3,
        2,
        &[
            cscd(a.emu.designator(), BS as u32),
            cscd(b.emu.designator(), BS as u32),
        ],
        &[seg(0, 1, 16, 0, 1020)],
    );
    assert_sense(&xcopy(&a, &p), key::COPY_ABORTED, 0x0D, 0x02);

    // A device that stops serving leaves the registry by itself.
    let b_naa = b.emu.designator();
    drop(b);
    assert_eq!(reg.len(), 1);
    assert!(reg.find(&b_naa).is_none());
    assert!(reg.find(&a.emu.designator()).is_some());
}

#[test]
fn refused_devices_are_not_copy_targets() {
    let mut c = cfg(64);
    c.unit_serial = "refused".into();
    let refused = Arc::new(Emulator::refused(&c, "outside allow_paths"));
    let reg = CopyRegistry::new();
    reg.register(&refused);
    assert!(reg.is_empty());
    assert!(reg.find(&refused.designator()).is_none());
}

#[test]
fn parameter_list_checks() {
    let a = lu("serial-a", 2048);
    let naa = a.emu.designator();
    let good = plist(1, 2, &[cscd(naa, BS as u32)], &[seg(0, 0, 8, 0, 100)]);
    // A zero PARAMETER LIST LENGTH copies nothing.
    assert_good(&a.run_out(&xcopy_cdb(0), &[]));
    // Truncated header, truncated descriptors.
    let len_err = |r: &CommandResult| assert_sense(r, key::ILLEGAL_REQUEST, 0x1A, 0x00);
    len_err(&a.run_out(&xcopy_cdb(15), &good[..15]));
    len_err(&a.run_out(&xcopy_cdb(47), &good[..47]));
    len_err(&a.run_out(&xcopy_cdb(good.len() as u32 - 1), &good[..good.len() - 1]));
    // Descriptor lists longer than MAXIMUM DESCRIPTOR LIST LENGTH (1024).
    let many: Vec<Vec<u8>> = (0..40).map(|_| seg(0, 0, 1, 0, 1)).collect();
    len_err(&xcopy(&a, &plist(1, 2, &[cscd(naa, BS as u32)], &many)));
    // Too many CSCD descriptors (8) and segment descriptors (32).
    let cs: Vec<Vec<u8>> = (0..9).map(|_| cscd(naa, BS as u32)).collect();
    assert_sense(
        &xcopy(&a, &plist(1, 2, &cs, &[seg(0, 0, 1, 0, 1)])),
        key::ILLEGAL_REQUEST,
        0x26,
        0x06,
    );
    let ss: Vec<Vec<u8>> = (0..33).map(|_| seg(0, 0, 1, 0, 1)).collect();
    assert_sense(
        &xcopy(&a, &plist(1, 2, &[cscd(naa, BS as u32)], &ss)),
        key::ILLEGAL_REQUEST,
        0x26,
        0x08,
    );
    // Unsupported descriptor types point at the descriptor.
    let mut fc = cscd(naa, BS as u32);
    fc[0] = 0xE0;
    let r = xcopy(&a, &plist(1, 2, &[fc], &[seg(0, 0, 1, 0, 1)]));
    let s = assert_sense(&r, key::ILLEGAL_REQUEST, 0x26, 0x07);
    assert_eq!(&s.to_bytes()[15..18], &[0x80 | 0x08 | 7, 0, 16]);
    let mut stream = seg(0, 0, 1, 0, 1);
    stream[0] = 0x03;
    let r = xcopy(&a, &plist(1, 2, &[cscd(naa, BS as u32)], &[stream]));
    let s = assert_sense(&r, key::ILLEGAL_REQUEST, 0x26, 0x09);
    assert_eq!(&s.to_bytes()[15..18], &[0x80 | 0x08 | 7, 0, 48]);
    // A segment descriptor with the wrong DESCRIPTOR LENGTH.
    let mut bad = seg(0, 0, 1, 0, 1);
    bad[3] = 0x14;
    assert_bad_param_field(
        &xcopy(&a, &plist(1, 2, &[cscd(naa, BS as u32)], &[bad])),
        50,
        7,
    );
    // LIST ID USAGE 01b is reserved; inline data is not used by block copies.
    assert_bad_param_field(&xcopy(&a, &plist(1, 1, &[cscd(naa, BS as u32)], &[])), 1, 4);
    let mut inline = good.clone();
    inline[15] = 4;
    inline.extend_from_slice(&[0; 4]);
    assert_bad_param_field(&xcopy(&a, &inline), 12, 7);
    // Reserved CDB bytes.
    let mut c = xcopy_cdb(good.len() as u32);
    c[2] = 1;
    assert_bad_cdb_field(&a.run_out(&c, &good), 2, 7);
    // None of this wrote anything.
    assert!(a.h.write_calls().is_empty());
    // The LU ID TYPE (obsolete since SPC-4) is ignored.
    let mut lu_id = cscd(naa, BS as u32);
    lu_id[1] = 0x80;
    assert_good(&xcopy(&a, &plist(1, 2, &[lu_id], &[seg(0, 0, 8, 0, 100)])));
}

#[test]
fn segment_errors_abort_the_copy() {
    let a = lu("serial-a", 2048);
    let naa = a.emu.designator();
    let one = |s: Vec<u8>| plist(1, 2, &[cscd(naa, BS as u32)], &[s]);
    // A CSCD index the list does not have.
    assert_sense(
        &xcopy(&a, &one(seg(0, 1, 8, 0, 100))),
        key::COPY_ABORTED,
        0x08,
        0x04,
    );
    // Beyond the end of the device.
    assert_sense(
        &xcopy(&a, &one(seg(0, 0, 8, 0, 2047))),
        key::COPY_ABORTED,
        0x0D,
        0x02,
    );
    assert_sense(
        &xcopy(&a, &one(seg(0, 0, 8, u64::MAX, 0))),
        key::COPY_ABORTED,
        0x0D,
        0x02,
    );
    // A designator nobody has.
    let other = plist(1, 2, &[cscd([0x60; 16], BS as u32)], &[seg(0, 0, 8, 0, 1)]);
    assert_sense(&xcopy(&a, &other), key::COPY_ABORTED, 0x0D, 0x02);
    // Wrong block length, wrong device type.
    let wrong_bs = plist(1, 2, &[cscd(naa, 4096)], &[seg(0, 0, 8, 0, 1)]);
    assert_sense(&xcopy(&a, &wrong_bs), key::COPY_ABORTED, 0x0D, 0x03);
    let mut tape = cscd(naa, BS as u32);
    tape[1] = 0x01;
    assert_sense(
        &xcopy(&a, &plist(1, 2, &[tape], &[seg(0, 0, 8, 0, 1)])),
        key::COPY_ABORTED,
        0x0D,
        0x03,
    );
    assert!(a.h.write_calls().is_empty());
    // A read error during the copy: COPY ABORTED with the read error's ASC.
    *a.h.fail_read.lock().unwrap() = Some(io::Error::from_raw_os_error(libc::EIO));
    assert_sense(
        &xcopy(&a, &one(seg(0, 0, 8, 0, 100))),
        key::COPY_ABORTED,
        0x11,
        0x00,
    );
}

#[test]
fn copy_status_is_held_for_list_id_usage_hold() {
    let a = lu("serial-a", 2048);
    let naa = a.emu.designator();
    let bad_field_2 = |r: &CommandResult| assert_bad_cdb_field(r, 2, 7);
    // Nothing held yet.
    bad_field_2(&a.run_in(&rcr(0, 5, 64), 64).0);
    // LIST ID USAGE 00b: held.
    let p = plist(
        5,
        0,
        &[cscd(naa, BS as u32)],
        &[seg(0, 0, 8, 0, 100), seg(0, 0, 4, 8, 200)],
    );
    assert_good(&xcopy(&a, &p));
    let (r, v) = a.run_in(&rcr(0, 5, 64), 64);
    assert_good(&r);
    let bytes = (12 * BS) as u32;
    assert_eq!(v[..4], 8u32.to_be_bytes());
    assert_eq!(v[4], 0x01, "completed without errors, HDD clear");
    assert_eq!(v[5..7], 2u16.to_be_bytes(), "segments processed");
    assert_eq!(v[7], 0, "transfer count in bytes");
    assert_eq!(v[8..12], bytes.to_be_bytes());
    // Another list id is still unknown; allocation length truncates.
    bad_field_2(&a.run_in(&rcr(0, 6, 64), 64).0);
    let (r, v) = a.run_in(&rcr(0, 5, 5), 64);
    assert_good(&r);
    assert_eq!(v.len(), 5);
    // Reusing the list id for a copy that fails discards what was held.
    let p = plist(5, 0, &[cscd(naa, BS as u32)], &[seg(0, 1, 8, 0, 100)]);
    assert_sense(&xcopy(&a, &p), key::COPY_ABORTED, 0x08, 0x04);
    bad_field_2(&a.run_in(&rcr(0, 5, 64), 64).0);
    // LIST ID USAGE 10b and 11b: nothing held.
    for usage in [2, 3] {
        let p = plist(7, usage, &[cscd(naa, BS as u32)], &[seg(0, 0, 8, 0, 100)]);
        assert_good(&xcopy(&a, &p));
        bad_field_2(&a.run_in(&rcr(0, 7, 64), 64).0);
    }
}

#[test]
fn held_copy_status_is_bounded() {
    let a = lu("serial-a", 2048);
    let naa = a.emu.designator();
    for id in 0..20u8 {
        let p = plist(id, 0, &[cscd(naa, BS as u32)], &[seg(0, 0, 1, 0, 100)]);
        assert_good(&xcopy(&a, &p));
    }
    // The 16 most recent are held, the oldest are gone.
    for id in 0..4u8 {
        assert_bad_cdb_field(&a.run_in(&rcr(0, id, 64), 64).0, 2, 7);
    }
    for id in 4..20u8 {
        assert_good(&a.run_in(&rcr(0, id, 64), 64).0);
    }
}

#[test]
fn operating_parameters_report_the_limits() {
    let a = lu("serial-a", 2048);
    let (r, v) = a.run_in(&rcr(3, 0, 1024), 1024);
    assert_good(&r);
    assert_eq!(v.len(), 46);
    assert_eq!(v[..4], 42u32.to_be_bytes());
    assert_eq!(v[4] & 1, 1, "SNLID");
    assert_eq!(v[8..10], 8u16.to_be_bytes(), "CSCD descriptors");
    assert_eq!(v[10..12], 32u16.to_be_bytes(), "segment descriptors");
    assert_eq!(v[12..16], 1024u32.to_be_bytes(), "descriptor list length");
    assert_eq!(v[16..20], (256u32 << 20).to_be_bytes(), "segment length");
    assert_eq!(v[20..24], [0; 4], "no inline data");
    assert_eq!(v[37], 9, "granularity: 512-byte blocks");
    assert_eq!(v[43..46], [2, 0x02, 0xE4], "implemented descriptor types");
    // The list identifier is reserved for this service action; other service actions
    // (RECEIVE DATA, FAILED SEGMENT DETAILS) are not implemented.
    assert_bad_cdb_field(&a.run_in(&rcr(3, 1, 1024), 1024).0, 2, 7);
    assert_bad_cdb_field(&a.run_in(&rcr(1, 0, 1024), 1024).0, 1, 4);
    assert_bad_cdb_field(&a.run_in(&rcr(4, 0, 1024), 1024).0, 1, 4);
}

#[test]
fn standard_inquiry_announces_third_party_copy() {
    let a = lu("serial-a", 64);
    let (r, v) = a.run_in(&inquiry(false, 0, 96), 96);
    assert_good(&r);
    assert_eq!(v[5] & 0x08, 0x08, "3PC");
}
