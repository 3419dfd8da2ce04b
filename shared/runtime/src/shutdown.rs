//! Shutdown: one flag every loop can watch, set once on SIGTERM (what Kubernetes sends before
//! killing a pod) or Ctrl-C.

use tokio::sync::watch;

/// A shutdown flag every loop can watch: set once, on SIGTERM/Ctrl-C.
pub fn shutdown_channel() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    watch::channel(false)
}

/// Sets the flag when the process is asked to stop.
pub fn trigger_on_signal(sender: watch::Sender<bool>) {
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = sender.send(true);
    });
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes sends before killing a pod).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received; draining");
}
