//! `jailed-runtime`: the worker runtime's end-to-end path under both jail stages, for
//! `tests/tests/jail_runtime.rs`.
//!
//! Started by the supervisor's real spawn path (stage one applied before exec), it sets up two
//! simulated TCMU devices (the kernel simulator's memfd rings and event sockets) and a memfd
//! backing store, enters stage two from the `Hello` its supervisor channel delivers, as every
//! worker does, and then serves SCSI commands
//! through the built-in `ram` and `file` handlers: thread creation, ring mapping, polling,
//! durable writes, flushes, hole punching, reads. Any system call the allow-lists forgot kills it
//! with SIGSYS, which the test reports.
//!
//! Exit status 0: every command completed as expected.

use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::memfd::{MFdFlags, memfd_create};
use tcmu_warden_proto::ToWorker;
use tcmu_warden_tests::{KernelSim, SimConfig, SimDevice};
use tcmu_warden_worker::handler::{DeviceConfig, builtin_factories};
use tcmu_warden_worker::jail::{StageTwo, enter_stage_two};
use tcmu_warden_worker::ring::{Mapping, Ring};
use tcmu_warden_worker::runtime::{DeviceOptions, DeviceRunner};
use tcmu_warden_worker::scsi::Emulator;

const BS: u32 = 512;
const BLOCKS: u64 = 2048;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jailed-runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn config(subtype: &str) -> DeviceConfig {
    DeviceConfig {
        name: format!("jailed-{subtype}"),
        subtype: subtype.into(),
        cfgstring: String::new(),
        dev_size: BLOCKS * u64::from(BS),
        block_size: BS,
        max_sectors: 128,
        write_cache: false,
        unit_serial: "jailed-serial".into(),
    }
}

fn run() -> Result<(), String> {
    // Everything that needs system calls no worker is allowed comes first: the simulator's
    // devices (memfd_create, socketpair) and the backing store.
    let (mut ram_sim, ram_dev) = KernelSim::new(SimConfig::default()).map_err(|e| e.to_string())?;
    let (mut file_sim, file_dev) =
        KernelSim::new(SimConfig::default()).map_err(|e| e.to_string())?;
    let backing =
        memfd_create("jailed-backing", MFdFlags::MFD_CLOEXEC).map_err(|e| e.to_string())?;
    nix::unistd::ftruncate(backing.as_fd(), 1 << 20).map_err(|e| e.to_string())?;

    // The first frame on the supervisor channel is the Hello, with stage two of the jail.
    let chan = tcmu_warden_worker::runtime::channel_from_env().map_err(|e| e.to_string())?;
    let jail = match chan.recv::<ToWorker>().map_err(|e| e.to_string())? {
        (ToWorker::Hello { jail, .. }, _) => jail,
        (other, _) => return Err(format!("expected Hello, got {other:?}")),
    };
    let factories = builtin_factories();
    match enter_stage_two(&factories, jail.as_ref()).map_err(|e| e.to_string())? {
        StageTwo::Installed { .. } => {}
        StageTwo::NotRequested => return Err("started without a jail".into()),
    }

    let factory = |subtype: &str| {
        factories
            .iter()
            .find(|f| f.subtype() == subtype)
            .cloned()
            .ok_or_else(|| format!("no {subtype} factory"))
    };
    let ram = factory("ram")?
        .open(&config("ram"), None)
        .map_err(|e| e.to_string())?;
    let file = factory("file")?
        .open(&config("file"), Some(backing))
        .map_err(|e| e.to_string())?;

    let ram_runner = start(&config("ram"), ram, ram_dev)?;
    let file_runner = start(&config("file"), file, file_dev)?;
    exercise(&mut ram_sim, "ram")?;
    exercise(&mut file_sim, "file")?;
    unmap(&mut file_sim)?;
    ram_runner.stop().map_err(|e| e.to_string())?;
    file_runner.stop().map_err(|e| e.to_string())?;
    Ok(())
}

fn start(
    cfg: &DeviceConfig,
    handler: Arc<dyn tcmu_warden_worker::handler::Handler>,
    dev: SimDevice,
) -> Result<DeviceRunner, String> {
    let map = Mapping::map(dev.map_fd.as_fd(), dev.map_len).map_err(|e| e.to_string())?;
    let ring = Ring::new(map).map_err(|e| e.to_string())?;
    DeviceRunner::start(
        cfg.name.clone(),
        ring,
        dev.event_fd,
        Arc::new(Emulator::new(cfg, handler)),
        DeviceOptions { io_threads: 4 },
        Box::new(|r| {
            if let Err(e) = r {
                eprintln!("jailed-runtime: device ended with {e}");
            }
        }),
    )
    .map_err(|e| e.to_string())
}

/// Runs one command to completion; returns (status, data-in).
fn one(
    sim: &mut KernelSim,
    cdb: &[u8],
    out: &[u8],
    in_len: usize,
) -> Result<(u8, Vec<u8>), String> {
    let id = sim.submit(cdb, out, in_len).map_err(|e| e.to_string())?;
    sim.kick().map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        sim.wait_notified(Duration::from_millis(200))
            .map_err(|e| e.to_string())?;
        for c in sim.reap().map_err(|e| e.to_string())? {
            if c.cmd_id == id {
                return Ok((c.status, c.data_in));
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "command {:#04x} never completed",
                cdb.first().copied().unwrap_or(0)
            ));
        }
    }
}

fn rw10(op: u8, lba: u32, blocks: u16, fua: bool) -> Vec<u8> {
    let mut c = vec![op, if fua { 0x08 } else { 0 }, 0, 0, 0, 0, 0, 0, 0, 0];
    if let Some(dst) = c.get_mut(2..6) {
        dst.copy_from_slice(&lba.to_be_bytes());
    }
    if let Some(dst) = c.get_mut(7..9) {
        dst.copy_from_slice(&blocks.to_be_bytes());
    }
    c
}

fn expect_good(what: &str, status: u8) -> Result<(), String> {
    if status == 0 {
        Ok(())
    } else {
        Err(format!("{what}: SCSI status {status:#04x}"))
    }
}

fn exercise(sim: &mut KernelSim, name: &str) -> Result<(), String> {
    let (st, _) = one(sim, &[0x00, 0, 0, 0, 0, 0], &[], 0)?;
    expect_good(&format!("{name} TEST UNIT READY"), st)?;
    let (st, inq) = one(sim, &[0x12, 0, 0, 0, 96, 0], &[], 96)?;
    expect_good(&format!("{name} INQUIRY"), st)?;
    if inq.first() != Some(&0) {
        return Err(format!("{name} INQUIRY: not a disk: {inq:?}"));
    }
    let pattern: Vec<u8> = (0..16 * BS).map(|i| (i % 251) as u8).collect();
    let (st, _) = one(sim, &rw10(0x2A, 8, 16, true), &pattern, 0)?;
    expect_good(&format!("{name} WRITE(10) FUA"), st)?;
    let (st, _) = one(sim, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0)?;
    expect_good(&format!("{name} SYNCHRONIZE CACHE"), st)?;
    let (st, back) = one(sim, &rw10(0x28, 8, 16, false), &[], pattern.len())?;
    expect_good(&format!("{name} READ(10)"), st)?;
    if back != pattern {
        return Err(format!("{name}: read back different data"));
    }
    Ok(())
}

/// UNMAP on the file handler punches a hole (fallocate): the blocks then read as zeros.
fn unmap(sim: &mut KernelSim) -> Result<(), String> {
    // Parameter list: header (8 bytes) and one descriptor (LBA 8, 8 blocks).
    let mut params = vec![0u8; 24];
    if let Some(h) = params.get_mut(0..2) {
        h.copy_from_slice(&22u16.to_be_bytes());
    }
    if let Some(h) = params.get_mut(2..4) {
        h.copy_from_slice(&16u16.to_be_bytes());
    }
    if let Some(d) = params.get_mut(8..16) {
        d.copy_from_slice(&8u64.to_be_bytes());
    }
    if let Some(d) = params.get_mut(16..20) {
        d.copy_from_slice(&8u32.to_be_bytes());
    }
    let cdb = [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0];
    let (st, _) = one(sim, &cdb, &params, 0)?;
    expect_good("file UNMAP", st)?;
    let (st, back) = one(sim, &rw10(0x28, 8, 8, false), &[], 8 * BS as usize)?;
    expect_good("file READ after UNMAP", st)?;
    if back.iter().any(|b| *b != 0) {
        return Err("unmapped blocks do not read as zeros".into());
    }
    Ok(())
}
