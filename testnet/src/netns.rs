//! Test hosts in Linux network namespaces, on one bridge, with kernel-shaped links.
//!
//! ```text
//!   host ns "<lab>-h0"              bridge ns "<lab>-br"             host ns "<lab>-h1"
//!   eth0 10.77.0.1/16 ──veth── <lab>p0 ─┐                 ┌─ <lab>p1 ──veth── eth0 10.77.0.2/16
//!   (egress: upload rate)  (egress: download rate)  br0  ...
//! ```
//!
//! The bridge lives in a namespace of its own: on a machine running Docker, the root namespace's
//! firewall can silently drop bridged traffic. A host's upload rate shapes its own end of the
//! veth (tc tbf), its download rate the bridge's end; latency is tc netem on the host's end when
//! the kernel has netem, and is left out otherwise ([`Lab::netem`] says which, for the report).
//! A site's link to the rest is cut by a bridge filter (nftables, in the bridge's namespace)
//! that drops what crosses between its hosts' ports and the others ([`Lab::set_site_link`]):
//! they still reach each other, and nothing else reaches them.
//!
//! Owns the namespaces, links and qdiscs it creates, and deletes them on drop (deleting a
//! namespace deletes its veth ends). Namespaces left by a killed run are swept at the next
//! [`Lab::create`]: their names carry the creating process's id. It must not touch the root
//! namespace's interfaces or anything it did not create. Needs root and iproute2.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, bail};

/// A link's shape, as the kernel enforces it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Shape {
    /// Bytes per second the host may send (None: unshaped).
    pub upload: Option<u64>,
    /// Bytes per second the host may receive (None: unshaped).
    pub download: Option<u64>,
    /// One-way delay added on the host's egress, in milliseconds.
    pub latency_ms: Option<f64>,
}

/// One host: a namespace with one interface on the lab's bridge.
#[derive(Debug, Clone)]
pub struct Host {
    pub ns: String,
    pub ip: Ipv4Addr,
}

/// A set of hosts on a bridge; removed on drop.
#[derive(Debug)]
pub struct Lab {
    name: String,
    hosts: Vec<Host>,
    /// Each host's port on the bridge (in the bridge's namespace).
    ports: Vec<String>,
    netem: bool,
    /// For each host, the cut it is behind (hosts cut together reach each other), if any.
    cuts: std::sync::Mutex<Cuts>,
}

#[derive(Debug, Default)]
struct Cuts {
    of_host: Vec<Option<u32>>,
    next: u32,
}

const NAME_PREFIX: &str = "imisw";

/// Why this machine cannot run a lab, if it cannot (not root, no `ip`, no namespaces).
pub fn unavailable() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok();
    if uid.is_none_or(|o| String::from_utf8_lossy(&o.stdout).trim() != "0") {
        return Some("network namespaces need root".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("iproute2's `ip` is not installed".into());
    }
    if Command::new("tc").arg("-V").output().is_err() {
        return Some("iproute2's `tc` is not installed".into());
    }
    // Tests call this from several threads of one process: each probe needs its own name.
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = format!("{NAME_PREFIX}-probe-{}-{n}", std::process::id());
    if run("ip", &["netns", "add", &probe]).is_err() {
        return Some("cannot create a network namespace here".into());
    }
    let _ = run("ip", &["netns", "del", &probe]);
    None
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn in_ns(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// Every lab link's MTU: jumbo frames, as on the storage LANs cache servers sit on. The lab
/// runs every host's network stack on one machine's CPUs, and at 1500 bytes the kernel's
/// per-packet work there took CPU the nodes needed (T/T_min 2.6 instead of 2.1 in the benchmark).
pub const LAB_MTU: &str = "9000";

/// tc's rate syntax: bits per second.
fn tc_rate(bytes_per_sec: u64) -> String {
    format!("{}bit", bytes_per_sec.saturating_mul(8))
}

/// A token bucket that lets a burst of about 2 ms at full rate through (at least 64 KiB, a
/// piece), and queues up to 100 ms before dropping.
fn tbf_args(bytes_per_sec: u64) -> Vec<String> {
    let burst = (bytes_per_sec / 500).max(64 * 1024);
    vec![
        "tbf".into(),
        "rate".into(),
        tc_rate(bytes_per_sec),
        "burst".into(),
        burst.to_string(),
        "latency".into(),
        "100ms".into(),
    ]
}

/// Removes namespaces of earlier labs whose creating process is gone.
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(&format!("{NAME_PREFIX}-")) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}

impl Lab {
    /// Creates one host per shape, all on one bridge, at 10.77.<i / 250>.<i % 250 + 1>/16.
    pub fn create(tag: &str, shapes: &[Shape]) -> anyhow::Result<Self> {
        sweep_stale();
        if shapes.len() > 250 * 250 {
            bail!("at most {} hosts in a lab", 250 * 250);
        }
        let name = format!("{NAME_PREFIX}-{}-{tag}", std::process::id());
        let mut lab = Self {
            name,
            hosts: Vec::new(),
            ports: Vec::new(),
            netem: false,
            cuts: std::sync::Mutex::new(Cuts::default()),
        };
        // On any error, drop deletes what was made so far.
        let bridge = lab.bridge_ns();
        run("ip", &["netns", "add", &bridge])?;
        in_ns(&bridge, "ip", &["link", "add", "br0", "type", "bridge"])?;
        in_ns(&bridge, "ip", &["link", "set", "br0", "up"])?;
        // Where Docker runs, br_netfilter is loaded and sends every bridged frame through
        // iptables: per namespace, so off here. A real switch does not run a firewall on each
        // frame, and at 16 x 100 Mbit/s that cost CPU the nodes needed.
        in_ns(
            &bridge,
            "sh",
            &[
                "-c",
                "for f in /proc/sys/net/bridge/bridge-nf-call-*; do \
                 if [ -w \"$f\" ]; then echo 0 > \"$f\"; fi; done",
            ],
        )?;
        lab.netem = netem_available(&bridge);
        for (i, shape) in shapes.iter().enumerate() {
            lab.add_host(i, shape)?;
        }
        Ok(lab)
    }

    fn bridge_ns(&self) -> String {
        format!("{}-br", self.name)
    }

    fn add_host(&mut self, i: usize, shape: &Shape) -> anyhow::Result<()> {
        let ns = format!("{}-h{i}", self.name);
        let ip = Ipv4Addr::new(10, 77, (i / 250) as u8, (i % 250 + 1) as u8);
        let bridge = self.bridge_ns();
        run("ip", &["netns", "add", &ns])?;
        self.hosts.push(Host { ns: ns.clone(), ip });
        // Interface names are at most 15 bytes: the bridge's ends are named by index.
        let port = format!("isp{}x{i}", std::process::id() % 10_000);
        run(
            "ip",
            &[
                "link", "add", "eth0", "mtu", LAB_MTU, "netns", &ns, "type", "veth", "peer",
                "name", &port, "mtu", LAB_MTU, "netns", &bridge,
            ],
        )?;
        in_ns(&bridge, "ip", &["link", "set", &port, "master", "br0"])?;
        in_ns(&bridge, "ip", &["link", "set", &port, "up"])?;
        self.ports.push(port.clone());
        self.cuts
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .of_host
            .push(None);
        in_ns(
            &ns,
            "ip",
            &["addr", "add", &format!("{ip}/16"), "dev", "eth0"],
        )?;
        in_ns(&ns, "ip", &["link", "set", "eth0", "up"])?;
        in_ns(&ns, "ip", &["link", "set", "lo", "up"])?;
        // Upload: the host's egress. Latency first (netem), the rate below it.
        let latency = shape.latency_ms.filter(|_| self.netem);
        match (latency, shape.upload) {
            (Some(ms), rate) => {
                let delay = format!("{ms}ms");
                in_ns(
                    &ns,
                    "tc",
                    &[
                        "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "netem", "delay",
                        &delay, "limit", "100000",
                    ],
                )?;
                if let Some(rate) = rate {
                    let mut args = vec!["qdisc", "add", "dev", "eth0", "parent", "1:1"];
                    let tbf = tbf_args(rate);
                    args.extend(tbf.iter().map(String::as_str));
                    in_ns(&ns, "tc", &args)?;
                }
            }
            (None, Some(rate)) => {
                let mut args = vec!["qdisc", "add", "dev", "eth0", "root"];
                let tbf = tbf_args(rate);
                args.extend(tbf.iter().map(String::as_str));
                in_ns(&ns, "tc", &args)?;
            }
            (None, None) => {}
        }
        // Download: the bridge's egress towards the host.
        if let Some(rate) = shape.download {
            let mut args = vec!["qdisc", "add", "dev", port.as_str(), "root"];
            let tbf = tbf_args(rate);
            args.extend(tbf.iter().map(String::as_str));
            in_ns(&bridge, "tc", &args)?;
        }
        Ok(())
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Whether latency is applied (the kernel has tc netem).
    pub fn netem(&self) -> bool {
        self.netem
    }

    /// A command that runs `program` inside host `i`'s namespace.
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i].ns]).arg(program);
        c
    }

    /// Cuts (or restores) the link between the hosts `site` and every other host: while cut,
    /// they still reach each other (a site's LAN) and nothing else; restored, everyone again.
    /// Out-of-range hosts are an error; needs nftables (`nft`).
    pub fn set_site_link(&self, site: &[usize], up: bool) -> anyhow::Result<()> {
        if let Some(&bad) = site.iter().find(|&&i| i >= self.hosts.len()) {
            bail!("no host {bad} in a lab of {}", self.hosts.len());
        }
        let mut cuts = self.cuts.lock().unwrap_or_else(|e| e.into_inner());
        let cut = (!up).then(|| {
            cuts.next += 1;
            cuts.next
        });
        for &i in site {
            cuts.of_host[i] = cut;
        }
        let ruleset = cut_ruleset(&self.ports, &cuts.of_host);
        apply_ruleset(&self.bridge_ns(), &ruleset)
    }
}

/// The bridge filter for `cut_of` (each port's cut, if any): frames between a cut's ports and
/// any other port are dropped, both ways; a host behind no cut reaches all others not behind
/// one. The whole table is rebuilt each time, and `nft -f` swaps it in at once.
fn cut_ruleset(ports: &[String], cut_of: &[Option<u32>]) -> String {
    let mut groups: std::collections::BTreeMap<u32, Vec<&str>> = Default::default();
    for (port, cut) in ports.iter().zip(cut_of) {
        if let Some(cut) = cut {
            groups.entry(*cut).or_default().push(port);
        }
    }
    let mut rules = String::new();
    for members in groups.values() {
        let set = members
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        rules += &format!("    iifname {{ {set} }} oifname != {{ {set} }} drop\n");
        rules += &format!("    oifname {{ {set} }} iifname != {{ {set} }} drop\n");
    }
    // Adding the table first makes the delete succeed whether or not it existed.
    format!(
        "table bridge {CUT_TABLE}\ndelete table bridge {CUT_TABLE}\ntable bridge {CUT_TABLE} {{\n  \
         chain forward {{\n    type filter hook forward priority 0; policy accept;\n{rules}  }}\n}}\n"
    )
}

const CUT_TABLE: &str = "imiswarm_cuts";

fn apply_ruleset(ns: &str, ruleset: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running nft (cutting a site's link needs nftables)")?;
    child
        .stdin
        .take()
        .context("nft's stdin")?
        .write_all(ruleset.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft -f: {}\n{ruleset}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether tc netem works here, probed on a throwaway dummy interface in `ns`.
fn netem_available(ns: &str) -> bool {
    let ok = in_ns(ns, "ip", &["link", "add", "probe0", "type", "dummy"]).is_ok()
        && in_ns(
            ns,
            "tc",
            &[
                "qdisc", "add", "dev", "probe0", "root", "netem", "delay", "1ms",
            ],
        )
        .is_ok();
    let _ = in_ns(ns, "ip", &["link", "del", "probe0"]);
    ok
}

impl Drop for Lab {
    fn drop(&mut self) {
        for host in &self.hosts {
            let _ = run("ip", &["netns", "del", &host.ns]);
        }
        let _ = run("ip", &["netns", "del", &self.bridge_ns()]);
    }
}
