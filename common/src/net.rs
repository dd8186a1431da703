//! Accepting connections for the nodes' servers.

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};

/// The listener's connections with TCP_NODELAY set. Without it a small reply can sit ~40 ms
/// behind the peer's delayed ACK (Nagle), which capped Raft and batch commits at tens per second
/// per connection. (tonic's own `tcp_nodelay` applies only to listeners it binds itself.)
pub fn nodelay_incoming(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> {
    TcpListenerStream::new(listener).map(|s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    })
}
