//! `imiswarm`: parse, run, map the outcome to an exit code. Nothing else lives here.

use std::process::ExitCode;

use clap::Parser;
use imiswarm_node::Outcome;
use imiswarm_node::cli::{Cli, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let outcome = match imiswarm_node::commands::run(cli.command) {
        Ok(outcome) => outcome,
        Err(err) => {
            // One line for a person; the chain of causes keeps it precise.
            eprintln!("imiswarm: {err:#}");
            classify(&err)
        }
    };
    ExitCode::from(outcome.code())
}

/// A missing file is "not found" (3); anything else that went wrong is "failed" (1).
fn classify(err: &anyhow::Error) -> Outcome {
    use imiswarm_node::{keys::KeyError, repo::RepoError, store::StoreError};
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

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("IMISWARM_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
