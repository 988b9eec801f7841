//! The example handler as an operator runs it, under the default jail (stage one applied by the
//! supervisor before `exec`, stage two entered by `worker_main` with the allow-list the
//! factory declares), serving two `zero` devices on the kernel simulator's rings: one blocking
//! (cfgstring empty), one asynchronous (cfgstring `async`). Each device passes INQUIRY, READ
//! CAPACITY, a WRITE whose data is discarded, READs of zeros and a READ past the end.
//! - The real supervisor ([`Supervisor`]) finds the devices in a fake sysfs tree, admits them
//!   against a configuration whose `[handler.zero]` section names the example's executable as
//!   `exe`, starts it, hands the devices over, and shuts it down.
//! - The supervisor's spawn path ([`WorkerProcess::spawn`]) starts the executable with this
//!   test in the supervisor's place in the conversation: `Hello`, `AddDevice`, `Ping` (the
//!   counters), `RemoveDevice`, `Shutdown`.
//!
//! A system call missing from the allow-lists kills the worker with SIGSYS, and the failure
//! names the call when the kernel log has it.
//!
//! The simulator's memfd stands in for `/dev/uioN` as one descriptor, as the protocol passes
//! it: it maps as the ring; as an event source a memfd is always readable, so the worker's ring
//! thread polls continuously while a device is served here (the test is short), and its 4-byte
//! notifications land past the end of the map, where they change nothing. The simulator finds
//! the answers in the ring either way. The real UIO node's blocking wake-ups are covered by the
//! VM suite.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use tcmu_warden_policy::JailSettings;
use tcmu_warden_policy::jail::JailSpec;
use tcmu_warden_proto::{DeviceFds, DeviceSpec, FromWorker, JournalMode, ToWorker};
use tcmu_warden_supervisor::config::Config;
use tcmu_warden_supervisor::daemon::{DevicePhase, Options, Supervisor};
use tcmu_warden_supervisor::discovery::fake::FakeDevice;
use tcmu_warden_supervisor::jail;
use tcmu_warden_supervisor::worker::{WorkerProcess, describe_exit};
use tcmu_warden_tests::{Completed, KernelSim, SimConfig, SimDevice, sense_triple};

const BS: u32 = 512;
const BLOCKS: u64 = 2048;
const DEADLINE: Duration = Duration::from_secs(120);

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn spec(id: u64, cfgstring: &str, dev: &SimDevice) -> DeviceSpec {
    DeviceSpec {
        id,
        uio: format!("uio{id}"),
        hba: 1,
        name: format!("zero{id}"),
        subtype: "zero".into(),
        cfgstring: cfgstring.into(),
        map_size: dev.map_len as u64,
        dev_size: BLOCKS * u64::from(BS),
        block_size: BS,
        max_sectors: 128,
        write_cache: false,
        unit_serial: format!("zero-serial-{id}"),
        has_backing_fd: false,
        refusal: None,
        journal: JournalMode::None,
    }
}

/// The worker's next message, waiting (bounded) for it.
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

/// Runs one command to completion (bounded wait) and returns it.
fn one(sim: &mut KernelSim, cdb: &[u8], out: &[u8], in_len: usize) -> Completed {
    let id = sim.submit(cdb, out, in_len).unwrap();
    sim.kick().unwrap();
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(c) = sim.reap().unwrap().into_iter().find(|c| c.cmd_id == id) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "command {:#04x} never completed",
            cdb[0]
        );
        sim.wait_notified(Duration::from_millis(10)).unwrap();
    }
}

fn rw10(op: u8, lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![op, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn read16(lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = vec![0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// The round trip every `zero` device passes, whichever shape serves its READs.
fn exercise(sim: &mut KernelSim, what: &str) {
    let inq = one(sim, &[0x12, 0, 0, 0, 96, 0], &[], 96);
    assert_eq!(inq.status, 0, "{what}: INQUIRY");
    assert_eq!(inq.data_in[0] & 0x1f, 0, "{what}: a disk");
    let rc = one(sim, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    assert_eq!(rc.status, 0, "{what}: READ CAPACITY(10)");
    assert_eq!(
        u32::from_be_bytes(rc.data_in[0..4].try_into().unwrap()),
        BLOCKS as u32 - 1
    );
    // Written data is discarded: it reads back as zeros (the simulator poisons data-in first).
    let pattern: Vec<u8> = (0..8 * BS).map(|i| (i % 251) as u8 | 1).collect();
    let w = one(sim, &rw10(0x2a, 16, 8), &pattern, 0);
    assert_eq!(w.status, 0, "{what}: WRITE(10)");
    let r = one(sim, &rw10(0x28, 16, 8), &[], pattern.len());
    assert_eq!(r.status, 0, "{what}: READ(10)");
    assert_eq!(r.data_in, vec![0u8; pattern.len()], "{what}: READ(10) data");
    let r = one(sim, &read16(BLOCKS - 4, 4), &[], 4 * BS as usize);
    assert_eq!(r.status, 0, "{what}: READ(16)");
    assert_eq!(
        r.data_in,
        vec![0u8; 4 * BS as usize],
        "{what}: READ(16) data"
    );
    // Past the end: ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE.
    let r = one(sim, &rw10(0x28, BLOCKS as u32 - 1, 2), &[], 2 * BS as usize);
    assert_eq!(
        sense_triple(&r),
        (0x05, 0x21, 0x00),
        "{what}: READ past the end"
    );
}

#[test]
fn the_example_handler_serves_scsi_under_the_default_jail() {
    if !root() {
        eprintln!("needs root (namespaces, capability drops); skipping");
        return;
    }
    let exe = Path::new(env!("CARGO_BIN_EXE_tcmu-warden-zero"));
    let prepared = jail::prepare(&JailSpec::new(exe, &JailSettings::default(), &[])).unwrap();
    let started = prepared.status.prepared_at;
    let mut worker = WorkerProcess::spawn(exe, "zero", None, Some(prepared.stage_one)).unwrap();
    let pid = worker.pid();

    worker
        .send(&ToWorker::Hello {
            worker: "zero".into(),
            subtypes: vec!["zero".into()],
            jail: Some(prepared.stage_two.clone()),
        })
        .unwrap();
    match recv(&worker) {
        FromWorker::Hello { subtypes, .. } => assert_eq!(subtypes, vec!["zero".to_owned()]),
        other => panic!("expected Hello, got {other:?}"),
    }

    let (mut blocking, blocking_dev) = KernelSim::new(SimConfig::default()).unwrap();
    let (mut asynchronous, async_dev) = KernelSim::new(SimConfig::default()).unwrap();
    for (id, cfgstring, dev) in [(1, "", &blocking_dev), (2, "async", &async_dev)] {
        worker
            .send_device(
                &spec(id, cfgstring, dev),
                &DeviceFds {
                    uio: dev.map_fd.as_fd(),
                    backing: None,
                    journal: None,
                },
            )
            .unwrap();
        assert_eq!(recv(&worker), FromWorker::DeviceReady { id });
    }
    exercise(&mut blocking, "blocking");
    exercise(&mut asynchronous, "async");

    worker.send(&ToWorker::Ping { seq: 1 }).unwrap();
    match recv(&worker) {
        FromWorker::Pong { seq: 1, stats } => {
            assert_eq!(stats.len(), 2);
            for s in stats {
                assert_eq!((s.commands, s.errors), (6, 1), "device {}", s.id);
            }
        }
        other => panic!("expected Pong, got {other:?}"),
    }
    for id in [1, 2] {
        worker.send(&ToWorker::RemoveDevice { id }).unwrap();
        assert_eq!(recv(&worker), FromWorker::DeviceRemoved { id });
    }
    assert!(blocking.is_drained() && asynchronous.is_drained());
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
            "the zero worker was killed by seccomp: {}",
            jail::kernel_log_violation(pid, started, Duration::from_secs(1))
                .unwrap_or_else(|| "system call not named".into())
        );
    }
    assert!(status.success(), "zero worker: {}", describe_exit(status));
}

/// Waits (bounded) for `done`, turning the supervisor's event loop meanwhile.
fn turn_until(sup: &mut Supervisor, what: &str, mut done: impl FnMut(&Supervisor) -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done(sup) {
        assert!(
            Instant::now() < deadline,
            "{what}: not after {DEADLINE:?}\n{:#?}",
            sup.workers()
        );
        sup.poll_once(Duration::from_millis(20)).unwrap();
    }
}

#[test]
fn the_supervisor_runs_the_example_from_its_handler_section_under_the_default_jail() {
    if !root() {
        eprintln!("needs root (namespaces, capability drops); skipping");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root_dir = tmp.path().canonicalize().unwrap();
    let (sysfs, dev_root, journals) = (
        root_dir.join("sys"),
        root_dir.join("dev"),
        root_dir.join("journal"),
    );
    for d in [&sysfs, &dev_root, &journals] {
        std::fs::create_dir_all(d).unwrap();
    }
    // Two `zero` devices on simulated rings: `dev_config=zero/` (blocking) and `zero/async`.
    let (mut blocking, blocking_dev) = KernelSim::new(SimConfig::default()).unwrap();
    let (mut asynchronous, async_dev) = KernelSim::new(SimConfig::default()).unwrap();
    for (uio, name, dev_config, dev) in [
        ("uio0", "zero-blocking", "zero/", &blocking_dev),
        ("uio1", "zero-async", "zero/async", &async_dev),
    ] {
        let map_size = dev.map_len.to_string();
        let mut fake = FakeDevice::new(uio, 1, name, Some(dev_config));
        fake.map_size = &map_size;
        fake.dev_size = BLOCKS * u64::from(BS);
        fake.write(&sysfs).unwrap();
        // The supervisor opens `dev_root/uioN`: here, the simulator's memfd again.
        std::os::unix::fs::symlink(
            format!("/proc/self/fd/{}", dev.map_fd.as_raw_fd()),
            dev_root.join(uio),
        )
        .unwrap();
    }
    let exe = Path::new(env!("CARGO_BIN_EXE_tcmu-warden-zero"));
    let text = format!(
        "[daemon]\nsysfs_root = {:?}\ndev_root = {:?}\njournal_dir = {:?}\n\
         [handler.zero]\nexe = {:?}\n",
        sysfs.display().to_string(),
        dev_root.display().to_string(),
        journals.display().to_string(),
        exe.display().to_string(),
    );
    let config = Config::from_toml_str(&text, Path::new("zero.toml")).unwrap();
    let mut opts = Options::from_config(&config).unwrap();
    opts.handshake_timeout = Duration::from_secs(60);
    opts.reply_timeout = Duration::from_secs(60);
    opts.shutdown_timeout = Duration::from_secs(30);
    let mut sup = Supervisor::new(config, opts).unwrap();
    sup.start().unwrap();
    turn_until(&mut sup, "both devices served", |s| {
        ["uio0", "uio1"].iter().all(|u| {
            s.device_by_uio(u)
                .is_some_and(|d| d.phase == DevicePhase::Ready)
        })
    });
    let workers = sup.workers();
    assert_eq!(workers.len(), 1, "{workers:#?}");
    assert_eq!(workers[0].supported, Some(vec!["zero".to_owned()]));
    let (name, pid) = (workers[0].name.clone(), workers[0].pid);

    exercise(&mut blocking, "blocking");
    exercise(&mut asynchronous, "async");
    assert!(blocking.is_drained() && asynchronous.is_drained());

    sup.begin_shutdown();
    turn_until(&mut sup, "shutdown", Supervisor::is_finished);
    if let Some(w) = sup.worker(&name) {
        if let Some(status) = w.exit {
            assert_ne!(
                status.signal(),
                Some(libc::SIGSYS),
                "the zero worker (pid {pid}) was killed by seccomp: {:?}",
                w.jail.as_ref().and_then(|j| j.violation.clone())
            );
            assert!(status.success(), "zero worker: {}", describe_exit(status));
        }
        assert!(w.last_crash.is_none(), "{:?}", w.last_crash);
    }
}

#[test]
fn cfgstrings_other_than_empty_or_async_are_refused() {
    use tcmu_warden_sdk::{DeviceConfig, HandlerFactory};
    use tcmu_warden_zero::ZeroFactory;
    let mut dev = DeviceConfig {
        name: "z".into(),
        subtype: "zero".into(),
        cfgstring: "fast".into(),
        dev_size: 1 << 20,
        block_size: 512,
        max_sectors: 128,
        write_cache: false,
        unit_serial: "s".into(),
    };
    let err = ZeroFactory.open(&dev, None).err().unwrap();
    assert!(err.to_string().contains("\"fast\""), "{err}");
    dev.cfgstring = "async".into();
    assert_eq!(
        ZeroFactory.open(&dev, None).unwrap().implemented_opcodes(),
        &[0x28, 0x88]
    );
    dev.cfgstring = String::new();
    assert!(
        ZeroFactory
            .open(&dev, None)
            .unwrap()
            .implemented_opcodes()
            .is_empty()
    );
}
