use clap::Parser;
use kinesis_sim::SimConfig;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let config = SimConfig::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let listener = match tokio::net::TcpListener::bind(&config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kinesis-sim: cannot listen on {}: {e}", config.listen);
            return ExitCode::from(2);
        }
    };
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        t.cancel();
    });
    match kinesis_sim::run(config, listener, token).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kinesis-sim: {e}");
            ExitCode::from(1)
        }
    }
}
