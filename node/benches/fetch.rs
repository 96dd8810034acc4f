//! Throughput of one `fetch` from one `seed` on loopback: real processes, real sockets.
//!
//! `cargo bench -p imiswarm-node --bench fetch` (IMISWARM_BENCH_MIB sets the image size,
//! default 1024). Prints the fetch's wall time and throughput; the seed's hashing is done
//! before the clock starts. Everything runs on 127.0.0.1 and is killed on exit.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let mib: usize = std::env::var("IMISWARM_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let bin = env!("CARGO_BIN_EXE_imiswarm");
    let dir = tempfile::tempdir().expect("temporary directory");
    let version = dir.path().join("repo/bench/1");
    std::fs::create_dir_all(&version).unwrap();
    let mut disk = vec![0u8; mib << 20];
    blake3::Hasher::new()
        .update(b"fetch bench")
        .finalize_xof()
        .fill(&mut disk);
    std::fs::write(version.join("disk.img"), &disk).unwrap();
    drop(disk);

    let key = dir.path().join("publisher.key");
    let out = Command::new(bin)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    let public = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let addr_file = dir.path().join("seed.addr");
    let _seed = Killed(
        Command::new(bin)
            .args(["seed", "bench", "1", "--repo"])
            .arg(dir.path().join("repo"))
            .arg("--publisher-key")
            .arg(&key)
            .args([
                "--trust",
                &public,
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--addr-file",
            ])
            .arg(&addr_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(600);
    let boot = loop {
        if let Ok(text) = std::fs::read_to_string(&addr_file)
            && let Some(line) = text.lines().next()
        {
            break line.to_owned();
        }
        assert!(Instant::now() < deadline, "the seed did not start");
        std::thread::sleep(Duration::from_millis(50));
    };

    let start = Instant::now();
    let status = Command::new(bin)
        .args(["fetch", "bench", "--out"])
        .arg(dir.path().join("ws"))
        .args([
            "--trust",
            &public,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--bootstrap",
            &boot,
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(status.success(), "fetch failed");
    let bytes = (mib << 20) as f64;
    println!(
        "fetch of a {mib} MiB image from one seed on loopback: {secs:.2} s, {:.0} MB/s ({:.2} Gbit/s), {} cores",
        bytes / secs / 1e6,
        bytes * 8.0 / secs / 1e9,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}
