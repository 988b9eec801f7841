//! MODE SENSE / MODE SELECT.

use super::*;

fn sense6(dbd: bool, pc: u8, page: u8, sub: u8, alloc: u8) -> Vec<u8> {
    vec![
        0x1A,
        if dbd { 0x08 } else { 0 },
        (pc << 6) | page,
        sub,
        alloc,
        0,
    ]
}

fn sense10(llbaa: bool, dbd: bool, pc: u8, page: u8, alloc: u16) -> Vec<u8> {
    let a = alloc.to_be_bytes();
    let b1 = if llbaa { 0x10 } else { 0 } | if dbd { 0x08 } else { 0 };
    vec![0x5A, b1, (pc << 6) | page, 0, 0, 0, 0, a[0], a[1], 0]
}

const CACHING_OFF: [u8; 20] = [
    0x08, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];
const CONTROL: [u8; 12] = [0x0A, 0x0A, 0x02, 0x10, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0];
const ERROR_RECOVERY: [u8; 12] = [0x01, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const INFO_EXCEPTIONS: [u8; 12] = [0x1C, 0x0A, 0x08, 0, 0, 0, 0, 0, 0, 0, 0, 0];

fn caching(wce: bool) -> Vec<u8> {
    let mut p = CACHING_OFF.to_vec();
    p[2] = if wce { 0x04 } else { 0 };
    p
}

#[test]
fn mode_sense_6_caching_page_with_block_descriptor() {
    let d = Dev::new();
    let v = d.data_in(&sense6(false, 0, 0x08, 0, 255), 255);
    assert_eq!(v.len(), 4 + 8 + 20);
    assert_eq!(&v[..4], &[(v.len() - 1) as u8, 0, 0x10, 8]);
    assert_eq!(
        &v[4..12],
        &[0, 0, 0x08, 0x00, 0, 0, 0x02, 0x00],
        "2048 blocks of 512"
    );
    assert_eq!(&v[12..], &caching(false)[..]);
}

#[test]
fn wce_follows_configuration_and_set_write_cache() {
    let d = Dev::new();
    let wce = |d: &Dev| d.data_in(&sense6(true, 0, 0x08, 0, 255), 255)[4 + 2];
    assert_eq!(wce(&d), 0);
    d.emu.set_write_cache(true);
    assert_eq!(wce(&d), 0x04);
    d.emu.set_write_cache(false);
    assert_eq!(wce(&d), 0);
    let mut c = cfg(64);
    c.write_cache = true;
    let d = Dev::with(c, HandlerCaps::default(), |_| {});
    assert_eq!(wce(&d), 0x04);
}

#[test]
fn page_controls() {
    let d = Dev::new();
    d.emu.set_write_cache(true);
    let current = d.data_in(&sense6(true, 0, 0x08, 0, 255), 255);
    assert_eq!(&current[4..], &caching(true)[..]);
    let changeable = d.data_in(&sense6(true, 1, 0x08, 0, 255), 255);
    let mut none = [0u8; 20];
    none[..2].copy_from_slice(&[0x08, 0x12]);
    assert_eq!(&changeable[4..], &none[..], "nothing is changeable");
    assert_eq!(
        d.data_in(&sense6(true, 2, 0x08, 0, 255), 255),
        current,
        "default"
    );
    assert_eq!(
        d.data_in(&sense6(true, 3, 0x08, 0, 255), 255),
        current,
        "saved"
    );
    // The changeable block descriptor is all zeros.
    let v = d.data_in(&sense6(false, 1, 0x08, 0, 255), 255);
    assert_eq!(&v[4..12], &[0; 8]);
}

#[test]
fn all_pages_and_control_page() {
    let d = Dev::new();
    let v = d.data_in(&sense6(true, 0, 0x3F, 0, 255), 255);
    assert_eq!(v[0] as usize, v.len() - 1);
    assert_eq!(v[3], 0, "no block descriptor with DBD");
    let all = [
        &ERROR_RECOVERY[..],
        &caching(false)[..],
        &CONTROL[..],
        &INFO_EXCEPTIONS[..],
    ]
    .concat();
    assert_eq!(&v[4..], &all[..], "01h, 08h, 0Ah, 1Ch in ascending order");
    assert_eq!(d.data_in(&sense6(true, 0, 0x3F, 0xFF, 255), 255), v);
    let c = d.data_in(&sense6(true, 0, 0x0A, 0, 255), 255);
    assert_eq!(&c[4..], &CONTROL[..]);
    let e = d.data_in(&sense6(true, 0, 0x01, 0, 255), 255);
    assert_eq!(&e[4..], &ERROR_RECOVERY[..]);
    let i = d.data_in(&sense6(true, 0, 0x1C, 0, 255), 255);
    assert_eq!(&i[4..], &INFO_EXCEPTIONS[..]);
    // Nothing in them is changeable; the default and saved values are the current ones.
    for page in [0x01, 0x1C] {
        let ch = d.data_in(&sense6(true, 1, page, 0, 255), 255);
        assert!(ch[6..].iter().all(|&b| b == 0), "page {page:#x}: {ch:02x?}");
        for pc in [2, 3] {
            assert_eq!(
                d.data_in(&sense6(true, pc, page, 0, 255), 255),
                d.data_in(&sense6(true, 0, page, 0, 255), 255)
            );
        }
    }
    // Pages we do not have.
    assert_bad_cdb_field(&d.run(&sense6(true, 0, 0x02, 0, 255)), 2, 5);
}

#[test]
fn mode_sense_10_short_and_long_descriptors() {
    let d = Dev::new();
    let v = d.data_in(&sense10(false, false, 0, 0x08, 512), 512);
    assert_eq!(v.len(), 8 + 8 + 20);
    assert_eq!(u16::from_be_bytes([v[0], v[1]]) as usize, v.len() - 2);
    assert_eq!(&v[2..8], &[0, 0x10, 0, 0, 0, 8]);
    assert_eq!(&v[8..16], &[0, 0, 0x08, 0x00, 0, 0, 0x02, 0x00]);
    let v = d.data_in(&sense10(true, false, 0, 0x08, 512), 512);
    assert_eq!(v.len(), 8 + 16 + 20);
    assert_eq!(
        &v[2..8],
        &[0, 0x10, 0x01, 0, 0, 16],
        "LONGLBA, 16-byte descriptor"
    );
    assert_eq!(&v[8..16], &2048u64.to_be_bytes());
    assert_eq!(&v[16..24], &[0, 0, 0, 0, 0, 0, 0x02, 0x00]);
    assert_eq!(&v[24..], &caching(false)[..]);
    let v = d.data_in(&sense10(true, true, 0, 0x08, 512), 512);
    assert_eq!(&v[2..8], &[0, 0x10, 0, 0, 0, 0], "DBD wins over LLBAA");
}

#[test]
fn short_block_descriptor_saturates_block_count() {
    let c = DeviceConfig {
        dev_size: (1u64 << 33) * BS as u64,
        ..cfg(1)
    };
    // The handler's store stays small; MODE SENSE never touches it.
    let emu = Emulator::new(&c, Arc::new(MemHandler::new(BS, HandlerCaps::default())));
    let mut buf = DataBuf::zeroed(&[64]);
    let r = emu.execute(&mut Command {
        cdb: &sense6(false, 0, 0x08, 0, 64),
        data: &mut buf,
        bidi_in: None,
    });
    assert_good(&r);
    assert_eq!(&buf.to_vec()[4..8], &[0xFF; 4]);
}

#[test]
fn mode_sense_allocation_length_truncates() {
    let d = Dev::new();
    let full = d.data_in(&sense6(false, 0, 0x3F, 0, 255), 255);
    let (r, v) = d.run_in(&sense6(false, 0, 0x3F, 0, 10), 255);
    assert_eq!(r.read_len, Some(10));
    assert_eq!(v[..10], full[..10]);
    assert!(v[10..].iter().all(|&b| b == 0));
}

#[test]
fn mode_sense_field_checks() {
    let d = Dev::new();
    assert_bad_cdb_field(&d.run_in(&sense6(false, 0, 0x19, 0, 255), 255).0, 2, 5);
    assert_bad_cdb_field(&d.run_in(&sense6(false, 0, 0x02, 0, 255), 255).0, 2, 5);
    assert_bad_cdb_field(&d.run_in(&sense6(false, 0, 0x08, 0x01, 255), 255).0, 3, 7);
    // Reserved bits: MODE SENSE (6) has no LLBAA.
    assert_bad_cdb_field(&d.run_in(&[0x1A, 0x10, 0x08, 0, 255, 0], 255).0, 1, 7);
    assert_bad_cdb_field(
        &d.run_in(&[0x5A, 0, 0x08, 0, 1, 0, 0, 0, 255, 0], 255).0,
        4,
        7,
    );
}

fn select6(pf: bool, sp: bool, len: u8) -> Vec<u8> {
    vec![0x15, u8::from(pf) << 4 | u8::from(sp), 0, 0, len, 0]
}

fn select10(pf: bool, len: u16) -> Vec<u8> {
    let l = len.to_be_bytes();
    vec![0x55, u8::from(pf) << 4, 0, 0, 0, 0, 0, l[0], l[1], 0]
}

/// A MODE SELECT (6) parameter list: header, optional short block descriptor, pages.
fn list6(block_desc: Option<[u8; 8]>, pages: &[&[u8]]) -> Vec<u8> {
    let mut v = vec![0, 0, 0, if block_desc.is_some() { 8 } else { 0 }];
    if let Some(bd) = block_desc {
        v.extend_from_slice(&bd);
    }
    for p in pages {
        v.extend_from_slice(p);
    }
    v
}

#[test]
fn mode_select_accepts_unchanged_pages() {
    let d = Dev::new();
    let l = list6(None, &[&caching(false), &CONTROL]);
    assert_good(&d.run_out(&select6(true, false, l.len() as u8), &l));
    // With a block descriptor restating the geometry, and with a zero block count ("keep").
    let l = list6(Some([0, 0, 0x08, 0, 0, 0, 0x02, 0]), &[&caching(false)]);
    assert_good(&d.run_out(&select6(true, false, l.len() as u8), &l));
    let l = list6(Some([0, 0, 0, 0, 0, 0, 0x02, 0]), &[]);
    assert_good(&d.run_out(&select6(true, false, l.len() as u8), &l));
    // The PS bit is ignored (initiators echo MODE SENSE output back).
    let mut p = caching(false);
    p[0] |= 0x80;
    let l = list6(None, &[&p]);
    assert_good(&d.run_out(&select6(true, false, l.len() as u8), &l));
    // Zero parameter list length: nothing to do (even with PF=0).
    assert_good(&d.run_out(&select6(false, false, 0), &[]));
    // With the write cache on, echoing WCE=1 is what is unchanged.
    d.emu.set_write_cache(true);
    let l = list6(None, &[&caching(true)]);
    assert_good(&d.run_out(&select6(true, false, l.len() as u8), &l));
}

#[test]
fn mode_select_rejects_changing_wce() {
    let d = Dev::new();
    let l = list6(None, &[&caching(true)]);
    let r = d.run_out(&select6(true, false, l.len() as u8), &l);
    // Page starts at 4; WCE is bit 2 of page byte 2.
    assert_bad_param_field(&r, 6, 2);
    // The device's setting did not change.
    assert_eq!(d.data_in(&sense6(true, 0, 0x08, 0, 255), 255)[6], 0);
    // Changing any other byte is rejected too, pointing at it.
    let mut p = caching(false);
    p[12] = 0x20;
    let l = list6(None, &[&CONTROL, &p]);
    let r = d.run_out(&select6(true, false, l.len() as u8), &l);
    assert_bad_param_field(&r, (4 + 12 + 12) as u16, 5);
}

#[test]
fn mode_select_field_checks() {
    let d = Dev::new();
    let l = list6(None, &[&caching(false)]);
    let n = l.len() as u8;
    assert_bad_cdb_field(&d.run_out(&select6(true, true, n), &l), 1, 0); // SP
    assert_bad_cdb_field(&d.run_out(&select6(false, false, n), &l), 1, 4); // PF=0
    // Parameter list length beyond the data sent.
    assert_bad_cdb_field(&d.run_out(&select6(true, false, n + 4), &l), 4, 7);
    // Shorter than the header.
    assert_sense(
        &d.run_out(&select6(true, false, 3), &l[..3]),
        0x05,
        0x1A,
        0x00,
    );
    // Unsupported page.
    let mut bad = caching(false);
    bad[0] = 0x19;
    let l2 = list6(None, &[&bad]);
    assert_bad_param_field(&d.run_out(&select6(true, false, l2.len() as u8), &l2), 4, 5);
    // Sub-page format.
    let l2 = list6(None, &[&[0x48, 0x01, 0x00, 0x00]]);
    assert_bad_param_field(&d.run_out(&select6(true, false, l2.len() as u8), &l2), 4, 6);
    // Wrong page length.
    let mut bad = caching(false);
    bad[1] = 0x10;
    let l2 = list6(None, &[&bad[..18]]);
    assert_bad_param_field(&d.run_out(&select6(true, false, l2.len() as u8), &l2), 5, 7);
    // Page running past the end of the list.
    let l2 = list6(None, &[&caching(false)[..10]]);
    assert_sense(
        &d.run_out(&select6(true, false, l2.len() as u8), &l2),
        0x05,
        0x1A,
        0x00,
    );
    // Bad block descriptor length.
    let mut l2 = list6(None, &[]);
    l2[3] = 4;
    l2.extend_from_slice(&[0; 4]);
    assert_bad_param_field(&d.run_out(&select6(true, false, l2.len() as u8), &l2), 3, 7);
    // Block descriptor with another block size or count.
    let l2 = list6(Some([0, 0, 0x08, 0, 0, 0, 0x10, 0]), &[]);
    assert_bad_param_field(&d.run_out(&select6(true, false, l2.len() as u8), &l2), 9, 7);
    let l2 = list6(Some([0, 0, 0x09, 0, 0, 0, 0x02, 0]), &[]);
    assert_bad_param_field(&d.run_out(&select6(true, false, l2.len() as u8), &l2), 4, 7);
}

#[test]
fn mode_select_10() {
    let d = Dev::new();
    let mut l = vec![0, 0, 0, 0, 0, 0, 0, 0];
    l.extend_from_slice(&caching(false));
    assert_good(&d.run_out(&select10(true, l.len() as u16), &l));
    // Long block descriptor.
    let mut l = vec![0, 0, 0, 0, 0x01, 0, 0, 16];
    l.extend_from_slice(&2048u64.to_be_bytes());
    l.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x02, 0]);
    l.extend_from_slice(&caching(false));
    assert_good(&d.run_out(&select10(true, l.len() as u16), &l));
    // WCE change, pointer past the 8-byte header and 16-byte descriptor.
    let n = l.len();
    l[n - 18] = 0x04;
    assert_bad_param_field(&d.run_out(&select10(true, n as u16), &l), 26, 2);
    // LONGLBA with an 8-byte descriptor length.
    let mut l = vec![0, 0, 0, 0, 0x01, 0, 0, 8];
    l.extend_from_slice(&[0; 8]);
    assert_bad_param_field(&d.run_out(&select10(true, l.len() as u16), &l), 6, 7);
}
