//! # imiswarm-node
//!
//! The `imiswarm` binary's library: everything that touches a disk, a terminal or (later) the
//! network. Decisions that need neither live in `imiswarm-protocol`.
//!
//! | module | owns |
//! |---|---|
//! | [`cli`] | the command line: what the user typed, checked before anything is built |
//! | [`commands`] | one function per subcommand, returning an [`Outcome`] |
//! | [`keys`] | key files |
//! | [`repo`] | the image repository layout, in-place hashing, directory verification |
//! | [`progress`] | progress bars for people, tracing for machines |
//! | [`config`] | node settings: TOML file, flags, environment |
//! | [`net`] | the libp2p swarm, owned by one task, and its handle |
//! | [`store`] | partial and complete versions on disk, crash-safe progress |
//! | [`library`] | the versions this node holds, shared by uploads and downloads |
//! | [`transfer`] | downloads (the scheduler on real streams), uploads, rate limits |
//! | [`node`] | a swarm member's decisions: what to fetch, how to answer peers |
//! | [`member`] | starting a member: identity, network, repository, uploader |
//! | [`swarm_commands`] | `daemon`, `seed`, `fetch`, `status` |
//! | [`api`] | the local control API: `/status` and `/metrics` |

pub mod api;
pub mod cli;
pub mod commands;
pub mod config;
pub mod keys;
pub mod lease;
pub mod library;
pub mod member;
pub mod net;
pub mod node;
pub mod progress;
pub mod repo;
pub mod store;
pub mod swarm_commands;
pub mod tracker_service;
pub mod transfer;

/// How a command ended, as the process exit code tells scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 0: done.
    Done,
    /// 1: failed (I/O, a corrupt file, a mismatch).
    Failed,
    /// 2: bad usage (clap uses 2 as well).
    Usage,
    /// 3: not found, or not trusted.
    NotFound,
}

impl Outcome {
    pub fn code(self) -> u8 {
        match self {
            Self::Done => 0,
            Self::Failed => 1,
            Self::Usage => 2,
            Self::NotFound => 3,
        }
    }
}
