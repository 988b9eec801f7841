//! Tests of the `[jail]` keys of the configuration file: defaults, per-handler overrides, and
//! errors that name the key and line. The filters and rulesets themselves are tested in the
//! policy crate.

use std::path::{Path, PathBuf};

use tcmu_warden_policy::jail::settings::{Id, Namespace, Network, Rlimits};
use tcmu_warden_policy::{Backing, JailSettings, LandlockMode, SeccompMode};

use super::{Config, ConfigError};

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str(text, Path::new("/etc/w.toml"))
}

fn error_at(text: &str) -> (usize, String) {
    match parse(text).unwrap_err() {
        ConfigError::Invalid {
            line: Some(l),
            message,
            ..
        } => (l, message),
        other => panic!("unexpected error {other:?}"),
    }
}

#[test]
fn jail_defaults_and_handler_overrides() {
    let cfg = parse(
        r#"
[jail]
user = "root"
read_paths = ["/usr/share", "/usr/share/"]
write_paths = ["/var/log/tcmu"]
rlimits = { open_files = 512, core_size = "1MiB" }
landlock = "best-effort"

[handler.file]
allow_paths = ["/srv/disks"]
isolation = "device"
user = 0
group = "0"
namespaces = ["ipc", "mount"]
rlimits = { address_space = "8GiB", processes = 64 }
seccomp_action = "log"
syscalls = ["sync_file_range", "fadvise64", "sync_file_range"]

[handler.qcow]
exe = "/usr/libexec/qcow-worker"
backing = "fd"
allow_paths = ["/srv/qcow"]
network = "tcp"
connect_ports = [3260, 3260, 4420]
io_uring = true
"#,
    )
    .unwrap();
    // [jail] holds the defaults.
    assert_eq!(
        cfg.jail.user,
        Some(Id {
            name: "root".into(),
            id: 0
        })
    );
    assert_eq!(cfg.jail.group.as_ref().map(|g| g.id), Some(0));
    assert_eq!(cfg.jail.read_paths, vec![PathBuf::from("/usr/share")]);
    assert_eq!(cfg.jail.rlimits.open_files, 512);
    assert_eq!(cfg.jail.rlimits.core_size, 1 << 20);
    assert_eq!(cfg.jail.landlock, LandlockMode::BestEffort);
    assert_eq!(cfg.jail.seccomp_action, SeccompMode::Kill);

    // A handler overrides key by key (rlimits entry by entry) and inherits the rest.
    let file = cfg.handler("file").unwrap();
    assert_eq!(file.backing, Backing::Fd);
    assert_eq!(file.isolation, super::Isolation::Device);
    assert_eq!(file.jail.write_paths, vec![PathBuf::from("/var/log/tcmu")]);
    assert_eq!(file.jail.landlock, LandlockMode::BestEffort);
    assert_eq!(file.jail.seccomp_action, SeccompMode::Log);
    assert_eq!(
        file.jail.rlimits,
        Rlimits {
            open_files: 512,
            address_space: Some(8 << 30),
            processes: Some(64),
            core_size: 1 << 20,
        }
    );
    assert_eq!(
        file.jail.effective_namespaces(),
        vec![Namespace::Ipc, Namespace::Mount]
    );
    assert_eq!(file.jail.syscalls, vec!["sync_file_range", "fadvise64"]);

    // A third-party subtype with its own executable, backing descriptors and TCP.
    let qcow = cfg.handler("qcow").unwrap();
    assert_eq!(
        qcow.exe.as_deref(),
        Some(Path::new("/usr/libexec/qcow-worker"))
    );
    assert_eq!(qcow.allow_paths, vec![PathBuf::from("/srv/qcow")]);
    assert_eq!(
        qcow.jail.network,
        Network::Tcp {
            connect_ports: vec![3260, 4420]
        }
    );
    assert!(qcow.jail.io_uring);
    // Without "net": a TCP worker keeps the host's network.
    assert_eq!(
        qcow.jail.effective_namespaces(),
        vec![Namespace::Ipc, Namespace::Uts]
    );
    assert_eq!(cfg.served_subtypes(), vec!["file", "qcow"]);
    assert!(cfg.serves("qcow"));

    // No section at all: every default.
    let cfg = parse("[handler.ram]\n").unwrap();
    let ram = cfg.handler("ram").unwrap();
    assert_eq!(ram.backing, Backing::None);
    assert_eq!(ram.jail, JailSettings::default());
    assert_eq!(
        ram.jail.effective_namespaces(),
        vec![Namespace::Ipc, Namespace::Net, Namespace::Uts]
    );
    assert_eq!(ram.jail.rlimits.open_files, 4096);
    assert_eq!(ram.jail.landlock, LandlockMode::Required);
}

#[test]
fn jail_errors_name_key_and_line() {
    let cases: &[(&str, usize, &str)] = &[
        ("[jail]\nuser = 'no-such-user-here'\n", 2, "no such user"),
        ("[jail]\ngroup = 'no-such-group-here'\n", 2, "no such group"),
        ("[jail]\nuser = -1\n", 2, "not an id"),
        (
            "[jail]\nsyscalls = ['read',\n 'mount']\n",
            3,
            "denied to every worker",
        ),
        (
            "[jail]\nsyscalls = ['frobnicate']\n",
            2,
            "not a system call",
        ),
        ("[jail]\nsyscalls = ['socket']\n", 2, "network"),
        (
            "[jail]\nsyscalls = ['io_uring_setup']\n",
            2,
            "io_uring = true",
        ),
        (
            "[jail]\nconnect_ports = [80]\n",
            2,
            "needs network = \"tcp\"",
        ),
        ("[jail]\nnetwork = 'tcp'\n", 2, "needs connect_ports"),
        (
            "[jail]\nnetwork = 'tcp'\nconnect_ports = [0]\n",
            3,
            "not a TCP port",
        ),
        ("[jail]\nnetwork = 'udp'\n", 2, "\"udp\""),
        (
            "[jail]\nnetwork = 'tcp'\nconnect_ports = [80]\nnamespaces = ['net']\n",
            4,
            "new \"net\" namespace",
        ),
        ("[jail]\nnamespaces = ['pid']\n", 2, "\"pid\" is not one of"),
        ("[jail]\nlandlock = 'maybe'\n", 2, "\"maybe\""),
        ("[jail]\nseccomp_action = 'trap'\n", 2, "\"trap\""),
        ("[jail]\nrlimits = { open_files = 3 }\n", 2, "minimum of 16"),
        (
            "[jail]\nrlimits = { address_space = '1MiB' }\n",
            2,
            "too small",
        ),
        (
            "[jail]\nrlimits = { nofile = 3 }\n",
            2,
            "unknown field `nofile`",
        ),
        ("[jail]\nread_paths = ['etc']\n", 2, "jail.read_paths"),
        (
            "[jail]\nexe = '/bin/w'\n",
            2,
            "belongs in a [handler.<subtype>]",
        ),
        ("[jail]\nallow_paths = ['/a']\n", 2, "belongs in a [handler"),
        ("\n[handler.qcow]\nisolation = 'device'\n", 2, "needs exe"),
        (
            "[handler.file]\nallow_paths = ['/a']\nbacking = 'none'\n",
            3,
            "needs backing = \"fd\"",
        ),
        (
            "[handler.ram]\nbacking = 'fd'\n",
            2,
            "needs backing = \"none\"",
        ),
        (
            "[handler.x]\nexe = '/w'\nallow_paths = ['/a']\n",
            3,
            "only applies with backing = \"fd\"",
        ),
        (
            "[handler.x]\nexe = '/w'\nbacking = 'fd'\n",
            1,
            "needs allow_paths",
        ),
        (
            "[handler.file]\nallow_paths = ['/a']\nmax_size = '1GiB'\n",
            3,
            "only [handler.ram]",
        ),
        ("[handler.'a b']\nexe = '/w'\n", 1, "not a subtype name"),
        (
            "[handler.file]\nallow_paths = ['/a']\nuser = 'no-such-user-here'\n",
            3,
            "handler.file.user",
        ),
    ];
    for (text, line, needle) in cases {
        let (got_line, msg) = error_at(text);
        assert!(msg.contains(needle), "{text:?}: {msg}");
        assert_eq!(got_line, *line, "{text:?}: {msg}");
    }
}

#[test]
fn third_party_backing_is_admitted_by_its_own_allow_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().canonicalize().unwrap();
    std::fs::write(dir.join("a.qcow2"), b"x").unwrap();
    let text = format!(
        "[handler.qcow]\nexe = '/w'\nbacking = 'fd'\nallow_paths = [{:?}]\n",
        dir.display().to_string()
    );
    let cfg = parse(&text).unwrap();
    let cfgstring = dir.join("a.qcow2").display().to_string();
    let admitted = cfg.admit(Some("qcow"), &cfgstring, 1 << 20).unwrap();
    assert!(admitted.into_backing().is_some());
    let err = cfg.admit(Some("qcow"), "/etc/passwd", 1 << 20).unwrap_err();
    assert_eq!(err.rule(), "handler.qcow.allow_paths");
    // `file` is not served: its section is absent.
    let err = cfg.admit(Some("file"), &cfgstring, 1 << 20).unwrap_err();
    assert_eq!(err.rule(), "handler.file");
}
