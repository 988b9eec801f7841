//! # Signals as events
//!
//! Turns asynchronous signals into something the event loop can `poll`: each watched signal
//! writes a byte into a socket pair (the self-pipe trick, done by `signal-hook` in an
//! async-signal-safe way), and termination signals also record their number in an atomic.
//!
//! `SIGCHLD` only wakes the loop (which then reaps with `waitpid(WNOHANG)` per worker);
//! `SIGTERM`/`SIGINT` are watched only once [`Signals::watch_termination`] is called, and
//! `SIGHUP` (reload) once [`Signals::watch_reload`] is, so a supervisor embedded in tests
//! leaves the test process's own signal handling alone.
//!
//! This module never acts on a signal itself; it only reports.

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use signal_hook::SigId;
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};

/// The wake-up socket and the registrations behind it (unregistered on drop).
#[derive(Debug)]
pub(crate) struct Signals {
    read: UnixStream,
    write: UnixStream,
    ids: Vec<SigId>,
    terminate: Arc<AtomicUsize>,
    reload: Arc<AtomicBool>,
}

impl Signals {
    /// Starts watching `SIGCHLD`.
    pub(crate) fn new() -> io::Result<Signals> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        let mut signals = Signals {
            read,
            write,
            ids: Vec::new(),
            terminate: Arc::new(AtomicUsize::new(0)),
            reload: Arc::new(AtomicBool::new(false)),
        };
        signals.wake_on(SIGCHLD)?;
        Ok(signals)
    }

    /// Also watches `SIGTERM` and `SIGINT` (the daemon's request to stop).
    pub(crate) fn watch_termination(&mut self) -> io::Result<()> {
        for sig in [SIGTERM, SIGINT] {
            let value = usize::try_from(sig).unwrap_or(usize::MAX);
            // Registered before the wake-up so the number is stored when the loop wakes.
            let id = signal_hook::flag::register_usize(sig, Arc::clone(&self.terminate), value)?;
            self.ids.push(id);
            self.wake_on(sig)?;
        }
        Ok(())
    }

    /// Also watches `SIGHUP` (the daemon's request to reload its configuration).
    pub(crate) fn watch_reload(&mut self) -> io::Result<()> {
        // Registered before the wake-up so the flag is set when the loop wakes.
        let id = signal_hook::flag::register(SIGHUP, Arc::clone(&self.reload))?;
        self.ids.push(id);
        self.wake_on(SIGHUP)
    }

    /// Whether `SIGHUP` arrived since the last call.
    pub(crate) fn take_reload(&self) -> bool {
        self.reload.swap(false, Ordering::SeqCst)
    }

    fn wake_on(&mut self, sig: i32) -> io::Result<()> {
        let id = signal_hook::low_level::pipe::register(sig, self.write.try_clone()?)?;
        self.ids.push(id);
        Ok(())
    }

    /// The descriptor to poll for readability.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Empties the wake-up socket. Returns the termination signal received since the last call,
    /// if any.
    pub(crate) fn drain(&self) -> Option<i32> {
        let mut buf = [0u8; 64];
        let mut reader = &self.read;
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        match self.terminate.swap(0, Ordering::SeqCst) {
            0 => None,
            sig => i32::try_from(sig).ok(),
        }
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigchld_wakes_without_termination() {
        let signals = Signals::new().unwrap();
        let mut child = std::process::Command::new("/bin/true").spawn().unwrap();
        child.wait().unwrap();
        let mut fds = [nix::poll::PollFd::new(
            signals.fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let n = nix::poll::poll(
            &mut fds,
            nix::poll::PollTimeout::try_from(30_000u32).unwrap(),
        )
        .unwrap();
        assert_eq!(n, 1);
        assert_eq!(signals.drain(), None);
    }
}
