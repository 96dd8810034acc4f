//! The `imiswarm` binary as a user runs it: outputs and exit codes.

use std::path::Path;
use std::process::{Command, Output};

fn imiswarm(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imiswarm"))
        .args(args)
        .current_dir(cwd)
        .env_remove("IMISWARM_REPO")
        .env_remove("IMISWARM_PUBLISHER_KEY")
        .output()
        .expect("run imiswarm")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

#[test]
fn publish_flow_and_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let version = dir.join("repo/lab/1");
    std::fs::create_dir_all(version.join("boot")).unwrap();
    std::fs::write(version.join("boot/kernel"), vec![5u8; 100_000]).unwrap();
    std::fs::write(version.join("disk.img"), vec![0u8; 300_000]).unwrap();

    let keygen = imiswarm(&["keygen", "--out", "pub.key"], dir);
    assert_eq!(keygen.status.code(), Some(0));
    let public = stdout(&keygen);
    assert_eq!(public.len(), 64, "{public}");
    // A second keygen must not destroy the key.
    assert_eq!(
        imiswarm(&["keygen", "--out", "pub.key"], dir).status.code(),
        Some(1)
    );

    let build = imiswarm(&["manifest", "build", "--repo", "repo", "lab", "1"], dir);
    assert_eq!(build.status.code(), Some(0), "{build:?}");
    assert!(stdout(&build).contains("2 files"), "{}", stdout(&build));
    assert!(dir.join("repo/lab/1.manifest").exists());

    let verify = imiswarm(&["manifest", "verify", "--repo", "repo", "lab", "1"], dir);
    assert_eq!(verify.status.code(), Some(0));

    let sign = imiswarm(
        &[
            "announce", "sign", "--repo", "repo", "--key", "pub.key", "lab", "1",
        ],
        dir,
    );
    assert_eq!(sign.status.code(), Some(0), "{sign:?}");
    let ann = "repo/lab/1.announcement";
    assert_eq!(
        imiswarm(&["announce", "verify", ann, "--trust", &public], dir)
            .status
            .code(),
        Some(0)
    );
    let other = stdout(&imiswarm(&["keygen", "--out", "other.key"], dir));
    let untrusted = imiswarm(&["announce", "verify", ann, "--trust", &other], dir);
    assert_eq!(untrusted.status.code(), Some(3), "not trusted");

    // Corrupt one byte: verification fails with 1.
    let mut kernel = std::fs::read(version.join("boot/kernel")).unwrap();
    kernel[7] ^= 1;
    std::fs::write(version.join("boot/kernel"), kernel).unwrap();
    assert_eq!(
        imiswarm(&["manifest", "verify", "--repo", "repo", "lab", "1"], dir)
            .status
            .code(),
        Some(1)
    );

    // Not found: 3. Bad usage: 2, before anything is touched.
    assert_eq!(
        imiswarm(&["manifest", "verify", "--repo", "repo", "lab", "2"], dir)
            .status
            .code(),
        Some(3)
    );
    assert_eq!(
        imiswarm(&["manifest", "build", "--repo", "repo", "../x", "1"], dir)
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        imiswarm(
            &[
                "manifest",
                "build",
                "--repo",
                "repo",
                "lab",
                "1",
                "--piece-size",
                "3KiB"
            ],
            dir
        )
        .status
        .code(),
        Some(2)
    );
}
