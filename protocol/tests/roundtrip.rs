//! Every encoded type survives encode -> decode unchanged, and its encoding is canonical.

mod common;

use imiswarm_protocol::codec::WireFormat;
use proptest::prelude::*;

fn round_trip<T: WireFormat + PartialEq + std::fmt::Debug>(value: T) -> Result<(), TestCaseError> {
    let bytes = value
        .encode()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back = T::decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, &value);
    prop_assert_eq!(back.encode().unwrap(), bytes);
    Ok(())
}

proptest! {
    #[test]
    fn manifest(m in common::manifest()) {
        round_trip(m)?;
    }

    #[test]
    fn manifest_id_changes_with_any_field(m in common::manifest()) {
        let (_, id) = m.encode_with_id().unwrap();
        let mut other = m.clone();
        other.version += 1;
        other.parent = other.parent.map(|p| p.min(other.version - 1));
        prop_assert_ne!(other.encode_with_id().unwrap().1, id);
    }

    #[test]
    fn announcement(a in common::announcement()) {
        round_trip(a)?;
    }

    #[test]
    fn signed_announcement(s in common::signed_announcement()) {
        let trusted = imiswarm_protocol::TrustedKeys::new([s.publisher]);
        prop_assert!(trusted.verify(&s).is_ok());
        round_trip(s)?;
    }

    #[test]
    fn bitfield(b in common::bitfield()) {
        let bytes = postcard::to_allocvec(&b).unwrap();
        let back: imiswarm_protocol::Bitfield = postcard::from_bytes(&bytes).unwrap();
        prop_assert_eq!(back, b);
    }

    #[test]
    fn control_request(r in common::control_request()) {
        round_trip(r)?;
    }

    #[test]
    fn control_response(r in common::control_response()) {
        round_trip(r)?;
    }

    #[test]
    fn piece_request(r in common::piece_request()) {
        round_trip(r)?;
    }

    #[test]
    fn piece_response_header(r in common::piece_response_header()) {
        round_trip(r)?;
    }

    #[test]
    fn piece_frame(r in common::piece_frame()) {
        round_trip(r)?;
    }

    #[test]
    fn have_message(r in common::have_message()) {
        round_trip(r)?;
    }
}
