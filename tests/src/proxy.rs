//! A TCP proxy that can cut a link, for the chaos tests: it forwards loopback connections to
//! one upstream address, and on command drops the connections it carries and refuses new ones
//! (accepts and closes them at once), until healed.
//!
//! It understands just enough of the Kafka protocol to tell clients apart: every Kafka request
//! header carries the client's `client.id`, so the proxy reads the first request of each
//! connection and can cut one client (say Region 2's consumer, `client.id=tandem-consumer`)
//! while the others go on. Clients must reach the broker only through the proxy: librdkafka
//! connects to the broker's *advertised* address after bootstrapping, so the broker has to
//! advertise the proxy's port (as [`crate::chaos::ChaosSystem`] does).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cut {
    /// Nothing: every connection is forwarded.
    Healed,
    /// Every connection: the upstream is unreachable through the proxy.
    Everything,
    /// Connections whose first Kafka request names this `client.id`.
    KafkaClient(String),
}

impl Cut {
    fn refuses(&self, client_id: Option<&str>) -> bool {
        match self {
            Self::Healed => false,
            Self::Everything => true,
            Self::KafkaClient(id) => client_id == Some(id.as_str()),
        }
    }
}

/// Counters, for the run's report and for failure messages.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProxyStats {
    /// Connections forwarded to the upstream.
    pub forwarded: u64,
    /// Connections accepted and closed at once because of a cut.
    pub refused: u64,
    /// Forwarded connections dropped by a cut.
    pub dropped: u64,
}

struct Connection {
    client_id: Option<String>,
    /// Sending `true` ends the connection (both sockets are dropped).
    kill: watch::Sender<bool>,
}

struct State {
    cut: Cut,
    connections: HashMap<u64, Connection>,
    stats: ProxyStats,
}

struct Shared {
    upstream: SocketAddr,
    state: Mutex<State>,
    next_id: AtomicU64,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map inconsistent in a way that
        // matters to a test proxy; keep going with the inner value.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A running proxy on `127.0.0.1:port()`; stops (dropping every connection) when dropped.
pub struct TcpProxy {
    port: u16,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            upstream,
            state: Mutex::new(State {
                cut: Cut::Healed,
                connections: HashMap::new(),
                stats: ProxyStats::default(),
            }),
            next_id: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Self {
            port,
            shared,
            accept,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts refusing what `cut` names and drops the matching connections it carries.
    pub fn cut(&self, cut: Cut) {
        let mut state = self.shared.state();
        state.cut = cut;
        let doomed: Vec<u64> = state
            .connections
            .iter()
            .filter(|(_, c)| state.cut.refuses(c.client_id.as_deref()))
            .map(|(id, _)| *id)
            .collect();
        for id in doomed {
            if let Some(connection) = state.connections.remove(&id) {
                let _ = connection.kill.send(true);
                state.stats.dropped += 1;
            }
        }
    }

    /// Forwards everything again.
    pub fn heal(&self) {
        self.cut(Cut::Healed);
    }

    pub fn stats(&self) -> ProxyStats {
        self.shared.state().stats
    }

    /// The `client.id` of every connection currently forwarded (`None`: not yet known).
    pub fn clients(&self) -> Vec<Option<String>> {
        self.shared
            .state()
            .connections
            .values()
            .map(|c| c.client_id.clone())
            .collect()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        let mut state = self.shared.state();
        for (_, connection) in state.connections.drain() {
            let _ = connection.kill.send(true);
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if shared.state().cut == Cut::Everything {
            shared.state().stats.refused += 1;
            drop(client);
            continue;
        }
        tokio::spawn(forward(client, shared.clone()));
    }
}

/// Reads the client's first request (to learn its `client.id`), then relays bytes both ways
/// until either side closes or a cut kills the connection.
async fn forward(mut client: TcpStream, shared: Arc<Shared>) {
    let _ = client.set_nodelay(true);
    let (first, client_id) = match tokio::time::timeout(
        Duration::from_secs(10),
        read_first_request(&mut client),
    )
    .await
    {
        Ok(Ok(read)) => read,
        _ => return,
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (kill, mut killed) = watch::channel(false);
    {
        let mut state = shared.state();
        if state.cut.refuses(client_id.as_deref()) {
            state.stats.refused += 1;
            return;
        }
        state.connections.insert(
            id,
            Connection {
                client_id: client_id.clone(),
                kill,
            },
        );
        state.stats.forwarded += 1;
    }
    let relay = async {
        let mut upstream = TcpStream::connect(shared.upstream).await?;
        let _ = upstream.set_nodelay(true);
        upstream.write_all(&first).await?;
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
        anyhow::Ok(())
    };
    tokio::select! {
        _ = relay => {}
        _ = killed.wait_for(|k| *k) => {}
    }
    shared.state().connections.remove(&id);
}

/// Reads until the first Kafka request header is complete (or the first bytes, for anything
/// that is not Kafka) and returns the bytes read and the header's `client.id`. A request header
/// is `length: i32, api_key: i16, api_version: i16, correlation_id: i32, client_id: i16-length
/// string` (the same in every header version, flexible ones included).
async fn read_first_request(client: &mut TcpStream) -> std::io::Result<(Vec<u8>, Option<String>)> {
    let mut buffer = Vec::with_capacity(256);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(parsed) = parse_client_id(&buffer) {
            return Ok((buffer, parsed));
        }
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

/// `None`: more bytes are needed. `Some(None)`: not a Kafka request with a client id.
fn parse_client_id(buffer: &[u8]) -> Option<Option<String>> {
    const FIXED: usize = 4 + 2 + 2 + 4;
    if buffer.len() < FIXED + 2 {
        return None;
    }
    let frame = i32::from_be_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]);
    let length = i16::from_be_bytes([buffer[FIXED], buffer[FIXED + 1]]);
    if frame <= 0 || length < 0 {
        return Some(None);
    }
    let end = FIXED + 2 + usize::try_from(length).unwrap_or(0);
    if buffer.len() < end {
        return None;
    }
    Some(String::from_utf8(buffer[FIXED + 2..end].to_vec()).ok())
}

#[cfg(test)]
mod tests {
    use super::parse_client_id;

    #[test]
    fn the_client_id_is_read_from_a_kafka_request_header() {
        let mut header = vec![0, 0, 0, 40, 0, 18, 0, 3, 0, 0, 0, 1, 0, 5];
        assert_eq!(parse_client_id(&header), None, "needs the id's bytes");
        header.extend_from_slice(b"relay");
        assert_eq!(parse_client_id(&header), Some(Some("relay".to_owned())));
        let null = vec![0, 0, 0, 40, 0, 18, 0, 3, 0, 0, 0, 1, 0xff, 0xff];
        assert_eq!(parse_client_id(&null), Some(None));
    }
}
