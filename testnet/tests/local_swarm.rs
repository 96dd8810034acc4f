//! The demo's machinery on a small image: a real in-process swarm publishes two versions and
//! every member ends with the origin's bytes.

use std::time::Duration;

use imiswarm_node::repo::{self, BuildRequest};
use imiswarm_protocol::PublisherKey;
use imiswarm_protocol::limits::DEFAULT_PIECE_SIZE;
use imiswarm_testnet::demo::write_sample_image;
use imiswarm_testnet::local::{LocalNode, LocalSwarm};

fn build(repo: &std::path::Path, version: u64, parent: Option<u64>) {
    let m = repo::build_manifest(
        &BuildRequest {
            repo,
            image: "demo",
            version,
            piece_size: DEFAULT_PIECE_SIZE,
            parent,
            boot_profile: Vec::new(),
        },
        &mut |_| {},
        &mut |_| {},
    )
    .unwrap();
    repo::write_manifest(repo, &m).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_swarm_distributes_two_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let nodes: Vec<LocalNode> = ["a1", "b1", "b2"]
        .iter()
        .map(|n| LocalNode {
            name: (*n).to_owned(),
            site: n[..1].to_owned(),
        })
        .collect();
    let publisher = PublisherKey::from_seed([3; 32]);
    let mut swarm = LocalSwarm::start(tmp.path(), publisher, "centre", &nodes, None)
        .await
        .unwrap();
    let repo_dir = swarm.origin_repo();
    let v1 = repo::version_dir(&repo_dir, "demo", 1);
    write_sample_image(&v1, 2).unwrap();
    build(&repo_dir, 1, None);
    let results = swarm
        .publish_and_wait("demo", 1, Duration::from_secs(120))
        .await
        .unwrap();
    assert!(results.iter().all(|r| r.seconds.is_some()));

    let v2 = repo::version_dir(&repo_dir, "demo", 2);
    std::fs::create_dir_all(v2.join("boot")).unwrap();
    for f in ["disk.img", "boot/initrd.img", "site.conf"] {
        std::fs::copy(v1.join(f), v2.join(f)).unwrap();
    }
    std::fs::write(v2.join("site.conf"), b"site = \"lab-b\"\n").unwrap();
    build(&repo_dir, 2, Some(1));
    let results = swarm
        .publish_and_wait("demo", 2, Duration::from_secs(120))
        .await
        .unwrap();
    for r in &results {
        assert!(
            r.received_bytes < 64 * 1024,
            "{}: moved {} bytes for a one-piece change",
            r.name,
            r.received_bytes
        );
        assert!(r.reused_bytes > 0, "{}: reused nothing", r.name);
    }
    for node in &nodes {
        for (version, dir) in [(1, &v1), (2, &v2)] {
            let got = repo::version_dir(&tmp.path().join(&node.name), "demo", version);
            for f in ["disk.img", "boot/initrd.img", "site.conf"] {
                assert_eq!(
                    std::fs::read(got.join(f)).unwrap(),
                    std::fs::read(dir.join(f)).unwrap(),
                    "{} {f} of version {version}",
                    node.name
                );
            }
        }
    }
    swarm.stop();
}
