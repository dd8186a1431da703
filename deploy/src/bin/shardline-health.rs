//! `shardline-health`: asks a node's gRPC health service (`grpc.health.v1`) whether it serves.
//! Exit 0 when SERVING, 1 otherwise, with one line saying why. The image's HEALTHCHECK runs it
//! with no address: it then asks the port the node in the same container listens on.

use clap::Parser;
use std::process::ExitCode;
use std::time::Duration;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[derive(Parser)]
#[command(
    name = "shardline-health",
    version,
    about = "Health probe of a Shardline node"
)]
struct Args {
    /// The node's gRPC address. Default: SHARDLINE_GRPC_LISTEN (an aggregator) or
    /// SHARDLINE_LEAF_LISTEN (a leaf) from the environment, an unspecified host as 127.0.0.1.
    address: Option<String>,
    /// Ask for readiness (an aggregator that knows the master, a leaf that reaches it) instead of
    /// liveness.
    #[arg(long)]
    ready: bool,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

fn default_address() -> Option<String> {
    let listen = std::env::var("SHARDLINE_GRPC_LISTEN")
        .or_else(|_| std::env::var("SHARDLINE_LEAF_LISTEN"))
        .ok()?;
    let (host, port) = listen.rsplit_once(':')?;
    let host = match host {
        "0.0.0.0" | "" => "127.0.0.1",
        "[::]" => "[::1]",
        h => h,
    };
    Some(format!("{host}:{port}"))
}

async fn check(address: &str, service: &str, timeout: Duration) -> Result<ServingStatus, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("bad address {address}: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|s| format!("{address}: {}", s.message()))?;
    Ok(ServingStatus::try_from(reply.into_inner().status).unwrap_or(ServingStatus::Unknown))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let Some(address) = args.address.or_else(default_address) else {
        eprintln!("shardline-health: no address given and neither SHARDLINE_GRPC_LISTEN nor SHARDLINE_LEAF_LISTEN is set");
        return ExitCode::from(2);
    };
    let service = if args.ready {
        common::health::READY_SERVICE
    } else {
        ""
    };
    match check(&address, service, Duration::from_millis(args.timeout_ms)).await {
        Ok(ServingStatus::Serving) => {
            println!("{address}: SERVING");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            println!("{address}: {}", status.as_str_name());
            ExitCode::from(1)
        }
        Err(e) => {
            println!("shardline-health: {e}");
            ExitCode::from(1)
        }
    }
}
