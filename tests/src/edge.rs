//! The local edge: HAProxy configured the way Route 53 and the ALB route in AWS. Used by
//! `make up` (through `scripts/up.sh`, which renders the same template) and by the edge test.

use std::path::PathBuf;

/// `haproxy` from `PATH` or Debian's location.
pub fn haproxy_binary() -> PathBuf {
    ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("haproxy"))
}

/// Renders `deploy/local/haproxy.cfg.template` with the given addresses (`host:port`).
/// `write2` is Region 2's Write API (it forwards while Region 1 writes).
pub fn haproxy_config(port: u16, write1: &str, write2: &str, read1: &str, read2: &str) -> String {
    let template = include_str!("../../deploy/local/haproxy.cfg.template");
    template
        .replace("@EDGE_PORT@", &port.to_string())
        .replace("@WRITE1@", write1)
        .replace("@WRITE2@", write2)
        .replace("@READ1@", read1)
        .replace("@READ2@", read2)
}
