//! What the `workers` and `ops` test programs share: the test runner they bring (both are
//! `harness = false` binaries that double as a fake worker), the fixture's temporary tree, the
//! fake worker's start-up, and the polling helpers.
//!
//! It owns no test of its own and must never sleep for a fixed time in place of polling a
//! condition: every wait here polls with a generous deadline.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tcmu_warden_proto::{Channel, FromWorker, ToWorker};
use tcmu_warden_supervisor::daemon::{DevicePhase, Supervisor};

// ---- fixture ----------------------------------------------------------------------------------

/// A temporary tree: a fake sysfs (`sys/`), fake uio nodes (`dev/`), backing files (`data/`),
/// fake-worker symlinks and their logs (`bin/`). Each test program adds its own devices and
/// configuration helpers in its own `impl Fixture`.
pub struct Fixture {
    _tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub sysfs: PathBuf,
    pub dev: PathBuf,
    pub data: PathBuf,
    pub bin: PathBuf,
}

impl Fixture {
    pub fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let f = Fixture {
            sysfs: root.join("sys"),
            dev: root.join("dev"),
            data: root.join("data"),
            bin: root.join("bin"),
            root,
            _tmp: tmp,
        };
        for d in [&f.sysfs, &f.dev, &f.data, &f.bin] {
            fs::create_dir_all(d).unwrap();
        }
        f
    }

    /// A backing file in the allowed directory; returns its path.
    pub fn backing(&self, name: &str) -> PathBuf {
        let path = self.data.join(name);
        fs::write(&path, format!("BACKING:{name}")).unwrap();
        path
    }

    /// The fake worker executable for `mode` (a symlink to this test program).
    pub fn exe(&self, mode: &str) -> PathBuf {
        let link = self.bin.join(mode);
        if !link.exists() {
            symlink(std::env::current_exe().unwrap(), &link).unwrap();
        }
        link
    }

    /// The journal directory.
    pub fn journals(&self) -> PathBuf {
        self.root.join("journal")
    }

    /// The configuration: the fake worker for `mode`, this tree, `daemon` (more `[daemon]`
    /// lines), a jail that lets the fake workers write their logs in `bin/` and read the fake
    /// sysfs (to report whether the supervisor had blocked a device when it handed it over),
    /// and nothing else, then `handlers`.
    pub fn config_text(&self, mode: &str, daemon: &str, handlers: &str) -> String {
        format!(
            "[daemon]\nworker_exe = {:?}\nsysfs_root = {:?}\ndev_root = {:?}\njournal_dir = {:?}\n\
             {daemon}[jail]\nwrite_paths = [{:?}]\nread_paths = [{:?}]\n{handlers}",
            self.exe(mode).display().to_string(),
            self.sysfs.display().to_string(),
            self.dev.display().to_string(),
            self.journals().display().to_string(),
            self.bin.display().to_string(),
            self.sysfs.display().to_string(),
        )
    }

    /// The `file` handler (allowed under `data/`) and the `ram` handler (with `max_size` when
    /// given).
    pub fn handlers(&self, ram_max: Option<&str>) -> String {
        let max = ram_max
            .map(|m| format!("max_size = {m:?}\n"))
            .unwrap_or_default();
        format!(
            "[handler.file]\nallow_paths = [{:?}]\n[handler.ram]\n{max}",
            self.data.display().to_string()
        )
    }

    /// What the fake workers of `mode` logged.
    pub fn log(&self, mode: &str) -> String {
        fs::read_to_string(self.bin.join(format!("{mode}.log"))).unwrap_or_default()
    }
}

// ---- polling and assertions -------------------------------------------------------------------

/// Turns the event loop until `pred` holds (deadline: 60 s, then fails with the state).
pub fn until(sup: &mut Supervisor, what: &str, pred: impl Fn(&Supervisor) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pred(sup) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}\ndevices: {:#?}\nworkers: {:#?}",
            sup.devices(),
            sup.workers()
        );
        sup.poll_once(Duration::from_millis(50)).unwrap();
    }
}

/// Turns the event loop until device `uio` is served.
pub fn until_ready(sup: &mut Supervisor, uio: &str, what: &str) {
    until(sup, what, |s| phase_of(s, uio) == Some(DevicePhase::Ready));
}

pub fn phase_of(sup: &Supervisor, uio: &str) -> Option<DevicePhase> {
    sup.device_by_uio(uio).map(|d| d.phase)
}

pub fn assert_contains(haystack: &str, needle: &str) {
    assert!(
        haystack.contains(needle),
        "expected to find {needle:?} in:\n{haystack}"
    );
}

// ---- the fake worker --------------------------------------------------------------------------

/// The fake worker's start: who it was started as and its channel to the supervisor.
pub struct FakeWorker {
    /// The symlink this program was started through (`<root>/bin/<mode>`).
    pub argv0: PathBuf,
    /// The symlink's file name, which selects the fake's behaviour.
    pub mode: String,
    /// The channel the supervisor installed (`TCMU_WARDEN_FD`).
    pub chan: Channel,
    log_path: PathBuf,
}

impl FakeWorker {
    /// Takes over the channel the supervisor passed. Opens no descriptor.
    pub fn from_env() -> FakeWorker {
        let argv0 = PathBuf::from(std::env::args_os().next().unwrap_or_default());
        let log_path = PathBuf::from(format!("{}.log", argv0.display()));
        let mode = argv0
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let raw: i32 = std::env::var("TCMU_WARDEN_FD").unwrap().parse().unwrap();
        // SAFETY: the supervisor installed this descriptor for us; nothing else owns it.
        let chan = Channel::from_fd(unsafe { OwnedFd::from_raw_fd(raw) });
        FakeWorker {
            argv0,
            mode,
            chan,
            log_path,
        }
    }

    /// The fixture root's fake sysfs (`bin/<mode>` → `sys/`).
    pub fn sysfs(&self) -> PathBuf {
        self.argv0
            .parent()
            .and_then(Path::parent)
            .map(|r| r.join("sys"))
            .unwrap_or_default()
    }

    /// Appends a line to `<symlink>.log`, which the tests read.
    pub fn log(&self, line: String) {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        f.write_all(format!("{line}\n").as_bytes()).unwrap();
    }

    /// Waits for the supervisor's `Hello`: the worker's name and subtypes (`None`, logged, when
    /// something else came). Logs the stage-two request it carries (`stage two worker=W jail=...`).
    pub fn hello(&self) -> Option<(String, Vec<String>)> {
        match self.chan.recv::<ToWorker>() {
            Ok((
                ToWorker::Hello {
                    worker,
                    subtypes,
                    jail,
                },
                _,
            )) => {
                let jail = jail.map_or_else(
                    || "none".to_owned(),
                    |j| format!("{} syscalls={}", j.action.as_str(), j.syscalls.join(",")),
                );
                self.log(format!("stage two worker={worker} jail={jail}"));
                Some((worker, subtypes))
            }
            other => {
                self.log(format!("expected Hello, got {other:?}"));
                None
            }
        }
    }

    pub fn send(&self, msg: FromWorker) {
        self.chan.send(&msg).unwrap();
    }
}

/// The first bytes of what `fd` refers to (a positional read: the offset is shared with the
/// supervisor's descriptor).
pub fn read_all(fd: &OwnedFd) -> String {
    let file = fs::File::from(fd.try_clone().unwrap());
    let mut buf = vec![0u8; 256];
    let n = file.read_at(&mut buf, 0).unwrap();
    buf.truncate(n);
    String::from_utf8_lossy(&buf).into_owned()
}

// ---- the test runner --------------------------------------------------------------------------

/// The `(name, test)` list [`harness::main`] takes, each test named after its function.
macro_rules! tests {
    ($($test:ident),* $(,)?) => {
        &[$((stringify!($test), $test as fn())),*]
    };
}
pub(crate) use tests;

pub mod harness {
    use std::io::Write;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::process::ExitCode;
    use std::sync::Mutex;

    static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

    struct Capture;

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if std::env::var_os("WARDEN_TEST_LOG").is_some() {
                std::io::stderr().write_all(buf)?;
            }
            LOGS.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The supervisor's log lines since the last call.
    pub fn take_logs() -> String {
        String::from_utf8_lossy(&std::mem::take(&mut *LOGS.lock().unwrap())).into_owned()
    }

    /// The program's entry point: the fake worker when the supervisor started it as one (it
    /// finds `TCMU_WARDEN_FD` in its environment), else the test runner.
    pub fn main(fake_worker: fn() -> ExitCode, tests: &[(&str, fn())]) -> ExitCode {
        if std::env::var_os("TCMU_WARDEN_FD").is_some() {
            return fake_worker();
        }
        run(tests)
    }

    /// Runs the tests named on the command line (substring match; all without arguments).
    fn run(tests: &[(&str, fn())]) -> ExitCode {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.iter().any(|a| a == "--list") {
            for (name, _) in tests {
                println!("{name}: test");
            }
            return ExitCode::SUCCESS;
        }
        let exact = args.iter().any(|a| a == "--exact");
        let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_ansi(false)
            .with_writer(|| Capture)
            .init();
        let selected: Vec<&(&str, fn())> = tests
            .iter()
            .filter(|(name, _)| {
                filters.is_empty()
                    || filters.iter().any(|f| {
                        if exact {
                            name == f
                        } else {
                            name.contains(f.as_str())
                        }
                    })
            })
            .collect();
        println!("\nrunning {} tests", selected.len());
        let mut failed = Vec::new();
        for (name, test) in &selected {
            match catch_unwind(AssertUnwindSafe(test)) {
                Ok(()) => println!("test {name} ... ok"),
                Err(_) => {
                    println!("test {name} ... FAILED");
                    failed.push(*name);
                }
            }
        }
        let passed = selected.len() - failed.len();
        let filtered = tests.len() - selected.len();
        if failed.is_empty() {
            println!("\ntest result: ok. {passed} passed; 0 failed; {filtered} filtered out\n");
            ExitCode::SUCCESS
        } else {
            println!("\nfailures:");
            for name in &failed {
                println!("    {name}");
            }
            println!(
                "\ntest result: FAILED. {passed} passed; {} failed; {filtered} filtered out\n",
                failed.len()
            );
            ExitCode::from(101)
        }
    }
}
