//! The tracker, discovery, locality and retention, on real processes on loopback.
//!
//! Every process is started by PID, killed on drop, and every wait is bounded.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const PIECE: usize = 64 * 1024;

/// Bytes of the image that travel (pieces that are not all zero).
fn travelling_bytes(files: &[(String, Vec<u8>)]) -> u64 {
    files
        .iter()
        .flat_map(|(_, b)| b.chunks(PIECE))
        .filter(|p| p.iter().any(|&b| b != 0))
        .map(|p| p.len() as u64)
        .sum()
}

#[test]
fn two_sites_cross_the_wan_about_once_per_site() {
    let mut swarm = Swarm::new();
    let files = write_image(&swarm.path("seedrepo/lab/1"), 16, 0.0);
    let image = image_bytes(&files);
    let travelling = travelling_bytes(&files);
    let mut tracker = swarm.tracker("tracker");
    // A cache server and three workstations at each site join first and wait for a version.
    let sites = ["lab-a", "lab-b"];
    let mut caches = Vec::new();
    let mut workstations = Vec::new();
    for site in sites {
        caches.push((
            site,
            swarm.daemon(&format!("{site}-cache"), &["--site", site]),
        ));
        for w in 1..=3 {
            // Workstations stay up while they boot, sharing with their lab.
            workstations.push((
                site,
                format!("{site}-ws{w}"),
                swarm.fetch_spawn(
                    &format!("{site}-ws{w}"),
                    300,
                    &["--site", site, "--linger", "10"],
                ),
            ));
        }
    }
    wait_for(
        "every node to register with the tracker",
        Duration::from_secs(60),
        || {
            swarm
                .tracker_status()
                .is_some_and(|s| s["registry"]["members"].as_u64() >= Some(8))
        },
    );
    let mut seed = swarm.seed(1, &["--site", "centre"]);

    let mut cross_by_site = std::collections::BTreeMap::<&str, u64>::new();
    // Why a node opened every piece to other sites, if it did (printed, for tuning).
    let opened = |p: &Proc| {
        let log = p.log_text();
        if log.contains("the site stalled") {
            "stalled"
        } else if log.contains("saturated") {
            "saturated"
        } else {
            "split"
        }
    };
    for (site, name, p) in workstations {
        let (status, p) = Swarm::wait_exit(p, 330);
        assert!(status.success(), "{name} failed:\n{}", p.log_text());
        assert_same_files(&swarm.path(&name), &files, &name);
        let crossed = p.total("cross_site_bytes");
        println!("{name}: {crossed} bytes from other sites ({})", opened(&p));
        *cross_by_site.entry(site).or_default() += crossed;
    }
    for (site, cache) in &mut caches {
        let dir = swarm.path(&format!("{site}-cache/lab/1"));
        wait_for(
            &format!("{site}'s cache server to complete"),
            Duration::from_secs(120),
            || dir.is_dir(),
        );
        assert_same_files(&dir, &files, site);
        cache.stop();
        let crossed = cache.total("cross_site_bytes");
        println!(
            "{site}-cache: {crossed} bytes from other sites ({})",
            opened(cache)
        );
        *cross_by_site.entry(site).or_default() += crossed;
    }
    seed.stop();
    tracker.stop();
    for (site, crossed) in &cross_by_site {
        println!(
            "{site}: {crossed} bytes crossed into the site: {:.2}x the image ({image} bytes), \
             {:.2}x the bytes that travel at all ({travelling}; zero pieces never do)",
            *crossed as f64 / image as f64,
            *crossed as f64 / travelling as f64
        );
        assert!(
            *crossed as f64 <= 1.2 * image as f64,
            "{site}: {crossed} bytes crossed between sites for an image of {image} bytes"
        );
        assert!(
            *crossed > 0,
            "{site}: nothing crossed: the test proves nothing"
        );
    }
}

#[test]
fn late_joiner_learns_the_latest_version_from_the_tracker() {
    let mut swarm = Swarm::new();
    let files = write_image(&swarm.path("seedrepo/lab/1"), 4, 0.0);
    let mut tracker = swarm.tracker("tracker");
    let mut seed = swarm.seed(1, &[]);
    let mut d1 = swarm.daemon("d1", &[]);
    let dir = swarm.path("d1/lab/1");
    wait_for("d1 to complete", Duration::from_secs(120), || dir.is_dir());
    wait_for(
        "the tracker to hold the announcement",
        Duration::from_secs(30),
        || {
            swarm.tracker_status().is_some_and(|s| {
                s["catalogue"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|e| e["image"] == "lab" && e["version"] == 1))
            })
        },
    );
    // Long after the announcement, a workstation that knows only the tracker.
    let (status, ws) = swarm.fetch("late", 120);
    assert!(status.success(), "late fetch failed:\n{}", ws.log_text());
    assert_same_files(&swarm.path("late"), &files, "late");
    assert!(
        ws.log_text().contains("catalogue from a tracker"),
        "the late node never read the tracker's catalogue:\n{}",
        ws.log_text()
    );
    d1.stop();
    seed.stop();
    tracker.stop();
}

#[test]
fn without_the_tracker_daemons_still_converge() {
    let mut swarm = Swarm::new();
    write_image(&swarm.path("seedrepo/lab/1"), 4, 0.0);
    let mut tracker = swarm.tracker("tracker");
    let mut seed = swarm.seed(1, &[]);
    let addr_file = swarm.path("d1.addr");
    let mut daemons = vec![swarm.daemon("d1", &["--addr-file", &addr_file.display().to_string()])];
    daemons.extend((2..=4).map(|i| swarm.daemon(&format!("d{i}"), &[])));
    for i in 1..=4 {
        let dir = swarm.path(&format!("d{i}/lab/1"));
        wait_for(
            &format!("d{i} to hold version 1"),
            Duration::from_secs(120),
            || dir.is_dir(),
        );
    }
    // The tracker goes down, then a new version is published from an image server that knows
    // one cache server.
    tracker.stop();
    seed.stop();
    let v2 = write_image(&swarm.path("seedrepo/lab/2"), 4, 0.3);
    let d1_addr = std::fs::read_to_string(&addr_file).unwrap();
    let d1_addr = d1_addr.lines().next().unwrap().to_owned();
    let mut seed = swarm.seed(2, &["--parent", "1", "--bootstrap", &d1_addr]);
    let names: Vec<String> = (1..=4).map(|i| format!("d{i}")).collect();
    wait_all_hold(&swarm, &names, 2, &v2);
    for d in &mut daemons {
        d.stop();
    }
    seed.stop();
    assert!(
        daemons
            .iter()
            .any(|d| d.log_text().contains("found holders in the DHT")),
        "no daemon found a holder of version 2 through the DHT"
    );
}

/// `imiswarm export IMAGE@VERSION --repo REPO` with no command: holds the version until stopped.
fn export(repo: &Path, target: &str, log: &Path) -> Proc {
    let child = Command::new(bin())
        .args(["--log-format", "json", "export", target, "--repo"])
        .arg(repo)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Proc {
        child: Some(child),
        log: log.to_owned(),
        name: "export".into(),
    }
}

#[test]
fn retired_versions_go_and_the_newest_k_stay() {
    let mut swarm = Swarm::new();
    let keep = ["--keep-versions", "2"];
    write_image(&swarm.path("seedrepo/lab/1"), 2, 0.0);
    let mut seed = swarm.seed(1, &[]);
    let mut daemons: Vec<Proc> = (1..=2)
        .map(|i| swarm.daemon(&format!("d{i}"), &keep))
        .collect();
    let root = swarm.path("");
    let held = |d: &str, v: u64| root.join(format!("{d}/lab/{v}")).is_dir();
    let wait_held = |v: u64| {
        for d in ["d1", "d2"] {
            wait_for(
                &format!("{d} to hold version {v}"),
                Duration::from_secs(120),
                || held(d, v),
            );
        }
    };
    wait_held(1);
    for v in 2..=3 {
        seed.stop();
        write_image(&swarm.path(&format!("seedrepo/lab/{v}")), 2, 0.2);
        seed = swarm.seed(v, &["--parent", &(v - 1).to_string()]);
        wait_held(v);
    }
    for d in ["d1", "d2"] {
        wait_for(
            &format!("{d} to drop version 1 (it keeps the newest 2)"),
            Duration::from_secs(30),
            || !held(d, 1) && !swarm.path(&format!("{d}/lab/1.manifest")).exists(),
        );
    }
    assert!(held("d1", 2) && held("d2", 2) && held("d1", 3) && held("d2", 3));

    // d2's version 2 is in use (an export); version 2 is retired.
    let mut exported = export(&swarm.path("d2"), "lab@2", &swarm.path("export.log"));
    wait_for("the export's lease", Duration::from_secs(10), || {
        std::fs::read_dir(swarm.path("d2/.leases/lab@2")).is_ok_and(|mut d| d.next().is_some())
    });
    let retire = Command::new(bin())
        .args(["--log-format", "json", "retire", "lab@2", "--repo"])
        .arg(swarm.path("seedrepo"))
        .arg("--publisher-key")
        .arg(swarm.path("publisher.key"))
        .args(["--bootstrap", &swarm.bootstrap()])
        .args(["--trust", &swarm.publisher_public])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--linger", "2"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(retire.status.success(), "retire failed: {retire:?}");
    wait_for(
        "d1 to drop the retired version",
        Duration::from_secs(30),
        || !held("d1", 2),
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(held("d2", 2), "d2 removed a version that an export uses");
    exported.stop();
    wait_for(
        "d2 to drop the retired version once the export ends",
        Duration::from_secs(30),
        || !held("d2", 2),
    );
    assert!(
        held("d1", 3) && held("d2", 3),
        "the newest version must stay"
    );
    for d in &mut daemons {
        d.stop();
    }
    seed.stop();
    // A restarted daemon keeps the retired version away (it is not fetched again).
    assert!(!held("d1", 2) && !swarm.path("d1/.partial/lab/2.manifest").exists());
}

#[test]
fn tracker_reports_holders_and_keeps_its_catalogue_across_a_restart() {
    let mut swarm = Swarm::new();
    write_image(&swarm.path("seedrepo/lab/1"), 2, 0.0);
    let mut tracker = swarm.tracker("tracker");
    let mut seed = swarm.seed(1, &["--site", "centre"]);
    let mut d1 = swarm.daemon("d1", &["--site", "lab-a"]);
    let dir = swarm.path("d1/lab/1");
    wait_for("d1 to complete", Duration::from_secs(120), || dir.is_dir());
    // Registration follows progress within a few seconds.
    let complete_at = |s: &serde_json::Value, site: &str| {
        s["registry"]["versions"]
            .as_array()
            .is_some_and(|versions| {
                versions.iter().any(|v| {
                    v["image"] == "lab"
                        && v["version"] == 1
                        && v["sites"].as_array().is_some_and(|sites| {
                            sites
                                .iter()
                                .any(|x| x["site"] == site && x["complete"].as_u64() == Some(1))
                        })
                })
            })
    };
    wait_for(
        "the tracker to see both holders",
        Duration::from_secs(30),
        || {
            swarm
                .tracker_status()
                .is_some_and(|s| complete_at(&s, "lab-a") && complete_at(&s, "centre"))
        },
    );
    let metrics =
        imiswarm_node::api::http_get(swarm.tracker_api.parse().unwrap(), "/metrics").unwrap();
    assert!(
        metrics.contains(
            "imiswarm_tracker_complete_holders{image=\"lab\",version=\"1\",site=\"lab-a\"} 1"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("imiswarm_tracker_members 2"), "{metrics}");

    // Everything stops; the tracker comes back alone and still has the catalogue.
    d1.stop();
    seed.stop();
    tracker.stop();
    let mut tracker = swarm.tracker("tracker-restarted");
    wait_for("the tracker's API", Duration::from_secs(30), || {
        swarm.tracker_status().is_some()
    });
    let s = swarm.tracker_status().unwrap();
    assert_eq!(s["registry"]["members"], 0, "{s}");
    let catalogue = s["catalogue"].as_array().unwrap();
    assert!(
        catalogue
            .iter()
            .any(|e| e["image"] == "lab" && e["version"] == 1 && e["state"] == "deployed"),
        "the catalogue did not survive the restart: {s}"
    );
    // And it answers a node with it: a daemon that knows only the tracker learns version 1.
    let api = format!("127.0.0.1:{}", free_port());
    let mut d2 = swarm.daemon("d2", &["--api", &api]);
    wait_for(
        "d2 to learn version 1 from the restarted tracker",
        Duration::from_secs(30),
        || {
            imiswarm_node::api::http_get(api.parse().unwrap(), "/status")
                .ok()
                .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                .is_some_and(|s| {
                    s["catalogue"]
                        .as_array()
                        .is_some_and(|c| c.iter().any(|e| e["image"] == "lab" && e["version"] == 1))
                })
        },
    );
    d2.stop();
    tracker.stop();
}
