//! `imiswarm`: parse, run, map the outcome to an exit code. Nothing else lives here.

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(imiswarm_node::main_with(std::env::args_os()))
}
