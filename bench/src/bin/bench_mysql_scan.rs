//! A full scan through the MySQL protocol by a lean client: the `mysql` crate's text-protocol
//! result set, each row's values read (their bytes counted) and dropped. What the server can
//! send, with a client that costs little next to it (the `mariadb` command-line client spends
//! more CPU per row formatting its output than the aggregator spends producing the row).
//! Prints `{"rows":..,"bytes":..,"seconds":..,"rows_per_sec":..}` (its CPU is the caller's to read).

use clap::Parser;
use mysql::prelude::Queryable;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long)]
    port: u16,
    #[arg(long, default_value = "root")]
    user: String,
    /// The statement whose rows are read.
    query: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let opts = mysql::OptsBuilder::new()
        .ip_or_hostname(Some(args.host))
        .tcp_port(args.port)
        .user(Some(args.user))
        .prefer_socket(false);
    let mut conn = mysql::Conn::new(opts)?;
    let started = Instant::now();
    let (mut rows, mut bytes) = (0u64, 0u64);
    for row in conn.query_iter(&args.query)? {
        let row = row?;
        for i in 0..row.len() {
            if let Some(mysql::Value::Bytes(b)) = row.as_ref(i) {
                bytes += b.len() as u64;
            }
        }
        rows += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "rows": rows,
            "bytes": bytes,
            "seconds": seconds,
            "rows_per_sec": rows as f64 / seconds.max(1e-9),
        })
    );
    Ok(())
}
