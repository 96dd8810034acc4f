//! Serving pieces: one task accepts piece streams; each stream is served in its own task.
//!
//! A fixed number of upload slots (a semaphore) bounds concurrent uploads; a stream that finds
//! no free slot is answered "busy" at once so the requester asks elsewhere. Pieces are read with
//! positioned reads, one at a time, and pass the node's upload rate limiter; an image is never in
//! memory. For a version this node published, the super-seeding policy decides which pieces
//! leave. Not here: deciding what to download, or the swarm itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{AsyncWriteExt, StreamExt};
use imiswarm_protocol::superseed::Admission;
use imiswarm_protocol::wire::{
    PieceEncoding, PieceFrame, PieceRequest, PieceResponseHeader, PieceStatus,
};
use libp2p::PeerId;
use tokio::sync::Semaphore;

use crate::library::{Held, Library};
use crate::net::PIECES;
use crate::net::codec::{read_header, write_header};
use crate::transfer::ratelimit::RateLimiter;

/// How long a requester may take to send its request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// Counters the status API and metrics read.
#[derive(Debug, Default)]
pub struct UploadStats {
    pub bytes: AtomicU64,
    pub pieces: AtomicU64,
    pub busy: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct Uploader {
    pub library: Arc<Library>,
    pub limiter: Arc<RateLimiter>,
    pub stats: Arc<UploadStats>,
    pub slots: Arc<Semaphore>,
    /// Testing only: serve corrupt bytes (see `--corrupt-uploads`).
    pub corrupt: bool,
}

impl Uploader {
    /// Accepts piece streams until the control is dropped. Registering twice is a bug.
    pub async fn run(self, mut control: libp2p_stream::Control) -> anyhow::Result<()> {
        let mut incoming = control
            .accept(PIECES)
            .map_err(|_| anyhow::anyhow!("piece protocol registered twice"))?;
        while let Some((peer, stream)) = incoming.next().await {
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.serve(peer, stream).await {
                    tracing::debug!(%peer, error = %e, "piece stream ended with an error");
                }
            });
        }
        Ok(())
    }

    async fn serve(&self, peer: PeerId, mut stream: libp2p::Stream) -> std::io::Result<()> {
        let req: PieceRequest = tokio::time::timeout(REQUEST_DEADLINE, read_header(&mut stream))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let permit = self.slots.clone().try_acquire_owned().ok();
        let (status, count) = match (self.library.get(&req.manifest_id), &permit) {
            (None, _) => (PieceStatus::UnknownVersion, req.count),
            (Some(_), None) => (PieceStatus::Busy, req.count),
            (Some(held), Some(_)) => self.admitted_span(&held, &req),
        };
        if status != PieceStatus::Ok {
            self.stats.busy.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, first = req.first, count = req.count, ?status, "piece request not served");
        }
        write_header(
            &mut stream,
            &PieceResponseHeader {
                status,
                first: req.first,
                count,
            },
        )
        .await?;
        if status == PieceStatus::Ok
            && let Some(held) = self.library.get(&req.manifest_id)
        {
            for index in req.first..req.first + count {
                if let Err(e) = self.send_piece(&held, index, &mut stream).await {
                    // Pieces not sent count as not sent for super-seeding.
                    for unsent in index..req.first + count {
                        self.library.aborted(&req.manifest_id, unsent);
                    }
                    return Err(e);
                }
            }
            tracing::trace!(%peer, first = req.first, count, "span served");
        }
        stream.close().await
    }

    /// How much of the requested span can be served: the held prefix, cut at the first piece
    /// the origin's super-seeding declines.
    fn admitted_span(&self, held: &Held, req: &PieceRequest) -> (PieceStatus, u32) {
        let mut count = 0;
        for index in req.first..req.first.saturating_add(req.count) {
            if !held.has(index) {
                break;
            }
            if self.library.admit(&req.manifest_id, index) == Admission::Decline {
                break;
            }
            count += 1;
        }
        match count {
            0 if held.has(req.first) => (PieceStatus::Busy, req.count),
            0 => (PieceStatus::Missing, req.count),
            n => (PieceStatus::Ok, n),
        }
    }

    async fn send_piece(
        &self,
        held: &Held,
        index: u32,
        stream: &mut libp2p::Stream,
    ) -> std::io::Result<()> {
        let source = held.clone();
        let mut bytes = tokio::task::spawn_blocking(move || source.read_piece(index))
            .await
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)?;
        if self.corrupt
            && let Some(b) = bytes.first_mut()
        {
            *b ^= 0xff;
        }
        self.limiter.take(bytes.len()).await;
        write_header(
            stream,
            &PieceFrame {
                index,
                encoding: PieceEncoding::Raw,
                len: bytes.len() as u32,
            },
        )
        .await?;
        stream.write_all(&bytes).await?;
        self.stats
            .bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.stats.pieces.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
