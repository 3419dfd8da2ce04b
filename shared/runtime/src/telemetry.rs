//! Structured logging and traces.
//!
//! Logs: JSON lines by default (what CloudWatch and Loki index), human-readable output with
//! `TANDEM_LOG_FORMAT=pretty`. Filtering follows `RUST_LOG` (default `info`), for the spans
//! exported as traces too.
//!
//! Traces: when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set,
//! the `tracing` spans are exported over OTLP/HTTP with JSON bodies (`/v1/traces` is appended to
//! the generic endpoint, as the OpenTelemetry specification says), batched on a thread of their
//! own with a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`, default 2048 spans: when the collector
//! is slower than the service, spans are dropped, never memory piled up), and flushed by
//! [`shutdown`]. The service name is `OTEL_SERVICE_NAME`, else the binary's; sampling follows
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default `parentbased_always_on`: a trace
//! is kept when its parent's `traceparent` says it is sampled). With no endpoint there is no
//! exporter and no OpenTelemetry layer: the spans cost what they cost before.
//!
//! Traces cross processes through W3C `traceparent` values: [`continue_trace`] makes a span the
//! child of one received (a request header, an outbox row, a Kafka header), and [`traceparent`]
//! gives the value to pass on for a span.

use std::sync::Mutex;
use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tandem_core::traceparent::TraceParent;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The exporting provider of the global subscriber, for [`flush`] and [`shutdown`].
static PROVIDER: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);

/// How long one export may take (the OTLP default, `OTEL_EXPORTER_OTLP_TIMEOUT`, is the same).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest collector response read back (a collector answers with a few bytes).
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Installs the global subscriber: logs, and traces when an OTLP endpoint is configured.
/// `service` names the process in traces unless `OTEL_SERVICE_NAME` does. Call it inside the
/// Tokio runtime (the exporter sends its requests there). Safe to call more than once (later
/// calls are ignored), which keeps tests that build several services in one process simple.
pub fn init(service: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let pretty = std::env::var("TANDEM_LOG_FORMAT").is_ok_and(|f| f == "pretty");
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let (pretty, json) = if pretty {
        (Some(fmt.with_target(false)), None)
    } else {
        (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            ),
        )
    };
    let endpoint = otlp_endpoint();
    let provider = match &endpoint {
        Some(_) => match build_provider(service, None) {
            Ok(provider) => Some(provider),
            Err(e) => {
                // Traces are an aid, not a dependency: the service starts without them.
                eprintln!("traces are not exported: {e:#}");
                None
            }
        },
        None => None,
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(pretty)
        .with(json)
        .with(provider.as_ref().map(otel_layer))
        .with(provider.as_ref().map(|_| Exporting))
        .try_init()
        .is_ok();
    match provider {
        Some(provider) if installed => {
            if let Ok(mut slot) = PROVIDER.lock() {
                *slot = Some(provider);
            }
            tracing::info!(
                endpoint = endpoint.as_deref().unwrap_or_default(),
                sampler = std::env::var("OTEL_TRACES_SAMPLER")
                    .unwrap_or_else(|_| "parentbased_always_on".to_owned()),
                sampler_arg = std::env::var("OTEL_TRACES_SAMPLER_ARG").unwrap_or_default(),
                "exporting traces over OTLP/HTTP"
            );
        }
        // Another subscriber was installed first: this provider has no spans to export.
        Some(provider) => {
            let _ = provider.shutdown();
        }
        None => {}
    }
}

/// Whether the current subscriber exports spans: callers skip spans that exist only for
/// traces when it does not.
pub fn enabled() -> bool {
    tracing::dispatcher::get_default(|dispatch| dispatch.downcast_ref::<Exporting>().is_some())
}

/// Marks a subscriber that exports spans (what [`enabled`] looks for).
struct Exporting;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Exporting {}

/// The layer turning `tracing` spans into OpenTelemetry spans.
fn otel_layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S> + use<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("tandem"))
        .with_location(false)
        .with_threads(false)
}

/// A subscriber of its own exporting to `endpoint` (the full URL, `.../v1/traces`), for code
/// that must not install a global one: a test serving a service in its own process sets it
/// around that service's futures (`tracing::instrument::WithSubscriber`). Nothing is logged.
pub fn exporting_dispatch(
    service: &str,
    endpoint: &str,
) -> anyhow::Result<(tracing::Dispatch, Traces)> {
    let provider = build_provider(service, Some(endpoint))?;
    let subscriber = tracing_subscriber::registry()
        .with(otel_layer(&provider))
        .with(Exporting);
    Ok((tracing::Dispatch::new(subscriber), Traces { provider }))
}

/// The exporter of an [`exporting_dispatch`].
#[derive(Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// Exports what is queued now, waiting for it.
    pub async fn flush(&self) {
        let provider = self.provider.clone();
        let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
    }
}

/// The configured OTLP endpoint (the traces-specific one first), if any.
fn otlp_endpoint() -> Option<String> {
    [
        std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT"),
    ]
    .into_iter()
    .filter_map(Result::ok)
    .map(|value| value.trim().to_owned())
    .find(|value| !value.is_empty())
}

/// A batching provider exporting over OTLP/HTTP with JSON bodies. The exporter reads its
/// endpoint, headers and timeout from the standard `OTEL_EXPORTER_OTLP_*` variables; the
/// batch processor its queue and delays from `OTEL_BSP_*`; the sampler `OTEL_TRACES_SAMPLER`.
/// `endpoint`, when given, replaces the variables' endpoint.
fn build_provider(service: &str, endpoint: Option<&str>) -> anyhow::Result<SdkTracerProvider> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| anyhow::anyhow!("telemetry::init ran outside the Tokio runtime"))?;
    let client = reqwest::Client::builder()
        .timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| anyhow::anyhow!("the OTLP HTTP client: {e}"))?;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_http_client(OtlpClient { client, runtime });
    if let Some(endpoint) = endpoint {
        exporter = exporter.with_endpoint(endpoint);
    }
    let exporter = exporter.build()?;
    let resource = if std::env::var("OTEL_SERVICE_NAME").is_ok_and(|name| !name.is_empty()) {
        Resource::builder().build()
    } else {
        Resource::builder()
            .with_service_name(service.to_owned())
            .build()
    };
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Exports what is queued now, waiting for it (a Lambda function, before its sandbox may be
/// frozen). Does nothing when traces are off.
pub async fn flush() {
    let provider = PROVIDER.lock().ok().and_then(|slot| slot.clone());
    if let Some(provider) = provider {
        // The export runs on the runtime while this waits: off the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
    }
}

/// Exports the spans still queued and stops the exporter: call it once the work has stopped.
/// Does nothing when traces are off.
pub async fn shutdown() {
    let provider = PROVIDER.lock().ok().and_then(|mut slot| slot.take());
    if let Some(provider) = provider {
        let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    }
}

/// Makes the W3C `traceparent` value the parent of `span` (which must not have been entered
/// yet). Does nothing when traces are off or the value is not valid trace context.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    if let Some(context) = remote_context(traceparent) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(context));
    }
}

/// `span`'s own trace context as a W3C `traceparent` value, to pass to whatever continues the
/// trace; `None` when traces are off (or the span is disabled).
pub fn traceparent(span: &tracing::Span) -> Option<TraceParent> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then(|| {
        let value = format!(
            "00-{}-{}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8()
        );
        TraceParent::parse(&value).unwrap_or_else(TraceParent::generate)
    })
}

/// A received `traceparent` as the remote span context it names.
fn remote_context(traceparent: &str) -> Option<SpanContext> {
    let value = TraceParent::parse(traceparent)?;
    let text = value.as_str();
    let trace_id = TraceId::from_hex(&text[3..35]).ok()?;
    let span_id = SpanId::from_hex(&text[36..52]).ok()?;
    let flags = u8::from_str_radix(&text[53..55], 16).ok()?;
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    ))
}

/// The exporter's HTTP client: the workspace's reqwest, its requests run on the service's
/// Tokio runtime (the batch processor calls the exporter from a thread of its own).
#[derive(Debug)]
struct OtlpClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpClient {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let client = self.client.clone();
        let task = self.runtime.spawn(async move {
            let request = reqwest::Request::try_from(request)?;
            let mut response = client.execute(request).await?;
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err(opentelemetry_http::HttpError::from(
                        "the collector's response is too large",
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            let mut out = opentelemetry_http::Response::new(opentelemetry_http::Bytes::from(body));
            *out.status_mut() = response.status();
            *out.headers_mut() = std::mem::take(response.headers_mut());
            Ok(out)
        });
        task.await?
    }
}

/// The subscriber of a command-line tool (`tandem`): human-readable lines on stderr, warnings
/// and errors only unless `RUST_LOG` says otherwise.
pub fn init_cli() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_received_traceparent_becomes_a_remote_parent() {
        let context = remote_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid trace context");
        assert_eq!(
            context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(context.span_id().to_string(), "00f067aa0ba902b7");
        assert!(context.is_sampled());
        assert!(context.is_remote());
        let unsampled = remote_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
            .expect("valid trace context");
        assert!(!unsampled.is_sampled());
        assert!(remote_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7").is_none());
    }
}
