//! `kinesis-sim`: a Kinesis-compatible server (JSON 1.1 API) for the demo, tests, compose and
//! benchmarks, with AWS's limits on by default, resharding with lineage, realistic 56-digit
//! sequence numbers, expiring iterators and fault knobs.
//!
//! - `model`: streams, shards, records, limits (pure state);
//! - `api`: the operations over the model;
//! - [`run`]: the HTTP server.

pub mod api;
pub mod model;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Server settings.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "kinesis-sim",
    version,
    about = "A Kinesis-compatible server with AWS's limits"
)]
pub struct SimConfig {
    /// Address to listen on.
    #[arg(long, env = "KINESIS_SIM_LISTEN", default_value = "127.0.0.1:4567")]
    pub listen: String,
    /// Turn AWS's throughput limits off (benchmarks).
    #[arg(long, env = "KINESIS_SIM_NO_LIMITS")]
    pub no_limits: bool,
    /// Records written per second per shard (AWS: 1000).
    #[arg(
        long,
        env = "KINESIS_SIM_WRITE_RECORDS_PER_SEC",
        default_value_t = 1000
    )]
    pub write_records_per_sec: u64,
    /// Bytes written per second per shard (AWS: 1 MiB).
    #[arg(long, env = "KINESIS_SIM_WRITE_BYTES_PER_SEC", default_value_t = 1024 * 1024)]
    pub write_bytes_per_sec: u64,
    /// GetRecords calls per second per shard (AWS: 5).
    #[arg(long, env = "KINESIS_SIM_READ_CALLS_PER_SEC", default_value_t = 5)]
    pub read_calls_per_sec: u64,
    /// Bytes read per second per shard (AWS: 2 MiB).
    #[arg(long, env = "KINESIS_SIM_READ_BYTES_PER_SEC", default_value_t = 2 * 1024 * 1024)]
    pub read_bytes_per_sec: u64,
    /// Shard iterators expire after this long (AWS: 300000).
    #[arg(long, env = "KINESIS_SIM_ITERATOR_TTL_MS", default_value_t = 300_000)]
    pub iterator_ttl_ms: u64,
    /// Extra latency per call.
    #[arg(long, env = "KINESIS_SIM_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,
    /// Fraction (0..1) of GetRecords calls throttled on purpose.
    #[arg(long, env = "KINESIS_SIM_THROTTLE_RATE", default_value_t = 0.0)]
    pub throttle_rate: f64,
    /// Keep streams and records in this directory (a journal replayed at start); memory only
    /// when not given.
    #[arg(long, env = "KINESIS_SIM_DATA_DIR")]
    pub data_dir: Option<std::path::PathBuf>,
    /// Fraction (0..1) of calls failed with a 500 on purpose.
    #[arg(long, env = "KINESIS_SIM_ERROR_RATE", default_value_t = 0.0)]
    pub error_rate: f64,
    /// The operations `--error-rate` fails (comma-separated, e.g. `GetRecords,ListShards`);
    /// every operation when not given.
    #[arg(long, env = "KINESIS_SIM_ERROR_OPS", value_delimiter = ',')]
    pub error_ops: Vec<String>,
    /// GetRecords answers the first N reads of every shard with an empty page and a next
    /// iterator at the same position, as AWS may before data (a closed shard too).
    #[arg(long, env = "KINESIS_SIM_EMPTY_PAGES", default_value_t = 0)]
    pub empty_pages: u32,
}

async fn handle(
    api: Arc<api::Api>,
    latency: Duration,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let op = target.rsplit('.').next().unwrap_or("");
    let result = match serde_json::from_slice::<serde_json::Value>(if body.is_empty() {
        b"{}"
    } else {
        &body
    }) {
        Ok(req) => api.call(op, &req),
        Err(e) => Err(model::ApiError::new(
            "SerializationException",
            format!("body is not JSON: {e}"),
        )),
    };
    let (status, body, kind) = match result {
        Ok(v) => (StatusCode::OK, v, None),
        Err(e) => (
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
            serde_json::json!({"__type": e.kind, "message": e.message}),
            Some(e.kind),
        ),
    };
    let mut resp = (
        status,
        [("content-type", "application/x-amz-json-1.1")],
        body.to_string(),
    )
        .into_response();
    if let Some(kind) = kind {
        if let Ok(v) = kind.parse() {
            resp.headers_mut().insert("x-amzn-errortype", v);
        }
    }
    resp
}

/// Serves until `shutdown`.
pub async fn run(
    config: SimConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let limits = model::Limits {
        enabled: !config.no_limits,
        write_records_per_sec: config.write_records_per_sec,
        write_bytes_per_sec: config.write_bytes_per_sec,
        read_calls_per_sec: config.read_calls_per_sec,
        read_bytes_per_sec: config.read_bytes_per_sec,
        iterator_ttl_ms: config.iterator_ttl_ms,
    };
    let faults = api::Faults {
        latency_ms: config.latency_ms,
        throttle_rate: config.throttle_rate,
        error_rate: config.error_rate,
        error_ops: config.error_ops.clone(),
        empty_pages: config.empty_pages,
    };
    let api = Arc::new(match &config.data_dir {
        Some(dir) => api::Api::open(limits, faults, dir).map_err(|e| anyhow::anyhow!(e))?,
        None => api::Api::new(limits, faults),
    });
    let latency = Duration::from_millis(config.latency_ms);
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                handle(api.clone(), latency, headers, body)
            }),
        )
        .layer(axum::extract::DefaultBodyLimit::max(16 * 1024 * 1024));
    tracing::info!(listen = %config.listen, limits = !config.no_limits, "kinesis-sim started");
    // TCP_NODELAY: a GetRecords reply must not wait for the client's delayed ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}
