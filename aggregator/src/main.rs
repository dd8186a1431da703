use aggregator::AggregatorConfig;
use clap::Parser;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// mimalloc, as the leaves use: no slower here (Raft commits/s, BENCHMARKS.md), and one
/// allocator across the nodes.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

async fn bind(what: &str, addr: &str) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen for {what} on {addr}: {e}"))
}

async fn shutdown_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
            _ = token.cancelled() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    token.cancel();
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = AggregatorConfig::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,raft=warn,sled=warn,h2=warn,tower=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = config.validate() {
        eprintln!("aggregator: {e}");
        return ExitCode::from(2);
    }
    let grpc = match bind("gRPC", &config.grpc_listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("aggregator: {e}");
            return ExitCode::from(2);
        }
    };
    let mysql = match bind("MySQL", &config.mysql_listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("aggregator: {e}");
            return ExitCode::from(2);
        }
    };
    let metrics = match &config.metrics_listen {
        Some(addr) => match bind("metrics", addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("aggregator: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let token = CancellationToken::new();
    tokio::spawn(shutdown_signal(token.clone()));
    match aggregator::run(config, grpc, mysql, metrics, token).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aggregator: {e}");
            ExitCode::from(1)
        }
    }
}
