//! # systemd readiness and watchdog notifications
//!
//! Under systemd with `Type=notify`, the service manager passes `NOTIFY_SOCKET` (a unix datagram
//! socket path, or `@name` for an abstract one) and, with `WatchdogSec=`, `WATCHDOG_USEC` (and
//! `WATCHDOG_PID`, the process meant). The daemon sends `READY=1` once it serves (start-up scan
//! done, event sockets open), `RELOADING=1`/`READY=1` around a configuration reload,
//! `STOPPING=1` when it starts shutting down, `STATUS=...` lines for `systemctl status`, and
//! `WATCHDOG=1` from its event loop at half the watchdog interval, so a wedged loop gets the
//! service restarted.
//!
//! This module owns the environment parsing and the sending; it never decides when to notify.
//! Without `NOTIFY_SOCKET` every call is a no-op. A failed send is logged at debug level and
//! otherwise ignored: notifications are advisory.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where notifications go, and the watchdog interval.
#[derive(Debug, Default)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the environment.
    pub fn from_env() -> Notifier {
        Notifier::from_values(
            std::env::var("NOTIFY_SOCKET").ok().as_deref(),
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        )
    }

    /// Builds a notifier from the variables' values (`None`: unset) for process `pid`.
    pub fn from_values(
        socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        pid: u32,
    ) -> Notifier {
        let target = socket.and_then(|s| {
            let addr = if let Some(name) = s.strip_prefix('@') {
                SocketAddr::from_abstract_name(name.as_bytes()).ok()?
            } else if s.starts_with('/') {
                SocketAddr::from_pathname(s).ok()?
            } else {
                tracing::warn!(
                    socket = s,
                    "NOTIFY_SOCKET is neither a path nor @abstract; ignored"
                );
                return None;
            };
            match UnixDatagram::unbound() {
                Ok(sock) => Some((sock, addr)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create the notification socket");
                    None
                }
            }
        });
        let for_us = watchdog_pid.is_none_or(|p| p.trim().parse::<u32>().ok() == Some(pid));
        let watchdog = watchdog_usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|&u| u > 0 && for_us && target.is_some())
            .map(Duration::from_micros);
        Notifier { target, watchdog }
    }

    /// Whether a service manager listens.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often to send `WATCHDOG=1` (half the configured interval), if a watchdog is on.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    /// Sends one notification (newline-separated `KEY=VALUE` assignments).
    pub fn notify(&self, state: &str) {
        if let Some((sock, addr)) = &self.target
            && let Err(e) = sock.send_to_addr(state.as_bytes(), addr)
        {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::from_values(path.to_str(), Some("2000000"), None, 1);
        assert!(n.is_enabled());
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(1)));
        n.notify("READY=1\nSTATUS=ok");
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=ok");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("tcmu-warden-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::from_values(Some(&format!("@{name}")), None, None, 1);
        n.notify("WATCHDOG=1");
        let mut buf = [0u8; 16];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
        assert_eq!(n.watchdog_interval(), None);
    }

    #[test]
    fn watchdog_only_for_the_named_process() {
        let n = Notifier::from_values(Some("/nonexistent"), Some("1000"), Some("7"), 8);
        assert_eq!(n.watchdog_interval(), None);
        let n = Notifier::from_values(Some("/nonexistent"), Some("1000"), Some("8"), 8);
        assert_eq!(n.watchdog_interval(), Some(Duration::from_micros(500)));
        let n = Notifier::from_values(Some("/nonexistent"), Some("zero"), None, 8);
        assert_eq!(n.watchdog_interval(), None);
        // No socket: nothing is enabled and notify is a no-op.
        let n = Notifier::from_values(None, Some("1000"), None, 8);
        assert!(!n.is_enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.notify("READY=1");
        let n = Notifier::from_values(Some("relative"), None, None, 8);
        assert!(!n.is_enabled());
    }
}
