//! `tollgate-load`: runs [`tollgate_loadtest::load::run`] from the command line and prints the
//! report as a human summary, or as one JSON object with `--json`.

#![forbid(unsafe_code)]

use clap::Parser;
use tollgate_loadtest::load::{self, LoadOpts};

/// Open- or closed-loop HTTP load for OpenAI-style endpoints, with HDR latency percentiles.
#[derive(Parser, Debug)]
#[command(name = "tollgate-load", version)]
struct Cli {
    #[command(flatten)]
    load: LoadOpts,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let report = load::run(cli.load).await?;
    if cli.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
