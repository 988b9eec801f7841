//! Initiators' CDBs and data-out buffers are untrusted. Any CDB with any data must end in GOOD
//! or a CHECK CONDITION with well-formed sense (or BUSY), and never panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tcmu_warden_worker::handler::ram::RamHandler;
use tcmu_warden_worker::handler::DeviceConfig;
use tcmu_warden_worker::iobuf::DataBuf;
use tcmu_warden_worker::scsi::{Command, Emulator, status};

fn emulator() -> &'static Emulator {
    static EMU: OnceLock<Emulator> = OnceLock::new();
    EMU.get_or_init(|| {
        let cfg = DeviceConfig {
            name: "fuzz".into(),
            subtype: "ram".into(),
            cfgstring: String::new(),
            dev_size: 64 * 512,
            block_size: 512,
            max_sectors: 16,
            write_cache: true,
            unit_serial: "fuzz".into(),
        };
        Emulator::new(&cfg, Arc::new(RamHandler::new(cfg.dev_size)))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&cdb_len, rest)) = data.split_first() else { return };
    let cdb_len = usize::from(cdb_len % 33).max(1).min(rest.len());
    let (cdb, payload) = rest.split_at(cdb_len);
    // Split the payload into up to three segments, as iovecs would be.
    let cut1 = payload.len() / 3;
    let cut2 = 2 * payload.len() / 3;
    let mut buf = DataBuf::from_segments(vec![
        payload[..cut1].to_vec(),
        payload[cut1..cut2].to_vec(),
        payload[cut2..].to_vec(),
    ]);
    let mut bidi = DataBuf::zeroed(&[64]);
    let r = emulator().execute(&mut Command { cdb, data: &mut buf, bidi_in: Some(&mut bidi) });
    match r.status {
        status::GOOD | status::BUSY => {}
        status::CHECK_CONDITION => {
            let sense = r.sense.expect("CHECK CONDITION carries sense").to_bytes();
            assert!(sense.len() >= 8 && sense.len() <= 96);
            assert!(matches!(sense[0] & 0x7f, 0x70 | 0x71 | 0x72 | 0x73));
        }
        other => panic!("unexpected status {other:#x}"),
    }
});
