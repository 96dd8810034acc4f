//! Random, truncated and bit-flipped bytes fed to every decoder: an error, never a panic.
//! (The fuzz targets in `fuzz/` do the same with coverage guidance.)

mod common;

use imiswarm_protocol::announce::{Announcement, SignedAnnouncement};
use imiswarm_protocol::codec::WireFormat;
use imiswarm_protocol::manifest::Manifest;
use imiswarm_protocol::wire::{
    ControlRequest, ControlResponse, HaveMessage, PieceFrame, PieceRequest, PieceResponseHeader,
};
use proptest::prelude::*;

/// Runs every decoder on `bytes`; a panic fails the test.
fn decode_all(bytes: &[u8]) {
    let _ = Manifest::decode(bytes);
    let _ = Announcement::decode(bytes);
    let _ = SignedAnnouncement::decode(bytes);
    let _ = ControlRequest::decode(bytes);
    let _ = ControlResponse::decode(bytes);
    let _ = PieceRequest::decode(bytes);
    let _ = PieceResponseHeader::decode(bytes);
    let _ = PieceFrame::decode(bytes);
    let _ = HaveMessage::decode(bytes);
    let _ = postcard::from_bytes::<imiswarm_protocol::Bitfield>(bytes);
}

/// Every strict prefix of a valid encoding must be refused by its own decoder.
fn truncations_fail<T: WireFormat>(bytes: &[u8]) -> Result<(), TestCaseError> {
    for cut in 0..bytes.len() {
        prop_assert!(
            T::decode(&bytes[..cut]).is_err(),
            "{} decoded from {cut} of {} bytes",
            T::KIND,
            bytes.len()
        );
    }
    Ok(())
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
        // Also with each format byte in front, so the body parser is reached.
        for format in 0u8..3 {
            let mut framed = vec![format];
            framed.extend_from_slice(&bytes);
            decode_all(&framed);
        }
    }

    #[test]
    fn truncated_manifest_fails(m in common::manifest()) {
        truncations_fail::<Manifest>(&m.encode().unwrap())?;
    }

    #[test]
    fn truncated_messages_fail(
        s in common::signed_announcement(),
        req in common::control_request(),
        resp in common::control_response(),
        pr in common::piece_request(),
        ph in common::piece_response_header(),
        pf in common::piece_frame(),
        hm in common::have_message(),
    ) {
        truncations_fail::<SignedAnnouncement>(&s.encode().unwrap())?;
        truncations_fail::<Announcement>(&s.announcement.encode().unwrap())?;
        truncations_fail::<ControlRequest>(&req.encode().unwrap())?;
        truncations_fail::<ControlResponse>(&resp.encode().unwrap())?;
        truncations_fail::<PieceRequest>(&pr.encode().unwrap())?;
        truncations_fail::<PieceResponseHeader>(&ph.encode().unwrap())?;
        truncations_fail::<PieceFrame>(&pf.encode().unwrap())?;
        truncations_fail::<HaveMessage>(&hm.encode().unwrap())?;
    }

    #[test]
    fn bit_flips_never_panic(m in common::manifest(), s in common::signed_announcement(), flip in any::<prop::sample::Index>(), bit in 0u8..8) {
        for mut bytes in [m.encode().unwrap(), s.encode().unwrap()] {
            let at = flip.index(bytes.len());
            bytes[at] ^= 1 << bit;
            decode_all(&bytes);
        }
    }

    #[test]
    fn extra_trailing_byte_fails(s in common::signed_announcement(), extra in any::<u8>()) {
        let mut bytes = s.encode().unwrap();
        bytes.push(extra);
        prop_assert!(SignedAnnouncement::decode(&bytes).is_err());
    }
}

#[test]
fn oversized_input_is_refused_before_parsing() {
    let huge = vec![1u8; imiswarm_protocol::limits::MAX_ANNOUNCEMENT_SIZE + 1];
    let err = SignedAnnouncement::decode(&huge).unwrap_err();
    assert!(err.to_string().contains("exceed the limit"), "{err}");
}

#[test]
fn overlong_varint_is_not_canonical() {
    // PieceRequest{first: 1} with `first` written as the two-byte varint 0x81 0x00.
    let r = PieceRequest {
        manifest_id: imiswarm_protocol::Hash([0; 32]),
        first: 1,
        count: 1,
    };
    let good = r.encode().unwrap();
    let mut bad = good[..33].to_vec();
    bad.extend_from_slice(&[0x81, 0x00, 0x01]);
    assert_eq!(PieceRequest::decode(&good).unwrap(), r);
    let err = PieceRequest::decode(&bad);
    assert!(err.is_err(), "{err:?}");
}
