//! The `nbd` handler against real servers, `nbdkit` (memory and file plugins) and `qemu-nbd`,
//! driven through its block-request interface (what the worker's SCSI emulation calls). A
//! missing server is a failure, not a skip.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tcmu_warden_nbd_worker::{NbdFactory, NbdHandler};
use tcmu_warden_sdk::{BlockOp, BlockRequest, DataBuf, DeviceConfig, Handler, HandlerFactory};

const BS: u64 = 512;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nbdkit_tcp(port: u16, args: &[&str]) -> Server {
    let child = Command::new("nbdkit")
        .args([
            "--foreground",
            "--exit-with-parent",
            "-i",
            "127.0.0.1",
            "-p",
        ])
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("nbdkit is installed (tests/vm/setup-host.sh)");
    Server(child)
}

fn dev(cfgstring: &str, size: u64) -> DeviceConfig {
    DeviceConfig {
        name: "nbd0".into(),
        subtype: "nbd".into(),
        cfgstring: cfgstring.into(),
        dev_size: size,
        block_size: BS as u32,
        max_sectors: 0,
        write_cache: true,
        unit_serial: "s".into(),
    }
}

/// Opens the handler, retrying while the server starts.
fn open(cfg: &DeviceConfig) -> NbdHandler {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match NbdHandler::open(cfg) {
            Ok(h) => return h,
            Err(e) if Instant::now() < deadline && e.to_string().contains("connecting") => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("opening {cfg:?}: {e}"),
        }
    }
}

type Outcome = (Vec<u8>, std::io::Result<()>);

/// Submits one request; its outcome arrives on the returned channel.
fn submit(h: &dyn Handler, op: BlockOp, data: Vec<u8>) -> mpsc::Receiver<Outcome> {
    let (tx, rx) = mpsc::channel();
    let len = data.len();
    let req = BlockRequest::new(
        op,
        DataBuf::from_segments(vec![data]),
        0,
        len,
        Box::new(move |buf, r, _| {
            let _ = tx.send((buf.to_vec(), r));
        }),
    );
    h.submit_io(req);
    rx
}

fn wait(rx: mpsc::Receiver<Outcome>) -> Outcome {
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the request completes")
}

fn write(h: &dyn Handler, offset: u64, data: Vec<u8>, durable: bool) {
    let (_, r) = wait(submit(h, BlockOp::Write { offset, durable }, data));
    r.unwrap();
}

fn read(h: &dyn Handler, offset: u64, len: usize) -> Vec<u8> {
    let (data, r) = wait(submit(h, BlockOp::Read { offset }, vec![0; len]));
    r.unwrap();
    data
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
        .collect()
}

/// The data path on one export: round trip, durable write, flush, unmap, many in flight.
fn exercise(h: &NbdHandler) {
    write(h, 4096, pattern(1, 8192), false);
    assert_eq!(read(h, 4096, 8192), pattern(1, 8192));
    write(h, 0, pattern(2, 4096), true);
    assert_eq!(read(h, 0, 4096), pattern(2, 4096));
    let (_, r) = wait(submit(h, BlockOp::Flush, Vec::new()));
    r.unwrap();
    let caps = h.caps();
    assert!(caps.unmap, "the export takes TRIM or WRITE_ZEROES");
    let (_, r) = wait(submit(
        h,
        BlockOp::Unmap {
            offset: 4096,
            len: 4096,
        },
        Vec::new(),
    ));
    r.unwrap();
    if caps.unmap_reads_zero {
        assert_eq!(read(h, 4096, 4096), vec![0; 4096]);
    }
    assert_eq!(read(h, 8192, 4096), pattern(1, 8192)[4096..].to_vec());
    // 128 writes in flight at once, then 128 reads.
    let rxs: Vec<_> = (0..128u64)
        .map(|i| {
            submit(
                h,
                BlockOp::Write {
                    offset: 65536 + i * 4096,
                    durable: i % 2 == 0,
                },
                pattern(100 + i, 4096),
            )
        })
        .collect();
    for rx in rxs {
        wait(rx).1.unwrap();
    }
    let rxs: Vec<_> = (0..128u64)
        .map(|i| {
            submit(
                h,
                BlockOp::Read {
                    offset: 65536 + i * 4096,
                },
                vec![0; 4096],
            )
        })
        .collect();
    for (i, rx) in rxs.into_iter().enumerate() {
        let (data, r) = wait(rx);
        r.unwrap();
        assert_eq!(data, pattern(100 + i as u64, 4096), "block {i}");
    }
}

#[test]
fn nbdkit_memory_over_tcp() {
    let port = free_port();
    let _s = nbdkit_tcp(port, &["memory", "size=8M"]);
    let h = open(&dev(&format!("nbd://127.0.0.1:{port}/"), 8 << 20));
    exercise(&h);
}

#[test]
fn nbdkit_file_over_unix() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let sock = dir.path().join("nbd.sock");
    let _s = Server(
        Command::new("nbdkit")
            .args(["--foreground", "--exit-with-parent", "-U"])
            .arg(&sock)
            .arg("file")
            .arg(format!("file={}", img.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let h = open(&dev(
        &format!("nbd+unix:///?socket={}", sock.display()),
        8 << 20,
    ));
    exercise(&h);
    drop(h);
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(&on_disk[..4096], &pattern(2, 4096)[..]);
}

#[test]
fn qemu_nbd_over_unix() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let sock = dir.path().join("nbd.sock");
    let _s = Server(
        Command::new("qemu-nbd")
            .args(["--format=raw", "--persistent", "--shared=8"])
            .arg(format!("--socket={}", sock.display()))
            .args(["--export-name=disk"])
            .arg(&img)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-nbd is installed (tests/vm/setup-host.sh)"),
    );
    let h = open(&dev(
        &format!("nbd+unix:///disk?socket={}", sock.display()),
        8 << 20,
    ));
    exercise(&h);
}

#[test]
fn bad_cfgstrings_and_an_oversized_device_are_refused_with_the_reason() {
    for (cfg, why) in [
        ("/srv/disk.img", "not a URI"),
        ("nbds://h/x", "TLS"),
        ("nbd+unix:///x", "socket="),
    ] {
        let Err(e) = NbdFactory.open(&dev(cfg, 1 << 20), None) else {
            panic!("{cfg} accepted")
        };
        assert!(e.to_string().contains(why), "{cfg}: {e}");
    }
    let port = free_port();
    let _s = nbdkit_tcp(port, &["memory", "size=1M"]);
    let cfg = dev(&format!("nbd://127.0.0.1:{port}/"), 1 << 20);
    drop(open(&cfg));
    let Err(e) = NbdFactory.open(&dev(&format!("nbd://127.0.0.1:{port}/"), 2 << 20), None) else {
        panic!("an oversized device accepted")
    };
    assert!(e.to_string().contains("the export only 1048576"), "{e}");
}

#[test]
fn a_read_only_export_refuses_writes_as_write_protected() {
    let port = free_port();
    let _s = nbdkit_tcp(port, &["-r", "memory", "size=1M"]);
    let h = open(&dev(&format!("nbd://127.0.0.1:{port}/"), 1 << 20));
    assert!(!h.caps().unmap);
    let (_, r) = wait(submit(
        &h,
        BlockOp::Write {
            offset: 0,
            durable: false,
        },
        vec![1; 512],
    ));
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EROFS));
    assert_eq!(read(&h, 0, 512), vec![0; 512]);
}

fn nbdkit_file(port: u16, img: &Path) -> Server {
    nbdkit_tcp(port, &["file", &format!("file={}", img.display())])
}

/// nbdkit (file plugin) killed under writes and restarted: every write completes without an
/// error, none is lost, and the image holds exactly what was acknowledged.
#[test]
fn the_server_killed_and_restarted_under_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let port = free_port();
    let mut server = nbdkit_file(port, &img);
    let h = open(&dev(&format!("nbd://127.0.0.1:{port}/"), 4 << 20));
    let blocks = 512u64; // 4 KiB each: the whole 2 MiB written twice over the restart.
    let mut rxs = Vec::new();
    let mut reconnecting_seen = false;
    for round in 0..2u64 {
        for i in 0..blocks {
            rxs.push(submit(
                &h,
                BlockOp::Write {
                    offset: i * 4096,
                    durable: i % 3 == 0,
                },
                pattern(round * 1000 + i, 4096),
            ));
            if round == 0 && i == blocks / 2 {
                // Round 0's second half is submitted while the server is down.
                let _ = server.0.kill();
                let _ = server.0.wait();
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        if round == 0 {
            reconnecting_seen = h.reconnecting();
            // Round 0's writes are held, and wait for the server.
            std::thread::sleep(Duration::from_millis(700));
            server = nbdkit_file(port, &img);
        }
        // The rounds never overlap: each waits for its own writes (the emulation's range
        // lock does the same for overlapping commands).
        for rx in rxs.drain(..) {
            let (_, r) = wait(rx);
            r.expect("a write across the restart completes without an error");
        }
        if round == 0 {
            for i in 0..blocks {
                assert_eq!(
                    read(&h, i * 4096, 4096),
                    pattern(i, 4096),
                    "block {i} after the restart"
                );
            }
        }
    }
    assert!(reconnecting_seen, "the handler noticed the server's loss");
    assert!(!h.reconnecting());
    let (_, r) = wait(submit(&h, BlockOp::Flush, Vec::new()));
    r.unwrap();
    for i in 0..blocks {
        assert_eq!(
            read(&h, i * 4096, 4096),
            pattern(1000 + i, 4096),
            "block {i}"
        );
    }
    drop(h);
    drop(server);
    let on_disk = std::fs::read(&img).unwrap();
    for i in 0..blocks as usize {
        assert_eq!(
            &on_disk[i * 4096..(i + 1) * 4096],
            &pattern(1000 + i as u64, 4096)[..],
            "block {i} on disk"
        );
    }
}

/// A server that stays away: a held request fails with ENOTCONN (NOT READY to the initiator)
/// after the hold limit, well before the kernel's 30 s command timeout; the device serves again
/// once the server is back.
#[test]
fn a_request_held_past_the_limit_fails_not_ready_then_the_device_resumes() {
    let port = free_port();
    let mut server = nbdkit_tcp(port, &["memory", "size=1M"]);
    let h = open(&dev(&format!("nbd://127.0.0.1:{port}/"), 1 << 20));
    let _ = server.0.kill();
    let _ = server.0.wait();
    let started = Instant::now();
    let rx = submit(
        &h,
        BlockOp::Write {
            offset: 0,
            durable: true,
        },
        vec![7; 512],
    );
    let (_, r) = wait(rx);
    let waited = started.elapsed();
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ENOTCONN));
    assert!(
        waited >= tcmu_warden_nbd_worker::HOLD_LIMIT && waited < Duration::from_secs(25),
        "failed after {waited:?}"
    );
    assert!(h.reconnecting());
    let _server = nbdkit_tcp(port, &["memory", "size=1M"]);
    write(&h, 512, vec![9; 512], true);
    assert_eq!(read(&h, 512, 512), vec![9; 512]);
    assert!(!h.reconnecting());
}
