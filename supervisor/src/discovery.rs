//! # Discovery: which TCMU devices exist, and what are they like
//!
//! Every TCMU device (a LIO `user` backstore that has been enabled) appears as a UIO device,
//! `/sys/class/uio/uioN`, whose `name` attribute reads
//! `tcm-user/<hba>/<name>/<subtype>/<cfgstring>`: the LIO HBA number (the `user_<hba>` directory
//! in configfs), the backstore's name, and its `dev_config`, which is the handler subtype, a
//! slash, and the handler-specific cfgstring (which may itself contain slashes, or be empty). A
//! backstore created without `dev_config` reads just `tcm-user/<hba>/<name>`. UIO devices whose
//! name does not start with `tcm-user/` belong to other drivers and are ignored.
//!
//! For each TCMU device this module reads the size of the shared mapping
//! (`maps/map0/size`, hexadecimal) and the backstore's attributes in configfs
//! (`kernel/config/target/core/user_<hba>/<name>/`): `attrib/dev_size`, `attrib/hw_block_size`,
//! `attrib/hw_max_sectors`, `attrib/emulate_write_cache` and `wwn/vpd_unit_serial` (the unit
//! serial number SCSI INQUIRY reports). Everything is looked up under a configurable sysfs root
//! so tests can build a fake tree.
//!
//! This module only reads. It never opens `/dev/uioN` (that is the daemon's job, and `open` of a
//! TCMU uio device is exclusive), and it never fails the whole scan because of one device: each
//! problem is a [`DiscoveryError`] naming the file, reported beside the devices that were fine.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Prefix of the UIO name of every TCMU device.
pub const TCMU_UIO_PREFIX: &str = "tcm-user/";

/// Largest attribute file read (sysfs attributes are at most a page).
const MAX_ATTR_BYTES: u64 = 64 * 1024;

/// A problem with one device's sysfs or configfs files.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// A file could not be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file's content is not what the kernel writes there.
    #[error("{}: {why}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// Why the text of one sysfs or configfs attribute is not what the kernel writes there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttrError {
    /// The HBA number of a uio `name` is not a number.
    #[error("HBA number {0:?} is not a number")]
    BadHba(String),
    /// The backstore name of a uio `name` is empty.
    #[error("the backstore name is empty")]
    EmptyName,
    /// `maps/map0/size` is not a size.
    #[error("{0:?} is not a size")]
    BadSize(String),
    /// `wwn/vpd_unit_serial` lacks its `...: <serial>` form.
    #[error("{0:?} lacks the \"...: <serial>\" form")]
    BadSerialForm(String),
    /// The serial holds control characters.
    #[error("the serial contains control characters")]
    SerialControl,
    /// The serial is longer than the wire allows.
    #[error("the serial is {0} bytes long")]
    SerialTooLong(usize),
}

/// The parsed `name` attribute of a TCMU uio device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UioName {
    /// LIO HBA number (`user_<hba>`).
    pub hba: u32,
    /// Backstore name.
    pub name: String,
    /// Handler subtype; `None` when the backstore has no `dev_config` (or an empty subtype).
    pub subtype: Option<String>,
    /// Handler configuration string (empty when absent).
    pub cfgstring: String,
}

/// Parses a uio `name` attribute. `Ok(None)`: not a TCMU device. A trailing newline (as sysfs
/// prints it) is ignored.
pub fn parse_uio_name(text: &str) -> Result<Option<UioName>, AttrError> {
    let text = text.strip_suffix('\n').unwrap_or(text);
    let Some(rest) = text.strip_prefix(TCMU_UIO_PREFIX) else {
        return Ok(None);
    };
    let mut parts = rest.splitn(3, '/');
    let hba_text = parts.next().unwrap_or_default();
    let hba: u32 = hba_text
        .parse()
        .map_err(|_| AttrError::BadHba(hba_text.to_owned()))?;
    let name = parts.next().unwrap_or_default();
    if name.is_empty() {
        return Err(AttrError::EmptyName);
    }
    let (subtype, cfgstring) = match parts.next() {
        None => (None, String::new()),
        Some(dev_config) => match dev_config.split_once('/') {
            Some((subtype, cfg)) => (Some(subtype), cfg.to_owned()),
            None => (Some(dev_config), String::new()),
        },
    };
    Ok(Some(UioName {
        hba,
        name: name.to_owned(),
        subtype: subtype.filter(|s| !s.is_empty()).map(str::to_owned),
        cfgstring,
    }))
}

/// Everything known about one TCMU device after discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcmuDevice {
    /// The UIO device, e.g. `uio0` (its node is `<dev_root>/uio0`).
    pub uio: String,
    /// LIO HBA number.
    pub hba: u32,
    /// Backstore name.
    pub name: String,
    /// Handler subtype, if the backstore has a `dev_config`.
    pub subtype: Option<String>,
    /// Handler configuration string.
    pub cfgstring: String,
    /// Exact size of the shared mapping in bytes.
    pub map_size: u64,
    /// Device size in bytes.
    pub dev_size: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Largest transfer, in blocks.
    pub max_sectors: u32,
    /// Whether the device advertises a volatile write cache.
    pub write_cache: bool,
    /// Unit serial number (from configfs, or derived from HBA and name when configfs has none).
    pub unit_serial: String,
}

impl TcmuDevice {
    /// `user_<hba>/<name>`: how LIO tools name the backstore (for logs).
    pub fn label(&self) -> String {
        format!("user_{}/{}", self.hba, self.name)
    }
}

/// The outcome of a scan: devices that were read completely, and the ones that were not.
#[derive(Debug, Default)]
pub struct Scan {
    /// Devices ready to be served, ordered by uio number.
    pub devices: Vec<TcmuDevice>,
    /// Devices skipped, with the uio name and the reason.
    pub skipped: Vec<(String, DiscoveryError)>,
}

/// Whether `name` looks like a uio device name (`uio` and a number).
pub fn is_uio_name(name: &str) -> bool {
    uio_number(name).is_some()
}

fn uio_number(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("uio")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Scans `<sysfs_root>/class/uio` for TCMU devices. A missing `class/uio` directory (the uio
/// module is not loaded) is an empty scan.
pub fn scan(sysfs_root: &Path) -> Result<Scan, DiscoveryError> {
    let class = sysfs_root.join("class/uio");
    let entries = match fs::read_dir(&class) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Scan::default()),
        Err(source) => {
            return Err(DiscoveryError::Read {
                path: class,
                source,
            });
        }
    };
    let mut uios: Vec<(u32, String)> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| DiscoveryError::Read {
            path: class.clone(),
            source,
        })?;
        if let Some(name) = entry.file_name().to_str()
            && let Some(n) = uio_number(name)
        {
            uios.push((n, name.to_owned()));
        }
    }
    uios.sort();
    let mut scan = Scan::default();
    for (_, uio) in uios {
        match read_device(sysfs_root, &uio) {
            Ok(Some(dev)) => scan.devices.push(dev),
            Ok(None) => {}
            Err(e) => scan.skipped.push((uio, e)),
        }
    }
    Ok(scan)
}

/// Reads one uio device. `Ok(None)`: it is not a TCMU device.
pub fn read_device(sysfs_root: &Path, uio: &str) -> Result<Option<TcmuDevice>, DiscoveryError> {
    let uio_dir = sysfs_root.join("class/uio").join(uio);
    if !is_uio_name(uio) {
        return Err(DiscoveryError::Parse {
            path: uio_dir,
            why: format!("{uio:?} is not a uio device name"),
        });
    }
    let name_path = uio_dir.join("name");
    let text = read_attr(&name_path)?;
    let Some(parsed) = parse_uio_name(&text).map_err(|why| DiscoveryError::Parse {
        path: name_path.clone(),
        why: why.to_string(),
    })?
    else {
        return Ok(None);
    };

    let map_path = uio_dir.join("maps/map0/size");
    let map_size = parse_map_size(&read_attr(&map_path)?).map_err(|why| DiscoveryError::Parse {
        path: map_path.clone(),
        why: why.to_string(),
    })?;
    if !(4096..=(1 << 40)).contains(&map_size) {
        return Err(DiscoveryError::Parse {
            path: map_path,
            why: format!("map size {map_size} is out of range"),
        });
    }

    let dir = configfs_dir(sysfs_root, parsed.hba, &parsed.name);
    let dev_size: u64 = parse_attr(&dir.join("attrib/dev_size"))?;
    let block_path = dir.join("attrib/hw_block_size");
    let block_size: u32 = parse_attr(&block_path)?;
    if !(512..=65536).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(DiscoveryError::Parse {
            path: block_path,
            why: format!("block size {block_size} is not a power of two in 512..=65536"),
        });
    }
    let sectors_path = dir.join("attrib/hw_max_sectors");
    let max_sectors: u32 = parse_attr(&sectors_path)?;
    if max_sectors == 0 {
        return Err(DiscoveryError::Parse {
            path: sectors_path,
            why: "hw_max_sectors is 0".into(),
        });
    }
    if dev_size < u64::from(block_size) {
        return Err(DiscoveryError::Parse {
            path: dir.join("attrib/dev_size"),
            why: format!("device size {dev_size} holds no whole {block_size}-byte block"),
        });
    }
    let wc_path = dir.join("attrib/emulate_write_cache");
    let write_cache = match parse_attr::<u8>(&wc_path)? {
        0 => false,
        1 => true,
        other => {
            return Err(DiscoveryError::Parse {
                path: wc_path,
                why: format!("expected 0 or 1, found {other}"),
            });
        }
    };
    let serial_path = dir.join("wwn/vpd_unit_serial");
    let serial =
        parse_unit_serial(&read_attr(&serial_path)?).map_err(|why| DiscoveryError::Parse {
            path: serial_path,
            why: why.to_string(),
        })?;
    let unit_serial = serial.unwrap_or_else(|| derived_serial(parsed.hba, &parsed.name));

    Ok(Some(TcmuDevice {
        uio: uio.to_owned(),
        hba: parsed.hba,
        name: parsed.name,
        subtype: parsed.subtype,
        cfgstring: parsed.cfgstring,
        map_size,
        dev_size,
        block_size,
        max_sectors,
        write_cache,
        unit_serial,
    }))
}

/// `<sysfs_root>/kernel/config/target/core/user_<hba>/<name>`.
pub fn configfs_dir(sysfs_root: &Path, hba: u32, name: &str) -> PathBuf {
    sysfs_root
        .join("kernel/config/target/core")
        .join(format!("user_{hba}"))
        .join(name)
}

/// Parses `maps/map0/size`: hexadecimal with `0x` (as the uio driver prints it), or decimal.
pub fn parse_map_size(text: &str) -> Result<u64, AttrError> {
    let t = text.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.map_err(|_| AttrError::BadSize(t.to_owned()))
}

/// Parses `wwn/vpd_unit_serial` (`T10 VPD Unit Serial Number: <serial>`). `Ok(None)`: no serial
/// is set.
pub fn parse_unit_serial(text: &str) -> Result<Option<String>, AttrError> {
    let (_, serial) = text
        .split_once(':')
        .ok_or_else(|| AttrError::BadSerialForm(text.trim().to_owned()))?;
    let serial = serial.trim();
    if serial.is_empty() {
        return Ok(None);
    }
    if serial.chars().any(char::is_control) {
        return Err(AttrError::SerialControl);
    }
    if serial.len() > tcmu_warden_proto::MAX_NAME_LEN {
        return Err(AttrError::SerialTooLong(serial.len()));
    }
    Ok(Some(serial.to_owned()))
}

/// A serial for a backstore that has none, stable across restarts: 16 hex digits of a 64-bit
/// FNV-1a hash of `user_<hba>/<name>`.
pub fn derived_serial(hba: u32, name: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in format!("user_{hba}/{name}").bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

fn read_attr(path: &Path) -> Result<String, DiscoveryError> {
    let read = || -> io::Result<String> {
        let mut text = String::new();
        fs::File::open(path)?
            .take(MAX_ATTR_BYTES)
            .read_to_string(&mut text)?;
        Ok(text)
    };
    read().map_err(|source| DiscoveryError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_attr<T: std::str::FromStr>(path: &Path) -> Result<T, DiscoveryError> {
    let text = read_attr(path)?;
    text.trim().parse().map_err(|_| DiscoveryError::Parse {
        path: path.to_path_buf(),
        why: format!("{:?} is not a valid number", text.trim()),
    })
}

/// Test support: writes a fake sysfs tree for one device.
#[doc(hidden)]
pub mod fake {
    use std::fs;
    use std::io;
    use std::path::Path;

    /// Attributes of a fake device.
    #[derive(Debug, Clone)]
    pub struct FakeDevice<'a> {
        /// `uioN`.
        pub uio: &'a str,
        /// The full uio `name` attribute.
        pub uio_name: String,
        /// HBA number for the configfs directory.
        pub hba: u32,
        /// Backstore name for the configfs directory.
        pub name: &'a str,
        /// `maps/map0/size` content.
        pub map_size: &'a str,
        /// `attrib/dev_size`.
        pub dev_size: u64,
        /// `attrib/hw_block_size`.
        pub block_size: u32,
        /// `attrib/hw_max_sectors`.
        pub max_sectors: u32,
        /// `attrib/emulate_write_cache`.
        pub write_cache: u8,
        /// The serial after `T10 VPD Unit Serial Number: `.
        pub serial: &'a str,
    }

    impl<'a> FakeDevice<'a> {
        /// A 1 GiB, 512-byte-block device `user_<hba>/<name>` with `dev_config` (if any).
        pub fn new(uio: &'a str, hba: u32, name: &'a str, dev_config: Option<&str>) -> Self {
            let uio_name = match dev_config {
                Some(cfg) => format!("tcm-user/{hba}/{name}/{cfg}"),
                None => format!("tcm-user/{hba}/{name}"),
            };
            FakeDevice {
                uio,
                uio_name,
                hba,
                name,
                map_size: "0x40800000",
                dev_size: 1 << 30,
                block_size: 512,
                max_sectors: 128,
                write_cache: 0,
                serial: "6b1e2f4c-9a2d-4c1e-8f00-0123456789ab",
            }
        }

        /// Writes the device's files under `sysfs_root`.
        pub fn write(&self, sysfs_root: &Path) -> io::Result<()> {
            let uio = sysfs_root.join("class/uio").join(self.uio);
            fs::create_dir_all(uio.join("maps/map0"))?;
            fs::write(uio.join("name"), format!("{}\n", self.uio_name))?;
            fs::write(uio.join("maps/map0/size"), format!("{}\n", self.map_size))?;
            let dir = super::configfs_dir(sysfs_root, self.hba, self.name);
            fs::create_dir_all(dir.join("attrib"))?;
            fs::create_dir_all(dir.join("wwn"))?;
            let attrib = dir.join("attrib");
            fs::write(attrib.join("dev_size"), format!("{}\n", self.dev_size))?;
            fs::write(
                attrib.join("hw_block_size"),
                format!("{}\n", self.block_size),
            )?;
            fs::write(
                attrib.join("hw_max_sectors"),
                format!("{}\n", self.max_sectors),
            )?;
            fs::write(
                attrib.join("emulate_write_cache"),
                format!("{}\n", self.write_cache),
            )?;
            fs::write(
                dir.join("wwn/vpd_unit_serial"),
                format!("T10 VPD Unit Serial Number: {}\n", self.serial),
            )?;
            // The write-only action attributes (empty until written, unlike configfs).
            fs::create_dir_all(dir.join("action"))?;
            for attr in ["block_dev", "reset_ring", "free_kept_buf"] {
                fs::write(dir.join("action").join(attr), "")?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeDevice;
    use super::*;

    #[test]
    fn uio_names() {
        let n = parse_uio_name("tcm-user/1/disk0/file//var/lib/tcmu/a b.img\n")
            .unwrap()
            .unwrap();
        assert_eq!(n.hba, 1);
        assert_eq!(n.name, "disk0");
        assert_eq!(n.subtype.as_deref(), Some("file"));
        assert_eq!(n.cfgstring, "/var/lib/tcmu/a b.img");

        let n = parse_uio_name("tcm-user/12/r/ram/").unwrap().unwrap();
        assert_eq!(
            (n.subtype.as_deref(), n.cfgstring.as_str()),
            (Some("ram"), "")
        );
        let n = parse_uio_name("tcm-user/12/r/ram").unwrap().unwrap();
        assert_eq!(
            (n.subtype.as_deref(), n.cfgstring.as_str()),
            (Some("ram"), "")
        );
        let n = parse_uio_name("tcm-user/3/bare\n").unwrap().unwrap();
        assert_eq!(n.subtype, None);
        assert_eq!(n.cfgstring, "");
        let n = parse_uio_name("tcm-user/3/x//weird").unwrap().unwrap();
        assert_eq!(n.subtype, None);
        assert_eq!(n.cfgstring, "weird");
        let n = parse_uio_name("tcm-user/0/d/qcow/a/b/c.qcow2")
            .unwrap()
            .unwrap();
        assert_eq!(n.cfgstring, "a/b/c.qcow2");

        assert_eq!(parse_uio_name("uio_pdrv_genirq\n").unwrap(), None);
        assert_eq!(parse_uio_name("").unwrap(), None);
        assert!(parse_uio_name("tcm-user/x/disk0/file/a").is_err());
        assert!(parse_uio_name("tcm-user/1/").is_err());
        assert!(parse_uio_name("tcm-user/1").is_err());
        assert!(parse_uio_name("tcm-user/-1/d").is_err());
    }

    #[test]
    fn attribute_parsers() {
        assert_eq!(parse_map_size("0x40800000\n"), Ok(0x4080_0000));
        assert_eq!(parse_map_size("4096"), Ok(4096));
        assert!(parse_map_size("0xzz").is_err());
        assert!(parse_map_size("").is_err());
        assert_eq!(
            parse_unit_serial("T10 VPD Unit Serial Number: 6b1e-99 \n"),
            Ok(Some("6b1e-99".into()))
        );
        assert_eq!(
            parse_unit_serial("T10 VPD Unit Serial Number: \n"),
            Ok(None)
        );
        assert!(parse_unit_serial("garbage\n").is_err());
        assert!(parse_unit_serial("T10 VPD Unit Serial Number: a\u{7}b").is_err());
    }

    #[test]
    fn derived_serial_is_stable_and_distinct() {
        assert_eq!(derived_serial(1, "disk0"), derived_serial(1, "disk0"));
        assert_ne!(derived_serial(1, "disk0"), derived_serial(2, "disk0"));
        assert_ne!(derived_serial(1, "disk0"), derived_serial(1, "disk1"));
        assert_eq!(derived_serial(1, "disk0").len(), 16);
        // FNV-1a is fixed: pin one value so a change is noticed (serials must not move).
        assert_eq!(
            derived_serial(0, ""),
            format!("{:016x}", fnv_reference(b"user_0/"))
        );
    }

    fn fnv_reference(bytes: &[u8]) -> u64 {
        bytes.iter().fold(14_695_981_039_346_656_037u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(1_099_511_628_211)
        })
    }

    #[test]
    fn scan_fake_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let mut file = FakeDevice::new("uio10", 1, "disk0", Some("file//srv/disks/d0.img"));
        file.write_cache = 1;
        file.block_size = 4096;
        file.write(root).unwrap();
        let mut ram = FakeDevice::new("uio2", 2, "scratch", Some("ram/"));
        ram.serial = "";
        ram.write(root).unwrap();
        FakeDevice::new("uio3", 3, "bare", None)
            .write(root)
            .unwrap();
        // A uio device from another driver.
        let other = root.join("class/uio/uio0");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join("name"), "uio_pdrv_genirq\n").unwrap();
        // A broken TCMU device: bad block size.
        let mut bad = FakeDevice::new("uio4", 4, "bad", Some("file//x"));
        bad.block_size = 1000;
        bad.write(root).unwrap();
        // A TCMU device whose configfs directory is missing.
        let lost = root.join("class/uio/uio5");
        fs::create_dir_all(lost.join("maps/map0")).unwrap();
        fs::write(lost.join("name"), "tcm-user/9/lost/ram/\n").unwrap();
        fs::write(lost.join("maps/map0/size"), "0x1000\n").unwrap();
        // Not a uio entry at all.
        fs::create_dir_all(root.join("class/uio/power")).unwrap();

        let scan = scan(root).unwrap();
        let uios: Vec<&str> = scan.devices.iter().map(|d| d.uio.as_str()).collect();
        assert_eq!(uios, ["uio2", "uio3", "uio10"]);

        let d = scan.devices.iter().find(|d| d.uio == "uio10").unwrap();
        assert_eq!(
            d,
            &TcmuDevice {
                uio: "uio10".into(),
                hba: 1,
                name: "disk0".into(),
                subtype: Some("file".into()),
                cfgstring: "/srv/disks/d0.img".into(),
                map_size: 0x4080_0000,
                dev_size: 1 << 30,
                block_size: 4096,
                max_sectors: 128,
                write_cache: true,
                unit_serial: "6b1e2f4c-9a2d-4c1e-8f00-0123456789ab".into(),
            }
        );
        assert_eq!(d.label(), "user_1/disk0");
        let r = scan.devices.iter().find(|d| d.uio == "uio2").unwrap();
        assert_eq!(r.unit_serial, derived_serial(2, "scratch"));
        assert!(!r.write_cache);
        let b = scan.devices.iter().find(|d| d.uio == "uio3").unwrap();
        assert_eq!(b.subtype, None);

        assert_eq!(scan.skipped.len(), 2);
        let (uio, err) = &scan.skipped[0];
        assert_eq!(uio, "uio4");
        assert!(err.to_string().contains("hw_block_size"), "{err}");
        let (uio, err) = &scan.skipped[1];
        assert_eq!(uio, "uio5");
        assert!(matches!(err, DiscoveryError::Read { .. }), "{err}");
        assert!(
            err.to_string().contains("user_9/lost/attrib/dev_size"),
            "{err}"
        );
    }

    #[test]
    fn each_bad_attribute_names_its_file() {
        type Spoil = fn(&mut FakeDevice<'_>);
        let cases: [(&str, Spoil); 6] = [
            ("maps/map0/size", |d| d.map_size = "lots"),
            ("maps/map0/size", |d| d.map_size = "0x10"),
            ("attrib/dev_size", |d| d.dev_size = 100),
            ("attrib/hw_max_sectors", |d| d.max_sectors = 0),
            ("attrib/emulate_write_cache", |d| d.write_cache = 2),
            ("wwn/vpd_unit_serial", |d| d.serial = "a\u{1b}[31m"),
        ];
        for (file, spoil) in cases {
            let tmp = tempfile::tempdir().unwrap();
            let mut dev = FakeDevice::new("uio0", 1, "d", Some("ram/"));
            spoil(&mut dev);
            dev.write(tmp.path()).unwrap();
            let err = read_device(tmp.path(), "uio0").unwrap_err();
            assert!(err.to_string().contains(file), "{file}: {err}");
        }
    }

    #[test]
    fn missing_class_dir_is_an_empty_scan() {
        let tmp = tempfile::tempdir().unwrap();
        let scan = scan(tmp.path()).unwrap();
        assert!(scan.devices.is_empty() && scan.skipped.is_empty());
    }

    #[test]
    fn uio_name_check() {
        assert!(is_uio_name("uio0"));
        assert!(is_uio_name("uio123"));
        assert!(!is_uio_name("uio"));
        assert!(!is_uio_name("uio1a"));
        assert!(!is_uio_name("../uio1"));
        assert!(!is_uio_name("uio-1"));
        assert!(read_device(Path::new("/nonexistent"), "../etc").is_err());
    }
}
