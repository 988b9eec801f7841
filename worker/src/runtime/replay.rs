//! # Which commands may run twice
//!
//! After a worker crash, the commands it was still executing are handed to its successor (see
//! [`crate::ring::Recovered`]). The old worker may have run such a command to the end, halfway,
//! or not at all; nobody knows. A command may be executed again only if running it once more
//! leaves the device in the same state as running it once: reading, writing the same bytes to
//! the same blocks, flushing, unmapping, describing the device. Those are *replay-safe*.
//!
//! Everything else is answered BUSY instead, which tells the initiator to retry it: most
//! importantly COMPARE AND WRITE (if the first run wrote, a second run would compare against
//! the new data and report a miscompare for a write that in fact succeeded), and every opcode
//! not listed here, including those a third-party handler implements itself, since nothing is
//! known about them. REQUEST SENSE is not listed either: it may consume a pending condition.
//!
//! This module owns that list and nothing else; it never executes a command.

use crate::scsi::cdb::op;

/// Whether executing `cdb` a second time is harmless (see the module documentation).
pub fn is_replay_safe(cdb: &[u8]) -> bool {
    let Some(&opcode) = cdb.first() else {
        return false;
    };
    let service_action = cdb.get(1).map(|b| b & crate::scsi::cdb::SA_MASK);
    match opcode {
        op::TEST_UNIT_READY
        | op::INQUIRY
        | op::MODE_SENSE_6
        | op::MODE_SENSE_10
        | op::READ_CAPACITY_10
        | op::READ_6
        | op::READ_10
        | op::READ_12
        | op::READ_16
        | op::WRITE_6
        | op::WRITE_10
        | op::WRITE_12
        | op::WRITE_16
        | op::WRITE_VERIFY_10
        | op::WRITE_VERIFY_12
        | op::WRITE_VERIFY_16
        | op::VERIFY_10
        | op::VERIFY_12
        | op::VERIFY_16
        | op::SYNCHRONIZE_CACHE_10
        | op::SYNCHRONIZE_CACHE_16
        | op::WRITE_SAME_10
        | op::WRITE_SAME_16
        | op::UNMAP
        | op::REPORT_LUNS => true,
        op::SERVICE_ACTION_IN_16 => matches!(
            service_action,
            Some(op::SA_READ_CAPACITY_16 | op::SA_GET_LBA_STATUS)
        ),
        op::MAINTENANCE_IN => service_action == Some(op::SA_REPORT_SUPPORTED_OPCODES),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_commands_replay_and_compare_and_write_does_not() {
        assert!(is_replay_safe(&[op::READ_10, 0, 0, 0, 0, 0, 0, 0, 1, 0]));
        assert!(is_replay_safe(&[op::WRITE_16; 16]));
        assert!(is_replay_safe(&[op::UNMAP, 0, 0, 0, 0, 0, 0, 0, 24, 0]));
        assert!(is_replay_safe(&[
            op::SERVICE_ACTION_IN_16,
            op::SA_READ_CAPACITY_16
        ]));
        assert!(!is_replay_safe(&[op::SERVICE_ACTION_IN_16, 0x1f]));
        assert!(!is_replay_safe(&[op::COMPARE_AND_WRITE; 16]));
        assert!(!is_replay_safe(&[op::REQUEST_SENSE, 0, 0, 0, 18, 0]));
        assert!(!is_replay_safe(&[op::MODE_SELECT_10; 10]));
        assert!(
            !is_replay_safe(&[0xc0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            "vendor specific"
        );
        assert!(!is_replay_safe(&[]));
    }
}
