//! The `sluice` command line.

use clap::Parser;

/// Pull-mode GitOps agent for Kubernetes: agentk-compatible configuration, server-side
/// apply, and WebAssembly plugins between git and the cluster.
#[derive(Debug, Parser)]
#[command(name = "sluice", version = sluice::VERSION, about, long_about = None)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
