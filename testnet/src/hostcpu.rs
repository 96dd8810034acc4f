//! How busy this machine's processors were during a measurement, from `/proc/stat`.
//!
//! Every backend runs the whole swarm on one host, so a run can be limited by the host's
//! processors rather than by the links it emulates; the report says so with these figures.
//! Owns reading and differencing the counters; not what a report does with them.

use serde::Serialize;

/// The host's cumulative processor time counters (all cores), in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq (guest time is inside user).
    busy: u64,
    /// Time the hypervisor gave to someone else while this machine wanted to run.
    steal: u64,
    /// busy + idle + iowait + steal.
    total: u64,
}

/// Processor use over an interval: shares of all cores' time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HostCpu {
    pub cores: usize,
    /// Busy share, 0 to 1 (1: every core busy the whole time).
    pub busy: f64,
    /// Stolen share, 0 to 1.
    pub steal: f64,
}

impl CpuTimes {
    /// The counters now; None where there is no `/proc/stat` (or it cannot be read).
    pub fn now() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// Parses the aggregate `cpu` line of a `/proc/stat` text.
    fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        // user nice system idle iowait irq softirq steal (older kernels stop before steal).
        let at = |i: usize| fields.get(i).copied().unwrap_or(0);
        let busy = at(0) + at(1) + at(2) + at(5) + at(6);
        let steal = at(7);
        (fields.len() >= 4).then_some(Self {
            busy,
            steal,
            total: busy + at(3) + at(4) + steal,
        })
    }

    /// Use between `self` (earlier) and `later`; None for an interval too short to measure.
    pub fn until(self, later: Self) -> Option<HostCpu> {
        let total = later.total.checked_sub(self.total)?;
        if total == 0 {
            return None;
        }
        let share = |a: u64, b: u64| b.saturating_sub(a) as f64 / total as f64;
        Some(HostCpu {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            busy: share(self.busy, later.busy),
            steal: share(self.steal, later.steal),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_come_from_the_aggregate_line() {
        let before = CpuTimes::parse(
            "cpu  100 0 50 800 10 0 40 0 0 0\ncpu0 50 0 25 400 5 0 20 0 0 0\nintr 1 2\n",
        )
        .unwrap();
        // 200 ticks later: 150 busy (100 user, 20 system, 30 softirq), 40 idle, 10 stolen.
        let after = CpuTimes::parse("cpu  200 0 70 840 10 0 70 10 0 0\n").unwrap();
        let use_ = before.until(after).unwrap();
        assert!((use_.busy - 0.75).abs() < 1e-9, "{use_:?}");
        assert!((use_.steal - 0.05).abs() < 1e-9, "{use_:?}");
        assert!(use_.cores >= 1);
        assert_eq!(
            before.until(before),
            None,
            "an empty interval has no shares"
        );
    }

    #[test]
    fn malformed_text_is_no_reading() {
        assert_eq!(CpuTimes::parse(""), None);
        assert_eq!(CpuTimes::parse("cpu  1 2 x 4\n"), None);
        assert_eq!(CpuTimes::parse("cpu  1 2\n"), None);
        assert!(CpuTimes::now().is_some() || !std::path::Path::new("/proc/stat").exists());
    }
}
