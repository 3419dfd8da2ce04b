//! Write forwarding: a Write API whose region is not the write region sends each write to the
//! write region's Write API (`TANDEM_WRITE_FORWARD_URL`) and returns its answer, so clients
//! may write to either region and a stale route is one inter-region round trip slower, never
//! wrong.
//!
//! Which region writes comes from this region's database (`tandem_store::roles`), read at most
//! once per [`ROLE_TTL`]; the database's own fence stays the authority: a write this process
//! believes local but the database refuses because another region now writes is forwarded
//! then. A forwarded request carries [`FORWARDED_FROM_HEADER`] and is never forwarded again,
//! so regions that disagree for a moment answer 503 rather than bounce a write between them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tandem_http::http::{
    CONSISTENCY_TOKEN_HEADER, FORWARDED_FROM_HEADER, FORWARDED_TO_HEADER, IDEMPOTENCY_KEY_HEADER,
    IDEMPOTENT_REPLAYED_HEADER, REGION_HEADER,
};
use tandem_http::problem::ApiError;
use tandem_runtime::metrics::Metrics;
use tandem_store::documents::Store;
use tandem_store::roles::{self, Role};

/// How long a role read from the database is trusted before it is read again.
pub const ROLE_TTL: Duration = Duration::from_secs(1);

/// The largest answer accepted from the write region: a document at its size limit, as JSON,
/// plus headroom for a problem document.
const MAX_ANSWER_BYTES: usize = tandem_core::limits::MAX_DOCUMENT_BYTES + 64 * 1024;

/// Request headers the write region needs to decide the write as if it had been sent there.
const FORWARDED_REQUEST_HEADERS: [HeaderName; 7] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    HeaderName::from_static(IDEMPOTENCY_KEY_HEADER),
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
];

/// Answer headers returned to the client as the write region gave them.
const RETURNED_ANSWER_HEADERS: [HeaderName; 6] = [
    header::CONTENT_TYPE,
    header::ETAG,
    header::LOCATION,
    header::RETRY_AFTER,
    HeaderName::from_static(CONSISTENCY_TOKEN_HEADER),
    HeaderName::from_static(IDEMPOTENT_REPLAYED_HEADER),
];

/// This region's role, as last read from its database.
#[derive(Clone, Default)]
pub struct RoleView {
    last: Arc<Mutex<Option<(Instant, Role)>>>,
}

impl RoleView {
    /// The role, read again when older than [`ROLE_TTL`]; `None` when the database has no role
    /// or cannot be read (the write then goes to the database, which decides).
    pub async fn get(&self, store: &Store) -> Option<Role> {
        if let Ok(last) = self.last.lock() {
            if let Some((at, role)) = last.as_ref() {
                if at.elapsed() < ROLE_TTL {
                    return Some(role.clone());
                }
            }
        }
        match roles::current(store.pool()).await {
            Ok(Some(role)) => {
                if let Ok(mut last) = self.last.lock() {
                    *last = Some((Instant::now(), role.clone()));
                }
                Some(role)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the region role");
                None
            }
        }
    }

    /// Forgets the role (the database just said it changed).
    pub fn invalidate(&self) {
        if let Ok(mut last) = self.last.lock() {
            *last = None;
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ForwardLabels {
    outcome: &'static str,
}

/// Sends writes to the write region's Write API.
#[derive(Clone)]
pub struct Forwarder {
    client: reqwest::Client,
    /// `TANDEM_WRITE_FORWARD_URL`, without a trailing `/`.
    base: String,
    region: HeaderValue,
    forwards: Family<ForwardLabels, Counter>,
}

/// A write as it arrived, to be sent on unchanged.
pub struct Incoming<'a> {
    pub method: Method,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
}

impl Forwarder {
    /// `timeout` bounds each forwarded write, connection included.
    pub fn new(
        base: &str,
        region: &str,
        timeout: Duration,
        metrics: &Metrics,
    ) -> anyhow::Result<Self> {
        let forwards = Family::<ForwardLabels, Counter>::default();
        metrics.register(
            "write_forwards",
            "Writes sent to the write region's Write API, by outcome: answered (any status) or unreachable",
            forwards.clone(),
        );
        Ok(Self {
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2).min(timeout))
                .timeout(timeout)
                .redirect(reqwest::redirect::Policy::none())
                .pool_idle_timeout(Duration::from_secs(60))
                .build()?,
            base: base.trim_end_matches('/').to_owned(),
            region: HeaderValue::from_str(region)?,
            forwards,
        })
    }

    /// Sends the write on and returns the write region's answer: its status, body and the
    /// headers a client acts on, plus [`FORWARDED_TO_HEADER`]. The write region unreachable, or
    /// its answer unreadable, is a 503 (whether it committed is unknown: the client retries with
    /// its `Idempotency-Key`, as after any lost answer).
    pub async fn forward(&self, incoming: Incoming<'_>) -> Result<Response, ApiError> {
        let mut request = self
            .client
            .request(incoming.method, format!("{}{}", self.base, incoming.path))
            .header(FORWARDED_FROM_HEADER, self.region.clone())
            .body(incoming.body);
        for name in &FORWARDED_REQUEST_HEADERS {
            for value in incoming.headers.get_all(name) {
                request = request.header(name, value);
            }
        }
        let answer = match self.read_answer(request).await {
            Ok(answer) => answer,
            Err(e) => {
                self.record_forward("unreachable");
                return Err(ApiError::Unavailable {
                    dependency: "the write region",
                    source: Some(e),
                });
            }
        };
        self.record_forward("answered");
        Ok(answer)
    }

    async fn read_answer(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Response> {
        let mut answer = request.send().await?;
        let status = StatusCode::from_u16(answer.status().as_u16())?;
        let mut headers = HeaderMap::new();
        for name in &RETURNED_ANSWER_HEADERS {
            for value in answer.headers().get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        let write_region = answer
            .headers()
            .get(REGION_HEADER)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("unknown"));
        let mut body = Vec::new();
        while let Some(chunk) = answer.chunk().await? {
            anyhow::ensure!(
                body.len() + chunk.len() <= MAX_ANSWER_BYTES,
                "the write region's answer exceeds {MAX_ANSWER_BYTES} bytes"
            );
            body.extend_from_slice(&chunk);
        }
        let mut response = (status, Bytes::from(body)).into_response();
        *response.headers_mut() = headers;
        response
            .headers_mut()
            .insert(HeaderName::from_static(FORWARDED_TO_HEADER), write_region);
        Ok(response)
    }

    /// Asks the other region's Write API which region writes (`GET /leader`, bounded by
    /// `timeout`) and, when it names a newer write epoch than this region's database records,
    /// records it (`tandem_store::roles::promote`, which waits for this region's writes in
    /// flight): a write region deposed while it was down or cut off stops taking writes as
    /// soon as it can reach the other region, before its consumer hears the new epoch from the
    /// stream. Returns whether it learned something. An unreachable peer teaches nothing.
    pub async fn learn_from_peer(&self, store: &Store, view: &RoleView, timeout: Duration) -> bool {
        let Ok(Some(own)) = roles::current(store.pool()).await else {
            return false;
        };
        if !own.accepts_writes() {
            return false;
        }
        let answer = async {
            let answer = self
                .client
                .get(format!("{}/leader", self.base))
                .timeout(timeout)
                .send()
                .await?;
            anyhow::Ok(answer.json::<serde_json::Value>().await?)
        }
        .await;
        let Ok(peer) = answer else {
            return false;
        };
        let (Some(write_region), Some(epoch)) =
            (peer["write_region"].as_str(), peer["write_epoch"].as_i64())
        else {
            return false;
        };
        if epoch <= own.write_epoch || write_region == own.region {
            return false;
        }
        match roles::promote(store.pool(), write_region, epoch).await {
            Ok(_) => {
                view.invalidate();
                tracing::warn!(
                    write_region,
                    write_epoch = epoch,
                    previous_write_epoch = own.write_epoch,
                    "the other region reports a newer write epoch: recorded; this region's writes now go there"
                );
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not record the other region's newer write epoch");
                false
            }
        }
    }

    /// Runs [`Self::learn_from_peer`] every second while the process lives (a pod; a Lambda
    /// function's environment runs it while invoked).
    pub fn spawn_peer_watch(&self, store: Store, view: RoleView) {
        let forwarder = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                forwarder
                    .learn_from_peer(&store, &view, Duration::from_secs(1))
                    .await;
            }
        });
    }

    fn record_forward(&self, outcome: &'static str) {
        self.forwards
            .get_or_create(&ForwardLabels { outcome })
            .inc();
    }
}
