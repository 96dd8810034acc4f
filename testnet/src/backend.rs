//! Where a scenario's nodes run: processes on loopback, network namespaces, or containers.
//!
//! | backend | a node is | links enforced by | a link cut |
//! |---|---|---|---|
//! | `process` | a process on 127.0.0.1, a port of its own | the node's own rate limiter | each side's blocklist lists the other's peers |
//! | `netns` | a process in a namespace of its own on a bridge | the kernel (tc), see [`crate::netns`] | the bridge drops frames between the site's ports and the rest |
//! | `docker` | a service of a compose project: a container built FROM scratch from our binary, on its site's network and a WAN network | the node's own rate limiter | off the WAN network |
//!
//! Every backend runs the same program (this binary's `node` subcommand, which is `imiswarm`)
//! with the same arguments but for addresses and paths, and every node's data directory is a
//! directory of the host's work directory (a bind mount for containers), so the runner reads
//! repositories, logs and status files the same way everywhere. Owns starting, stopping, killing
//! and cutting nodes, and removing whatever it created (processes by PID, namespaces, the compose
//! project); it does not decide what a node does (that is the runner).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

use crate::netns::{Lab, Shape};

/// Which backend to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Process,
    Netns,
    Docker,
}

/// The port every node listens on where each has an address of its own.
const PORT: u16 = 4500;

/// What a backend needs to know of a node up front.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub site: String,
    pub shape: Shape,
    /// The node's peer id (the runner makes every node's key).
    pub peer_id: String,
}

#[derive(Debug)]
enum Running {
    Child(Child),
    /// Node i's compose service.
    Container,
}

#[derive(Debug)]
pub struct Backend {
    kind: BackendKind,
    binary: PathBuf,
    workdir: PathBuf,
    hosts: Vec<Host>,
    /// process: each node's port on loopback.
    ports: Vec<u16>,
    /// process: the cuts in force, each a group of nodes (a site) cut off from all others.
    cuts: Vec<Vec<usize>>,
    /// process: each node's current log, where it confirms the blocklist it applied.
    logs: Vec<Option<PathBuf>>,
    /// process: the peers (node indices) on each node's blocklist, and how many lists were
    /// written (each file names its change, so each has a digest of its own).
    blocklists: Vec<Vec<usize>>,
    blocklist_changes: u64,
    lab: Option<Lab>,
    docker: Option<Docker>,
    running: Vec<Option<Running>>,
}

/// Why `kind` cannot run here, if it cannot.
pub fn unavailable(kind: BackendKind) -> Option<String> {
    match kind {
        BackendKind::Process => None,
        BackendKind::Netns => crate::netns::unavailable(),
        BackendKind::Docker => {
            let ok = Command::new("docker")
                .args(["info", "--format", "{{.ServerVersion}}"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return Some("no Docker engine answers (`docker info` failed)".into());
            }
            if Command::new("docker-compose")
                .arg("version")
                .output()
                .is_err()
            {
                return Some("docker-compose is not installed".into());
            }
            None
        }
    }
}

/// The nodes' log filter: `IMISWARM_TESTNET_NODE_LOG` if set (for example
/// `info,imiswarm_node::transfer=debug` to follow every piece request), else `info`. The
/// report reads what the nodes log at info, so a filter should keep that.
fn node_log_filter() -> String {
    match std::env::var("IMISWARM_TESTNET_NODE_LOG") {
        // The process backend's cuts wait for the nodes' "blocklist applied" lines.
        Ok(filter) => format!("{filter},imiswarm_node::blocklist=info,imiswarm_node::member=info"),
        Err(_) => "info".into(),
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Backend {
    /// Prepares hosts for every node (namespaces, or the image and networks of containers).
    pub fn prepare(
        kind: BackendKind,
        binary: &Path,
        workdir: &Path,
        tag: &str,
        hosts: Vec<Host>,
    ) -> anyhow::Result<Self> {
        if let Some(why) = unavailable(kind) {
            bail!("the {kind:?} backend cannot run here: {why}");
        }
        let mut ports = Vec::new();
        let mut lab = None;
        let mut docker = None;
        match kind {
            BackendKind::Process => {
                for host in &hosts {
                    ports.push(free_port()?);
                    write_blocklist(&blocklist_path(workdir, host), 0, &[])?;
                }
            }
            BackendKind::Netns => {
                let shapes: Vec<Shape> = hosts.iter().map(|h| h.shape).collect();
                lab = Some(Lab::create(tag, &shapes)?);
            }
            BackendKind::Docker => {
                docker = Some(Docker::prepare(binary, workdir, tag, &hosts)?);
            }
        }
        let running = hosts.iter().map(|_| None).collect();
        let hosts_empty = hosts.iter().map(|_| Vec::new()).collect();
        Ok(Self {
            kind,
            binary: binary.to_owned(),
            workdir: workdir.to_owned(),
            logs: hosts.iter().map(|_| None).collect(),
            hosts,
            ports,
            cuts: Vec::new(),
            blocklists: hosts_empty,
            blocklist_changes: 0,
            lab,
            docker,
            running,
        })
    }

    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// Whether the backend shapes links itself (else the nodes' own limiters must).
    pub fn shapes_links(&self) -> bool {
        self.kind == BackendKind::Netns
    }

    /// Whether latency is applied.
    pub fn latency_applied(&self) -> bool {
        self.lab.as_ref().is_some_and(Lab::netem)
    }

    /// The address other nodes reach node `i` at.
    pub fn addr(&self, i: usize) -> String {
        match self.kind {
            BackendKind::Process => format!("/ip4/127.0.0.1/tcp/{}", self.ports[i]),
            BackendKind::Netns => format!(
                "/ip4/{}/tcp/{PORT}",
                self.lab
                    .as_ref()
                    .map_or(Ipv4Addr::LOCALHOST, |l| l.hosts()[i].ip)
            ),
            BackendKind::Docker => format!(
                "/ip4/{}/tcp/{PORT}",
                self.docker
                    .as_ref()
                    .map_or(Ipv4Addr::LOCALHOST, |d| d.wan_ip(i))
            ),
        }
    }

    /// What node `i` listens on.
    pub fn listen(&self, i: usize) -> String {
        match self.kind {
            BackendKind::Process => self.addr(i),
            BackendKind::Netns | BackendKind::Docker => format!("/ip4/0.0.0.0/tcp/{PORT}"),
        }
    }

    /// A host path of the work directory as node processes see it.
    pub fn path(&self, host_path: &Path) -> String {
        match self.kind {
            BackendKind::Docker => {
                let rel = host_path.strip_prefix(&self.workdir).unwrap_or(host_path);
                Path::new(CONTAINER_WORKDIR).join(rel).display().to_string()
            }
            _ => host_path.display().to_string(),
        }
    }

    /// Starts node `i` running `imiswarm ARGS`; its stderr goes to `log`.
    pub fn start(&mut self, i: usize, args: &[String], log: &Path) -> anyhow::Result<()> {
        self.stop(i);
        let running = match self.kind {
            BackendKind::Process | BackendKind::Netns => {
                let mut command = match &self.lab {
                    Some(lab) => lab.command(i, &self.binary),
                    None => Command::new(&self.binary),
                };
                command
                    .arg("node")
                    .args(["--log-format", "json"])
                    .args(args);
                if self.kind == BackendKind::Process {
                    // Cuts on loopback are the nodes' own blocklists; a node started during a
                    // cut reads its list before it dials anyone.
                    command
                        .arg("--blocklist")
                        .arg(blocklist_path(&self.workdir, &self.hosts[i]));
                    self.logs[i] = Some(log.to_owned());
                }
                let child = command
                    .env("IMISWARM_LOG", node_log_filter())
                    .env_remove("IMISWARM_REPO")
                    .env_remove("IMISWARM_CONFIG")
                    .env_remove("IMISWARM_BLOCKLIST")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(log)?)
                    .spawn()
                    .with_context(|| format!("starting {}", self.hosts[i].name))?;
                Running::Child(child)
            }
            BackendKind::Docker => {
                let docker = self.docker.as_mut().context("docker not prepared")?;
                docker.run(i, args, log)?;
                Running::Container
            }
        };
        self.running[i] = Some(running);
        Ok(())
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.running[i].is_some()
    }

    /// SIGTERM and a bounded wait: the node logs its totals and exits.
    pub fn stop(&mut self, i: usize) {
        match self.running[i].take() {
            Some(Running::Child(mut child)) => {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while std::time::Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            Some(Running::Container) => {
                if let Some(d) = &self.docker {
                    d.stop(i, false);
                }
            }
            None => {}
        }
    }

    /// SIGKILL: the crash case.
    pub fn kill(&mut self, i: usize) {
        match self.running[i].take() {
            Some(Running::Child(mut child)) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Some(Running::Container) => {
                if let Some(d) = &self.docker {
                    d.stop(i, true);
                }
            }
            None => {}
        }
    }

    /// Cuts (or restores) the link between nodes `which` (a site) and all other nodes.
    pub fn set_links(&mut self, which: &[usize], up: bool) -> anyhow::Result<()> {
        match (&self.lab, &mut self.docker) {
            (Some(lab), _) => lab.set_site_link(which, up),
            (_, Some(docker)) => which.iter().try_for_each(|&i| docker.set_wan(i, up)),
            _ => self.set_blocklists(which, up),
        }
    }

    /// The process backend's cut: every node's blocklist names the peers on the other side of
    /// a cut, and the runner goes on once each running node has logged the list it applied.
    fn set_blocklists(&mut self, which: &[usize], up: bool) -> anyhow::Result<()> {
        self.cuts
            .retain(|group| !group.iter().any(|i| which.contains(i)));
        if !up {
            self.cuts.push(which.to_vec());
        }
        // The rest of the swarm first, then the site: on a restore, the site's nodes redial at
        // once when their list lifts, and must not find the tracker still refusing them (it
        // would not dial back; they would wait for their next redial).
        let (site, rest): (Vec<usize>, Vec<usize>) =
            (0..self.hosts.len()).partition(|i| which.contains(i));
        for phase in [rest, site] {
            let mut waits = Vec::new();
            for i in phase {
                if let Some(wait) = self.write_blocklist_of(i)? {
                    waits.push(wait);
                }
            }
            let deadline = std::time::Instant::now() + BLOCKLIST_APPLIED_WITHIN;
            for (i, log, from, digest) in waits {
                while !log_since_has(&log, from, &digest) {
                    if std::time::Instant::now() > deadline {
                        bail!(
                            "{} did not apply its blocklist within {BLOCKLIST_APPLIED_WITHIN:?}",
                            self.hosts[i].name
                        );
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
        Ok(())
    }

    /// Writes node `i`'s blocklist for the cuts in force, if it changed. For a running node,
    /// returns what to wait for: its log, how long the log was before, and the list's digest.
    fn write_blocklist_of(
        &mut self,
        i: usize,
    ) -> anyhow::Result<Option<(usize, PathBuf, u64, String)>> {
        let group_of = |i: usize| self.cuts.iter().position(|g| g.contains(&i));
        let blocked: Vec<usize> = (0..self.hosts.len())
            .filter(|&j| {
                j != i
                    && group_of(i) != group_of(j)
                    && (group_of(i).is_some() || group_of(j).is_some())
            })
            .collect();
        if blocked == self.blocklists[i] {
            return Ok(None);
        }
        self.blocklist_changes += 1;
        let peers: Vec<&str> = blocked
            .iter()
            .map(|&j| self.hosts[j].peer_id.as_str())
            .collect();
        let log = self.logs[i].clone().filter(|_| self.is_running(i));
        let from = log
            .as_ref()
            .and_then(|l| std::fs::metadata(l).ok())
            .map_or(0, |m| m.len());
        let path = blocklist_path(&self.workdir, &self.hosts[i]);
        let digest = write_blocklist(&path, self.blocklist_changes, &peers)?;
        self.blocklists[i] = blocked;
        Ok(log.map(|log| (i, log, from, digest)))
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        for i in 0..self.running.len() {
            self.kill(i);
        }
        // The lab and the compose project go with their own drops.
    }
}

/// How long a node may take to notice its new blocklist (it checks every 200 ms).
const BLOCKLIST_APPLIED_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

fn blocklist_path(workdir: &Path, host: &Host) -> PathBuf {
    workdir.join(&host.name).join("blocked-peers")
}

/// Whether `log` holds `digest` after its first `from` bytes (read from there only: a node's
/// log grows through the run).
fn log_since_has(log: &Path, from: u64, digest: &str) -> bool {
    use std::io::{Read, Seek};
    let Ok(mut file) = std::fs::File::open(log) else {
        return false;
    };
    let mut text = String::new();
    file.seek(std::io::SeekFrom::Start(from)).is_ok()
        && file.read_to_string(&mut text).is_ok()
        && text.contains(digest)
}

/// Replaces the file in one rename (a node never reads half a list). Returns the digest the
/// node logs once it applies the list; the change number makes it differ from every earlier
/// list's, so an old log line is never taken for the new list's.
fn write_blocklist(path: &Path, change: u64, peers: &[&str]) -> anyhow::Result<String> {
    let mut text = format!("# imiswarm-testnet, change {change}: the peers across a cut link\n");
    for peer in peers {
        text.push_str(peer);
        text.push('\n');
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &text)?;
    std::fs::rename(&tmp, path)?;
    Ok(imiswarm_node::blocklist::digest(text.as_bytes()))
}

/// Where the host's work directory is mounted in every container.
const CONTAINER_WORKDIR: &str = "/work";

/// The containers of one run: a compose project with a service per node on its site's network
/// and the WAN network.
///
/// A node's command differs per start (a new version to fetch, a restart), so the compose file
/// is rewritten with the command before each `up` of that one service (`--no-deps
/// --force-recreate`: the other nodes are not touched). A node whose site is cut is written
/// without the WAN network, so a restart during a cut does not reconnect it even for a moment.
#[derive(Debug)]
struct Docker {
    project: String,
    image: String,
    compose_file: PathBuf,
    workdir: PathBuf,
    hosts: Vec<Host>,
    sites: Vec<String>,
    /// 10.<net>.0.0/16 is this run's address block.
    net: u8,
    /// The arguments of each node's last start (None: never started): its service's command.
    commands: Vec<Option<Vec<String>>>,
    /// Nodes whose site is cut off the WAN.
    cut: Vec<bool>,
    /// `docker logs -f` of each running container, copying its output to the node's log.
    followers: std::sync::Mutex<std::collections::HashMap<String, Child>>,
}

fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .context("running docker")?;
    if !out.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A compose file string: JSON's quoting is valid YAML and escapes everything a value may
/// hold, and `$$` keeps compose from reading a `$` as a variable.
fn quoted(s: &str) -> String {
    serde_json::Value::from(s.replace('$', "$$")).to_string()
}

impl Docker {
    fn prepare(binary: &Path, workdir: &Path, tag: &str, hosts: &[Host]) -> anyhow::Result<Self> {
        let image = build_image(binary, workdir)?;
        let project = format!("imiswarm-{}-{tag}", std::process::id());
        let mut sites: Vec<String> = hosts.iter().map(|h| h.site.clone()).collect();
        sites.sort();
        sites.dedup();
        if sites.len() > 200 || hosts.len() > 200 {
            bail!("the docker backend takes at most 200 sites and 200 nodes");
        }
        let d = Self {
            project,
            image,
            compose_file: workdir.join("docker-compose.yml"),
            workdir: workdir.to_owned(),
            hosts: hosts.to_vec(),
            sites,
            net: 100 + (std::process::id() % 100) as u8,
            commands: hosts.iter().map(|_| None).collect(),
            cut: hosts.iter().map(|_| false).collect(),
            followers: Default::default(),
        };
        d.write_compose_file()?;
        Ok(d)
    }

    /// The compose file: the networks, and a service for every node started so far.
    fn compose_text(&self) -> String {
        let net = self.net;
        let mut out = String::from("version: \"2.4\"\nnetworks:\n");
        out.push_str(&format!(
            "  wan:\n    ipam:\n      config:\n        - subnet: 10.{net}.0.0/24\n"
        ));
        for (k, site) in self.sites.iter().enumerate() {
            out.push_str(&format!(
                "  {}:\n    ipam:\n      config:\n        - subnet: 10.{net}.{}.0/24\n",
                quoted(&format!("site-{site}")),
                k + 1
            ));
        }
        out.push_str("services:\n");
        let mount = format!("{}:{CONTAINER_WORKDIR}", self.workdir.display());
        for (i, host) in self.hosts.iter().enumerate() {
            let Some(args) = &self.commands[i] else {
                continue;
            };
            let command: Vec<String> = ["--log-format", "json"]
                .iter()
                .map(|a| quoted(a))
                .chain(args.iter().map(|a| quoted(a)))
                .collect();
            out.push_str(&format!(
                "  {}:\n    image: {}\n    container_name: {}\n    command: [{}]\n    \
                 environment:\n      IMISWARM_LOG: {}\n    volumes:\n      - {}\n    networks:\n",
                quoted(&host.name),
                quoted(&self.image),
                quoted(&self.container(i)),
                command.join(", "),
                quoted(&node_log_filter()),
                quoted(&mount),
            ));
            if !self.cut[i] {
                out.push_str(&format!(
                    "      wan:\n        ipv4_address: {}\n",
                    self.wan_ip(i)
                ));
            }
            out.push_str(&format!(
                "      {}:\n        ipv4_address: {}\n",
                quoted(&format!("site-{}", host.site)),
                self.site_ip(i)
            ));
        }
        out
    }

    fn write_compose_file(&self) -> anyhow::Result<()> {
        std::fs::write(&self.compose_file, self.compose_text())
            .with_context(|| format!("writing {}", self.compose_file.display()))
    }

    fn compose(&self, args: &[&str]) -> anyhow::Result<()> {
        let file = self.compose_file.display().to_string();
        let mut full = vec!["-p", self.project.as_str(), "-f", file.as_str()];
        full.extend_from_slice(args);
        let out = Command::new("docker-compose")
            .args(&full)
            .output()
            .context("running docker-compose")?;
        if !out.status.success() {
            bail!(
                "docker-compose {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn network(&self, name: &str) -> String {
        // docker-compose names a project's networks <project>_<name>.
        format!("{}_{name}", self.project)
    }

    fn wan_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net, 0, 10 + i as u8)
    }

    fn site_ip(&self, i: usize) -> Ipv4Addr {
        let k = self
            .sites
            .iter()
            .position(|s| *s == self.hosts[i].site)
            .unwrap_or(0);
        Ipv4Addr::new(10, self.net, k as u8 + 1, 10 + i as u8)
    }

    fn container(&self, i: usize) -> String {
        format!("{}-{}", self.project, self.hosts[i].name)
    }

    /// (Re)creates node `i`'s service with `args` and copies its output to `log`.
    fn run(&mut self, i: usize, args: &[String], log: &Path) -> anyhow::Result<()> {
        self.commands[i] = Some(args.to_vec());
        self.write_compose_file()?;
        let service = self.hosts[i].name.clone();
        self.compose(&["up", "-d", "--no-deps", "--force-recreate", &service])?;
        let name = self.container(i);
        let file = std::fs::File::create(log)?;
        let follower = Command::new("docker")
            .args(["logs", "-f", &name])
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("following the container's log")?;
        self.followers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, follower);
        Ok(())
    }

    /// Stops (or kills) node `i`'s container, once its log is fully copied, and removes it.
    fn stop(&self, i: usize, kill: bool) {
        let service = self.hosts[i].name.as_str();
        let _ = if kill {
            self.compose(&["kill", service])
        } else {
            self.compose(&["stop", "-t", "10", service])
        };
        let follower = self
            .followers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.container(i));
        if let Some(mut follower) = follower {
            // `logs -f` ends with the container; bounded in case it does not.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = follower.try_wait() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = follower.kill();
            let _ = follower.wait();
        }
        let _ = self.compose(&["rm", "-f", "-s", service]);
    }

    /// Takes node `i` off the WAN network (or back on it). Its site's network stays.
    fn set_wan(&mut self, i: usize, up: bool) -> anyhow::Result<()> {
        if self.cut[i] != up {
            return Ok(()); // already so: as on the other backends, not an error
        }
        self.cut[i] = !up;
        if self.commands[i].is_none() {
            return Ok(()); // never started: its service is written as the cut says
        }
        let wan = self.network("wan");
        let name = self.container(i);
        let result = if up {
            docker(&[
                "network",
                "connect",
                "--ip",
                &self.wan_ip(i).to_string(),
                &wan,
                &name,
            ])
        } else {
            docker(&["network", "disconnect", &wan, &name])
        };
        match result {
            Ok(_) => Ok(()),
            // A stopped node's container is gone; its next start follows the cut.
            Err(_)
                if docker(&["container", "inspect", &name])
                    .is_err_and(|e| e.to_string().contains("No such")) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        for (_, mut follower) in self
            .followers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            let _ = follower.kill();
            let _ = follower.wait();
        }
        let _ = self.compose(&["kill"]);
        let _ = self.compose(&["down", "--remove-orphans", "-t", "1"]);
    }
}

/// Builds (once per binary) an image FROM scratch holding `binary` and the shared libraries it
/// links, as `ldd` lists them: no image can be pulled, and none needs to be.
fn build_image(binary: &Path, workdir: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(binary)?;
    let stamp = format!(
        "{}-{}",
        meta.len(),
        meta.modified()?
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
    );
    let tag = format!(
        "imiswarm-testnet:{}",
        &blake3::hash(stamp.as_bytes()).to_hex()[..16]
    );
    if docker(&["image", "inspect", &tag]).is_ok() {
        return Ok(tag);
    }
    // Images of earlier builds of the binary are of no further use.
    if let Ok(old) = docker(&[
        "images",
        "imiswarm-testnet",
        "--format",
        "{{.Repository}}:{{.Tag}}",
    ]) {
        for image in old.lines().filter(|i| *i != tag) {
            let _ = docker(&["rmi", image]);
        }
    }
    let ctx = workdir.join("docker-context");
    std::fs::create_dir_all(&ctx)?;
    std::fs::copy(binary, ctx.join("imiswarm-testnet"))?;
    let ldd = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line
            .split("=>")
            .last()
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(path) = path {
            let dest = ctx.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(dest.parent().context("library path")?)?;
            std::fs::copy(path, &dest).with_context(|| format!("copying {path}"))?;
            libs.push(path.to_owned());
        }
    }
    let mut dockerfile = String::from("FROM scratch\n");
    for lib in &libs {
        dockerfile.push_str(&format!("COPY {} {lib}\n", lib.trim_start_matches('/')));
    }
    dockerfile.push_str(
        "COPY imiswarm-testnet /imiswarm-testnet\nENTRYPOINT [\"/imiswarm-testnet\", \"node\"]\n",
    );
    std::fs::write(ctx.join("Dockerfile"), dockerfile)?;
    let context = ctx.display().to_string();
    docker(&["build", "-q", "-t", &tag, &context])?;
    std::fs::remove_dir_all(&ctx)?;
    Ok(tag)
}
