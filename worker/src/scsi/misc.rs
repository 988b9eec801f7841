//! # Housekeeping commands
//!
//! TEST UNIT READY (is the LU ready?), REQUEST SENSE (fetch pending sense, e.g. a unit
//! attention, as data), START STOP UNIT (spin up/down, meaningless for us except that stopping
//! flushes the cache), PREVENT ALLOW MEDIUM REMOVAL (our medium is not removable: accepted, no
//! effect), and REPORT LUNS (in practice answered by the kernel before commands reach us; we
//! answer it anyway, with our single LUN 0).
//!
//! This module never touches the handler except for START STOP UNIT's flush.

use super::cdb::Cdb;
use super::unit::{Done, Emulator, IoKind, data_in};
use tcmu_warden_sdk::Command;
use tcmu_warden_sdk::sense::Sense;

/// TEST UNIT READY: GOOD (refusal and unit attentions were handled by the dispatcher).
pub fn test_unit_ready(
    _emu: &Emulator,
    _cmd: &mut Command<'_>,
    _cdb: Cdb<'_>,
) -> Result<Done, Sense> {
    Ok(Done::Good)
}

/// REQUEST SENSE: the pending unit attention (consumed), NOT READY on a refused device, or NO
/// SENSE; in fixed format, or descriptor format when DESC is set.
pub fn request_sense(emu: &Emulator, cmd: &mut Command<'_>, cdb: Cdb<'_>) -> Result<Done, Sense> {
    let desc = cdb.bit(1, 0);
    let alloc = usize::from(cdb.u8(4));
    let sense = if emu.refusal().is_some() {
        Sense::not_ready_manual_intervention()
    } else {
        emu.take_unit_attention().unwrap_or(Sense::no_sense())
    };
    let bytes = if desc {
        sense.to_descriptor_bytes()
    } else {
        sense.to_bytes()
    };
    Ok(data_in(cmd, &bytes, alloc))
}

/// START STOP UNIT: START=0 with NO_FLUSH=0 flushes the cache; otherwise nothing to do. Power
/// conditions and LOEJ (eject) are outside the usage mask and were rejected before we got here.
pub fn start_stop_unit(
    emu: &Emulator,
    _cmd: &mut Command<'_>,
    cdb: Cdb<'_>,
) -> Result<Done, Sense> {
    let start = cdb.bit(4, 0);
    let no_flush = cdb.bit(4, 2);
    if !start && !no_flush {
        emu.io_flush()
            .map_err(|e| emu.io_sense(&e, IoKind::Write, "flush"))?;
    }
    Ok(Done::Good)
}

/// PREVENT ALLOW MEDIUM REMOVAL: nothing to prevent on a fixed medium.
pub fn prevent_allow(
    _emu: &Emulator,
    _cmd: &mut Command<'_>,
    _cdb: Cdb<'_>,
) -> Result<Done, Sense> {
    Ok(Done::Good)
}

/// REPORT LUNS: one LUN, 0, for SELECT REPORT 00h..02h; other report types are INVALID FIELD IN
/// CDB. An allocation length under 16 is INVALID FIELD IN CDB (SPC-4 §6.33).
pub fn report_luns(_emu: &Emulator, cmd: &mut Command<'_>, cdb: Cdb<'_>) -> Result<Done, Sense> {
    let select = cdb.u8(2);
    if select > 2 {
        return Err(Sense::invalid_field_in_cdb(2, Some(7)));
    }
    let alloc = cdb.be32(6) as usize;
    if alloc < 16 {
        return Err(Sense::invalid_field_in_cdb(6, Some(7)));
    }
    let mut resp = vec![0u8; 16];
    if let Some(len) = resp.get_mut(0..4) {
        len.copy_from_slice(&8u32.to_be_bytes());
    }
    Ok(data_in(cmd, &resp, alloc))
}
