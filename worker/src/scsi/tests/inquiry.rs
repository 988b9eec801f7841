//! INQUIRY: standard data and VPD pages, byte by byte.

use super::*;
use crate::scsi::naa_designator;

#[test]
fn standard_inquiry_data() {
    let d = Dev::new();
    let v = d.data_in(&inquiry(false, 0, 255), 255);
    assert_eq!(v.len(), 96);
    assert_eq!(v[0], 0x00, "qualifier 0, direct-access block device");
    assert_eq!(v[1], 0x00, "not removable");
    assert_eq!(v[2], 0x06, "SPC-4");
    assert_eq!(v[3], 0x12, "HISUP, response data format 2");
    assert_eq!(v[4] as usize, 96 - 5, "additional length");
    assert_eq!((v[5], v[6], v[7]), (0x08, 0, 0x02), "3PC, CMDQUE");
    assert_eq!(&v[8..16], b"LIO-ORG ");
    assert_eq!(&v[16..32], b"TCMU file       ");
    assert_eq!(&v[32..36], b"0.1 ");
    assert!(v[36..58].iter().all(|&b| b == 0));
    assert_eq!(&v[58..64], &[0x00, 0xA0, 0x04, 0x60, 0x04, 0xC0]);
    assert!(v[64..].iter().all(|&b| b == 0));
}

#[test]
fn product_comes_from_the_subtype_sanitised_and_cut() {
    let mut c = cfg(64);
    c.subtype = "a-very-long-subtype\u{7}name".into();
    let d = Dev::with(c, HandlerCaps::default(), |_| {});
    let v = d.data_in(&inquiry(false, 0, 36), 36);
    assert_eq!(&v[16..32], b"TCMU a-very-long");
    let mut c = cfg(64);
    c.subtype = "r\u{1}m".into();
    let d = Dev::with(c, HandlerCaps::default(), |_| {});
    let v = d.data_in(&inquiry(false, 0, 36), 36);
    assert_eq!(&v[16..32], b"TCMU r?m        ");
}

#[test]
fn allocation_length_truncates_and_read_len_reports_it() {
    let d = Dev::new();
    let full = d.data_in(&inquiry(false, 0, 96), 96);
    // Exactly the buffer: no read_len needed.
    let (r, v) = d.run_in(&inquiry(false, 0, 36), 36);
    assert_good(&r);
    assert_eq!(r.read_len, None);
    assert_eq!(v, full[..36]);
    // Buffer larger than the data: read_len says how much, and the rest is zeroed.
    let (r, v) = d.run_in(&inquiry(false, 0, 200), 200);
    assert_eq!(r.read_len, Some(96));
    assert_eq!(v[..96], full[..]);
    assert!(
        v[96..].iter().all(|&b| b == 0),
        "stale bytes left in the buffer"
    );
    // Allocation length smaller than the buffer.
    let (r, v) = d.run_in(&inquiry(false, 0, 5), 64);
    assert_eq!(r.read_len, Some(5));
    assert_eq!(v[..5], full[..5]);
    // Zero allocation length: nothing.
    let (r, _) = d.run_in(&inquiry(false, 0, 0), 64);
    assert_good(&r);
    assert_eq!(r.read_len, Some(0));
    // Buffer smaller than the allocation length: what fits.
    let (r, v) = d.run_in(&inquiry(false, 0, 96), 10);
    assert_good(&r);
    assert_eq!(r.read_len, Some(10));
    assert_eq!(v, full[..10]);
}

#[test]
fn inquiry_field_checks() {
    let d = Dev::new();
    // CMDDT (obsolete) set.
    assert_bad_cdb_field(&d.run_in(&[0x12, 0x02, 0, 0, 36, 0], 36).0, 1, 1);
    // Reserved bits of byte 1.
    assert_bad_cdb_field(&d.run_in(&[0x12, 0x08, 0, 0, 36, 0], 36).0, 1, 7);
    // EVPD=0 with a page code.
    assert_bad_cdb_field(&d.run_in(&inquiry(false, 0x80, 36), 36).0, 2, 7);
    // Unknown VPD page.
    for page in [0x01u8, 0x87, 0x89, 0xB3, 0xFF] {
        assert_bad_cdb_field(&d.run_in(&inquiry(true, page, 255), 255).0, 2, 7);
    }
}

#[test]
fn vpd_supported_pages() {
    let d = Dev::new();
    let v = d.data_in(&inquiry(true, 0x00, 255), 255);
    assert_eq!(
        v,
        vec![0, 0x00, 0, 7, 0x00, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2]
    );
    // Every listed page answers.
    for &p in &v[4..] {
        assert_good(&d.run_in(&inquiry(true, p, 255), 255).0);
    }
}

#[test]
fn vpd_unit_serial() {
    let d = Dev::new();
    let v = d.data_in(&inquiry(true, 0x80, 255), 255);
    let serial = b"6c1f1a0e-9f3b-4c5d-8e7f-0123456789ab";
    assert_eq!(&v[..4], &[0, 0x80, 0, serial.len() as u8]);
    assert_eq!(&v[4..], serial);
    // Truncated.
    let (r, v) = d.run_in(&inquiry(true, 0x80, 6), 6);
    assert_good(&r);
    assert_eq!(&v, &[0, 0x80, 0, serial.len() as u8, b'6', b'c']);
}

#[test]
fn vpd_device_identification() {
    let d = Dev::new();
    let v = d.data_in(&inquiry(true, 0x83, 512), 512);
    let serial = b"6c1f1a0e-9f3b-4c5d-8e7f-0123456789ab";
    let page_len = 4 + 16 + 4 + 8 + serial.len();
    assert_eq!(&v[..4], &[0, 0x83, 0, page_len as u8]);
    assert_eq!(v.len(), 4 + page_len);
    // NAA designator: binary, LU association, type 3, length 16.
    assert_eq!(&v[4..8], &[0x01, 0x03, 0x00, 0x10]);
    // NAA 6, company ID 00-14-05, then the serial's first 25 hex digits.
    assert_eq!(
        &v[8..24],
        &[
            0x60, 0x01, 0x40, 0x56, 0xc1, 0xf1, 0xa0, 0xe9, 0xf3, 0xb4, 0xc5, 0xd8, 0xe7, 0xf0,
            0x12, 0x34
        ]
    );
    // T10 vendor ID designator: ASCII, LU, type 1, "LIO-ORG " + serial.
    assert_eq!(&v[24..28], &[0x02, 0x01, 0x00, (8 + serial.len()) as u8]);
    assert_eq!(&v[28..36], b"LIO-ORG ");
    assert_eq!(&v[36..], serial);
}

#[test]
fn naa_is_a_stable_function_of_the_serial() {
    // LIO-compatible digit packing.
    assert_eq!(
        naa_designator(b"0123456789abcdef0123456789abcdef"),
        [
            0x60, 0x01, 0x40, 0x50, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x12, 0x34,
            0x56, 0x78
        ]
    );
    // Same serial, same designator, across emulators.
    let naa = |serial: &str| {
        let mut c = cfg(64);
        c.unit_serial = serial.into();
        let d = Dev::with(c, HandlerCaps::default(), |_| {});
        d.data_in(&inquiry(true, 0x83, 255), 255)[8..24].to_vec()
    };
    assert_eq!(naa("disk1"), naa("disk1"));
    assert_eq!(naa("disk1"), naa_designator(b"disk1").to_vec());
    // Short serials are hashed: serials with the same hex digits still differ.
    assert_ne!(naa("disk1"), naa("dsk1"));
    assert_ne!(naa("a"), naa("b"));
    for s in ["disk1", "x", "", "serial-with-few-hex"] {
        let n = naa_designator(s.as_bytes());
        assert_eq!(n[0] >> 4, 6, "NAA 6 for {s:?}");
        assert_eq!(&n[..3], &[0x60, 0x01, 0x40]);
        assert_eq!(n[3] >> 4, 0x5);
    }
    // Pinned (computed independently: FNV-1a 128 of "disk1", top 100 bits): the designator
    // of a device must never change between builds.
    assert_eq!(
        naa_designator(b"disk1"),
        [
            0x60, 0x01, 0x40, 0x51, 0x3f, 0x1e, 0xc6, 0x16, 0x38, 0x3d, 0x94, 0xf7, 0x08, 0x13,
            0xd4, 0x24
        ]
    );
}

#[test]
fn empty_serial_falls_back_to_the_device_name() {
    let mut c = cfg(64);
    c.unit_serial = String::new();
    c.name = "vol7".into();
    let d = Dev::with(c, HandlerCaps::default(), |_| {});
    let v = d.data_in(&inquiry(true, 0x80, 255), 255);
    assert_eq!(&v[4..], b"vol7");
    let v = d.data_in(&inquiry(true, 0x83, 255), 255);
    assert_eq!(v[8..24], naa_designator(b"vol7"));
}

#[test]
fn vpd_block_limits_without_unmap() {
    let d = Dev::new();
    let v = d.data_in(&inquiry(true, 0xB0, 255), 255);
    assert_eq!(v.len(), 64);
    assert_eq!(&v[..4], &[0, 0xB0, 0, 0x3C]);
    assert_eq!(v[4], 0x01, "WSNZ");
    assert_eq!(
        v[5], 128,
        "max compare and write length: bounded by max transfer"
    );
    assert_eq!(
        u16::from_be_bytes([v[6], v[7]]),
        8,
        "optimal granularity: 4 KiB"
    );
    assert_eq!(
        u32::from_be_bytes(v[8..12].try_into().unwrap()),
        128,
        "max transfer"
    );
    assert_eq!(
        u32::from_be_bytes(v[12..16].try_into().unwrap()),
        128,
        "optimal transfer"
    );
    assert!(v[16..36].iter().all(|&b| b == 0), "no unmap limits");
    assert_eq!(
        u64::from_be_bytes(v[36..44].try_into().unwrap()),
        (256 << 20) / 512,
        "max write same length"
    );
    assert!(v[44..].iter().all(|&b| b == 0));
}

#[test]
fn vpd_block_limits_with_unmap() {
    let d = Dev::thin();
    let v = d.data_in(&inquiry(true, 0xB0, 255), 255);
    assert_eq!(
        u32::from_be_bytes(v[20..24].try_into().unwrap()),
        1 << 20,
        "max unmap LBA count: at most 2^20 blocks"
    );
    assert_eq!(u32::from_be_bytes(v[24..28].try_into().unwrap()), 256);
    assert_eq!(u32::from_be_bytes(v[28..32].try_into().unwrap()), 8);
    assert_eq!(u32::from_be_bytes(v[32..36].try_into().unwrap()), 0);
}

#[test]
fn vpd_block_limits_follow_block_size_and_max_sectors() {
    let mut c = cfg(64);
    c.block_size = 4096;
    c.dev_size = 64 * 4096;
    c.max_sectors = 0;
    let d = Dev::with(c, HandlerCaps::default(), |_| {});
    let v = d.data_in(&inquiry(true, 0xB0, 255), 255);
    assert_eq!(v[5], 255);
    assert_eq!(u16::from_be_bytes([v[6], v[7]]), 1);
    assert_eq!(
        u32::from_be_bytes(v[8..12].try_into().unwrap()),
        0,
        "no limit"
    );
    let mut c = cfg(64);
    c.block_size = 65536;
    c.dev_size = 64 * 65536;
    c.max_sectors = 8;
    let d = Dev::with(c, HandlerCaps::default(), |_| {});
    let v = d.data_in(&inquiry(true, 0xB0, 255), 255);
    assert_eq!(v[5], 8, "compare and write bounded by max transfer");
}

#[test]
fn vpd_block_device_characteristics() {
    let d = Dev::new();
    let v = d.data_in(&inquiry(true, 0xB1, 255), 255);
    assert_eq!(v.len(), 64);
    assert_eq!(&v[..6], &[0, 0xB1, 0, 0x3C, 0x00, 0x01]);
    assert!(v[6..].iter().all(|&b| b == 0));
}

#[test]
fn vpd_logical_block_provisioning() {
    let d = Dev::new();
    assert_eq!(
        d.data_in(&inquiry(true, 0xB2, 255), 255),
        vec![0, 0xB2, 0, 4, 0, 0, 0, 0]
    );
    let d = Dev::thin();
    assert_eq!(
        d.data_in(&inquiry(true, 0xB2, 255), 255),
        vec![0, 0xB2, 0, 4, 0, 0xE4, 0x02, 0]
    );
    let d = Dev::thin_unzeroed();
    assert_eq!(
        d.data_in(&inquiry(true, 0xB2, 255), 255),
        vec![0, 0xB2, 0, 4, 0, 0xE0, 0x02, 0]
    );
}

#[test]
fn vpd_extended_inquiry_data() {
    let d = Dev::new();
    let v = d.data_in(&inquiry(true, 0x86, 255), 255);
    assert_eq!(v.len(), 64);
    assert_eq!(&v[..4], &[0, 0x86, 0, 0x3C]);
    assert_eq!(v[4], 0, "no protection information");
    assert_eq!(v[5], 0x01, "SIMPSUP only: commands run concurrently");
    assert_eq!(v[6], 0, "no volatile cache while WCE=0");
    assert!(v[7..].iter().all(|&b| b == 0));
    d.emu.set_write_cache(true);
    let v = d.data_in(&inquiry(true, 0x86, 255), 255);
    assert_eq!(v[6], 0x01, "V_SUP with WCE=1");
}
