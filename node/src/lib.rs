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
//! | [`tracker_service`] | `tracker`: the tracker library on a libp2p node |
//! | [`lease`] | leases that keep a version in use away from retention |

pub mod api;
pub mod blocklist;
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

/// The whole `imiswarm` program on already-split arguments (the first is the program name):
/// parse, set up logging, run, and map the outcome to an exit code. The `imiswarm` binary is
/// this; `imiswarm-testnet node ...` is this too, so one binary can run a whole test swarm.
pub fn main_with(args: impl IntoIterator<Item = std::ffi::OsString>) -> u8 {
    use clap::Parser;
    let cli = cli::Cli::parse_from(args);
    init_tracing(cli.log_format);
    let outcome = match commands::run(cli.command) {
        Ok(outcome) => outcome,
        Err(err) => {
            // One line for a person; the chain of causes keeps it precise.
            eprintln!("imiswarm: {err:#}");
            classify(&err)
        }
    };
    outcome.code()
}

/// A missing file is "not found" (3); anything else that went wrong is "failed" (1).
fn classify(err: &anyhow::Error) -> Outcome {
    use crate::{keys::KeyError, repo::RepoError, store::StoreError};
    let not_found = err.chain().any(|cause| {
        let io = cause
            .downcast_ref::<std::io::Error>()
            .or_else(|| match cause.downcast_ref::<RepoError>() {
                Some(RepoError::Io { error, .. }) => Some(error),
                _ => None,
            })
            .or_else(|| match cause.downcast_ref::<StoreError>() {
                Some(StoreError::Io { error, .. }) => Some(error),
                _ => None,
            })
            .or_else(|| match cause.downcast_ref::<KeyError>() {
                Some(KeyError::Read { error, .. }) => Some(error),
                _ => None,
            });
        io.is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    });
    if not_found {
        Outcome::NotFound
    } else {
        Outcome::Failed
    }
}

pub fn init_tracing(format: cli::LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("IMISWARM_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        cli::LogFormat::Text => builder.init(),
        cli::LogFormat::Json => builder.json().init(),
    }
}
