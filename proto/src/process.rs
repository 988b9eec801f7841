//! # The process contract: how a worker is started and what it is told before the wire
//!
//! Everything a supervisor and a worker executable must agree on besides the messages
//! themselves lives here, so that neither side spells a name or a number of its own:
//!
//! - which descriptor the worker finds its end of the channel on ([`WORKER_CHANNEL_FD`]), and the
//!   environment variable that names it ([`CHANNEL_FD_ENV`]);
//! - the log format variable ([`LOG_FORMAT_ENV`]);
//! - stage two of the jail ([`StageTwoRequest`]): which system calls the worker's own seccomp
//!   allow-list adds and what a violation does. It travels in [`crate::ToWorker::Hello`], a typed
//!   message, never as text in the environment;
//! - how a free-text reason is cut to fit a message ([`fit_reason`]).
//!
//! A worker's environment holds nothing else that tcmu-warden defines (plus `RUST_LOG`, passed
//! through when the supervisor has it).

use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};

use crate::{MAX_NAME_LEN, MAX_REASON_LEN, ProtoError, check_name, invalid};

/// The descriptor number a worker finds its end of the supervisor channel on. The supervisor
/// installs it there between `fork` and `exec`; 0, 1 and 2 stay the standard streams.
pub const WORKER_CHANNEL_FD: RawFd = 3;

/// The environment variable naming the channel's descriptor (always [`WORKER_CHANNEL_FD`] when
/// the supervisor starts the worker). Its absence means the program was not started by a
/// supervisor; the worker removes it from its environment once it owns the descriptor.
pub const CHANNEL_FD_ENV: &str = "TCMU_WARDEN_FD";

/// The environment variable choosing the worker's log format: `json` for one JSON object per
/// line, anything else (or absent) for plain text.
pub const LOG_FORMAT_ENV: &str = "TCMU_WARDEN_LOG_FORMAT";

/// Most system-call names a [`StageTwoRequest`] may list.
pub const MAX_STAGE_TWO_SYSCALLS: usize = 512;

/// What the seccomp filters do with a system call they forbid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SeccompMode {
    /// The kernel kills the whole worker with SIGSYS (the default).
    #[default]
    Kill,
    /// DEBUGGING AID, NOT FOR PRODUCTION: a call missing from the stage-two allow-list fails with
    /// `ENOSYS` and the worker logs its name, but keeps running. The stage-one deny-list still
    /// kills.
    Log,
}

impl SeccompMode {
    /// The configuration-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SeccompMode::Kill => "kill",
            SeccompMode::Log => "log",
        }
    }

    /// Parses the configuration-file spelling.
    pub fn from_name(name: &str) -> Option<SeccompMode> {
        match name {
            "kill" => Some(SeccompMode::Kill),
            "log" => Some(SeccompMode::Log),
            _ => None,
        }
    }
}

/// What the supervisor tells a worker about stage two of its jail: the seccomp allow-list the
/// worker installs on itself once it is up and before it serves a device. Sent in
/// [`crate::ToWorker::Hello`]; absent there only when the supervisor runs without jails
/// (`--no-jail`, a debugging aid).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageTwoRequest {
    /// What a violation does.
    pub action: SeccompMode,
    /// Names to allow besides the runtime's and the handlers' own (the policy's `syscalls`).
    pub syscalls: Vec<String>,
    /// Threads of the worker's shared I/O pool (the policy's `io_threads`); `None`: the
    /// worker's default. Travels with the jail because it is a per-handler policy setting.
    #[serde(default)]
    pub io_threads: Option<u16>,
}

impl StageTwoRequest {
    /// Checks the list against its limits: at most [`MAX_STAGE_TWO_SYSCALLS`] names, each a
    /// plausible system-call name (lowercase ASCII letters, digits and `_`). Whether the name
    /// exists on this architecture is the worker's question, not the wire's.
    pub fn validate(&self) -> Result<(), ProtoError> {
        if self.syscalls.len() > MAX_STAGE_TWO_SYSCALLS {
            return Err(invalid(
                "jail.syscalls",
                format!(
                    "{} names, at most {MAX_STAGE_TWO_SYSCALLS}",
                    self.syscalls.len()
                ),
            ));
        }
        for name in &self.syscalls {
            check_name("jail.syscalls", name)?;
            let plausible = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !plausible {
                return Err(invalid(
                    "jail.syscalls",
                    format!("{name:?} is not a system call name"),
                ));
            }
        }
        Ok(())
    }
}

/// Cuts `reason` so that it fits a message's reason field ([`MAX_REASON_LEN`] bytes), at a
/// character boundary, marking a cut with `...`. Both sides use it before they send a reason;
/// a receiver never needs it (an oversized reason fails validation).
pub fn fit_reason(mut reason: String) -> String {
    if reason.len() > MAX_REASON_LEN {
        let mut cut = MAX_REASON_LEN.saturating_sub(3);
        while cut > 0 && !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
        reason.push_str("...");
    }
    reason
}

/// Cuts a name-like string (a device or worker name taken from outside) to [`MAX_NAME_LEN`]
/// bytes at a character boundary.
pub fn fit_name(mut name: String) -> String {
    if name.len() > MAX_NAME_LEN {
        let mut cut = MAX_NAME_LEN;
        while cut > 0 && !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_cut_at_a_character_boundary_and_marked() {
        let long = "é".repeat(MAX_REASON_LEN);
        let cut = fit_reason(long);
        assert!(cut.len() <= MAX_REASON_LEN);
        assert!(cut.ends_with("..."));
        assert!(cut.trim_end_matches('.').chars().all(|c| c == 'é'));
        assert_eq!(fit_reason("short".into()), "short");
    }

    #[test]
    fn names_are_cut_at_a_character_boundary() {
        let cut = fit_name("ü".repeat(MAX_NAME_LEN));
        assert!(cut.len() <= MAX_NAME_LEN);
        assert!(cut.chars().all(|c| c == 'ü'));
    }

    #[test]
    fn stage_two_requests_are_checked() {
        let ok = StageTwoRequest {
            action: SeccompMode::Log,
            syscalls: vec!["fsync".into(), "sync_file_range".into()],
            io_threads: None,
        };
        assert!(ok.validate().is_ok());
        for bad in ["", "Fsync", "fsync;kill", "a b", &"x".repeat(65)] {
            let req = StageTwoRequest {
                action: SeccompMode::Kill,
                syscalls: vec![bad.to_owned()],
                io_threads: None,
            };
            assert!(req.validate().is_err(), "{bad:?} accepted");
        }
        let many = StageTwoRequest {
            action: SeccompMode::Kill,
            syscalls: vec!["read".into(); MAX_STAGE_TWO_SYSCALLS + 1],
            io_threads: None,
        };
        assert!(many.validate().is_err());
    }

    #[test]
    fn seccomp_mode_spellings_round_trip() {
        for m in [SeccompMode::Kill, SeccompMode::Log] {
            assert_eq!(SeccompMode::from_name(m.as_str()), Some(m));
        }
        assert_eq!(SeccompMode::from_name("maybe"), None);
    }
}
