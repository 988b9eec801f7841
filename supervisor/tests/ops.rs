//! Integration tests of the supervisor's operations side: hot-plug through uevents and the
//! kernel's `TCM-USER` netlink requests, reconfiguration, statistics and the control socket,
//! reload on SIGHUP, draining on SIGTERM and systemd notifications.
//!
//! Like `workers.rs`, this binary is two programs: run by cargo it is a small test runner
//! (`harness = false`); started by the supervisor as a worker (`TCMU_WARDEN_FD` set) it is a fake
//! worker that speaks the real protocol and logs what it received to `<symlink>.log`.
//!
//! There is no kernel here. In-process tests play the kernel on the other end of datagram socket
//! pairs handed to the supervisor (`attach_netlink`, `attach_uevents`), sending byte-exact
//! netlink and uevent messages built by hand in this file and decoding the supervisor's replies
//! by hand too. Binary tests run `tcmu-warden` against a fake sysfs. Every wait polls a
//! condition with a generous deadline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode};
use std::time::{Duration, Instant};

use tcmu_warden_proto::{DeviceFds, DeviceStats, FromWorker, ProtoError, ToWorker};
use tcmu_warden_supervisor::config::Config;
use tcmu_warden_supervisor::control::{self, Request, StatusReport};
use tcmu_warden_supervisor::daemon::{DevicePhase, Options, Supervisor};
use tcmu_warden_supervisor::discovery::fake::FakeDevice;
use tcmu_warden_supervisor::netlink::TcmuNetlink;
use tcmu_warden_supervisor::uevent::{GROUP_KERNEL, UeventSocket};

use common::{
    FakeWorker, Fixture, assert_contains, harness, phase_of, read_all, until, until_ready,
};

fn main() -> ExitCode {
    harness::main(
        fake_worker::main,
        common::tests![
            uevents_add_and_remove_devices,
            set_features_is_sent_first,
            refused_devices_fail_the_configfs_write,
            added_before_its_node_is_served_once_udev_reports_it,
            recreated_device_on_the_same_minor_is_a_new_device,
            size_and_write_cache_changes_reach_the_worker,
            refused_and_failed_reconfigs_are_answered_negatively,
            dev_config_change_reopens_the_device,
            device_failing_during_a_reconfig_is_answered,
            device_failing_while_released_keeps_the_worker,
            reload_applies_to_new_workers_only,
            binary_status_json_shows_devices_workers_and_policy,
            binary_sighup_reloads_and_reports_changes,
            binary_sigterm_drains,
            binary_second_daemon_leaves_the_first_alone,
            binary_notifies_systemd,
        ],
    )
}

// ---- fixture ----------------------------------------------------------------------------------

const FAMILY: u16 = 0x1c;

/// Ops-specific additions: devices with `action/` files, the module parameters, the control
/// socket, and an in-process supervisor with a fake kernel attached.
impl Fixture {
    /// A device in the fake sysfs/configfs (with `action/` files), without its node.
    fn sysfs_device(&self, uio: &str, hba: u32, name: &str, dev_config: &str) {
        let mut fake = FakeDevice::new(uio, hba, name, Some(dev_config));
        fake.dev_size = 1 << 20;
        fake.write(&self.sysfs).unwrap();
        let action = self.configfs(hba, name).join("action");
        fs::create_dir_all(&action).unwrap();
        fs::write(action.join("block_dev"), "").unwrap();
        fs::write(action.join("reset_ring"), "").unwrap();
    }

    fn node(&self, uio: &str) {
        fs::write(self.dev.join(uio), format!("UIO:{uio}")).unwrap();
    }

    fn device(&self, uio: &str, hba: u32, name: &str, dev_config: &str) {
        self.sysfs_device(uio, hba, name, dev_config);
        self.node(uio);
    }

    fn remove(&self, uio: &str) {
        fs::remove_dir_all(self.sysfs.join("class/uio").join(uio)).unwrap();
        fs::remove_file(self.dev.join(uio)).unwrap();
    }

    fn configfs(&self, hba: u32, name: &str) -> PathBuf {
        self.sysfs
            .join("kernel/config/target/core")
            .join(format!("user_{hba}"))
            .join(name)
    }

    fn module_params(&self) {
        let dir = self.sysfs.join("module/target_core_user/parameters");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("block_netlink"), "0").unwrap();
        fs::write(dir.join("reset_netlink"), "0").unwrap();
    }

    fn param(&self, name: &str) -> String {
        fs::read_to_string(
            self.sysfs
                .join("module/target_core_user/parameters")
                .join(name),
        )
        .unwrap()
    }

    fn socket_path(&self) -> PathBuf {
        self.root.join("run/control.sock")
    }

    /// The configuration (see [`Fixture::config_text`]) with a control socket and a drain
    /// timeout.
    fn ops_config(&self, mode: &str, handlers: &str) -> String {
        let daemon = format!(
            "control_socket = {:?}\ndrain_timeout = \"20s\"\n",
            self.socket_path().display().to_string()
        );
        self.config_text(mode, &daemon, handlers)
    }

    fn write_config(&self, mode: &str, handlers: &str) -> PathBuf {
        let path = self.root.join("warden.toml");
        fs::write(&path, self.ops_config(mode, handlers)).unwrap();
        path
    }

    /// An in-process supervisor (scan done) with a fake kernel attached.
    fn start(&self, mode: &str, handlers: &str) -> (Supervisor, Kernel) {
        let path = self.write_config(mode, handlers);
        let config = Config::load(&path).unwrap();
        let mut opts = Options::from_config(&config).unwrap();
        opts.handshake_timeout = Duration::from_secs(20);
        opts.reply_timeout = Duration::from_secs(20);
        opts.control_socket = None;
        let mut sup = Supervisor::new(config, opts).unwrap();
        let (nl_ours, nl_theirs) = UnixDatagram::pair().unwrap();
        let (ue_ours, ue_theirs) = UnixDatagram::pair().unwrap();
        nl_theirs.set_nonblocking(true).unwrap();
        ue_theirs.set_nonblocking(true).unwrap();
        nl_ours
            .set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        sup.attach_uevents(UeventSocket::from_socket(
            OwnedFd::from(ue_theirs),
            GROUP_KERNEL,
        ));
        sup.attach_netlink(TcmuNetlink::from_socket(OwnedFd::from(nl_theirs), FAMILY));
        sup.start().unwrap();
        let mut kernel = Kernel {
            nl: nl_ours,
            ue: ue_ours,
        };
        // SET_FEATURES arrives at once.
        let first = kernel.next_message(&mut sup);
        assert_eq!(first[20..24], [5, 0, 9, 0], "SUPP_KERN_CMD_REPLY attribute");
        (sup, kernel)
    }
}

/// The kernel's side of the event sockets.
struct Kernel {
    nl: UnixDatagram,
    ue: UnixDatagram,
}

fn nla(kind: u16, data: &[u8]) -> Vec<u8> {
    let mut v = ((4 + data.len()) as u16).to_ne_bytes().to_vec();
    v.extend_from_slice(&kind.to_ne_bytes());
    v.extend_from_slice(data);
    while v.len() % 4 != 0 {
        v.push(0);
    }
    v
}

/// A TCM-USER request laid out like the kernel's (`genlmsg_put` + `nla_put_*`).
fn tcmu_request(cmd: u8, name: &str, minor: u32, device_id: u32, extra: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![cmd, 2, 0, 0];
    let mut n = name.as_bytes().to_vec();
    n.push(0);
    body.extend(nla(1, &n));
    body.extend(nla(2, &minor.to_ne_bytes()));
    body.extend(nla(8, &device_id.to_ne_bytes()));
    for e in extra {
        body.extend_from_slice(e);
    }
    let mut msg = ((16 + body.len()) as u32).to_ne_bytes().to_vec();
    msg.extend_from_slice(&FAMILY.to_ne_bytes());
    msg.extend_from_slice(&0u16.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend(body);
    msg
}

/// A `*_DONE` reply, decoded by hand: (command, status, device id).
fn decode_done(msg: &[u8]) -> (u8, i32, u32) {
    assert_eq!(msg.len(), 36, "reply length {msg:?}");
    assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().unwrap()), 36);
    assert_eq!(u16::from_ne_bytes(msg[4..6].try_into().unwrap()), FAMILY);
    assert_eq!(&msg[20..24], &[8, 0, 7, 0], "CMD_STATUS attribute");
    assert_eq!(&msg[28..32], &[8, 0, 8, 0], "DEVICE_ID attribute");
    (
        msg[16],
        i32::from_ne_bytes(msg[24..28].try_into().unwrap()),
        u32::from_ne_bytes(msg[32..36].try_into().unwrap()),
    )
}

const ADDED: u8 = 1;
const REMOVED: u8 = 2;
const RECONFIG: u8 = 3;

impl Kernel {
    fn send(&self, msg: &[u8]) {
        self.nl.send(msg).unwrap();
    }

    fn uevent(&self, action: &str, uio: &str) {
        let msg = format!(
            "{action}@/devices/virtual/uio/{uio}\0ACTION={action}\0DEVPATH=/devices/virtual/uio/{uio}\0SUBSYSTEM=uio\0DEVNAME={uio}\0SEQNUM=1\0"
        );
        self.ue.send(msg.as_bytes()).unwrap();
    }

    fn udev_event(&self, action: &str, uio: &str) {
        let props = format!(
            "ACTION={action}\0DEVPATH=/devices/virtual/uio/{uio}\0SUBSYSTEM=uio\0DEVNAME=/dev/{uio}\0SEQNUM=2\0"
        );
        let mut v = b"libudev\0".to_vec();
        v.extend_from_slice(&0xfeed_cafe_u32.to_be_bytes());
        v.extend_from_slice(&40u32.to_ne_bytes());
        v.extend_from_slice(&40u32.to_ne_bytes());
        v.extend_from_slice(&(props.len() as u32).to_ne_bytes());
        v.extend_from_slice(&[0u8; 16]);
        v.extend_from_slice(props.as_bytes());
        self.ue.send(&v).unwrap();
    }

    /// Turns the supervisor until it sends the kernel a message.
    fn next_message(&mut self, sup: &mut Supervisor) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = vec![0u8; 4096];
        loop {
            match self.nl.recv(&mut buf) {
                Ok(n) => return buf[..n].to_vec(),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("recv: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "the supervisor never answered the kernel"
            );
            sup.poll_once(Duration::from_millis(50)).unwrap();
        }
    }

    /// Sends a request and asserts that it succeeded.
    fn accepted(&mut self, sup: &mut Supervisor, msg: &[u8]) {
        let (_, status, _) = self.request(sup, msg);
        assert_eq!(status, 0, "the request was refused");
    }

    /// Sends a request and returns the decoded reply.
    fn request(&mut self, sup: &mut Supervisor, msg: &[u8]) -> (u8, i32, u32) {
        self.send(msg);
        decode_done(&self.next_message(sup))
    }
}

fn turn(sup: &mut Supervisor, n: usize) {
    for _ in 0..n {
        sup.poll_once(Duration::from_millis(20)).unwrap();
    }
}

fn lines_with(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

fn wait_for(what: &str, pred: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- in-process tests ---------------------------------------------------------------------------

fn uevents_add_and_remove_devices() {
    let f = Fixture::new();
    let (mut sup, k) = f.start("echo", &f.handlers(None));
    assert!(sup.devices().is_empty());
    f.device("uio0", 1, "scratch", "ram/");
    k.uevent("add", "uio0");
    until_ready(&mut sup, "uio0", "the hot-plugged device is served");
    assert_contains(&f.log("echo"), "add worker=ram id=1 uio=uio0");
    // Other subsystems are not ours.
    k.ue.send(
        b"add@/devices/x/sda\0ACTION=add\0DEVPATH=/devices/x/sda\0SUBSYSTEM=block\0DEVNAME=sda\0",
    )
    .unwrap();
    // Garbage is ignored.
    k.ue.send(b"\xff\xfe garbage").unwrap();
    turn(&mut sup, 5);
    assert_eq!(sup.devices().len(), 1);
    // A second add for the same device changes nothing.
    k.uevent("add", "uio0");
    turn(&mut sup, 5);
    assert_eq!(lines_with(&f.log("echo"), "add worker=ram"), 1);

    f.remove("uio0");
    k.uevent("remove", "uio0");
    until(&mut sup, "the removed device is released", |s| {
        s.device_by_uio("uio0").is_none()
    });
    assert_contains(&f.log("echo"), "remove worker=ram id=1");
}

fn set_features_is_sent_first() {
    // `Fixture::start` asserts the SET_FEATURES attribute; check the whole message here.
    let f = Fixture::new();
    let path = f.write_config("echo", &f.handlers(None));
    let config = Config::load(&path).unwrap();
    let mut opts = Options::from_config(&config).unwrap();
    opts.control_socket = None;
    let mut sup = Supervisor::new(config, opts).unwrap();
    let (ours, theirs) = UnixDatagram::pair().unwrap();
    theirs.set_nonblocking(true).unwrap();
    sup.attach_netlink(TcmuNetlink::from_socket(OwnedFd::from(theirs), FAMILY));
    let mut buf = [0u8; 64];
    let n = ours.recv(&mut buf).unwrap();
    let msg = &buf[..n];
    assert_eq!(n, 28);
    assert_eq!(u16::from_ne_bytes(msg[4..6].try_into().unwrap()), FAMILY);
    assert_eq!(
        u16::from_ne_bytes(msg[6..8].try_into().unwrap()),
        0x1 | 0x4,
        "REQUEST|ACK"
    );
    assert_eq!(msg[16], 7, "SET_FEATURES");
    assert_eq!(&msg[20..25], &[5, 0, 9, 0, 1]);
}

fn refused_devices_fail_the_configfs_write() {
    let f = Fixture::new();
    let (mut sup, mut k) = f.start("echo", &f.handlers(None));
    harness::take_logs();

    // Unknown subtype.
    f.device("uio0", 1, "qc", "qcow//images/a.qcow2");
    let (cmd, status, id) = k.request(
        &mut sup,
        &tcmu_request(ADDED, "tcm-user/1/qc/qcow//images/a.qcow2", 0, 11, &[]),
    );
    assert_eq!((cmd, status, id), (4, -libc::EOPNOTSUPP, 11));
    // Its uevent does not bring it in.
    k.uevent("add", "uio0");
    turn(&mut sup, 5);
    assert!(sup.device_by_uio("uio0").is_none());

    // A path outside allow_paths.
    let outside = f.root.join("secret.img");
    fs::write(&outside, "SECRET").unwrap();
    let cfg = format!("file/{}", outside.display());
    f.device("uio1", 1, "outside", &cfg);
    let (cmd, status, id) = k.request(
        &mut sup,
        &tcmu_request(ADDED, &format!("tcm-user/1/outside/{cfg}"), 1, 12, &[]),
    );
    assert_eq!((cmd, status, id), (4, -libc::EPERM, 12));

    // A relative cfgstring, and a name that is not a TCMU name at all.
    let (_, status, _) = k.request(
        &mut sup,
        &tcmu_request(ADDED, "tcm-user/1/rel/file/relative.img", 2, 13, &[]),
    );
    assert_eq!(status, -libc::EINVAL);
    let (_, status, _) = k.request(
        &mut sup,
        &tcmu_request(ADDED, "something-else/1/x", 3, 14, &[]),
    );
    assert_eq!(status, -libc::EINVAL);
    assert!(sup.devices().is_empty());
    assert!(!f.log("echo").contains("SECRET"));

    let logs = harness::take_logs();
    let line = "device refused by policy at creation";
    assert!(
        logs.lines().any(|l| l.contains(line)
            && l.contains("device=uio0")
            && l.contains("rule=handler.qcow")),
        "{logs}"
    );
    assert!(
        logs.lines().any(|l| l.contains(line)
            && l.contains("device=uio1")
            && l.contains("rule=handler.file.allow_paths")),
        "{logs}"
    );

    // The kernel's uevent usually comes first: the device waits for the netlink request and is
    // never handed to a worker.
    f.device("uio5", 1, "qc2", "qcow//images/b.qcow2");
    k.uevent("add", "uio5");
    turn(&mut sup, 5);
    assert!(
        sup.device_by_uio("uio5").is_none(),
        "adopted before the kernel's request"
    );
    let (_, status, _) = k.request(
        &mut sup,
        &tcmu_request(ADDED, "tcm-user/1/qc2/qcow//images/b.qcow2", 5, 16, &[]),
    );
    assert_eq!(status, -libc::EOPNOTSUPP);
    turn(&mut sup, 5);
    assert!(sup.device_by_uio("uio5").is_none());
    assert!(
        sup.worker("refused").is_none(),
        "no worker was started for refusals"
    );

    // An admitted device is answered 0 and served.
    f.device("uio4", 2, "scratch", "ram/");
    let (cmd, status, id) = k.request(
        &mut sup,
        &tcmu_request(ADDED, "tcm-user/2/scratch/ram/", 4, 15, &[]),
    );
    assert_eq!((cmd, status, id), (4, 0, 15));
    until_ready(&mut sup, "uio4", "the admitted device is served");
}

fn added_before_its_node_is_served_once_udev_reports_it() {
    let f = Fixture::new();
    let (mut sup, mut k) = f.start("echo", &f.handlers(None));
    f.sysfs_device("uio1", 2, "late", "ram/");
    k.accepted(
        &mut sup,
        &tcmu_request(ADDED, "tcm-user/2/late/ram/", 1, 21, &[]),
    );
    turn(&mut sup, 5);
    assert!(
        sup.device_by_uio("uio1").is_none(),
        "served before its node exists"
    );
    // While it waits, the policy still judges changes to it.
    let (cmd, status, _) = k.request(
        &mut sup,
        &tcmu_request(
            RECONFIG,
            "tcm-user/2/late/ram/",
            1,
            21,
            &[nla(4, b"qcow//x\0")],
        ),
    );
    assert_eq!((cmd, status), (6, -libc::EOPNOTSUPP));
    k.accepted(
        &mut sup,
        &tcmu_request(RECONFIG, "tcm-user/2/late/ram/", 1, 21, &[nla(6, &[1])]),
    );
    f.node("uio1");
    k.udev_event("add", "uio1");
    until_ready(&mut sup, "uio1", "the device is served");
    assert_eq!(lines_with(&f.log("echo"), "uio=uio1"), 1);
}

fn recreated_device_on_the_same_minor_is_a_new_device() {
    let f = Fixture::new();
    let (mut sup, mut k) = f.start("echo", &f.handlers(None));
    let name = "tcm-user/2/disk/ram/";
    f.device("uio0", 2, "disk", "ram/");
    k.uevent("add", "uio0");
    k.accepted(&mut sup, &tcmu_request(ADDED, name, 0, 5, &[]));
    until_ready(&mut sup, "uio0", "the first device is served");
    let first = sup.device_by_uio("uio0").unwrap().id;

    // Deleted and re-created under the same name, on the same minor; the uevents lag behind the
    // netlink requests.
    let (cmd, status, id) = k.request(&mut sup, &tcmu_request(REMOVED, name, 0, 5, &[]));
    assert_eq!((cmd, status, id), (5, 0, 5));
    let (cmd, status, id) = k.request(&mut sup, &tcmu_request(ADDED, name, 0, 6, &[]));
    assert_eq!((cmd, status, id), (4, 0, 6));
    until(&mut sup, "the second device is served", |s| {
        s.device_by_uio("uio0")
            .is_some_and(|d| d.id != first && d.phase == DevicePhase::Ready)
    });
    let second = sup.device_by_uio("uio0").unwrap().id;
    // The first device's uevents arrive now: its remove must not touch the second.
    k.uevent("remove", "uio0");
    k.uevent("add", "uio0");
    turn(&mut sup, 10);
    let d = sup.device_by_uio("uio0").unwrap();
    assert_eq!((d.id, d.phase), (second, DevicePhase::Ready));
    let log = f.log("echo");
    assert_contains(&log, &format!("remove worker=ram id={first}"));
    assert_contains(&log, &format!("add worker=ram id={second} uio=uio0"));
    // Now a real removal of the second.
    k.uevent("remove", "uio0");
    until(&mut sup, "the second device is released", |s| {
        s.device_by_uio("uio0").is_none()
    });
}

fn size_and_write_cache_changes_reach_the_worker() {
    let f = Fixture::new();
    let (mut sup, mut k) = f.start("echo", &f.handlers(Some("1GiB")));
    let name = "tcm-user/2/disk/ram/";
    f.device("uio0", 2, "disk", "ram/");
    k.accepted(&mut sup, &tcmu_request(ADDED, name, 0, 7, &[]));
    until_ready(&mut sup, "uio0", "served");
    let id = sup.device_by_uio("uio0").unwrap().id;

    let size = 64u64 << 20;
    let (cmd, status, dev) = k.request(
        &mut sup,
        &tcmu_request(
            RECONFIG,
            name,
            0,
            7,
            &[nla(3, &[]), nla(5, &size.to_ne_bytes())],
        ),
    );
    assert_eq!((cmd, status, dev), (6, 0, 7));
    assert_contains(
        &f.log("echo"),
        &format!("reconfig worker=ram id={id} dev_size=Some({size}) write_cache=None"),
    );
    let report = sup.status_report();
    assert_eq!(report.devices[0].size, size);

    k.accepted(
        &mut sup,
        &tcmu_request(RECONFIG, name, 0, 7, &[nla(6, &[1])]),
    );
    assert_contains(
        &f.log("echo"),
        &format!("reconfig worker=ram id={id} dev_size=None write_cache=Some(true)"),
    );
    assert!(sup.status_report().devices[0].write_cache);
}

fn refused_and_failed_reconfigs_are_answered_negatively() {
    let f = Fixture::new();
    let (mut sup, mut k) = f.start("noreconfig", &f.handlers(Some("1GiB")));
    let name = "tcm-user/2/disk/ram/";
    f.device("uio0", 2, "disk", "ram/");
    k.accepted(&mut sup, &tcmu_request(ADDED, name, 0, 8, &[]));
    until_ready(&mut sup, "uio0", "served");

    // Beyond handler.ram.max_size: refused without asking the worker.
    let big = 2u64 << 30;
    let (_, status, _) = k.request(
        &mut sup,
        &tcmu_request(RECONFIG, name, 0, 8, &[nla(5, &big.to_ne_bytes())]),
    );
    assert_eq!(status, -libc::EFBIG);
    // Smaller than a block.
    let (_, status, _) = k.request(
        &mut sup,
        &tcmu_request(RECONFIG, name, 0, 8, &[nla(5, &100u64.to_ne_bytes())]),
    );
    assert_eq!(status, -libc::EINVAL);
    assert!(!f.log("noreconfig").contains("reconfig worker"));
    // Allowed, but the worker fails it.
    let (_, status, _) = k.request(
        &mut sup,
        &tcmu_request(RECONFIG, name, 0, 8, &[nla(5, &(2u64 << 20).to_ne_bytes())]),
    );
    assert_eq!(status, -libc::EIO);
    assert_contains(&f.log("noreconfig"), "reconfig worker=ram");
    assert_eq!(
        sup.status_report().devices[0].size,
        1 << 20,
        "size unchanged"
    );
    // A request for a device nobody serves is still answered.
    let (cmd, status, dev) = k.request(
        &mut sup,
        &tcmu_request(RECONFIG, "tcm-user/9/x/ram/", 9, 99, &[nla(6, &[0])]),
    );
    assert_eq!((cmd, status, dev), (6, 0, 99));
    // A malformed request is ignored, and the next one still answered.
    k.send(&[1, 2, 3]);
    let (_, status, dev) = k.request(&mut sup, &tcmu_request(REMOVED, name, 0, 8, &[]));
    assert_eq!((status, dev), (0, 8));
}

fn device_failing_during_a_reconfig_is_answered() {
    let f = Fixture::new();
    let (mut sup, mut k) = f.start("failreconfig", &f.handlers(None));
    let name = "tcm-user/2/disk/ram/";
    f.device("uio0", 2, "disk", "ram/");
    k.accepted(&mut sup, &tcmu_request(ADDED, name, 0, 4, &[]));
    until_ready(&mut sup, "uio0", "served");
    // The worker reports the device failed, then answers the change late.
    let (cmd, status, _) = k.request(
        &mut sup,
        &tcmu_request(RECONFIG, name, 0, 4, &[nla(6, &[1])]),
    );
    assert_eq!(cmd, 6);
    assert!(status < 0, "status {status}");
    turn(&mut sup, 10);
    assert!(matches!(
        phase_of(&sup, "uio0"),
        Some(DevicePhase::Failed(_))
    ));
    let w = sup.worker("ram").unwrap();
    assert_eq!(
        w.kill_reason, None,
        "a late answer is not a protocol violation"
    );
    // With no worker serving it any more, the next change is recorded directly.
    k.accepted(
        &mut sup,
        &tcmu_request(RECONFIG, name, 0, 4, &[nla(6, &[0])]),
    );
    assert!(!sup.status_report().devices[0].write_cache);
}

fn device_failing_while_released_keeps_the_worker() {
    // On a real kernel, deleting a backstore unregisters its uio device right after the
    // REMOVED_DEVICE reply: the worker sees the ring go away (DeviceFailed) before it handles
    // RemoveDevice. That is not a protocol violation.
    let f = Fixture::new();
    let (mut sup, mut k) = f.start("failonremove", &f.handlers(None));
    let name = "tcm-user/2/disk/ram/";
    f.device("uio0", 2, "disk", "ram/");
    k.accepted(&mut sup, &tcmu_request(ADDED, name, 0, 4, &[]));
    until_ready(&mut sup, "uio0", "served");
    k.accepted(&mut sup, &tcmu_request(REMOVED, name, 0, 4, &[]));
    until(&mut sup, "released", |s| s.device_by_uio("uio0").is_none());
    assert_eq!(sup.worker("ram").unwrap().kill_reason, None);
    // Re-created under the same name: the same worker serves it.
    k.accepted(&mut sup, &tcmu_request(ADDED, name, 0, 5, &[]));
    until_ready(&mut sup, "uio0", "served again");
    assert_eq!(lines_with(&f.log("failonremove"), "hello worker=ram"), 1);
}

fn dev_config_change_reopens_the_device() {
    let f = Fixture::new();
    let (mut sup, mut k) = f.start("echo", &f.handlers(None));
    let one = f.backing("one.img");
    let two = f.backing("two.img");
    let cfg = format!("file/{}", one.display());
    let name = format!("tcm-user/1/disk/{cfg}");
    f.device("uio0", 1, "disk", &cfg);
    k.accepted(&mut sup, &tcmu_request(ADDED, &name, 0, 3, &[]));
    until_ready(&mut sup, "uio0", "served");
    let first = sup.device_by_uio("uio0").unwrap().id;

    // Outside allow_paths: refused, nothing happens.
    let outside = format!("file/{}", f.root.join("x.img").display());
    let mut v = outside.clone().into_bytes();
    v.push(0);
    let (_, status, _) = k.request(
        &mut sup,
        &tcmu_request(RECONFIG, &name, 0, 3, &[nla(4, &v)]),
    );
    assert_eq!(status, -libc::EPERM);
    turn(&mut sup, 5);
    assert_eq!(sup.device_by_uio("uio0").unwrap().id, first);

    let new_cfg = format!("file/{}", two.display());
    let mut v = new_cfg.clone().into_bytes();
    v.push(0);
    let (cmd, status, _) = k.request(
        &mut sup,
        &tcmu_request(RECONFIG, &name, 0, 3, &[nla(4, &v)]),
    );
    assert_eq!((cmd, status), (6, 0));
    until(&mut sup, "the device is served again", |s| {
        s.device_by_uio("uio0")
            .is_some_and(|d| d.id != first && d.phase == DevicePhase::Ready)
    });
    let d = sup.device_by_uio("uio0").unwrap();
    assert_eq!(d.cfgstring, two.display().to_string());
    let log = f.log("echo");
    assert_contains(&log, &format!("remove worker=file id={first}"));
    assert_contains(
        &log,
        &format!(
            "add worker=file id={} uio=uio0 backing=Some(\"BACKING:two.img\")",
            d.id
        ),
    );
    // The kernel's later requests still find the device (same minor and kernel id).
    k.accepted(
        &mut sup,
        &tcmu_request(REMOVED, &format!("tcm-user/1/disk/{new_cfg}"), 0, 3, &[]),
    );
    until(&mut sup, "released", |s| s.device_by_uio("uio0").is_none());
}

fn reload_applies_to_new_workers_only() {
    let f = Fixture::new();
    f.device("uio0", 2, "first", "ram/");
    let (mut sup, k) = f.start("echo", "[handler.ram]\n");
    until_ready(&mut sup, "uio0", "served");
    harness::take_logs();
    // New worker executable, a new handler, and a daemon key that needs a restart.
    let text = f.ops_config("alt", &f.handlers(None)).replace(
        "drain_timeout = \"20s\"",
        "drain_timeout = \"20s\"\nuevent_source = 'kernel'",
    );
    fs::write(f.root.join("warden.toml"), text).unwrap();
    sup.reload();
    let logs = harness::take_logs();
    assert_contains(&logs, "configuration reloaded");
    assert_contains(&logs, "handler.file: added");
    assert_contains(&logs, "daemon.worker_exe");
    assert!(
        logs.lines()
            .any(|l| l.contains("needs a restart") && l.contains("daemon.uevent_source")),
        "{logs}"
    );
    let report = sup.status_report();
    assert_eq!(report.daemon.config_generation, 2);
    assert_eq!(report.policy.served, vec!["file", "ram"]);
    assert!(report.policy.worker_exe.ends_with("/alt"));
    // A file device now gets a worker started from the new executable.
    let img = f.backing("d.img");
    f.device("uio1", 1, "disk", &format!("file/{}", img.display()));
    k.uevent("add", "uio1");
    until_ready(&mut sup, "uio1", "the new device is served");
    assert_contains(&f.log("alt"), "hello worker=file");
    assert!(
        !f.log("alt").contains("worker=ram"),
        "the running ram worker was not replaced"
    );

    // A broken file keeps the configuration in force.
    fs::write(f.root.join("warden.toml"), "[daemon\n").unwrap();
    sup.reload();
    assert_contains(&harness::take_logs(), "configuration reload failed");
    assert_eq!(sup.status_report().daemon.config_generation, 2);
}

// ---- binary tests -------------------------------------------------------------------------------

struct Daemon {
    child: Child,
    stderr: PathBuf,
}

impl Daemon {
    fn start(f: &Fixture, config: &Path, env: &[(&str, &str)]) -> Daemon {
        let stderr = f.root.join("daemon.err");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tcmu-warden"));
        cmd.args(["run", "--foreground", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(fs::File::create(&stderr).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Daemon {
            child: cmd.spawn().unwrap(),
            stderr,
        }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    fn status(&mut self, f: &Fixture) -> StatusReport {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) =
                control::query(&f.socket_path(), Request::Status, Duration::from_secs(30))
            {
                return r.status.unwrap();
            }
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "the daemon exited:\n{}",
                self.stderr()
            );
            assert!(Instant::now() < deadline, "no status:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn status_until(
        &mut self,
        f: &Fixture,
        what: &str,
        pred: impl Fn(&StatusReport) -> bool,
    ) -> StatusReport {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.status(f);
            if pred(&r) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting until {what}: {r:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(mut self) -> (std::process::ExitStatus, String) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the daemon did not stop");
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, self.stderr())
    }
}

fn binary_status_json_shows_devices_workers_and_policy() {
    let f = Fixture::new();
    f.module_params();
    let img = f.backing("disk0.img");
    f.device("uio0", 1, "disk0", &format!("file/{}", img.display()));
    f.device("uio1", 2, "scratch", "ram/");
    f.device("uio2", 1, "qc", "qcow//a.qcow2");
    let config = f.write_config("echo", &f.handlers(Some("4GiB")));
    let mut d = Daemon::start(&f, &config, &[]);
    // Counters arrive with the first Pong.
    d.status_until(&f, "counters arrived", |r| {
        r.devices.len() == 3
            && r.devices
                .iter()
                .all(|x| x.state == "ready" && x.commands.is_some())
    });

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tcmu-warden"))
        .args(["status", "--json", "--socket"])
        .arg(f.socket_path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let r: StatusReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r.daemon.config, config.display().to_string());
    assert_eq!(r.daemon.pid, d.child.id());
    assert_eq!(r.daemon.config_generation, 1);
    assert_eq!(
        r.daemon.uevents, "off",
        "a fake sysfs gets no kernel events"
    );
    assert_eq!(r.policy.served, vec!["file", "ram"]);
    assert_eq!(r.policy.ram.as_ref().unwrap().max_size, Some(4 << 30));
    assert_eq!(
        r.policy.file.as_ref().unwrap().allow_paths,
        vec![f.data.display().to_string()]
    );
    let dev = |uio: &str| r.devices.iter().find(|x| x.uio == uio).unwrap();
    let worker = |name: &str| r.workers.iter().find(|w| w.name == name).unwrap();
    let d0 = dev("uio0");
    assert_eq!(d0.backstore, "user_1/disk0");
    assert_eq!(d0.subtype.as_deref(), Some("file"));
    assert_eq!(d0.cfgstring, img.display().to_string());
    assert_eq!(d0.size, 1 << 20);
    assert_eq!(d0.worker, "file");
    assert_eq!(d0.worker_pid, Some(worker("file").pid));
    // The fake worker reports commands = 10 * id + 7 and errors = id.
    assert_eq!(d0.commands, Some(10 * d0.id + 7));
    assert_eq!(d0.errors, Some(d0.id));
    assert_eq!(d0.refusal, None);
    let d2 = dev("uio2");
    assert_eq!(d2.worker, "refused");
    assert!(d2.refusal.as_deref().unwrap().contains("qcow"));
    assert_eq!(dev("uio1").worker_pid, Some(worker("ram").pid));
    for w in &r.workers {
        assert_eq!(w.state, "ready");
        assert_eq!(w.restarts, 0);
        assert_eq!(w.last_crash, None);
    }
    assert_eq!(worker("file").devices, vec![d0.id]);

    // The human form, through --config.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tcmu-warden"))
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert_contains(&text, "policy: serves [file, ram]");
    assert_contains(&text, "uio0");
    assert_contains(&text, &format!("commands {}", 10 * d0.id + 7));
    assert_contains(&text, "refused: ");

    // Start-up unblocked the kernel's netlink requests after resetting them.
    assert_eq!(f.param("block_netlink"), "0");
    assert_eq!(f.param("reset_netlink"), "1");
    let (status, stderr) = d.stop();
    assert!(status.success(), "{stderr}");
    assert!(
        !f.socket_path().exists(),
        "the control socket is removed at exit"
    );

    // Without a daemon the client fails cleanly.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tcmu-warden"))
        .args(["status", "--socket"])
        .arg(f.socket_path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_contains(&String::from_utf8_lossy(&out.stderr), "connecting to");
}

fn binary_sighup_reloads_and_reports_changes() {
    let f = Fixture::new();
    f.device("uio0", 2, "scratch", "ram/");
    let config = f.write_config("echo", "[handler.ram]\n");
    let mut d = Daemon::start(&f, &config, &[]);
    let r = d.status_until(&f, "served", |r| {
        r.devices.first().is_some_and(|x| x.state == "ready")
    });
    assert_eq!(r.policy.served, vec!["ram"]);
    fs::write(&config, f.ops_config("echo", &f.handlers(Some("2GiB")))).unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    let r = d.status_until(&f, "reloaded", |r| r.daemon.config_generation == 2);
    assert_eq!(r.policy.served, vec!["file", "ram"]);
    assert_eq!(r.policy.ram.as_ref().unwrap().max_size, Some(2 << 30));
    assert_eq!(r.devices[0].state, "ready", "served devices are untouched");
    // A broken file: reported, the configuration in force stays.
    fs::write(&config, "[handler.ram\n").unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for("the failed reload is logged", || {
        d.stderr().contains("configuration reload failed")
    });
    assert_eq!(d.status(&f).daemon.config_generation, 2);
    let (status, stderr) = d.stop();
    assert!(status.success(), "{stderr}");
    assert_contains(&stderr, "configuration reloaded");
    assert_contains(&stderr, "handler.file: added");
    assert_contains(&stderr, "handler.ram.max_size: none -> 2GiB");
}

fn binary_sigterm_drains() {
    let f = Fixture::new();
    f.module_params();
    f.device("uio0", 2, "scratch", "ram/");
    let img = f.backing("disk0.img");
    f.device("uio1", 1, "disk0", &format!("file/{}", img.display()));
    let config = f.write_config("drain", &f.handlers(None));
    let mut d = Daemon::start(&f, &config, &[]);
    d.status_until(&f, "served", |r| {
        r.devices.len() == 2 && r.devices.iter().all(|x| x.state == "ready")
    });
    let (status, stderr) = d.stop();
    assert!(status.success(), "{stderr}");
    // Each worker saw its devices blocked before it was told to shut down.
    let log = f.log("drain");
    assert_contains(&log, "shutdown worker=ram block_dev=[\"1\"]");
    assert_contains(&log, "shutdown worker=file block_dev=[\"1\"]");
    // After the workers exited, the rings were reset and the netlink interface blocked.
    for (hba, name) in [(2, "scratch"), (1, "disk0")] {
        let action = f.configfs(hba, name).join("action");
        assert_eq!(
            fs::read_to_string(action.join("reset_ring")).unwrap(),
            "1",
            "{name}"
        );
        assert_eq!(
            fs::read_to_string(action.join("block_dev")).unwrap(),
            "1",
            "{name} stays blocked"
        );
    }
    assert_eq!(f.param("block_netlink"), "1");
    assert_eq!(f.param("reset_netlink"), "1");
    assert_contains(&stderr, "devices blocked; in-flight commands are draining");
    assert_contains(&stderr, "rings reset");
}

fn binary_second_daemon_leaves_the_first_alone() {
    let f = Fixture::new();
    f.module_params();
    f.device("uio0", 2, "scratch", "ram/");
    let config = f.write_config("echo", "[handler.ram]\n");
    let mut first = Daemon::start(&f, &config, &[]);
    first.status_until(&f, "served", |r| {
        r.devices.first().is_some_and(|x| x.state == "ready")
    });
    fs::write(
        f.sysfs
            .join("module/target_core_user/parameters/reset_netlink"),
        "0",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tcmu-warden"))
        .args(["run", "--foreground", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_contains(
        &String::from_utf8_lossy(&out.stderr),
        "another daemon is listening",
    );
    // The running daemon's kernel state is untouched, and it still answers.
    assert_eq!(f.param("block_netlink"), "0");
    assert_eq!(f.param("reset_netlink"), "0");
    assert_eq!(first.status(&f).devices[0].state, "ready");
    let (status, stderr) = first.stop();
    assert!(status.success(), "{stderr}");
}

fn binary_notifies_systemd() {
    let f = Fixture::new();
    f.device("uio0", 2, "scratch", "ram/");
    let notify = f.root.join("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let config = f.write_config("echo", "[handler.ram]\n");
    let d = Daemon::start(
        &f,
        &config,
        &[
            ("NOTIFY_SOCKET", notify.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut buf = [0u8; 512];
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() < 3 {
        assert!(
            Instant::now() < deadline,
            "notifications so far: {seen:?}\n{}",
            d.stderr()
        );
        let n = listener.recv(&mut buf).unwrap();
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let ready = seen
        .iter()
        .position(|m| m.contains("READY=1"))
        .expect("READY=1 was sent");
    assert_contains(&seen[ready], "STATUS=serving 1 devices");
    assert!(seen.iter().position(|m| m.contains("WATCHDOG=1")).unwrap() >= ready);
    let (status, stderr) = d.stop();
    assert!(status.success(), "{stderr}");
    let mut stopping = false;
    while let Ok(n) = {
        listener
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        listener.recv(&mut buf)
    } {
        stopping |= String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
    }
    assert!(stopping, "STOPPING=1 was sent");
}

// ---- the fake worker --------------------------------------------------------------------------

mod fake_worker {
    use super::*;

    pub fn main() -> ExitCode {
        let fake = FakeWorker::from_env();
        let (mode, sysfs) = (fake.mode.as_str(), fake.sysfs());
        let Some((worker, subtypes)) = fake.hello() else {
            return ExitCode::from(4);
        };
        fake.log(format!("hello worker={worker} subtypes={subtypes:?}"));
        fake.send(FromWorker::Hello {
            pid: std::process::id(),
            subtypes,
        });
        // id → (hba, name) of the devices held.
        let mut held: Vec<(u64, u32, String, DeviceFds<OwnedFd>)> = Vec::new();
        loop {
            let (msg, fds) = match fake.chan.recv::<ToWorker>() {
                Ok(m) => m,
                Err(ProtoError::Closed) => return ExitCode::SUCCESS,
                Err(e) => {
                    fake.log(format!("recv error {e}"));
                    return ExitCode::from(2);
                }
            };
            match msg {
                ToWorker::AddDevice(spec) => {
                    let Ok(named) = DeviceFds::claim(&spec, fds) else {
                        fake.log(format!(
                            "add worker={worker} id={} bad descriptors",
                            spec.id
                        ));
                        return ExitCode::from(2);
                    };
                    let backing = named.backing.as_ref().map(read_all);
                    fake.log(format!(
                        "add worker={worker} id={} uio={} backing={backing:?} dev_size={} write_cache={}",
                        spec.id, spec.uio, spec.dev_size, spec.write_cache
                    ));
                    held.push((spec.id, spec.hba, spec.name.clone(), named));
                    fake.send(FromWorker::DeviceReady { id: spec.id });
                }
                ToWorker::RemoveDevice { id } => {
                    if mode == "failonremove" {
                        fake.send(FromWorker::DeviceFailed {
                            id,
                            reason: "event I/O: device event channel closed".into(),
                        });
                    }
                    held.retain(|(h, ..)| *h != id);
                    fake.log(format!("remove worker={worker} id={id}"));
                    fake.send(FromWorker::DeviceRemoved { id });
                }
                ToWorker::Reconfig {
                    id,
                    dev_size,
                    write_cache,
                } => {
                    fake.log(format!(
                        "reconfig worker={worker} id={id} dev_size={dev_size:?} write_cache={write_cache:?}"
                    ));
                    if mode == "failreconfig" {
                        fake.send(FromWorker::DeviceFailed {
                            id,
                            reason: "ring broke".into(),
                        });
                        fake.send(FromWorker::ReconfigFailed {
                            id,
                            reason: "device failed".into(),
                        });
                    } else if mode == "noreconfig" {
                        fake.send(FromWorker::ReconfigFailed {
                            id,
                            reason: "cannot grow".into(),
                        });
                    } else {
                        fake.send(FromWorker::Reconfigured { id });
                    }
                }
                ToWorker::Ping { seq } => {
                    let stats = held
                        .iter()
                        .map(|(id, ..)| DeviceStats {
                            id: *id,
                            commands: 10 * id + 7,
                            errors: *id,
                            bytes_read: 512,
                            bytes_written: 1024,
                        })
                        .collect();
                    fake.send(FromWorker::Pong { seq, stats });
                }
                ToWorker::Shutdown => {
                    let blocked: Vec<String> = held
                        .iter()
                        .map(|(_, hba, name, _)| {
                            let p = sysfs
                                .join("kernel/config/target/core")
                                .join(format!("user_{hba}"))
                                .join(name)
                                .join("action/block_dev");
                            fs::read_to_string(p).unwrap_or_default()
                        })
                        .collect();
                    fake.log(format!("shutdown worker={worker} block_dev={blocked:?}"));
                    return ExitCode::SUCCESS;
                }
                ToWorker::Hello { .. } => return ExitCode::from(4),
            }
        }
    }
}
