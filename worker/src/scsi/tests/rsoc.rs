//! REPORT SUPPORTED OPERATION CODES, and its agreement with the dispatcher.

use super::*;
use crate::scsi::table::OPS;

fn rsoc(rctd: bool, options: u8, op: u8, sa: u16, alloc: u32) -> Vec<u8> {
    let mut c = vec![0xA3, 0x0C, (u8::from(rctd) << 7) | options, op];
    c.extend_from_slice(&sa.to_be_bytes());
    c.extend_from_slice(&alloc.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

/// (opcode, service action, SERVACTV, CDB length) of every descriptor of an "all" report.
fn all_commands(d: &Dev) -> Vec<(u8, u16, bool, u16)> {
    let v = d.data_in(&rsoc(false, 0, 0, 0, 8192), 8192);
    let len = u32::from_be_bytes(v[..4].try_into().unwrap()) as usize;
    assert_eq!(len, v.len() - 4);
    assert_eq!(len % 8, 0);
    v[4..]
        .chunks(8)
        .map(|c| {
            assert_eq!((c[1], c[4]), (0, 0), "reserved bytes");
            assert_eq!(c[5] & !0x01, 0, "no CTDP without RCTD");
            (
                c[0],
                u16::from_be_bytes([c[2], c[3]]),
                c[5] & 1 == 1,
                u16::from_be_bytes([c[6], c[7]]),
            )
        })
        .collect()
}

#[test]
fn all_commands_match_the_table() {
    let d = Dev::new();
    let got = all_commands(&d);
    let want: Vec<_> = OPS
        .iter()
        .filter(|o| o.opcode != 0x42 && o.sa != Some(0x12))
        .map(|o| {
            (
                o.opcode,
                u16::from(o.sa.unwrap_or(0)),
                o.sa.is_some(),
                o.usage.len() as u16,
            )
        })
        .collect();
    assert_eq!(got, want);
    assert!(got.contains(&(0x28, 0, false, 10)));
    assert!(got.contains(&(0x9E, 0x10, true, 16)));
    assert!(got.contains(&(0xA3, 0x0C, true, 12)));
    // Thin provisioning adds UNMAP and GET LBA STATUS.
    let thin = all_commands(&Dev::thin());
    assert_eq!(thin.len(), got.len() + 2);
    assert!(thin.contains(&(0x42, 0, false, 10)));
    assert!(thin.contains(&(0x9E, 0x12, true, 16)));
}

#[test]
fn all_commands_with_timeouts_and_truncation() {
    let d = Dev::new();
    let n = all_commands(&d).len();
    let v = d.data_in(&rsoc(true, 0, 0, 0, 8192), 8192);
    assert_eq!(
        u32::from_be_bytes(v[..4].try_into().unwrap()) as usize,
        n * 20
    );
    assert_eq!(v.len(), 4 + n * 20);
    for c in v[4..].chunks(20) {
        assert_eq!(c[5] & 0x02, 0x02, "CTDP");
        assert_eq!(&c[8..10], &[0x00, 0x0A], "timeouts descriptor length");
    }
    let (r, v) = d.run_in(&rsoc(false, 0, 0, 0, 4), 64);
    assert_eq!(r.read_len, Some(4));
    assert_eq!(
        u32::from_be_bytes(v[..4].try_into().unwrap()) as usize,
        n * 8
    );
}

#[test]
fn one_command_reports() {
    let d = Dev::new();
    let v = d.data_in(&rsoc(false, 1, 0x28, 0, 64), 64);
    assert_eq!(
        v,
        [
            &[0, 0x03, 0, 10][..],
            &[0x28, 0x1E, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0]
        ]
        .concat()
    );
    let v = d.data_in(&rsoc(false, 2, 0x9E, 0x10, 64), 64);
    assert_eq!(&v[..4], &[0, 0x03, 0, 16]);
    assert_eq!(&v[4..6], &[0x9E, 0x10]);
    let v = d.data_in(&rsoc(true, 3, 0x9E, 0x10, 64), 64);
    assert_eq!(&v[..4], &[0, 0x83, 0, 16]);
    assert_eq!(v.len(), 4 + 16 + 12);
    let v = d.data_in(&rsoc(false, 3, 0x28, 0, 64), 64);
    assert_eq!(&v[..4], &[0, 0x03, 0, 10]);
    // Not supported: SUPPORT = 001b, no usage data.
    assert_eq!(
        d.data_in(&rsoc(false, 1, 0xC0, 0, 64), 64),
        vec![0, 0x01, 0, 0]
    );
    assert_eq!(
        d.data_in(&rsoc(false, 2, 0x9E, 0x12, 64), 64),
        vec![0, 0x01, 0, 0]
    );
    assert_eq!(
        d.data_in(&rsoc(false, 1, 0x42, 0, 64), 64),
        vec![0, 0x01, 0, 0]
    );
    // Wrong option for the opcode's kind, and reserved options.
    assert_bad_cdb_field(&d.run_in(&rsoc(false, 1, 0x9E, 0, 64), 64).0, 2, 2);
    assert_bad_cdb_field(&d.run_in(&rsoc(false, 2, 0x28, 0, 64), 64).0, 2, 2);
    for opt in 4..8 {
        assert_bad_cdb_field(&d.run_in(&rsoc(false, opt, 0, 0, 64), 64).0, 2, 2);
    }
    assert_bad_cdb_field(&d.run_in(&rsoc(false, 0x08, 0, 0, 64), 64).0, 2, 6);
}

#[test]
fn handler_opcodes_are_reported() {
    let d = Dev::with(cfg(64), HandlerCaps::default(), |h| {
        h.opcodes = vec![0x02, 0x42, 0xE0]
    });
    let all = all_commands(&d);
    assert!(all.contains(&(0x02, 0, false, 6)));
    assert!(
        all.contains(&(0x42, 0, false, 10)),
        "UNMAP implemented by the handler"
    );
    assert!(
        !all.iter().any(|c| c.0 == 0xE0),
        "vendor group: length unknown"
    );
    let v = d.data_in(&rsoc(false, 1, 0x02, 0, 64), 64);
    assert_eq!(v, vec![0, 0x03, 0, 6, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]);
}

/// The usage data each command reports is exactly what the dispatcher evaluates: setting any
/// one bit outside it is INVALID FIELD IN CDB pointing at that byte, but for the former SCSI-2
/// LUN field (byte 1 bits 7..5) of the commands that ignore it, which changes nothing at all;
/// and a CDB with every reported bit set is never rejected for a bit outside the mask.
#[test]
fn reported_usage_agrees_with_the_dispatcher() {
    let ignores_lun_field = |op: u8| {
        crate::scsi::table::OPS
            .iter()
            .any(|o| o.opcode == op && o.scsi2_lun)
    };
    for d in [Dev::new(), Dev::thin()] {
        for (op, sa, has_sa, len) in all_commands(&d) {
            let opt = if has_sa { 2 } else { 1 };
            let v = d.data_in(&rsoc(false, opt, op, sa, 64), 64);
            assert_eq!(v[1], 0x03);
            let usage = v[4..].to_vec();
            assert_eq!(usage.len(), len as usize);
            assert_eq!(usage[0], op);
            let sa_mask = if has_sa { 0x1F } else { 0 };
            let base: Vec<u8> = (0..usage.len())
                .map(|i| match i {
                    0 => op,
                    1 => sa as u8 & sa_mask,
                    _ => 0,
                })
                .collect();
            for i in 1..usage.len() {
                for bit in 0..8 {
                    let m = 1u8 << bit;
                    if usage[i] & m != 0 || (i == 1 && sa_mask & m != 0) {
                        continue;
                    }
                    let mut c = base.clone();
                    c[i] |= m;
                    let (r, _) = d.run_in(&c, 4096);
                    if i == 1 && bit >= 5 && ignores_lun_field(op) {
                        assert_eq!(r, d.run_in(&base, 4096).0, "{op:02x}: byte 1 bit {bit}");
                        continue;
                    }
                    let s = assert_sense(&r, 0x05, 0x24, 0x00);
                    let f = s.field.expect("field pointer");
                    assert_eq!(f.byte as usize, i, "{op:02x}/{sa:02x} byte {i} bit {bit}");
                    let b = f.bit.expect("bit pointer");
                    assert!(b >= bit, "pointer at or above the offending bit");
                }
            }
            let mut all = usage.clone();
            if has_sa {
                all[1] = (all[1] & !0x1F) | (sa as u8);
            }
            let (r, _) = d.run_in(&all, 4096);
            if let Some(s) = r.sense {
                if let Some(f) = s.field.filter(|f| f.in_cdb) {
                    let b = f.bit.unwrap_or(7);
                    assert_ne!(usage[f.byte as usize] & (1 << b), 0, "{op:02x}: {s:?}");
                }
            }
        }
    }
}
