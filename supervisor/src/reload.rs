//! # Configuration reload (SIGHUP)
//!
//! On `SIGHUP` the daemon re-reads its configuration file. A file that does not load is
//! reported and the configuration in force is kept. Otherwise the new policy (handlers,
//! `allow_paths`, `isolation`, `max_size`) and `worker_exe` apply from then on: to devices that
//! appear later and to workers started later. Devices already served keep their worker and
//! their admission; a dev_config change (or a re-created backstore) goes through the new policy.
//! Settings bound at start-up (`sysfs_root`, `dev_root`, `log_format`, `control_socket`,
//! `uevent_source`) need a restart: a change to one is reported and ignored.
//!
//! This module computes what changed ([`changes`]) and which new configuration takes effect
//! ([`merge`]); it never reads files or touches devices.

use std::fmt::Debug;

use crate::config::Config;
use tcmu_warden_policy::format_size;

/// What a reload changes, as human-readable lines (`handler.ram.max_size: none -> 1GiB`), and
/// the keys whose change needs a restart.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Changes that take effect.
    pub applied: Vec<String>,
    /// Changes ignored until a restart.
    pub need_restart: Vec<String>,
}

impl Changes {
    /// Whether nothing changed at all.
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty() && self.need_restart.is_empty()
    }
}

fn cmp<T: PartialEq + Debug>(out: &mut Vec<String>, key: &str, old: &T, new: &T) {
    if old != new {
        out.push(format!("{key}: {old:?} -> {new:?}"));
    }
}

/// Compares two configurations.
pub fn changes(old: &Config, new: &Config) -> Changes {
    let mut c = Changes::default();
    let (o, n) = (&old.daemon, &new.daemon);
    cmp(
        &mut c.applied,
        "daemon.worker_exe",
        &o.worker_exe,
        &n.worker_exe,
    );
    cmp(
        &mut c.applied,
        "daemon.drain_timeout",
        &o.drain_timeout,
        &n.drain_timeout,
    );
    cmp(
        &mut c.need_restart,
        "daemon.sysfs_root",
        &o.sysfs_root,
        &n.sysfs_root,
    );
    cmp(
        &mut c.need_restart,
        "daemon.dev_root",
        &o.dev_root,
        &n.dev_root,
    );
    cmp(
        &mut c.need_restart,
        "daemon.log_format",
        &o.log_format,
        &n.log_format,
    );
    cmp(
        &mut c.need_restart,
        "daemon.control_socket",
        &o.control_socket,
        &n.control_socket,
    );
    cmp(
        &mut c.need_restart,
        "daemon.uevent_source",
        &o.uevent_source,
        &n.uevent_source,
    );
    match (&old.file, &new.file) {
        (None, Some(_)) => c
            .applied
            .push("handler.file: added (file devices are now served)".into()),
        (Some(_), None) => c
            .applied
            .push("handler.file: removed (new file devices are refused)".into()),
        (Some(a), Some(b)) => {
            cmp(
                &mut c.applied,
                "handler.file.allow_paths",
                &a.allow_paths,
                &b.allow_paths,
            );
            if a.isolation != b.isolation {
                c.applied.push(format!(
                    "handler.file.isolation: {} -> {}",
                    a.isolation.as_str(),
                    b.isolation.as_str()
                ));
            }
        }
        (None, None) => {}
    }
    let size = |s: Option<u64>| s.map_or_else(|| "none".to_owned(), format_size);
    match (&old.ram, &new.ram) {
        (None, Some(_)) => c
            .applied
            .push("handler.ram: added (ram devices are now served)".into()),
        (Some(_), None) => c
            .applied
            .push("handler.ram: removed (new ram devices are refused)".into()),
        (Some(a), Some(b)) if a.max_size != b.max_size => c.applied.push(format!(
            "handler.ram.max_size: {} -> {}",
            size(a.max_size),
            size(b.max_size)
        )),
        _ => {}
    }
    c
}

/// The configuration to run with after a reload: `new`, with the settings that need a restart
/// kept from `old`.
pub fn merge(old: &Config, mut new: Config) -> Config {
    new.daemon.sysfs_root = old.daemon.sysfs_root.clone();
    new.daemon.dev_root = old.daemon.dev_root.clone();
    new.daemon.log_format = old.daemon.log_format;
    new.daemon.control_socket = old.daemon.control_socket.clone();
    new.daemon.uevent_source = old.daemon.uevent_source;
    new
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(text: &str) -> Config {
        Config::from_toml_str(text, Path::new("t.toml")).unwrap()
    }

    #[test]
    fn reports_each_change() {
        let old = cfg("[handler.ram]\nmax_size = '1GiB'\n");
        let new = cfg("[daemon]\nsysfs_root = '/tmp/sys'\nworker_exe = '/opt/w'\n\
             [handler.ram]\nmax_size = '2GiB'\n[handler.file]\nallow_paths = ['/srv']\n");
        let c = changes(&old, &new);
        assert!(
            c.applied
                .iter()
                .any(|l| l.starts_with("daemon.worker_exe: None -> Some(\"/opt/w\")")),
            "{c:?}"
        );
        assert!(
            c.applied
                .contains(&"handler.ram.max_size: 1GiB -> 2GiB".to_owned()),
            "{c:?}"
        );
        assert!(
            c.applied
                .iter()
                .any(|l| l.starts_with("handler.file: added")),
            "{c:?}"
        );
        assert_eq!(
            c.need_restart,
            vec!["daemon.sysfs_root: \"/sys\" -> \"/tmp/sys\"".to_owned()]
        );
        let merged = merge(&old, new);
        assert_eq!(merged.daemon.sysfs_root, Path::new("/sys"));
        assert_eq!(
            merged.daemon.worker_exe.as_deref(),
            Some(Path::new("/opt/w"))
        );
        assert!(merged.serves("file"));

        let back = changes(&merged, &old);
        assert!(
            back.applied
                .iter()
                .any(|l| l.starts_with("handler.file: removed")),
            "{back:?}"
        );
        assert!(changes(&old, &old).is_empty());
    }
}
