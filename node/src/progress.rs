//! Progress for a person (an indicatif bar on an interactive stderr) and for a machine (tracing
//! events at the start and end, with throughput). Bars hide themselves when stderr is not a
//! terminal, so logs and CI output stay clean.

use std::cell::Cell;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// A byte-counting progress report for one long operation.
#[derive(Debug)]
pub struct ByteProgress {
    bar: ProgressBar,
    what: String,
    started: Cell<Instant>,
}

impl ByteProgress {
    pub fn new(what: &str) -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(what.to_owned());
        Self {
            bar,
            what: what.to_owned(),
            started: Cell::new(Instant::now()),
        }
    }

    pub fn start(&self, total: u64) {
        self.bar.set_length(total);
        self.started.set(Instant::now());
        tracing::info!(what = %self.what, total_bytes = total, "started");
    }

    pub fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
        let secs = self.started.get().elapsed().as_secs_f64();
        let bytes = self.bar.position();
        tracing::info!(
            what = %self.what,
            bytes,
            seconds = secs,
            mib_per_sec = bytes as f64 / (1 << 20) as f64 / secs.max(1e-9),
            "finished"
        );
    }
}
