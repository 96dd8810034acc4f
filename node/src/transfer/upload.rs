//! Serving pieces: one task accepts piece streams; each stream is served in its own task, one
//! request after another until the requester closes it (see [`crate::transfer::stream_pool`]).
//!
//! A fixed number of upload slots (a semaphore) bounds concurrent uploads; a request that finds
//! no free slot is answered "busy" at once so the requester asks elsewhere. Pieces are read
//! with positioned reads, a few at a time ([`READ_BATCH_BYTES`]), each already behind its frame
//! header so it leaves in one write, and pass the node's upload rate limiter; an image is never
//! in memory. For a version this node published, the super-seeding policy decides which pieces
//! leave. Not here: deciding what to download, or the swarm itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt, StreamExt};
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
use crate::transfer::stream_pool::SERVER_IDLE;

/// How long a requester may take to send its first request on a new stream.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// Most piece bytes read per trip to the blocking pool (at least one piece): a span of small
/// pieces costs one hand-off, not one per piece, and a slot holds at most this much.
const READ_BATCH_BYTES: u64 = 512 * 1024;
/// Most frame buffers a stream keeps for its next batch (a batch of 64 KiB pieces needs 8).
const SPARE_FRAMES: usize = 8;

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

    /// Serves requests on one stream, one after the other, until the requester closes it or
    /// sends nothing for [`SERVER_IDLE`] (see [`crate::transfer::stream_pool`]).
    async fn serve<S>(&self, peer: PeerId, mut stream: S) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut kept = false;
        // Frame buffers go to the blocking pool with each batch and come back: a piece read
        // costs no allocation and no zeroing once the stream has served a batch.
        let mut spare: Vec<Vec<u8>> = Vec::new();
        loop {
            let deadline = if kept { SERVER_IDLE } else { REQUEST_DEADLINE };
            let req: PieceRequest =
                match tokio::time::timeout(deadline, read_header(&mut stream)).await {
                    Ok(Ok(req)) => req,
                    // The requester is done with the stream.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Ok(Err(e)) => return Err(e),
                    // A kept stream left idle: closed, as the requester expects.
                    Err(_) if kept => break,
                    Err(_) => return Err(std::io::Error::from(std::io::ErrorKind::TimedOut)),
                };
            self.serve_request(peer, &mut stream, req, &mut spare)
                .await?;
            kept = true;
        }
        stream.close().await
    }

    /// Answers one request: its header, then the pieces admitted.
    async fn serve_request<S>(
        &self,
        peer: PeerId,
        stream: &mut S,
        req: PieceRequest,
        spare: &mut Vec<Vec<u8>>,
    ) -> std::io::Result<()>
    where
        S: AsyncWrite + Unpin,
    {
        let permit = self.slots.clone().try_acquire_owned().ok();
        // Names this request's admissions, should its upload break off.
        let admitted_at = Instant::now();
        let (status, count) = match (self.library.get(&req.manifest_id), &permit) {
            (None, _) => (PieceStatus::UnknownVersion, req.count),
            (Some(_), None) => (PieceStatus::Busy, req.count),
            (Some(held), Some(_)) => self.admitted_span(&held, &req, admitted_at),
        };
        if status != PieceStatus::Ok {
            self.stats.busy.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, first = req.first, count = req.count, ?status, "piece request not served");
        }
        write_header(
            stream,
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
                let sent = self.send_batch(&held, next, end, stream, spare).await;
                next += sent.as_ref().map_or_else(|(n, _)| *n, |n| *n);
                if let Err((_, e)) = sent {
                    // Pieces not sent count as not sent for super-seeding.
                    for unsent in next..end {
                        self.library.aborted(&req.manifest_id, unsent, admitted_at);
                    }
                    return Err(e);
                }
            }
            tracing::trace!(%peer, first = req.first, count, "span served");
        }
        // The answer leaves now, not when the next one fills the buffer.
        stream.flush().await
    }

    /// Reads pieces from `first` on (up to [`READ_BATCH_BYTES`], before `end`) into buffers
    /// from `spare` and sends them; returns how many were sent, also on error. The buffers go
    /// back to `spare`.
    async fn send_batch<S: AsyncWrite + Unpin>(
        &self,
        held: &Held,
        first: u32,
        end: u32,
        stream: &mut S,
        spare: &mut Vec<Vec<u8>>,
    ) -> Result<u32, (u32, std::io::Error)> {
        let source = held.clone();
        let corrupt = self.corrupt;
        let buffers = std::mem::take(spare);
        let frames =
            tokio::task::spawn_blocking(move || read_frames(&source, first, end, corrupt, buffers))
                .await
                .map_err(|e| (0, std::io::Error::other(e)))?
                .map_err(|e| (0, e))?;
        let mut sent = 0;
        let mut result = Ok(());
        for (piece_len, frame) in frames {
            if result.is_ok() {
                self.limiter.take(piece_len).await;
                result = stream.write_all(&frame).await;
                if result.is_ok() {
                    self.stats
                        .bytes
                        .fetch_add(piece_len as u64, Ordering::Relaxed);
                    self.stats.pieces.fetch_add(1, Ordering::Relaxed);
                    sent += 1;
                }
            }
            if spare.len() < SPARE_FRAMES {
                spare.push(frame);
            }
        }
        result.map(|()| sent).map_err(|e| (sent, e))
    }

    /// How much of the requested span can be served: the held prefix, cut at the first piece
    /// the origin's super-seeding declines.
    fn admitted_span(&self, held: &Held, req: &PieceRequest, now: Instant) -> (PieceStatus, u32) {
        let mut count = 0;
        for index in req.first..req.first.saturating_add(req.count) {
            if !held.has(index) {
                break;
            }
            if self.library.admit(&req.manifest_id, index, now) == Admission::Decline {
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
/// behind its frame header: `(piece length, frame)`. Frames reuse the buffers of `spare`
/// first. Blocking.
fn read_frames(
    held: &Held,
    first: u32,
    end: u32,
    corrupt: bool,
    mut spare: Vec<Vec<u8>>,
) -> std::io::Result<Vec<(usize, Vec<u8>)>> {
    let mut frames = Vec::new();
    let mut header = Vec::with_capacity(32);
    let mut bytes = 0u64;
    for index in first..end {
        let len = held
            .piece_len(index)
            .ok_or_else(|| std::io::Error::other(format!("no piece {index}")))?;
        if !frames.is_empty() && bytes + u64::from(len) > READ_BATCH_BYTES {
            break;
        }
        header.clear();
        encode_header(
            &PieceFrame {
                index,
                encoding: PieceEncoding::Raw,
                len,
            },
            &mut header,
        )?;
        let header_len = header.len();
        // Not cleared: the piece overwrites the old bytes, and only growth is zeroed.
        let mut frame = spare.pop().unwrap_or_default();
        held.read_piece_at(index, &mut frame, header_len)
            .map_err(std::io::Error::other)?;
        frame[..header_len].copy_from_slice(&header);
        if corrupt && let Some(b) = frame.get_mut(header_len) {
            *b ^= 0xff;
        }
        bytes += u64::from(len);
        frames.push((len as usize, frame));
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::AsyncReadExt;
    use imiswarm_protocol::manifest::ManifestBuilder;
    use tokio_util::compat::TokioAsyncReadCompatExt;

    use crate::net::codec::read_header;
    use crate::store::CompleteVersion;

    const PS: u32 = 64 * 1024;

    /// Several requests on one stream are answered in order, and the stream ends cleanly
    /// when the requester closes it (keep-alive, see `stream_pool`).
    #[tokio::test]
    async fn one_stream_carries_several_requests() {
        let tmp = tempfile::tempdir().unwrap();
        let disk: Vec<u8> = (0..PS as usize * 3).map(|i| (i % 253) as u8 + 1).collect();
        std::fs::write(tmp.path().join("disk.img"), &disk).unwrap();
        let mut b = ManifestBuilder::new("lab", 1, PS).unwrap();
        b.add_file("disk.img", 0o644, disk.len() as u64, &disk[..], &mut |_| {})
            .unwrap();
        let version = Arc::new(CompleteVersion::open(tmp.path(), b.finish().unwrap()).unwrap());
        let id = version.id;
        let library = Arc::new(Library::default());
        library.add_complete(version);
        let uploader = Uploader {
            library,
            limiter: Arc::new(RateLimiter::new(None)),
            stats: Arc::default(),
            slots: Arc::new(Semaphore::new(2)),
            corrupt: false,
        };
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let stats = uploader.stats.clone();
        let server =
            tokio::spawn(async move { uploader.serve(PeerId::random(), theirs.compat()).await });

        let mut stream = ours.compat();
        for (first, count) in [(2, 1), (0, 2)] {
            let req = PieceRequest {
                manifest_id: id,
                first,
                count,
            };
            write_header(&mut stream, &req).await.unwrap();
            let header: PieceResponseHeader = read_header(&mut stream).await.unwrap();
            assert_eq!(header.status, PieceStatus::Ok);
            assert_eq!((header.first, header.count), (first, count));
            for index in first..first + count {
                let frame: PieceFrame = read_header(&mut stream).await.unwrap();
                assert_eq!((frame.index, frame.len), (index, PS));
                let mut bytes = vec![0; PS as usize];
                stream.read_exact(&mut bytes).await.unwrap();
                let at = index as usize * PS as usize;
                assert!(bytes == disk[at..at + PS as usize], "piece {index} altered");
            }
        }
        // An unknown version is answered, and the stream still serves.
        let unknown = PieceRequest {
            manifest_id: imiswarm_protocol::hash::Hash::of(b"other"),
            first: 0,
            count: 1,
        };
        write_header(&mut stream, &unknown).await.unwrap();
        let header: PieceResponseHeader = read_header(&mut stream).await.unwrap();
        assert_eq!(header.status, PieceStatus::UnknownVersion);

        stream.close().await.unwrap();
        let served = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the uploader ends with the stream")
            .unwrap();
        assert!(served.is_ok(), "{served:?}");
        assert_eq!(stats.spans.load(Ordering::Relaxed), 2);
        assert_eq!(stats.pieces.load(Ordering::Relaxed), 3);
    }
}
