//! Haves: telling interested peers which pieces this node verified since it last told them,
//! over one long-lived stream per peer.
//!
//! A download hands its batches to [`HaveSender::send`]. Per peer, one task owns an outgoing
//! haves stream and writes everything queued since its last write in one go. Incoming haves
//! streams are read by [`accept`], one task per stream, and handed to the node, which routes
//! each message to the download it names.
//!
//! ```text
//!  download ──send──> HaveSender ──queue──> task per peer ──haves stream──> peer's accept
//!                                                                        └──> its node loop
//! ```
//!
//! A have is news, not state: a message that cannot be delivered (the peer is slow or gone, its
//! queue is full) is dropped, as a lost control exchange always was; a download that stops
//! making progress asks its peers for their whole availability again. Peers of an older
//! release, without the haves protocol, get one control request per message instead.
//!
//! Before this stream, every batch was a control exchange of its own (a new multiplexer
//! stream, a protocol negotiation, a request and an answer): about a thousand a second in a
//! swarm of seventeen downloading nodes, more system calls than the piece bytes themselves.
//!
//! Not here: who is interested (the download decides) or what a have means (its scheduler).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncWriteExt, StreamExt};
use imiswarm_protocol::limits::HAVES_PROTOCOL;
use imiswarm_protocol::wire::{ControlRequest, HaveMessage};
use libp2p::{PeerId, StreamProtocol};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::net::NetHandle;
use crate::net::codec::{encode_header, read_header};

/// The haves stream protocol.
pub const HAVES: StreamProtocol = StreamProtocol::new(HAVES_PROTOCOL);

/// Messages queued for one peer; beyond that, new ones are dropped until the peer catches up.
const QUEUE: usize = 256;
/// Bytes gathered into one write at most (several messages: each write is one multiplexer
/// frame and one encrypted transport frame).
const WRITE_BYTES: usize = 64 * 1024;
/// How long opening a stream may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a write may wait for the peer to take the bytes; a peer that reads nothing for
/// this long loses its stream (the next message opens a new one).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Incoming haves streams one peer may hold open at once: one is normal, a few cover a
/// reconnect whose old stream has not noticed yet; more are refused.
const STREAMS_PER_PEER: usize = 4;

/// Sends haves to peers, one outgoing stream per peer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct HaveSender {
    net: NetHandle,
    queues: Arc<Mutex<HashMap<PeerId, mpsc::Sender<HaveMessage>>>>,
}

impl HaveSender {
    pub fn new(net: NetHandle) -> Self {
        Self {
            net,
            queues: Arc::default(),
        }
    }

    /// Queues `message` for `peer`, starting its stream task if it has none (or its last one
    /// ended). Never waits.
    pub fn send(&self, peer: PeerId, message: HaveMessage) {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let message = match queues.get(&peer) {
            Some(queue) => match queue.try_send(message) {
                Ok(()) => return,
                Err(TrySendError::Full(_)) => {
                    tracing::debug!(%peer, "haves queue full: a have is dropped");
                    return;
                }
                Err(TrySendError::Closed(message)) => message,
            },
            None => message,
        };
        // Tasks end with their stream; forget every ended one, not only this peer's.
        queues.retain(|_, q| !q.is_closed());
        let (tx, rx) = mpsc::channel(QUEUE);
        // A new channel has room.
        let _ = tx.try_send(message);
        queues.insert(peer, tx);
        tokio::spawn(send_to(self.net.clone(), peer, rx));
    }

    /// The peer is gone: its task closes its stream and ends, and nothing more is queued for it
    /// until it is told something again.
    pub fn forget(&self, peer: PeerId) {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        queues.remove(&peer);
    }
}

/// Opens a haves stream to `peer`. `Ok(None)`: the peer does not speak the protocol.
async fn open(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
) -> Result<Option<libp2p::Stream>, String> {
    match tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, HAVES)).await {
        Ok(Ok(stream)) => Ok(Some(stream)),
        Ok(Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_))) => Ok(None),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("opening a haves stream timed out".into()),
    }
}

/// Owns the haves stream to one peer until it breaks or the queue's sender is dropped.
async fn send_to(net: NetHandle, peer: PeerId, mut queue: mpsc::Receiver<HaveMessage>) {
    let mut control = net.streams();
    let mut stream = match open(&mut control, peer).await {
        Ok(Some(stream)) => stream,
        Ok(None) => {
            send_as_requests(&net, peer, &mut queue).await;
            return;
        }
        Err(e) => {
            tracing::debug!(%peer, error = %e, "no haves stream");
            return;
        }
    };
    let mut bytes = Vec::with_capacity(WRITE_BYTES);
    while let Some(first) = queue.recv().await {
        bytes.clear();
        let mut next = Some(first);
        while let Some(message) = next {
            if let Err(e) = encode_header(&message, &mut bytes) {
                // Only a message our own download built wrongly can fail here.
                tracing::warn!(%peer, error = %e, "have message not encoded");
            }
            next = if bytes.len() < WRITE_BYTES {
                queue.try_recv().ok()
            } else {
                None
            };
        }
        match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                // The connection under the stream may have been replaced (a reconnect): one
                // new stream, and the batch again, before giving up on the peer.
                tracing::debug!(%peer, error = %e, "haves stream broke: opening another");
                let resent = match open(&mut control, peer).await {
                    Ok(Some(new)) => {
                        stream = new;
                        tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&bytes)).await
                    }
                    _ => return,
                };
                if !matches!(resent, Ok(Ok(()))) {
                    return;
                }
            }
            Err(_) => {
                tracing::debug!(%peer, "peer reads no haves: closing the stream");
                return;
            }
        }
    }
    let _ = stream.close().await;
}

/// A peer of an older release: one control exchange per message, as it expects.
async fn send_as_requests(net: &NetHandle, peer: PeerId, queue: &mut mpsc::Receiver<HaveMessage>) {
    while let Some(message) = queue.recv().await {
        let request = ControlRequest::Have {
            manifest_id: message.manifest_id,
            pieces: message.pieces,
        };
        if let Err(e) = net.request(peer, request).await {
            tracing::debug!(%peer, error = %e, "have not delivered");
            return;
        }
    }
}

/// Reads every incoming haves stream until `control` stops accepting, handing each message to
/// `node` with the peer that sent it. Registering twice is a bug.
pub async fn accept(
    mut control: libp2p_stream::Control,
    node: mpsc::Sender<(PeerId, HaveMessage)>,
) -> anyhow::Result<()> {
    let mut incoming = control
        .accept(HAVES)
        .map_err(|_| anyhow::anyhow!("haves protocol registered twice"))?;
    let open: Arc<Mutex<HashMap<PeerId, usize>>> = Arc::default();
    while let Some((peer, stream)) = incoming.next().await {
        {
            let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
            let streams = open.entry(peer).or_default();
            if *streams >= STREAMS_PER_PEER {
                tracing::debug!(%peer, "too many haves streams: refusing one");
                continue;
            }
            *streams += 1;
        }
        let (open, node) = (open.clone(), node.clone());
        tokio::spawn(async move {
            let result = read_haves(peer, stream, &node).await;
            {
                let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(streams) = open.get_mut(&peer) {
                    *streams -= 1;
                    if *streams == 0 {
                        open.remove(&peer);
                    }
                }
            }
            match result {
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    tracing::warn!(%peer, error = %e, "malformed have message: stream closed");
                }
                Err(e) => tracing::debug!(%peer, error = %e, "haves stream ended"),
                Ok(()) => {}
            }
        });
    }
    Ok(())
}

/// Reads one haves stream to its end. The node's queue is bounded: while it is full, this
/// stops reading, and the multiplexer's flow control makes the sender wait in turn.
async fn read_haves(
    peer: PeerId,
    mut stream: libp2p::Stream,
    node: &mpsc::Sender<(PeerId, HaveMessage)>,
) -> io::Result<()> {
    loop {
        let message: HaveMessage = match read_header(&mut stream).await {
            Ok(message) => message,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        if node.send((peer, message)).await.is_err() {
            // The node is stopping.
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{self, NetEvent};
    use imiswarm_protocol::hash::Hash;

    /// Two connected nodes on loopback: `a` listens, `b` dialled it; both have identified.
    async fn pair() -> (
        (NetHandle, mpsc::Receiver<NetEvent>),
        (NetHandle, mpsc::Receiver<NetEvent>),
    ) {
        let config = net::test_config;
        let (a, mut a_events) = net::start(config(vec![])).await.unwrap();
        let addr = a.listen_addrs().await[0].clone();
        let (b, mut b_events) = net::start(config(vec![addr])).await.unwrap();
        for events in [&mut a_events, &mut b_events] {
            tokio::time::timeout(Duration::from_secs(20), async {
                while !matches!(events.recv().await, Some(NetEvent::PeerIdentified { .. })) {}
            })
            .await
            .expect("the nodes identify each other");
        }
        ((a, a_events), (b, b_events))
    }

    fn have(pieces: Vec<u32>) -> HaveMessage {
        HaveMessage {
            manifest_id: Hash::of(b"version"),
            pieces,
        }
    }

    async fn next(inbox: &mut mpsc::Receiver<(PeerId, HaveMessage)>) -> (PeerId, HaveMessage) {
        tokio::time::timeout(Duration::from_secs(20), inbox.recv())
            .await
            .expect("a have arrives")
            .expect("the inbox is open")
    }

    #[tokio::test]
    async fn haves_travel_in_order_over_one_stream() {
        let ((a, _a_events), (b, _b_events)) = pair().await;
        let (inbox_tx, mut inbox) = mpsc::channel(16);
        tokio::spawn(accept(a.streams(), inbox_tx));
        let sender = HaveSender::new(b.clone());
        for batch in [vec![1, 2], vec![7], vec![9, 400]] {
            sender.send(a.local_peer_id, have(batch));
        }
        for expected in [vec![1, 2], vec![7], vec![9, 400]] {
            let (from, message) = next(&mut inbox).await;
            assert_eq!(from, b.local_peer_id);
            assert_eq!(message, have(expected));
        }
        assert_eq!(
            sender.queues.lock().unwrap().len(),
            1,
            "one stream task for one peer"
        );
        // A forgotten peer (it went away) gets a new stream when it is told something again.
        sender.forget(a.local_peer_id);
        assert!(sender.queues.lock().unwrap().is_empty());
        sender.send(a.local_peer_id, have(vec![500]));
        assert_eq!(next(&mut inbox).await, (b.local_peer_id, have(vec![500])));
    }

    #[tokio::test]
    async fn malformed_message_closes_only_its_stream() {
        let ((a, _a_events), (b, _b_events)) = pair().await;
        let (inbox_tx, mut inbox) = mpsc::channel(16);
        tokio::spawn(accept(a.streams(), inbox_tx));
        // A length prefix within bounds followed by bytes that are no have message.
        let mut raw = b
            .streams()
            .open_stream(a.local_peer_id, HAVES)
            .await
            .unwrap();
        raw.write_all(&[0, 4, 0xde, 0xad, 0xbe, 0xef])
            .await
            .unwrap();
        // An oversized length is refused before anything is read or allocated.
        let mut big = b
            .streams()
            .open_stream(a.local_peer_id, HAVES)
            .await
            .unwrap();
        big.write_all(&[0xff, 0xff]).await.unwrap();
        // A proper sender still gets through on a stream of its own.
        HaveSender::new(b.clone()).send(a.local_peer_id, have(vec![5]));
        let (from, message) = next(&mut inbox).await;
        assert_eq!((from, message), (b.local_peer_id, have(vec![5])));
        assert!(inbox.try_recv().is_err(), "nothing came of the garbage");
    }

    #[tokio::test]
    async fn a_peer_without_haves_streams_gets_control_requests() {
        // `a` accepts no haves streams, as a node of an older release.
        let ((a, mut a_events), (b, _b_events)) = pair().await;
        HaveSender::new(b.clone()).send(a.local_peer_id, have(vec![3, 4]));
        let request = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Some(NetEvent::Request {
                    peer,
                    request: request @ ControlRequest::Have { .. },
                    channel,
                }) = a_events.recv().await
                {
                    a.respond(channel, imiswarm_protocol::wire::ControlResponse::Ack)
                        .await;
                    return (peer, request);
                }
            }
        })
        .await
        .expect("a control request arrives");
        assert_eq!(
            request,
            (
                b.local_peer_id,
                ControlRequest::Have {
                    manifest_id: Hash::of(b"version"),
                    pieces: vec![3, 4],
                }
            )
        );
    }
}
