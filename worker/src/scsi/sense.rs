//! Sense data (SPC-4 fixed format). (Skeleton: the SCSI helper owns this.)

/// Sense data of a CHECK CONDITION.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
}

impl Sense {
    /// ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE.
    pub fn invalid_opcode() -> Sense {
        Sense {
            key: 0x05,
            asc: 0x20,
            ascq: 0x00,
        }
    }

    /// Fixed-format sense bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; 18];
        b[0] = 0x70;
        b[2] = self.key;
        b[7] = 10;
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }
}
