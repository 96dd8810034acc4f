//! # imiswarm-tracker
//!
//! Tracker logic as a library: the node's `tracker` command hosts it, feeds it what identify and
//! control requests say, and sends back what it answers. Like `imiswarm-protocol` it knows
//! neither tokio nor libp2p: peers are opaque id bytes and time is passed in, so every decision
//! is testable without a socket.
//!
//! ```text
//!  identify ──connected──┐                         ┌──holders──> ControlResponse::Holders
//!  Register ──register───┼──> Registry ────────────┼──summary──> status API, /metrics
//!  disconnect / expire ──┘                         │
//!  gossip, Announcement ──offer──> Catalogue ──────┼──for_late_joiners──> ControlResponse::Catalogue
//!                                      ↕ save/load └──latest_deployed───> ControlResponse::LatestVersion
//!                                 CatalogueStore (redb file)
//! ```
//!
//! | module | owns |
//! |---|---|
//! | [`registry`] | who holds which version at which site, and the order holders are handed out |
//! | [`catalogue`] | the newest verified statement about each version, for late joiners |
//! | [`store`] | the catalogue on disk, so a restarted tracker still answers late joiners |
//!
//! Non-goals: the tracker serves no pieces and fetches no manifests; it never decides what a
//! node fetches, only whom it asks.

pub mod catalogue;
pub mod registry;
pub mod store;

pub use catalogue::{Catalogue, CatalogueEntry, CatalogueError, Offered};
pub use registry::{Member, PeerKey, Registry, RegistryError, RegistrySummary};
pub use store::{CatalogueStore, Loaded, StoreError};
