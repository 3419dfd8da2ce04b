//! OpenTelemetry traces across the regions: a write's trace holds the Write API's request and
//! its transaction, the relay's publish and Region 2's apply, linked through the `traceparent`
//! of the outbox row and of the Kafka headers. The collector is a real OTLP/HTTP receiver (JSON
//! bodies) served by the test; the relay and the consumer are the real binaries, pointed at it
//! with the standard `OTEL_EXPORTER_OTLP_ENDPOINT`. The Write API runs in the test's process:
//! it exports through a subscriber of its own, set around its requests only
//! (`telemetry::exporting_dispatch`), so no other test of this binary exports anything.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use base64::Engine as _;
use serde_json::{Value, json};
use tandem_tests::TwoRegions;
use tandem_tests::services::serve;
use tracing::instrument::WithSubscriber;

/// One span as the collector received it.
#[derive(Debug, Clone)]
pub(crate) struct ReceivedSpan {
    pub(crate) service: String,
    pub(crate) name: String,
    pub(crate) trace_id: String,
    pub(crate) span_id: String,
    pub(crate) parent_span_id: String,
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with a JSON `ExportTraceServiceRequest`.
pub(crate) struct Collector {
    pub(crate) url: String,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl Collector {
    pub(crate) async fn start() -> Self {
        let spans: Arc<Mutex<Vec<ReceivedSpan>>> = Arc::default();
        let router = Router::new()
            .route("/v1/traces", post(receive))
            .with_state(spans.clone());
        Self {
            url: serve(router).await,
            spans,
        }
    }

    pub(crate) fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans
            .lock()
            .expect("spans")
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

async fn receive(
    State(spans): State<Arc<Mutex<Vec<ReceivedSpan>>>>,
    body: axum::body::Bytes,
) -> (http::StatusCode, axum::Json<Value>) {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return (http::StatusCode::BAD_REQUEST, axum::Json(json!({})));
    };
    let mut received = Vec::new();
    for resource in request["resourceSpans"].as_array().into_iter().flatten() {
        let service = resource["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "service.name")
            .and_then(|a| a["value"]["stringValue"].as_str())
            .unwrap_or_default()
            .to_owned();
        for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
            for span in scope["spans"].as_array().into_iter().flatten() {
                received.push(ReceivedSpan {
                    service: service.clone(),
                    name: span["name"].as_str().unwrap_or_default().to_owned(),
                    trace_id: id(&span["traceId"]),
                    span_id: id(&span["spanId"]),
                    parent_span_id: id(&span["parentSpanId"]),
                });
            }
        }
    }
    spans.lock().expect("spans").extend(received);
    (http::StatusCode::OK, axum::Json(json!({})))
}

/// An OTLP/JSON id as lowercase hex: the specification's encoding is hex; base64 (protobuf's
/// JSON mapping of bytes) is accepted too.
fn id(value: &Value) -> String {
    let text = value.as_str().unwrap_or_default();
    let is_hex = text.len() % 2 == 0 && text.bytes().all(|b| b.is_ascii_hexdigit());
    if is_hex {
        return text.to_ascii_lowercase();
    }
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map(hex_of)
        .unwrap_or_default()
}

fn hex_of(bytes: Vec<u8>) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writes_trace_holds_its_request_transaction_publish_and_apply() {
    let collector = Collector::start().await;
    let mut regions = TwoRegions::start_without_workers().await;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.as_str()),
        // Export within a tenth of a second instead of five.
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    regions.start_relay_with(&otel);
    regions.start_consumer_with(&otel);
    regions.wait_region2_ready(Duration::from_secs(90)).await;

    // Region 1's Write API, exporting as `tandem-write`.
    let (dispatch, traces) = tandem_runtime::telemetry::exporting_dispatch(
        "tandem-write",
        &format!("{}/v1/traces", collector.url),
    )
    .expect("the Write API's exporter");
    let router = tandem_write::router(regions.region1.write_state.clone()).layer(
        tower::util::MapFutureLayer::new(
            move |future: axum::routing::future::RouteFuture<std::convert::Infallible>| {
                future.with_subscriber(dispatch.clone())
            },
        ),
    );
    let write_url = serve(router).await;

    let client_span = "00f067aa0ba902b7";
    // Span export is best effort: a batch the exporter could not deliver (a loaded machine)
    // is dropped, as with any OTLP exporter. So a trace that stays incomplete for 30 s is
    // written again, at most three times in all.
    let mut attempt = 0;
    let (trace_id, request_span_id, spans) = loop {
        attempt += 1;
        let doc = format!("doc-{attempt}");
        let trace_id = uuid::Uuid::now_v7().simple().to_string();
        let created = regions
            .region1
            .client
            .put(format!("{write_url}/v1/traced/{doc}"))
            .bearer_auth(&regions.region1.token)
            .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
            .json(&json!({"n": 1}))
            .send()
            .await
            .expect("PUT");
        assert_eq!(created.status(), 201);
        regions.wait_converged(Duration::from_secs(60)).await;

        // The outbox row continues the trace from the request's own span.
        let stored: String = regions
            .region1
            .pool
            .get()
            .await
            .expect("db")
            .query_one(
                "SELECT traceparent FROM outbox WHERE collection = 'traced' AND document_id = $1",
                &[&doc],
            )
            .await
            .expect("the outbox row")
            .get(0);
        assert_eq!(
            &stored[3..35],
            trace_id,
            "the outbox row left the client's trace"
        );
        let request_span_id = stored[36..52].to_owned();
        assert_ne!(
            request_span_id, client_span,
            "the outbox row names the client's span, not the request's"
        );

        // Every service's spans arrive (the processes export every 100 ms; generous deadline).
        let wanted = [
            ("tandem-write", "PUT /v1/{collection}/{id}"),
            ("tandem-write", "transaction"),
            ("tandem-outbox-relay", "publish"),
            ("tandem-region2-consumer", "apply"),
        ];
        let deadline = Instant::now() + Duration::from_secs(30);
        let complete = loop {
            traces.flush().await;
            let spans = collector.trace(&trace_id);
            if wanted.iter().all(|(service, name)| {
                spans
                    .iter()
                    .any(|s| s.service == *service && s.name == *name)
            }) {
                break Ok(spans);
            }
            if Instant::now() >= deadline {
                break Err(spans);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        match complete {
            Ok(spans) => break (trace_id, request_span_id, spans),
            Err(spans) if attempt < 3 => {
                eprintln!("trace {trace_id} incomplete after 30 s, writing again: {spans:#?}")
            }
            Err(spans) => panic!(
                "three traces incomplete after 30 s each; the last: {spans:#?}\nrelay:\n{}\nconsumer:\n{}",
                regions.relays[0].log_tail(),
                regions.consumers[0].log_tail()
            ),
        }
    };
    let one = |service: &str, name: &str| -> ReceivedSpan {
        let found: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| s.service == service && s.name == name)
            .collect();
        assert_eq!(found.len(), 1, "{service} {name}: {spans:#?}");
        found[0].clone()
    };
    let by_id: HashMap<&str, &ReceivedSpan> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let ancestors = |span: &ReceivedSpan| -> Vec<String> {
        let mut chain = Vec::new();
        let mut parent = span.parent_span_id.clone();
        while let Some(next) = by_id.get(parent.as_str()) {
            chain.push(next.span_id.clone());
            parent = next.parent_span_id.clone();
        }
        chain.push(parent);
        chain
    };

    let request = one("tandem-write", "PUT /v1/{collection}/{id}");
    assert_eq!(
        request.parent_span_id, client_span,
        "the request span is not the child of the client's traceparent"
    );
    assert_eq!(
        request.span_id, request_span_id,
        "the outbox row does not carry the request span's context"
    );
    let transaction = one("tandem-write", "transaction");
    assert!(
        ancestors(&transaction).contains(&request.span_id),
        "the transaction is not inside the request: {spans:#?}"
    );
    // A publish or an apply retried is a span per attempt: each must sit in the same place.
    let publishes: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.service == "tandem-outbox-relay" && s.name == "publish")
        .collect();
    for publish in &publishes {
        assert_eq!(
            publish.parent_span_id, request.span_id,
            "the relay's publish is not the child of the request (through the outbox row)"
        );
    }
    let applies: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.service == "tandem-region2-consumer" && s.name == "apply")
        .collect();
    for apply in &applies {
        assert!(
            publishes.iter().any(|p| p.span_id == apply.parent_span_id),
            "Region 2's apply is not the child of the publish (through the Kafka headers): {spans:#?}"
        );
    }
    for span in [&request, &transaction]
        .into_iter()
        .chain(publishes)
        .chain(applies)
    {
        assert_eq!(span.trace_id, trace_id);
        assert_eq!(span.span_id.len(), 16, "{span:?}");
    }
}
