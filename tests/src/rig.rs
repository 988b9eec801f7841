//! # A worker's device runtime driven from the simulated kernel
//!
//! [`Rig`] wires one device end to end without a kernel: a [`KernelSim`] ring, mapped and served
//! by the worker's real [`DeviceRunner`] (ring thread, I/O threads, SCSI [`Emulator`], the given
//! [`Handler`]), so that a test queues SCSI commands (a *CDB*, the command descriptor block, and
//! any data-out bytes) and checks what the simulated kernel reaps: status, sense data and
//! data-in bytes. [`sense_triple`] decodes the sense data of a failed command.
//!
//! This module owns the wiring and the waiting only; it never looks inside the worker. It is
//! test support: where a test would fail (a command that never completes, a ring left
//! undrained, a runner that ends with an error), it panics, and the panic is that test's
//! failure. Every wait polls with a generous deadline.

// Test support: panicking is how a helper fails the test that called it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tcmu_warden_worker::handler::{DeviceConfig, Handler};
use tcmu_warden_worker::ring::{Mapping, Ring};
use tcmu_warden_worker::runtime::{DeviceOptions, DeviceRunner, Engine};
use tcmu_warden_worker::scsi::Emulator;

use crate::sim::{Completed, KernelSim, SimConfig, SimError};

/// A simulated kernel and the worker runtime serving its ring. Dropping it stops the runtime
/// (and fails the test if the runtime ended with an error).
pub struct Rig {
    /// The kernel's side: submit, kick and reap through it directly when a test needs more than
    /// [`Rig::run`].
    pub sim: KernelSim,
    /// The device's emulator, shared with the runtime (for reconfiguration).
    pub emu: Arc<Emulator>,
    runner: Option<DeviceRunner>,
}

impl Rig {
    /// Starts a runtime with `io_threads` I/O threads serving device `cfg` through `handler`,
    /// on a ring laid out by `sim_cfg`.
    pub fn new(
        cfg: &DeviceConfig,
        handler: Arc<dyn Handler>,
        sim_cfg: SimConfig,
        io_threads: usize,
    ) -> Rig {
        let (sim, dev) = KernelSim::new(sim_cfg).unwrap();
        let map = Mapping::map(dev.map_fd.as_fd(), dev.map_len).unwrap();
        let ring = Ring::new(map).unwrap();
        let emu = Arc::new(Emulator::new(cfg, handler));
        let runner = DeviceRunner::start(
            cfg.name.clone(),
            ring,
            dev.event_fd,
            emu.clone(),
            DeviceOptions { io_threads },
            Box::new(|r| assert!(r.is_ok(), "device ended with {r:?}")),
        )
        .unwrap();
        Rig {
            sim,
            emu,
            runner: Some(runner),
        }
    }

    /// Starts device `cfg` through `handler` on a ring laid out by `sim_cfg`, served by
    /// `engine` (shared with other rigs, as a worker shares one engine among its devices).
    pub fn on_engine(
        cfg: &DeviceConfig,
        handler: Arc<dyn Handler>,
        sim_cfg: SimConfig,
        engine: &Engine,
    ) -> Rig {
        let (sim, dev) = KernelSim::new(sim_cfg).unwrap();
        let map = Mapping::map(dev.map_fd.as_fd(), dev.map_len).unwrap();
        let ring = Ring::new(map).unwrap();
        let emu = Arc::new(Emulator::new(cfg, handler));
        let runner = engine
            .start(
                cfg.name.clone(),
                ring,
                dev.event_fd,
                emu.clone(),
                Box::new(|r| assert!(r.is_ok(), "device ended with {r:?}")),
            )
            .unwrap();
        Rig {
            sim,
            emu,
            runner: Some(runner),
        }
    }

    /// Runs every command `(cdb, data_out, data_in_len)`, keeping as many in flight as the ring
    /// allows, and returns their completions in submission order. Fails unless the ring is
    /// drained at the end.
    pub fn run(&mut self, cmds: &[(Vec<u8>, Vec<u8>, usize)]) -> Vec<Completed> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut results: Vec<Option<Completed>> = vec![None; cmds.len()];
        let mut by_id: HashMap<u16, usize> = HashMap::new();
        let mut next = 0;
        while results.iter().any(Option::is_none) {
            assert!(
                Instant::now() < deadline,
                "commands did not complete in time"
            );
            let mut queued = false;
            while next < cmds.len() {
                let (cdb, out, in_len) = &cmds[next];
                match self.sim.submit(cdb, out, *in_len) {
                    Ok(id) => {
                        assert!(
                            by_id.insert(id, next).is_none(),
                            "cmd_id {id} reused while in flight"
                        );
                        next += 1;
                        queued = true;
                    }
                    Err(SimError::Full) => break,
                    Err(e) => panic!("submit: {e}"),
                }
            }
            if queued {
                self.sim.kick().unwrap();
            }
            self.sim.wait_notified(Duration::from_millis(200)).unwrap();
            for c in self.sim.reap().unwrap() {
                let idx = by_id
                    .remove(&c.cmd_id)
                    .expect("completion for a command not in flight");
                assert!(results[idx].is_none(), "command completed twice");
                results[idx] = Some(c);
            }
        }
        assert!(
            self.sim.is_drained(),
            "ring not drained after all completions"
        );
        results.into_iter().map(Option::unwrap).collect()
    }

    /// Takes the runtime out, for a test that stops it itself (the rig then stops nothing when
    /// dropped). `None` when it was taken already.
    pub fn take_runner(&mut self) -> Option<DeviceRunner> {
        self.runner.take()
    }

    /// Runs one command and returns its completion.
    pub fn one(&mut self, cdb: &[u8], out: &[u8], in_len: usize) -> Completed {
        self.run(&[(cdb.to_vec(), out.to_vec(), in_len)]).remove(0)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(r) = self.runner.take() {
            r.stop().unwrap();
        }
    }
}

/// The (sense key, additional sense code, qualifier) of a CHECK CONDITION, from fixed- or
/// descriptor-format sense data. Fails on any other status.
pub fn sense_triple(c: &Completed) -> (u8, u8, u8) {
    assert_eq!(
        c.status, 0x02,
        "expected CHECK CONDITION, got status {:#x}",
        c.status
    );
    let s = &c.sense;
    match s[0] & 0x7f {
        0x70 | 0x71 => (s[2] & 0x0f, s[12], s[13]),
        0x72 | 0x73 => (s[1] & 0x0f, s[2], s[3]),
        other => panic!("bad sense response code {other:#x}"),
    }
}
