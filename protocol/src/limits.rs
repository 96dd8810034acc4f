//! Every size limit and protocol name of imiswarm, in one place.
//!
//! Decoders check these before they allocate; changing one changes what peers accept, so a change
//! here is a protocol change and needs a new format version where it narrows a limit.

/// Smallest piece size a manifest may use (64 KiB): the unit of an update's delta.
pub const MIN_PIECE_SIZE: u32 = 64 * 1024;
/// Largest piece size a manifest may use (16 MiB).
pub const MAX_PIECE_SIZE: u32 = 16 * 1024 * 1024;
/// Piece size `seed` uses unless told otherwise (see DESIGN.md: 64 KiB keeps update deltas near
/// the changed bytes).
pub const DEFAULT_PIECE_SIZE: u32 = 64 * 1024;

/// Most pieces one version may have: 256 GiB at 64 KiB pieces, 64 TiB at 16 MiB.
pub const MAX_PIECES: u64 = 1 << 22;
/// Most files one version may have.
pub const MAX_FILES: usize = 1 << 16;
/// Longest relative path of a file inside a version, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest single path component, in bytes (Linux `NAME_MAX`).
pub const MAX_COMPONENT_LEN: usize = 255;
/// Longest image name, in bytes.
pub const MAX_IMAGE_NAME_LEN: usize = 128;

/// Largest encoded manifest: every piece hash of a version at `MAX_PIECES`, plus paths.
pub const MAX_MANIFEST_SIZE: usize = 160 * 1024 * 1024;
/// Largest encoded signed announcement: it must fit one gossip message with room to spare.
pub const MAX_ANNOUNCEMENT_SIZE: usize = 1024;
/// Largest control request or response other than one carrying a manifest.
pub const MAX_CONTROL_SIZE: usize = 1024 * 1024;
/// Most piece indices in one batched "have" message.
pub const MAX_HAVE_BATCH: usize = 4096;
/// Largest message on a haves stream: a full batch of varint indices, the id and framing.
pub const MAX_HAVE_MESSAGE_SIZE: usize = 64 + MAX_HAVE_BATCH * 5;
/// Most adjacent pieces one piece request may name.
pub const MAX_SPAN: u32 = 64;
/// Largest piece-stream header (request, response header, frame header).
pub const MAX_PIECE_HEADER_SIZE: usize = 128;
/// Most peer records in one peer-exchange answer.
pub const MAX_PEER_RECORDS: usize = 64;
/// Longest binary peer id (a multihash of an ed25519 key is 38 bytes).
pub const MAX_PEER_ID_LEN: usize = 64;
/// Most addresses per peer record.
pub const MAX_ADDRS_PER_PEER: usize = 8;
/// Longest binary multiaddr.
pub const MAX_ADDR_LEN: usize = 256;
/// Most announcements in one catalogue answer.
pub const MAX_CATALOGUE: usize = 512;
/// Longest human-readable error text a peer may send.
pub const MAX_ERROR_TEXT: usize = 512;
/// Most versions one node registers with a tracker in one message.
pub const MAX_HOLDINGS: usize = 64;
/// Longest site label.
pub const MAX_SITE_LEN: usize = 64;

/// libp2p protocol of small control messages (request-response).
pub const CONTROL_PROTOCOL: &str = "/imiswarm/control/1";
/// libp2p protocol of bulk piece transfer (one span at a time; a stream is kept for the next).
pub const PIECE_PROTOCOL: &str = "/imiswarm/piece/1";
/// libp2p protocol of haves: one long-lived stream per pair of peers and direction, carrying
/// "I now also hold these pieces" messages.
pub const HAVES_PROTOCOL: &str = "/imiswarm/haves/1";
/// Gossipsub topic carrying signed announcements, and nothing else.
pub const ANNOUNCE_TOPIC: &str = "imiswarm/announce/1";
