//! Structured logging and traces.
//!
//! Logs: JSON lines by default (what CloudWatch and Loki index), human-readable output with
//! `TANDEM_LOG_FORMAT=pretty`. Filtering follows `RUST_LOG` (default `info`), for the spans
//! exported as traces too.
//!
//! Traces: when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set,
//! the `tracing` spans are exported over OTLP/HTTP (`/v1/traces` is appended to the generic
//! endpoint, as the OpenTelemetry specification says), with JSON bodies, or protobuf ones when
//! `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` (else `OTEL_EXPORTER_OTLP_PROTOCOL`) says
//! `http/protobuf`; `grpc` is refused at start-up ([`init`] fails naming the variable). They are
//! batched on a thread of their own with a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`, default
//! 2048 spans: when the collector is slower than the service, spans are dropped, never memory
//! piled up), flushed by [`flush`] (at most [`FLUSH_LIMIT`]: a Lambda function after each
//! invocation) and by [`shutdown`]. The service name is `OTEL_SERVICE_NAME`, else the binary's;
//! sampling follows `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default
//! `parentbased_always_on`: a trace is kept when its parent's `traceparent` says it is
//! sampled). With no endpoint there is no exporter and no OpenTelemetry layer: the spans cost
//! what they cost before.
//!
//! This module reads the protocol and the batch processor's settings itself (so a bad value is
//! refused with its name); the variables the OpenTelemetry SDK reads on its own are listed in
//! [`READ_BY_THE_SDK`], where `scripts/env_contract.py` finds them.
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
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tandem_core::traceparent::TraceParent;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{self, ConfigError};

/// The exporting provider of the global subscriber, for [`flush`] and [`shutdown`].
static PROVIDER: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);

/// How long one export may take (the OTLP default, `OTEL_EXPORTER_OTLP_TIMEOUT`, is the same).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest collector response read back (a collector answers with a few bytes).
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// The longest [`flush`] waits: a Lambda invocation is not held up by a slow collector for
/// longer (what is still queued then goes with the next export, or is lost with the sandbox).
pub const FLUSH_LIMIT: Duration = Duration::from_secs(2);

/// The `OTEL_*` variables the OpenTelemetry SDK and its OTLP exporter read themselves once an
/// endpoint is set (this module reads the others: endpoints, protocol, `OTEL_BSP_*`,
/// `OTEL_SERVICE_NAME`). `scripts/env_contract.py` reads this table, so a deployment may set
/// them. Not listed, because they do nothing here: `OTEL_EXPORTER_OTLP_COMPRESSION` (no
/// compression is built in; a value is ignored with a warning), `OTEL_BSP_EXPORT_TIMEOUT` and
/// `OTEL_BSP_MAX_CONCURRENT_EXPORTS` (only the SDK's experimental async processor uses them;
/// an export is bounded by `OTEL_EXPORTER_OTLP_TIMEOUT`).
pub const READ_BY_THE_SDK: &[&str] = &[
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_SPAN_EVENT_COUNT_LIMIT",
    "OTEL_SPAN_LINK_COUNT_LIMIT",
];

/// How spans are exported, read once at start-up.
#[derive(Debug, Clone)]
struct ExportSettings {
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as given), else `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// (`/v1/traces` appended by the exporter); `None`: traces are off.
    endpoint: Option<String>,
    protocol: Protocol,
    /// `OTEL_BSP_SCHEDULE_DELAY` (ms, default 5000): how long a span may wait for its batch.
    schedule_delay: Duration,
    /// `OTEL_BSP_MAX_QUEUE_SIZE` (default 2048): spans queued beyond it are dropped.
    max_queue_size: usize,
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` (default 512, at most the queue's size).
    max_export_batch_size: usize,
}

impl ExportSettings {
    fn from_env() -> Result<Self, ConfigError> {
        let max_queue_size = config::parsed_or("OTEL_BSP_MAX_QUEUE_SIZE", 2048_usize)?;
        if max_queue_size == 0 {
            return Err(ConfigError::Invalid {
                name: "OTEL_BSP_MAX_QUEUE_SIZE",
                value: "0".to_owned(),
                reason: "a queue of no spans exports nothing".to_owned(),
            });
        }
        Ok(Self {
            endpoint: otlp_endpoint(),
            protocol: protocol()?,
            schedule_delay: config::millis_or("OTEL_BSP_SCHEDULE_DELAY", Duration::from_secs(5))?,
            max_queue_size,
            max_export_batch_size: config::parsed_or("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512_usize)?
                .clamp(1, max_queue_size),
        })
    }
}

/// The OTLP encoding: `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else `OTEL_EXPORTER_OTLP_PROTOCOL`
/// (the signal's own variable wins, as the specification says), else `http/json`. The exporter
/// speaks OTLP over HTTP only: `grpc` (or anything else) is refused, naming what works.
fn protocol() -> Result<Protocol, ConfigError> {
    let (name, value) = match config::optional("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
        Some(value) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", value),
        None => match config::optional("OTEL_EXPORTER_OTLP_PROTOCOL") {
            Some(value) => ("OTEL_EXPORTER_OTLP_PROTOCOL", value),
            None => return Ok(Protocol::HttpJson),
        },
    };
    match value.trim() {
        "http/json" => Ok(Protocol::HttpJson),
        "http/protobuf" => Ok(Protocol::HttpBinary),
        _ => Err(ConfigError::Invalid {
            name,
            value,
            reason: "traces are exported over OTLP/HTTP only: use http/json (the default) or \
                     http/protobuf (grpc is not supported)"
                .to_owned(),
        }),
    }
}

/// Installs the global subscriber: logs, and traces when an OTLP endpoint is configured.
/// `service` names the process in traces unless `OTEL_SERVICE_NAME` does. Call it inside the
/// Tokio runtime (the exporter sends its requests there). Safe to call more than once (later
/// calls are ignored), which keeps tests that build several services in one process simple.
///
/// Fails, installing nothing, when a trace setting is invalid (an unsupported
/// `OTEL_EXPORTER_OTLP_PROTOCOL`, a malformed `OTEL_BSP_*`): the service should not start with
/// a configuration it ignores. An exporter that cannot be built for another reason is reported
/// and the service starts without traces: they are an aid, not a dependency.
pub fn init(service: &str) -> Result<(), ConfigError> {
    let settings = ExportSettings::from_env()?;
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
    let provider = match &settings.endpoint {
        Some(_) => match build_provider(service, &settings, None) {
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
                endpoint = settings.endpoint.as_deref().unwrap_or_default(),
                protocol = ?settings.protocol,
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
    Ok(())
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
    let provider = build_provider(service, &ExportSettings::from_env()?, Some(endpoint))?;
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

/// A batching provider exporting over OTLP/HTTP as `settings` say. The exporter reads its
/// endpoint, headers and timeout from the standard `OTEL_EXPORTER_OTLP_*` variables; the
/// sampler `OTEL_TRACES_SAMPLER` ([`READ_BY_THE_SDK`]). `endpoint`, when given, replaces the
/// variables' endpoint.
fn build_provider(
    service: &str,
    settings: &ExportSettings,
    endpoint: Option<&str>,
) -> anyhow::Result<SdkTracerProvider> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| anyhow::anyhow!("telemetry::init ran outside the Tokio runtime"))?;
    let client = reqwest::Client::builder()
        .timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| anyhow::anyhow!("the OTLP HTTP client: {e}"))?;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(settings.protocol)
        .with_http_client(OtlpClient { client, runtime });
    if let Some(endpoint) = endpoint {
        exporter = exporter.with_endpoint(endpoint);
    }
    let exporter = exporter.build()?;
    let batch = BatchConfigBuilder::default()
        .with_scheduled_delay(settings.schedule_delay)
        .with_max_queue_size(settings.max_queue_size)
        .with_max_export_batch_size(settings.max_export_batch_size)
        .build();
    let resource = if std::env::var("OTEL_SERVICE_NAME").is_ok_and(|name| !name.is_empty()) {
        Resource::builder().build()
    } else {
        Resource::builder()
            .with_service_name(service.to_owned())
            .build()
    };
    Ok(SdkTracerProvider::builder()
        .with_span_processor(
            BatchSpanProcessor::builder(exporter)
                .with_batch_config(batch)
                .build(),
        )
        .with_resource(resource)
        .build())
}

/// Exports what is queued now, waiting for it at most [`FLUSH_LIMIT`]: a Lambda function calls
/// it at the end of each invocation, since a frozen sandbox's exporter sends nothing (and the
/// sandbox may be retired before it thaws). Does nothing when traces are off.
pub async fn flush() {
    let provider = PROVIDER.lock().ok().and_then(|slot| slot.clone());
    if let Some(provider) = provider {
        // The export runs on the runtime while this waits: off the runtime's threads.
        let flushed = tokio::time::timeout(
            FLUSH_LIMIT,
            tokio::task::spawn_blocking(move || provider.force_flush()),
        )
        .await;
        match flushed {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::debug!(error = %e, "spans not exported"),
            Ok(Err(_)) => {}
            Err(_) => tracing::debug!(
                limit_ms = FLUSH_LIMIT.as_millis() as u64,
                "the span export did not finish in time; not waiting longer"
            ),
        }
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
