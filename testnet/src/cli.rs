//! The `run` and `bench` commands: pick a scenario and a backend, run, print and save reports.

use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::backend::BackendKind;
use crate::report::Report;
use crate::runner::RunOptions;
use crate::scenario::Scenario;

/// The standard scenarios, built into the binary so `run rollout` works anywhere.
pub const SHIPPED: [(&str, &str); 6] = [
    ("rollout", include_str!("../scenarios/rollout.toml")),
    ("bootstorm", include_str!("../scenarios/bootstorm.toml")),
    ("update", include_str!("../scenarios/update.toml")),
    ("churn", include_str!("../scenarios/churn.toml")),
    ("bad-peer", include_str!("../scenarios/bad-peer.toml")),
    ("partition", include_str!("../scenarios/partition.toml")),
];

/// A scenario file, or the name of a shipped one.
pub fn load(name_or_path: &str) -> anyhow::Result<Scenario> {
    let path = std::path::Path::new(name_or_path);
    if path.exists() {
        return Scenario::load(path);
    }
    match SHIPPED.iter().find(|(name, _)| *name == name_or_path) {
        Some((_, text)) => Scenario::parse(text),
        None => bail!(
            "{name_or_path:?} is neither a file nor a shipped scenario ({})",
            SHIPPED.map(|s| s.0).join(", ")
        ),
    }
}

/// Where a run works and what it writes, for `run` and `bench` alike.
#[derive(Debug, Clone, clap::Args)]
pub struct OutputArgs {
    /// Keep everything of the run here: a new or empty directory (default: a temporary
    /// directory, removed).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Skip the central HTTP server baseline.
    #[arg(long)]
    pub no_baseline: bool,
    /// Write the reports (JSON) here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the last round's completion plot (SVG) here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// A scenario file, or a shipped scenario's name.
    pub scenario: String,
    #[arg(long, value_enum, default_value = "process")]
    pub backend: BackendKind,
    /// Override the image size, e.g. 4MiB.
    #[arg(long)]
    pub size: Option<String>,
    #[command(flatten)]
    pub output: OutputArgs,
}

fn execute(
    scenario: &Scenario,
    backend: BackendKind,
    size: Option<u64>,
    output: &OutputArgs,
) -> anyhow::Result<Vec<Report>> {
    let tmp;
    let workdir = match output.workdir.clone() {
        Some(w) => w,
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let opts = RunOptions {
        backend,
        workdir,
        binary: std::env::current_exe().context("locating this program")?,
        size,
        http_baseline: !output.no_baseline,
        progress: true,
    };
    crate::runner::run(scenario, &opts)
}

fn save(reports: &[Report], output: &OutputArgs) -> anyhow::Result<()> {
    for r in reports {
        println!("{}", r.table());
    }
    if let Some(path) = &output.json {
        std::fs::write(path, serde_json::to_string_pretty(reports)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let (Some(path), Some(last)) = (&output.svg, reports.last()) {
        std::fs::write(path, last.svg()).with_context(|| format!("writing {}", path.display()))?;
    }
    if reports.iter().any(|r| !r.all_correct) {
        bail!("some node ended with wrong files");
    }
    Ok(())
}

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let scenario = load(&args.scenario)?;
    let size = args
        .size
        .as_deref()
        .map(crate::scenario::parse_size)
        .transpose()?;
    let reports = execute(&scenario, args.backend, size, &args.output)?;
    save(&reports, &args.output)
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 16)]
    pub receivers: u32,
    #[arg(long, default_value = "128MiB")]
    pub size: String,
    /// Every link's rate, both ways.
    #[arg(long, default_value = "100Mbit")]
    pub rate: String,
    #[arg(long, default_value_t = 1.0)]
    pub latency_ms: f64,
    #[arg(long, value_enum, default_value = "netns")]
    pub backend: BackendKind,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// The benchmark's scenario: a tracker, the origin and `receivers` cache servers at one site,
/// every link at `rate` both ways.
pub fn bench_scenario(args: &BenchArgs) -> anyhow::Result<Scenario> {
    Scenario::parse(&format!(
        r#"
name = "bench-rollout"
[image]
size = "{size}"
files = 3
zero_share = 0.0
[defaults]
upload = "{rate}"
download = "{rate}"
latency_ms = {latency}
[[nodes]]
name = "tracker"
role = "tracker"
site = "centre"
[[nodes]]
name = "origin"
role = "origin"
site = "centre"
[[nodes]]
name = "cache"
role = "cache"
site = "lab"
count = {n}
[[events]]
action = "publish"
version = 1
[[events]]
action = "wait"
timeout = 1800
"#,
        size = args.size,
        rate = args.rate,
        latency = args.latency_ms,
        n = args.receivers,
    ))
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    let scenario = bench_scenario(args)?;
    let mut backend = args.backend;
    if let Some(why) = crate::backend::unavailable(backend) {
        eprintln!(
            "warning: the {backend:?} backend cannot run here ({why}); falling back to process, \
             where the nodes' own limiters enforce the links"
        );
        backend = BackendKind::Process;
    }
    let reports = execute(&scenario, backend, None, &args.output)?;
    if let Some(r) = reports.last() {
        println!(
            "distribution benchmark: {} receivers, {}, {} links, {} ms, {:?} backend",
            args.receivers, args.size, args.rate, args.latency_ms, r.backend
        );
        if let (Some(t), Some(b)) = (r.seconds, r.bound_seconds) {
            println!("  T = {t:.2} s, T_min = {b:.2} s, T/T_min = {:.3}", t / b);
        }
        if let (Some(t), Some(h)) = (r.seconds, r.http_baseline_seconds) {
            println!(
                "  central HTTP server: {h:.2} s, {:.2}x the swarm's time",
                h / t
            );
        }
        if let Some(cpu) = r.host_cpu {
            // Every node shares this host: near 100%, the host's processors bound T too.
            println!(
                "  host processors during T: {:.0}% busy of {} cores (steal {:.0}%)",
                cpu.busy * 100.0,
                cpu.cores,
                cpu.steal * 100.0
            );
        }
    }
    save(&reports, &args.output)
}
