//! Prometheus metrics: a small registry of counters and gauges and its `/metrics` text.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Counters and gauges by full name (labels included, e.g. `x_total{pipeline="p"}`).
#[derive(Debug, Default)]
pub struct Metrics {
    values: Mutex<BTreeMap<String, f64>>,
    help: Mutex<BTreeMap<String, &'static str>>,
}

fn family(name: &str) -> &str {
    name.split('{').next().unwrap_or(name)
}

impl Metrics {
    fn values(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, f64>> {
        self.values.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Describes a metric family (shown as `# HELP`).
    pub fn describe(&self, family: &str, help: &'static str) {
        self.help
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(family.to_string(), help);
    }

    pub fn add(&self, name: &str, v: f64) {
        *self.values().entry(name.to_string()).or_insert(0.0) += v;
    }

    pub fn set(&self, name: &str, v: f64) {
        self.values().insert(name.to_string(), v);
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.values().get(name).copied()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let help = self.help.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out = String::new();
        let mut last = String::new();
        for (name, v) in self.values().iter() {
            let fam = family(name);
            if fam != last {
                if let Some(h) = help.get(fam) {
                    out.push_str(&format!("# HELP {fam} {h}\n"));
                }
                let kind = if fam.ends_with("_total")
                    || fam.ends_with("_sum")
                    || fam.ends_with("_count")
                {
                    "counter"
                } else {
                    "gauge"
                };
                out.push_str(&format!("# TYPE {fam} {kind}\n"));
                last = fam.to_string();
            }
            out.push_str(&format!("{name} {v}\n"));
        }
        out
    }
}

/// A label value escaped for the text format.
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` (the text of `render`) until `shutdown` completes; a failure is
/// logged (metrics never take a node down).
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move { ([("content-type", "text/plain; version=0.0.4")], render()) }
        }),
    );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!("metrics server failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_once() {
        let m = Metrics::default();
        m.describe("shardline_rows_loaded_total", "Rows loaded.");
        m.add(
            &format!(
                "shardline_rows_loaded_total{{pipeline=\"{}\"}}",
                label("a\"b")
            ),
            3.0,
        );
        m.add("shardline_rows_loaded_total{pipeline=\"c\"}", 2.0);
        m.set("shardline_raft_term", 7.0);
        let text = m.render();
        assert_eq!(
            text.matches("# TYPE shardline_rows_loaded_total counter")
                .count(),
            1
        );
        assert!(text.contains("shardline_rows_loaded_total{pipeline=\"a\\\"b\"} 3\n"));
        assert!(text.contains("# TYPE shardline_raft_term gauge\nshardline_raft_term 7\n"));
    }
}
