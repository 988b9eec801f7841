//! # Stage two: the worker tightens its own seccomp filter
//!
//! The supervisor started this process under stage one of its jail (new session, no
//! capabilities, `no_new_privs`, landlock, a seccomp deny-list). Once the runtime is up (logging,
//! the supervisor channel) and before any device is served, [`enter_stage_two`] adds a seccomp
//! *allow-list* on every thread (`SECCOMP_FILTER_FLAG_TSYNC`): what the runtime needs
//! ([`tcmu_warden_policy::jail::seccomp::RUNTIME_SYSCALLS`]), what each handler factory declares
//! ([`tcmu_warden_sdk::HandlerFactory::syscalls`]), and the extras the policy lists (the
//! supervisor's [`StageTwoRequest`], which arrives in its `Hello`). Filters only ever add up, so
//! stage one's denials still hold and the strictest answer wins.
//!
//! With `seccomp_action = "log"` (a debugging aid, not for production) a call outside the list
//! raises SIGSYS instead of killing the process; [`on_sigsys`] writes one line naming the call
//! and the thread to stderr and the call fails with `ENOSYS`. The handler does only
//! async-signal-safe things: two `prctl`/`write` calls and formatting into a stack buffer.
//!
//! This module must never loosen anything: it only installs filters.

use std::sync::Arc;

use tcmu_warden_policy::SeccompMode;
use tcmu_warden_policy::jail::seccomp;
use tcmu_warden_policy::jail::syscalls;
use tcmu_warden_proto::StageTwoRequest;
use tracing::{info, warn};

use tcmu_warden_sdk::HandlerFactory;

/// Why stage two could not be entered (the worker then exits: it never serves unconfined).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The filter could not be built.
    #[error("building the stage-two filter: {0}")]
    Filter(#[from] seccomp::FilterError),
    /// The kernel refused it.
    #[error("installing the stage-two filter: {0}")]
    Install(std::io::Error),
}

/// What [`enter_stage_two`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageTwo {
    /// The allow-list is installed on every thread.
    Installed {
        /// What a violation does.
        action: SeccompMode,
        /// How many names the list holds beyond the runtime's own.
        extra: usize,
    },
    /// The supervisor runs without jails (`--no-jail`): nothing installed.
    NotRequested,
}

/// The names stage two allows for these factories and this request, besides the runtime's own:
/// the request's extras and every factory's declarations, deduplicated. Names unknown on this
/// architecture are dropped with a warning (a handler may declare a call only some
/// architectures have).
pub fn allowed_extras(
    factories: &[Arc<dyn HandlerFactory>],
    request: &StageTwoRequest,
) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Vec::new();
    let declared = factories
        .iter()
        .flat_map(|f| f.syscalls().iter().map(|s| (f.subtype().to_owned(), *s)));
    let requested = request
        .syscalls
        .iter()
        .map(|s| ("policy".to_owned(), s.as_str()));
    for (who, name) in declared.chain(requested) {
        match syscalls::table().iter().find(|(n, _)| *n == name) {
            Some((known, _)) => {
                if !names.contains(known) {
                    names.push(known);
                }
            }
            None => warn!(declared_by = %who, syscall = name, "unknown system call name skipped"),
        }
    }
    names
}

/// Installs the stage-two filter as the supervisor's `request` asks, on every thread (`None`: the
/// supervisor runs without jails, and nothing is installed). Call once the runtime is up and
/// before serving any device.
pub fn enter_stage_two(
    factories: &[Arc<dyn HandlerFactory>],
    request: Option<&StageTwoRequest>,
) -> Result<StageTwo, JailError> {
    let Some(request) = request else {
        warn!(
            "the supervisor asked for no stage-two jail: it runs without jails (--no-jail); \
             NOT FOR PRODUCTION"
        );
        return Ok(StageTwo::NotRequested);
    };
    let extra = allowed_extras(factories, request);
    let pid = std::process::id();
    let programs = seccomp::stage_two(&extra, pid, request.action)?;
    match request.action {
        SeccompMode::Kill => {
            for program in &programs {
                seccompiler::apply_filter_all_threads(program)
                    .map_err(|e| JailError::Install(std::io::Error::other(e.to_string())))?;
            }
        }
        SeccompMode::Log => {
            install_sigsys_handler().map_err(JailError::Install)?;
            // Log mode also asks the kernel to audit-log the trapped calls.
            for program in &programs {
                install_raw(
                    program,
                    libc::SECCOMP_FILTER_FLAG_TSYNC | libc::SECCOMP_FILTER_FLAG_LOG,
                )
                .map_err(JailError::Install)?;
            }
            warn!(
                "seccomp_action = \"log\": calls outside the allow-list fail with ENOSYS and are \
                 logged instead of killing the worker; a debugging aid, NOT FOR PRODUCTION"
            );
        }
    }
    info!(
        action = request.action.as_str(),
        extra = ?extra,
        "stage-two seccomp allow-list installed on every thread"
    );
    Ok(StageTwo::Installed {
        action: request.action,
        extra: extra.len(),
    })
}

fn install_raw(program: &[seccompiler::sock_filter], flags: libc::c_ulong) -> std::io::Result<()> {
    let fprog = libc::sock_fprog {
        len: u16::try_from(program.len()).map_err(|_| std::io::Error::other("filter too long"))?,
        filter: program.as_ptr().cast_mut().cast(),
    };
    // SAFETY: seccomp reads the program through `fprog`, which points at `program`; both live
    // across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid starting point; we set the handler, SA_SIGINFO and
    // an empty mask before passing it to the kernel.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys
        as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
        as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sigemptyset on our own sigaction; sigaction installs a handler that only does
    // async-signal-safe work.
    let rc = unsafe {
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Offset of `si_syscall` in `siginfo_t` for SIGSYS on 64-bit Linux: signo, errno, code (three
/// ints), padding to 16, then `_sigsys { void *call_addr; int syscall; unsigned arch; }`.
const SI_SYSCALL_OFFSET: usize = 24;

/// A fixed-size line buffer that formats without allocating.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            }
        }
    }

    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            if let Some(d) = digits.get_mut(i) {
                *d = b'0' + (n % 10) as u8;
            }
            n /= 10;
            if n == 0 || i == 0 {
                break;
            }
        }
        if let Some(tail) = digits.get(i..) {
            self.push(tail);
        }
    }
}

/// The SIGSYS handler of log mode: names the trapped system call and the thread on stderr.
/// Async-signal-safe: reads the siginfo, one `prctl(PR_GET_NAME)`, one `write`; no allocation,
/// no locks.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; for SIGSYS the int at
    // SI_SYSCALL_OFFSET is the trapped system call's number.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<libc::c_int>()
            .read_unaligned()
    };
    let mut thread = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) into the 17-byte buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, thread.as_mut_ptr(), 0, 0, 0) };
    let name_len = thread.iter().position(|b| *b == 0).unwrap_or(16);
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    line.push(b"tcmu-warden-worker: seccomp (log mode, NOT FOR PRODUCTION): system call ");
    line.push_number(u64::from(nr.unsigned_abs()));
    line.push(b" (");
    line.push(
        syscalls::name_of(i64::from(nr))
            .unwrap_or("unknown")
            .as_bytes(),
    );
    line.push(b") is not on the allow-list; thread \"");
    line.push(thread.get(..name_len).unwrap_or_default());
    line.push(b"\"; it fails with ENOSYS\n");
    // SAFETY: writing our stack buffer to stderr.
    unsafe { libc::write(2, line.buf.as_ptr().cast(), line.len) };
    // The trapped call was skipped; make it return -ENOSYS (the return register otherwise still
    // holds whatever the kernel left there, on x86_64 the call's number).
    // SAFETY: for an SA_SIGINFO handler the kernel passes a valid ucontext_t, whose saved
    // registers are restored when the handler returns.
    unsafe { set_return_value(ctx.cast::<libc::ucontext_t>(), -i64::from(libc::ENOSYS)) };
}

/// Sets the return-value register of the interrupted context.
///
/// # Safety
/// `ctx` must be the `ucontext_t` the kernel passed to an `SA_SIGINFO` handler.
#[cfg(target_arch = "x86_64")]
unsafe fn set_return_value(ctx: *mut libc::ucontext_t, value: i64) {
    // SAFETY: the caller guarantees `ctx` is valid; REG_RAX indexes the 23 saved registers.
    unsafe {
        if let Some(rax) = (*ctx)
            .uc_mcontext
            .gregs
            .get_mut(usize::try_from(libc::REG_RAX).unwrap_or(usize::MAX))
        {
            *rax = value;
        }
    }
}

/// Sets the return-value register of the interrupted context.
///
/// # Safety
/// `ctx` must be the `ucontext_t` the kernel passed to an `SA_SIGINFO` handler.
#[cfg(target_arch = "aarch64")]
unsafe fn set_return_value(ctx: *mut libc::ucontext_t, value: i64) {
    // SAFETY: the caller guarantees `ctx` is valid; x0 carries the return value.
    unsafe {
        if let Some(x0) = (*ctx).uc_mcontext.regs.get_mut(0) {
            *x0 = value as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::builtin_factories;

    #[test]
    fn extras_merge_declarations_and_policy_without_duplicates() {
        let request = StageTwoRequest {
            action: SeccompMode::Kill,
            syscalls: vec![
                "fsync".into(),
                "no_such_call".into(),
                "sync_file_range".into(),
            ],
            io_threads: None,
        };
        let extra = allowed_extras(&builtin_factories(), &request);
        // The file handler's declarations...
        for name in ["pwritev2", "fdatasync", "fallocate", "ioctl"] {
            assert!(extra.contains(&name), "{name} missing from {extra:?}");
        }
        // ... the policy's extras, once each, unknown names dropped.
        assert!(extra.contains(&"sync_file_range"));
        assert_eq!(extra.iter().filter(|n| **n == "fsync").count(), 1);
        assert!(!extra.contains(&"no_such_call"));
        // Every name builds into a filter.
        let programs = seccomp::stage_two(&extra, 1, SeccompMode::Kill).unwrap();
        assert_eq!(programs.len(), 2);
    }

    #[test]
    fn the_signal_handler_line_formats_without_allocating() {
        let mut line = Line {
            buf: [0; 256],
            len: 0,
        };
        line.push(b"nr ");
        line.push_number(0);
        line.push(b" ");
        line.push_number(18_446_744_073_709_551_615);
        assert_eq!(&line.buf[..line.len], b"nr 0 18446744073709551615");
        // Overlong input is cut at the buffer's end, never past it.
        line.push(&[b'x'; 300]);
        assert_eq!(line.len, 256);
    }
}
