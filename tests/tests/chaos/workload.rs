//! The clients: writers that each own a disjoint set of documents and write them one
//! operation at a time, and readers in both regions. Every choice comes from a seeded RNG;
//! every operation is recorded in the history with its invocation and completion time.
//!
//! A writer that gets no definite answer handles it as a careful client would: a write with an
//! `Idempotency-Key` is retried with the same key until the answer is definite; a write without
//! one is indeterminate, and the writer re-reads the document from Region 1 to learn where it
//! stands before going on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{Value, json};

use crate::history::{
    Ack, COLLECTION, Clock, Learned, ReadOp, ReadOutcome, Region, TokenRef, WriteKind, WriteOp,
    WriteOutcome,
};

/// The shape of the load.
#[derive(Debug, Clone)]
pub struct Shape {
    pub writers: usize,
    pub documents_per_writer: usize,
    pub region2_readers: usize,
    pub region1_readers: usize,
    /// Share of writes that carry an `Idempotency-Key`.
    pub keyed_share: f64,
    /// Share of reads that carry the consistency token of the document's latest
    /// acknowledged write.
    pub token_share: f64,
    /// At most this many writes per writer (the run is also bounded in time).
    pub max_writes_per_writer: u64,
}

/// What every client task shares.
pub struct Context {
    pub clock: Clock,
    pub seed: u64,
    pub shape: Shape,
    pub write_url: String,
    pub read1_url: String,
    pub read2_url: String,
    pub jwt: String,
    writes: reqwest::Client,
    reads: reqwest::Client,
    next_op: AtomicU64,
    /// Set when the nemesis is done: every client finishes its operation and returns.
    stopped: AtomicBool,
    /// The latest acknowledged write's token per document, for the readers.
    tokens: Mutex<HashMap<String, TokenRef>>,
}

impl Context {
    pub fn new(
        clock: Clock,
        seed: u64,
        shape: Shape,
        urls: [String; 3],
        jwt: String,
    ) -> anyhow::Result<Arc<Self>> {
        let [write_url, read1_url, read2_url] = urls;
        Ok(Arc::new(Self {
            clock,
            seed,
            shape,
            write_url,
            read1_url,
            read2_url,
            jwt,
            // Longer than the Write API's own request timeout (10 s), so that a live server
            // answers (503 at worst) before the client gives up.
            writes: reqwest::Client::builder()
                .timeout(Duration::from_secs(12))
                .connect_timeout(Duration::from_secs(2))
                .build()?,
            // A token read waits at most 1 s in Region 2.
            reads: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .connect_timeout(Duration::from_secs(2))
                .build()?,
            next_op: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            tokens: Mutex::new(HashMap::new()),
        }))
    }

    /// Ends the workload.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    fn running(&self) -> bool {
        !self.stopped.load(Ordering::Relaxed)
    }

    /// Every document of the run, `w{writer}-d{n}`.
    pub fn documents(&self) -> Vec<String> {
        (0..self.shape.writers)
            .flat_map(|w| (0..self.shape.documents_per_writer).map(move |d| document(w, d)))
            .collect()
    }

    pub fn latest_token(&self, doc: &str) -> Option<TokenRef> {
        self.tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(doc)
            .cloned()
    }

    fn remember_token(&self, doc: &str, token: TokenRef) {
        let mut tokens = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if tokens.get(doc).is_none_or(|t| t.version < token.version) {
            tokens.insert(doc.to_owned(), token);
        }
    }

    fn url(&self, base: &str, doc: &str) -> String {
        format!("{base}/v1/{COLLECTION}/{doc}")
    }

    /// One GET of `doc`, recorded.
    pub async fn read(
        &self,
        region: Region,
        reader: &str,
        doc: &str,
        token: Option<TokenRef>,
    ) -> ReadOp {
        let base = match region {
            Region::One => &self.read1_url,
            Region::Two => &self.read2_url,
        };
        let mut request = self.reads.get(self.url(base, doc));
        if let Some(token) = &token {
            request = request.header("x-consistency-token", &token.token);
        }
        let invoked = self.clock.now();
        let (outcome, lag_ms) = match request.send().await {
            Ok(response) => {
                let lag_ms = response
                    .headers()
                    .get("x-tandem-replication-lag-ms")
                    .and_then(|v| v.to_str().ok()?.parse().ok());
                (read_outcome(response).await, lag_ms)
            }
            Err(e) => (
                ReadOutcome::Unavailable {
                    detail: error_kind(&e),
                },
                None,
            ),
        };
        ReadOp {
            region,
            reader: reader.to_owned(),
            doc: doc.to_owned(),
            token,
            invoked,
            completed: self.clock.now(),
            outcome,
            lag_ms,
        }
    }
}

pub fn document(writer: usize, n: usize) -> String {
    format!("w{writer}-d{n:03}")
}

async fn read_outcome(response: reqwest::Response) -> ReadOutcome {
    let status = response.status().as_u16();
    let etag = etag_version(response.headers());
    let text = response.text().await.unwrap_or_default();
    match status {
        200 => match serde_json::from_str::<Value>(&text) {
            Ok(body) => match body["version"].as_i64() {
                Some(version) => ReadOutcome::Live {
                    version,
                    etag,
                    data: body["data"].clone(),
                },
                None => ReadOutcome::Unavailable {
                    detail: format!("200 without a version: {text}"),
                },
            },
            Err(_) => ReadOutcome::Unavailable {
                detail: format!("200 with a body that is not JSON: {text}"),
            },
        },
        404 => ReadOutcome::NotFound,
        503 if problem_type(&text).is_some_and(|t| t.ends_with("/replication-lag")) => {
            ReadOutcome::Lagging
        }
        other => ReadOutcome::Unavailable {
            detail: format!(
                "{other} {}",
                problem_type(&text).unwrap_or_else(|| "(no problem type)".to_owned())
            ),
        },
    }
}

fn problem_type(text: &str) -> Option<String> {
    serde_json::from_str::<Value>(text)
        .ok()?
        .get("type")?
        .as_str()
        .map(str::to_owned)
}

fn etag_version(headers: &reqwest::header::HeaderMap) -> Option<i64> {
    headers
        .get("etag")?
        .to_str()
        .ok()?
        .trim_matches('"')
        .parse()
        .ok()
}

fn error_kind(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".to_owned()
    } else if e.is_connect() {
        "connection refused".to_owned()
    } else {
        // The innermost cause ("connection closed before message completed", …) says what
        // happened; the outer ones only repeat the URL.
        let mut cause: &dyn std::error::Error = e;
        while let Some(source) = cause.source() {
            cause = source;
        }
        format!("connection error: {cause}")
    }
}

/// A writer's belief about one of its documents.
#[derive(Debug, Clone)]
enum Belief {
    Absent,
    Live,
    Unknown,
}

/// Writes the writer's documents until the workload is stopped (or its write budget is
/// spent); returns its writes and the Region 1 reads it made to resolve indeterminate ones.
pub async fn run_writer(context: Arc<Context>, writer: usize) -> (Vec<WriteOp>, Vec<ReadOp>) {
    let mut rng = StdRng::seed_from_u64(context.seed ^ (0x5752_4954_4552 + writer as u64));
    let documents: Vec<String> = (0..context.shape.documents_per_writer)
        .map(|d| document(writer, d))
        .collect();
    let mut beliefs: HashMap<String, Belief> = documents
        .iter()
        .map(|d| (d.clone(), Belief::Absent))
        .collect();
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    let name = format!("writer-{writer}");
    while context.running() && (writes.len() as u64) < context.shape.max_writes_per_writer {
        let doc = documents[rng.random_range(0..documents.len())].clone();
        let id = context.next_op.fetch_add(1, Ordering::Relaxed);
        let belief = beliefs.get(&doc).cloned().unwrap_or(Belief::Unknown);
        let kind = match belief {
            Belief::Absent | Belief::Unknown => WriteKind::Put(put_body(&mut rng, writer, id)),
            Belief::Live => match rng.random_range(0..100) {
                0..45 => WriteKind::Put(put_body(&mut rng, writer, id)),
                45..80 => WriteKind::Patch(patch_body(&mut rng, id)),
                _ => WriteKind::Delete,
            },
        };
        let keyed = rng.random_bool(context.shape.keyed_share);
        let mut op = WriteOp {
            id,
            writer,
            doc: doc.clone(),
            kind,
            idempotency_key: keyed.then(|| format!("chaos-{}-{id}", context.seed)),
            trace_id: format!("{:016x}{:016x}", context.seed | 1 << 63, id + 1),
            invoked: context.clock.now(),
            completed: 0.0,
            attempts: 0,
            outcome: WriteOutcome::Indeterminate {
                detail: "not sent".to_owned(),
            },
            learned: None,
        };
        send_write(&context, &mut op).await;
        let next = match &op.outcome {
            WriteOutcome::Acknowledged(ack) => {
                if let Some(token) = &ack.token {
                    context.remember_token(
                        &doc,
                        TokenRef {
                            token: token.clone(),
                            version: ack.version,
                            op: id,
                            delete: matches!(op.kind, WriteKind::Delete),
                        },
                    );
                }
                if matches!(op.kind, WriteKind::Delete) {
                    Belief::Absent
                } else {
                    Belief::Live
                }
            }
            WriteOutcome::Refused {
                status: Some(404), ..
            } => Belief::Absent,
            WriteOutcome::Refused { .. } => belief,
            WriteOutcome::Indeterminate { .. } => {
                let (learned, mut rereads) = learn(&context, &name, &doc).await;
                reads.append(&mut rereads);
                let next = match learned {
                    Learned::Live { .. } => Belief::Live,
                    Learned::Absent => Belief::Absent,
                    Learned::Unknown => Belief::Unknown,
                };
                op.learned = Some(learned);
                next
            }
        };
        beliefs.insert(doc, next);
        writes.push(op);
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
    }
    (writes, reads)
}

/// A document with a few fields, nested objects and arrays; `op` makes every written state
/// unique.
fn put_body(rng: &mut StdRng, writer: usize, op: u64) -> Value {
    json!({
        "writer": writer,
        "op": op,
        "n": rng.random_range(0..1000),
        "text": WORDS[rng.random_range(0..WORDS.len())],
        "tags": {"a": rng.random_range(0..10), "b": WORDS[rng.random_range(0..WORDS.len())]},
        "list": [rng.random_range(0..10), rng.random_range(0..10)],
    })
}

/// A merge patch that sets, replaces, nests and removes (`null`) members.
fn patch_body(rng: &mut StdRng, op: u64) -> Value {
    let mut patch = json!({"op": op});
    let object = patch.as_object_mut().expect("an object");
    if rng.random_bool(0.5) {
        object.insert("n".into(), json!(rng.random_range(0..1000)));
    }
    if rng.random_bool(0.2) {
        object.insert("text".into(), Value::Null);
    }
    if rng.random_bool(0.6) {
        let mut tags = serde_json::Map::new();
        if rng.random_bool(0.5) {
            tags.insert("a".into(), Value::Null);
        }
        tags.insert("c".into(), json!(WORDS[rng.random_range(0..WORDS.len())]));
        object.insert("tags".into(), Value::Object(tags));
    }
    if rng.random_bool(0.3) {
        object.insert(
            "extra".into(),
            if rng.random_bool(0.3) {
                Value::Null
            } else {
                json!({"x": rng.random_range(0..10), "deep": {"y": [1, 2]}})
            },
        );
    }
    if rng.random_bool(0.2) {
        object.insert("list".into(), json!([rng.random_range(0..10)]));
    }
    patch
}

const WORDS: &[&str] = &["alpha", "beta", "gamma", "delta", "omega", "région", "日本"];

/// Sends a write until its outcome is definite, or once when it carries no key.
async fn send_write(context: &Context, op: &mut WriteOp) {
    // A keyed write is retried with its key until definite, within a bound.
    let retry_until = Instant::now() + Duration::from_secs(60);
    let mut maybe_applied = false;
    loop {
        op.attempts += 1;
        let url = context.url(&context.write_url, &op.doc);
        let mut request = match &op.kind {
            WriteKind::Put(body) => context
                .writes
                .request(Method::PUT, &url)
                .header("content-type", "application/json")
                .body(body.to_string()),
            WriteKind::Patch(patch) => context
                .writes
                .request(Method::PATCH, &url)
                .header("content-type", "application/merge-patch+json")
                .body(patch.to_string()),
            WriteKind::Delete => context.writes.request(Method::DELETE, &url),
        };
        request = request.bearer_auth(&context.jwt).header(
            "traceparent",
            format!("00-{}-{:016x}-01", op.trace_id, op.attempts),
        );
        if let Some(key) = &op.idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let indeterminate = match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                if response.status().is_success() {
                    op.outcome = WriteOutcome::Acknowledged(ack(status, response).await);
                    break;
                }
                let text = response.text().await.unwrap_or_default();
                let detail = format!(
                    "{status} {}",
                    problem_type(&text).unwrap_or_else(|| text.chars().take(200).collect())
                );
                if status < 500 {
                    op.outcome = WriteOutcome::Refused {
                        status: Some(status),
                        detail,
                    };
                    break;
                }
                detail
            }
            // Nothing was sent: this attempt changed nothing.
            Err(e) if e.is_connect() => {
                if op.idempotency_key.is_none() || Instant::now() > retry_until {
                    op.outcome = if maybe_applied {
                        WriteOutcome::Indeterminate {
                            detail: "an earlier attempt got no answer".to_owned(),
                        }
                    } else {
                        WriteOutcome::Refused {
                            status: None,
                            detail: error_kind(&e),
                        }
                    };
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => error_kind(&e),
        };
        maybe_applied = true;
        if op.idempotency_key.is_none() || Instant::now() > retry_until {
            op.outcome = WriteOutcome::Indeterminate {
                detail: indeterminate,
            };
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    op.completed = context.clock.now();
}

async fn ack(status: u16, response: reqwest::Response) -> Ack {
    let headers = response.headers();
    let etag = etag_version(headers);
    let token = headers
        .get("x-consistency-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let replayed = headers
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let body: Option<Value> = response.json().await.ok();
    let version = body
        .as_ref()
        .and_then(|b| b["version"].as_i64())
        .or(etag)
        .unwrap_or(-1);
    Ack {
        status,
        version,
        etag,
        token,
        data: body.map(|b| b["data"].clone()),
        replayed,
    }
}

/// After an indeterminate write: what Region 1 holds now (retrying until it answers, bounded).
async fn learn(context: &Context, reader: &str, doc: &str) -> (Learned, Vec<ReadOp>) {
    let mut reads = Vec::new();
    // A write that failed in flight may still be committing.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let read = context.read(Region::One, reader, doc, None).await;
        let learned = match &read.outcome {
            ReadOutcome::Live { version, .. } => Some(Learned::Live { version: *version }),
            ReadOutcome::NotFound => Some(Learned::Absent),
            _ => None,
        };
        reads.push(read);
        if let Some(learned) = learned {
            return (learned, reads);
        }
        if Instant::now() > deadline {
            return (Learned::Unknown, reads);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads random documents of the run in `region` until the workload is stopped; a share of
/// the reads carries the token of the document's latest acknowledged write.
pub async fn run_reader(context: Arc<Context>, region: Region, index: usize) -> Vec<ReadOp> {
    let salt = match region {
        Region::One => 0x5231_0000,
        Region::Two => 0x5232_0000,
    };
    let mut rng = StdRng::seed_from_u64(context.seed ^ (salt + index as u64));
    let documents = context.documents();
    let name = format!("{}-reader-{index}", region.name());
    let mut reads = Vec::new();
    while context.running() {
        let doc = &documents[rng.random_range(0..documents.len())];
        let token = if rng.random_bool(context.shape.token_share) {
            context.latest_token(doc)
        } else {
            None
        };
        reads.push(context.read(region, &name, doc, token).await);
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..10))).await;
    }
    reads
}
