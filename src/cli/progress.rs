//! Progress of long jobs (`check --repair`, `dedup`, the repair of a dirty image at open): an
//! `indicatif` bar when stderr is a terminal, otherwise a plain log line (info level) at most
//! every [`LOG_EVERY`]. `Sync`, so the engine's progress hook may hold it.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vhost_user_qcow2::qcow2::ProgressHook;

/// Least time between two plain progress lines in a log.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

/// Replaces [`LOG_EVERY`] (milliseconds), for tests only: a repair short enough for a test is
/// over long before 5 s.
pub const LOG_EVERY_ENV: &str = "VUQ_TEST_PROGRESS_EVERY_MS";

fn log_every() -> Duration {
    std::env::var(LOG_EVERY_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(LOG_EVERY, Duration::from_millis)
}

pub struct Progress {
    what: &'static str,
    unit: &'static str,
    /// Stderr is a terminal: draw a bar rather than log lines.
    terminal: bool,
    bar: OnceLock<ProgressBar>,
    /// Plain lines: when the last one was written (`None`: none yet, so the first update
    /// starts the clock without a line).
    last_line: Mutex<Option<Instant>>,
    every: Duration,
    /// The total of the current pass; a new total starts a new pass (the check walks the
    /// image more than once when it repairs).
    total: AtomicU64,
}

impl Progress {
    /// `what` names the job in plain lines ("check", "dedup"); `unit` the things counted.
    pub fn new(what: &'static str, unit: &'static str) -> Self {
        Self::with_terminal(what, unit, std::io::stderr().is_terminal())
    }

    fn with_terminal(what: &'static str, unit: &'static str, terminal: bool) -> Self {
        Progress {
            what,
            unit,
            terminal,
            bar: OnceLock::new(),
            last_line: Mutex::new(None),
            every: log_every(),
            total: AtomicU64::new(0),
        }
    }

    /// The engine's hook for the repair of a dirty image at open, shown by a new `Progress`
    /// ("repair", in steps); the caller finishes it once the open returned.
    pub fn repair_hook() -> (Arc<Progress>, ProgressHook) {
        let p = Arc::new(Progress::new("repair", "steps"));
        let shown = p.clone();
        (
            p,
            ProgressHook::new(move |done, total| shown.update(done, total)),
        )
    }

    /// The bar (none when stderr is not a terminal).
    fn bar(&self) -> Option<&ProgressBar> {
        if !self.terminal {
            return None;
        }
        Some(self.bar.get_or_init(|| {
            // Hidden until it has a length (see `update_with`).
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden());
            // The bar takes what the terminal's width leaves.
            let tmpl = "{prefix} [{wide_bar}] {pos}/{len} ({percent}%){msg}, ETA {eta}";
            let style = ProgressStyle::with_template(tmpl)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(self.what);
            bar
        }))
    }

    /// A short note after the counts (bytes saved, for example).
    pub fn set_message(&self, msg: String) {
        if let Some(b) = self.bar() {
            b.set_message(format!(", {msg}"));
        }
    }

    /// `done` of `total` in the current pass.
    pub fn update(&self, done: u64, total: u64) {
        self.update_with(done, total, "");
    }

    /// As [`update`](Self::update), with a note for the plain line.
    pub fn update_with(&self, done: u64, total: u64, note: &str) {
        if self.total.swap(total, Ordering::Relaxed) != total {
            if let Some(b) = self.bar() {
                b.set_length(total);
                b.reset();
            }
        }
        if let Some(b) = self.bar() {
            b.set_position(done);
            if b.is_hidden() {
                b.set_draw_target(ProgressDrawTarget::stderr());
            }
            return;
        }
        if let Some(line) = self.plain_line(done, total, note, Instant::now()) {
            log::info!("{line}");
        }
    }

    /// The plain line due at `now`, if one is.
    fn plain_line(&self, done: u64, total: u64, note: &str, now: Instant) -> Option<String> {
        let mut last = self.last_line.lock().unwrap_or_else(|e| e.into_inner());
        match *last {
            None => {
                *last = Some(now);
                None
            }
            Some(t) if now.duration_since(t) >= self.every && done < total => {
                *last = Some(now);
                let pct = done as f64 * 100.0 / total.max(1) as f64;
                let sep = if note.is_empty() { "" } else { ", " };
                Some(format!(
                    "{}: {done}/{total} {} ({pct:.1}%){sep}{note}",
                    self.what, self.unit
                ))
            }
            Some(_) => None,
        }
    }

    /// Take the bar off the screen (the summary follows as ordinary output).
    pub fn finish(&self) {
        if let Some(b) = self.bar.get() {
            b.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_are_rate_limited() {
        let p = Progress::with_terminal("check", "clusters", false);
        assert!(p.bar().is_none());
        let t0 = Instant::now();
        assert_eq!(p.plain_line(1, 100, "", t0), None);
        assert_eq!(p.plain_line(2, 100, "", t0 + Duration::from_secs(1)), None);
        let l = p.plain_line(50, 100, "", t0 + LOG_EVERY);
        assert_eq!(l.as_deref(), Some("check: 50/100 clusters (50.0%)"));
        assert_eq!(p.plain_line(60, 100, "x", t0 + LOG_EVERY * 3 / 2), None);
        let l = p.plain_line(70, 100, "saved 1 MiB", t0 + LOG_EVERY * 2);
        assert_eq!(
            l.as_deref(),
            Some("check: 70/100 clusters (70.0%), saved 1 MiB")
        );
        // Completion is the summary's job.
        assert_eq!(p.plain_line(100, 100, "", t0 + LOG_EVERY * 9), None);
    }
}
