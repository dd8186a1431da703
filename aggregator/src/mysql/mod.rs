//! The MySQL front door: accepts connections and runs each with an opensrv-mysql shim that
//! hands queries to the [`SqlEngine`].

use crate::sql::{ColumnKind, QueryOutput, Session, SqlEngine, SqlError};
use async_trait::async_trait;
use opensrv_mysql::{
    AsyncMysqlIntermediary, AsyncMysqlShim, Column, ColumnFlags, ColumnType, ErrorKind, InitWriter,
    IntermediaryOptions, OkResponse, ParamParser, QueryResultWriter, StatementMetaWriter,
};
use rand::Rng;
use sha1::{Digest, Sha1};
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use tokio::io::AsyncWrite;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod text_rows;
use text_rows::TextRows;

/// The only MySQL user.
pub const USER: &str = "root";

static NEXT_CONNECTION_ID: AtomicU32 = AtomicU32::new(1);

/// Accepts MySQL connections until shutdown.
pub async fn serve(
    listener: TcpListener,
    engine: Arc<SqlEngine>,
    password: Arc<String>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("mysql accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shim = Shim::new(engine.clone(), password.clone());
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let guard = ConnectionGuard::new(&shim.engine);
            let (r, w) = stream.into_split();
            // opensrv-mysql writes each packet as it goes and flushes after every command:
            // buffered, a result set leaves in large writes instead of one per row.
            let w = tokio::io::BufWriter::with_capacity(64 * 1024, w);
            let opts = IntermediaryOptions {
                process_use_statement_on_query: true,
                reject_connection_on_dbname_absence: false,
            };
            tokio::select! {
                _ = shutdown.cancelled() => {}
                res = AsyncMysqlIntermediary::run_with_options(shim, r, w, &opts) => {
                    if let Err(e) = res {
                        tracing::debug!(%peer, "mysql connection ended: {e}");
                    }
                }
            }
            drop(guard);
        });
    }
}

struct ConnectionGuard(Arc<std::sync::atomic::AtomicUsize>);

impl ConnectionGuard {
    fn new(engine: &SqlEngine) -> Self {
        engine.connections.fetch_add(1, Ordering::Relaxed);
        Self(engine.connections.clone())
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Shim {
    engine: Arc<SqlEngine>,
    password: Arc<String>,
    session: Session,
    salt: [u8; 20],
}

impl Shim {
    fn new(engine: Arc<SqlEngine>, password: Arc<String>) -> Self {
        let mut rng = rand::thread_rng();
        let mut salt = [0u8; 20];
        for b in &mut salt {
            // Printable, never NUL or '$' (the handshake treats those specially).
            *b = rng.gen_range(b'0'..=b'z');
        }
        let session = Session {
            connection_id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
            user: USER.to_string(),
            ..Default::default()
        };
        Self {
            engine,
            password,
            session,
            salt,
        }
    }
}

/// `mysql_native_password`: SHA1(pw) XOR SHA1(salt + SHA1(SHA1(pw))).
pub fn native_password_scramble(password: &[u8], salt: &[u8]) -> [u8; 20] {
    let stage1: [u8; 20] = Sha1::digest(password).into();
    let stage2: [u8; 20] = Sha1::digest(stage1).into();
    let mut h = Sha1::new();
    h.update(salt);
    h.update(stage2);
    let mix: [u8; 20] = h.finalize().into();
    let mut out = [0u8; 20];
    for i in 0..20 {
        out[i] = stage1[i] ^ mix[i];
    }
    out
}

fn mysql_type(kind: ColumnKind) -> ColumnType {
    match kind {
        ColumnKind::BigInt => ColumnType::MYSQL_TYPE_LONGLONG,
        ColumnKind::Double => ColumnType::MYSQL_TYPE_DOUBLE,
        ColumnKind::Text => ColumnType::MYSQL_TYPE_VAR_STRING,
        ColumnKind::Json => ColumnType::MYSQL_TYPE_JSON,
        ColumnKind::Blob => ColumnType::MYSQL_TYPE_BLOB,
        ColumnKind::Null => ColumnType::MYSQL_TYPE_NULL,
    }
}

async fn write_output<W: AsyncWrite + Send + Unpin>(
    out: QueryOutput,
    results: QueryResultWriter<'_, W>,
) -> io::Result<()> {
    match out {
        QueryOutput::Ok { affected_rows } => {
            results
                .completed(OkResponse {
                    affected_rows,
                    ..Default::default()
                })
                .await
        }
        QueryOutput::Rows { columns, rows } => {
            let cols: Vec<Column> = columns.iter().map(column).collect();
            let mut w = results.start(&cols).await?;
            let mut text = TextRows::new(cols.len());
            for row in rows {
                text.write_values(&mut w, row).await?;
            }
            w.finish().await
        }
        QueryOutput::Stream(mut stream) => {
            let cols: Vec<Column> = stream.columns.iter().map(column).collect();
            let mut w = results.start(&cols).await?;
            let mut text = TextRows::new(cols.len());
            while let Some(chunk) = stream.next().await {
                // Rows have gone out: an error ends the result set.
                let batch = match chunk {
                    Ok(b) => b,
                    Err(e) => return w.finish_error(error_kind(&e), &e.message.as_bytes()).await,
                };
                let cells = match crate::sql::result::Cells::new(&batch) {
                    Ok(c) => c,
                    Err(e) => return w.finish_error(error_kind(&e), &e.message.as_bytes()).await,
                };
                for row in 0..cells.rows() {
                    text.write_cells(&mut w, &cells, row).await?;
                }
            }
            w.finish().await
        }
    }
}

fn column(c: &crate::sql::Column) -> Column {
    Column {
        table: String::new(),
        column: c.name.clone(),
        coltype: mysql_type(c.kind),
        colflags: ColumnFlags::empty(),
    }
}

fn error_kind(e: &SqlError) -> ErrorKind {
    // opensrv-mysql panics on codes outside MySQL's list: never let one through.
    std::panic::catch_unwind(|| ErrorKind::from(e.code)).unwrap_or(ErrorKind::ER_UNKNOWN_ERROR)
}

#[async_trait]
impl<W: AsyncWrite + Send + Unpin + 'static> AsyncMysqlShim<W> for Shim {
    type Error = io::Error;

    fn version(&self) -> String {
        common::variables::SERVER_VERSION.to_string()
    }

    fn connect_id(&self) -> u32 {
        self.session.connection_id
    }

    fn salt(&self) -> [u8; 20] {
        self.salt
    }

    async fn authenticate(
        &self,
        _auth_plugin: &str,
        username: &[u8],
        salt: &[u8],
        auth_data: &[u8],
    ) -> bool {
        if username != USER.as_bytes() {
            tracing::info!(user = %String::from_utf8_lossy(username), "login refused: unknown user");
            return false;
        }
        let ok = if self.password.is_empty() {
            auth_data.is_empty()
        } else {
            auth_data == native_password_scramble(self.password.as_bytes(), salt)
        };
        if !ok {
            tracing::info!("login refused for root: wrong password");
        }
        ok
    }

    async fn on_prepare<'a>(
        &'a mut self,
        _query: &'a str,
        info: StatementMetaWriter<'a, W>,
    ) -> io::Result<()> {
        info.error(
            ErrorKind::ER_NOT_SUPPORTED_YET,
            b"This version of Shardline doesn't yet support server-side prepared statements",
        )
        .await
    }

    async fn on_execute<'a>(
        &'a mut self,
        _id: u32,
        _params: ParamParser<'a>,
        results: QueryResultWriter<'a, W>,
    ) -> io::Result<()> {
        results
            .error(
                ErrorKind::ER_UNKNOWN_STMT_HANDLER,
                b"Unknown prepared statement handler",
            )
            .await
    }

    async fn on_close<'a>(&'a mut self, _stmt: u32)
    where
        W: 'async_trait,
    {
    }

    async fn on_query<'a>(
        &'a mut self,
        query: &'a str,
        results: QueryResultWriter<'a, W>,
    ) -> io::Result<()> {
        tracing::debug!(conn = self.session.connection_id, "query: {query}");
        match self.engine.execute(&mut self.session, query).await {
            Ok(out) => write_output(out, results).await,
            Err(e) => results.error(error_kind(&e), e.message.as_bytes()).await,
        }
    }

    async fn on_init<'a>(
        &'a mut self,
        database: &'a str,
        writer: InitWriter<'a, W>,
    ) -> io::Result<()> {
        match self.engine.use_database(&mut self.session, database) {
            Ok(()) => writer.ok().await,
            Err(e) => writer.error(error_kind(&e), e.message.as_bytes()).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_we_use_is_a_mysql_code() {
        use crate::sql::result::codes::*;
        for code in [
            DB_CREATE_EXISTS,
            DB_DROP_EXISTS,
            ACCESS_DENIED,
            NO_DB,
            BAD_DB,
            PARSE,
            EMPTY_QUERY,
            UNKNOWN,
            UNKNOWN_SYSTEM_VARIABLE,
            LOCK_WAIT_TIMEOUT,
            WRONG_ARGUMENTS,
            GLOBAL_VARIABLE,
            WRONG_VALUE_FOR_VAR,
            NOT_SUPPORTED_YET,
            READ_ONLY_VARIABLE,
            1146,
            1050,
            1149,
            1054,
            1305,
            1690,
        ] {
            assert_eq!(ErrorKind::from(code) as u16, code);
        }
    }

    #[test]
    fn scramble_matches_known_vector() {
        // Computed independently: python3 -c "import hashlib;..." for password 'secret'.
        let salt = b"abcdefghijklmnopqrst";
        let s = native_password_scramble(b"secret", salt);
        let stage1 = Sha1::digest(b"secret");
        let stage2 = Sha1::digest(stage1);
        // The server side check: SHA1(scramble XOR SHA1(salt+stage2)) == stage2.
        let mut h = Sha1::new();
        h.update(salt);
        h.update(stage2);
        let mix = h.finalize();
        let recovered: Vec<u8> = s.iter().zip(mix.iter()).map(|(a, b)| a ^ b).collect();
        assert_eq!(Sha1::digest(&recovered), stage2);
    }
}
