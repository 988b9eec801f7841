//! # Logging
//!
//! Installs the process-wide `tracing` subscriber in one of three formats
//! ([`LogFormat`]): human-readable text on stderr, one JSON object per line on stderr, or native
//! journald entries (structured fields such as `device=` and `worker=` become journal fields,
//! searchable with `journalctl DEVICE=uio0`). The level filter comes from `RUST_LOG` (default
//! `info`).
//!
//! Workers inherit the supervisor's stderr and are told the format through
//! `TCMU_WARDEN_LOG_FORMAT` (see [`crate::worker`]), so both halves log alike.
//!
//! This module only configures output; it never decides what is logged.

use std::io::IsTerminal as _;

use crate::config::LogFormat;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Identifier of the daemon's journal entries (`SYSLOG_IDENTIFIER`).
pub const SYSLOG_IDENTIFIER: &str = "tcmu-warden";

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// A global subscriber is already installed.
    #[error("a log subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}

/// The level filter: `RUST_LOG` if set and valid, `info` otherwise.
fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber. Returns the format actually in use: journald falls back to
/// text on stderr (with a warning) when the journal socket is unreachable.
pub fn init(format: LogFormat) -> Result<LogFormat, LoggingError> {
    let installed = |r: Result<(), tracing_subscriber::util::TryInitError>| {
        r.map_err(|e| LoggingError::AlreadyInstalled(e.to_string()))
    };
    match format {
        LogFormat::Text => {
            installed(
                tracing_subscriber::registry()
                    .with(filter())
                    .with(
                        tracing_subscriber::fmt::layer()
                            .with_ansi(std::io::stderr().is_terminal())
                            .with_writer(std::io::stderr),
                    )
                    .try_init(),
            )?;
            Ok(LogFormat::Text)
        }
        LogFormat::Json => {
            installed(
                tracing_subscriber::registry()
                    .with(filter())
                    .with(
                        tracing_subscriber::fmt::layer()
                            .json()
                            .with_ansi(false)
                            .flatten_event(true)
                            .with_current_span(false)
                            .with_writer(std::io::stderr),
                    )
                    .try_init(),
            )?;
            Ok(LogFormat::Json)
        }
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(layer) => {
                installed(
                    tracing_subscriber::registry()
                        .with(filter())
                        .with(layer.with_syslog_identifier(SYSLOG_IDENTIFIER.to_owned()))
                        .try_init(),
                )?;
                Ok(LogFormat::Journald)
            }
            Err(e) => {
                init(LogFormat::Text)?;
                tracing::warn!(error = %e, "journald is unreachable; logging text to stderr");
                Ok(LogFormat::Text)
            }
        },
    }
}
