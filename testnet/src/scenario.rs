//! Scenario files: who is in the swarm, their links, the image, and what happens when.
//!
//! ```toml
//! name = "rollout"
//! [image]
//! size = "32MiB"          # the version's bytes, over `files` files
//! files = 3
//! zero_share = 0.25       # share of all-zero pieces (they never travel)
//! changed_share = 0.05    # share of pieces a new version changes
//! [defaults]              # every node's link unless its group says otherwise
//! upload = "100Mbit"
//! download = "100Mbit"
//! latency_ms = 1.0
//! [[nodes]]
//! name = "origin"
//! role = "origin"         # origin | tracker | cache | workstation
//! site = "centre"
//! [[nodes]]
//! name = "cache"          # with count > 1: cache-1, cache-2, ...
//! role = "cache"
//! site = "lab-a"
//! count = 4
//! [[events]]              # run in order; `delay` seconds first
//! action = "publish"      # publish | wait | mark | start | kill | restart | stop | cut | restore | sleep
//! version = 1
//! [[events]]
//! action = "wait"         # until every started node (of `role`, at `site`) holds the newest version
//! ```
//!
//! Owns parsing and checking a scenario and resolving its groups into nodes; it does not start
//! anything (that is the runner).

use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::netns::Shape;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub image: ImageSpec,
    #[serde(default)]
    pub defaults: LinkSpec,
    pub nodes: Vec<NodeGroup>,
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// Total bytes of a version, e.g. "32MiB".
    pub size: String,
    #[serde(default = "default_files")]
    pub files: u32,
    #[serde(default)]
    pub zero_share: f64,
    #[serde(default = "default_changed")]
    pub changed_share: f64,
}

fn default_files() -> u32 {
    3
}

fn default_changed() -> f64 {
    0.05
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    pub upload: Option<String>,
    pub download: Option<String>,
    pub latency_ms: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Origin,
    Tracker,
    Cache,
    Workstation,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeGroup {
    pub name: String,
    pub role: Role,
    pub site: String,
    #[serde(default = "one")]
    pub count: u32,
    #[serde(default)]
    pub upload: Option<String>,
    #[serde(default)]
    pub download: Option<String>,
    #[serde(default)]
    pub latency_ms: Option<f64>,
    /// Started with the swarm (true), or only by a `start` event.
    #[serde(default = "yes")]
    pub autostart: bool,
    /// Serves corrupt pieces (to test that others ban it).
    #[serde(default)]
    pub corrupt: bool,
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

// Not `deny_unknown_fields`: serde cannot combine it with the flattened action, so
// `check_event_keys` refuses unknown keys instead.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    /// Seconds to wait before the action.
    #[serde(default)]
    pub delay: f64,
    #[serde(flatten)]
    pub action: Action,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum Action {
    /// The origin publishes this version (generated from the image spec; each version after
    /// the first changes `changed_share` of the previous one's pieces).
    Publish {
        version: u64,
    },
    /// Until every started node (of `role` and at `site`, if given) holds the newest published
    /// version.
    Wait {
        role: Option<Role>,
        site: Option<String>,
        #[serde(default = "default_wait")]
        timeout: f64,
    },
    /// Completion times are measured from here (default: the first publish).
    Mark,
    /// Starts nodes not started yet: one by name, or every one of a role.
    Start {
        node: Option<String>,
        role: Option<Role>,
    },
    /// SIGKILL, the crash case.
    Kill {
        node: String,
    },
    /// Starts a killed or stopped node again, with the same identity and data.
    Restart {
        node: String,
    },
    /// A clean stop; with `after_origin_sent`, once the origin has uploaded every travelling
    /// byte once.
    Stop {
        node: String,
        #[serde(default)]
        after_origin_sent: bool,
    },
    /// The site's nodes lose their link to every other site; they still reach each other (netns:
    /// the bridge drops the frames; docker: off the WAN network; process: blocklists).
    Cut {
        site: String,
    },
    Restore {
        site: String,
    },
    Sleep {
        seconds: f64,
    },
}

fn default_wait() -> f64 {
    300.0
}

/// Refuses a key an event's action does not take. Serde ignores unknown keys next to a flattened
/// enum, and a misspelt or misplaced one (`node` on a `wait`) would silently change what the
/// scenario does. Unknown actions and wrong types are left to serde, which names them.
fn check_event_keys(text: &str) -> anyhow::Result<()> {
    let doc: toml::Table = toml::from_str(text)?;
    let Some(events) = doc.get("events").and_then(toml::Value::as_array) else {
        return Ok(());
    };
    for (i, event) in events.iter().enumerate() {
        let Some(event) = event.as_table() else {
            continue;
        };
        let Some(action) = event.get("action").and_then(toml::Value::as_str) else {
            continue;
        };
        let takes: &[&str] = match action {
            "publish" => &["version"],
            "wait" => &["role", "site", "timeout"],
            "mark" => &[],
            "start" => &["node", "role"],
            "kill" | "restart" => &["node"],
            "stop" => &["node", "after_origin_sent"],
            "cut" | "restore" => &["site"],
            "sleep" => &["seconds"],
            _ => continue,
        };
        for key in event.keys() {
            if key != "action" && key != "delay" && !takes.contains(&key.as_str()) {
                bail!(
                    "events[{i}]: {action} takes no {key:?} (it takes delay{})",
                    takes.iter().map(|k| format!(", {k}")).collect::<String>()
                );
            }
        }
    }
    Ok(())
}

/// One node of a resolved scenario.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    pub role: Role,
    pub site: String,
    pub shape: Shape,
    pub autostart: bool,
    pub corrupt: bool,
}

impl Scenario {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("scenario {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let scenario: Self = toml::from_str(text)?;
        check_event_keys(text)?;
        scenario.check()?;
        Ok(scenario)
    }

    /// The image's size in bytes.
    pub fn image_bytes(&self) -> anyhow::Result<u64> {
        parse_size(&self.image.size)
    }

    fn check(&self) -> anyhow::Result<()> {
        let nodes = self.resolve()?;
        let count = |role| nodes.iter().filter(|n| n.role == role).count();
        if count(Role::Origin) != 1 {
            bail!("a scenario has exactly one origin");
        }
        if count(Role::Tracker) > 1 {
            bail!("a scenario has at most one tracker");
        }
        if count(Role::Cache) + count(Role::Workstation) == 0 {
            bail!("a scenario needs at least one cache server or workstation");
        }
        if nodes.len() > 200 {
            bail!("at most 200 nodes");
        }
        let size = self.image_bytes()?;
        if size == 0 || self.image.files == 0 || u64::from(self.image.files) > size {
            bail!("image: size and files must be positive, with a byte per file at least");
        }
        for share in [self.image.zero_share, self.image.changed_share] {
            if !(0.0..=1.0).contains(&share) {
                bail!("image: shares are between 0 and 1");
            }
        }
        let mut published = 0;
        for event in &self.events {
            if !(event.delay >= 0.0 && event.delay.is_finite()) {
                bail!("events: delay must be a non-negative number of seconds");
            }
            match &event.action {
                Action::Publish { version } => {
                    if *version != published + 1 {
                        bail!("events: versions are published in order from 1");
                    }
                    published = *version;
                }
                Action::Kill { node } | Action::Restart { node } | Action::Stop { node, .. }
                    if !nodes.iter().any(|n| &n.name == node) =>
                {
                    bail!("events: no node named {node:?}");
                }
                Action::Start { node, role } => {
                    if node.is_none() == role.is_none() {
                        bail!("events: start names a node or a role");
                    }
                    if let Some(node) = node
                        && !nodes.iter().any(|n| &n.name == node)
                    {
                        bail!("events: no node named {node:?}");
                    }
                }
                Action::Cut { site }
                | Action::Restore { site }
                | Action::Wait {
                    site: Some(site), ..
                } if !nodes.iter().any(|n| &n.site == site) => {
                    bail!("events: no site named {site:?}");
                }
                Action::Wait { timeout, .. } if !(*timeout > 0.0 && timeout.is_finite()) => {
                    bail!("events: wait needs a positive timeout");
                }
                Action::Sleep { seconds } if !(*seconds >= 0.0 && seconds.is_finite()) => {
                    bail!("events: sleep needs a non-negative number of seconds");
                }
                _ => {}
            }
        }
        if published == 0 {
            bail!("events: nothing is published");
        }
        Ok(())
    }

    /// Every node, groups expanded (`name-1`, `name-2`, ... when a group has several).
    pub fn resolve(&self) -> anyhow::Result<Vec<NodeSpec>> {
        let rate = |group: &Option<String>, default: &Option<String>, what: &str| {
            imiswarm_node::config::parse_rate(what, group.as_ref().or(default.as_ref()))
                .map_err(anyhow::Error::from)
        };
        let mut out = Vec::new();
        for g in &self.nodes {
            if g.count == 0 {
                bail!("nodes {:?}: count must be at least 1", g.name);
            }
            check_label("node name", &g.name)?;
            check_label("site", &g.site)?;
            if g.count > 1 && matches!(g.role, Role::Origin | Role::Tracker) {
                bail!("nodes {:?}: one {:?} only", g.name, g.role);
            }
            let shape = Shape {
                upload: rate(&g.upload, &self.defaults.upload, "upload")?,
                download: rate(&g.download, &self.defaults.download, "download")?,
                latency_ms: g.latency_ms.or(self.defaults.latency_ms),
            };
            for i in 1..=g.count {
                let name = if g.count == 1 {
                    g.name.clone()
                } else {
                    format!("{}-{i}", g.name)
                };
                if out.iter().any(|n: &NodeSpec| n.name == name) {
                    bail!("two nodes named {name:?}");
                }
                out.push(NodeSpec {
                    name,
                    role: g.role,
                    site: g.site.clone(),
                    shape,
                    autostart: g.autostart,
                    corrupt: g.corrupt,
                });
            }
        }
        Ok(out)
    }
}

fn check_label(what: &str, s: &str) -> anyhow::Result<()> {
    if s.is_empty()
        || s.len() > 32
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("{what} {s:?}: 1-32 letters, digits, '-' or '_'");
    }
    Ok(())
}

/// "32MiB", "512KiB", "1GiB" or a number of bytes.
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("{text:?} is not a size"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => bail!("{text:?}: unknown unit {other:?} (B, KiB, MiB, GiB)"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
name = "t"
[image]
size = "4MiB"
[defaults]
upload = "100Mbit"
[[nodes]]
name = "origin"
role = "origin"
site = "centre"
[[nodes]]
name = "cache"
role = "cache"
site = "lab-a"
count = 3
download = "50Mbit"
[[events]]
action = "publish"
version = 1
[[events]]
action = "wait"
"#;

    #[test]
    fn groups_expand_and_links_inherit_defaults() {
        let s = Scenario::parse(SMALL).unwrap();
        let nodes = s.resolve().unwrap();
        let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["origin", "cache-1", "cache-2", "cache-3"]);
        assert_eq!(nodes[1].shape.upload, Some(12_500_000));
        assert_eq!(nodes[1].shape.download, Some(6_250_000));
        assert_eq!(nodes[0].shape.download, None);
        assert_eq!(s.image_bytes().unwrap(), 4 << 20);
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (
                SMALL.replace("role = \"origin\"", "role = \"cache\""),
                "exactly one origin",
            ),
            (SMALL.replace("version = 1", "version = 2"), "in order"),
            (
                SMALL.replace("size = \"4MiB\"", "size = \"4MB\""),
                "unknown unit",
            ),
            (SMALL.replace("count = 3", "count = 0"), "at least 1"),
            (SMALL.replace("\"lab-a\"", "\"lab a\""), "site"),
            (
                format!("{SMALL}\n[[events]]\naction = \"kill\"\nnode = \"nobody\"\n"),
                "nobody",
            ),
            (
                SMALL.replace("name = \"t\"", "name = \"t\"\nbogus = 1"),
                "unknown field",
            ),
            (
                format!("{SMALL}node = \"cache-1\"\n"),
                "wait takes no \"node\"",
            ),
        ];
        for (text, expected) in cases {
            let err = format!("{:#}", Scenario::parse(&text).unwrap_err());
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
    }

    /// Loads every scenario file in the crate's `dir`; how many there were.
    fn load_all_in(dir: &str) -> usize {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::load(&path).unwrap();
                seen += 1;
            }
        }
        seen
    }

    #[test]
    fn shipped_scenarios_parse() {
        assert!(
            load_all_in("scenarios") >= 5,
            "the five standard scenarios ship in scenarios/"
        );
    }

    #[test]
    fn experiments_parse() {
        assert!(
            load_all_in("experiments") >= 1,
            "no experiment in experiments/"
        );
    }
}
