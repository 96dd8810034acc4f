//! The harness of the process tests: real `imiswarm` processes on loopback (tracker, seed,
//! daemons, fetches), each started by PID and killed on drop, every wait bounded; nothing
//! listens anywhere but 127.0.0.1. Byte counts come from each process's JSON `totals` log line.

#![allow(dead_code)] // each test file uses its own part of the harness

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MIB: usize = 1 << 20;

/// A process of ours; killed (and reaped) when dropped.
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    /// Sends SIGTERM and waits (bounded) for a clean exit, so the final totals are logged.
    pub fn stop(&mut self) {
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
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every `totals` log line's counter `field`, oldest first (a daemon logs its totals
    /// after each completed version and when it stops).
    pub fn totals(&self, field: &str) -> Vec<u64> {
        self.log_text()
            .lines()
            .filter(|l| l.contains("\"totals\""))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["fields"][field].as_u64())
            .collect()
    }

    /// The last `totals` log line's counter `field`.
    pub fn total(&self, field: &str) -> u64 {
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

pub struct Swarm {
    pub dir: tempfile::TempDir,
    pub publisher_public: String,
    pub seed_addr: Option<String>,
    /// The image server keeps its identity and port across restarts, as a real one does.
    pub seed_port: u16,
    /// Listen on QUIC instead of TCP.
    pub quic: bool,
    /// With a tracker, everyone bootstraps from it (and the seed from it too).
    pub tracker_addr: Option<String>,
    pub tracker_port: u16,
    /// The tracker's status API.
    pub tracker_api: String,
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_imiswarm")
}

/// The JSON status of the daemon whose control API listens at `api`, as `imiswarm status
/// --json` prints it.
pub fn status_json(api: &str) -> serde_json::Value {
    let out = Command::new(bin())
        .args(["status", "--json", "--api", api])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
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
    pub fn new() -> Self {
        let mut dir = tempfile::tempdir().unwrap();
        // For a post-mortem of a failed run: keep every process's log and repository.
        if std::env::var_os("IMISWARM_KEEP_TEST_DIRS").is_some() {
            dir.disable_cleanup(true);
            eprintln!("test directory kept: {}", dir.path().display());
        }
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
            tracker_addr: None,
            tracker_port: free_port(),
            tracker_api: format!("127.0.0.1:{}", free_port()),
        }
    }

    /// Where nodes join: the tracker if there is one, else the seed.
    pub fn bootstrap(&self) -> String {
        self.tracker_addr
            .clone()
            .or_else(|| self.seed_addr.clone())
            .expect("a tracker or a seed first")
    }

    /// Starts the tracker (fixed identity, port and database, so a restart is the same tracker)
    /// and waits for its address.
    pub fn tracker(&mut self, name: &str) -> Proc {
        let addr_file = self.path(&format!("{name}.addr"));
        let _ = std::fs::remove_file(&addr_file);
        let args = [
            "tracker".to_owned(),
            "--database".into(),
            self.path("tracker/catalogue.redb").display().to_string(),
            "--node-key".into(),
            self.path("tracker-node.key").display().to_string(),
            "--listen".into(),
            format!("/ip4/127.0.0.1/tcp/{}", self.tracker_port),
            "--site".into(),
            "centre".into(),
            "--addr-file".into(),
            addr_file.display().to_string(),
            "--api".into(),
            self.tracker_api.clone(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = self.spawn(name, &args, &[]);
        wait_for("the tracker's address", Duration::from_secs(60), || {
            std::fs::read_to_string(&addr_file).is_ok_and(|s| !s.trim().is_empty())
        });
        let addr = std::fs::read_to_string(&addr_file).unwrap();
        self.tracker_addr = Some(addr.lines().next().unwrap().to_owned());
        p
    }

    /// The tracker's `/status`, parsed.
    pub fn tracker_status(&self) -> Option<serde_json::Value> {
        let body =
            imiswarm_node::api::http_get(self.tracker_api.parse().unwrap(), "/status").ok()?;
        serde_json::from_str(&body).ok()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn spawn(&self, name: &str, args: &[&str], extra: &[&str]) -> Proc {
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
        let api: &[&str] =
            if args[0] == "fetch" || args.contains(&"--api") || extra.contains(&"--api") {
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
    pub fn seed(&mut self, version: u64, extra: &[&str]) -> Proc {
        let key = self.path("publisher.key");
        self.seed_signed_by(version, &key, extra)
    }

    pub fn seed_signed_by(&mut self, version: u64, key: &Path, extra: &[&str]) -> Proc {
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
        if let Some(tracker) = &self.tracker_addr {
            args.extend(["--bootstrap".to_owned(), tracker.clone()]);
        }
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

    pub fn daemon(&self, name: &str, extra: &[&str]) -> Proc {
        self.daemon_in(name, name, extra)
    }

    /// A daemon whose repository is the directory `repo` (another daemon's, after a restart).
    pub fn daemon_in(&self, name: &str, repo: &str, extra: &[&str]) -> Proc {
        let repo = self.path(repo);
        let boot = self.bootstrap();
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

    pub fn fetch(&self, name: &str, timeout_secs: u64) -> (std::process::ExitStatus, Proc) {
        let p = self.fetch_spawn(name, timeout_secs, &[]);
        Self::wait_exit(p, timeout_secs + 30)
    }

    /// Starts `fetch lab --out <name>` and returns at once.
    pub fn fetch_spawn(&self, name: &str, timeout_secs: u64, extra: &[&str]) -> Proc {
        let boot = self.bootstrap();
        let out = self.path(name);
        self.spawn(
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
            extra,
        )
    }

    /// Waits (bounded) for a process to exit.
    pub fn wait_exit(mut p: Proc, timeout_secs: u64) -> (std::process::ExitStatus, Proc) {
        let mut child = p.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(timeout_secs);
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
pub fn write_image(dir: &Path, disk_mib: usize, changed: f64) -> Vec<(String, Vec<u8>)> {
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

/// Waits for each daemon's repository `<name>/lab/<version>` and checks its files.
pub fn wait_all_hold(swarm: &Swarm, names: &[String], version: u64, files: &[(String, Vec<u8>)]) {
    for name in names {
        let dir = swarm.path(&format!("{name}/lab/{version}"));
        wait_for(
            &format!("{name} to hold version {version}"),
            Duration::from_secs(120),
            || dir.is_dir(),
        );
        assert_same_files(&dir, files, name);
    }
}

pub fn assert_same_files(dir: &Path, files: &[(String, Vec<u8>)], who: &str) {
    for (path, bytes) in files {
        let got = std::fs::read(dir.join(path)).unwrap_or_else(|e| panic!("{who}: {path}: {e}"));
        assert!(got == *bytes, "{who}: {path} differs");
    }
}

pub fn image_bytes(files: &[(String, Vec<u8>)]) -> u64 {
    files.iter().map(|(_, b)| b.len() as u64).sum()
}
