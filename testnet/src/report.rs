//! A scenario run's report: a table for people, JSON for machines, an SVG plot of completion
//! times. Owns the report's shape and its renderings; the runner fills it.

use std::fmt::Write as _;

use serde::Serialize;

use crate::backend::BackendKind;
use crate::hostcpu::HostCpu;

/// One node's part of a run.
#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    pub name: String,
    pub site: String,
    pub role: crate::scenario::Role,
    /// Seconds from the measurement's start until it held the version (None: never, or it
    /// already held it at the start).
    pub completed_seconds: Option<f64>,
    /// Its files match the version it was to hold.
    pub correct: bool,
    pub received_bytes: u64,
    pub uploaded_bytes: u64,
    pub cross_site_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub backend: BackendKind,
    /// Whether link rates were enforced by the kernel (netns) or by the nodes' own limiters.
    pub links_enforced_by: String,
    /// Whether latency was applied (it needs tc netem).
    pub latency_applied: bool,
    pub version: u64,
    /// Receivers measured (nodes that got the version after the measurement started).
    pub nodes: usize,
    pub completed_nodes: usize,
    /// Distribution time T: until the last receiver held the version.
    pub seconds: Option<f64>,
    /// The fluid bound T_min for the bytes that had to move (None with unlimited links).
    pub bound_seconds: Option<f64>,
    pub ratio_to_bound: Option<f64>,
    pub image_bytes: u64,
    /// The bytes each receiver needed from the network (the version's non-zero pieces, or the
    /// pieces an update changed).
    pub bytes_to_move: u64,
    pub origin_upload_bytes: u64,
    pub origin_upload_ratio: f64,
    pub cross_site_bytes: u64,
    /// On an update: bytes received per receiver on average, against `bytes_to_move`.
    pub moved_bytes_per_node: f64,
    /// The same receivers served `bytes_to_move` each by one central HTTP server with the same
    /// link rates (None: not run).
    pub http_baseline_seconds: Option<f64>,
    /// How busy the host's processors were during T (every node runs on this one host): near
    /// 1, the run measured the host's processors as much as the swarm.
    pub host_cpu: Option<HostCpu>,
    /// Bytes that nodes of a cut-off site received from other sites while the cut was in force,
    /// over the cuts in force during this round (None: there was none). Anything but 0 means a
    /// cut leaked.
    pub received_across_cuts: Option<u64>,
    pub all_correct: bool,
    pub per_node: Vec<NodeReport>,
}

fn secs(v: Option<f64>) -> String {
    v.map_or("-".into(), |s| format!("{s:.2} s"))
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / f64::from(1 << 20))
}

impl Report {
    /// The human table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "scenario {} on {:?} (links enforced by {}{}), version {}",
            self.scenario,
            self.backend,
            self.links_enforced_by,
            if self.latency_applied {
                ", latency applied"
            } else {
                ", latency not applied (no tc netem here)"
            },
            self.version
        );
        let _ = writeln!(
            out,
            "  {:<16} {:<10} {:<12} {:>10} {:>12} {:>12} {:>12}  files",
            "node", "site", "role", "done", "received", "uploaded", "cross-site"
        );
        for n in &self.per_node {
            let _ = writeln!(
                out,
                "  {:<16} {:<10} {:<12} {:>10} {:>12} {:>12} {:>12}  {}",
                n.name,
                n.site,
                format!("{:?}", n.role).to_lowercase(),
                secs(n.completed_seconds),
                mib(n.received_bytes),
                mib(n.uploaded_bytes),
                mib(n.cross_site_bytes),
                if n.correct { "ok" } else { "WRONG" }
            );
        }
        let _ = writeln!(
            out,
            "  {}/{} receivers done; T = {}, T_min = {}, T/T_min = {}",
            self.completed_nodes,
            self.nodes,
            secs(self.seconds),
            secs(self.bound_seconds),
            self.ratio_to_bound
                .map_or("-".into(), |r| format!("{r:.2}"))
        );
        let _ = writeln!(
            out,
            "  one central HTTP server: {}{}",
            secs(self.http_baseline_seconds),
            match (self.http_baseline_seconds, self.seconds) {
                (Some(h), Some(t)) if t > 0.0 => format!(" ({:.2}x the swarm's time)", h / t),
                _ => String::new(),
            }
        );
        let _ = writeln!(
            out,
            "  image {}, {} to move per receiver; origin uploaded {} ({:.2}x); {} crossed between sites; {} received per receiver",
            mib(self.image_bytes),
            mib(self.bytes_to_move),
            mib(self.origin_upload_bytes),
            self.origin_upload_ratio,
            mib(self.cross_site_bytes),
            mib(self.moved_bytes_per_node as u64),
        );
        if let Some(cpu) = self.host_cpu {
            let _ = writeln!(
                out,
                "  host processors during T: {:.0}% busy of {} cores{}",
                cpu.busy * 100.0,
                cpu.cores,
                if cpu.steal >= 0.005 {
                    format!(", {:.0}% stolen by the hypervisor", cpu.steal * 100.0)
                } else {
                    String::new()
                }
            );
        }
        if let Some(crossed) = self.received_across_cuts {
            let _ = writeln!(
                out,
                "  sites cut off received {} from other sites while cut ({}); T includes the time they were cut off",
                mib(crossed),
                if crossed == 0 {
                    "the cut held"
                } else {
                    "THE CUT LEAKED"
                }
            );
        }
        let _ = writeln!(
            out,
            "  every node's files correct: {}",
            if self.all_correct { "yes" } else { "NO" }
        );
        out
    }

    /// Per-node completion times as horizontal bars, slowest at the bottom, with T_min and T
    /// marked.
    pub fn svg(&self) -> String {
        let mut done: Vec<(&str, f64)> = self
            .per_node
            .iter()
            .filter_map(|n| n.completed_seconds.map(|s| (n.name.as_str(), s)))
            .collect();
        done.sort_by(|a, b| a.1.total_cmp(&b.1));
        let t_max = done
            .iter()
            .map(|d| d.1)
            .chain(self.bound_seconds)
            .fold(0.0f64, f64::max)
            .max(0.001);
        let (left, width, row) = (130.0, 520.0, 18.0);
        let height = 60.0 + row * done.len() as f64;
        let x = |s: f64| left + width * s / t_max;
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n",
            left + width + 40.0
        );
        let _ = writeln!(
            svg,
            "<text x=\"10\" y=\"16\" font-size=\"13\">{} on {:?}: completion time per node (s)</text>",
            self.scenario, self.backend
        );
        for (k, (name, s)) in done.iter().enumerate() {
            let y = 30.0 + row * k as f64;
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{name}</text><rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"{}\" fill=\"#4a7fb5\"/><text x=\"{:.1}\" y=\"{}\">{s:.2}</text>",
                left - 6.0,
                y + 12.0,
                x(*s) - left,
                row - 4.0,
                x(*s) + 3.0,
                y + 12.0
            );
        }
        let bottom = 30.0 + row * done.len() as f64;
        if let Some(b) = self.bound_seconds {
            let _ = writeln!(
                svg,
                "<line x1=\"{0:.1}\" y1=\"26\" x2=\"{0:.1}\" y2=\"{bottom}\" stroke=\"#c0392b\" stroke-dasharray=\"4 3\"/><text x=\"{0:.1}\" y=\"{1}\" fill=\"#c0392b\">T_min {b:.2}</text>",
                x(b),
                bottom + 14.0
            );
        }
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{bottom}\" x2=\"{}\" y2=\"{bottom}\" stroke=\"#333\"/>\n</svg>",
            left + width
        );
        svg
    }
}
