//! `tandem_runtime::telemetry` as a service starts it, each case in a child process of its
//! own (the subscriber is global, and the settings are the process's environment).

use std::process::Command;

use tandem_runtime::telemetry;

const CHILD: &str = "TANDEM_TELEMETRY_TEST_CHILD";
const CLIENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Runs `test` again in a child process with `env` as its only OTLP settings.
fn in_child(test: &str, env: &[(&str, &str)]) {
    let mut command = Command::new(std::env::current_exe().expect("test binary"));
    command
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1");
    for name in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SERVICE_NAME",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG",
    ] {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    let output = command.output().expect("run the child test");
    assert!(
        output.status.success(),
        "{test} failed in its child process:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn without_an_endpoint_no_span_is_exported_and_the_service_starts() {
    if std::env::var_os(CHILD).is_none() {
        // An empty value counts as unset.
        return in_child(
            "without_an_endpoint_no_span_is_exported_and_the_service_starts",
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "")],
        );
    }
    runtime().block_on(async {
        telemetry::init("tandem-test").expect("valid trace settings");
        assert!(!telemetry::enabled(), "no endpoint, yet spans are exported");
        let span = tracing::info_span!("request");
        telemetry::continue_trace(&span, CLIENT);
        assert_eq!(
            telemetry::traceparent(&span),
            None,
            "a span has trace context although nothing exports it"
        );
        tracing::info!("logging works without traces");
        telemetry::flush().await;
        telemetry::shutdown().await;
    });
}

#[test]
fn with_an_endpoint_spans_continue_a_received_trace_even_when_the_collector_is_down() {
    if std::env::var_os(CHILD).is_none() {
        // Port 9 (discard) on loopback: nothing listens, every export fails at once.
        return in_child(
            "with_an_endpoint_spans_continue_a_received_trace_even_when_the_collector_is_down",
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000"),
            ],
        );
    }
    runtime().block_on(async {
        telemetry::init("tandem-test").expect("valid trace settings");
        assert!(
            telemetry::enabled(),
            "an endpoint is set, yet nothing exports"
        );
        let span = tracing::info_span!("request");
        telemetry::continue_trace(&span, CLIENT);
        let own = telemetry::traceparent(&span).expect("the span's trace context");
        assert_eq!(
            own.trace_id(),
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "the span left the client's trace"
        );
        assert_ne!(
            &own.as_str()[36..52],
            "00f067aa0ba902b7",
            "the span passes on its parent's id instead of its own"
        );
        assert!(own.as_str().ends_with("-01"), "sampled as its parent was");
        let child = span.in_scope(|| tracing::info_span!("transaction"));
        let child_context = telemetry::traceparent(&child).expect("the child's context");
        assert_eq!(child_context.trace_id(), own.trace_id());
        drop(child);
        drop(span);
        // The collector is down: flushing and stopping end anyway, without failing.
        telemetry::flush().await;
        telemetry::shutdown().await;
    });
}

/// What an OTLP/HTTP receiver got: one request's path, content type and body.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    content_type: String,
    body: Vec<u8>,
}

/// A minimal OTLP/HTTP receiver on loopback (HTTP/1.1, keep-alive, `Content-Length` bodies):
/// enough for the exporter, with no server crate in this layer. Runs on `runtime`.
fn receiver(
    runtime: &tokio::runtime::Runtime,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<Received>>>) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let received: std::sync::Arc<std::sync::Mutex<Vec<Received>>> = Default::default();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the receiver");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let store = received.clone();
    runtime.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let store = store.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let mut head = Vec::new();
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match stream.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => head.push(line.trim_end().to_owned()),
                        }
                    }
                    let header = |name: &str| {
                        head.iter()
                            .filter_map(|l| l.split_once(':'))
                            .find(|(n, _)| n.eq_ignore_ascii_case(name))
                            .map(|(_, v)| v.trim().to_owned())
                            .unwrap_or_default()
                    };
                    let length: usize = header("content-length").parse().unwrap_or(0);
                    let mut body = vec![0; length.min(16 * 1024 * 1024)];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let path = head
                        .first()
                        .and_then(|l| l.split_whitespace().nth(1))
                        .unwrap_or_default()
                        .to_owned();
                    let content_type = header("content-type");
                    let answer: &[u8] = if content_type.contains("json") {
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
                    };
                    store.lock().expect("received").push(Received {
                        path,
                        content_type,
                        body,
                    });
                    if stream.get_mut().write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, received)
}

/// The span names in one export request, decoded as its content type says.
fn span_names(request: &Received) -> Vec<String> {
    if request.content_type.starts_with("application/x-protobuf") {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message as _;
        let decoded = ExportTraceServiceRequest::decode(request.body.as_slice())
            .expect("a protobuf ExportTraceServiceRequest");
        decoded
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .map(|s| s.name.clone())
            .collect()
    } else {
        let json: serde_json::Value =
            serde_json::from_slice(&request.body).expect("a JSON ExportTraceServiceRequest");
        json["resourceSpans"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| r["scopeSpans"].as_array().into_iter().flatten())
            .flat_map(|s| s["spans"].as_array().into_iter().flatten())
            .filter_map(|s| s["name"].as_str().map(str::to_owned))
            .collect()
    }
}

/// The child of [`the_protocol_settings_choose_the_encoding_or_refuse_to_start`]: starts
/// telemetry as a service does and ends one span, then flushes once and exits without
/// [`telemetry::shutdown`], so only [`telemetry::flush`] can have sent it (the batch delay is a
/// minute). Prints `REFUSED: <error>` when `init` refuses the settings.
#[test]
#[allow(clippy::print_stdout)] // the parent reads the refusal from the child's output
fn child_exports_one_span_by_flushing() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    runtime().block_on(async {
        match telemetry::init("tandem-test") {
            Ok(()) => {
                drop(tracing::info_span!("invocation").entered());
                let started = std::time::Instant::now();
                telemetry::flush().await;
                assert!(
                    started.elapsed()
                        <= telemetry::FLUSH_LIMIT + std::time::Duration::from_millis(500)
                );
            }
            Err(e) => println!("REFUSED: {e}"),
        }
    });
}

#[test]
fn the_protocol_settings_choose_the_encoding_or_refuse_to_start() {
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    let runtime = runtime();
    let (url, received) = receiver(&runtime);
    // (settings, the content type the spans must arrive with, or what a refusal must name)
    const PROTOCOLS: &str = "http/json (the default) or http/protobuf";
    type Case<'a> = (&'a [(&'a str, &'a str)], Result<&'a str, [&'a str; 2]>);
    let cases: [Case; 7] = [
        (&[], Ok("application/json")),
        (
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
            Ok("application/json"),
        ),
        (
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")],
            Ok("application/x-protobuf"),
        ),
        // The signal's own variable wins over the generic one, either way round.
        (
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ],
            Ok("application/x-protobuf"),
        ),
        (
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
            Err(["OTEL_EXPORTER_OTLP_PROTOCOL=\"grpc\"", PROTOCOLS]),
        ),
        (
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
            ],
            Err(["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=\"grpc\"", PROTOCOLS]),
        ),
        // The batch processor's settings are read here too: a bad one is refused, not ignored.
        (
            &[("OTEL_BSP_MAX_QUEUE_SIZE", "lots")],
            Err(["OTEL_BSP_MAX_QUEUE_SIZE=\"lots\"", "invalid"]),
        ),
    ];
    for (settings, expected) in cases {
        received.lock().expect("received").clear();
        let mut command = Command::new(std::env::current_exe().expect("test binary"));
        command
            .args([
                "--exact",
                "child_exports_one_span_by_flushing",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1");
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_SERVICE_NAME",
            "OTEL_TRACES_SAMPLER",
        ] {
            command.env_remove(name);
        }
        command
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &url)
            .env("OTEL_BSP_SCHEDULE_DELAY", "60000")
            .envs(settings.iter().copied());
        let output = command.output().expect("run the child test");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{settings:?}: the child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let requests = received.lock().expect("received").clone();
        match expected {
            Ok(content_type) => {
                assert!(!stdout.contains("REFUSED"), "{settings:?}: {stdout}");
                let request = requests
                    .iter()
                    .find(|r| span_names(r).contains(&"invocation".to_owned()))
                    .unwrap_or_else(|| {
                        panic!("{settings:?}: the span was not exported by the flush: {requests:?}")
                    });
                assert_eq!(request.path, "/v1/traces", "{settings:?}");
                assert_eq!(request.content_type, content_type, "{settings:?}");
            }
            Err(named) => {
                let refusal = stdout
                    .lines()
                    .find_map(|l| l.split_once("REFUSED: ").map(|(_, refusal)| refusal))
                    .unwrap_or_else(|| panic!("{settings:?}: started anyway: {stdout}"));
                for text in named {
                    assert!(
                        refusal.contains(text),
                        "{settings:?}: the refusal does not name {text:?}: {refusal}"
                    );
                }
                assert!(requests.is_empty(), "{settings:?}: exported anyway");
            }
        }
    }
}
