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

pub mod cli;
pub mod commands;
pub mod keys;
pub mod progress;
pub mod repo;

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
