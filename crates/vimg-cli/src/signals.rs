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

/// Installs the handlers and returns the flag the copy engine polls.
pub fn install_cancel_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    if let Ok(mut signals) = Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGXCPU]) {
        std::thread::spawn(move || {
            let mut first = true;
            for sig in signals.forever() {
                if first {
                    first = false;
                    f.store(true, Ordering::SeqCst);
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_secs(2));
                        vimg::output::remove_all_temporaries();
                        std::process::exit(128 + sig);
                    });
                } else {
                    vimg::output::remove_all_temporaries();
                    std::process::exit(128 + sig);
                }
            }
        });
    }
    flag
}
