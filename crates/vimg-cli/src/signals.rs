//! SIGINT, SIGTERM, SIGHUP (the terminal went away), SIGQUIT and SIGXCPU (the CPU-time
//! limit, RLIMIT_CPU, is near) during a conversion: stop the copy, remove the temporary
//! output, exit. A second signal (or a copy that does not stop within two seconds) removes
//! the temporaries at once and exits. SIGKILL cannot be caught: the temporary names carry
//! the pid and the process's start time, and the next conversion to the same destination
//! removes them ([`vimg::output::remove_stale_temporaries`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGXCPU};
use signal_hook::iterator::Signals;

/// What to print when the process exits on a signal without the conversion having stopped
/// (a destination written in place says how far it got).
pub type ExitNote = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// Installs the handlers and returns the flag the copy engine polls.
#[allow(dead_code)] // kept for commands that need no exit note
pub fn install_cancel_flag() -> Arc<AtomicBool> {
    install_cancel_flag_with(None)
}

/// [`install_cancel_flag`], printing `note` (when it gives one) on stderr if the process
/// has to exit before the conversion stopped (a second signal, or two seconds after the
/// first: a device's final flush can take that long).
pub fn install_cancel_flag_with(note: Option<ExitNote>) -> Arc<AtomicBool> {
    let note: Arc<Option<ExitNote>> = Arc::new(note);
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    if let Ok(mut signals) = Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGXCPU]) {
        std::thread::spawn(move || {
            let mut first = true;
            for sig in signals.forever() {
                if first {
                    first = false;
                    f.store(true, Ordering::SeqCst);
                    let note = note.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_secs(2));
                        forced_exit(&note, sig);
                    });
                } else {
                    forced_exit(&note, sig);
                }
            }
        });
    }
    flag
}

fn forced_exit(note: &Option<ExitNote>, sig: i32) -> ! {
    vimg::output::remove_all_temporaries();
    if let Some(n) = note.as_ref().as_ref().and_then(|f| f()) {
        eprintln!("vimg: interrupted; {n}");
    }
    std::process::exit(128 + sig);
}
