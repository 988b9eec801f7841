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
