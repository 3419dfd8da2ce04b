//! A loopback TCP proxy that counts the bytes it forwards each way, so that what `tandem
//! verify` and the dump-and-compare baseline exchange with a region's PostgreSQL is measured
//! on the wire rather than estimated.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// Bytes forwarded so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Client → server: queries, parameters, the connection start-up.
    pub to_server: u64,
    /// Server → client: results.
    pub from_server: u64,
}

impl Traffic {
    pub fn total(self) -> u64 {
        self.to_server + self.from_server
    }

    /// What was forwarded since `before` was read.
    pub fn since(self, before: Self) -> Self {
        Self {
            to_server: self.to_server - before.to_server,
            from_server: self.from_server - before.from_server,
        }
    }

    pub fn plus(self, other: Self) -> Self {
        Self {
            to_server: self.to_server + other.to_server,
            from_server: self.from_server + other.from_server,
        }
    }
}

#[derive(Default)]
struct Counters {
    to_server: AtomicU64,
    from_server: AtomicU64,
}

/// A running proxy on `127.0.0.1:port()`; stops accepting when dropped (connections it
/// carries end with their clients).
pub struct CountingProxy {
    port: u16,
    counters: Arc<Counters>,
    accept: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let counters = Arc::new(Counters::default());
        let shared = counters.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(forward(client, upstream, shared.clone()));
            }
        });
        Ok(Self {
            port,
            counters,
            accept,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn traffic(&self) -> Traffic {
        Traffic {
            to_server: self.counters.to_server.load(Ordering::Relaxed),
            from_server: self.counters.from_server.load(Ordering::Relaxed),
        }
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn forward(client: TcpStream, upstream: SocketAddr, counters: Arc<Counters>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let _ = tokio::join!(
        pump(client_read, server_write, &counters.to_server),
        pump(server_read, client_write, &counters.from_server),
    );
}

/// Copies one direction until its reader closes, then closes the writer.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    counter: &AtomicU64,
) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buffer).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
        to.write_all(&buffer[..n]).await?;
    }
}
