//! SIGINT/SIGTERM during a conversion: stop the copy, remove the temporary output, exit.
//! A second signal (or a copy that does not stop within two seconds) removes the
//! temporaries at once and exits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Installs the handlers and returns the flag the copy engine polls.
pub fn install_cancel_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    if let Ok(mut signals) = Signals::new([SIGINT, SIGTERM]) {
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
