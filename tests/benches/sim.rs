//! # The simulator bench: the worker's data path without a kernel
//!
//! Drives the worker's real device runtime (ring engine, I/O threads, SCSI emulation) through the
//! kernel simulator of this crate ([`tcmu_warden_tests::sim`], wired by [`Rig`]) with 4 KiB
//! random READ(10)s, closed loop: each device always has `qd` commands queued (the *queue
//! depth*). It measures:
//! - per handler (`ram`, and `null`: a handler defined here that reads zeros and discards
//!   writes, so that only the ring, threading and SCSI costs remain) and queue depth 1, 32 and
//!   128 on one device: commands per second (wall clock), commands per CPU-second (all the
//!   process's threads: the worker runtime AND the simulated kernel driving it, so it is a
//!   lower bound for the worker alone), CPU nanoseconds per command, and the latency from
//!   queueing a command to reaping its completion (p50/p99/p99.9);
//! - with 1, 8, 64 and 256 devices (`ram`, queue depth 32 each): the aggregate figures and the
//!   process's thread count;
//! - at scale (`SIM_BENCH_SCALE`, default 1000 devices; `null` handler, 1 MiB data area each):
//!   the time to attach each device, the worker-side resident memory per idle device (the
//!   process's RSS growth over the attach, the simulator's ring pages included, so an upper
//!   bound), the thread count, and the aggregate figures at queue depth 1 per device.
//!
//! Every device of a case is served by one shared [`Engine`] (one event loop and one I/O pool of
//! `SIM_BENCH_IO_THREADS` threads), as a worker serves its devices.
//!
//! The simulated kernel is one driver thread. With one device it blocks on the device's event
//! fd between completions as the kernel's waiter would; with several it polls every ring in
//! turn (yielding when a pass found nothing), so its own CPU time grows with the device count.
//!
//! Run: `cargo bench -p tcmu-warden-tests --bench sim` (`-- --quick` for a short smoke run).
//! Knobs (environment): `SIM_BENCH_SECS` (measured seconds per case, default 3; quick 0.5),
//! `SIM_BENCH_WARMUP_MS` (default 300), `SIM_BENCH_QDS` (default "1 32 128"),
//! `SIM_BENCH_DEVICES` (default "1 8 64 256"; quick "1 8"), `SIM_BENCH_MULTI_QD` (32),
//! `SIM_BENCH_IO_THREADS` (threads of the engine's I/O pool, default the runtime's default),
//! `SIM_BENCH_SCALE` (devices of the scale case, default 1000; 0 skips it),
//! `SIM_BENCH_JSON` (also write the results there as JSON).
//!
//! Not a test: `harness = false` and `test = false` in Cargo.toml keep it out of `cargo test`.
//! Speed targets are compared in BENCHMARKS.md, never asserted.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tcmu_warden_tests::{Rig, SimConfig};
use tcmu_warden_worker::handler::ram::RamHandler;
use tcmu_warden_worker::handler::{DeviceConfig, Handler};
use tcmu_warden_worker::runtime::{DeviceOptions, Engine};

const BS: u32 = 512;
const IO: usize = 4096;

/// Reads zeros, discards writes: the data path with no storage behind it.
struct NullHandler;

impl Handler for NullHandler {
    fn nonblocking(&self) -> bool {
        true
    }
    fn read(&self, _offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        for b in bufs.iter_mut() {
            b.fill(0);
        }
        Ok(())
    }
    fn write(&self, _offset: u64, _bufs: &[IoSlice<'_>], _durable: bool) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Ram,
    Null,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Ram => "ram",
            Kind::Null => "null",
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split_whitespace()
        .map(|w| {
            w.parse()
                .unwrap_or_else(|_| panic!("{name}: {w} is not a number"))
        })
        .collect()
}

/// A device of `size` bytes served by `kind`; a `ram` device is written in full first, so that
/// reads copy real memory rather than the zeros of unallocated chunks.
fn device(kind: Kind, i: usize, size: u64, engine: &Engine) -> Rig {
    device_with(kind, i, size, engine, 4 << 20)
}

fn device_with(kind: Kind, i: usize, size: u64, engine: &Engine, data_size: usize) -> Rig {
    let cfg = DeviceConfig {
        name: format!("bench{i}"),
        subtype: kind.name().into(),
        cfgstring: String::new(),
        dev_size: size,
        block_size: BS,
        max_sectors: 128,
        write_cache: true,
        unit_serial: format!("bench-serial-{i}"),
    };
    let handler: Arc<dyn Handler> = match kind {
        Kind::Null => Arc::new(NullHandler),
        Kind::Ram => {
            let ram = RamHandler::new(size);
            let chunk = vec![0x5au8; 1 << 20];
            let mut off = 0;
            while off < size {
                let n = (size - off).min(chunk.len() as u64) as usize;
                ram.write(off, &[IoSlice::new(&chunk[..n])], false).unwrap();
                off += n as u64;
            }
            Arc::new(ram)
        }
    };
    let sim = SimConfig {
        data_size,
        ..SimConfig::default()
    };
    Rig::on_engine(&cfg, handler, sim, engine)
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// xorshift64*: random 4 KiB-aligned offsets, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we own; RUSAGE_SELF is always valid.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

struct Outcome {
    cmds: u64,
    wall: Duration,
    cpu: Duration,
    lat_ns: Vec<u64>,
    threads: usize,
}

/// Keeps `qd` reads queued on every device for `warmup + secs`; counts what completes in the
/// measured window.
fn drive(
    devs: &mut [Rig],
    dev_size: u64,
    qd: usize,
    warmup: Duration,
    secs: Duration,
    seed: u64,
) -> Outcome {
    let mut rng = Rng(seed | 1);
    let ios = dev_size / IO as u64;
    let mut pending: Vec<HashMap<u16, Instant>> =
        devs.iter().map(|_| HashMap::with_capacity(qd)).collect();
    let start = Instant::now();
    let t0 = start + warmup;
    let t_end = t0 + secs;
    let mut cpu0 = None;
    let mut lat_ns = Vec::new();
    let mut cmds = 0u64;
    let mut threads_seen = 0;
    let single = devs.len() == 1;
    loop {
        let now = Instant::now();
        if cpu0.is_none() && now >= t0 {
            cpu0 = Some(cpu_time());
            threads_seen = threads();
        }
        let stopping = now >= t_end;
        if stopping && pending.iter().all(HashMap::is_empty) {
            break;
        }
        for (i, dev) in devs.iter_mut().enumerate() {
            let mut queued = false;
            while !stopping && pending[i].len() < qd {
                let lba = (rng.next() % ios) * (IO as u64 / u64::from(BS));
                let cdb = read10(lba as u32, (IO / BS as usize) as u16);
                match dev.sim.submit(&cdb, &[], IO) {
                    Ok(id) => {
                        pending[i].insert(id, Instant::now());
                        queued = true;
                    }
                    Err(tcmu_warden_tests::SimError::Full) => break,
                    Err(e) => panic!("submit: {e}"),
                }
            }
            if queued {
                dev.sim.kick().unwrap();
            }
        }
        let mut progress = false;
        for (i, dev) in devs.iter_mut().enumerate() {
            dev.sim.wait_notified(Duration::ZERO).unwrap();
            let done = dev.sim.reap().unwrap();
            let now = Instant::now();
            for c in done {
                progress = true;
                assert_eq!(c.status, 0, "READ failed: {:?}", c.sense);
                let at = pending[i].remove(&c.cmd_id).expect("unknown completion");
                if at >= t0 && now <= t_end {
                    cmds += 1;
                    lat_ns.push((now - at).as_nanos() as u64);
                }
            }
        }
        if !progress {
            if single {
                devs[0]
                    .sim
                    .wait_notified(Duration::from_millis(50))
                    .unwrap();
            } else {
                std::thread::yield_now();
            }
        }
    }
    let cpu = cpu_time() - cpu0.unwrap_or_default();
    lat_ns.sort_unstable();
    Outcome {
        cmds,
        wall: secs,
        cpu,
        lat_ns,
        threads: threads_seen,
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p / 100.0).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

struct Row {
    handler: &'static str,
    devices: usize,
    qd: usize,
    o: Outcome,
}

impl Row {
    fn per_s(&self) -> f64 {
        self.o.cmds as f64 / self.o.wall.as_secs_f64()
    }
    fn per_cpu_s(&self) -> f64 {
        self.o.cmds as f64 / self.o.cpu.as_secs_f64().max(1e-9)
    }
    fn ns_per_cmd(&self) -> f64 {
        self.o.cpu.as_nanos() as f64 / (self.o.cmds.max(1)) as f64
    }
    fn line(&self) -> String {
        format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.1} / {:.1} / {:.1} | {} |",
            self.handler,
            self.devices,
            self.qd,
            self.per_s(),
            self.per_cpu_s(),
            self.ns_per_cmd(),
            self.o.cpu.as_secs_f64() / self.o.wall.as_secs_f64(),
            pct(&self.o.lat_ns, 50.0),
            pct(&self.o.lat_ns, 99.0),
            pct(&self.o.lat_ns, 99.9),
            self.o.threads,
        )
    }
    fn json(&self) -> String {
        format!(
            "{{\"handler\":\"{}\",\"devices\":{},\"qd\":{},\"cmds\":{},\"wall_s\":{:.3},\"cpu_s\":{:.3},\"cmds_per_s\":{:.0},\"cmds_per_cpu_s\":{:.0},\"cpu_ns_per_cmd\":{:.0},\"p50_us\":{:.2},\"p99_us\":{:.2},\"p99_9_us\":{:.2},\"threads\":{}}}",
            self.handler,
            self.devices,
            self.qd,
            self.o.cmds,
            self.o.wall.as_secs_f64(),
            self.o.cpu.as_secs_f64(),
            self.per_s(),
            self.per_cpu_s(),
            self.ns_per_cmd(),
            pct(&self.o.lat_ns, 50.0),
            pct(&self.o.lat_ns, 99.0),
            pct(&self.o.lat_ns, 99.9),
            self.o.threads,
        )
    }
}

const HEADER: &str = "| handler | devices | QD per device | cmds/s | cmds per CPU-s | CPU ns/cmd | CPUs busy | latency p50 / p99 / p99.9 (µs) | threads |\n|---|---|---|---|---|---|---|---|---|";

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let secs = Duration::from_secs_f64(env_or("SIM_BENCH_SECS", if quick { 0.5 } else { 3.0 }));
    let warmup = Duration::from_millis(env_or("SIM_BENCH_WARMUP_MS", 300));
    let qds = env_list("SIM_BENCH_QDS", "1 32 128");
    let counts = env_list(
        "SIM_BENCH_DEVICES",
        if quick { "1 8" } else { "1 8 64 256" },
    );
    let multi_qd: usize = env_or("SIM_BENCH_MULTI_QD", 32);
    let io_threads: usize = env_or("SIM_BENCH_IO_THREADS", DeviceOptions::default().io_threads);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "sim bench: 4 KiB random READ(10), {} s per case after {} ms warm-up, one engine per case (event loop + {io_threads} I/O threads), {cpus} CPUs",
        secs.as_secs_f64(),
        warmup.as_millis()
    );
    let mut rows = Vec::new();

    println!("\nOne device, by queue depth (64 MiB device):\n\n{HEADER}");
    for kind in [Kind::Ram, Kind::Null] {
        for &qd in &qds {
            let engine = Engine::new(DeviceOptions { io_threads }).unwrap();
            let mut devs = vec![device(kind, 0, 64 << 20, &engine)];
            let o = drive(
                &mut devs,
                64 << 20,
                qd,
                warmup,
                secs,
                0x9e37_79b9 + qd as u64,
            );
            drop(devs);
            let row = Row {
                handler: kind.name(),
                devices: 1,
                qd,
                o,
            };
            println!("{}", row.line());
            rows.push(row);
        }
    }

    println!(
        "\nMany devices, `ram`, queue depth {multi_qd} each (4 MiB per device; aggregate figures):\n\n{HEADER}"
    );
    for &n in &counts {
        let engine = Engine::new(DeviceOptions { io_threads }).unwrap();
        let mut devs: Vec<Rig> = (0..n)
            .map(|i| device(Kind::Ram, i, 4 << 20, &engine))
            .collect();
        let o = drive(
            &mut devs,
            4 << 20,
            multi_qd,
            warmup,
            secs,
            0x51ed_270b + n as u64,
        );
        drop(devs);
        let row = Row {
            handler: "ram",
            devices: n,
            qd: multi_qd,
            o,
        };
        println!("{}", row.line());
        rows.push(row);
    }

    let scale: usize = env_or("SIM_BENCH_SCALE", if quick { 0 } else { 1000 });
    if scale > 0 {
        println!(
            "\nScale: {scale} devices, `null`, queue depth 1 each (1 MiB device, 1 MiB data area):\n"
        );
        let engine = Engine::new(DeviceOptions { io_threads }).unwrap();
        let rss0 = rss_kib();
        let t = Instant::now();
        let mut devs: Vec<Rig> = (0..scale)
            .map(|i| device_with(Kind::Null, i, 1 << 20, &engine, 1 << 20))
            .collect();
        let attach = t.elapsed();
        // Let every device's first wake-up settle, then measure the idle process.
        std::thread::sleep(Duration::from_millis(300));
        let rss1 = rss_kib();
        let idle_threads = threads();
        let cpu_idle0 = cpu_time();
        std::thread::sleep(Duration::from_secs(1));
        let idle_cpu = cpu_time() - cpu_idle0;
        println!(
            "- attach: {:.1} µs per device ({scale} in {:.2} s, simulator setup included)\n- RSS per idle device: {:.1} KiB ({} KiB over {scale} devices, simulator rings included)\n- threads while idle: {idle_threads}; CPU while idle: {:.1} ms in 1 s\n",
            attach.as_secs_f64() * 1e6 / scale as f64,
            attach.as_secs_f64(),
            rss1.saturating_sub(rss0) as f64 / scale as f64,
            rss1.saturating_sub(rss0),
            idle_cpu.as_secs_f64() * 1e3,
        );
        let o = drive(&mut devs, 1 << 20, 1, warmup, secs, 0x2545_f491);
        drop(devs);
        let row = Row {
            handler: "null",
            devices: scale,
            qd: 1,
            o,
        };
        println!("{HEADER}\n{}", row.line());
        rows.push(row);
    }

    if let Ok(path) = std::env::var("SIM_BENCH_JSON") {
        let body: Vec<String> = rows.iter().map(Row::json).collect();
        std::fs::write(&path, format!("[\n{}\n]\n", body.join(",\n")))
            .unwrap_or_else(|e| panic!("writing {path}: {e}"));
        println!("\nwrote {path}");
    }
}
