//! Proptest strategies for every encoded type, shared by the round-trip and garbage tests.
#![allow(dead_code)]

use imiswarm_protocol::announce::{Announcement, Lifecycle, PublisherKey, SignedAnnouncement};
use imiswarm_protocol::bitfield::Bitfield;
use imiswarm_protocol::hash::Hash;
use imiswarm_protocol::limits::{MAX_SPAN, MIN_PIECE_SIZE};
use imiswarm_protocol::manifest::{FileEntry, Manifest, PieceHash};
use imiswarm_protocol::wire::{
    ControlRequest, ControlResponse, HaveMessage, PeerRecord, PieceEncoding, PieceFrame,
    PieceRequest, PieceResponseHeader, PieceStatus,
};
use proptest::prelude::*;

pub fn hash() -> impl Strategy<Value = Hash> {
    any::<[u8; 32]>().prop_map(Hash)
}

pub fn image_name() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9._-]{0,20}"
}

pub fn bitfield() -> impl Strategy<Value = Bitfield> {
    (1u32..300).prop_flat_map(|len| {
        proptest::collection::vec(any::<bool>(), len as usize).prop_map(move |bits| {
            let mut b = Bitfield::new(len);
            for (i, set) in bits.into_iter().enumerate() {
                if set {
                    b.set(i as u32);
                }
            }
            b
        })
    })
}

fn piece_hash() -> impl Strategy<Value = PieceHash> {
    prop_oneof![Just(PieceHash::Zero), hash().prop_map(PieceHash::Data)]
}

pub fn manifest() -> impl Strategy<Value = Manifest> {
    let file = (
        "[a-z]{1,6}(/[a-z0-9_][a-z0-9._-]{0,5}){0,2}",
        0u64..(5 * u64::from(MIN_PIECE_SIZE)),
        0u32..0o777,
    );
    (
        image_name(),
        1u64..1000,
        proptest::option::of(0u64..1),
        0u32..3,
        proptest::collection::btree_map("[a-z]{1,6}(\\.[a-z]{1,3})?", file, 0..6),
    )
        .prop_flat_map(|(image, version, parent, shift, files)| {
            let piece_size = MIN_PIECE_SIZE << shift;
            // Put each file in its own top-level directory keyed by the map key, so paths never
            // clash as file and directory.
            let files: Vec<(String, u64, u32)> = files
                .into_iter()
                .map(|(top, (rest, size, mode))| (format!("{top}/{rest}"), size, mode))
                .collect();
            let pieces: Vec<_> = files
                .iter()
                .map(|(_, size, _)| {
                    proptest::collection::vec(
                        piece_hash(),
                        size.div_ceil(u64::from(piece_size)) as usize,
                    )
                })
                .collect();
            (Just((image, version, parent, piece_size, files)), pieces)
        })
        .prop_map(|((image, version, parent, piece_size, files), pieces)| {
            let mut files: Vec<FileEntry> = files
                .into_iter()
                .zip(pieces)
                .map(|((path, size, mode), pieces)| FileEntry {
                    path,
                    size,
                    mode,
                    pieces,
                })
                .collect();
            files.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
            let count: u32 = files.iter().map(|f| f.pieces.len() as u32).sum();
            Manifest {
                image,
                version,
                parent: parent.map(|p| p.min(version - 1)),
                piece_size,
                files,
                boot_profile: (0..count).rev().step_by(2).collect(),
            }
        })
}

pub fn announcement() -> impl Strategy<Value = Announcement> {
    (
        image_name(),
        any::<u64>(),
        hash(),
        any::<u64>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(image, version, manifest_id, total_size, retired, timestamp_ms)| Announcement {
                image,
                version,
                manifest_id,
                total_size,
                state: if retired {
                    Lifecycle::Retired
                } else {
                    Lifecycle::Deployed
                },
                timestamp_ms,
            },
        )
}

pub fn signed_announcement() -> impl Strategy<Value = SignedAnnouncement> {
    (announcement(), any::<[u8; 32]>())
        .prop_map(|(a, seed)| PublisherKey::from_seed(seed).sign(a).unwrap())
}

pub fn control_request() -> impl Strategy<Value = ControlRequest> {
    prop_oneof![
        hash().prop_map(|manifest_id| ControlRequest::Manifest { manifest_id }),
        hash().prop_map(|manifest_id| ControlRequest::Availability { manifest_id }),
        (
            hash(),
            proptest::collection::btree_set(0u32..100_000, 1..50)
        )
            .prop_map(|(manifest_id, set)| ControlRequest::Have {
                manifest_id,
                pieces: set.into_iter().collect(),
            }),
        image_name().prop_map(|image| ControlRequest::LatestVersion { image }),
        Just(ControlRequest::Peers),
        (image_name(), any::<u64>())
            .prop_map(|(image, version)| ControlRequest::Announcement { image, version }),
        Just(ControlRequest::Catalogue),
    ]
}

pub fn control_response() -> impl Strategy<Value = ControlResponse> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200)
            .prop_map(|bytes| ControlResponse::Manifest { bytes }),
        (hash(), bitfield()).prop_map(|(manifest_id, bitfield)| ControlResponse::Availability {
            manifest_id,
            bitfield
        }),
        Just(ControlResponse::Ack),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300))
            .prop_map(|announcement| ControlResponse::LatestVersion { announcement }),
        Just(ControlResponse::NotFound),
        Just(ControlResponse::Busy),
        ".{0,40}".prop_map(|message| ControlResponse::Error { message }),
        proptest::collection::vec(
            (
                proptest::collection::vec(any::<u8>(), 1..40),
                proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..30), 0..4)
            )
                .prop_map(|(peer_id, addrs)| PeerRecord { peer_id, addrs }),
            0..5
        )
        .prop_map(|peers| ControlResponse::Peers { peers }),
        proptest::collection::vec(any::<u8>(), 0..300)
            .prop_map(|announcement| ControlResponse::Announcement { announcement }),
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..50), 0..5)
            .prop_map(|announcements| ControlResponse::Catalogue { announcements }),
    ]
}

pub fn piece_request() -> impl Strategy<Value = PieceRequest> {
    (hash(), 0u32..1_000_000, 1..=MAX_SPAN).prop_map(|(manifest_id, first, count)| PieceRequest {
        manifest_id,
        first,
        count,
    })
}

pub fn piece_response_header() -> impl Strategy<Value = PieceResponseHeader> {
    (
        prop_oneof![
            Just(PieceStatus::Ok),
            Just(PieceStatus::Missing),
            Just(PieceStatus::Busy),
            Just(PieceStatus::UnknownVersion)
        ],
        0u32..1_000_000,
        1..=MAX_SPAN,
    )
        .prop_map(|(status, first, count)| PieceResponseHeader {
            status,
            first,
            count,
        })
}

pub fn have_message() -> impl Strategy<Value = HaveMessage> {
    (
        hash(),
        proptest::collection::btree_set(0u32..4_000_000, 1..200),
    )
        .prop_map(|(manifest_id, set)| HaveMessage {
            manifest_id,
            pieces: set.into_iter().collect(),
        })
}

pub fn piece_frame() -> impl Strategy<Value = PieceFrame> {
    (
        0u32..1_000_000,
        prop_oneof![Just(PieceEncoding::Raw), Just(PieceEncoding::Zstd)],
        0u32..=imiswarm_protocol::limits::MAX_PIECE_SIZE,
    )
        .prop_map(|(index, encoding, len)| PieceFrame {
            index,
            encoding,
            len,
        })
}
