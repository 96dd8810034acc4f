//! Serving pieces: one task accepts piece streams; each stream is served in its own task.
//!
//! A fixed number of upload slots (a semaphore) bounds concurrent uploads; a stream that finds
//! no free slot is answered "busy" at once so the requester asks elsewhere. Pieces are read with
//! positioned reads, a few at a time ([`READ_BATCH_BYTES`]), each already behind its frame header
//! so it leaves in one write, and pass the node's upload rate limiter; an image is never in
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
use crate::net::codec::{encode_header, read_header, write_header};
use crate::transfer::ratelimit::RateLimiter;

/// How long a requester may take to send its request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// Most piece bytes read per trip to the blocking pool (at least one piece): a span of small
/// pieces costs one hand-off, not one per piece, and a slot holds at most this much.
const READ_BATCH_BYTES: u64 = 512 * 1024;

/// Counters the status API and metrics read.
#[derive(Debug, Default)]
pub struct UploadStats {
    pub bytes: AtomicU64,
    pub pieces: AtomicU64,
    /// Requests served (with at least one piece).
    pub spans: AtomicU64,
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
            self.stats.spans.fetch_add(1, Ordering::Relaxed);
            let end = req.first + count;
            let mut next = req.first;
            while next < end {
                let sent = self.send_batch(&held, next, end, &mut stream).await;
                next += sent.as_ref().map_or_else(|(n, _)| *n, |n| *n);
                if let Err((_, e)) = sent {
                    // Pieces not sent count as not sent for super-seeding.
                    for unsent in next..end {
                        self.library.aborted(&req.manifest_id, unsent);
                    }
                    return Err(e);
                }
            }
            tracing::trace!(%peer, first = req.first, count, "span served");
        }
        stream.close().await
    }

    /// Reads pieces from `first` on (up to [`READ_BATCH_BYTES`], before `end`) and sends them;
    /// returns how many were sent, also on error.
    async fn send_batch(
        &self,
        held: &Held,
        first: u32,
        end: u32,
        stream: &mut libp2p::Stream,
    ) -> Result<u32, (u32, std::io::Error)> {
        let source = held.clone();
        let corrupt = self.corrupt;
        let frames = tokio::task::spawn_blocking(move || read_frames(&source, first, end, corrupt))
            .await
            .map_err(|e| (0, std::io::Error::other(e)))?
            .map_err(|e| (0, e))?;
        let mut sent = 0;
        for (piece_len, frame) in frames {
            self.limiter.take(piece_len).await;
            stream.write_all(&frame).await.map_err(|e| (sent, e))?;
            self.stats
                .bytes
                .fetch_add(piece_len as u64, Ordering::Relaxed);
            self.stats.pieces.fetch_add(1, Ordering::Relaxed);
            sent += 1;
        }
        Ok(sent)
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
}

/// Reads pieces `first..end` until [`READ_BATCH_BYTES`] are read (at least one piece), each
/// behind its frame header: `(piece length, frame)`. Blocking.
fn read_frames(
    held: &Held,
    first: u32,
    end: u32,
    corrupt: bool,
) -> std::io::Result<Vec<(usize, Vec<u8>)>> {
    let mut frames = Vec::new();
    let mut bytes = 0u64;
    for index in first..end {
        let len = held
            .piece_len(index)
            .ok_or_else(|| std::io::Error::other(format!("no piece {index}")))?;
        if !frames.is_empty() && bytes + u64::from(len) > READ_BATCH_BYTES {
            break;
        }
        let mut frame = Vec::with_capacity(len as usize + 32);
        encode_header(
            &PieceFrame {
                index,
                encoding: PieceEncoding::Raw,
                len,
            },
            &mut frame,
        )?;
        let header_len = frame.len();
        held.read_piece_into(index, &mut frame)
            .map_err(std::io::Error::other)?;
        if corrupt && let Some(b) = frame.get_mut(header_len) {
            *b ^= 0xff;
        }
        bytes += u64::from(len);
        frames.push((len as usize, frame));
    }
    Ok(frames)
}
