//! Whole swarms of real `imiswarm` processes on loopback: seed, daemons, fetch.
//!
//! Every process is started by PID, killed on drop, and every wait is bounded; nothing listens
//! anywhere but 127.0.0.1. Byte counts come from each process's JSON `totals` log line.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn seed_five_daemons_and_a_fetch_converge() {
    let mut swarm = Swarm::new();
    let files = write_image(&swarm.path("seedrepo/lab/1"), 61, 0.0);
    let total = image_bytes(&files);
    assert!(total >= 64 * MIB as u64, "a 64 MiB version");
    let mut seed = swarm.seed(1, &[]);
    let api = format!("127.0.0.1:{}", free_port());
    let mut daemons: Vec<Proc> = (1..=5)
        .map(|i| {
            let mut args = vec!["--site", "lab-a"];
            if i == 1 {
                args.extend(["--api", &api]);
            }
            swarm.daemon(&format!("d{i}"), &args)
        })
        .collect();
    let (status, fetch) = swarm.fetch("ws", 300);
    assert!(status.success(), "fetch failed:\n{}", fetch.log_text());
    assert_same_files(&swarm.path("ws"), &files, "fetch");
    for i in 1..=5 {
        let dir = swarm.path(&format!("d{i}/lab/1"));
        wait_for(
            &format!("d{i} to complete"),
            Duration::from_secs(300),
            || dir.is_dir(),
        );
        assert_same_files(&dir, &files, &format!("d{i}"));
    }
    // Peer exchange, the DHT and the seed's bootstrap list all name the same peers: each pair
    // still shares one connection (two after a simultaneous dial), never one per mention.
    let report = status_json(&api);
    let peers = report["peers"].as_array().unwrap();
    assert!(peers.len() >= 2, "d1 knows the seed and its site: {report}");
    for peer in peers {
        let connections = peer["connections"].as_u64().unwrap();
        assert!(
            (1..=2).contains(&connections),
            "{connections} connections with one peer: {report}"
        );
    }
    for d in &mut daemons {
        d.stop();
    }
    seed.stop();
    let uploaded = seed.total("uploaded_bytes");
    println!("seed uploaded {uploaded} bytes for an image of {total} bytes to 6 receivers");
    assert!(
        uploaded < 2 * total,
        "the seed uploaded {uploaded} bytes, not less than 2x the image ({total})"
    );
    // The swarm served the rest.
    let from_daemons: u64 = daemons.iter().map(|d| d.total("uploaded_bytes")).sum();
    assert!(from_daemons > 0, "daemons uploaded nothing");
}

#[test]
fn corrupt_peer_is_banned_and_others_still_get_correct_files() {
    let mut swarm = Swarm::new();
    let files = write_image(&swarm.path("seedrepo/lab/1"), 8, 0.0);
    let mut seed = swarm.seed(1, &[]);
    let mut bad = swarm.daemon("bad", &["--corrupt-uploads"]);
    let bad_dir = swarm.path("bad/lab/1");
    wait_for(
        "the bad node to hold the version",
        Duration::from_secs(120),
        || bad_dir.is_dir(),
    );
    let mut good: Vec<Proc> = (1..=3)
        .map(|i| swarm.daemon(&format!("g{i}"), &[]))
        .collect();
    for i in 1..=3 {
        let dir = swarm.path(&format!("g{i}/lab/1"));
        wait_for(
            &format!("g{i} to complete"),
            Duration::from_secs(180),
            || dir.is_dir(),
        );
        assert_same_files(&dir, &files, &format!("g{i}"));
    }
    for g in &mut good {
        g.stop();
    }
    bad.stop();
    seed.stop();
    let bad_seen: u64 = good.iter().map(|g| g.total("bad_pieces")).sum();
    assert!(
        bad_seen > 0,
        "no node ever received a corrupt piece: the test proves nothing"
    );
    let banned = good
        .iter()
        .filter(|g| g.log_text().contains("banning peer"))
        .count();
    assert!(
        banned > 0,
        "a node received corrupt pieces but banned nobody"
    );
}

#[test]
fn untrusted_publisher_changes_nothing() {
    let mut swarm = Swarm::new();
    write_image(&swarm.path("seedrepo/lab/1"), 2, 0.0);
    // The seed signs with a key the daemons do not trust.
    let stranger = swarm.path("stranger.key");
    let keygen = Command::new(bin())
        .args(["keygen", "--out"])
        .arg(&stranger)
        .output()
        .unwrap();
    assert!(keygen.status.success());
    let mut seed = swarm.seed_signed_by(1, &stranger, &[]);
    let mut d = swarm.daemon("d1", &[]);
    std::thread::sleep(Duration::from_secs(6));
    d.stop();
    seed.stop();
    assert!(
        !swarm.path("d1/lab").exists(),
        "an untrusted version reached the daemon"
    );
    assert!(
        !swarm.path("d1/.partial/lab").exists(),
        "an untrusted version was started"
    );
    // It did hear the announcement (by gossip or from the seed's catalogue) and refused it.
    let log = d.log_text();
    assert!(
        log.contains("rejected announcement") || log.contains("refused announcement"),
        "the daemon never saw the announcement, so this proves nothing:\n{log}"
    );
}

#[test]
fn killed_daemon_resumes_without_fetching_twice() {
    let mut swarm = Swarm::new();
    let files = write_image(&swarm.path("seedrepo/lab/1"), 16, 0.0);
    let total = image_bytes(&files);
    let mut seed = swarm.seed(1, &[]);
    // Slow enough (about 8 s) to be killed halfway.
    let rate = ["--download-rate", "2MiB"];
    let mut d = swarm.daemon("d1", &rate);
    let progress = swarm.path("d1/.partial/lab/1.progress");
    wait_for("some verified progress", Duration::from_secs(120), || {
        std::fs::metadata(&progress).is_ok()
    });
    std::thread::sleep(Duration::from_millis(2000));
    d.kill9();
    assert!(
        !swarm.path("d1/lab/1").exists(),
        "killed too late: it had finished"
    );
    let mut d = swarm.daemon_in("d1-restarted", "d1", &rate);
    let dir = swarm.path("d1/lab/1");
    wait_for(
        "the restarted daemon to complete",
        Duration::from_secs(180),
        || dir.is_dir(),
    );
    assert_same_files(&dir, &files, "d1");
    d.stop();
    seed.stop();
    let uploaded = seed.total("uploaded_bytes");
    println!("seed uploaded {uploaded} bytes for {total} bytes across a kill -9");
    assert!(
        uploaded as f64 <= 1.1 * total as f64,
        "{uploaded} bytes sent for a {total}-byte image across a restart"
    );
}

#[test]
fn update_moves_only_the_changed_pieces() {
    let mut swarm = Swarm::new();
    let v1 = write_image(&swarm.path("seedrepo/lab/1"), 16, 0.0);
    let mut seed = swarm.seed(1, &[]);
    let mut daemons: Vec<Proc> = (1..=3)
        .map(|i| swarm.daemon(&format!("d{i}"), &[]))
        .collect();
    for i in 1..=3 {
        let dir = swarm.path(&format!("d{i}/lab/1"));
        wait_for(
            &format!("d{i} to hold version 1"),
            Duration::from_secs(120),
            || dir.is_dir(),
        );
    }
    seed.stop();

    // Version 2: 5% of the disk's pieces change.
    let v2 = write_image(&swarm.path("seedrepo/lab/2"), 16, 0.05);
    let mut seed = swarm.seed(2, &["--parent", "1"]);
    let names: Vec<String> = (1..=3).map(|i| format!("d{i}")).collect();
    wait_all_hold(&swarm, &names, 2, &v2);
    for d in &mut daemons {
        d.stop();
    }
    seed.stop();

    let piece = 64 * 1024;
    let changed_pieces = v1
        .iter()
        .zip(&v2)
        .map(|((_, a), (_, b))| {
            a.chunks(piece)
                .zip(b.chunks(piece))
                .filter(|(x, y)| x != y)
                .count()
        })
        .sum::<usize>();
    let changed_bytes = (changed_pieces * piece) as f64;
    assert!(changed_pieces > 0);
    for d in &daemons {
        let received = d.totals("received_bytes");
        // Totals after version 1, after version 2, at exit.
        let for_v2 = received.last().unwrap() - received.first().unwrap();
        println!(
            "{}: version 2 moved {for_v2} bytes for {changed_bytes} changed",
            d.name
        );
        assert!(
            for_v2 as f64 <= 1.1 * changed_bytes,
            "{}: version 2 moved {for_v2} bytes over the network for {changed_bytes} changed bytes",
            d.name
        );
        assert!(
            d.total("reused_bytes") > 0,
            "{}: nothing reused from version 1",
            d.name
        );
    }
}

#[test]
fn swarm_over_quic() {
    let mut swarm = Swarm::new();
    swarm.quic = true;
    let files = write_image(&swarm.path("seedrepo/lab/1"), 8, 0.0);
    let mut seed = swarm.seed(1, &[]);
    let addr = swarm.seed_addr.clone().unwrap();
    assert!(
        addr.contains("/quic-v1/"),
        "the seed listens on QUIC only: {addr}"
    );
    let mut daemons: Vec<Proc> = (1..=2)
        .map(|i| swarm.daemon(&format!("q{i}"), &[]))
        .collect();
    for i in 1..=2 {
        let dir = swarm.path(&format!("q{i}/lab/1"));
        wait_for(
            &format!("q{i} to complete over QUIC"),
            Duration::from_secs(120),
            || dir.is_dir(),
        );
        assert_same_files(&dir, &files, &format!("q{i}"));
    }
    for d in &mut daemons {
        d.stop();
    }
    seed.stop();
    assert!(daemons.iter().all(|d| d.total("received_bytes") > 0));
}

#[test]
fn status_and_metrics_describe_the_daemon() {
    let mut swarm = Swarm::new();
    write_image(&swarm.path("seedrepo/lab/1"), 2, 0.0);
    let mut seed = swarm.seed(1, &[]);
    let api = format!("127.0.0.1:{}", free_port());
    let mut d = swarm.daemon("d1", &["--api", &api]);
    let dir = swarm.path("d1/lab/1");
    wait_for("d1 to complete", Duration::from_secs(120), || dir.is_dir());

    let report = status_json(&api);
    let versions = report["versions"].as_array().unwrap();
    assert!(
        versions
            .iter()
            .any(|v| v["image"] == "lab" && v["version"] == 1 && v["complete"] == true),
        "{report}"
    );
    assert!(
        report["totals"]["received_bytes"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_eq!(
        report["peers"].as_array().unwrap().len(),
        1,
        "connected to the seed: {report}"
    );
    assert_eq!(report["catalogue"][0]["state"], "deployed", "{report}");

    let human = Command::new(bin())
        .args(["status", "--api", &api])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("lab@1  complete"), "{text}");

    let metrics = imiswarm_node::api::http_get(api.parse().unwrap(), "/metrics").unwrap();
    assert!(
        metrics.contains("# TYPE imiswarm_received_bytes_total counter"),
        "{metrics}"
    );
    assert!(
        metrics.contains("imiswarm_version_pieces{image=\"lab\",version=\"1\"}"),
        "{metrics}"
    );

    d.stop();
    seed.stop();
    // Nothing listens any more: a clear error, not a hang.
    let gone = Command::new(bin())
        .args(["status", "--api", &api])
        .output()
        .unwrap();
    assert_eq!(gone.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("is the daemon running"));
}

/// A small tmpfs mounted for one test and unmounted on drop. Needs root: without it the test is
/// skipped with a printed reason, unless IMISWARM_REQUIRE_PRIVILEGED_TESTS is set (as in CI).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount_or_skip(bytes: usize) -> Option<Self> {
        let required = std::env::var_os("IMISWARM_REQUIRE_PRIVILEGED_TESTS").is_some();
        let skip = |why: String| {
            assert!(
                !required,
                "IMISWARM_REQUIRE_PRIVILEGED_TESTS is set but {why}"
            );
            eprintln!("skipped: {why}");
            None
        };
        let uid = Command::new("id").arg("-u").output().ok();
        if uid.is_none_or(|o| String::from_utf8_lossy(&o.stdout).trim() != "0") {
            return skip("mounting a tmpfs needs root".into());
        }
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => Some(Self { dir }),
            other => skip(format!("mount -t tmpfs failed: {other:?}")),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn full_disk_stops_the_download_and_leaves_nothing_complete() {
    let Some(disk) = Tmpfs::mount_or_skip(3 * MIB) else {
        return;
    };
    let mut swarm = Swarm::new();
    write_image(&swarm.path("seedrepo/lab/1"), 8, 0.0);
    let mut seed = swarm.seed(1, &[]);
    let repo = disk.dir.path().join("repo");
    // The daemon whose repository sits on the 3 MiB filesystem.
    let boot = swarm.seed_addr.clone().unwrap();
    let mut d = swarm.spawn(
        "small",
        &[
            "daemon",
            "--repo",
            &repo.display().to_string(),
            "--bootstrap",
            &boot,
        ],
        &[],
    );
    wait_for("the disk-full error", Duration::from_secs(120), || {
        d.log_text().contains("disk full")
    });
    d.stop();
    seed.stop();
    assert!(
        !repo.join("lab/1").exists(),
        "a version that looks complete was left behind"
    );
    assert!(
        repo.join(".partial/lab/1").is_dir(),
        "the partial version is kept for later"
    );
}

#[test]
fn announcement_whose_manifest_does_not_match_changes_nothing() {
    let mut swarm = Swarm::new();
    // A node holds version 1 whose files (and so its manifest) changed after the publisher
    // signed: the signed manifest id matches nothing anyone can serve.
    let repo = swarm.path("liar");
    write_image(&repo.join("lab/1"), 2, 0.0);
    let run = |args: &[&str]| {
        let out = Command::new(bin()).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    let repo_arg = repo.display().to_string();
    let key = swarm.path("publisher.key").display().to_string();
    run(&["manifest", "build", "--repo", &repo_arg, "lab", "1"]);
    run(&[
        "announce", "sign", "--repo", &repo_arg, "--key", &key, "lab", "1",
    ]);
    std::fs::write(repo.join("lab/1/site.conf"), b"site = somewhere-else\n").unwrap();
    run(&["manifest", "build", "--repo", &repo_arg, "lab", "1"]);

    let addr_file = swarm.path("liar.addr");
    let mut liar = swarm.spawn(
        "liar",
        &[
            "daemon",
            "--repo",
            &repo_arg,
            "--addr-file",
            &addr_file.display().to_string(),
        ],
        &[],
    );
    wait_for("the node's address", Duration::from_secs(60), || {
        std::fs::read_to_string(&addr_file).is_ok_and(|s| !s.trim().is_empty())
    });
    swarm.seed_addr = Some(
        std::fs::read_to_string(&addr_file)
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .to_owned(),
    );
    let mut d = swarm.daemon("d1", &[]);
    wait_for(
        "d1 to hear the announcement",
        Duration::from_secs(60),
        || d.log_text().contains("fetching new version"),
    );
    std::thread::sleep(Duration::from_secs(3));
    d.stop();
    liar.stop();
    assert!(
        !swarm.path("d1/lab").exists(),
        "a version appeared without its signed manifest"
    );
    assert!(
        !swarm.path("d1/.partial/lab").exists(),
        "a download started without a manifest matching the signed id"
    );
}
