//! # From the supervisor's device description to the handler's
//!
//! The supervisor describes each device in a [`DeviceSpec`] (the wire's type); a handler sees the
//! SDK's [`DeviceConfig`]. [`device_config`] is the one conversion between them, including the
//! floor on the maximum transfer length ([`MIN_MAX_TRANSFER_BYTES`]).

use tcmu_warden_proto::DeviceSpec;
use tcmu_warden_sdk::DeviceConfig;

/// The smallest maximum transfer length a device gets, in bytes: 32 MiB, or a quarter of the
/// device's shared-memory region if that is smaller.
///
/// For a TCMU device `hw_max_sectors` is only a number the kernel hands to userspace: it is 128
/// blocks unless configured otherwise (`target_core_user.c`, `tcmu_configure_device`), and the
/// kernel never checks commands against it (`passthrough_parse_cdb` passes every READ/WRITE
/// through; LIO's own `fileio` backstore does not check its 8 MiB either). The only limit the
/// kernel applies to a TCMU command is the ring's data area (1 GiB by default): a larger command
/// is refused there with INVALID FIELD IN CDB (`tcmu_queue_cmd_ring`). Enforcing 128 blocks
/// would refuse commands the kernel delivers intact, so the limit is raised to this floor, which
/// leaves room for many such commands in flight; a larger configured `hw_max_sectors` is kept.
pub const MIN_MAX_TRANSFER_BYTES: u64 = 32 << 20;

/// What the handler (and the SCSI emulation) learn about the device `s` describes.
pub fn device_config(s: &DeviceSpec) -> DeviceConfig {
    DeviceConfig {
        name: s.name.clone(),
        subtype: s.subtype.clone(),
        cfgstring: s.cfgstring.clone(),
        dev_size: s.dev_size,
        block_size: s.block_size,
        max_sectors: if s.max_sectors == 0 {
            0
        } else {
            let floor = MIN_MAX_TRANSFER_BYTES.min(s.map_size / 4) / u64::from(s.block_size.max(1));
            s.max_sectors.max(u32::try_from(floor).unwrap_or(u32::MAX))
        },
        write_cache: s.write_cache,
        unit_serial: s.unit_serial.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(block_size: u32, max_sectors: u32) -> tcmu_warden_proto::DeviceSpec {
        tcmu_warden_proto::DeviceSpec {
            id: 1,
            uio: "uio0".into(),
            hba: 0,
            name: "disk".into(),
            subtype: "file".into(),
            cfgstring: "/srv/disk.img".into(),
            map_size: 1 << 30,
            dev_size: 1 << 30,
            block_size,
            max_sectors,
            write_cache: true,
            unit_serial: "serial".into(),
            has_backing_fd: true,
            refusal: None,
            journal: tcmu_warden_proto::JournalMode::None,
        }
    }

    #[test]
    fn max_transfer_is_at_least_32_mebibytes() {
        // TCMU's default hw_max_sectors (128) is raised to 32 MiB worth of blocks.
        assert_eq!(device_config(&spec(512, 128)).max_sectors, 65536);
        assert_eq!(device_config(&spec(4096, 128)).max_sectors, 8192);
        assert_eq!(device_config(&spec(65536, 1)).max_sectors, 512);
        // A larger configured value is kept.
        assert_eq!(device_config(&spec(512, 100_000)).max_sectors, 100_000);
        // A small shared-memory region (a small data area) lowers the floor to a quarter of it.
        let mut small = spec(512, 128);
        small.map_size = 16 << 20;
        assert_eq!(device_config(&small).max_sectors, 8192);
        small.max_sectors = 10_000;
        assert_eq!(device_config(&small).max_sectors, 10_000);
        // Everything else is copied as it is.
        let c = device_config(&spec(4096, 128));
        assert_eq!(
            (
                c.block_size,
                c.dev_size,
                c.write_cache,
                c.unit_serial.as_str()
            ),
            (4096, 1 << 30, true, "serial")
        );
    }
}
