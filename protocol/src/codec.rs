//! The one way every imiswarm format is encoded and decoded.
//!
//! An encoded value is one format-version byte followed by its postcard body. Decoding is bounded
//! and strict: it checks the size limit before parsing, refuses unknown format versions, trailing
//! bytes and non-canonical encodings (the value must re-encode to exactly the same bytes), then
//! runs the type's semantic validation. Every decoder of untrusted bytes goes through
//! [`WireFormat::decode`], so one fuzz target per type covers the whole path.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why bytes could not be decoded. Says which format failed so logs name the culprit.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{kind}: {len} bytes exceed the limit of {max}")]
    TooLarge {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{kind}: empty input")]
    Empty { kind: &'static str },
    #[error("{kind}: unknown format version {got} (this build speaks {expected})")]
    UnknownFormat {
        kind: &'static str,
        got: u8,
        expected: u8,
    },
    // postcard's error is a plain reason, so it is part of this message rather than a cause.
    #[error("{kind}: malformed: {reason}")]
    Malformed {
        kind: &'static str,
        reason: postcard::Error,
    },
    #[error("{kind}: {count} trailing bytes after the message")]
    TrailingBytes { kind: &'static str, count: usize },
    #[error("{kind}: not in canonical form")]
    NonCanonical { kind: &'static str },
    #[error("{kind}: invalid: {reason}")]
    Invalid { kind: &'static str, reason: String },
}

/// Why a value could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("{kind}: encoded size {len} exceeds the limit of {max}")]
    TooLarge {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{kind}: cannot serialize: {reason}")]
    Serialize {
        kind: &'static str,
        reason: postcard::Error,
    },
    #[error("{kind}: invalid: {reason}")]
    Invalid { kind: &'static str, reason: String },
}

/// A type with a pinned, versioned, size-limited encoding.
pub trait WireFormat: Serialize + DeserializeOwned + Sized {
    /// Name used in errors and logs.
    const KIND: &'static str;
    /// First byte of every encoding; bump it on any change of the body's layout.
    const FORMAT_VERSION: u8;
    /// Largest accepted encoding, format byte included.
    const MAX_SIZE: usize;

    /// Semantic checks beyond the shape (paths, ranges, ordering). Runs on decode and encode.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    /// Encodes `self` after validating it.
    fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        self.validate().map_err(|reason| EncodeError::Invalid {
            kind: Self::KIND,
            reason,
        })?;
        let bytes = self.encode_unchecked()?;
        if bytes.len() > Self::MAX_SIZE {
            return Err(EncodeError::TooLarge {
                kind: Self::KIND,
                len: bytes.len(),
                max: Self::MAX_SIZE,
            });
        }
        Ok(bytes)
    }

    /// Encodes without validation or size check: only for re-encoding during decode and for
    /// tests that need to build invalid inputs.
    fn encode_unchecked(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = vec![Self::FORMAT_VERSION];
        let body = postcard::to_allocvec(self).map_err(|reason| EncodeError::Serialize {
            kind: Self::KIND,
            reason,
        })?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decodes untrusted bytes. Never panics; every failure is a [`DecodeError`].
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let kind = Self::KIND;
        if bytes.len() > Self::MAX_SIZE {
            return Err(DecodeError::TooLarge {
                kind,
                len: bytes.len(),
                max: Self::MAX_SIZE,
            });
        }
        let (&format, body) = bytes.split_first().ok_or(DecodeError::Empty { kind })?;
        if format != Self::FORMAT_VERSION {
            return Err(DecodeError::UnknownFormat {
                kind,
                got: format,
                expected: Self::FORMAT_VERSION,
            });
        }
        let (value, rest) = postcard::take_from_bytes::<Self>(body)
            .map_err(|reason| DecodeError::Malformed { kind, reason })?;
        if !rest.is_empty() {
            return Err(DecodeError::TrailingBytes {
                kind,
                count: rest.len(),
            });
        }
        // postcard accepts over-long varints; one value must have one encoding because ids and
        // signatures are computed over bytes.
        match value.encode_unchecked() {
            Ok(again) if again == bytes => {}
            _ => return Err(DecodeError::NonCanonical { kind }),
        }
        value
            .validate()
            .map_err(|reason| DecodeError::Invalid { kind, reason })?;
        Ok(value)
    }
}
