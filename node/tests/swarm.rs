//! Whole swarms of real `imiswarm` processes on loopback: seed, daemons, fetch.
//!
//! Every process is started by PID, killed on drop, and every wait is bounded; nothing listens
//! anywhere but 127.0.0.1. Byte counts come from each process's JSON `totals` log line.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// A process of ours; killed (and reaped) when dropped.
struct Proc {
    child: Option<Child>,
    log: PathBuf,
    name: String,
}

impl Proc {
    /// Sends SIGTERM and waits (bounded) for a clean exit, so the final totals are logged.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILL: the crash case.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every `totals` log line's counter `field`, oldest first (a daemon logs its totals
    /// after each completed version and when it stops).
    fn totals(&self, field: &str) -> Vec<u64> {
        self.log_text()
            .lines()
            .filter(|l| l.contains("\"totals\""))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["fields"][field].as_u64())
            .collect()
    }

    /// The last `totals` log line's counter `field`.
    fn total(&self, field: &str) -> u64 {
        *self
            .totals(field)
            .last()
            .unwrap_or_else(|| panic!("{}: no totals in its log:\n{}", self.name, self.log_text()))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Swarm {
    dir: tempfile::TempDir,
    publisher_public: String,
    seed_addr: Option<String>,
    /// The image server keeps its identity and port across restarts, as a real one does.
    seed_port: u16,
    /// Listen on QUIC instead of TCP.
    quic: bool,
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_imiswarm")
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

impl Swarm {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(bin())
            .args(["keygen", "--out"])
            .arg(dir.path().join("publisher.key"))
            .output()
            .unwrap();
        assert!(out.status.success());
        Self {
            publisher_public: String::from_utf8(out.stdout).unwrap().trim().to_owned(),
            dir,
            seed_addr: None,
            seed_port: free_port(),
            quic: false,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn spawn(&self, name: &str, args: &[&str], extra: &[&str]) -> Proc {
        let log = self.path(&format!("{name}.log"));
        // Every process listens on loopback only, on a free port unless told otherwise.
        let anywhere = if self.quic {
            "/ip4/127.0.0.1/udp/0/quic-v1"
        } else {
            "/ip4/127.0.0.1/tcp/0"
        };
        let listen: &[&str] = if args.contains(&"--listen") {
            &[]
        } else {
            &["--listen", anywhere]
        };
        // Many nodes share this machine: each control API on a port of its own.
        let api: &[&str] = if args[0] == "fetch" || extra.contains(&"--api") {
            &[]
        } else {
            &["--api", "127.0.0.1:0"]
        };
        let child = Command::new(bin())
            .args(["--log-format", "json"])
            .args(args)
            .args(["--trust", &self.publisher_public])
            .args(listen)
            .args(api)
            .args(extra)
            .env("IMISWARM_LOG", "info")
            .env_remove("IMISWARM_REPO")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Proc {
            child: Some(child),
            log,
            name: name.to_owned(),
        }
    }

    /// Starts `seed IMAGE VERSION` on the repository `seedrepo` and waits for its address.
    fn seed(&mut self, version: u64, extra: &[&str]) -> Proc {
        let key = self.path("publisher.key");
        self.seed_signed_by(version, &key, extra)
    }

    fn seed_signed_by(&mut self, version: u64, key: &Path, extra: &[&str]) -> Proc {
        let addr_file = self.path(&format!("seed{version}.addr"));
        let repo = self.path("seedrepo");
        let mut args = vec![
            "seed".to_owned(),
            "lab".into(),
            version.to_string(),
            "--repo".into(),
            repo.display().to_string(),
            "--publisher-key".into(),
            key.display().to_string(),
            "--addr-file".into(),
            addr_file.display().to_string(),
            "--node-key".into(),
            self.path("seed-node.key").display().to_string(),
            "--listen".into(),
            if self.quic {
                format!("/ip4/127.0.0.1/udp/{}/quic-v1", self.seed_port)
            } else {
                format!("/ip4/127.0.0.1/tcp/{}", self.seed_port)
            },
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = self.spawn(&format!("seed{version}"), &args, &[]);
        wait_for("the seed's address", Duration::from_secs(120), || {
            std::fs::read_to_string(&addr_file).is_ok_and(|s| !s.trim().is_empty())
        });
        let addr = std::fs::read_to_string(&addr_file).unwrap();
        self.seed_addr = Some(addr.lines().next().unwrap().to_owned());
        p
    }

    fn daemon(&self, name: &str, extra: &[&str]) -> Proc {
        self.daemon_in(name, name, extra)
    }

    /// A daemon whose repository is the directory `repo` (another daemon's, after a restart).
    fn daemon_in(&self, name: &str, repo: &str, extra: &[&str]) -> Proc {
        let repo = self.path(repo);
        let boot = self.seed_addr.clone().expect("seed first");
        self.spawn(
            name,
            &[
                "daemon",
                "--repo",
                &repo.display().to_string(),
                "--bootstrap",
                &boot,
            ],
            extra,
        )
    }

    fn fetch(&self, name: &str, timeout_secs: u64) -> (std::process::ExitStatus, Proc) {
        let boot = self.seed_addr.clone().expect("seed first");
        let out = self.path(name);
        let mut p = self.spawn(
            name,
            &[
                "fetch",
                "lab",
                "--out",
                &out.display().to_string(),
                "--bootstrap",
                &boot,
                "--timeout",
                &timeout_secs.to_string(),
            ],
            &[],
        );
        let mut child = p.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(timeout_secs + 30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, p);
            }
            assert!(Instant::now() < deadline, "fetch did not exit");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Writes version `version` of the test image: a disk of random data with runs of zeros, a
/// boot file, and a configuration file smaller than a piece. `changed` flips that share of the
/// disk's 64 KiB pieces relative to the same seed's version 1.
fn write_image(dir: &Path, disk_mib: usize, changed: f64) -> Vec<(String, Vec<u8>)> {
    let mut disk = vec![0u8; disk_mib * MIB];
    let mut stream = blake3::Hasher::new()
        .update(b"swarm test image")
        .finalize_xof();
    // Random data except for zero runs: pieces 16..32 of every 64 stay zero.
    for (i, piece) in disk.chunks_mut(64 * 1024).enumerate() {
        if i % 64 < 16 || i % 64 >= 32 {
            stream.fill(piece);
        }
    }
    let pieces = disk.len() / (64 * 1024);
    let to_change = (pieces as f64 * changed).round() as usize;
    for k in 0..to_change {
        let piece = (k * 7919) % pieces;
        disk[piece * 64 * 1024 + 5] ^= 0x5a;
    }
    let mut boot = vec![0u8; 3 * MIB + 1234];
    stream.fill(&mut boot);
    let files = vec![
        ("disk.img".to_owned(), disk),
        ("boot/initrd".to_owned(), boot),
        ("site.conf".to_owned(), b"site = lab-a\n".to_vec()),
    ];
    for (path, bytes) in &files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    files
}

fn assert_same_files(dir: &Path, files: &[(String, Vec<u8>)], who: &str) {
    for (path, bytes) in files {
        let got = std::fs::read(dir.join(path)).unwrap_or_else(|e| panic!("{who}: {path}: {e}"));
        assert!(got == *bytes, "{who}: {path} differs");
    }
}

fn image_bytes(files: &[(String, Vec<u8>)]) -> u64 {
    files.iter().map(|(_, b)| b.len() as u64).sum()
}

#[test]
fn seed_five_daemons_and_a_fetch_converge() {
    let mut swarm = Swarm::new();
    let files = write_image(&swarm.path("seedrepo/lab/1"), 61, 0.0);
    let total = image_bytes(&files);
    assert!(total >= 64 * MIB as u64, "a 64 MiB version");
    let mut seed = swarm.seed(1, &[]);
    let mut daemons: Vec<Proc> = (1..=5)
        .map(|i| swarm.daemon(&format!("d{i}"), &["--site", "lab-a"]))
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
    for i in 1..=3 {
        let dir = swarm.path(&format!("d{i}/lab/2"));
        wait_for(
            &format!("d{i} to hold version 2"),
            Duration::from_secs(120),
            || dir.is_dir(),
        );
        assert_same_files(&dir, &v2, &format!("d{i}"));
    }
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

    let out = Command::new(bin())
        .args(["status", "--json", "--api", &api])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
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
