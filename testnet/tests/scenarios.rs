//! Every shipped scenario on every backend, small: each must end with every node holding
//! correct files.
//!
//! The netns backend needs root and the docker backend a Docker engine; without them those tests
//! skip with a printed reason, unless IMISWARM_REQUIRE_PRIVILEGED_TESTS is set (as `.ci/run`
//! sets it): then a skip is a failure. Runs are serialized: each is a whole swarm of processes.

use std::sync::Mutex;

use imiswarm_testnet::backend::{self, BackendKind};
use imiswarm_testnet::runner::{RunOptions, run};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn run_scenario(name: &str, kind: BackendKind) {
    if let Some(why) = backend::unavailable(kind) {
        assert!(
            std::env::var_os("IMISWARM_REQUIRE_PRIVILEGED_TESTS").is_none(),
            "IMISWARM_REQUIRE_PRIVILEGED_TESTS is set but {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scenario = imiswarm_testnet::cli::load(name).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = RunOptions {
        backend: kind,
        workdir: dir.path().to_owned(),
        binary: env!("CARGO_BIN_EXE_imiswarm-testnet").into(),
        size: Some(4 << 20),
        http_baseline: false,
        progress: false,
    };
    let reports = run(&scenario, &opts).unwrap_or_else(|e| {
        let logs = std::fs::read_dir(dir.path().join("logs"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.path().display().to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default();
        panic!("{name} on {kind:?}: {e:#}\nlogs:\n{logs}")
    });
    assert!(!reports.is_empty(), "{name}: nothing measured");
    for r in &reports {
        println!("{}", r.table());
        assert!(
            r.all_correct,
            "{name} on {kind:?}: wrong files\n{}",
            r.table()
        );
        assert!(r.nodes > 0, "{name}: no receivers\n{}", r.table());
        assert_eq!(
            r.completed_nodes, r.nodes,
            "{name}: not every receiver finished"
        );
    }
    match name {
        // An update moves about the changed pieces, not the image.
        "update" => {
            let r = reports.last().unwrap();
            assert!(
                r.moved_bytes_per_node <= 1.5 * r.bytes_to_move as f64,
                "update moved {} bytes per node for {} changed",
                r.moved_bytes_per_node,
                r.bytes_to_move
            );
        }
        // Workstations are served by their cache server and each other: of the eight copies
        // they receive, the origin sends less than one (it is asked only in the moment before a
        // workstation has heard from its cache server).
        "bootstorm" => {
            let r = reports.last().unwrap();
            assert!(
                r.origin_upload_bytes < r.bytes_to_move,
                "the origin served the boot storm: {} bytes for {} per workstation",
                r.origin_upload_bytes,
                r.bytes_to_move
            );
        }
        // lab-b was cut off before the publish and restored 2 s after lab-a had finished: a
        // lab-b node done before then got bytes through the cut.
        "partition" => {
            let r = reports.last().unwrap();
            let done_at = |site: &str| {
                r.per_node
                    .iter()
                    .filter(|n| n.site == site)
                    .map(|n| n.completed_seconds.expect("every receiver finished"))
                    .collect::<Vec<_>>()
            };
            let (a, b) = (done_at("lab-a"), done_at("lab-b"));
            assert!(!a.is_empty() && !b.is_empty(), "{}", r.table());
            assert_eq!(
                r.received_across_cuts,
                Some(0),
                "bytes crossed into lab-b while it was cut off\n{}",
                r.table()
            );
            let a_last = a.iter().copied().fold(0.0, f64::max);
            let b_first = b.iter().copied().fold(f64::INFINITY, f64::min);
            assert!(
                b_first >= a_last + 2.0,
                "lab-b finished at {b_first:.2} s, before its link was back ({a_last:.2} s + 2 s)\n{}",
                r.table()
            );
        }
        _ => {}
    }
    let log_dir = dir.path().join("logs");
    if name == "bad-peer" {
        let banned = std::fs::read_dir(&log_dir)
            .unwrap()
            .flatten()
            .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("banning peer")));
        assert!(banned, "nobody banned the corrupt peer");
    }
}

macro_rules! scenario_tests {
    ($($test:ident: $name:literal on $kind:ident,)*) => {
        $(
            #[test]
            fn $test() {
                run_scenario($name, BackendKind::$kind);
            }
        )*
    };
}

scenario_tests! {
    rollout_on_processes: "rollout" on Process,
    bootstorm_on_processes: "bootstorm" on Process,
    update_on_processes: "update" on Process,
    churn_on_processes: "churn" on Process,
    bad_peer_on_processes: "bad-peer" on Process,
    partition_on_processes: "partition" on Process,
    rollout_in_namespaces: "rollout" on Netns,
    bootstorm_in_namespaces: "bootstorm" on Netns,
    update_in_namespaces: "update" on Netns,
    churn_in_namespaces: "churn" on Netns,
    bad_peer_in_namespaces: "bad-peer" on Netns,
    partition_in_namespaces: "partition" on Netns,
    rollout_in_containers: "rollout" on Docker,
    bootstorm_in_containers: "bootstorm" on Docker,
    update_in_containers: "update" on Docker,
    churn_in_containers: "churn" on Docker,
    bad_peer_in_containers: "bad-peer" on Docker,
    partition_in_containers: "partition" on Docker,
}
