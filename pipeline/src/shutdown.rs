//! SIGTERM and SIGINT (`kubectl delete`, pod eviction, `systemctl stop`, Ctrl-C) as a request
//! to stop: training ends after the step in progress, with a checkpoint and complete tables,
//! on every worker of every process at the same step (the request travels with the step's
//! first exchange). A second signal ends the process at once.

use std::sync::atomic::{AtomicI32, Ordering};

/// SIGTERM's number (what a stop asked by another process of the job counts as).
pub const SIGTERM: i32 = 15;
/// SIGINT's number (Ctrl-C).
pub const SIGINT: i32 = 2;

/// The signal that asked for the stop (0: none yet).
static REQUESTED: AtomicI32 = AtomicI32::new(0);

/// A step has begun: from here a stop waits for a step's end (before, there is nothing to save).
static TRAINING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Marks the start of training (the first step); a stop asked before exits at once.
pub fn training_started() {
    TRAINING.store(true, Ordering::SeqCst);
}

/// Whether a step has begun in this process.
pub fn training_has_started() -> bool {
    TRAINING.load(Ordering::SeqCst)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" fn on_signal(signal: libc::c_int) {
    if REQUESTED.swap(signal, Ordering::SeqCst) != 0 {
        // Second signal: no more waiting (only async-signal-safe calls here).
        unsafe { libc::_exit(128 + signal) };
    }
}

/// Routes SIGTERM and SIGINT to [`requested`] (call once, before training starts), and says
/// so in the log as soon as one arrives (a step can take minutes).
pub fn install() {
    std::thread::spawn(|| {
        loop {
            if let Some(signal) = requested() {
                if !TRAINING.load(Ordering::SeqCst) {
                    // Listing, loading a checkpoint, waiting for the other processes: nothing
                    // of this run to save yet.
                    tracing::warn!("{} received before training: stopping now", name(signal));
                    eprintln!("stopped by {} before training started", name(signal));
                    std::process::exit(i32::from(exit_status(signal)));
                }
                tracing::warn!(
                    "{} received: stopping after the step in progress, with its checkpoint (a second signal stops at once)",
                    name(signal)
                );
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    route_signals();
}

/// For commands whose outputs are each written whole (the probe and fine-tuning: tables and
/// state renamed into place): SIGTERM or SIGINT ends the process within a few hundredths of a second,
/// logging `what` was stopped and `hint` (how to continue).
pub fn install_exit_at_once(what: &'static str, hint: &'static str) {
    std::thread::spawn(move || {
        loop {
            if let Some(signal) = requested() {
                tracing::warn!("{what} stopped by {}", name(signal));
                eprintln!("stopped by {}: {hint}", name(signal));
                std::process::exit(i32::from(exit_status(signal)));
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
    });
    route_signals();
}

/// Points SIGTERM and SIGINT at [`on_signal`], which records the first in [`requested`].
fn route_signals() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let handler: extern "C" fn(libc::c_int) = on_signal;
        // SAFETY: the handler only touches an atomic and calls `_exit`, both async-signal-safe.
        let previous = unsafe { libc::signal(signal, handler as libc::sighandler_t) };
        if previous == libc::SIG_ERR {
            tracing::warn!(
                signal,
                "cannot handle the signal: it will end the process at once"
            );
        }
    }
}

/// The signal that asked the job to stop, if one did.
pub fn requested() -> Option<i32> {
    match REQUESTED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The conventional exit status of a process stopped by `signal` (`128 + signal`).
pub fn exit_status(signal: i32) -> u8 {
    u8::try_from(128 + signal).unwrap_or(1)
}

/// The signal's name, for messages.
pub fn name(signal: i32) -> &'static str {
    match signal {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_numbers_and_exit_statuses() {
        assert_eq!((SIGTERM, SIGINT), (libc::SIGTERM, libc::SIGINT));
        assert_eq!((exit_status(SIGTERM), exit_status(SIGINT)), (143, 130));
        assert_eq!(
            (name(SIGTERM), name(SIGINT), name(9)),
            ("SIGTERM", "SIGINT", "a signal")
        );
    }
}
