//! Swarms whose nodes live in network namespaces of their own (needs root).
//!
//! Skipped with a printed reason where namespaces cannot be made, except when
//! IMISWARM_REQUIRE_PRIVILEGED_TESTS is set (as `.ci/run` sets it): then a skip is a failure.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use imiswarm_testnet::netns::{Lab, Shape};

fn lab_or_skip(tag: &str, shapes: &[Shape]) -> Option<Lab> {
    if let Some(why) = imiswarm_testnet::netns::unavailable() {
        assert!(
            std::env::var_os("IMISWARM_REQUIRE_PRIVILEGED_TESTS").is_none(),
            "IMISWARM_REQUIRE_PRIVILEGED_TESTS is set but {why}"
        );
        eprintln!("skipped: {why}");
        return None;
    }
    Some(Lab::create(tag, shapes).expect("creating the lab"))
}

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_imiswarm-testnet"))
}

/// A node process inside a namespace; killed on drop.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn node(lab: &Lab, host: usize, args: &[&str], log: &Path) -> Node {
    let child = lab
        .command(host, bin())
        .arg("node")
        .args(["--log-format", "json"])
        .args(args)
        .env("IMISWARM_LOG", "info")
        .env_remove("IMISWARM_REPO")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Node(child)
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

#[test]
fn nodes_on_a_lan_find_each_other_by_mdns_alone() {
    let Some(lab) = lab_or_skip("mdns", &[Shape::default(); 4]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("publisher.key");
    let keygen = std::process::Command::new(bin())
        .args(["node", "keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{keygen:?}");
    let public = String::from_utf8(keygen.stdout).unwrap().trim().to_owned();
    let image = dir.path().join("seedrepo/lab/1");
    std::fs::create_dir_all(&image).unwrap();
    let mut disk = vec![0u8; 3 << 20];
    blake3::Hasher::new()
        .update(b"mdns")
        .finalize_xof()
        .fill(&mut disk);
    std::fs::write(image.join("disk.img"), &disk).unwrap();

    // No bootstrap anywhere: only multicast on the lab's bridge tells nodes about each other.
    let common = ["--trust", &public, "--mdns", "--api", "off"];
    let seedrepo = dir.path().join("seedrepo");
    let mut seed_args = vec![
        "seed",
        "lab",
        "1",
        "--repo",
        seedrepo.to_str().unwrap(),
        "--publisher-key",
        key.to_str().unwrap(),
    ];
    seed_args.extend(common);
    let _seed = node(&lab, 0, &seed_args, &dir.path().join("seed.log"));
    let mut daemons = Vec::new();
    for host in 1..4 {
        let repo = dir.path().join(format!("d{host}"));
        let mut args = vec!["daemon", "--repo", repo.to_str().unwrap()];
        args.extend(common);
        daemons.push(node(
            &lab,
            host,
            &args,
            &dir.path().join(format!("d{host}.log")),
        ));
    }
    for host in 1..4 {
        let got = dir.path().join(format!("d{host}/lab/1/disk.img"));
        wait_for(
            &format!("d{host} to fetch over mDNS discovery"),
            Duration::from_secs(90),
            || std::fs::read(&got).is_ok_and(|b| b == disk),
        );
    }
}

/// Whether a TCP connection from host `from` to port 4500 of host `to` opens within 3 s.
fn reaches(lab: &Lab, from: usize, to: usize) -> bool {
    let target = format!("exec 3<>/dev/tcp/{}/4500", lab.hosts()[to].ip);
    std::process::Command::new("ip")
        .args(["netns", "exec", &lab.hosts()[from].ns])
        .args(["timeout", "3", "bash", "-c", &target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn a_cut_site_still_reaches_its_own_hosts_and_nothing_else() {
    let Some(lab) = lab_or_skip("cut", &[Shape::default(); 3]) else {
        return;
    };
    // Host 0 is the centre; hosts 1 and 2 are the site that is cut off. Each runs a tracker
    // as something that listens on port 4500.
    let dir = tempfile::tempdir().unwrap();
    let mut listeners = Vec::new();
    for host in 0..3 {
        let repo = dir.path().join(format!("t{host}"));
        let log = dir.path().join(format!("t{host}.log"));
        let args = [
            "tracker",
            "--repo",
            repo.to_str().unwrap(),
            "--listen",
            "/ip4/0.0.0.0/tcp/4500",
            "--api",
            "off",
        ];
        listeners.push(node(&lab, host, &args, &log));
        wait_for(
            &format!("t{host} to listen"),
            Duration::from_secs(30),
            || std::fs::read_to_string(&log).is_ok_and(|t| t.contains("listening")),
        );
    }
    assert!(reaches(&lab, 1, 0) && reaches(&lab, 0, 2), "before the cut");

    lab.set_site_link(&[1, 2], false).unwrap();
    assert!(
        reaches(&lab, 1, 2) && reaches(&lab, 2, 1),
        "the site's own LAN stays up"
    );
    assert!(!reaches(&lab, 1, 0), "the site cannot reach the centre");
    assert!(!reaches(&lab, 0, 2), "the centre cannot reach the site");

    lab.set_site_link(&[1, 2], true).unwrap();
    assert!(reaches(&lab, 1, 0) && reaches(&lab, 0, 2), "restored");
    assert!(lab.set_site_link(&[7], false).is_err(), "no such host");
    drop(listeners);
}
