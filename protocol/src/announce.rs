//! Signed announcements: the publisher's word that a version exists (or is retired).
//!
//! Owns the announcement format, the ed25519 signing and the check against a node's trusted
//! publisher keys. An announcement is small enough for one gossip message; it names the manifest
//! by id, so a node fetches the manifest from any peer and checks it against this signed id.
//! Key storage (files, permissions) and replay policy (which announcement of an image is newest)
//! belong to the node.
//!
//! ```text
//!  publisher key ──sign──> SignedAnnouncement ──gossip──> node: trusted key? signature? valid?
//!                               │ manifest_id                      │ yes: fetch manifest by id
//! ```

use std::collections::BTreeSet;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codec::{DecodeError, EncodeError, WireFormat};
use crate::hash::Hash;
use crate::limits::MAX_ANNOUNCEMENT_SIZE;
use crate::path::check_image_name;

/// Domain separation: a signature over an announcement can never be replayed as anything else.
const SIGNING_CONTEXT: &[u8] = b"imiswarm announcement v1\0";

/// Where a version stands in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
// Names only matter to self-describing formats (JSON status); postcard encodes the position.
#[serde(rename_all = "lowercase")]
pub enum Lifecycle {
    /// Current: nodes that follow the image should fetch it.
    Deployed,
    /// Withdrawn: nodes remove it once nothing local uses it.
    Retired,
}

/// What the publisher states about one version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    pub image: String,
    pub version: u64,
    /// BLAKE3 of the canonical manifest bytes.
    pub manifest_id: Hash,
    /// Sum of the version's file sizes.
    pub total_size: u64,
    pub state: Lifecycle,
    /// Milliseconds since the Unix epoch, set by the publisher; a later statement about the same
    /// version (a retirement) carries a later time.
    pub timestamp_ms: u64,
}

/// An ed25519 public key of a publisher (32 bytes on the wire, hex in configuration).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Result<Self, hex::FromHexError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut out)?;
        Ok(Self(out))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({}…)", &self.to_hex()[..12])
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// An ed25519 signature. On the wire: a length-prefixed 64-byte string (serde has no 64-byte
/// array form).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signature({}…)", hex::encode(&self.0[..6]))
    }
}

impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes: &[u8] = Deserialize::deserialize(deserializer)?;
        let array: [u8; 64] = bytes
            .try_into()
            .map_err(|_| serde::de::Error::invalid_length(bytes.len(), &"64 bytes"))?;
        Ok(Self(array))
    }
}

/// An announcement with the publisher's key and signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedAnnouncement {
    pub announcement: Announcement,
    pub publisher: PublicKey,
    pub signature: Signature,
}

impl WireFormat for Announcement {
    const KIND: &'static str = "announcement";
    const FORMAT_VERSION: u8 = 1;
    const MAX_SIZE: usize = MAX_ANNOUNCEMENT_SIZE;

    fn validate(&self) -> Result<(), String> {
        check_image_name(&self.image).map_err(|e| e.to_string())
    }
}

impl WireFormat for SignedAnnouncement {
    const KIND: &'static str = "signed announcement";
    const FORMAT_VERSION: u8 = 1;
    const MAX_SIZE: usize = MAX_ANNOUNCEMENT_SIZE;

    fn validate(&self) -> Result<(), String> {
        self.announcement.validate()
    }
}

/// The bytes a publisher signs: context, then the announcement's canonical encoding.
fn signing_bytes(announcement: &Announcement) -> Result<Vec<u8>, EncodeError> {
    let mut out = SIGNING_CONTEXT.to_vec();
    out.extend_from_slice(&announcement.encode()?);
    Ok(out)
}

/// A publisher's signing key.
pub struct PublisherKey {
    key: SigningKey,
}

impl std::fmt::Debug for PublisherKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "PublisherKey({:?})", self.public())
    }
}

impl PublisherKey {
    /// From a 32-byte secret seed (the caller supplies randomness: this crate does no I/O).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(&seed),
        }
    }

    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.key.verifying_key().to_bytes())
    }

    pub fn sign(&self, announcement: Announcement) -> Result<SignedAnnouncement, EncodeError> {
        let signature = self.key.sign(&signing_bytes(&announcement)?);
        Ok(SignedAnnouncement {
            announcement,
            publisher: self.public(),
            signature: Signature(signature.to_bytes()),
        })
    }
}

/// Why an announcement is refused.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("publisher key {0} is not trusted")]
    Untrusted(PublicKey),
    #[error("publisher key {0} is not a valid ed25519 key")]
    BadKey(PublicKey),
    #[error("signature does not match the announcement")]
    BadSignature,
    #[error(transparent)]
    Invalid(#[from] EncodeError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// The publisher keys a node trusts. Empty means nothing is trusted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: BTreeSet<PublicKey>,
}

impl TrustedKeys {
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        Self {
            keys: keys.into_iter().collect(),
        }
    }

    pub fn contains(&self, key: &PublicKey) -> bool {
        self.keys.contains(key)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks trust, then the signature (strict ed25519: no malleable or small-order forms).
    pub fn verify<'a>(
        &self,
        signed: &'a SignedAnnouncement,
    ) -> Result<&'a Announcement, VerifyError> {
        if !self.contains(&signed.publisher) {
            return Err(VerifyError::Untrusted(signed.publisher));
        }
        let key = VerifyingKey::from_bytes(&signed.publisher.0)
            .map_err(|_| VerifyError::BadKey(signed.publisher))?;
        let signature = ed25519_dalek::Signature::from_bytes(&signed.signature.0);
        key.verify_strict(&signing_bytes(&signed.announcement)?, &signature)
            .map_err(|_| VerifyError::BadSignature)?;
        Ok(&signed.announcement)
    }

    /// Decodes gossip bytes and verifies them in one step.
    pub fn decode_and_verify(&self, bytes: &[u8]) -> Result<SignedAnnouncement, VerifyError> {
        let signed = SignedAnnouncement::decode(bytes)?;
        self.verify(&signed)?;
        Ok(signed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announcement() -> Announcement {
        Announcement {
            image: "win11-lab".into(),
            version: 7,
            manifest_id: Hash::of(b"manifest"),
            total_size: 42 << 30,
            state: Lifecycle::Deployed,
            timestamp_ms: 1_790_000_000_000,
        }
    }

    #[test]
    fn sign_and_verify() {
        let key = PublisherKey::from_seed([1; 32]);
        let trusted = TrustedKeys::new([key.public()]);
        let signed = key.sign(announcement()).unwrap();
        assert_eq!(trusted.verify(&signed).unwrap(), &announcement());
        let bytes = signed.encode().unwrap();
        assert!(bytes.len() < 256, "fits a gossip message: {}", bytes.len());
        assert_eq!(trusted.decode_and_verify(&bytes).unwrap(), signed);
    }

    #[test]
    fn untrusted_key_is_refused() {
        let key = PublisherKey::from_seed([1; 32]);
        let other = PublisherKey::from_seed([2; 32]);
        let trusted = TrustedKeys::new([other.public()]);
        let signed = key.sign(announcement()).unwrap();
        assert!(matches!(
            trusted.verify(&signed),
            Err(VerifyError::Untrusted(_))
        ));
        assert!(matches!(
            TrustedKeys::default().verify(&signed),
            Err(VerifyError::Untrusted(_))
        ));
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let key = PublisherKey::from_seed([1; 32]);
        let trusted = TrustedKeys::new([key.public()]);
        let signed = key.sign(announcement()).unwrap();

        let mut forged = signed.clone();
        forged.announcement.version = 8;
        assert!(matches!(
            trusted.verify(&forged),
            Err(VerifyError::BadSignature)
        ));

        let mut forged = signed.clone();
        forged.announcement.state = Lifecycle::Retired;
        assert!(matches!(
            trusted.verify(&forged),
            Err(VerifyError::BadSignature)
        ));

        let mut forged = signed;
        forged.signature.0[0] ^= 1;
        assert!(matches!(
            trusted.verify(&forged),
            Err(VerifyError::BadSignature)
        ));
    }

    #[test]
    fn key_hex_round_trip() {
        let key = PublisherKey::from_seed([9; 32]);
        assert_eq!(
            PublicKey::from_hex(&key.public().to_hex()).unwrap(),
            key.public()
        );
        assert_eq!(PublisherKey::from_seed(key.seed()).public(), key.public());
    }
}
