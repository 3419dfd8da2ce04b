//! Leader election for the long-running workers: exactly one relay (and one consumer) is active
//! at a time. The active one holds a session-level PostgreSQL advisory lock on a dedicated
//! connection; if its process dies or its connection breaks, PostgreSQL releases the lock and a
//! standby, retrying every second, takes over.

use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use crate::db::{DatabaseSettings, SessionConnection, connect_session};

/// Advisory lock of the outbox relay (Region 1 database).
pub const RELAY_LOCK: i64 = 0x7461_6e64_656d_0001;
/// Advisory lock of the Region 2 consumer (Region 2 database).
pub const CONSUMER_LOCK: i64 = 0x7461_6e64_656d_0002;

/// A held leadership: the session holding the lock. Dropping it closes the session, which
/// releases the lock.
pub struct Leadership {
    pub session: SessionConnection,
}

impl Leadership {
    /// Waits until this process holds `lock`, or returns `None` on shutdown.
    pub async fn acquire(
        settings: &DatabaseSettings,
        lock: i64,
        retry_every: Duration,
        shutdown: &mut watch::Receiver<bool>,
        on_standby: impl Fn(),
    ) -> Option<Self> {
        loop {
            if *shutdown.borrow() {
                return None;
            }
            match try_acquire(settings, lock).await {
                Ok(Some(leadership)) => return Some(leadership),
                Ok(None) => on_standby(),
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "leader election failed; retrying")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(retry_every) => {}
                _ = shutdown.changed() => return None,
            }
        }
    }

    /// Whether the session (and so the lock) is still alive.
    pub async fn is_held(&self) -> bool {
        !self.session.client.is_closed()
            && self.session.client.simple_query("SELECT 1").await.is_ok()
    }
}

async fn try_acquire(settings: &DatabaseSettings, lock: i64) -> anyhow::Result<Option<Leadership>> {
    let session = connect_session(settings).await?;
    let held: bool = session
        .client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&lock])
        .await
        .context("Failed to try the advisory lock")?
        .get(0);
    Ok(held.then_some(Leadership { session }))
}

/// A shutdown flag every loop can watch: set once, on SIGTERM/Ctrl-C.
pub fn shutdown_channel() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    watch::channel(false)
}

/// Sets the flag when the process is asked to stop.
pub fn trigger_on_signal(sender: watch::Sender<bool>) {
    tokio::spawn(async move {
        crate::serve::shutdown_signal().await;
        let _ = sender.send(true);
    });
}
