//! Initiators' CDBs and data-out buffers are untrusted. Any CDB with any data, sent to any of the
//! process's devices, must end in GOOD or BUSY, or in CHECK CONDITION with well-formed sense, never
//! report more data-in than the buffer holds, and never panic.
//!
//! Three devices share one copy registry, as the devices of one worker do, so EXTENDED COPY can
//! reach from one to another: `a` (512-byte blocks, write cache on), `b` (4096-byte blocks, write
//! cache off, a different block size than `a`, so copies between them must be refused), and `r`,
//! a device the policy refused (never a copy target).
//!
//! Input layout: byte 0 picks the device (modulo 3), byte 1 the CDB length (modulo 33, at least
//! 1), then the CDB, then the data-out buffer, split into three segments as iovecs would be.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tcmu_warden_worker::handler::DeviceConfig;
use tcmu_warden_worker::handler::ram::RamHandler;
use tcmu_warden_worker::sdk::DataBuf;
use tcmu_warden_worker::scsi::{Command, CopyRegistry, Emulator, status};

struct Devices {
    _registry: Arc<CopyRegistry>,
    all: [Arc<Emulator>; 3],
}

fn cfg(name: &str, blocks: u64, block_size: u32, write_cache: bool) -> DeviceConfig {
    DeviceConfig {
        name: name.into(),
        subtype: "ram".into(),
        cfgstring: String::new(),
        dev_size: blocks * u64::from(block_size),
        block_size,
        max_sectors: 16,
        write_cache,
        unit_serial: format!("fuzz-{name}"),
    }
}

fn devices() -> &'static Devices {
    static DEVS: OnceLock<Devices> = OnceLock::new();
    DEVS.get_or_init(|| {
        let registry = CopyRegistry::new();
        let a = cfg("a", 64, 512, true);
        let b = cfg("b", 16, 4096, false);
        let r = cfg("r", 64, 512, false);
        let all = [
            Arc::new(Emulator::new(&a, Arc::new(RamHandler::new(a.dev_size)))),
            Arc::new(Emulator::new(&b, Arc::new(RamHandler::new(b.dev_size)))),
            Arc::new(Emulator::refused(&r, "fuzz: refused by policy")),
        ];
        for e in &all {
            registry.register(e);
        }
        Devices {
            _registry: registry,
            all,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let [sel, cdb_len, rest @ ..] = data else { return };
    let emu = &devices().all[usize::from(*sel) % 3];
    let cdb_len = usize::from(cdb_len % 33).max(1).min(rest.len());
    let (cdb, payload) = rest.split_at(cdb_len);
    let cut1 = payload.len() / 3;
    let cut2 = 2 * payload.len() / 3;
    let mut buf = DataBuf::from_segments(vec![
        payload[..cut1].to_vec(),
        payload[cut1..cut2].to_vec(),
        payload[cut2..].to_vec(),
    ]);
    let mut bidi = DataBuf::zeroed(&[64]);
    let r = emu.execute(&mut Command { cdb, data: &mut buf, bidi_in: Some(&mut bidi) });
    match r.status {
        status::GOOD | status::BUSY => assert!(r.sense.is_none(), "sense without CHECK CONDITION"),
        status::CHECK_CONDITION => {
            let sense = r.sense.expect("CHECK CONDITION carries sense");
            let fixed = sense.to_bytes();
            assert!(fixed.len() >= 8 && fixed.len() <= 96);
            assert!(matches!(fixed[0] & 0x7f, 0x70 | 0x71));
            let desc = sense.to_descriptor_bytes();
            assert!(desc.len() >= 8 && desc.len() <= 96);
            assert_eq!(usize::from(desc[7]) + 8, desc.len());
        }
        other => panic!("unexpected status {other:#x}"),
    }
    if let Some(n) = r.read_len {
        assert!(n as usize <= buf.len(), "read_len {n} beyond a {}-byte buffer", buf.len());
    }
});
