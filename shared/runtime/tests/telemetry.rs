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
        telemetry::init("tandem-test");
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
        telemetry::init("tandem-test");
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
