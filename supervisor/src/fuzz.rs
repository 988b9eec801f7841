//! # Fuzz entry points
//!
//! One function per decoder of untrusted input the supervisor has, each taking arbitrary bytes
//! and never panicking: the kernel's `TCM-USER` netlink messages ([`netlink`]), uevents in the
//! kernel's and udev's formats ([`uevent`]), and control-socket requests ([`control_request`]).
//! The property tests in each module feed them random bytes; the `fuzz/` directory at the
//! repository root wraps them as cargo-fuzz (libFuzzer) targets.
//!
//! This module only forwards; the decoders live with their modules.

/// Netlink datagrams, messages, attributes, family answers and TCMU requests.
pub fn netlink(data: &[u8]) {
    crate::netlink::fuzz(data);
}

/// Uevent datagrams (kernel and udev formats).
pub fn uevent(data: &[u8]) {
    crate::uevent::fuzz(data);
}

/// Control-socket request lines.
pub fn control_request(data: &[u8]) {
    crate::control::fuzz(data);
}
