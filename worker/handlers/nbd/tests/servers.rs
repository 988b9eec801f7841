//! The client against real servers: `qemu-nbd` (package qemu-utils) and `nbdkit` (package
//! nbdkit), both installed by `tests/vm/setup-host.sh`. A missing server is a failure, not a
//! skip: these tests are the proof that the client speaks the protocol.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tcmu_warden_nbd::{Client, Endpoint, NbdError, Request, Target};

const TIMEOUT: Duration = Duration::from_secs(30);

/// A server process, killed when dropped.
struct Server {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed (tests/vm/setup-host.sh installs it: apt-get install {})",
        if tool == "qemu-nbd" {
            "qemu-utils"
        } else {
            tool
        }
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until a client can complete the handshake (the server is up).
fn wait_for(target: &Target, child: &mut Child) -> Client {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match Client::connect(target, Duration::from_secs(5)) {
            Ok(c) => return c,
            Err(e) => {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("the server exited ({status}) before it served: {e}");
                }
                assert!(
                    Instant::now() < deadline,
                    "no server after {TIMEOUT:?}: {e}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn qemu_nbd(size: u64) -> (Server, Client, PathBuf) {
    require("qemu-nbd");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    let sock = dir.path().join("nbd.sock");
    let mut child = Command::new("qemu-nbd")
        .args([
            "--format=raw",
            "--persistent",
            "--shared=8",
            "--cache=writeback",
        ])
        .arg(format!("--socket={}", sock.display()))
        .args(["--export-name=disk"])
        .arg(&img)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let target = Target {
        endpoint: Endpoint::Unix { socket: sock },
        export: "disk".into(),
    };
    let client = wait_for(&target, &mut child);
    (Server { child, _dir: dir }, client, img)
}

fn nbdkit(args: &[&str]) -> (Server, Client) {
    require("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new("nbdkit")
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
        .unwrap();
    let target = Target {
        endpoint: Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port,
        },
        export: String::new(),
    };
    let client = wait_for(&target, &mut child);
    (Server { child, _dir: dir }, client)
}

/// Submits and waits for one request.
fn run(c: &Client, req: Request) -> Result<Vec<u8>, NbdError> {
    let (tx, rx) = mpsc::channel();
    c.submit(
        req,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    )?;
    rx.recv_timeout(TIMEOUT)
        .expect("the request was never completed")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn file_bytes(img: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(img)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

#[test]
fn qemu_nbd_round_trip_with_every_command() {
    let (_server, c, img) = qemu_nbd(16 << 20);
    let ex = *c.export();
    assert_eq!(ex.size, 16 << 20);
    assert!(ex.structured_replies, "qemu-nbd offers structured replies");
    assert!(ex.can_flush() && ex.can_fua() && ex.can_trim() && ex.can_write_zeroes());
    assert!(!ex.read_only());

    let data = pattern(7, 64 * 1024);
    run(
        &c,
        Request::Write {
            offset: 1 << 20,
            data: data.clone(),
            fua: true,
        },
    )
    .unwrap();
    // FUA: durable, so the file shows it whatever the server caches.
    assert_eq!(file_bytes(&img, 1 << 20, data.len()), data);
    assert_eq!(
        run(
            &c,
            Request::Read {
                offset: 1 << 20,
                len: 64 * 1024
            }
        )
        .unwrap(),
        data
    );
    run(
        &c,
        Request::WriteZeroes {
            offset: (1 << 20) + 4096,
            len: 8192,
            fua: false,
            no_hole: false,
        },
    )
    .unwrap();
    run(
        &c,
        Request::Trim {
            offset: (1 << 20) + 32768,
            len: 4096,
            fua: false,
        },
    )
    .unwrap();
    run(&c, Request::Flush).unwrap();
    let back = run(
        &c,
        Request::Read {
            offset: 1 << 20,
            len: 64 * 1024,
        },
    )
    .unwrap();
    assert_eq!(&back[..4096], &data[..4096]);
    assert!(back[4096..12288].iter().all(|b| *b == 0), "zeroed range");
    assert_eq!(&back[12288..32768], &data[12288..32768]);
    // A never-written range reads as zeroes (qemu-nbd answers it as a hole chunk).
    assert!(
        run(
            &c,
            Request::Read {
                offset: 8 << 20,
                len: 1 << 20
            }
        )
        .unwrap()
        .iter()
        .all(|b| *b == 0)
    );
}

#[test]
fn requests_the_export_cannot_take_are_refused_before_sending() {
    let (_server, c, _img) = qemu_nbd(1 << 20);
    let beyond = c.submit(
        Request::Read {
            offset: (1 << 20) - 512,
            len: 1024,
        },
        Box::new(|_| panic!("never sent, never completed")),
    );
    assert!(
        matches!(beyond, Err(NbdError::Unsupported(_))),
        "{beyond:?}"
    );
    let huge = c.submit(
        Request::Read {
            offset: 0,
            len: u32::MAX,
        },
        Box::new(|_| panic!("never sent, never completed")),
    );
    assert!(matches!(huge, Err(NbdError::Unsupported(_))), "{huge:?}");
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn many_requests_in_flight_from_several_threads_each_complete_once() {
    let (_server, c, _img) = qemu_nbd(8 << 20);
    let c = std::sync::Arc::new(c);
    // 4 threads x 64 writes of distinct patterns, all submitted before any is awaited.
    let (tx, rx) = mpsc::channel::<(u64, Result<Vec<u8>, NbdError>)>();
    let mut threads = Vec::new();
    for t in 0..4u64 {
        let c = std::sync::Arc::clone(&c);
        let tx = tx.clone();
        threads.push(std::thread::spawn(move || {
            for i in 0..64u64 {
                let n = t * 64 + i;
                let tx = tx.clone();
                c.submit(
                    Request::Write {
                        offset: n * 16384,
                        data: pattern(n as u8, 16384),
                        fua: false,
                    },
                    Box::new(move |r| {
                        let _ = tx.send((n, r));
                    }),
                )
                .unwrap();
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    drop(tx);
    let mut seen = vec![0u32; 256];
    for (n, r) in rx.iter() {
        r.unwrap();
        seen[n as usize] += 1;
    }
    assert!(
        seen.iter().all(|k| *k == 1),
        "each write completed once: {seen:?}"
    );
    // Then 256 reads in flight at once, checked against what each write put there.
    let (tx, rx) = mpsc::channel();
    for n in 0..256u64 {
        let tx = tx.clone();
        c.submit(
            Request::Read {
                offset: n * 16384,
                len: 16384,
            },
            Box::new(move |r| {
                let _ = tx.send((n, r));
            }),
        )
        .unwrap();
    }
    drop(tx);
    let mut count = 0;
    for (n, r) in rx.iter() {
        assert_eq!(r.unwrap(), pattern(n as u8, 16384), "read {n}");
        count += 1;
    }
    assert_eq!(count, 256);
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn nbdkit_memory_over_tcp_and_server_errors() {
    let (_server, c) = nbdkit(&["memory", "size=4M"]);
    assert_eq!(c.export().size, 4 << 20);
    let data = pattern(3, 4096);
    run(
        &c,
        Request::Write {
            offset: 4096,
            data: data.clone(),
            fua: false,
        },
    )
    .unwrap();
    assert_eq!(
        run(
            &c,
            Request::Read {
                offset: 4096,
                len: 4096
            }
        )
        .unwrap(),
        data
    );
    drop(c);
    // Every read fails with EIO: the request ends with the server's code, the connection stays.
    let (_server, c) = nbdkit(&[
        "--filter=error",
        "memory",
        "size=1M",
        "error=EIO",
        "error-pread-rate=100%",
    ]);
    for _ in 0..3 {
        match run(
            &c,
            Request::Read {
                offset: 0,
                len: 512,
            },
        ) {
            Err(NbdError::Server { code, .. }) => assert_eq!(code, 5),
            other => panic!("expected EIO, got {other:?}"),
        }
    }
    run(
        &c,
        Request::Write {
            offset: 0,
            data: vec![1; 512],
            fua: false,
        },
    )
    .unwrap();
    assert!(c.broken().is_none());
}

#[test]
fn a_server_that_goes_away_completes_what_was_pending_and_refuses_the_rest() {
    // Reads take 2 s each on this server; it is killed while they are pending.
    let (mut server, c) = nbdkit(&["--filter=delay", "memory", "size=1M", "rdelay=2"]);
    let (tx, rx) = mpsc::channel();
    for n in 0..8u64 {
        let tx = tx.clone();
        c.submit(
            Request::Read {
                offset: n * 512,
                len: 512,
            },
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .unwrap();
    }
    drop(tx);
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let mut disconnected = 0;
    for r in rx.iter() {
        match r {
            Err(NbdError::Disconnected(_)) => disconnected += 1,
            other => panic!("expected a disconnection, got {other:?}"),
        }
    }
    assert_eq!(disconnected, 8, "every pending request completed, once");
    assert!(c.broken().is_some());
    assert!(matches!(
        c.submit(
            Request::Read {
                offset: 0,
                len: 512
            },
            Box::new(|_| {})
        ),
        Err(NbdError::Disconnected(_))
    ));
}
