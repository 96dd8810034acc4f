//! Piece streams kept open between requests, per peer (keep-alive, as HTTP/1.1 keeps a
//! connection).
//!
//! Opening a stream is a yamux stream, a protocol negotiation, timers and a task on each side:
//! at one request per stream and a few 64 KiB pieces per request, that setup cost a swarm on
//! shared cores about as much CPU as the piece bytes' own framing. A fetch takes an idle
//! stream to its peer if there is one, and gives it back after a complete exchange; the
//! uploader serves requests on a stream until the requester closes it or it stays idle for
//! [`SERVER_IDLE`].
//!
//! A kept stream may have been closed by its peer meanwhile (idle too long, restarted, or a
//! peer that serves one request per stream): the fetch then asks once more on a new stream,
//! which is safe because a request changes nothing at the uploader.
//!
//! Owns only which streams wait for reuse; what is said on them is `download`'s and `upload`'s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// How long the uploader waits for the next request on a kept stream before closing it.
pub const SERVER_IDLE: Duration = Duration::from_secs(20);
/// How long a requester keeps an idle stream: well inside [`SERVER_IDLE`], so a stream taken
/// from the pool is rarely one the uploader is just closing.
const CLIENT_IDLE: Duration = Duration::from_secs(10);
/// Idle streams kept per peer: about the most requests in flight at one peer.
const MAX_IDLE_PER_PEER: usize = 16;

/// Idle streams by peer, each with the moment it became idle.
type Idle = HashMap<PeerId, Vec<(Instant, libp2p::Stream)>>;

/// Idle piece streams by peer; cheap to clone (shared).
#[derive(Clone, Default)]
pub struct StreamPool {
    idle: Arc<Mutex<Idle>>,
}

impl std::fmt::Debug for StreamPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamPool")
            .field("peers", &self.lock().len())
            .finish()
    }
}

impl StreamPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently returned idle stream to `peer` that is still fresh; staler ones are
    /// dropped on the way.
    pub fn take(&self, peer: &PeerId) -> Option<libp2p::Stream> {
        let mut idle = self.lock();
        let streams = idle.get_mut(peer)?;
        streams.retain(|(since, _)| since.elapsed() < CLIENT_IDLE);
        let stream = streams.pop().map(|(_, s)| s);
        if streams.is_empty() {
            idle.remove(peer);
        }
        stream
    }

    /// Keeps `stream` (its last exchange complete) for the next request to `peer`.
    pub fn put(&self, peer: PeerId, stream: libp2p::Stream) {
        let mut idle = self.lock();
        let streams = idle.entry(peer).or_default();
        streams.retain(|(since, _)| since.elapsed() < CLIENT_IDLE);
        if streams.len() < MAX_IDLE_PER_PEER {
            streams.push((Instant::now(), stream));
        }
    }

    /// Drops every idle stream to `peer` (it disconnected).
    pub fn forget(&self, peer: &PeerId) {
        self.lock().remove(peer);
    }
}
