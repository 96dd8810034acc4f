//! # imiswarm-protocol
//!
//! The sans-IO core of imiswarm: every format and every decision that needs neither a socket nor
//! a disk. It takes bytes, events and `now`, and returns values and decisions; the node crate
//! moves the bytes. This crate must never depend on tokio or libp2p, nor open files: reading
//! from a `std::io::Read` handed to it is the most I/O it does.
//!
//! | module | owns |
//! |---|---|
//! | [`limits`] | every size limit and protocol name |
//! | [`codec`] | the versioned, bounded, canonical encoding all formats share |
//! | [`hash`] | the BLAKE3 digest type |
//! | [`path`] | what a path or image name from the network may be |
//! | [`manifest`] | a version's files and piece hashes; parallel building |
//! | [`announce`] | signed announcements and trusted publisher keys |
//! | [`wire`] | control and piece-stream messages |
//! | [`bitfield`] | availability sets |
//! | [`scheduler`] | which piece to ask of which peer, and when |
//! | [`superseed`] | the origin's policy: each piece leaves it about once |

pub mod announce;
pub mod bitfield;
pub mod codec;
pub mod crossing;
pub mod hash;
pub mod limits;
pub mod manifest;
pub mod path;
pub mod scheduler;
pub mod superseed;
pub mod wire;

pub use announce::{
    Announcement, Lifecycle, PublicKey, PublisherKey, SignedAnnouncement, TrustedKeys,
};
pub use bitfield::Bitfield;
pub use codec::{DecodeError, EncodeError, WireFormat};
pub use hash::Hash;
pub use manifest::{Manifest, ManifestBuilder, PieceHash};
