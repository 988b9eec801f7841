//! # Device hot-plug through uevents
//!
//! When a uio device appears or disappears, the kernel broadcasts a *uevent* on the
//! `NETLINK_KOBJECT_UEVENT` socket family, multicast group 1: `add@/devices/virtual/uio/uio0`
//! followed by `KEY=VALUE` strings (`ACTION`, `DEVPATH`, `SUBSYSTEM`, `DEVNAME`, `SEQNUM`, ...),
//! each NUL-terminated. When systemd-udevd runs, it processes each event (creating
//! `/dev/uio0`, running rules) and then re-broadcasts it on group 2 with a binary header
//! (`libudev\0`, magic `0xfeedcafe` big-endian, then header size, properties offset and
//! length in host order) followed by the same `KEY=VALUE` strings. Listening to udev's copy
//! means the node exists when the event arrives, so it is preferred when udevd runs
//! ([`UeventSource::Auto`] checks for `/run/udev/control`).
//!
//! This module owns the parsing ([`parse`], total: never panics, bounded; [`fuzz`] runs it) and
//! the socket ([`UeventSocket`]), which drops any datagram not sent by the kernel (group 1:
//! sender port 0) or by root (group 2: `SCM_CREDENTIALS` uid 0), so an unprivileged process
//! cannot forge hot-plug events. It never acts on events: the daemon does.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
    bind, recvmsg, setsockopt, socket, sockopt,
};

use crate::discovery::is_uio_name;

/// Largest datagram accepted (the kernel's own buffer is 2 KiB; udev's copies are larger).
pub const MAX_UEVENT: usize = 16 * 1024;
/// Most `KEY=VALUE` pairs accepted in one event.
pub const MAX_KEYS: usize = 128;
/// udev's header magic.
pub const UDEV_MAGIC: u32 = 0xfeed_cafe;
const UDEV_PREFIX: &[u8] = b"libudev\0";
const UDEV_HEADER_MIN: usize = 40;
/// Kernel uevent multicast group.
pub const GROUP_KERNEL: u32 = 1;
/// udev's re-broadcast multicast group.
pub const GROUP_UDEV: u32 = 2;

pub use crate::config::UeventSource;

/// The group to join for `source`: [`GROUP_UDEV`] or [`GROUP_KERNEL`]. `Auto` picks udev's
/// when `udev_control` (normally `/run/udev/control`) exists, i.e. systemd-udevd runs.
pub fn group_for(source: UeventSource, udev_control: &Path) -> u32 {
    match source {
        UeventSource::Udev => GROUP_UDEV,
        UeventSource::Kernel => GROUP_KERNEL,
        UeventSource::Auto if udev_control.exists() => GROUP_UDEV,
        UeventSource::Auto => GROUP_KERNEL,
    }
}

/// What happened to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// It appeared.
    Add,
    /// It disappeared.
    Remove,
    /// Anything else (`change`, `bind`, `move`, ...).
    Other(String),
}

/// One parsed uevent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    /// `ACTION`.
    pub action: Action,
    /// `DEVPATH`, e.g. `/devices/virtual/uio/uio0`.
    pub devpath: String,
    /// `SUBSYSTEM`, e.g. `uio`.
    pub subsystem: Option<String>,
    /// `DEVNAME`, e.g. `uio0` (kernel) or `/dev/uio0` (udev).
    pub devname: Option<String>,
    /// `SEQNUM`.
    pub seqnum: Option<u64>,
    /// Whether it came through udev (group 2 format).
    pub from_udev: bool,
}

impl Uevent {
    /// For an event of the `uio` subsystem, the device's name (`uio0`), from `DEVNAME` or the
    /// last component of `DEVPATH`; `None` for other subsystems or odd names.
    pub fn uio(&self) -> Option<&str> {
        if self.subsystem.as_deref() != Some("uio") {
            return None;
        }
        let from_devname = self
            .devname
            .as_deref()
            .map(|d| d.rsplit('/').next().unwrap_or(d));
        let name = from_devname.or_else(|| self.devpath.rsplit('/').next())?;
        is_uio_name(name).then_some(name)
    }
}

/// Why a datagram is not a usable uevent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UeventError {
    /// Anything structurally wrong.
    #[error("malformed uevent: {0}")]
    Malformed(String),
}

fn bad(why: impl Into<String>) -> UeventError {
    UeventError::Malformed(why.into())
}

/// Parses a datagram in either format (kernel `action@devpath\0KEY=VALUE\0...` or udev's
/// `libudev\0` header). Keys other than the ones in [`Uevent`] are skipped; a key that
/// matters must be UTF-8 without control characters.
pub fn parse(buf: &[u8]) -> Result<Uevent, UeventError> {
    if buf.len() > MAX_UEVENT {
        return Err(bad(format!("{} bytes", buf.len())));
    }
    let (props, from_udev) = if buf.starts_with(UDEV_PREFIX) {
        (udev_properties(buf)?, true)
    } else {
        let nul = buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| bad("no NUL-terminated header"))?;
        let header = buf.get(..nul).unwrap_or_default();
        if !header.contains(&b'@') {
            return Err(bad("header lacks action@devpath"));
        }
        (buf.get(nul + 1..).unwrap_or_default(), false)
    };
    let mut action = None;
    let mut devpath = None;
    let mut subsystem = None;
    let mut devname = None;
    let mut seqnum = None;
    for (i, field) in props
        .split(|&b| b == 0)
        .filter(|f| !f.is_empty())
        .enumerate()
    {
        if i >= MAX_KEYS {
            return Err(bad("too many keys"));
        }
        let Some(eq) = field.iter().position(|&b| b == b'=') else {
            continue;
        };
        let key = field.get(..eq).unwrap_or_default();
        let slot = match key {
            b"ACTION" => &mut action,
            b"DEVPATH" => &mut devpath,
            b"SUBSYSTEM" => &mut subsystem,
            b"DEVNAME" => &mut devname,
            b"SEQNUM" => &mut seqnum,
            _ => continue,
        };
        let value = field.get(eq + 1..).unwrap_or_default();
        let text = std::str::from_utf8(value)
            .map_err(|_| bad(format!("{} is not UTF-8", String::from_utf8_lossy(key))))?;
        if text.chars().any(char::is_control) {
            return Err(bad("control characters in a value"));
        }
        *slot = Some(text.to_owned());
    }
    let action = match action.ok_or_else(|| bad("no ACTION"))?.as_str() {
        "add" => Action::Add,
        "remove" => Action::Remove,
        other => Action::Other(other.to_owned()),
    };
    let seqnum = seqnum
        .map(|s| s.parse::<u64>().map_err(|_| bad("SEQNUM is not a number")))
        .transpose()?;
    Ok(Uevent {
        action,
        devpath: devpath.ok_or_else(|| bad("no DEVPATH"))?,
        subsystem,
        devname,
        seqnum,
        from_udev,
    })
}

/// The properties block of a udev datagram, after checking its header.
fn udev_properties(buf: &[u8]) -> Result<&[u8], UeventError> {
    let word = |at: usize| -> Result<[u8; 4], UeventError> {
        buf.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("short udev header"))
    };
    if u32::from_be_bytes(word(8)?) != UDEV_MAGIC {
        return Err(bad("wrong udev magic"));
    }
    let header_size = u32::from_ne_bytes(word(12)?) as usize;
    let off = u32::from_ne_bytes(word(16)?) as usize;
    let len = u32::from_ne_bytes(word(20)?) as usize;
    if header_size < UDEV_HEADER_MIN || off < header_size {
        return Err(bad("udev header overlaps its properties"));
    }
    let end = off.checked_add(len).ok_or_else(|| bad("length overflow"))?;
    buf.get(off..end)
        .ok_or_else(|| bad("udev properties out of bounds"))
}

/// Fuzz entry point: parses `data` and asks the parsed event for its uio name. Never panics.
pub fn fuzz(data: &[u8]) {
    if let Ok(ev) = parse(data) {
        let _ = ev.uio();
    }
}

/// A uevent socket.
#[derive(Debug)]
pub struct UeventSocket {
    fd: OwnedFd,
    group: u32,
    /// A real netlink socket: check the sender.
    kernel: bool,
}

impl UeventSocket {
    /// Joins `group` ([`GROUP_KERNEL`] or [`GROUP_UDEV`]); non-blocking.
    pub fn open(group: u32) -> io::Result<UeventSocket> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkKObjectUEvent,
        )?;
        setsockopt(&fd, sockopt::PassCred, &true)?;
        if setsockopt(&fd, sockopt::RcvBufForce, &(4 << 20)).is_err() {
            let _ = setsockopt(&fd, sockopt::RcvBuf, &(4 << 20));
        }
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, group))?;
        Ok(UeventSocket {
            fd,
            group,
            kernel: true,
        })
    }

    /// Test support: a connected, non-blocking datagram socket whose peer plays the kernel
    /// (no sender check).
    #[doc(hidden)]
    pub fn from_socket(fd: OwnedFd, group: u32) -> UeventSocket {
        UeventSocket {
            fd,
            group,
            kernel: false,
        }
    }

    /// The group joined.
    pub fn group(&self) -> u32 {
        self.group
    }

    /// The descriptor to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Receives one datagram if one is waiting: `Ok(None)` when none is, `Ok(Some(Err(_)))`
    /// for a datagram that was dropped (forged sender, malformed), `Err` for a socket error
    /// (`ENOBUFS`: the kernel dropped events because the queue was full).
    pub fn recv(&self) -> io::Result<Option<Result<Uevent, UeventError>>> {
        let mut buf = vec![0u8; MAX_UEVENT + 1];
        let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
        let (n, truncated, pid, uid) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<NetlinkAddr>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(msg) => {
                    let uid = msg.cmsgs().ok().and_then(|mut it| {
                        it.find_map(|c| match c {
                            ControlMessageOwned::ScmCredentials(cred) => Some(cred.uid()),
                            _ => None,
                        })
                    });
                    (
                        msg.bytes,
                        msg.flags.contains(MsgFlags::MSG_TRUNC),
                        msg.address.map(|a| a.pid()),
                        uid,
                    )
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        };
        if self.kernel {
            let trusted = match self.group {
                GROUP_KERNEL => pid == Some(0),
                _ => uid == Some(0),
            };
            if !trusted {
                return Ok(Some(Err(bad(format!(
                    "dropped a datagram from port {pid:?} uid {uid:?}"
                )))));
            }
        }
        if truncated || n > MAX_UEVENT {
            return Ok(Some(Err(bad("oversized datagram"))));
        }
        Ok(Some(parse(buf.get(..n).unwrap_or_default())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kernel(action: &str, uio: &str) -> Vec<u8> {
        format!(
            "{action}@/devices/virtual/uio/{uio}\0ACTION={action}\0DEVPATH=/devices/virtual/uio/{uio}\0\
             SUBSYSTEM=uio\0MAJOR=243\0MINOR=0\0DEVNAME={uio}\0SEQNUM=4711\0"
        )
        .into_bytes()
    }

    fn udev(props: &[u8]) -> Vec<u8> {
        let mut v = UDEV_PREFIX.to_vec();
        v.extend_from_slice(&UDEV_MAGIC.to_be_bytes());
        v.extend_from_slice(&40u32.to_ne_bytes()); // header size
        v.extend_from_slice(&40u32.to_ne_bytes()); // properties offset
        v.extend_from_slice(&(props.len() as u32).to_ne_bytes());
        v.extend_from_slice(&[0u8; 16]); // filter hashes and bloom
        v.extend_from_slice(props);
        v
    }

    #[test]
    fn parses_kernel_events() {
        let ev = parse(&kernel("add", "uio3")).unwrap();
        assert_eq!(ev.action, Action::Add);
        assert_eq!(ev.devpath, "/devices/virtual/uio/uio3");
        assert_eq!(ev.subsystem.as_deref(), Some("uio"));
        assert_eq!(ev.seqnum, Some(4711));
        assert!(!ev.from_udev);
        assert_eq!(ev.uio(), Some("uio3"));
        let ev = parse(&kernel("remove", "uio12")).unwrap();
        assert_eq!(ev.action, Action::Remove);
        assert_eq!(ev.uio(), Some("uio12"));
        let ev = parse(&kernel("change", "uio1")).unwrap();
        assert_eq!(ev.action, Action::Other("change".into()));
    }

    #[test]
    fn parses_udev_events() {
        let props = b"ACTION=add\0DEVPATH=/devices/virtual/uio/uio2\0SUBSYSTEM=uio\0DEVNAME=/dev/uio2\0SEQNUM=9\0USEC_INITIALIZED=1\0";
        let ev = parse(&udev(props)).unwrap();
        assert!(ev.from_udev);
        assert_eq!(ev.action, Action::Add);
        assert_eq!(ev.uio(), Some("uio2"));
        assert_eq!(ev.devname.as_deref(), Some("/dev/uio2"));
    }

    #[test]
    fn other_subsystems_and_odd_names_have_no_uio() {
        let ev = parse(b"add@/devices/x/sda\0ACTION=add\0DEVPATH=/devices/x/sda\0SUBSYSTEM=block\0DEVNAME=sda\0").unwrap();
        assert_eq!(ev.uio(), None);
        let ev = parse(b"add@/devices/virtual/uio/uio0\0ACTION=add\0DEVPATH=/devices/virtual/uio/uio0\0SUBSYSTEM=uio\0DEVNAME=../x\0").unwrap();
        assert_eq!(ev.uio(), None);
        // Without DEVNAME the DEVPATH's last component is used.
        let ev = parse(b"remove@/devices/virtual/uio/uio7\0ACTION=remove\0DEVPATH=/devices/virtual/uio/uio7\0SUBSYSTEM=uio\0").unwrap();
        assert_eq!(ev.uio(), Some("uio7"));
    }

    #[test]
    fn refuses_malformed_datagrams() {
        assert!(parse(b"").is_err());
        assert!(parse(b"no header at all").is_err());
        assert!(parse(b"add@/x\0DEVPATH=/x\0").is_err()); // no ACTION
        assert!(parse(b"add@/x\0ACTION=add\0").is_err()); // no DEVPATH
        assert!(parse(b"add@/x\0ACTION=add\0DEVPATH=/x\0SEQNUM=abc\0").is_err());
        assert!(parse(b"add@/x\0ACTION=add\0DEVPATH=/x\nevil\0").is_err());
        assert!(parse(&[b"add@/x\0ACTION=add\0DEVPATH=/\xff\0".as_slice()].concat()).is_err());
        // udev: wrong magic, offsets out of bounds, overlapping header.
        let mut wrong = udev(b"ACTION=add\0DEVPATH=/x\0");
        wrong[8] = 0;
        assert!(parse(&wrong).is_err());
        let mut far = udev(b"ACTION=add\0DEVPATH=/x\0");
        far[16..20].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse(&far).is_err());
        let mut overlap = udev(b"ACTION=add\0DEVPATH=/x\0");
        overlap[16..20].copy_from_slice(&8u32.to_ne_bytes());
        assert!(parse(&overlap).is_err());
        assert!(parse(&vec![b'a'; MAX_UEVENT + 1]).is_err());
    }

    #[test]
    fn source_selection() {
        let tmp = tempfile::tempdir().unwrap();
        let control = tmp.path().join("control");
        assert_eq!(group_for(UeventSource::Auto, &control), GROUP_KERNEL);
        std::fs::write(&control, "").unwrap();
        assert_eq!(group_for(UeventSource::Auto, &control), GROUP_UDEV);
        assert_eq!(group_for(UeventSource::Kernel, &control), GROUP_KERNEL);
        assert_eq!(
            group_for(UeventSource::Udev, &tmp.path().join("x")),
            GROUP_UDEV
        );
    }

    /// Against the running kernel: joining the kernel's uevent group works, and an empty queue
    /// reads as nothing waiting rather than an error.
    #[test]
    fn joins_the_kernels_uevent_group() {
        let sock = UeventSocket::open(GROUP_KERNEL).unwrap();
        assert_eq!(sock.group(), GROUP_KERNEL);
        // Whatever the host's devices do meanwhile, reading never fails or blocks.
        for _ in 0..4 {
            if sock.recv().unwrap().is_none() {
                break;
            }
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            fuzz(&data);
        }

        #[test]
        fn random_udev_headers_never_panic(words in proptest::collection::vec(any::<u32>(), 3), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut v = UDEV_PREFIX.to_vec();
            v.extend_from_slice(&UDEV_MAGIC.to_be_bytes());
            for w in &words { v.extend_from_slice(&w.to_ne_bytes()); }
            v.extend_from_slice(&tail);
            fuzz(&v);
        }
    }
}
