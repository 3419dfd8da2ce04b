use std::time::Duration;

use serde_json::{Value, json};
use tandem_tests::TwoRegions;
use tandem_tests::process::{ManagedProcess, scratch_dir};

/// HAProxy plays Route 53 + ALB: writes to Region 1, reads to Region 1 while its `/readyz`
/// passes, to Region 2 otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_through_the_edge_fail_over_to_region2_when_region1_read_stops() {
    let regions = TwoRegions::start().await;
    // A Region 1 Read API we can stop.
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let read1 = format!("{}", listener.local_addr().expect("addr"));
    let router = tandem_read::router(regions.region1.read_state.clone());
    let server = tokio::spawn(tandem_http::serve::serve(listener, router, async move {
        let _ = stopped.await;
    }));

    let dir = scratch_dir("edge");
    let port = tandem_tests::free_port();
    // No Region 2 Write API here: Region 1's stands in as the backup too.
    let config = tandem_tests::edge::haproxy_config(
        port,
        regions.region1.write_url.trim_start_matches("http://"),
        regions.region1.write_url.trim_start_matches("http://"),
        &read1,
        regions.region2_read_url.trim_start_matches("http://"),
    );
    std::fs::write(dir.join("haproxy.cfg"), config).expect("write config");
    let _haproxy = ManagedProcess::start(
        "haproxy",
        &tandem_tests::edge::haproxy_binary(),
        &[
            "-db".into(),
            "-f".into(),
            dir.join("haproxy.cfg").display().to_string(),
        ],
        &[],
        &dir.join("haproxy.log"),
        "",
    )
    .expect("haproxy (apt install haproxy; make test does)");
    tandem_tests::wait_for_port(port, Duration::from_secs(10))
        .await
        .expect("haproxy up");
    let edge = format!("http://127.0.0.1:{port}");
    let client = &regions.region1.client;

    // Writes go through the edge to Region 1.
    let written = client
        .put(format!("{edge}/v1/edge/doc"))
        .bearer_auth(&regions.region1.token)
        .json(&json!({"via": "edge"}))
        .send()
        .await
        .expect("write");
    assert_eq!(written.status(), 201);
    regions.wait_converged(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let read = client
        .get(format!("{edge}/v1/edge/doc"))
        .send()
        .await
        .expect("read");
    assert_eq!(read.status(), 200);
    assert_eq!(read.headers()["x-tandem-region"], "region1");

    let _ = shutdown.send(());
    server.await.expect("server task").expect("server");
    let mut region = String::new();
    for _ in 0..40 {
        let read = client
            .get(format!("{edge}/v1/edge/doc"))
            .send()
            .await
            .expect("read");
        if read.status() == 200 {
            region = read.headers()["x-tandem-region"]
                .to_str()
                .expect("ascii")
                .to_owned();
            let body: Value = read.json().await.expect("json");
            assert_eq!(body["data"]["via"], "edge");
            if region == "region2" {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(region, "region2", "reads did not fail over");
}
