//! Runs a scenario on a backend and measures it.
//!
//! ```text
//!  scenario ──resolve──> nodes ──backend.prepare──> hosts (processes, namespaces, containers)
//!     │                                 │
//!     └─ events, in order ──────────────┴──> start / publish / kill / cut ... nodes
//!                                       │
//!  every 100 ms: repositories and status files ──> completion times, progress
//!  at the end: logs' totals, files checked ──> Report (+ the HTTP baseline, the bound)
//! ```
//!
//! Owns the run's work directory layout (`keys/`, `logs/`, one directory per node) and the
//! timeline; it must not hold swarm logic of its own: every node is a real `imiswarm`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::backend::{Backend, BackendKind, Host};
use crate::bound::FluidBound;
use crate::hostcpu::CpuTimes;
use crate::image::SampleImage;
use crate::report::{NodeReport, Report};
use crate::scenario::{Action, NodeSpec, Role, Scenario};

/// How to run a scenario.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub backend: BackendKind,
    /// Everything of the run goes here (created).
    pub workdir: PathBuf,
    /// The program every node runs (`<binary> node ...`): this testnet binary.
    pub binary: PathBuf,
    /// Overrides the scenario's image size (CI runs every scenario small).
    pub size: Option<u64>,
    /// Also time one central HTTP server serving the same receivers.
    pub http_baseline: bool,
    /// Live progress per node on stderr.
    pub progress: bool,
}

const IMAGE: &str = "lab";
/// Longer than nodes take to rewrite their status files.
const STATUS_SETTLE: f64 = 0.7;

/// Counters of one node, summed over its lifetimes (a restart starts from zero).
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    received: u64,
    uploaded: u64,
    cross_site: u64,
}

impl Counters {
    fn add(self, o: Self) -> Self {
        Self {
            received: self.received + o.received,
            uploaded: self.uploaded + o.uploaded,
            cross_site: self.cross_site + o.cross_site,
        }
    }

    fn sub(self, o: Self) -> Self {
        Self {
            received: self.received.saturating_sub(o.received),
            uploaded: self.uploaded.saturating_sub(o.uploaded),
            cross_site: self.cross_site.saturating_sub(o.cross_site),
        }
    }
}

struct Run<'a> {
    opts: &'a RunOptions,
    nodes: Vec<NodeSpec>,
    image: SampleImage,
    backend: Backend,
    public: String,
    peer_ids: Vec<String>,
    /// The newest published version.
    published: u64,
    /// When measurement started.
    t0: Option<Instant>,
    /// The host's processor counters when measurement started, and at the round's latest
    /// completion so far: the report's processor use covers exactly T.
    cpu_at_t0: Option<CpuTimes>,
    cpu_at_done: Option<CpuTimes>,
    /// Node -> the version it was last started to hold (workstations fetch one version).
    wants: Vec<u64>,
    /// Node -> (version -> seconds from t0 when first seen holding it; negative: before t0).
    done: Vec<HashMap<u64, f64>>,
    /// Counters of finished lifetimes, and at the measurement's start.
    past: Vec<Counters>,
    at_mark: Vec<Counters>,
    lifetimes: Vec<u32>,
    bars: Option<Bars>,
    /// Reports of the rounds measured so far (a round runs from one mark to the next).
    reports: Vec<Report>,
    /// The last event was a mark: a publish right after it moves the start to its end.
    just_marked: bool,
    /// Site -> each of its nodes' cross-site counter when the site was cut off (or when this
    /// round began, for a cut still in force at a mark).
    cut_at: HashMap<String, Vec<(usize, u64)>>,
    /// Bytes the nodes of a cut site received from other sites while it was cut, over the cuts
    /// restored this round; the report adds the cuts still in force.
    received_across_cuts: Option<u64>,
    scenario_name: String,
}

/// Runs `scenario` and returns one report per measured round: from the first publish (or a
/// `mark`) to the next `mark` or the end. An error if it could not run at all; a report whose
/// `all_correct` is false if some node ended with wrong files.
pub fn run(scenario: &Scenario, opts: &RunOptions) -> anyhow::Result<Vec<Report>> {
    let nodes = scenario.resolve()?;
    let size = match opts.size {
        Some(s) => s,
        None => scenario.image_bytes()?,
    };
    let image = SampleImage::new(&scenario.image, size);
    // An earlier run's repositories would already hold the version: every node would finish at
    // once and the report would measure nothing.
    if std::fs::read_dir(&opts.workdir).is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "the work directory {} is not empty: remove it or name another",
            opts.workdir.display()
        );
    }
    std::fs::create_dir_all(opts.workdir.join("keys"))?;
    std::fs::create_dir_all(opts.workdir.join("logs"))?;
    let publisher = imiswarm_node::keys::generate()?;
    imiswarm_node::keys::write(&opts.workdir.join("keys/publisher.key"), &publisher, true)?;
    let mut peer_ids = Vec::new();
    for n in &nodes {
        let key = imiswarm_node::keys::generate()?;
        imiswarm_node::keys::write(
            &opts.workdir.join(format!("keys/{}.key", n.name)),
            &key,
            true,
        )?;
        peer_ids.push(
            imiswarm_node::net::keypair_from_seed(key.seed())
                .public()
                .to_peer_id()
                .to_string(),
        );
        std::fs::create_dir_all(opts.workdir.join(&n.name))?;
    }
    let tag: String = scenario.name.chars().take(8).collect();
    let hosts = nodes
        .iter()
        .zip(&peer_ids)
        .map(|(n, peer_id)| Host {
            name: n.name.clone(),
            site: n.site.clone(),
            shape: n.shape,
            peer_id: peer_id.clone(),
        })
        .collect();
    let backend = Backend::prepare(opts.backend, &opts.binary, &opts.workdir, &tag, hosts)?;
    let count = nodes.len();
    let mut run = Run {
        opts,
        image,
        backend,
        public: publisher.public().to_hex(),
        peer_ids,
        published: 0,
        t0: None,
        cpu_at_t0: None,
        cpu_at_done: None,
        wants: vec![0; count],
        done: vec![HashMap::new(); count],
        past: vec![Counters::default(); count],
        at_mark: vec![Counters::default(); count],
        lifetimes: vec![0; count],
        bars: None,
        reports: Vec::new(),
        just_marked: false,
        cut_at: HashMap::new(),
        received_across_cuts: None,
        scenario_name: scenario.name.clone(),
        nodes,
    };
    run.bars = opts.progress.then(|| Bars::new(&run.nodes));
    let result = run.execute(scenario);
    run.stop_all();
    if let Some(bars) = &run.bars {
        bars.finish();
    }
    result?;
    if run.t0.is_some() {
        let last = run.report()?;
        run.reports.push(last);
    }
    Ok(run.reports)
}

impl Run<'_> {
    fn index(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .expect("checked when the scenario was parsed")
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        self.opts.workdir.join(&self.nodes[i].name)
    }

    fn p(&self, path: &Path) -> String {
        self.backend.path(path)
    }

    fn addr_of(&self, i: usize) -> String {
        format!("{}/p2p/{}", self.backend.addr(i), self.peer_ids[i])
    }

    fn args(&self, i: usize) -> Vec<String> {
        let n = &self.nodes[i];
        let dir = self.node_dir(i);
        let w = &self.opts.workdir;
        let mut args: Vec<String> = match n.role {
            Role::Tracker => vec![
                "tracker".into(),
                "--database".into(),
                self.p(&dir.join("tracker.redb")),
            ],
            Role::Origin => {
                let mut a = vec![
                    "seed".into(),
                    IMAGE.into(),
                    self.published.to_string(),
                    "--repo".into(),
                    self.p(&dir.join("repo")),
                    "--publisher-key".into(),
                    self.p(&w.join("keys/publisher.key")),
                ];
                if self.published > 1 {
                    a.extend(["--parent".into(), (self.published - 1).to_string()]);
                }
                a
            }
            Role::Cache => vec!["daemon".into(), "--repo".into(), self.p(&dir.join("repo"))],
            Role::Workstation => vec![
                "fetch".into(),
                IMAGE.into(),
                "--out".into(),
                self.p(&dir.join("out")),
                // A booted workstation keeps sharing with its lab until the run ends.
                "--linger".into(),
                "100000".into(),
                "--timeout".into(),
                "3600".into(),
            ],
        };
        args.extend([
            "--site".into(),
            n.site.clone(),
            "--trust".into(),
            self.public.clone(),
            "--listen".into(),
            self.backend.listen(i),
            "--node-key".into(),
            self.p(&w.join(format!("keys/{}.key", n.name))),
            "--api".into(),
            "off".into(),
        ]);
        if n.role != Role::Tracker {
            args.extend(["--status-file".into(), self.p(&dir.join("status.json"))]);
        }
        if !self.backend.shapes_links() {
            for (flag, rate) in [
                ("--upload-rate", n.shape.upload),
                ("--download-rate", n.shape.download),
            ] {
                if let Some(rate) = rate {
                    args.extend([flag.into(), rate.to_string()]);
                }
            }
        }
        if n.corrupt {
            args.push("--corrupt-uploads".into());
        }
        let tracker = self.nodes.iter().position(|m| m.role == Role::Tracker);
        let origin = self.nodes.iter().position(|m| m.role == Role::Origin);
        for b in [tracker, origin].into_iter().flatten() {
            // Everyone joins through the tracker; without one, through the origin.
            if b != i && (Some(b) == tracker || tracker.is_none()) {
                args.extend(["--bootstrap".into(), self.addr_of(b)]);
            }
        }
        args
    }

    fn start(&mut self, i: usize) -> anyhow::Result<()> {
        if self.backend.is_running(i) {
            return Ok(());
        }
        self.lifetimes[i] += 1;
        let log = self
            .opts
            .workdir
            .join("logs")
            .join(format!("{}.{}.log", self.nodes[i].name, self.lifetimes[i]));
        let _ = std::fs::remove_file(self.node_dir(i).join("status.json"));
        let args = self.args(i);
        // A workstation started before anything is published fetches the first version.
        self.wants[i] = self.published.max(1);
        self.backend.start(i, &args, &log)
    }

    /// The counters of the running lifetime, from its status file.
    fn live_counters(&self, i: usize) -> Counters {
        let Ok(text) = std::fs::read_to_string(self.node_dir(i).join("status.json")) else {
            return Counters::default();
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            return Counters::default();
        };
        let t = &v["totals"];
        Counters {
            received: t["received_bytes"].as_u64().unwrap_or(0),
            uploaded: t["uploaded_bytes"].as_u64().unwrap_or(0),
            cross_site: t["cross_site_bytes"].as_u64().unwrap_or(0),
        }
    }

    /// The last `totals` line of the current lifetime's log (written when it stops cleanly).
    fn logged_counters(&self, i: usize) -> Option<Counters> {
        let log = self
            .opts
            .workdir
            .join("logs")
            .join(format!("{}.{}.log", self.nodes[i].name, self.lifetimes[i]));
        let text = std::fs::read_to_string(log).ok()?;
        let fields = text
            .lines()
            .rev()
            .filter(|l| l.contains("\"totals\""))
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())?;
        let f = &fields["fields"];
        Some(Counters {
            received: f["received_bytes"].as_u64()?,
            uploaded: f["uploaded_bytes"].as_u64()?,
            cross_site: f["cross_site_bytes"].as_u64().unwrap_or(0),
        })
    }

    fn counters(&self, i: usize) -> Counters {
        self.past[i].add(self.live_counters(i))
    }

    fn end_lifetime(&mut self, i: usize, kill: bool) {
        if !self.backend.is_running(i) {
            return;
        }
        let live = self.live_counters(i);
        if kill {
            self.backend.kill(i);
        } else {
            self.backend.stop(i);
        }
        let last = if kill {
            live
        } else {
            self.logged_counters(i).unwrap_or(live)
        };
        self.past[i] = self.past[i].add(last);
        let _ = std::fs::remove_file(self.node_dir(i).join("status.json"));
    }

    fn stop_all(&mut self) {
        // Receivers first, then the origin and the tracker, so their totals include everything.
        let order: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| !matches!(self.nodes[i].role, Role::Origin | Role::Tracker))
            .chain((0..self.nodes.len()).filter(|&i| self.nodes[i].role == Role::Origin))
            .chain((0..self.nodes.len()).filter(|&i| self.nodes[i].role == Role::Tracker))
            .collect();
        for i in order {
            self.end_lifetime(i, false);
        }
    }

    /// Where node `i` keeps `version` once complete.
    fn version_dir(&self, i: usize, version: u64) -> PathBuf {
        match self.nodes[i].role {
            Role::Workstation => self.node_dir(i).join("out"),
            _ => self
                .node_dir(i)
                .join("repo")
                .join(IMAGE)
                .join(version.to_string()),
        }
    }

    fn holds(&self, i: usize, version: u64) -> bool {
        match self.nodes[i].role {
            Role::Tracker => true,
            Role::Workstation => self.wants[i] == version && self.version_dir(i, version).is_dir(),
            _ => self.version_dir(i, version).is_dir(),
        }
    }

    /// The version node `i` is to hold: the newest for the origin and cache servers, the one
    /// that was newest when it started for a workstation (a fetch gets one version).
    fn expects(&self, i: usize) -> Option<u64> {
        match self.nodes[i].role {
            Role::Tracker => None,
            Role::Workstation => Some(self.wants[i]),
            Role::Origin | Role::Cache => Some(self.published),
        }
    }

    /// Records completions and refreshes progress.
    fn poll(&mut self) {
        let now = Instant::now();
        for i in 0..self.nodes.len() {
            let v = self.published;
            if v == 0 || self.nodes[i].role == Role::Tracker || self.done[i].contains_key(&v) {
                continue;
            }
            if self.holds(i, v) {
                let at = match self.t0 {
                    Some(t0) => now.duration_since(t0).as_secs_f64(),
                    None => 0.0,
                };
                self.done[i].insert(v, at);
                if self.t0.is_some() {
                    self.cpu_at_done = CpuTimes::now();
                }
            }
        }
        if let Some(bars) = &self.bars {
            bars.update(self);
        }
    }

    fn sleep(&mut self, seconds: f64) {
        let until = Instant::now() + Duration::from_secs_f64(seconds);
        while Instant::now() < until {
            self.poll();
            std::thread::sleep(Duration::from_millis(100).min(until - Instant::now()));
        }
    }

    /// Measurement starts now.
    fn start_clock(&mut self) {
        self.t0 = Some(Instant::now());
        self.cpu_at_t0 = CpuTimes::now();
        self.cpu_at_done = None;
    }

    fn mark(&mut self) -> anyhow::Result<()> {
        if self.t0.is_some() {
            // Status files are rewritten twice a second: let every node's catch up with what
            // it did before the mark, so neither round counts bytes of the other.
            self.sleep(STATUS_SETTLE);
            let round = self.report()?;
            self.reports.push(round);
            // A cut in force goes on into the next round, which counts from here.
            self.received_across_cuts = None;
            let now: Vec<(String, Vec<(usize, u64)>)> = self
                .cut_at
                .keys()
                .map(|site| (site.clone(), self.cross_site_of_site(site)))
                .collect();
            self.cut_at.extend(now);
        }
        self.start_clock();
        for i in 0..self.nodes.len() {
            self.at_mark[i] = self.counters(i);
            // What is held at the mark counts as held before it.
            for at in self.done[i].values_mut() {
                *at = -1.0;
            }
        }
        Ok(())
    }

    fn execute(&mut self, scenario: &Scenario) -> anyhow::Result<()> {
        // The tracker first, and listening, so nobody waits for a redial.
        for i in 0..self.nodes.len() {
            if self.nodes[i].role == Role::Tracker && self.nodes[i].autostart {
                self.start(i)?;
                let log = self
                    .opts
                    .workdir
                    .join(format!("logs/{}.1.log", self.nodes[i].name));
                let deadline = Instant::now() + Duration::from_secs(30);
                while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("listening")) {
                    if Instant::now() > deadline {
                        bail!(
                            "the tracker did not start:\n{}",
                            std::fs::read_to_string(&log).unwrap_or_default()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        for i in 0..self.nodes.len() {
            if matches!(self.nodes[i].role, Role::Cache | Role::Workstation)
                && self.nodes[i].autostart
            {
                self.start(i)?;
            }
        }
        for event in &scenario.events {
            self.sleep(event.delay);
            let marked = self.just_marked;
            self.just_marked = matches!(event.action, Action::Mark);
            match &event.action {
                Action::Publish { version } if marked => {
                    self.publish(*version)?;
                    self.start_clock();
                }
                Action::Publish { version } => self.publish(*version)?,
                Action::Wait {
                    role,
                    site,
                    timeout,
                } => self.wait(*role, site.as_deref(), *timeout)?,
                Action::Mark => self.mark()?,
                Action::Start { node, role } => {
                    let which: Vec<usize> = (0..self.nodes.len())
                        .filter(|&i| {
                            node.as_ref().is_some_and(|n| *n == self.nodes[i].name)
                                || role.is_some_and(|r| r == self.nodes[i].role)
                        })
                        .collect();
                    for i in which {
                        self.start(i)?;
                    }
                }
                Action::Kill { node } => {
                    let i = self.index(node);
                    self.end_lifetime(i, true);
                }
                Action::Restart { node } => {
                    let i = self.index(node);
                    self.end_lifetime(i, true);
                    self.start(i)?;
                }
                Action::Stop {
                    node,
                    after_origin_sent,
                } => {
                    if *after_origin_sent {
                        self.wait_origin_sent()?;
                    }
                    let i = self.index(node);
                    self.end_lifetime(i, false);
                }
                Action::Cut { site } => self.cut(site)?,
                Action::Restore { site } => self.restore(site)?,
                Action::Sleep { seconds } => self.sleep(*seconds),
            }
        }
        self.poll();
        Ok(())
    }

    /// Cuts `site` off and notes what its nodes had received from other sites, once their
    /// status files have caught up with what came in before the cut.
    fn cut(&mut self, site: &str) -> anyhow::Result<()> {
        let which = self.site_nodes(site);
        self.backend.set_links(&which, false)?;
        if !self.cut_at.contains_key(site) {
            self.sleep(STATUS_SETTLE);
            let at = self.cross_site_of_site(site);
            self.cut_at.insert(site.to_owned(), at);
        }
        Ok(())
    }

    fn site_nodes(&self, site: &str) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].site == site)
            .collect()
    }

    /// Each node of `site` with its cross-site counter now.
    fn cross_site_of_site(&self, site: &str) -> Vec<(usize, u64)> {
        self.site_nodes(site)
            .into_iter()
            .map(|i| (i, self.counters(i).cross_site))
            .collect()
    }

    /// What the nodes in `at` received from other sites since their counters were `at`. A
    /// node killed meanwhile counts to its last status file (up to half a second old).
    fn crossed_since(&self, at: &[(usize, u64)]) -> u64 {
        at.iter()
            .map(|&(i, before)| self.counters(i).cross_site.saturating_sub(before))
            .sum()
    }

    /// Counts what crossed into `site` while it was cut (it must be nothing: the report shows
    /// whether the cut held), then restores its links.
    fn restore(&mut self, site: &str) -> anyhow::Result<()> {
        if let Some(at) = self.cut_at.remove(site) {
            self.sleep(STATUS_SETTLE);
            let crossed = self.crossed_since(&at);
            self.received_across_cuts = Some(self.received_across_cuts.unwrap_or(0) + crossed);
        }
        let which = self.site_nodes(site);
        self.backend.set_links(&which, true)
    }

    fn publish(&mut self, version: u64) -> anyhow::Result<()> {
        let origin = self
            .nodes
            .iter()
            .position(|n| n.role == Role::Origin)
            .context("no origin")?;
        let dir = self
            .node_dir(origin)
            .join("repo")
            .join(IMAGE)
            .join(version.to_string());
        self.image
            .write(&dir, version)
            .with_context(|| format!("writing version {version}"))?;
        self.end_lifetime(origin, false);
        self.published = version;
        self.start(origin)?;
        // Distribution starts when the origin has published: its hashing and start-up are not
        // part of the time to spread the version.
        let log = self.opts.workdir.join(format!(
            "logs/{}.{}.log",
            self.nodes[origin].name, self.lifetimes[origin]
        ));
        let deadline = Instant::now() + Duration::from_secs(600);
        while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("\"published\"")) {
            if Instant::now() > deadline || !self.backend.is_running(origin) {
                bail!(
                    "the origin did not publish version {version}:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.t0.is_none() {
            self.mark()?;
        }
        Ok(())
    }

    fn wait(&mut self, role: Option<Role>, site: Option<&str>, timeout: f64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs_f64(timeout);
        loop {
            self.poll();
            let missing: Vec<&str> = (0..self.nodes.len())
                .filter(|&i| role.is_none_or(|r| r == self.nodes[i].role))
                .filter(|&i| site.is_none_or(|s| s == self.nodes[i].site))
                .filter(|&i| {
                    self.backend.is_running(i) && self.expects(i).is_some_and(|v| !self.holds(i, v))
                })
                .map(|i| self.nodes[i].name.as_str())
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "after {timeout} s, still without version {}: {}",
                    self.published,
                    missing.join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_origin_sent(&mut self) -> anyhow::Result<()> {
        let origin = self
            .nodes
            .iter()
            .position(|n| n.role == Role::Origin)
            .context("no origin")?;
        let deadline = Instant::now() + Duration::from_secs(300);
        let status = self.node_dir(origin).join("status.json");
        let published = self.published;
        let sent_all = || {
            std::fs::read_to_string(&status)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|s| {
                    s["versions"].as_array()?.iter().find_map(|v| {
                        (v["version"].as_u64() == Some(published))
                            .then(|| v["first_pass_left"].as_u64() == Some(0))
                    })
                })
                .unwrap_or(false)
        };
        while !sent_all() {
            if Instant::now() > deadline {
                bail!("the origin did not send every piece once within 300 s");
            }
            self.sleep(0.1);
        }
        // The last pieces admitted are still on their way.
        self.sleep(1.0);
        Ok(())
    }

    fn bytes_to_move(&self) -> u64 {
        if self.published <= 1 {
            self.image.travelling_bytes()
        } else {
            self.image.changed_bytes(self.published)
        }
    }

    /// The report of the round since the last mark, with counters as they stand (after the run,
    /// the totals every node logged when it stopped).
    fn report(&self) -> anyhow::Result<Report> {
        let v = self.published;
        let bytes = self.bytes_to_move();
        let mut per_node = Vec::new();
        let (mut receivers, mut seeds) = (Vec::new(), Vec::new());
        let mut all_correct = true;
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            // Only nodes that are to hold this round's version take part in it.
            if self.expects(i) != Some(v) {
                continue;
            }
            let at = self.done[i].get(&v).copied();
            let started = self.lifetimes[i] > 0;
            let correct = !started
                || n.role == Role::Origin
                || self.image.check(&self.version_dir(i, v), v).is_ok();
            all_correct &= correct;
            let c = self.counters(i).sub(self.at_mark[i]);
            // Sources: the origin and whoever held the version when measuring started; every
            // other node that ran is a receiver, done or not.
            let held_at_start = at.is_some_and(|s| s < 0.0);
            if n.role == Role::Origin || held_at_start {
                seeds.push(i);
            } else if started {
                receivers.push((i, at));
            }
            per_node.push(NodeReport {
                name: n.name.clone(),
                site: n.site.clone(),
                role: n.role,
                completed_seconds: at.filter(|s| *s >= 0.0 && n.role != Role::Origin),
                correct,
                received_bytes: c.received,
                uploaded_bytes: c.uploaded,
                cross_site_bytes: c.cross_site,
            });
        }
        let completed = receivers.iter().filter(|r| r.1.is_some()).count();
        // T exists only when every receiver finished.
        let seconds = if completed == receivers.len() {
            receivers.iter().filter_map(|r| r.1).reduce(f64::max)
        } else {
            None
        };
        let rate = |r: Option<u64>| r.map_or(f64::INFINITY, |r| r as f64);
        let bound = FluidBound {
            file_bytes: bytes as f64,
            seed_upload: seeds
                .iter()
                .map(|&i| rate(self.nodes[i].shape.upload))
                .sum(),
            downloads: receivers
                .iter()
                .map(|&(i, _)| rate(self.nodes[i].shape.download))
                .collect(),
            uploads: receivers
                .iter()
                .map(|&(i, _)| rate(self.nodes[i].shape.upload))
                .collect(),
        }
        .seconds();
        let bound_seconds = (bound.is_finite() && bound > 0.0).then_some(bound);
        let origin = self.nodes.iter().position(|n| n.role == Role::Origin);
        let origin_upload = origin.map_or(0, |i| self.counters(i).sub(self.at_mark[i]).uploaded);
        let http_baseline_seconds = if self.opts.http_baseline && !receivers.is_empty() {
            let origin_rate = origin.and_then(|i| self.nodes[i].shape.upload);
            let downloads: Vec<Option<u64>> = receivers
                .iter()
                .map(|&(i, _)| self.nodes[i].shape.download)
                .collect();
            Some(crate::http::baseline_seconds(
                bytes,
                origin_rate,
                &downloads,
            )?)
        } else {
            None
        };
        let received: u64 = receivers
            .iter()
            .map(|&(i, _)| self.counters(i).sub(self.at_mark[i]).received)
            .sum();
        Ok(Report {
            scenario: self.scenario_name.clone(),
            backend: self.backend.kind(),
            links_enforced_by: if self.backend.shapes_links() {
                format!("the kernel (tc), MTU {}", crate::netns::LAB_MTU)
            } else {
                "the nodes' own rate limiters".into()
            },
            latency_applied: self.backend.latency_applied(),
            version: v,
            nodes: receivers.len(),
            completed_nodes: completed,
            seconds,
            bound_seconds,
            ratio_to_bound: seconds.zip(bound_seconds).map(|(t, b)| t / b),
            image_bytes: self.image.total_bytes(),
            bytes_to_move: bytes,
            origin_upload_bytes: origin_upload,
            origin_upload_ratio: origin_upload as f64 / bytes.max(1) as f64,
            cross_site_bytes: per_node.iter().map(|n| n.cross_site_bytes).sum(),
            moved_bytes_per_node: received as f64 / receivers.len().max(1) as f64,
            http_baseline_seconds,
            host_cpu: seconds
                .and(self.cpu_at_t0.zip(self.cpu_at_done))
                .and_then(|(t0, done)| t0.until(done)),
            received_across_cuts: if self.cut_at.is_empty() {
                self.received_across_cuts
            } else {
                let open: u64 = self.cut_at.values().map(|at| self.crossed_since(at)).sum();
                Some(self.received_across_cuts.unwrap_or(0) + open)
            },
            all_correct,
            per_node,
        })
    }
}

/// Live progress per node: one bar each (hidden when stderr is not a terminal, where a line a
/// few seconds goes to the log instead).
struct Bars {
    multi: indicatif::MultiProgress,
    bars: Vec<Option<indicatif::ProgressBar>>,
    last_line: std::cell::Cell<Instant>,
}

impl Bars {
    fn new(nodes: &[NodeSpec]) -> Self {
        let multi = indicatif::MultiProgress::new();
        let style = indicatif::ProgressStyle::with_template(
            "{prefix:>14} [{bar:30}] {pos:>5}/{len:5} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bars = nodes
            .iter()
            .map(|n| {
                (!matches!(n.role, Role::Tracker | Role::Origin)).then(|| {
                    let b = multi.add(indicatif::ProgressBar::new(1));
                    b.set_style(style.clone());
                    b.set_prefix(n.name.clone());
                    b
                })
            })
            .collect();
        Self {
            multi,
            bars,
            last_line: std::cell::Cell::new(Instant::now()),
        }
    }

    fn update(&self, run: &Run<'_>) {
        let mut line = Vec::new();
        for (i, bar) in self.bars.iter().enumerate() {
            let Some(bar) = bar else { continue };
            let status = std::fs::read_to_string(run.node_dir(i).join("status.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
            let want = run.expects(i).unwrap_or(run.published);
            let progress = status.as_ref().and_then(|s| {
                s["versions"].as_array()?.iter().find_map(|v| {
                    (v["version"].as_u64() == Some(want)).then(|| {
                        (
                            v["verified_pieces"].as_u64().unwrap_or(0),
                            v["total_pieces"].as_u64().unwrap_or(1),
                        )
                    })
                })
            });
            let (done, total) = match (progress, run.done[i].get(&want)) {
                (_, Some(_)) => (1, 1),
                (Some(p), None) => p,
                (None, None) => (0, 1),
            };
            bar.set_length(total.max(1));
            bar.set_position(done);
            bar.set_message(match run.done[i].get(&want) {
                Some(s) if *s >= 0.0 => format!("done at {s:.2} s"),
                Some(_) => "held".into(),
                None if run.backend.is_running(i) => String::new(),
                None => "not running".into(),
            });
            line.push(format!(
                "{}={}%",
                run.nodes[i].name,
                done * 100 / total.max(1)
            ));
        }
        if self.multi.is_hidden() && self.last_line.get().elapsed() >= Duration::from_secs(3) {
            self.last_line.set(Instant::now());
            eprintln!("version {}: {}", run.published, line.join(" "));
        }
    }

    fn finish(&self) {
        for bar in self.bars.iter().flatten() {
            bar.finish();
        }
    }
}
