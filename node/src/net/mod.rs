//! The libp2p swarm: one task owns it; the rest of the node talks to it through [`NetHandle`].
//!
//! Owns connections, gossip of signed announcements (validated here, before they are forwarded
//! to anyone), control request-response, peer identification (site and role), bans and the blocklist, and
//! trackerless discovery: Kademlia provider records (one per version, never per piece) and, when
//! enabled, mDNS on the local network. Piece
//! streams are opened and accepted through the `libp2p_stream::Control` the handle carries, so
//! bulk bytes never pass through this task. It must not decide what to fetch or store.
//!
//! ```text
//!   node ──Command (bounded, oneshot reply)──> swarm task ──> libp2p
//!   node <──NetEvent (bounded)─────────────── swarm task <── libp2p
//!   transfer ──open/accept streams──> libp2p_stream::Control (no detour through the task)
//! ```

pub mod codec;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use imiswarm_protocol::announce::{SignedAnnouncement, TrustedKeys};
use imiswarm_protocol::limits::{ANNOUNCE_TOPIC, MAX_ANNOUNCEMENT_SIZE};
use imiswarm_protocol::wire::{ControlRequest, ControlResponse, PeerRecord};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, allow_block_list, gossipsub, identify, identity, kad, mdns,
    ping,
};
use tokio::sync::{mpsc, oneshot};

use codec::{CONTROL, ControlCodec};

/// Protocol version that identify advertises; peers with another one are not imiswarm nodes.
pub const IDENTIFY_PROTOCOL: &str = "/imiswarm/id/1";
/// The piece stream protocol.
pub const PIECES: StreamProtocol = StreamProtocol::new(imiswarm_protocol::limits::PIECE_PROTOCOL);
/// Our own Kademlia DHT: a private protocol name keeps it apart from the public IPFS DHT.
pub const KAD: StreamProtocol = StreamProtocol::new("/imiswarm/kad/1");

/// What a node is, as its peers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The origin of versions (runs `seed`).
    Seed,
    Daemon,
    Fetch,
    /// A tracker: knows who holds what, serves no pieces.
    Tracker,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::Seed => "seed",
            Self::Daemon => "daemon",
            Self::Fetch => "fetch",
            Self::Tracker => "tracker",
        }
    }
}

/// A peer's self-description, carried in identify's agent version:
/// `imiswarm/<version> site=<site> role=<role>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub site: String,
    pub role: Role,
}

/// A connected, identified peer, as the status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectedPeer {
    pub peer: PeerId,
    pub info: PeerInfo,
    /// Established connections with it: one, or two after a simultaneous dial. More means the
    /// node dials peers it is already connected to.
    pub connections: u32,
}

fn agent_string(site: &str, role: Role) -> String {
    format!(
        "imiswarm/{} site={site} role={}",
        env!("CARGO_PKG_VERSION"),
        role.as_str()
    )
}

fn parse_agent(agent: &str) -> Option<PeerInfo> {
    let mut parts = agent.split(' ');
    if !parts.next()?.starts_with("imiswarm/") {
        return None;
    }
    let (mut site, mut role) = (None, None);
    for part in parts {
        match part.split_once('=') {
            Some(("site", s)) => site = Some(s.to_owned()),
            Some(("role", "seed")) => role = Some(Role::Seed),
            Some(("role", "daemon")) => role = Some(Role::Daemon),
            Some(("role", "fetch")) => role = Some(Role::Fetch),
            Some(("role", "tracker")) => role = Some(Role::Tracker),
            _ => {}
        }
    }
    Some(PeerInfo {
        site: site?,
        role: role?,
    })
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    gossipsub: gossipsub::Behaviour,
    control: request_response::Behaviour<ControlCodec>,
    stream: libp2p_stream::Behaviour,
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

/// Settings of the network layer.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub keypair: identity::Keypair,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub site: String,
    pub role: Role,
    pub trusted: TrustedKeys,
    /// Find peers on the local network with mDNS. Off by default: it multicasts on every
    /// interface, which only belongs on a LAN of cache servers and workstations.
    pub mdns: bool,
    /// Peers refused from the start (the blocklist file, see [`crate::blocklist`]).
    pub blocked: HashSet<PeerId>,
    /// When a silent peer's connection is closed; also the TCP sockets' user timeout.
    pub liveness: Liveness,
}

/// How a connection whose peer fell silent is found and closed.
///
/// libp2p's ping only reports a failure; it leaves the connection open. A peer that vanished
/// without a word (its machine lost power, a WAN link went down, a firewall dropped the flow)
/// would stay "connected" until TCP gave up on its retransmissions, many minutes later, and a
/// bootstrap peer behind such a connection would never be redialled. So a connection is closed
/// when libp2p reports a failed ping; the peer is dialled again as any gone peer is.
///
/// libp2p lets a connection's first failed ping pass in silence and reports the second. After
/// the first, the next ping needs a new stream, whose opening gives up after libp2p's
/// [`OPEN_STREAM_TIMEOUT`]: a silent peer is found within `2 * ping_every + timeout +
/// OPEN_STREAM_TIMEOUT`.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    pub ping_every: Duration,
    /// Long enough for a ping and its answer to wait behind full socket buffers of piece data
    /// on a slow link: closing a busy, healthy connection would cost more than a late close.
    pub timeout: Duration,
}

/// libp2p's `SubstreamProtocol` default, which its ping keeps.
pub const OPEN_STREAM_TIMEOUT: Duration = Duration::from_secs(10);

impl Liveness {
    /// How long a peer may be silent before its connection is closed, at the latest.
    pub fn detected_within(&self) -> Duration {
        2 * self.ping_every + self.timeout + OPEN_STREAM_TIMEOUT
    }
}

impl Default for Liveness {
    /// A silent peer is found within 50 s; 20 s covers a ping and its answer each behind
    /// 2 MiB of piece data on a 2 Mbit/s link.
    fn default() -> Self {
        Self {
            ping_every: Duration::from_secs(10),
            timeout: Duration::from_secs(20),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("the network task has stopped")]
    Stopped,
    #[error("request to {peer} failed: {reason}")]
    Request { peer: PeerId, reason: String },
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("building the swarm: {0}")]
    Build(String),
    #[error("publishing: {0}")]
    Publish(String),
}

/// What the network tells the node.
#[derive(Debug)]
pub enum NetEvent {
    /// A signed announcement from a trusted publisher (already verified).
    Announcement {
        signed: SignedAnnouncement,
        bytes: Vec<u8>,
    },
    /// A control request to answer with [`NetHandle::respond`].
    Request {
        peer: PeerId,
        request: ControlRequest,
        channel: ResponseChannel<ControlResponse>,
    },
    /// A peer connected and said who it is, with the addresses others can dial it at.
    PeerIdentified {
        peer: PeerId,
        info: PeerInfo,
        addrs: Vec<Multiaddr>,
    },
    /// The last connection to a peer closed.
    PeerGone { peer: PeerId },
}

enum Command {
    Publish {
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Request {
        peer: PeerId,
        request: ControlRequest,
        reply: oneshot::Sender<Result<ControlResponse, NetError>>,
    },
    Respond {
        channel: ResponseChannel<ControlResponse>,
        response: ControlResponse,
    },
    /// Dial a known peer at these addresses (from peer exchange or a tracker).
    DialAt {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    },
    /// Dial by peer id, at addresses a behaviour (Kademlia, mDNS) knows.
    DialPeer(PeerId),
    Ban {
        peer: PeerId,
        for_: Duration,
    },
    /// Replace the blocklist; the reply says it is in force.
    SetBlocklist {
        peers: HashSet<PeerId>,
        reply: oneshot::Sender<()>,
    },
    Peers {
        reply: oneshot::Sender<Vec<ConnectedPeer>>,
    },
    PeerRecords {
        reply: oneshot::Sender<Vec<PeerRecord>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Provide {
        key: imiswarm_protocol::Hash,
        start: bool,
    },
    Providers {
        key: imiswarm_protocol::Hash,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
}

/// Replaces the blocklist without keeping the network alive: see
/// [`NetHandle::blocklist_setter`].
#[derive(Debug, Clone)]
pub struct BlocklistSetter(mpsc::WeakSender<Command>);

impl BlocklistSetter {
    /// As [`NetHandle::set_blocklist`]: false once the network has stopped.
    pub async fn set(&self, peers: HashSet<PeerId>) -> bool {
        let Some(commands) = self.0.upgrade() else {
            return false;
        };
        let (reply, done) = oneshot::channel();
        commands
            .send(Command::SetBlocklist { peers, reply })
            .await
            .is_ok()
            && done.await.is_ok()
    }
}

/// A cloneable handle to the network task.
#[derive(Clone)]
pub struct NetHandle {
    commands: mpsc::Sender<Command>,
    streams: libp2p_stream::Control,
    pub local_peer_id: PeerId,
}

impl std::fmt::Debug for NetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetHandle")
            .field("local_peer_id", &self.local_peer_id)
            .finish()
    }
}

impl NetHandle {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// Gossips an encoded signed announcement.
    pub async fn publish(&self, bytes: Vec<u8>) -> Result<(), NetError> {
        self.call(|reply| Command::Publish { bytes, reply }).await?
    }

    /// Sends a control request and waits for the answer (bounded by the request timeout).
    pub async fn request(
        &self,
        peer: PeerId,
        request: ControlRequest,
    ) -> Result<ControlResponse, NetError> {
        self.call(|reply| Command::Request {
            peer,
            request,
            reply,
        })
        .await?
    }

    pub async fn respond(
        &self,
        channel: ResponseChannel<ControlResponse>,
        response: ControlResponse,
    ) {
        let _ = self
            .commands
            .send(Command::Respond { channel, response })
            .await;
    }

    /// Dials `peer` at `addrs`, unless it is connected or being dialled already.
    pub async fn dial_at(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if !addrs.is_empty() {
            let _ = self.commands.send(Command::DialAt { peer, addrs }).await;
        }
    }

    /// Dials a peer by id alone (found in the DHT, which knows its addresses).
    pub async fn dial_peer(&self, peer: PeerId) {
        let _ = self.commands.send(Command::DialPeer(peer)).await;
    }

    /// Disconnects a peer and refuses it for `for_`.
    pub async fn ban(&self, peer: PeerId, for_: Duration) {
        let _ = self.commands.send(Command::Ban { peer, for_ }).await;
    }

    /// Replaces the blocklist: listed peers are disconnected and refused until a later list
    /// leaves them out. Returns once the list is in force; false if the network has stopped.
    pub async fn set_blocklist(&self, peers: HashSet<PeerId>) -> bool {
        self.call(|reply| Command::SetBlocklist { peers, reply })
            .await
            .is_ok()
    }

    /// A handle that can only replace the blocklist, and does not keep the network task
    /// running (it stops when every [`NetHandle`] is gone).
    pub fn blocklist_setter(&self) -> BlocklistSetter {
        BlocklistSetter(self.commands.downgrade())
    }

    /// Connected and identified imiswarm peers.
    pub async fn peers(&self) -> Vec<ConnectedPeer> {
        self.call(|reply| Command::Peers { reply })
            .await
            .unwrap_or_default()
    }

    /// Dialable records of connected peers, for peer exchange.
    pub async fn peer_records(&self) -> Vec<PeerRecord> {
        self.call(|reply| Command::PeerRecords { reply })
            .await
            .unwrap_or_default()
    }

    /// This node's listen addresses, each ending in `/p2p/<peer id>`.
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.call(|reply| Command::ListenAddrs { reply })
            .await
            .unwrap_or_default()
    }

    /// Announces in the DHT that this node holds (part of) the version `id`, or stops.
    pub async fn provide(&self, id: imiswarm_protocol::Hash, start: bool) {
        let _ = self
            .commands
            .send(Command::Provide { key: id, start })
            .await;
    }

    /// Looks up the DHT's holders of version `id` (they are dialable by peer id afterwards:
    /// Kademlia knows their addresses).
    pub async fn providers(&self, id: imiswarm_protocol::Hash) -> Vec<PeerId> {
        self.call(|reply| Command::Providers { key: id, reply })
            .await
            .unwrap_or_default()
    }

    /// A control for opening and accepting piece streams.
    pub fn streams(&self) -> libp2p_stream::Control {
        self.streams.clone()
    }
}

/// How long to wait for a control answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections stay open while idle, so the swarm's mesh does not churn between versions.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How often to redial bootstrap peers that are not connected.
const REDIAL_EVERY: Duration = Duration::from_secs(10);
/// A provider lookup gives up after this long; the node asks again on its next round.
const KAD_QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the DHT routing table is refreshed.
const KAD_BOOTSTRAP_EVERY: Duration = Duration::from_secs(300);

/// TCP with Noise and Yamux, as libp2p's `with_tcp` builds it, plus `TCP_USER_TIMEOUT` on every
/// socket: data unacknowledged for `unacknowledged_for` fails the connection.
///
/// Closing a connection ([`Liveness`]) is graceful: yamux first writes out what it has queued.
/// On a dead link with piece data queued, that write would wait until TCP gave up its
/// retransmissions (about 15 minutes), and the connection would count as established all the
/// while. With the user timeout the write fails, and the connection goes at once.
fn tcp_transport(
    key: &identity::Keypair,
    unacknowledged_for: Duration,
) -> Result<
    libp2p::core::transport::Boxed<(PeerId, libp2p::core::muxing::StreamMuxerBox)>,
    Box<dyn std::error::Error + Send + Sync>,
> {
    use libp2p::Transport as _;
    let noise = libp2p::noise::Config::new(key)?;
    Ok(
        libp2p::tcp::tokio::Transport::new(libp2p::tcp::Config::default())
            .map(move |stream: libp2p::tcp::tokio::TcpStream, _| {
                if let Err(e) =
                    socket2::SockRef::from(&stream.0).set_tcp_user_timeout(Some(unacknowledged_for))
                {
                    tracing::debug!(error = %e, "TCP_USER_TIMEOUT not set");
                }
                stream
            })
            .upgrade(libp2p::core::upgrade::Version::V1Lazy)
            .authenticate(noise)
            .multiplex(libp2p::yamux::Config::default())
            .map(|(peer, muxer), _| (peer, libp2p::core::muxing::StreamMuxerBox::new(muxer)))
            .boxed(),
    )
}

/// Builds the swarm, starts listening and spawns the task that owns it.
pub async fn start(config: NetConfig) -> Result<(NetHandle, mpsc::Receiver<NetEvent>), NetError> {
    let agent = agent_string(&config.site, config.role);
    let unacknowledged_for = config.liveness.detected_within();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_quic()
        .with_other_transport(|key| tcp_transport(key, unacknowledged_for))
        .map_err(|e| NetError::Build(e.to_string()))?
        .with_behaviour(
            |key| -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
                let gossip_config = gossipsub::ConfigBuilder::default()
                    .validate_messages()
                    .max_transmit_size(MAX_ANNOUNCEMENT_SIZE + 512)
                    // Content-addressed ids: the same announcement from two routes is one message.
                    .message_id_fn(|m: &gossipsub::Message| {
                        gossipsub::MessageId::from(blake3::hash(&m.data).as_bytes().to_vec())
                    })
                    .build()?;
                Ok(Behaviour {
                    identify: identify::Behaviour::new(
                        identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                            .with_agent_version(agent.clone()),
                    ),
                    ping: ping::Behaviour::new(
                        ping::Config::new()
                            .with_interval(config.liveness.ping_every)
                            .with_timeout(config.liveness.timeout),
                    ),
                    gossipsub: gossipsub::Behaviour::new(
                        gossipsub::MessageAuthenticity::Signed(key.clone()),
                        gossip_config,
                    )?,
                    control: request_response::Behaviour::with_codec(
                        ControlCodec,
                        [(CONTROL, ProtocolSupport::Full)],
                        request_response::Config::default().with_request_timeout(REQUEST_TIMEOUT),
                    ),
                    stream: libp2p_stream::Behaviour::new(),
                    blocked: allow_block_list::Behaviour::default(),
                    kad: {
                        let mut config = kad::Config::new(KAD);
                        config.set_query_timeout(KAD_QUERY_TIMEOUT);
                        // Bootstrapped from our own tick once the routing table has a peer:
                        // libp2p's timer warns at every start of a node that knows nobody yet.
                        config.set_periodic_bootstrap_interval(None);
                        let peer = key.public().to_peer_id();
                        let mut kad = kad::Behaviour::with_config(
                            peer,
                            kad::store::MemoryStore::new(peer),
                            config,
                        );
                        // Server mode from the start: a cache server on a LAN has no confirmed
                        // external address, which is what automatic mode waits for.
                        kad.set_mode(Some(kad::Mode::Server));
                        kad
                    },
                    mdns: Toggle::from(if config.mdns {
                        Some(mdns::tokio::Behaviour::new(
                            mdns::Config::default(),
                            key.public().to_peer_id(),
                        )?)
                    } else {
                        None
                    }),
                })
            },
        )
        .map_err(|e| NetError::Build(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_TIMEOUT))
        .build();

    let topic = gossipsub::IdentTopic::new(ANNOUNCE_TOPIC);
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&topic)
        .map_err(|e| NetError::Build(e.to_string()))?;
    for peer in &config.blocked {
        swarm.behaviour_mut().blocked.block_peer(*peer);
    }
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }
    for addr in &config.bootstrap {
        if let Err(e) = swarm.dial(dial_opts(addr.clone())) {
            tracing::warn!(%addr, error = %e, "cannot dial bootstrap peer");
        }
    }

    let (commands_tx, commands_rx) = mpsc::channel(256);
    let (events_tx, events_rx) = mpsc::channel(1024);
    let handle = NetHandle {
        commands: commands_tx,
        streams: swarm.behaviour().stream.new_control(),
        local_peer_id: *swarm.local_peer_id(),
    };
    let task = SwarmTask {
        swarm,
        topic,
        trusted: config.trusted,
        bootstrap: config.bootstrap,
        events: events_tx,
        pending: HashMap::new(),
        peers: HashMap::new(),
        connections: HashMap::new(),
        bootstrap_peers: HashMap::new(),
        listen_addrs: Vec::new(),
        bans: Vec::new(),
        listed: config.blocked,
        listening: None,
        provider_queries: HashMap::new(),
        kad_bootstrapped: None,
    };
    // Wait until every listener has an address, so callers can print or write them.
    let (ready_tx, ready_rx) = oneshot::channel();
    tokio::spawn(task.run(commands_rx, config.listen.len(), ready_tx));
    let _ = ready_rx.await;
    Ok((handle, events_rx))
}

struct KnownPeer {
    info: PeerInfo,
    addrs: Vec<Multiaddr>,
}

struct SwarmTask {
    swarm: libp2p::Swarm<Behaviour>,
    topic: gossipsub::IdentTopic,
    trusted: TrustedKeys,
    bootstrap: Vec<Multiaddr>,
    /// The peer a dial reached, for bootstrap addresses that name none (`/ip4/../tcp/..`).
    bootstrap_peers: HashMap<Multiaddr, PeerId>,
    events: mpsc::Sender<NetEvent>,
    pending: HashMap<
        request_response::OutboundRequestId,
        oneshot::Sender<Result<ControlResponse, NetError>>,
    >,
    peers: HashMap<PeerId, KnownPeer>,
    /// Established connections per peer (identified or not).
    connections: HashMap<PeerId, u32>,
    listen_addrs: Vec<Multiaddr>,
    bans: Vec<(Instant, PeerId)>,
    /// The blocklist in force. A peer stays blocked while it is listed or banned.
    listed: HashSet<PeerId>,
    listening: Option<(usize, oneshot::Sender<()>)>,
    /// Provider lookups in progress: what was found so far, and who waits.
    provider_queries: HashMap<kad::QueryId, (HashSet<PeerId>, oneshot::Sender<Vec<PeerId>>)>,
    kad_bootstrapped: Option<Instant>,
}

impl SwarmTask {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        listeners: usize,
        ready: oneshot::Sender<()>,
    ) {
        self.listening = Some((listeners, ready));
        if listeners == 0
            && let Some((_, ready)) = self.listening.take()
        {
            let _ = ready.send(());
        }
        let mut tick = tokio::time::interval(REDIAL_EVERY);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event).await,
                command = commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break, // every handle dropped: the node is shutting down
                },
                _ = tick.tick() => self.on_tick(),
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let (expired, kept): (Vec<_>, Vec<_>) =
            self.bans.drain(..).partition(|(until, _)| *until <= now);
        self.bans = kept;
        for (_, peer) in expired {
            if !self.is_refused(&peer) {
                self.swarm.behaviour_mut().blocked.unblock_peer(peer);
            }
        }
        let kad_due = self
            .kad_bootstrapped
            .is_none_or(|t| t.elapsed() >= KAD_BOOTSTRAP_EVERY);
        if kad_due && self.swarm.behaviour_mut().kad.bootstrap().is_ok() {
            self.kad_bootstrapped = Some(now);
        }
        self.dial_bootstrap();
    }

    /// Dials the bootstrap addresses whose peer is away.
    fn dial_bootstrap(&mut self) {
        let due = bootstrap_due(&self.bootstrap, &self.bootstrap_peers, |peer| {
            self.swarm.is_connected(peer)
        });
        for addr in due {
            let _ = self.swarm.dial(dial_opts(addr));
        }
    }

    /// Whether `peer` must stay blocked: listed, or under a ban that has not expired.
    fn is_refused(&self, peer: &PeerId) -> bool {
        self.listed.contains(peer) || self.bans.iter().any(|(_, p)| p == peer)
    }

    fn set_blocklist(&mut self, peers: HashSet<PeerId>) {
        let old = std::mem::replace(&mut self.listed, peers);
        let mut lifted = false;
        for peer in old.difference(&self.listed) {
            if !self.is_refused(peer) {
                lifted |= self.swarm.behaviour_mut().blocked.unblock_peer(*peer);
            }
        }
        // Blocking closes the peer's connections.
        for peer in &self.listed {
            self.swarm.behaviour_mut().blocked.block_peer(*peer);
        }
        if lifted {
            // A bootstrap peer just taken off the list is back at once, not at the next redial.
            self.dial_bootstrap();
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Publish { bytes, reply } => {
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(self.topic.clone(), bytes)
                    .map(|_| ())
                    .map_err(|e| NetError::Publish(e.to_string()));
                let _ = reply.send(result);
            }
            Command::Request {
                peer,
                request,
                reply,
            } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .control
                    .send_request(&peer, request);
                self.pending.insert(id, reply);
            }
            Command::Respond { channel, response } => {
                // Err: the requester gave up meanwhile; nothing to do.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .control
                    .send_response(channel, response);
            }
            Command::DialAt { peer, addrs } => {
                let opts = DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                if let Err(e) = self.swarm.dial(opts) {
                    tracing::trace!(%peer, error = %e, "not dialled");
                }
            }
            Command::DialPeer(peer) => {
                if let Err(e) = self.swarm.dial(peer) {
                    tracing::debug!(%peer, error = %e, "dial failed");
                }
            }
            Command::Ban { peer, for_ } => {
                tracing::warn!(%peer, seconds = for_.as_secs(), "banning peer");
                self.swarm.behaviour_mut().blocked.block_peer(peer);
                self.bans.push((Instant::now() + for_, peer));
            }
            Command::SetBlocklist { peers, reply } => {
                self.set_blocklist(peers);
                let _ = reply.send(());
            }
            Command::Peers { reply } => {
                let _ = reply.send(
                    self.peers
                        .iter()
                        .map(|(p, k)| ConnectedPeer {
                            peer: *p,
                            info: k.info.clone(),
                            connections: self.connections.get(p).copied().unwrap_or(0),
                        })
                        .collect(),
                );
            }
            Command::PeerRecords { reply } => {
                let records = self
                    .peers
                    .iter()
                    .take(imiswarm_protocol::limits::MAX_PEER_RECORDS)
                    .map(|(peer, known)| PeerRecord {
                        peer_id: peer.to_bytes(),
                        addrs: known
                            .addrs
                            .iter()
                            .take(imiswarm_protocol::limits::MAX_ADDRS_PER_PEER)
                            .map(|a| a.to_vec())
                            .filter(|a| a.len() <= imiswarm_protocol::limits::MAX_ADDR_LEN)
                            .collect(),
                    })
                    .collect();
                let _ = reply.send(records);
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.listen_addrs.clone());
            }
            Command::Provide { key, start } => {
                let key = kad::RecordKey::new(key.as_bytes());
                let kad = &mut self.swarm.behaviour_mut().kad;
                if start {
                    if let Err(e) = kad.start_providing(key) {
                        tracing::warn!(error = %e, "cannot store a provider record");
                    }
                } else {
                    kad.stop_providing(&key);
                }
            }
            Command::Providers { key, reply } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(kad::RecordKey::new(key.as_bytes()));
                self.provider_queries.insert(id, (HashSet::new(), reply));
            }
        }
    }

    async fn emit(&mut self, event: NetEvent) {
        // Bounded: if the node falls behind, the swarm waits rather than growing a queue.
        let _ = self.events.send(event).await;
    }

    async fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let full = address.with(Protocol::P2p(*self.swarm.local_peer_id()));
                tracing::info!(addr = %full, "listening");
                self.listen_addrs.push(full);
                if let Some((left, _)) = &mut self.listening {
                    *left = left.saturating_sub(1);
                    if *left == 0
                        && let Some((_, ready)) = self.listening.take()
                    {
                        let _ = ready.send(());
                    }
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                endpoint,
                ..
            } => {
                self.connections.insert(peer_id, num_established.get());
                if let libp2p::core::ConnectedPoint::Dialer { address, .. } = endpoint {
                    // The address as dialled, which may have gained the peer's id.
                    let mut dialled = address;
                    if matches!(dialled.iter().last(), Some(Protocol::P2p(_))) {
                        dialled.pop();
                    }
                    if self.bootstrap.contains(&dialled) {
                        self.bootstrap_peers.insert(dialled, peer_id);
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                ..
            } => {
                if num_established > 0 {
                    self.connections.insert(peer_id, num_established);
                } else {
                    self.connections.remove(&peer_id);
                    if self.peers.remove(&peer_id).is_some() {
                        self.emit(NetEvent::PeerGone { peer: peer_id }).await;
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(?peer_id, %error, "outgoing connection failed");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => self.on_identified(peer_id, info).await,
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
                self.on_gossip(propagation_source, message_id, message)
                    .await
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(failure),
            })) if !matches!(failure, ping::Failure::Unsupported) => {
                // (A peer without ping is not one of ours; identify deals with that.)
                tracing::info!(%peer, %failure, "peer fell silent: closing the connection");
                self.swarm.close_connection(connection);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Control(event)) => self.on_control(event).await,
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad(event),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in found {
                    if peer != *self.swarm.local_peer_id() {
                        by_peer.entry(peer).or_default().push(addr);
                    }
                }
                for (peer, addrs) in by_peer {
                    tracing::debug!(%peer, ?addrs, "found on the local network");
                    let opts = DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    let _ = self.swarm.dial(opts);
                }
            }
            _ => {}
        }
    }

    async fn on_identified(&mut self, peer: PeerId, info: identify::Info) {
        if info.protocol_version != IDENTIFY_PROTOCOL {
            tracing::debug!(%peer, version = %info.protocol_version, "not an imiswarm peer");
            let _ = self.swarm.disconnect_peer_id(peer);
            return;
        }
        let Some(peer_info) = parse_agent(&info.agent_version) else {
            tracing::debug!(%peer, agent = %info.agent_version, "unparsable agent");
            return;
        };
        // Keep only addresses others can dial: loopback is fine for local swarms, but an
        // unspecified address (0.0.0.0) is not.
        let addrs: Vec<Multiaddr> = info
            .listen_addrs
            .into_iter()
            .filter(|a| {
                !a.iter().any(|p| match p {
                    Protocol::Ip4(ip) => ip.is_unspecified(),
                    Protocol::Ip6(ip) => ip.is_unspecified(),
                    _ => false,
                })
            })
            .collect();
        let speaks_kad = info.protocols.contains(&KAD);
        for addr in &addrs {
            self.swarm.add_peer_address(peer, addr.clone());
            if speaks_kad {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer, addr.clone());
            }
        }
        let new = self
            .peers
            .insert(
                peer,
                KnownPeer {
                    info: peer_info.clone(),
                    addrs: addrs.clone(),
                },
            )
            .is_none();
        if new {
            tracing::debug!(%peer, site = %peer_info.site, role = ?peer_info.role, "peer identified");
            self.emit(NetEvent::PeerIdentified {
                peer,
                info: peer_info,
                addrs,
            })
            .await;
        }
    }

    fn on_kad(&mut self, event: kad::Event) {
        let kad::Event::OutboundQueryProgressed {
            id, result, step, ..
        } = event
        else {
            return;
        };
        let kad::QueryResult::GetProviders(result) = result else {
            return;
        };
        if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = result
            && let Some((found, _)) = self.provider_queries.get_mut(&id)
        {
            found.extend(providers);
        }
        // One holder is enough to start from: peer exchange and the holders' own haves bring
        // the rest, so the lookup ends at its first answer instead of walking the whole DHT.
        let enough = self
            .provider_queries
            .get(&id)
            .is_some_and(|(found, _)| found.iter().any(|p| p != self.swarm.local_peer_id()));
        if (step.last || enough)
            && let Some((found, reply)) = self.provider_queries.remove(&id)
        {
            if !step.last
                && let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id)
            {
                query.finish();
            }
            let me = *self.swarm.local_peer_id();
            let _ = reply.send(found.into_iter().filter(|p| *p != me).collect());
        }
    }

    async fn on_gossip(
        &mut self,
        source: PeerId,
        id: gossipsub::MessageId,
        message: gossipsub::Message,
    ) {
        // Validate before anything else sees it: unsigned, untrusted or malformed
        // announcements are rejected here and never forwarded.
        let verdict = self.trusted.decode_and_verify(&message.data);
        let acceptance = match &verdict {
            Ok(_) => gossipsub::MessageAcceptance::Accept,
            Err(e) => {
                tracing::warn!(%source, error = %e, "rejected announcement");
                gossipsub::MessageAcceptance::Reject
            }
        };
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&id, &source, acceptance);
        if let Ok(signed) = verdict {
            self.emit(NetEvent::Announcement {
                signed,
                bytes: message.data,
            })
            .await;
        }
    }

    async fn on_control(
        &mut self,
        event: request_response::Event<ControlRequest, ControlResponse>,
    ) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                self.emit(NetEvent::Request {
                    peer,
                    request,
                    channel,
                })
                .await;
            }
            Event::Message {
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(reply) = self.pending.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(reply) = self.pending.remove(&request_id) {
                    let _ = reply.send(Err(NetError::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound control request failed");
            }
            Event::ResponseSent { .. } => {}
        }
    }
}

/// How to dial an address: once per peer when it names one. Peer exchange, trackers, mDNS
/// and the bootstrap list name the same peers again and again, and a connection that is not
/// needed costs a Noise handshake and a full set of protocol handlers polled for its life (a
/// swarm of seventeen once held twenty connections per pair of peers).
fn dial_opts(addr: Multiaddr) -> DialOpts {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => DialOpts::peer_id(peer)
            .addresses(vec![addr])
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build(),
        _ => DialOpts::unknown_peer_id().address(addr).build(),
    }
}

/// Parses a peer record from peer exchange into dialable addresses.
pub fn record_addrs(record: &PeerRecord) -> Option<(PeerId, Vec<Multiaddr>)> {
    let peer = PeerId::from_bytes(&record.peer_id).ok()?;
    let addrs = record
        .addrs
        .iter()
        .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
        .collect();
    Some((peer, addrs))
}

/// Makes the libp2p identity from a 32-byte ed25519 seed (the node key file's content).
pub fn keypair_from_seed(seed: [u8; 32]) -> identity::Keypair {
    // ed25519_from_bytes only fails for a slice that is not 32 bytes long.
    identity::Keypair::ed25519_from_bytes(seed).expect("a 32-byte seed is a valid ed25519 key")
}

/// The bootstrap addresses to dial now: those whose peer, named in the address or reached by
/// an earlier dial to it, is not connected. Without the second, an address that names no peer
/// would get a new connection at every redial round while the first is alive.
fn bootstrap_due(
    bootstrap: &[Multiaddr],
    learned: &HashMap<Multiaddr, PeerId>,
    is_connected: impl Fn(&PeerId) -> bool,
) -> Vec<Multiaddr> {
    bootstrap
        .iter()
        .filter(|addr| {
            let peer = match addr.iter().last() {
                Some(Protocol::P2p(peer)) => Some(peer),
                _ => learned.get(*addr).copied(),
            };
            !peer.is_some_and(|p| is_connected(&p))
        })
        .cloned()
        .collect()
}

/// A node on a fresh key, listening on a free loopback port, for tests.
#[cfg(test)]
pub(crate) fn test_config(bootstrap: Vec<Multiaddr>) -> NetConfig {
    NetConfig {
        keypair: identity::Keypair::generate_ed25519(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("a valid address")],
        bootstrap,
        site: "lab".into(),
        role: Role::Daemon,
        trusted: TrustedKeys::new([]),
        mdns: false,
        blocked: HashSet::new(),
        liveness: Liveness::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bootstrap_address_is_redialled_only_while_its_peer_is_away() {
        let named_peer = PeerId::random();
        let reached = PeerId::random();
        let named: Multiaddr = format!("/ip4/10.0.0.1/tcp/4001/p2p/{named_peer}")
            .parse()
            .unwrap();
        let bare: Multiaddr = "/ip4/10.0.0.2/tcp/4001".parse().unwrap();
        let never: Multiaddr = "/ip4/10.0.0.3/tcp/4001".parse().unwrap();
        let bootstrap = [named.clone(), bare.clone(), never.clone()];
        let learned = HashMap::from([(bare.clone(), reached)]);

        let nobody = bootstrap_due(&bootstrap, &learned, |_| false);
        assert_eq!(
            nobody, bootstrap,
            "nobody connected: every address is dialled"
        );
        let everybody = bootstrap_due(&bootstrap, &learned, |_| true);
        assert_eq!(
            everybody,
            std::slice::from_ref(&never),
            "an address that reached nobody yet is dialled; the others are connected"
        );
        let only_reached = bootstrap_due(&bootstrap, &learned, |p| *p == reached);
        assert_eq!(only_reached, [named, never]);
    }

    async fn connected(net: &NetHandle, peer: PeerId, want: bool) {
        connected_within(net, peer, want, Duration::from_secs(20)).await
    }

    async fn connected_within(net: &NetHandle, peer: PeerId, want: bool, within: Duration) {
        tokio::time::timeout(within, async {
            while net.peers().await.iter().any(|p| p.peer == peer) != want {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("still connected: {}", !want));
    }

    #[tokio::test]
    async fn a_listed_peer_is_dropped_and_refused_until_the_list_leaves_it_out() {
        let config = test_config;
        let (a, _a_events) = start(config(vec![])).await.unwrap();
        let addr = a.listen_addrs().await[0].clone();
        let (b, _b_events) = start(config(vec![addr.clone()])).await.unwrap();
        connected(&a, b.local_peer_id, true).await;

        assert!(b.set_blocklist(HashSet::from([a.local_peer_id])).await);
        connected(&a, b.local_peer_id, false).await;
        connected(&b, a.local_peer_id, false).await;
        // Refused both ways: b's own dial, and a's dial of b.
        b.dial_at(a.local_peer_id, vec![addr]).await;
        let b_addr = b.listen_addrs().await[0].clone();
        a.dial_at(b.local_peer_id, vec![b_addr]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(b.peers().await.is_empty(), "a listed peer got back in");

        // Off the list, the bootstrap peer is dialled again at once (the redial is 10 s away).
        assert!(b.set_blocklist(HashSet::new()).await);
        connected_within(&b, a.local_peer_id, true, REDIAL_EVERY / 2).await;

        // A node started with the list never connects to a listed bootstrap peer.
        let mut listed = config(vec![a.listen_addrs().await[0].clone()]);
        listed.blocked = HashSet::from([a.local_peer_id]);
        let (c, _c_events) = start(listed).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(c.peers().await.is_empty(), "dialled a listed peer");
    }

    /// A TCP relay that forwards both ways until `silent` turns true; then it reads and drops
    /// what each side sends, answering nothing and closing nothing: a peer behind it falls
    /// silent, as behind a dead WAN link. Sends a connection's number (from 0, in the order
    /// accepted) on `closed` once both its ends have closed.
    async fn silenceable_relay(
        to: std::net::SocketAddr,
        silent: tokio::sync::watch::Receiver<bool>,
        closed: mpsc::UnboundedSender<usize>,
    ) -> std::net::SocketAddr {
        async fn drain(socket: &mut tokio::net::TcpStream) {
            use tokio::io::AsyncReadExt as _;
            let mut sink = vec![0; 64 * 1024];
            while socket.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            // Bounded: the test makes a handful of connections.
            for number in 0..16 {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let (mut silent, closed) = (silent.clone(), closed.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
                        _ = silent.wait_for(|s| *s) => {}
                    }
                    tokio::join!(drain(&mut inbound), drain(&mut outbound));
                    let _ = closed.send(number);
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_peer_that_falls_silent_is_disconnected() {
        // Two late answers in a row on a loaded machine would close a healthy connection.
        let quick = Liveness {
            ping_every: Duration::from_millis(200),
            timeout: Duration::from_secs(2),
        };
        let mut config = test_config(vec![]);
        config.liveness = quick;
        let (a, _a_events) = start(config).await.unwrap();
        let a_port = a.listen_addrs().await[0]
            .iter()
            .find_map(|p| match p {
                Protocol::Tcp(port) => Some(port),
                _ => None,
            })
            .unwrap();
        let (silence, silent) = tokio::sync::watch::channel(false);
        let (closed_tx, mut closed) = mpsc::unbounded_channel();
        let relay = silenceable_relay(([127, 0, 0, 1], a_port).into(), silent, closed_tx).await;
        let via_relay: Multiaddr = format!(
            "/ip4/127.0.0.1/tcp/{}/p2p/{}",
            relay.port(),
            a.local_peer_id
        )
        .parse()
        .unwrap();
        let mut config = test_config(vec![via_relay]);
        config.liveness = quick;
        // Not listening, so `a` cannot reach it but through the relay.
        config.listen.clear();
        let (b, _b_events) = start(config).await.unwrap();
        connected(&a, b.local_peer_id, true).await;
        connected(&b, a.local_peer_id, true).await;
        // Healthy, the connection outlives many pings.
        tokio::time::sleep(quick.ping_every * 10).await;
        assert!(b.peers().await.iter().any(|p| p.peer == a.local_peer_id));

        silence.send_replace(true);
        // The relay still takes every byte, so TCP sees nothing wrong: only the unanswered
        // pings can tell. (Once apart, `b` may dial `a` directly at an address identify taught
        // it, so the test watches the relayed connection, not whether the peers are connected.)
        let within = quick.detected_within() + Duration::from_secs(3);
        let first = tokio::time::timeout(within, closed.recv())
            .await
            .expect("the silent connection is still open");
        assert_eq!(
            first,
            Some(0),
            "the relayed connection is the first to close"
        );
    }

    #[test]
    fn agent_round_trip() {
        let a = agent_string("lab-a", Role::Seed);
        assert_eq!(
            parse_agent(&a),
            Some(PeerInfo {
                site: "lab-a".into(),
                role: Role::Seed
            })
        );
        assert_eq!(parse_agent("rust-libp2p/0.1"), None);
        assert_eq!(
            parse_agent("imiswarm/0.1 role=daemon"),
            None,
            "site missing"
        );
    }
}
