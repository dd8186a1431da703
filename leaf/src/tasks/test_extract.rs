//! TEST PIPELINE: records extracted from the source and decoded as the loader would, not
//! loaded.

use super::committed_offsets;
use common::connect::{self, avro, ConnectorConfig};
use std::time::{Duration, Instant};

/// Extracts up to `limit` records without loading them (TEST PIPELINE): rows [topic, id, record].
pub async fn test_extract(
    config_json: &str,
    offsets: &[proto::SourceOffset],
    limit: usize,
) -> Result<Vec<String>, String> {
    let config: ConnectorConfig =
        serde_json::from_str(config_json).map_err(|e| format!("bad config: {e}"))?;
    let class = connect::required(&config, "connector.class").map_err(|e| e.to_string())?;
    let connector = connect::connector(&class).map_err(|e| e.to_string())?;
    let tasks = connector
        .task_configs(&config, 1)
        .await
        .map_err(|e| e.to_string())?;
    let offsets = committed_offsets(offsets);
    let schema = avro::envelope_schema(connector.key_schema(), connector.value_schema())
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for tc in tasks {
        let mut task = connector.task();
        task.start(&config, &tc, &offsets)
            .await
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut records = Vec::new();
        while records.len() < limit && Instant::now() < deadline {
            let p = task
                .poll(limit - records.len(), deadline)
                .await
                .map_err(|e| e.to_string())?;
            records.extend(p.records);
        }
        let bytes = avro::encode_batch(&schema, records).map_err(|e| e.to_string())?;
        for r in avro::decode_batch(&bytes).map_err(|e| e.to_string())? {
            out.push(serde_json::json!([r.topic, r.id, r.record]).to_string());
        }
        if out.len() >= limit {
            break;
        }
    }
    out.truncate(limit);
    Ok(out)
}
