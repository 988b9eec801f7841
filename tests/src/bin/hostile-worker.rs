//! `hostile-worker`: a deliberately hostile third-party worker, for the escape suite
//! (`tests/tests/escape.rs`).
//!
//! It is built on the real worker runtime ([`tcmu_warden_worker::worker_main`]), so it runs
//! under both jail stages exactly like a third-party handler would. Its handler serves the
//! `file` subtype; when the supervisor hands it a device, the backing file's *name* selects an
//! escape attempt (`shadow.img` reads `/etc/shadow`, `ptrace.img` attaches to the supervisor,
//! ...), the handler tries it, and it reports the outcome as the device's failure reason:
//!
//! ```text
//! ESCAPE attempt=shadow result=blocked errno=13 detail=...
//! ESCAPE attempt=shadow result=ESCAPED detail=...
//! ```
//!
//! An attempt that seccomp answers with SIGSYS never reports: the worker dies, and the test
//! reads the signal from the supervisor's worker table. The factory declares every system call
//! an attempt makes (a hostile handler can declare anything), so what stops an attempt is
//! stage one, landlock or the missing capabilities: exactly what a worker that never installed
//! stage two at all would meet. Attempt `undeclared` is the exception: it makes a call no list
//! mentions, to prove stage two itself.
//!
//! The backing file's content carries parameters (`port=N` for `tcp`).
//!
//! Never install or run this outside the test suite.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use tcmu_warden_worker::handler::{DeviceConfig, Handler, HandlerError, HandlerFactory};

fn main() -> ExitCode {
    tcmu_warden_worker::worker_main(vec![Arc::new(Hostile)])
}

struct Hostile;

/// Everything the attempts call, declared so that stage two lets them through to stage one,
/// landlock and the capability checks. `sysinfo` (used by `undeclared`) is deliberately absent.
const DECLARED: &[&str] = &[
    "open",
    "openat",
    "socket",
    "connect",
    "ptrace",
    "kill",
    "getppid",
    "mount",
    "unshare",
    "execve",
    "setuid",
    "bpf",
    "io_uring_setup",
    "getrlimit",
    "setrlimit",
    "prlimit64",
    "chmod",
    "fchmodat",
    "pread64",
];

impl HandlerFactory for Hostile {
    fn subtype(&self) -> &str {
        "file"
    }

    fn needs_backing_fd(&self) -> bool {
        true
    }

    fn syscalls(&self) -> &[&'static str] {
        DECLARED
    }

    fn open(
        &self,
        dev: &DeviceConfig,
        backing: Option<OwnedFd>,
    ) -> Result<Arc<dyn Handler>, HandlerError> {
        let path = Path::new(&dev.cfgstring);
        let attempt = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let param = backing.as_ref().map(read_param).unwrap_or_default();
        let outcome = attempt_escape(&attempt, path, &param, backing.as_ref());
        Err(HandlerError::Config {
            cfgstring: String::new(),
            why: format!("ESCAPE attempt={attempt} {outcome}"),
        })
    }
}

/// The first line of the backing file.
fn read_param(fd: &OwnedFd) -> String {
    let mut buf = [0u8; 128];
    // SAFETY: reading at most 128 bytes into a 128-byte buffer.
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = usize::try_from(n).unwrap_or(0);
    String::from_utf8_lossy(buf.get(..n).unwrap_or_default())
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `result=blocked errno=N` when `rc` is negative, `result=ESCAPED` otherwise.
fn verdict(rc: i64, what: &str) -> String {
    if rc < 0 {
        let e = errno();
        format!(
            "result=blocked errno={e} detail={what}: {}",
            io::Error::from_raw_os_error(e)
        )
    } else {
        format!("result=ESCAPED detail={what} returned {rc}")
    }
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn open_path(path: &str, flags: i32) -> i64 {
    let c = cstr(path);
    // SAFETY: open with a valid C string; a descriptor it returns is leaked on purpose (the
    // worker is about to report and be discarded).
    i64::from(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, 0o600) })
}

fn attempt_escape(attempt: &str, cfg: &Path, param: &str, backing: Option<&OwnedFd>) -> String {
    let data_dir = cfg.parent().unwrap_or(Path::new("/"));
    let test_root = data_dir.parent().unwrap_or(Path::new("/"));
    // SAFETY: getppid has no preconditions.
    let supervisor = unsafe { libc::getppid() };
    match attempt {
        "idle" | "victim" => "result=idle".to_owned(),
        "shadow" => verdict(open_path("/etc/shadow", libc::O_RDONLY), "open /etc/shadow"),
        "write_outside" => {
            let target = test_root.join("escaped-write");
            verdict(
                open_path(
                    &target.display().to_string(),
                    libc::O_CREAT | libc::O_WRONLY,
                ),
                &format!("create {}", target.display()),
            )
        }
        "other_backing" => {
            let victim = data_dir.join("victim.img");
            verdict(
                open_path(&victim.display().to_string(), libc::O_RDWR),
                &format!("open {}", victim.display()),
            )
        }
        "tcp" => {
            let port: u16 = param
                .strip_prefix("port=")
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or(0);
            tcp_connect(port)
        }
        "netlink" => {
            // SAFETY: socket with integer arguments.
            let rc = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::NETLINK_ROUTE,
                )
            };
            verdict(i64::from(rc), "socket(AF_NETLINK)")
        }
        "ptrace" => {
            // SAFETY: ptrace with integer arguments and NULL pointers.
            let rc = unsafe {
                libc::ptrace(
                    libc::PTRACE_ATTACH,
                    supervisor,
                    std::ptr::null_mut::<libc::c_void>(),
                    std::ptr::null_mut::<libc::c_void>(),
                )
            };
            verdict(rc, "ptrace(PTRACE_ATTACH, supervisor)")
        }
        "signal" => {
            // Signal 0 only checks permission: harmless if it ever got through.
            // SAFETY: kill with integer arguments.
            let rc = unsafe { libc::kill(supervisor, 0) };
            verdict(i64::from(rc), "kill(supervisor, 0)")
        }
        "mount" => {
            let target = cstr(&data_dir.display().to_string());
            // SAFETY: mount with valid C strings and a NULL data pointer.
            let rc = unsafe {
                libc::mount(
                    c"tmpfs".as_ptr(),
                    target.as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            verdict(i64::from(rc), "mount tmpfs")
        }
        "userns" => {
            // SAFETY: unshare with an integer argument.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
            verdict(i64::from(rc), "unshare(CLONE_NEWUSER)")
        }
        "exec" => {
            let sh = c"/bin/sh";
            let argv = [
                sh.as_ptr(),
                c"-c".as_ptr(),
                c"exit 0".as_ptr(),
                std::ptr::null(),
            ];
            let envp = [std::ptr::null::<libc::c_char>()];
            // SAFETY: execve with NULL-terminated argument and environment arrays of valid C
            // strings. Success replaces this process (the test then sees exit status 0 and no
            // report).
            let rc = unsafe { libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            verdict(i64::from(rc), "execve /bin/sh")
        }
        "setuid" => {
            // SAFETY: setuid with an integer argument.
            let rc = unsafe { libc::setuid(0) };
            verdict(i64::from(rc), "setuid(0)")
        }
        "bpf" => bpf_load(),
        "io_uring" => {
            let mut params = [0u8; 120];
            // SAFETY: io_uring_setup reads and writes a 120-byte io_uring_params structure.
            let rc = unsafe { libc::syscall(libc::SYS_io_uring_setup, 8u32, params.as_mut_ptr()) };
            verdict(rc, "io_uring_setup")
        }
        "environ" => {
            let path = format!("/proc/{supervisor}/environ");
            verdict(open_path(&path, libc::O_RDONLY), &format!("open {path}"))
        }
        "rlimit" => raise_rlimit(),
        "rlimit_supervisor" => {
            let lim = libc::rlimit64 {
                rlim_cur: 16,
                rlim_max: 16,
            };
            // SAFETY: prlimit64 reads one rlimit64 structure.
            let rc = unsafe {
                libc::prlimit64(supervisor, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut())
            };
            verdict(i64::from(rc), "prlimit64(supervisor, RLIMIT_NOFILE)")
        }
        "chmod" => {
            // SAFETY: chmod with a valid C string (mode of a root-owned file).
            let rc = unsafe { libc::chmod(c"/etc/passwd".as_ptr(), 0o666) };
            verdict(i64::from(rc), "chmod /etc/passwd")
        }
        "fds" => fd_table(backing),
        "undeclared" => {
            // On no list at all: stage two answers (kill, or ENOSYS in log mode).
            // SAFETY: sysinfo writes one sysinfo structure into `info`.
            let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let rc = unsafe { libc::sysinfo(&mut info) };
            verdict(i64::from(rc), "sysinfo")
        }
        "panic" => panic!("hostile handler panics on purpose"),
        "abort" => std::process::abort(),
        other => format!("result=unknown-attempt detail={other}"),
    }
}

fn tcp_connect(port: u16) -> String {
    // SAFETY: socket with integer arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return verdict(i64::from(fd), "socket(AF_INET)");
    }
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: connect reads one sockaddr_in of the given size.
    let rc = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    verdict(i64::from(rc), &format!("connect 127.0.0.1:{port}"))
}

fn bpf_load() -> String {
    // A two-instruction socket filter: r0 = 0; exit.
    let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
    let license = c"GPL";
    // union bpf_attr for BPF_PROG_LOAD: prog_type u32, insn_cnt u32, insns u64, license u64, ...
    let mut attr = [0u8; 128];
    let fields: [(usize, &[u8]); 4] = [
        (0, &1u32.to_ne_bytes()), // BPF_PROG_TYPE_SOCKET_FILTER
        (4, &2u32.to_ne_bytes()),
        (8, &(insns.as_ptr() as u64).to_ne_bytes()),
        (16, &(license.as_ptr() as u64).to_ne_bytes()),
    ];
    for (offset, bytes) in fields {
        if let Some(dst) = attr.get_mut(offset..offset + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }
    // SAFETY: bpf reads a bpf_attr of the given size; the pointers in it point at `insns` and
    // `license`, which live across the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 5u32, attr.as_ptr(), attr.len() as u32) };
    verdict(rc, "bpf(BPF_PROG_LOAD)")
}

fn raise_rlimit() -> String {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit structure.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return verdict(-1, "getrlimit");
    }
    let raised = libc::rlimit {
        rlim_cur: lim.rlim_max.saturating_add(1),
        rlim_max: lim.rlim_max.saturating_add(1),
    };
    // SAFETY: setrlimit reads one rlimit structure.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) };
    verdict(
        i64::from(rc),
        &format!("setrlimit(RLIMIT_NOFILE, {})", raised.rlim_max),
    )
}

/// Lists every open descriptor with its device and inode (or `sock`): the test compares them
/// with what the supervisor sent.
fn fd_table(backing: Option<&OwnedFd>) -> String {
    let mut out = String::from("result=listed fds=");
    for fd in 0..4096 {
        // SAFETY: F_GETFD only queries the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            continue;
        }
        // SAFETY: fstat writes one stat structure into `st`.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let kind = if unsafe { libc::fstat(fd, &mut st) } != 0 {
            "?".to_owned()
        } else if st.st_mode & libc::S_IFMT == libc::S_IFSOCK {
            "sock".to_owned()
        } else {
            format!("{}:{}", st.st_dev, st.st_ino)
        };
        out.push_str(&format!("{fd}={kind},"));
    }
    if let Some(b) = backing {
        out.push_str(&format!(" backing={}", b.as_raw_fd()));
    }
    out
}
