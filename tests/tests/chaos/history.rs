//! The history: every operation the clients invoked, when it was invoked, when it completed
//! and what came back. The checker judges the run from this alone, plus what the databases
//! and caches hold at the end.

use std::time::Instant;

use serde_json::Value;

/// The collection every chaos document lives in.
pub const COLLECTION: &str = "chaos";

/// Time since the start of the run, in seconds; one clock for every task.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
    /// The wall clock at `start`, in Unix milliseconds, to place the databases' timestamps
    /// (same host, same clock) on the run's time line.
    wall_start_ms: f64,
}

impl Clock {
    pub fn new() -> Self {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        Self {
            start: Instant::now(),
            wall_start_ms: wall,
        }
    }

    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// A wall-clock time (Unix milliseconds) as run time.
    pub fn at_unix_ms(&self, unix_ms: f64) -> f64 {
        (unix_ms - self.wall_start_ms) / 1000.0
    }
}

/// What a write asked for.
#[derive(Debug, Clone)]
pub enum WriteKind {
    /// `PUT` of this object (creates, replaces, or re-creates after a delete).
    Put(Value),
    /// `PATCH` with this RFC 7396 merge patch.
    Patch(Value),
    Delete,
}

impl WriteKind {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Put(_) => "PUT",
            Self::Patch(_) => "PATCH",
            Self::Delete => "DELETE",
        }
    }
}

/// A 2xx answer to a write.
#[derive(Debug, Clone)]
pub struct Ack {
    pub status: u16,
    /// The version in the body (`PUT`/`PATCH`) or the `ETag` (`DELETE`).
    pub version: i64,
    pub etag: Option<i64>,
    pub token: Option<String>,
    /// The document's `data` in the body (`None` for a delete).
    pub data: Option<Value>,
    /// `Idempotent-Replayed: true`: the answer of an earlier attempt.
    pub replayed: bool,
}

/// How a write ended.
#[derive(Debug, Clone)]
pub enum WriteOutcome {
    Acknowledged(Ack),
    /// Definitely not applied: a 4xx, or no attempt ever reached the server (connection
    /// refused).
    Refused {
        status: Option<u16>,
        detail: String,
    },
    /// Unknown: a 5xx, a timeout or a broken connection. It may have been applied, even
    /// later than the answer.
    Indeterminate {
        detail: String,
    },
}

/// What the writer's re-read of Region 1 showed after an indeterminate write.
#[derive(Debug, Clone)]
pub enum Learned {
    Live {
        version: i64,
    },
    Absent,
    /// Region 1's Read API did not answer within the bound.
    Unknown,
}

/// One write, from invocation to its last attempt.
#[derive(Debug, Clone)]
pub struct WriteOp {
    pub id: u64,
    pub writer: usize,
    pub doc: String,
    pub kind: WriteKind,
    pub idempotency_key: Option<String>,
    /// The W3C trace id every attempt sent in `traceparent`; the outbox row records it, which
    /// ties each committed version to the operation that wrote it.
    pub trace_id: String,
    pub invoked: f64,
    pub completed: f64,
    pub attempts: u32,
    pub outcome: WriteOutcome,
    pub learned: Option<Learned>,
}

impl WriteOp {
    pub fn ack(&self) -> Option<&Ack> {
        match &self.outcome {
            WriteOutcome::Acknowledged(ack) => Some(ack),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Region {
    One,
    Two,
}

impl Region {
    pub fn name(self) -> &'static str {
        match self {
            Self::One => "region1",
            Self::Two => "region2",
        }
    }
}

/// The consistency token a read carried: the write it came from.
#[derive(Debug, Clone)]
pub struct TokenRef {
    pub token: String,
    pub version: i64,
    pub op: u64,
    /// The write was a delete (the token insists on the tombstone).
    pub delete: bool,
}

#[derive(Debug, Clone)]
pub enum ReadOutcome {
    Live {
        version: i64,
        etag: Option<i64>,
        data: Value,
    },
    NotFound,
    /// 503 `replication-lag`: the region refused rather than answer stale.
    Lagging,
    /// Anything else (a 5xx, a timeout, no connection): no answer about the document.
    Unavailable {
        detail: String,
    },
}

/// One read of one document.
#[derive(Debug, Clone)]
pub struct ReadOp {
    pub region: Region,
    pub reader: String,
    pub doc: String,
    pub token: Option<TokenRef>,
    pub invoked: f64,
    pub completed: f64,
    pub outcome: ReadOutcome,
    /// Region 2's `X-Tandem-Replication-Lag-Ms` on the answer.
    pub lag_ms: Option<u64>,
}

impl ReadOp {
    pub fn describe(&self) -> String {
        let answer = match &self.outcome {
            ReadOutcome::Live { version, .. } => format!("v{version}"),
            ReadOutcome::NotFound => "404".to_owned(),
            ReadOutcome::Lagging => "503 replication-lag".to_owned(),
            ReadOutcome::Unavailable { detail } => format!("unavailable ({detail})"),
        };
        let token = self
            .token
            .as_ref()
            .map(|t| format!(" with the token of v{} (op {})", t.version, t.op))
            .unwrap_or_default();
        format!(
            "{} read by {} at t={:.3}–{:.3}s{token} answered {answer}",
            self.region.name(),
            self.reader,
            self.invoked,
            self.completed
        )
    }
}

/// Everything the clients did.
#[derive(Debug, Default)]
pub struct History {
    pub writes: Vec<WriteOp>,
    pub reads: Vec<ReadOp>,
}
