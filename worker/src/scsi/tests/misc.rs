//! Dispatcher-level behaviour: unknown opcodes, reserved bits, unit attentions, refusal,
//! housekeeping commands, handler-implemented opcodes, error mapping.

use super::*;
use crate::scsi::sense::key;

const TUR: [u8; 6] = [0; 6];

#[test]
fn test_unit_ready_is_good() {
    let d = Dev::new();
    assert_good(&d.run(&TUR));
}

#[test]
fn unknown_opcodes_are_invalid_command_operation_code() {
    let d = Dev::new();
    for op in [0x02u8, 0x1D, 0x3B, 0x7F, 0xC0, 0xFF] {
        let r = d.run(&[op, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_sense(&r, key::ILLEGAL_REQUEST, 0x20, 0x00);
    }
    assert_sense(&d.run(&[]), key::ILLEGAL_REQUEST, 0x20, 0x00);
}

#[test]
fn cdb_shorter_than_its_opcode_needs_is_invalid_field() {
    let d = Dev::new();
    let r = d.run(&[0x28, 0, 0, 0, 0, 0]);
    let s = assert_sense(&r, key::ILLEGAL_REQUEST, 0x24, 0x00);
    assert_eq!(s.field.map(|f| f.byte), Some(0));
}

#[test]
fn longer_cdb_slices_are_accepted() {
    // The ring may hand over a 16-byte buffer for a 6-byte CDB.
    let d = Dev::new();
    let mut c = TUR.to_vec();
    c.resize(16, 0xEE);
    assert_good(&d.run(&c));
}

#[test]
fn control_byte_bits_are_rejected_with_pointer() {
    let d = Dev::new();
    assert_bad_cdb_field(&d.run(&[0, 0, 0, 0, 0, 0x04]), 5, 2); // NACA
    assert_bad_cdb_field(&d.run(&[0, 0, 0, 0, 0, 0x01]), 5, 0); // LINK
    assert_bad_cdb_field(&d.run(&[0, 0, 0, 0, 0, 0x80]), 5, 7); // vendor specific
    assert_bad_cdb_field(&d.run(&[0, 0, 0, 0, 0, 0x10]), 5, 5); // reserved 5..3
}

#[test]
fn reserved_bytes_are_rejected_with_pointer() {
    let d = Dev::new();
    assert_bad_cdb_field(&d.run(&[0, 0, 0x01, 0, 0, 0]), 2, 7);
    assert_bad_cdb_field(&d.run(&[0, 0x10, 0, 0, 0, 0]), 1, 7);
    // Byte 1 bits 7..5 are the former SCSI-2 LUN field, which TEST UNIT READY ignores (see
    // tests/scsi2_lun.rs); with another reserved bit it is still refused.
    assert_good(&d.run(&[0, 0x40, 0, 0, 0, 0]));
    assert_bad_cdb_field(&d.run(&[0, 0x41, 0, 0, 0, 0]), 1, 7);
}

#[test]
fn power_on_reset_unit_attention_is_delivered_once() {
    let d = Dev::new();
    d.emu.power_on_reset();
    // INQUIRY, REPORT LUNS and REQUEST SENSE... INQUIRY and REPORT LUNS do not consume it.
    assert_good(&d.run_in(&inquiry(false, 0, 36), 36).0);
    let luns = [0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0];
    assert_good(&d.run_in(&luns, 16).0);
    assert_sense(&d.run(&TUR), key::UNIT_ATTENTION, 0x29, 0x00);
    assert_good(&d.run(&TUR));
}

#[test]
fn replayed_commands_run_and_leave_the_restart_unit_attention_for_new_ones() {
    // After a worker restart, the commands the previous worker had accepted are run again by the
    // recovery: they execute (they were issued before the reset), and the power-on reset is
    // reported to the first command the initiator sends afterwards.
    let d = Dev::new();
    d.emu.power_on_reset();
    let mut data = DataBuf::from_segments(vec![vec![0x5A; 512]]);
    let write10 = [0x2A, 0, 0, 0, 0, 7, 0, 0, 1, 0];
    let r = d.emu.execute_replayed(&mut Command {
        cdb: &write10,
        data: &mut data,
        bidi_in: None,
    });
    assert_good(&r);
    assert_good(&d.emu.execute_replayed(&mut Command {
        cdb: &TUR,
        data: &mut DataBuf::empty(),
        bidi_in: None,
    }));
    assert_sense(&d.run(&TUR), key::UNIT_ATTENTION, 0x29, 0x00);
    assert_good(&d.run(&TUR));
    let read10 = [0x28, 0, 0, 0, 0, 7, 0, 0, 1, 0];
    assert_eq!(d.data_in(&read10, 512), vec![0x5A; 512]);
}

#[test]
fn unit_attention_preempts_any_other_command_including_unknown_ones() {
    let d = Dev::new();
    d.emu.power_on_reset();
    let r = d.run(&[0xC0, 0, 0, 0, 0, 0]);
    assert_sense(&r, key::UNIT_ATTENTION, 0x29, 0x00);
    assert_sense(
        &d.run(&[0xC0, 0, 0, 0, 0, 0]),
        key::ILLEGAL_REQUEST,
        0x20,
        0x00,
    );
}

#[test]
fn request_sense_returns_and_clears_the_unit_attention() {
    let d = Dev::new();
    d.emu.power_on_reset();
    let v = d.data_in(&[0x03, 0, 0, 0, 252, 0], 252);
    assert_eq!(v.len(), 18);
    assert_eq!(v[0], 0x70);
    assert_eq!((v[2], v[12], v[13]), (0x06, 0x29, 0x00));
    assert_good(&d.run(&TUR));
    // Nothing pending: NO SENSE.
    let v = d.data_in(&[0x03, 0, 0, 0, 252, 0], 252);
    assert_eq!(v, Sense::no_sense().to_bytes());
}

#[test]
fn request_sense_descriptor_format_and_truncation() {
    let d = Dev::new();
    d.emu.resize(1024 * BS as u64);
    let v = d.data_in(&[0x03, 0x01, 0, 0, 252, 0], 252);
    assert_eq!(v, vec![0x72, 0x06, 0x2A, 0x09, 0, 0, 0, 0]);
    let (r, v) = d.run_in(&[0x03, 0, 0, 0, 4, 0], 4);
    assert_good(&r);
    assert_eq!(v, vec![0x70, 0, 0, 0]);
    assert_eq!(r.read_len, None);
}

#[test]
fn resize_changes_capacity_and_queues_capacity_changed_once() {
    let d = Dev::new();
    d.emu.resize(4096 * BS as u64);
    let rc10 = [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_sense(&d.run_in(&rc10, 8).0, key::UNIT_ATTENTION, 0x2A, 0x09);
    let v = d.data_in(&rc10, 8);
    assert_eq!(u32::from_be_bytes(v[0..4].try_into().unwrap()), 4095);
    // Shrinking: blocks past the new end are out of range.
    d.emu.resize(100 * BS as u64);
    assert_sense(&d.run(&TUR), key::UNIT_ATTENTION, 0x2A, 0x09);
    let (r, _) = d.run_in(&rw10(0x28, 100, 1, 0), BS);
    assert_lba_out_of_range(&r);
    assert_good(&d.run_in(&rw10(0x28, 99, 1, 0), BS).0);
}

#[test]
fn repeated_resizes_queue_one_capacity_change_and_reset_supersedes() {
    let d = Dev::new();
    d.emu.resize(4096 * BS as u64);
    d.emu.resize(8192 * BS as u64);
    assert_sense(&d.run(&TUR), key::UNIT_ATTENTION, 0x2A, 0x09);
    assert_good(&d.run(&TUR));
    d.emu.resize(4096 * BS as u64);
    d.emu.power_on_reset();
    assert_sense(&d.run(&TUR), key::UNIT_ATTENTION, 0x29, 0x00);
    assert_good(&d.run(&TUR));
}

#[test]
fn refused_device_fails_fast_but_answers_housekeeping() {
    let c = cfg(2048);
    let emu = Emulator::refused(&c, "path not allowed by policy");
    assert_eq!(emu.refusal(), Some("path not allowed by policy"));
    let run = |cdb: &[u8], len: usize| {
        let mut d = DataBuf::zeroed(&[len]);
        let r = emu.execute(&mut Command {
            cdb,
            data: &mut d,
            bidi_in: None,
        });
        (r, d.to_vec())
    };
    for cdb in [
        TUR.to_vec(),
        rw10(0x28, 0, 1, 0),
        rw10(0x2A, 0, 1, 0),
        vec![0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        vec![0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        vec![0xC0, 0, 0, 0, 0, 0],
    ] {
        assert_sense(&run(&cdb, BS).0, key::NOT_READY, 0x04, 0x03);
    }
    let (r, v) = run(&inquiry(false, 0, 96), 96);
    assert_good(&r);
    assert_eq!(&v[8..16], b"LIO-ORG ");
    let (r, v) = run(&inquiry(true, 0x80, 96), 96);
    assert_good(&r);
    assert_eq!(v[1], 0x80);
    let (r, v) = run(&[0x03, 0, 0, 0, 18, 0], 18);
    assert_good(&r);
    assert_eq!((v[2], v[12], v[13]), (0x02, 0x04, 0x03));
    let (r, _) = run(&[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], 16);
    assert_good(&r);
    // A reset on a refused device changes nothing: still NOT READY.
    emu.power_on_reset();
    assert_sense(&run(&TUR, 0).0, key::NOT_READY, 0x04, 0x03);
}

#[test]
fn start_stop_unit_flushes_on_stop_unless_no_flush() {
    let d = Dev::new();
    assert_good(&d.run(&[0x1B, 0, 0, 0, 0x01, 0])); // start
    assert_eq!(d.h.flushes.load(Ordering::SeqCst), 0);
    assert_good(&d.run(&[0x1B, 0x01, 0, 0, 0x00, 0])); // stop, immed
    assert_eq!(d.h.flushes.load(Ordering::SeqCst), 1);
    assert_good(&d.run(&[0x1B, 0, 0, 0, 0x04, 0])); // stop, NO_FLUSH
    assert_eq!(d.h.flushes.load(Ordering::SeqCst), 1);
    assert_bad_cdb_field(&d.run(&[0x1B, 0, 0, 0, 0x02, 0]), 4, 1); // LOEJ
    assert_bad_cdb_field(&d.run(&[0x1B, 0, 0, 0, 0x31, 0]), 4, 7); // power condition
    assert_bad_cdb_field(&d.run(&[0x1B, 0, 0, 0, 0x09, 0]), 4, 3); // reserved bit 3
    assert_bad_cdb_field(&d.run(&[0x1B, 0, 0, 0x01, 0x01, 0]), 3, 3); // modifier
}

#[test]
fn prevent_allow_medium_removal_is_accepted() {
    let d = Dev::new();
    assert_good(&d.run(&[0x1E, 0, 0, 0, 0x01, 0]));
    assert_good(&d.run(&[0x1E, 0, 0, 0, 0x00, 0]));
    assert_bad_cdb_field(&d.run(&[0x1E, 0, 0, 0, 0x04, 0]), 4, 7);
}

#[test]
fn report_luns_lists_lun_zero() {
    let d = Dev::new();
    let v = d.data_in(&[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 256);
    assert_eq!(v, [&[0, 0, 0, 8, 0, 0, 0, 0][..], &[0; 8]].concat());
    assert_bad_cdb_field(
        &d.run_in(&[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], 8).0,
        6,
        7,
    );
    assert_bad_cdb_field(
        &d.run_in(&[0xA0, 0, 3, 0, 0, 0, 0, 0, 0, 16, 0, 0], 16).0,
        2,
        7,
    );
}

#[test]
fn handler_implemented_opcodes_go_to_the_handler() {
    let d = Dev::with(cfg(64), HandlerCaps::default(), |h| {
        h.opcodes = vec![0x12, 0xC0];
    });
    let (r, v) = d.run_in(&inquiry(false, 0, 36), 36);
    assert_eq!(r.read_len, Some(7));
    assert_eq!(&v[..7], b"handler");
    let (r, v) = d.run_in(&[0xC0, 0, 0, 0, 0, 0], 16);
    assert_good(&r);
    assert_eq!(&v[..7], b"handler");
    // Unit attentions still come first (except for the housekeeping opcodes).
    d.emu.power_on_reset();
    assert_sense(
        &d.run_in(&[0xC0, 0, 0, 0, 0, 0], 16).0,
        key::UNIT_ATTENTION,
        0x29,
        0,
    );
    // Other opcodes are still emulated.
    assert_good(&d.run(&TUR));
}

#[test]
fn io_errors_map_to_sense() {
    let cases: [(i32, bool, (u8, u8, u8)); 10] = [
        (libc::EIO, false, (0x03, 0x11, 0x00)),
        (libc::EIO, true, (0x03, 0x0C, 0x00)),
        (libc::ENOSPC, true, (0x07, 0x27, 0x07)),
        (libc::EDQUOT, true, (0x07, 0x27, 0x07)),
        (libc::EROFS, true, (0x07, 0x27, 0x00)),
        (libc::EINVAL, false, (0x04, 0x44, 0x00)),
        (libc::EBADF, true, (0x04, 0x44, 0x00)),
        (libc::ENXIO, false, (0x03, 0x11, 0x00)),
        // A network backend that stayed away (the nbd handler's bounded wait): NOT READY,
        // ASYMMETRIC ACCESS STATE TRANSITION, in both directions.
        (libc::ENOTCONN, false, (0x02, 0x04, 0x0A)),
        (libc::ENOTCONN, true, (0x02, 0x04, 0x0A)),
    ];
    for (errno, write, (k, asc, ascq)) in cases {
        let d = Dev::new();
        let e = Some(io::Error::from_raw_os_error(errno));
        let r = if write {
            *d.h.fail_write.lock().unwrap() = e;
            d.run_out(&rw10(0x2A, 0, 1, 0), &[0; BS])
        } else {
            *d.h.fail_read.lock().unwrap() = e;
            d.run_in(&rw10(0x28, 0, 1, 0), BS).0
        };
        assert_sense(&r, k, asc, ascq);
    }
    // Errors without an errno: medium errors by direction.
    let d = Dev::new();
    *d.h.fail_read.lock().unwrap() = Some(io::Error::other("backend gone"));
    assert_sense(&d.run_in(&rw10(0x28, 0, 1, 0), BS).0, 0x03, 0x11, 0x00);
    // A failed flush is a write error.
    let d = Dev::new();
    *d.h.fail_flush.lock().unwrap() = Some(io::Error::from_raw_os_error(libc::EIO));
    assert_sense(&d.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 0x03, 0x0C, 0x00);
}

#[test]
fn describe_names_commands_from_the_table() {
    use crate::scsi::{DataDir, describe};
    assert_eq!(
        describe(&rw10(0x28, 0, 1, 0)),
        Some(("READ (10)", DataDir::In))
    );
    assert_eq!(
        describe(&[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        Some(("READ CAPACITY (16)", DataDir::In))
    );
    assert_eq!(
        describe(&[0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        Some(("UNMAP", DataDir::Out))
    );
    assert_eq!(describe(&[0xC0]), None);
    assert_eq!(describe(&[]), None);
}

#[test]
fn medium_access_counts_reads_writes_and_compare_and_write() {
    use crate::scsi::{MediumAccess, medium_access};
    let reads: Vec<u8> = (0..=u8::MAX)
        .filter(|op| medium_access(*op) == MediumAccess::Read)
        .collect();
    let writes: Vec<u8> = (0..=u8::MAX)
        .filter(|op| medium_access(*op) == MediumAccess::Write)
        .collect();
    // READ (6/10/16/12).
    assert_eq!(reads, [0x08, 0x28, 0x88, 0xA8]);
    // WRITE (6/10/16/12), WRITE AND VERIFY (10/16/12), COMPARE AND WRITE, ORWRITE (16). Not WRITE
    // SAME, UNMAP, VERIFY or parameter data.
    assert_eq!(
        writes,
        [0x0A, 0x2A, 0x2E, 0x89, 0x8A, 0x8B, 0x8E, 0xAA, 0xAE]
    );
    assert_eq!(medium_access(0x93), MediumAccess::None);
    assert_eq!(medium_access(0xC0), MediumAccess::None);
}
