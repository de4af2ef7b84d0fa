//! Progress reporting for `convert -p`: a bar with rate and ETA on a terminal (indicatif),
//! qemu-img's `    (12.34/100%)` lines otherwise, or one JSON object per update for
//! pipelines that draw their own. Progress counts allocated bytes, so a sparse image moves
//! steadily instead of sitting at 1% and jumping.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vimg::Progress;

use crate::args::ProgressMode;

enum Sink {
    Off,
    Bar(ProgressBar),
    Plain {
        to_stderr: bool,
        /// The percentage last printed; `None` before the first line.
        last: Mutex<Option<f64>>,
    },
    Json {
        start: Instant,
        last: Mutex<Option<Instant>>,
    },
}

/// A progress reporter; `update` is called from the copy engine.
pub struct Reporter {
    sink: Sink,
}

impl Reporter {
    /// `mode` None means no progress. `stdout_busy` is true when stdout carries image data.
    pub fn new(mode: Option<ProgressMode>, stdout_busy: bool) -> Reporter {
        let sink = match mode {
            None => Sink::Off,
            Some(ProgressMode::Json) => Sink::Json {
                start: Instant::now(),
                last: Mutex::new(None),
            },
            Some(ProgressMode::Bar) => Sink::Bar(bar()),
            Some(ProgressMode::Auto) if std::io::stderr().is_terminal() && !stdout_busy => {
                if std::io::stdout().is_terminal() {
                    Sink::Bar(bar())
                } else {
                    Sink::Plain {
                        to_stderr: false,
                        last: Mutex::new(None),
                    }
                }
            }
            Some(_) => Sink::Plain {
                to_stderr: stdout_busy,
                last: Mutex::new(None),
            },
        };
        Reporter { sink }
    }

    /// True when progress is wanted.
    pub fn enabled(&self) -> bool {
        !matches!(self.sink, Sink::Off)
    }

    /// True for qemu-img's `(NN.NN/100%)` lines, which end with a newline.
    pub fn plain(&self) -> bool {
        matches!(self.sink, Sink::Plain { .. })
    }

    /// Reports bytes done out of total.
    pub fn update(&self, p: Progress) {
        match &self.sink {
            Sink::Off => {}
            Sink::Bar(b) => {
                b.set_length(p.total);
                b.set_position(p.done);
            }
            Sink::Plain { to_stderr, last } => {
                // qemu's rule (util/qemu-progress.c, min_skip 1 as qemu-img convert sets
                // it): a line at 0 and 100, and whenever progress passed the last line by
                // more than one point. The lock keeps lines in order.
                let Ok(mut l) = last.lock() else { return };
                let pct = match (p.total, *l) {
                    // Nothing to copy: 0 at the start, 100 at the end, as qemu-img prints.
                    (0, None) => 0.0,
                    _ => percent(p),
                };
                let print = match *l {
                    None => true,
                    Some(prev) => pct > prev + 1.0 || pct >= 100.0 || pct == 0.0,
                };
                if print {
                    *l = Some(pct);
                    write_to(*to_stderr, &format!("    ({pct:3.2}/100%)\r"));
                }
            }
            Sink::Json { start, last } => {
                let now = Instant::now();
                if let Ok(mut l) = last.lock() {
                    // At most ten lines a second, plus the first and the last.
                    if let Some(t) = *l {
                        if now.duration_since(t) < Duration::from_millis(100) && p.done < p.total {
                            return;
                        }
                    }
                    *l = Some(now);
                }
                let secs = now.duration_since(*start).as_secs_f64().max(1e-6);
                let line = format!(
                    "{{\"done\": {}, \"total\": {}, \"percent\": {:.2}, \"rate\": {}}}\n",
                    p.done,
                    p.total,
                    percent(p),
                    (p.done as f64 / secs) as u64
                );
                write_to(true, &line);
            }
        }
    }

    /// Ends the display.
    pub fn finish(&self, ok: bool) {
        match &self.sink {
            Sink::Off | Sink::Json { .. } => {}
            Sink::Bar(b) => {
                if ok {
                    b.finish();
                } else {
                    b.abandon();
                }
            }
            // The copy's last report printed 100; qemu-img ends with a newline.
            Sink::Plain { to_stderr, .. } => {
                let _ = ok;
                write_to(*to_stderr, "\n");
            }
        }
    }
}

fn percent(p: Progress) -> f64 {
    if p.total == 0 {
        100.0
    } else {
        p.done as f64 * 100.0 / p.total as f64
    }
}

fn write_to(stderr: bool, s: &str) {
    if stderr {
        let mut e = std::io::stderr().lock();
        let _ = e.write_all(s.as_bytes());
        let _ = e.flush();
    } else {
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(s.as_bytes());
        let _ = o.flush();
    }
}

fn bar() -> ProgressBar {
    let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40} {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
    ) {
        b.set_style(style);
    }
    b
}

/// `convert -r`: holds the copy back to a rate in bytes per second. Called with the bytes
/// done as each chunk is handed to the writer (in guest order, one call at a time), it
/// sleeps until the time that many bytes may take at the rate.
pub struct RateLimit {
    start: Instant,
    rate: u64,
}

impl RateLimit {
    /// `rate` 0 means no limit.
    pub fn new(rate: u64) -> RateLimit {
        RateLimit {
            start: Instant::now(),
            rate,
        }
    }

    /// Waits until `done` bytes are due.
    pub fn pace(&self, done: u64) {
        if self.rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(done as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}
