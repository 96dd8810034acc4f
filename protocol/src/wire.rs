//! Wire messages between nodes, other than gossip announcements.
//!
//! Three channels, three families of messages:
//!
//! ```text
//!  control (request-response, small)          piece stream (requests one after another)
//!  ─────────────────────────────────          ─────────────────────────────────
//!  Manifest{id}        -> Manifest{bytes}     PieceRequest{id, first, count}  ->
//!  Availability{id}    -> Availability{bits}  <- PieceResponseHeader{status, first, count}
//!  Have{id, pieces}    -> Ack  (older peers)  <- PieceFrame{index, encoding, len} + len bytes
//!  LatestVersion{img}  -> LatestVersion{ann}     (one frame per piece of the span)
//!  Peers               -> Peers{records}         then the next PieceRequest, or the end
//!  Announcement{img,v} -> Announcement{ann}   haves stream (one per peer and direction)
//!  Catalogue           -> Catalogue{anns}     ─────────────────────────────────────────
//!  Register{holdings}  -> Ack  (to a tracker) HaveMessage{id, pieces} ->  (no answer,
//!  Holders{id}         -> Holders{records}    HaveMessage{id, pieces} ->   for its life)
//!  any                 -> NotFound/Busy/Error
//! ```
//!
//! Every message is a [`WireFormat`]: a format byte, a postcard body, a size limit, semantic
//! validation on decode. Enum variants are only ever appended (postcard encodes the variant's
//! position); the golden-bytes tests in `tests/golden.rs` fail if one moves.

use serde::{Deserialize, Serialize};

use crate::bitfield::Bitfield;
use crate::codec::WireFormat;
use crate::hash::Hash;
use crate::limits::{
    MAX_ADDR_LEN, MAX_ADDRS_PER_PEER, MAX_ANNOUNCEMENT_SIZE, MAX_CATALOGUE, MAX_CONTROL_SIZE,
    MAX_ERROR_TEXT, MAX_HAVE_BATCH, MAX_HAVE_MESSAGE_SIZE, MAX_HOLDINGS, MAX_MANIFEST_SIZE,
    MAX_PEER_ID_LEN, MAX_PEER_RECORDS, MAX_PIECE_HEADER_SIZE, MAX_PIECE_SIZE, MAX_PIECES,
    MAX_SITE_LEN, MAX_SPAN,
};
use crate::path::check_image_name;

/// A control request. Variants are append-only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// "Send me the manifest with this id."
    Manifest { manifest_id: Hash },
    /// "Which pieces of this version do you hold?" (asked when a peer becomes interesting).
    Availability { manifest_id: Hash },
    /// "I now also hold these pieces" (batched, ascending).
    Have { manifest_id: Hash, pieces: Vec<u32> },
    /// "What is the latest deployed version of this image you know?"
    LatestVersion { image: String },
    /// "Which peers do you know?" (peer exchange, so a node that knows one peer finds the rest).
    Peers,
    /// "Send me the announcement of this version, if you know it."
    Announcement { image: String, version: u64 },
    /// "Send me the newest announcement of every image you know" (for late joiners).
    Catalogue,
    /// To a tracker: "this is what I hold or am fetching". Sent on connect and as progress
    /// changes; the tracker takes the sender's site, role and addresses from identify.
    Register { holdings: Vec<Holding> },
    /// To a tracker: "who holds (part of) this version?"
    Holders { manifest_id: Hash },
}

/// One version a node holds or is fetching, as it tells a tracker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    pub manifest_id: Hash,
    pub image: String,
    pub version: u64,
    /// Verified pieces (equal to `total` once complete).
    pub verified: u32,
    pub total: u32,
}

/// A holder of a version, as a tracker answers: where it is and how far it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderRecord {
    pub peer: PeerRecord,
    pub site: String,
    /// The origin (a seed): asked last.
    pub origin: bool,
    pub verified: u32,
    pub total: u32,
}

/// A control response. Variants are append-only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlResponse {
    /// The canonical manifest bytes; the receiver checks them against the signed id.
    Manifest {
        bytes: Vec<u8>,
    },
    Availability {
        manifest_id: Hash,
        bitfield: Bitfield,
    },
    /// A "have" was received.
    Ack,
    /// The encoded signed announcement of the latest deployed version, if known. Kept as bytes
    /// so the receiver verifies exactly what the publisher signed.
    LatestVersion {
        announcement: Option<Vec<u8>>,
    },
    NotFound,
    /// Try later or elsewhere.
    Busy,
    Error {
        message: String,
    },
    /// Answer to [`ControlRequest::Peers`].
    Peers {
        peers: Vec<PeerRecord>,
    },
    /// Answer to [`ControlRequest::Announcement`]: one encoded signed announcement.
    Announcement {
        announcement: Vec<u8>,
    },
    /// Answer to [`ControlRequest::Catalogue`]: encoded signed announcements.
    Catalogue {
        announcements: Vec<Vec<u8>>,
    },
    /// Answer to [`ControlRequest::Holders`], best first: same site as the asker, then other
    /// sites, the origin last.
    Holders {
        holders: Vec<HolderRecord>,
    },
}

/// One message of a haves stream: "I now also hold these pieces of this version" (ascending).
/// The same news as [`ControlRequest::Have`], without a stream, a negotiation and an answer
/// each time: a downloading swarm sends a few of these per peer every second.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaveMessage {
    pub manifest_id: Hash,
    pub pieces: Vec<u32>,
}

/// A peer another node can dial: its libp2p peer id and multiaddrs, in their binary forms
/// (this crate does not depend on libp2p; the node parses them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub peer_id: Vec<u8>,
    pub addrs: Vec<Vec<u8>>,
}

impl WireFormat for ControlRequest {
    const KIND: &'static str = "control request";
    const FORMAT_VERSION: u8 = 1;
    const MAX_SIZE: usize = MAX_CONTROL_SIZE;

    fn validate(&self) -> Result<(), String> {
        match self {
            Self::Have { pieces, .. } => check_have_batch(pieces),
            Self::LatestVersion { image } => check_image_name(image).map_err(|e| e.to_string()),
            Self::Announcement { image, .. } => check_image_name(image).map_err(|e| e.to_string()),
            Self::Register { holdings } => check_holdings(holdings),
            Self::Manifest { .. }
            | Self::Availability { .. }
            | Self::Peers
            | Self::Catalogue
            | Self::Holders { .. } => Ok(()),
        }
    }
}

impl WireFormat for ControlResponse {
    const KIND: &'static str = "control response";
    const FORMAT_VERSION: u8 = 1;
    // A manifest travels in a response, so this one message may be as large as a manifest.
    const MAX_SIZE: usize = MAX_MANIFEST_SIZE + 16;

    fn validate(&self) -> Result<(), String> {
        match self {
            Self::Error { message } if message.len() > MAX_ERROR_TEXT => {
                Err(format!("error text longer than {MAX_ERROR_TEXT} bytes"))
            }
            Self::LatestVersion {
                announcement: Some(bytes),
            } if bytes.len() > MAX_ANNOUNCEMENT_SIZE => {
                Err("announcement longer than its limit".into())
            }
            Self::Availability { bitfield, .. } if bitfield.is_empty() => {
                Err("availability of zero pieces".into())
            }
            Self::Peers { peers } => check_peers(peers),
            Self::Holders { holders } => check_holders(holders),
            Self::Announcement { announcement } if announcement.len() > MAX_ANNOUNCEMENT_SIZE => {
                Err("announcement longer than its limit".into())
            }
            Self::Catalogue { announcements } => {
                if announcements.len() > MAX_CATALOGUE {
                    return Err(format!(
                        "catalogue of more than {MAX_CATALOGUE} announcements"
                    ));
                }
                if announcements
                    .iter()
                    .any(|a| a.len() > MAX_ANNOUNCEMENT_SIZE)
                {
                    return Err("announcement longer than its limit".into());
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

fn check_peers(peers: &[PeerRecord]) -> Result<(), String> {
    if peers.len() > MAX_PEER_RECORDS {
        return Err(format!("more than {MAX_PEER_RECORDS} peer records"));
    }
    for p in peers {
        if p.peer_id.is_empty() || p.peer_id.len() > MAX_PEER_ID_LEN {
            return Err("peer id of a wrong size".into());
        }
        if p.addrs.len() > MAX_ADDRS_PER_PEER
            || p.addrs
                .iter()
                .any(|a| a.is_empty() || a.len() > MAX_ADDR_LEN)
        {
            return Err("peer addresses out of bounds".into());
        }
    }
    Ok(())
}

fn check_holdings(holdings: &[Holding]) -> Result<(), String> {
    if holdings.len() > MAX_HOLDINGS {
        return Err(format!("more than {MAX_HOLDINGS} holdings"));
    }
    for h in holdings {
        check_image_name(&h.image).map_err(|e| e.to_string())?;
        check_progress(h.verified, h.total)?;
    }
    Ok(())
}

fn check_holders(holders: &[HolderRecord]) -> Result<(), String> {
    if holders.len() > MAX_PEER_RECORDS {
        return Err(format!("more than {MAX_PEER_RECORDS} holders"));
    }
    let peers: Vec<PeerRecord> = holders.iter().map(|h| h.peer.clone()).collect();
    check_peers(&peers)?;
    for h in holders {
        if h.site.is_empty() || h.site.len() > MAX_SITE_LEN {
            return Err(format!("site name of 1-{MAX_SITE_LEN} bytes expected"));
        }
        check_progress(h.verified, h.total)?;
    }
    Ok(())
}

fn check_progress(verified: u32, total: u32) -> Result<(), String> {
    if verified > total || u64::from(total) > MAX_PIECES {
        return Err(format!("progress {verified}/{total} out of bounds"));
    }
    Ok(())
}

fn check_have_batch(pieces: &[u32]) -> Result<(), String> {
    if pieces.is_empty() || pieces.len() > MAX_HAVE_BATCH {
        return Err(format!(
            "have batch of {} pieces (1-{MAX_HAVE_BATCH})",
            pieces.len()
        ));
    }
    if pieces.windows(2).any(|w| w[0] >= w[1]) {
        return Err("have batch not strictly ascending".into());
    }
    if u64::from(*pieces.last().unwrap_or(&0)) >= MAX_PIECES {
        return Err("have batch names a piece past the limit".into());
    }
    Ok(())
}

/// A request on a piece stream: "send me pieces first..first+count of this version". A
/// stream carries one request at a time, and another once the answer is complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceRequest {
    pub manifest_id: Hash,
    pub first: u32,
    pub count: u32,
}

/// Outcome of a piece request. Variants are append-only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PieceStatus {
    /// Frames follow, one per piece of the span.
    Ok,
    /// The peer does not hold (all of) the span.
    Missing,
    /// No free upload slot: ask again later or elsewhere.
    Busy,
    /// The peer does not know this version.
    UnknownVersion,
}

/// The uploader's answer on a piece stream, before any frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceResponseHeader {
    pub status: PieceStatus,
    pub first: u32,
    pub count: u32,
}

/// How a piece's bytes travel. Variants are append-only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PieceEncoding {
    /// The piece as is.
    Raw,
    /// zstd-compressed; decompression is bounded by the piece size (reserved: not sent yet).
    Zstd,
}

/// Precedes each piece's bytes on a piece stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceFrame {
    pub index: u32,
    pub encoding: PieceEncoding,
    /// Bytes that follow this header.
    pub len: u32,
}

fn check_span(first: u32, count: u32) -> Result<(), String> {
    if count == 0 || count > MAX_SPAN {
        return Err(format!("span of {count} pieces (1-{MAX_SPAN})"));
    }
    if u64::from(first) + u64::from(count) > MAX_PIECES {
        return Err("span past the piece limit".into());
    }
    Ok(())
}

impl WireFormat for HaveMessage {
    const KIND: &'static str = "have message";
    const FORMAT_VERSION: u8 = 1;
    const MAX_SIZE: usize = MAX_HAVE_MESSAGE_SIZE;

    fn validate(&self) -> Result<(), String> {
        check_have_batch(&self.pieces)
    }
}

impl WireFormat for PieceRequest {
    const KIND: &'static str = "piece request";
    const FORMAT_VERSION: u8 = 1;
    const MAX_SIZE: usize = MAX_PIECE_HEADER_SIZE;

    fn validate(&self) -> Result<(), String> {
        check_span(self.first, self.count)
    }
}

impl WireFormat for PieceResponseHeader {
    const KIND: &'static str = "piece response header";
    const FORMAT_VERSION: u8 = 1;
    const MAX_SIZE: usize = MAX_PIECE_HEADER_SIZE;

    fn validate(&self) -> Result<(), String> {
        check_span(self.first, self.count)
    }
}

impl WireFormat for PieceFrame {
    const KIND: &'static str = "piece frame";
    const FORMAT_VERSION: u8 = 1;
    const MAX_SIZE: usize = MAX_PIECE_HEADER_SIZE;

    fn validate(&self) -> Result<(), String> {
        if self.len > MAX_PIECE_SIZE {
            return Err(format!(
                "frame of {} bytes exceeds the piece size limit",
                self.len
            ));
        }
        if u64::from(self.index) >= MAX_PIECES {
            return Err("frame index past the piece limit".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn have_batch_rules() {
        let id = Hash::of(b"m");
        let ok = ControlRequest::Have {
            manifest_id: id,
            pieces: vec![1, 5, 9],
        };
        assert_eq!(ControlRequest::decode(&ok.encode().unwrap()).unwrap(), ok);
        for pieces in [vec![], vec![5, 5], vec![9, 1], vec![0; MAX_HAVE_BATCH + 1]] {
            let bad = ControlRequest::Have {
                manifest_id: id,
                pieces,
            };
            assert!(bad.encode().is_err());
            assert!(ControlRequest::decode(&bad.encode_unchecked().unwrap()).is_err());
            let bad = HaveMessage {
                manifest_id: id,
                pieces: match bad {
                    ControlRequest::Have { pieces, .. } => pieces,
                    _ => unreachable!(),
                },
            };
            assert!(bad.encode().is_err());
            assert!(HaveMessage::decode(&bad.encode_unchecked().unwrap()).is_err());
        }
        // The largest valid batch fits the message limit.
        let full = HaveMessage {
            manifest_id: id,
            pieces: ((MAX_PIECES as u32 - MAX_HAVE_BATCH as u32)..MAX_PIECES as u32).collect(),
        };
        assert_eq!(HaveMessage::decode(&full.encode().unwrap()).unwrap(), full);
    }

    #[test]
    fn span_rules() {
        let id = Hash::of(b"m");
        for (first, count, ok) in [
            (0, 1, true),
            (0, MAX_SPAN, true),
            (0, 0, false),
            (0, MAX_SPAN + 1, false),
            (u32::MAX, 1, false),
        ] {
            let r = PieceRequest {
                manifest_id: id,
                first,
                count,
            };
            assert_eq!(r.encode().is_ok(), ok, "{first} {count}");
        }
        let big = PieceFrame {
            index: 0,
            encoding: PieceEncoding::Raw,
            len: MAX_PIECE_SIZE + 1,
        };
        assert!(PieceFrame::decode(&big.encode_unchecked().unwrap()).is_err());
    }
}
