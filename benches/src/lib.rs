//! Shared helpers for imiswarm's criterion benchmarks (the benchmarks themselves are in
//! `benches/`). The swarm distribution benchmark lives with the testnet.

use std::time::{Duration, Instant};

/// `len` bytes of incompressible pseudo-random data, made fast (BLAKE3's output stream) so
/// that setting up a 1 GiB benchmark takes a fraction of a second.
pub fn random_bytes(len: usize, seed: u8) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&[seed])
        .finalize_xof()
        .fill(&mut out);
    out
}

/// Runs `f` `rounds` times and returns the median duration: robust against one noisy run on a
/// shared machine.
pub fn median_time(rounds: usize, mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..rounds.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// Bytes per second, in MB/s (10^6), for printing.
pub fn mb_per_sec(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / 1e6
}
