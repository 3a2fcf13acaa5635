//! Ctrl-C and SIGTERM. A command that can stop cleanly (`stream`: it finishes the frame and
//! prints its summary) registers a flag, and the first signal sets it; otherwise, and on a
//! second signal, the temporary files being written are removed and the process exits with
//! 130, so an interrupted writer leaves nothing behind.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// The flag of a command that stops cleanly, if one is running.
static GRACEFUL: Mutex<Option<Arc<AtomicBool>>> = Mutex::new(None);

/// Installs the handler; called once, first thing.
pub fn install() {
    // Fails only if a handler exists already, and then that one is in charge.
    let _ = ctrlc::set_handler(on_signal);
}

/// Makes the next Ctrl-C or SIGTERM set `flag` instead of ending the process.
pub fn stop_with(flag: Arc<AtomicBool>) {
    *GRACEFUL.lock().unwrap_or_else(PoisonError::into_inner) = Some(flag);
}

/// Runs on ctrlc's own thread, not in signal context, so it may lock and remove files.
fn on_signal() {
    if let Some(flag) = GRACEFUL
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
    {
        if !flag.swap(true, Ordering::Relaxed) {
            return;
        }
    }
    let removed = wae_edge::atomic::remove_pending();
    if removed > 0 {
        eprintln!("interrupted: removed {removed} unfinished file(s)");
    } else {
        eprintln!("interrupted");
    }
    std::process::exit(130);
}
