//! `tollgate-mock`: runs the mock OpenAI / Azure OpenAI backend ([`tollgate_loadtest::mock`])
//! on `--listen`, prints `listening on IP:PORT` once bound, and exits on SIGTERM or ctrl-c.

#![forbid(unsafe_code)]

use std::io::Write as _;

use anyhow::Context as _;
use clap::Parser;
use tollgate_loadtest::mock::{self, MockOpts};

/// A mock OpenAI / Azure OpenAI backend with exact usage and PTU-like rate limiting.
#[derive(Parser, Debug)]
#[command(name = "tollgate-mock", version)]
struct Cli {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: String,
    /// Name reported at /stats and in the x-mock-backend header.
    #[arg(long, default_value = "mock")]
    name: String,
    /// Tokens per minute before answering 429 (like an Azure PTU deployment).
    #[arg(long)]
    tpm: Option<u64>,
    /// Delay before every response, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Further delay before the first content token, in milliseconds.
    #[arg(long, default_value_t = 0)]
    ttft_ms: u64,
    /// Generation speed; unset means as fast as possible.
    #[arg(long)]
    tokens_per_sec: Option<f64>,
    /// Fraction of requests answered 500.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Leave usage out of every response.
    #[arg(long)]
    no_usage: bool,
    /// Accept requests and never answer.
    #[arg(long)]
    hang: bool,
    /// Abort streams after this many content chunks.
    #[arg(long)]
    fail_mid_stream_after: Option<u32>,
    /// Completion length when a request sets no max tokens.
    #[arg(long, default_value_t = mock::DEFAULT_COMPLETION_TOKENS)]
    default_completion_tokens: u64,
    /// Send azure-openai-deployment-utilization even without --tpm.
    #[arg(long)]
    utilization_header: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let opts = MockOpts {
        name: cli.name,
        tpm: cli.tpm,
        latency_ms: cli.latency_ms,
        ttft_ms: cli.ttft_ms,
        tokens_per_sec: cli.tokens_per_sec,
        fail_rate: cli.fail_rate,
        no_usage: cli.no_usage,
        hang: cli.hang,
        fail_mid_stream_after: cli.fail_mid_stream_after,
        default_completion_tokens: cli.default_completion_tokens,
        utilization_header: cli.utilization_header,
    };
    // Load the tokenizer before announcing readiness, so no early request waits for it.
    mock::count_tokens("warm up");
    let listener = tokio::net::TcpListener::bind(&cli.listen)
        .await
        .with_context(|| format!("binding {}", cli.listen))?;
    let addr = listener.local_addr()?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {addr}")?;
    stdout.flush()?;
    drop(stdout);
    mock::serve(listener, opts, shutdown_signal()).await
}

/// Completes on SIGTERM or ctrl-c.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
