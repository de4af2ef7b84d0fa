//! Lines a format driver prints while it works, as QEMU's drivers print them to stderr
//! (e.g. the parallels driver's "Repairing image was not closed correctly" when a
//! read-write open repairs an unclean image first).
//!
//! The library prints nothing itself: a program that wants these lines installs a sink
//! with [`set_sink`](crate::notice::set_sink) (the `vimg` binary writes them to stderr, as qemu-img does); without
//! one they are dropped.

use std::sync::RwLock;

type Sink = Box<dyn Fn(&str) + Send + Sync>;

static SINK: RwLock<Option<Sink>> = RwLock::new(None);

/// Installs `sink`, called with each line (no trailing newline); replaces any earlier one.
pub fn set_sink(sink: impl Fn(&str) + Send + Sync + 'static) {
    if let Ok(mut s) = SINK.write() {
        *s = Some(Box::new(sink));
    }
}

/// Hands `line` to the installed sink, if any.
pub(crate) fn emit(line: &str) {
    if let Ok(s) = SINK.read() {
        if let Some(f) = s.as_ref() {
            f(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn lines_reach_the_installed_sink() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        set_sink(move |l| g.lock().unwrap().push(l.to_string()));
        emit("notice-test line");
        assert!(got.lock().unwrap().iter().any(|l| l == "notice-test line"));
    }
}
