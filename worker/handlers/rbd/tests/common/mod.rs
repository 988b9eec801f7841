//! A throwaway one-node Ceph cluster (one monitor, one memstore OSD, no manager) on 127.0.0.1 with
//! a port of its own, in a temp dir, killed on drop. See /work/shared/reference/ceph-recipe.md.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
}

fn run(conf: &Path, prog: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(prog)
        .args(args)
        .env("CEPH_CONF", conf)
        .output()
        .map_err(|e| format!("{prog}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{prog} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl TestCluster {
    /// None (with a message) when the ceph binaries are missing.
    pub fn start(port: u16) -> Option<TestCluster> {
        if Command::new("ceph-mon").arg("--version").output().is_err() {
            eprintln!(
                "SKIP: ceph-mon not installed (apt-get install ceph-mon ceph-osd ceph-common librbd-dev)"
            );
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_str().expect("utf-8 tempdir").to_owned();
        let conf = dir.path().join("ceph.conf");
        let fsid = "6b1e3a4c-1d2e-4f5a-8b9c-0d1e2f3a4b5c";
        std::fs::write(
            &conf,
            format!(
                "[global]\nfsid = {fsid}\nmon host = v1:127.0.0.1:{port}\nauth cluster required = cephx\n\
                 auth service required = cephx\nauth client required = cephx\n\
                 osd pool default size = 1\nosd pool default min size = 1\nmon allow pool size one = true\n\
                 osd crush chooseleaf type = 0\nosd pool default pg autoscale mode = off\n\
                 mon warn on pool no redundancy = false\nms bind ipv6 = false\npublic network = 127.0.0.0/8\n\
                 paxos propose interval = 0.1\nmon tick interval = 1\nrun dir = {d}\n\
                 admin socket = {d}/$name.asok\npid file = {d}/$name.pid\nlog file = {d}/$name.log\n\
                 crash dir = {d}/crash\nkeyring = {d}/keyring\nmon data = {d}/mon.$id\n\
                 osd data = {d}/osd.$id\nosd objectstore = memstore\nmemstore device bytes = 1073741824\n\
                 osd memory target = 536870912\n"
            ),
        )
        .expect("write ceph.conf");
        let kr = format!("{d}/keyring");
        let step = || -> Result<(), String> {
            run(
                &conf,
                "ceph-authtool",
                &[
                    "--create-keyring",
                    &kr,
                    "--gen-key",
                    "-n",
                    "mon.",
                    "--cap",
                    "mon",
                    "allow *",
                ],
            )?;
            run(
                &conf,
                "ceph-authtool",
                &[
                    &kr,
                    "--gen-key",
                    "-n",
                    "client.admin",
                    "--cap",
                    "mon",
                    "allow *",
                    "--cap",
                    "osd",
                    "allow *",
                    "--cap",
                    "mgr",
                    "allow *",
                    "--cap",
                    "mds",
                    "allow *",
                ],
            )?;
            let mm = format!("{d}/monmap");
            run(
                &conf,
                "monmaptool",
                &[
                    "--create",
                    "--fsid",
                    fsid,
                    "--addv",
                    "a",
                    &format!("[v1:127.0.0.1:{port}]"),
                    &mm,
                ],
            )?;
            run(
                &conf,
                "ceph-mon",
                &[
                    "-c",
                    conf.to_str().unwrap_or(""),
                    "--mkfs",
                    "-i",
                    "a",
                    "--monmap",
                    &mm,
                    "--keyring",
                    &kr,
                ],
            )?;
            run(
                &conf,
                "ceph-mon",
                &["-c", conf.to_str().unwrap_or(""), "-i", "a"],
            )?;
            let uuid = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
            let id = run(&conf, "ceph", &["osd", "new", uuid])?.trim().to_owned();
            std::fs::create_dir_all(format!("{d}/osd.{id}")).map_err(|e| e.to_string())?;
            let okr = format!("{d}/osd.{id}/keyring");
            run(
                &conf,
                "ceph-osd",
                &[
                    "-c",
                    conf.to_str().unwrap_or(""),
                    "-i",
                    &id,
                    "--mkfs",
                    "--mkkey",
                    "--osd-uuid",
                    uuid,
                    "--no-mon-config",
                    "--keyring",
                    &okr,
                ],
            )?;
            run(
                &conf,
                "ceph",
                &[
                    "auth",
                    "add",
                    &format!("osd.{id}"),
                    "osd",
                    "allow *",
                    "mon",
                    "allow profile osd",
                    "mgr",
                    "allow profile osd",
                    "-i",
                    &okr,
                ],
            )?;
            run(
                &conf,
                "ceph-osd",
                &[
                    "-c",
                    conf.to_str().unwrap_or(""),
                    "-i",
                    &id,
                    "--keyring",
                    &okr,
                ],
            )?;
            let t0 = Instant::now();
            while !run(&conf, "ceph", &["osd", "stat", "-f", "json"])?.contains("\"num_up_osds\":1")
            {
                if t0.elapsed() > Duration::from_secs(60) {
                    return Err("OSD not up after 60 s".into());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            run(
                &conf,
                "ceph",
                &["osd", "pool", "create", "rbd", "8", "8", "replicated"],
            )?;
            run(
                &conf,
                "ceph",
                &["osd", "pool", "application", "enable", "rbd", "rbd"],
            )?;
            run(&conf, "rbd", &["pool", "init", "rbd"])?;
            Ok(())
        };
        let c = TestCluster {
            dir,
            conf: conf.clone(),
        };
        if let Err(e) = step() {
            panic!("cluster start failed: {e}");
        }
        Some(c)
    }

    pub fn rbd(&self, args: &[&str]) -> String {
        run(&self.conf, "rbd", args).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for e in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "pid") {
                if let Ok(pid) = std::fs::read_to_string(&p) {
                    if let Ok(pid) = pid.trim().parse::<i32>() {
                        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
                    }
                }
            }
        }
    }
}
