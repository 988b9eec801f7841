//! The `nbd` worker as an operator runs it: the supervisor's spawn path starts
//! `tcmu-warden-nbd` under the default jail plus `network = "tcp"` with the server's port
//! (stage one applied before `exec`, stage two entered by `worker_main` with the factory's
//! allow-list), against a real `nbdkit` (file plugin), and SCSI commands go through the kernel
//! simulator's ring: INQUIRY, READ CAPACITY, WRITE(10) with and without FUA, READ(10),
//! SYNCHRONIZE CACHE, UNMAP, many commands in flight, and the data on disk afterwards. A
//! device with a cfgstring the handler refuses, and one larger than the export, fail with the
//! reason.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::net::TcpListener;
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tcmu_warden_policy::jail::JailSpec;
use tcmu_warden_policy::{JailSettings, Network};
use tcmu_warden_proto::{DeviceFds, DeviceSpec, FromWorker, JournalMode, ToWorker};
use tcmu_warden_supervisor::jail;
use tcmu_warden_supervisor::worker::{WorkerProcess, describe_exit};
use tcmu_warden_tests::{Completed, KernelSim, SimConfig, SimDevice, sense_triple};

const BS: u32 = 512;
const BLOCKS: u64 = 8192; // 4 MiB
const DEADLINE: Duration = Duration::from_secs(60);

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spec(id: u64, cfgstring: &str, dev: &SimDevice, blocks: u64) -> DeviceSpec {
    DeviceSpec {
        id,
        uio: format!("uio{id}"),
        hba: 1,
        name: format!("nbd{id}"),
        subtype: "nbd".into(),
        cfgstring: cfgstring.into(),
        map_size: dev.map_len as u64,
        dev_size: blocks * u64::from(BS),
        block_size: BS,
        max_sectors: 128,
        write_cache: false,
        unit_serial: format!("nbd-serial-{id}"),
        has_backing_fd: false,
        refusal: None,
        journal: JournalMode::None,
    }
}

fn recv(worker: &WorkerProcess) -> FromWorker {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(msg) = worker.recv().unwrap() {
            return msg;
        }
        assert!(Instant::now() < deadline, "the worker did not answer");
        let fd = worker.channel().unwrap().fd();
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
    }
}

/// Submits every command, kicks once, and waits (bounded) for all of them.
fn run(sim: &mut KernelSim, cmds: &[(Vec<u8>, Vec<u8>, usize)]) -> Vec<Completed> {
    let ids: Vec<_> = cmds
        .iter()
        .map(|(cdb, out, in_len)| sim.submit(cdb, out, *in_len).unwrap())
        .collect();
    sim.kick().unwrap();
    let mut done: Vec<Completed> = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while done.len() < ids.len() {
        done.extend(sim.reap().unwrap());
        assert!(Instant::now() < deadline, "commands never completed");
        sim.wait_notified(Duration::from_millis(10)).unwrap();
    }
    ids.iter()
        .map(|id| done.iter().find(|c| c.cmd_id == *id).unwrap().clone())
        .collect()
}

fn one(sim: &mut KernelSim, cdb: &[u8], out: &[u8], in_len: usize) -> Completed {
    run(sim, &[(cdb.to_vec(), out.to_vec(), in_len)]).remove(0)
}

fn rw10(op: u8, lba: u32, blocks: u16, fua: bool) -> Vec<u8> {
    let mut c = vec![op, if fua { 0x08 } else { 0 }, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((seed as usize * 31 + i * 7) % 251) as u8 | 1)
        .collect()
}

#[test]
fn the_nbd_worker_serves_scsi_from_nbdkit_under_the_jail() {
    if !root() {
        eprintln!("needs root (namespaces, capability drops); skipping");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(BLOCKS * u64::from(BS))
        .unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _server = Server(
        Command::new("nbdkit")
            .args([
                "--foreground",
                "--exit-with-parent",
                "-i",
                "127.0.0.1",
                "-p",
            ])
            .arg(port.to_string())
            .arg("file")
            .arg(format!("file={}", img.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("nbdkit is installed (tests/vm/setup-host.sh)"),
    );
    let deadline = Instant::now() + DEADLINE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nbdkit did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    let exe = Path::new(env!("CARGO_BIN_EXE_tcmu-warden-nbd"));
    let settings = JailSettings {
        network: Network::Tcp {
            connect_ports: vec![port],
        },
        ..JailSettings::default()
    };
    let prepared = jail::prepare(&JailSpec::new(exe, &settings, &[])).unwrap();
    let started = prepared.status.prepared_at;
    let mut worker = WorkerProcess::spawn(exe, "nbd", None, Some(prepared.stage_one)).unwrap();
    let pid = worker.pid();
    worker
        .send(&ToWorker::Hello {
            worker: "nbd".into(),
            subtypes: vec!["nbd".into()],
            jail: Some(prepared.stage_two.clone()),
        })
        .unwrap();
    match recv(&worker) {
        FromWorker::Hello { subtypes, .. } => assert_eq!(subtypes, vec!["nbd".to_owned()]),
        other => panic!("expected Hello, got {other:?}"),
    }

    let uri = format!("nbd://127.0.0.1:{port}/");
    let (mut sim, dev) = KernelSim::new(SimConfig::default()).unwrap();
    let send = |worker: &mut WorkerProcess, s: &DeviceSpec, dev: &SimDevice| {
        worker
            .send_device(
                s,
                &DeviceFds {
                    uio: dev.map_fd.as_fd(),
                    backing: None,
                    journal: None,
                },
            )
            .unwrap();
    };
    // Refused: a cfgstring the handler does not take, and a device larger than the export.
    let (_bad_sim, bad_dev) = KernelSim::new(SimConfig::default()).unwrap();
    for (id, cfg, blocks, why) in [
        (7, "nbds://127.0.0.1/x".to_owned(), BLOCKS, "TLS"),
        (8, uri.clone(), BLOCKS * 2, "the export only"),
    ] {
        send(&mut worker, &spec(id, &cfg, &bad_dev, blocks), &bad_dev);
        match recv(&worker) {
            FromWorker::DeviceFailed { id: got, reason } => {
                assert_eq!(got, id);
                assert!(reason.contains(why), "{reason}");
            }
            other => panic!("expected DeviceFailed for {cfg}, got {other:?}"),
        }
    }

    send(&mut worker, &spec(1, &uri, &dev, BLOCKS), &dev);
    assert_eq!(recv(&worker), FromWorker::DeviceReady { id: 1 });

    let inq = one(&mut sim, &[0x12, 0, 0, 0, 96, 0], &[], 96);
    assert_eq!(inq.status, 0, "INQUIRY");
    let rc = one(&mut sim, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    assert_eq!(rc.status, 0, "READ CAPACITY(10)");
    assert_eq!(
        u32::from_be_bytes(rc.data_in[0..4].try_into().unwrap()),
        BLOCKS as u32 - 1
    );
    // WRITE with and without FUA, READ back, SYNCHRONIZE CACHE.
    let a = pattern(1, 8 * BS as usize);
    let b = pattern(2, 8 * BS as usize);
    assert_eq!(one(&mut sim, &rw10(0x2a, 16, 8, true), &a, 0).status, 0);
    assert_eq!(one(&mut sim, &rw10(0x2a, 32, 8, false), &b, 0).status, 0);
    let r = one(&mut sim, &rw10(0x28, 16, 8, false), &[], a.len());
    assert_eq!((r.status, &r.data_in), (0, &a), "READ(10) of the FUA write");
    let r = one(&mut sim, &rw10(0x28, 32, 8, false), &[], b.len());
    assert_eq!((r.status, &r.data_in), (0, &b), "READ(10)");
    let sync = one(&mut sim, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(sync.status, 0, "SYNCHRONIZE CACHE(10)");
    // UNMAP blocks 32..40: the file plugin takes WRITE_ZEROES, so they read as zeros.
    let mut param = vec![0u8; 24];
    param[0..2].copy_from_slice(&22u16.to_be_bytes());
    param[2..4].copy_from_slice(&16u16.to_be_bytes());
    param[8..16].copy_from_slice(&32u64.to_be_bytes());
    param[16..20].copy_from_slice(&8u32.to_be_bytes());
    let unmap = one(&mut sim, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &param, 0);
    assert_eq!(unmap.status, 0, "UNMAP: {:?}", sense_triple(&unmap));
    let r = one(&mut sim, &rw10(0x28, 32, 8, false), &[], b.len());
    assert_eq!((r.status, r.data_in), (0, vec![0u8; b.len()]), "unmapped");
    // Past the end.
    let r = one(
        &mut sim,
        &rw10(0x28, BLOCKS as u32 - 1, 2, false),
        &[],
        1024,
    );
    assert_eq!(sense_triple(&r), (0x05, 0x21, 0x00));
    // 32 writes in flight at once, then 32 reads.
    let writes: Vec<_> = (0..32u32)
        .map(|i| {
            (
                rw10(0x2a, 1024 + i * 8, 8, i % 2 == 0),
                pattern(100 + i, 4096),
                0,
            )
        })
        .collect();
    assert!(run(&mut sim, &writes).iter().all(|c| c.status == 0));
    let reads: Vec<_> = (0..32u32)
        .map(|i| (rw10(0x28, 1024 + i * 8, 8, false), Vec::new(), 4096))
        .collect();
    for (i, c) in run(&mut sim, &reads).into_iter().enumerate() {
        assert_eq!(
            (c.status, c.data_in),
            (0, pattern(100 + i as u32, 4096)),
            "block {i}"
        );
    }

    worker.send(&ToWorker::RemoveDevice { id: 1 }).unwrap();
    assert_eq!(recv(&worker), FromWorker::DeviceRemoved { id: 1 });
    assert!(sim.is_drained());
    worker.send(&ToWorker::Shutdown).unwrap();
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = worker.try_reap().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the worker did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    if status.signal() == Some(libc::SIGSYS) {
        panic!(
            "the nbd worker was killed by seccomp: {}",
            jail::kernel_log_violation(pid, started, Duration::from_secs(1))
                .unwrap_or_else(|| "system call not named".into())
        );
    }
    assert!(status.success(), "nbd worker: {}", describe_exit(status));
    // What was written is in the file nbdkit serves.
    let disk = std::fs::read(&img).unwrap();
    assert_eq!(&disk[16 * 512..24 * 512], &a[..]);
    assert_eq!(&disk[32 * 512..40 * 512], &vec![0u8; b.len()][..]);
}
