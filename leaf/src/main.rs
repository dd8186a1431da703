use clap::Parser;
use leaf::LeafConfig;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// mimalloc, not the system allocator: loading a batch allocates and frees per record (Avro
/// values, JSON text), where glibc malloc cost a fifth of the leaf's CPU (issue 6 profile);
/// datagen ingest is 20-27% faster with it (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = LeafConfig::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sled=warn,h2=warn,tower=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = config.validate() {
        eprintln!("leaf: {e}");
        return ExitCode::from(2);
    }
    let listener = match tokio::net::TcpListener::bind(&config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("leaf: cannot listen for gRPC on {}: {e}", config.listen);
            return ExitCode::from(2);
        }
    };
    let metrics = match &config.metrics_listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("leaf: cannot listen for metrics on {addr}: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let token = CancellationToken::new();
    let signal_token = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            signal_token.cancel();
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
        signal_token.cancel();
    });
    match leaf::run(config, listener, metrics, token).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("leaf: {e}");
            ExitCode::from(1)
        }
    }
}
