//! W3C Trace Context `traceparent` values: accepted from the client when well-formed, otherwise
//! started afresh, so that every write's outbox row, Kafka headers and consumer span share one
//! trace id.

use rand::Rng;

/// A validated `traceparent` header value (`00-<32 hex>-<16 hex>-<2 hex>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent(String);

impl TraceParent {
    /// Parses a header value; returns `None` for anything that is not version-00 trace context
    /// or that carries the all-zero ids the specification forbids.
    pub fn parse(value: &str) -> Option<Self> {
        let parts: Vec<&str> = value.trim().split('-').collect();
        let [version, trace_id, parent_id, flags] = parts.as_slice() else {
            return None;
        };
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let ok = *version == "00"
            && hex(trace_id, 32)
            && hex(parent_id, 16)
            && hex(flags, 2)
            && trace_id.bytes().any(|b| b != b'0')
            && parent_id.bytes().any(|b| b != b'0');
        ok.then(|| Self(value.trim().to_owned()))
    }

    /// Starts a new sampled trace.
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let trace: u128 = rng.random_range(1..=u128::MAX);
        let span: u64 = rng.random_range(1..=u64::MAX);
        Self(format!("00-{trace:032x}-{span:016x}-01"))
    }

    /// The 32-hex-digit trace id, for log fields.
    pub fn trace_id(&self) -> &str {
        &self.0[3..35]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::TraceParent;

    #[test]
    fn well_formed_values_are_kept_and_bad_ones_rejected() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(TraceParent::parse(good).map(|t| t.0), Some(good.to_owned()));
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn generated_values_parse() {
        let t = TraceParent::generate();
        assert!(TraceParent::parse(t.as_str()).is_some());
        assert_eq!(t.trace_id().len(), 32);
    }
}
