//! The protocol crate stays sans-IO: no async runtime and no network stack anywhere in its
//! dependency graph. Read from the committed Cargo.lock, so it needs neither network nor cargo.

use std::collections::{BTreeMap, BTreeSet};

const FORBIDDEN: &[&str] = &["tokio", "libp2p", "async-std", "mio", "quinn", "smol"];

/// package name -> names of its dependencies, from Cargo.lock.
fn lock_graph() -> BTreeMap<String, Vec<String>> {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"))
        .expect("Cargo.lock at the workspace root");
    let mut graph = BTreeMap::new();
    for block in lock.split("[[package]]").skip(1) {
        let mut name = None;
        let mut deps = Vec::new();
        let mut in_deps = false;
        for line in block.lines() {
            let line = line.trim();
            if let Some(n) = line.strip_prefix("name = ") {
                name = Some(n.trim_matches('"').to_owned());
            } else if line.starts_with("dependencies = [") {
                in_deps = true;
            } else if in_deps && line == "]" {
                in_deps = false;
            } else if in_deps {
                // "name", or "name version" when several versions are locked.
                let dep = line.trim_matches(|c| c == '"' || c == ',');
                deps.push(dep.split(' ').next().unwrap_or(dep).to_owned());
            }
        }
        if let Some(name) = name {
            graph.entry(name).or_insert_with(Vec::new).extend(deps);
        }
    }
    graph
}

#[test]
fn protocol_depends_on_no_runtime_or_network_crate() {
    let graph = lock_graph();
    assert!(graph.contains_key("imiswarm-protocol"));
    let mut seen = BTreeSet::new();
    let mut stack = vec!["imiswarm-protocol".to_owned()];
    while let Some(name) = stack.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        stack.extend(graph.get(&name).cloned().unwrap_or_default());
    }
    let bad: Vec<_> = seen
        .iter()
        .filter(|n| {
            FORBIDDEN
                .iter()
                .any(|f| n.as_str() == *f || n.starts_with(&format!("{f}-")))
        })
        .collect();
    assert!(bad.is_empty(), "imiswarm-protocol pulls in {bad:?}");
    // The graph really was walked (blake3, postcard, ...).
    assert!(
        seen.contains("blake3") && seen.contains("postcard"),
        "{seen:?}"
    );
}
