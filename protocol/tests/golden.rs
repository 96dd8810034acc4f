//! Golden bytes: the exact encoding of one value of every format, pinned.
//!
//! If one of these fails, the wire or disk format changed: peers of the previous build can no
//! longer understand this one. Bump that type's `FORMAT_VERSION` (and keep decoding the old one
//! where needed) instead of editing the expected bytes.

use imiswarm_protocol::announce::{Announcement, Lifecycle, PublisherKey};
use imiswarm_protocol::bitfield::Bitfield;
use imiswarm_protocol::codec::WireFormat;
use imiswarm_protocol::hash::Hash;
use imiswarm_protocol::manifest::{FileEntry, Manifest, PieceHash};
use imiswarm_protocol::wire::{
    ControlRequest, ControlResponse, HaveMessage, HolderRecord, Holding, PeerRecord, PieceEncoding,
    PieceFrame, PieceRequest, PieceResponseHeader, PieceStatus,
};

fn h(byte: u8) -> Hash {
    Hash([byte; 32])
}

#[track_caller]
fn pin<T: WireFormat + PartialEq + std::fmt::Debug>(value: &T, expected_hex: &str) {
    let bytes = value.encode().unwrap();
    assert_eq!(
        hex::encode(&bytes),
        expected_hex,
        "{} encoding changed",
        T::KIND
    );
    assert_eq!(&T::decode(&bytes).unwrap(), value);
}

fn manifest() -> Manifest {
    Manifest {
        image: "lab".into(),
        version: 2,
        parent: Some(1),
        piece_size: 65536,
        files: vec![
            FileEntry {
                path: "boot/vmlinuz".into(),
                size: 65537,
                mode: 0o755,
                pieces: vec![PieceHash::Data(h(0xaa)), PieceHash::Zero],
            },
            FileEntry {
                path: "empty".into(),
                size: 0,
                mode: 0o644,
                pieces: vec![],
            },
        ],
        boot_profile: vec![1, 0],
    }
}

fn announcement() -> Announcement {
    Announcement {
        image: "lab".into(),
        version: 2,
        manifest_id: h(0x11),
        total_size: 65537,
        state: Lifecycle::Deployed,
        timestamp_ms: 1_800_000_000_000,
    }
}

#[test]
fn manifest_bytes_and_id() {
    let m = manifest();
    pin(
        &m,
        "01036c6162020101808004020c626f6f742f766d6c696e757a818004ed030201aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa0005656d70747900a40300020100",
    );
    assert_eq!(
        m.encode_with_id().unwrap().1.to_hex(),
        "a4bf21475b320c98c81c8c912bbfc76b203d53556c3c025dcd2cea8433a0e4b2"
    );
}

#[test]
fn announcement_bytes() {
    pin(
        &announcement(),
        "01036c61620211111111111111111111111111111111111111111111111111111111111111118180040080a0f1c2b134",
    );
    let mut retired = announcement();
    retired.state = Lifecycle::Retired;
    pin(
        &retired,
        "01036c61620211111111111111111111111111111111111111111111111111111111111111118180040180a0f1c2b134",
    );
}

#[test]
fn signed_announcement_bytes() {
    // ed25519 signatures are deterministic, so the whole signed message is pinned.
    let signed = PublisherKey::from_seed([7; 32])
        .sign(announcement())
        .unwrap();
    pin(
        &signed,
        "01036c61620211111111111111111111111111111111111111111111111111111111111111118180040080a0f1c2b134ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c404777bc829a957ac50a56781959be865298a8fd51e005fcb72891abcd4deba577414b27f213566563d33400a5625681bc998660a10c8a897cfc346b97f270640d",
    );
}

#[test]
fn control_request_bytes() {
    pin(
        &ControlRequest::Manifest { manifest_id: h(1) },
        "01000101010101010101010101010101010101010101010101010101010101010101",
    );
    pin(
        &ControlRequest::Availability { manifest_id: h(1) },
        "01010101010101010101010101010101010101010101010101010101010101010101",
    );
    pin(
        &ControlRequest::Have {
            manifest_id: h(1),
            pieces: vec![3, 300],
        },
        "010201010101010101010101010101010101010101010101010101010101010101010203ac02",
    );
    pin(
        &ControlRequest::LatestVersion {
            image: "lab".into(),
        },
        "0103036c6162",
    );
    pin(&ControlRequest::Peers, "0104");
    pin(
        &ControlRequest::Announcement {
            image: "lab".into(),
            version: 2,
        },
        "0105036c616202",
    );
    pin(&ControlRequest::Catalogue, "0106");
    pin(
        &ControlRequest::Register {
            holdings: vec![Holding {
                manifest_id: h(1),
                image: "a".into(),
                version: 2,
                verified: 3,
                total: 4,
            }],
        },
        &format!("010701{}0161020304", "01".repeat(32)),
    );
    pin(
        &ControlRequest::Holders { manifest_id: h(5) },
        &format!("0108{}", "05".repeat(32)),
    );
}

#[test]
fn control_response_bytes() {
    let mut bits = Bitfield::new(10);
    bits.set(0);
    bits.set(9);
    pin(
        &ControlResponse::Manifest {
            bytes: vec![1, 2, 3],
        },
        "010003010203",
    );
    pin(
        &ControlResponse::Availability {
            manifest_id: h(2),
            bitfield: bits,
        },
        "010102020202020202020202020202020202020202020202020202020202020202020a020102",
    );
    pin(&ControlResponse::Ack, "0102");
    pin(
        &ControlResponse::LatestVersion {
            announcement: Some(vec![9]),
        },
        "0103010109",
    );
    pin(
        &ControlResponse::LatestVersion { announcement: None },
        "010300",
    );
    pin(&ControlResponse::NotFound, "0104");
    pin(&ControlResponse::Busy, "0105");
    pin(
        &ControlResponse::Error {
            message: "no".into(),
        },
        "0106026e6f",
    );
    pin(
        &ControlResponse::Peers {
            peers: vec![PeerRecord {
                peer_id: vec![1, 2],
                addrs: vec![vec![3]],
            }],
        },
        "010701020102010103",
    );
    pin(
        &ControlResponse::Announcement {
            announcement: vec![4, 5],
        },
        "0108020405",
    );
    pin(
        &ControlResponse::Catalogue {
            announcements: vec![vec![6], vec![]],
        },
        "010902010600",
    );
    pin(
        &ControlResponse::Holders {
            holders: vec![HolderRecord {
                peer: PeerRecord {
                    peer_id: vec![1, 2],
                    addrs: vec![vec![3]],
                },
                site: "s".into(),
                origin: true,
                verified: 1,
                total: 2,
            }],
        },
        "010a010201020101030173010102",
    );
}

#[test]
fn haves_stream_bytes() {
    pin(
        &HaveMessage {
            manifest_id: h(1),
            pieces: vec![3, 300],
        },
        "0101010101010101010101010101010101010101010101010101010101010101010203ac02",
    );
}

#[test]
fn piece_stream_bytes() {
    pin(
        &PieceRequest {
            manifest_id: h(3),
            first: 200,
            count: 8,
        },
        "010303030303030303030303030303030303030303030303030303030303030303c80108",
    );
    for (status, hex) in [
        (PieceStatus::Ok, "0100c80108"),
        (PieceStatus::Missing, "0101c80108"),
        (PieceStatus::Busy, "0102c80108"),
        (PieceStatus::UnknownVersion, "0103c80108"),
    ] {
        pin(
            &PieceResponseHeader {
                status,
                first: 200,
                count: 8,
            },
            hex,
        );
    }
    pin(
        &PieceFrame {
            index: 200,
            encoding: PieceEncoding::Raw,
            len: 65536,
        },
        "01c80100808004",
    );
    pin(
        &PieceFrame {
            index: 201,
            encoding: PieceEncoding::Zstd,
            len: 1000,
        },
        "01c90101e807",
    );
}
