//! `imiswarm-testnet`: run a swarm locally and measure it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "imiswarm-testnet",
    version,
    about = "Runs an imiswarm swarm locally and measures it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build a sample image, publish it and distribute it, then report against the bound.
    Demo {
        /// Work in this directory (kept afterwards) instead of a temporary one.
        #[arg(long)]
        workdir: Option<PathBuf>,
    },
    /// Run a scenario (a file, or the name of a shipped one: rollout, bootstorm, update,
    /// churn, bad-peer, partition) and report against the bound and a central HTTP server.
    Run(imiswarm_testnet::cli::RunArgs),
    /// The distribution benchmark: a rollout to N receivers, reported as T/T_min and against
    /// one central HTTP server (netns backend; process where there is no root).
    Bench(imiswarm_testnet::cli::BenchArgs),
    /// Simulate a rollout in virtual time with the real piece scheduler.
    Simulate(imiswarm_testnet::demo::SimulateArgs),
    /// Run `imiswarm` itself with these arguments (how the testnet starts its nodes, so one
    /// binary runs a whole swarm).
    #[command(hide = true)]
    Node {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Node { args } => {
            let argv = std::iter::once("imiswarm".into()).chain(args);
            return ExitCode::from(imiswarm_node::main_with(argv));
        }
        Command::Demo { workdir } => imiswarm_testnet::demo::run_demo(workdir),
        Command::Simulate(args) => imiswarm_testnet::demo::run_simulate(&args),
        Command::Run(args) => imiswarm_testnet::cli::run(&args),
        Command::Bench(args) => imiswarm_testnet::cli::bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("imiswarm-testnet: {err:#}");
            ExitCode::FAILURE
        }
    }
}
