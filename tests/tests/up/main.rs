//! `make up` (scripts/up.sh) as a supervisor, run as developers run it: the real script, the
//! built binaries, a durable broker. Each test runs its own stack in a scratch state directory
//! (`TANDEM_STATE_DIR`) on ports of its own, with the binaries the suite already built
//! (`TANDEM_BIN_DIR`), so it never meets a developer's `make up` or the tests beside it.
//!
//! - a SIGKILLed consumer is restarted with backoff, said so on the terminal, while everything
//!   else keeps running and writes keep reaching Region 2;
//! - Ctrl-C (SIGINT to the whole process group, as a terminal sends it) stops every process the
//!   stack started, and frees every port;
//! - started again on the same state, the broker still has the topic and its records and the
//!   consumer resumes where it stopped: nothing written before is applied twice, new writes
//!   replicate;
//! - a broker that cannot start (its port taken) fails the start within its bound, with the
//!   cause from the broker's log.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::{Value, json};
use tandem_tests::process::binary_dir;
use tandem_tests::{free_port, scratch_dir};

/// Every port up.sh binds, by the variable that overrides it.
const PORT_VARIABLES: [&str; 15] = [
    "EDGE_PORT",
    "WRITE1_PORT",
    "READ1_PORT",
    "READ2_PORT",
    "RELAY_PORT",
    "CONSUMER_PORT",
    "WRITE2_PORT",
    "RELAY2_PORT",
    "CONSUMER1_PORT",
    "PG1_PORT",
    "PG2_PORT",
    "REDIS1_PORT",
    "REDIS2_PORT",
    "KAFKA_PORT",
    "KAFKA_CONTROLLER_PORT",
];

/// The processes up.sh supervises (its pid files in `run/`), the consumer aside.
const OTHERS: [&str; 13] = [
    "pg1",
    "pg2",
    "redis1",
    "redis2",
    "kafka",
    "write1",
    "read1",
    "relay1",
    "consumer1",
    "write2",
    "read2",
    "relay2",
    "edge",
];

/// The topic up.sh configures.
const TOPIC: &str = "tandem.documents";

fn ports() -> BTreeMap<&'static str, u16> {
    PORT_VARIABLES.iter().map(|v| (*v, free_port())).collect()
}

/// One run of `bash scripts/up.sh`, the leader of its own process group (as a shell runs a
/// foreground job), its terminal output in a file.
struct Up {
    child: Child,
    output: PathBuf,
    state: PathBuf,
    ports: BTreeMap<&'static str, u16>,
    /// Stops the stack if this test process dies without running `Drop`.
    watchdog: Child,
}

impl Up {
    fn start(state: &Path, ports: &BTreeMap<&'static str, u16>, run: &str) -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root");
        let output = state.with_extension(format!("{run}.out"));
        let file = File::create(&output).expect("output file");
        let mut command = Command::new("bash");
        command
            .arg(root.join("scripts/up.sh"))
            .current_dir(root)
            .env("TANDEM_STATE_DIR", state)
            .env("TANDEM_BIN_DIR", binary_dir())
            .envs(ports.iter().map(|(k, v)| (*k, v.to_string())))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("output file"))
            .stderr(file)
            .process_group(0);
        let child = command.spawn().expect("start scripts/up.sh");
        let group = child.id();
        let watchdog = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "while kill -0 {parent} 2>/dev/null; do kill -0 {group} 2>/dev/null || exit 0; sleep 0.5; done\n\
                 kill -TERM -- -{group} 2>/dev/null\n\
                 for i in $(seq 240); do kill -0 -- -{group} 2>/dev/null || exit 0; sleep 0.5; done\n\
                 kill -KILL -- -{group} 2>/dev/null",
                parent = std::process::id(),
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("watchdog");
        Self {
            child,
            output,
            state: state.to_owned(),
            ports: ports.clone(),
            watchdog,
        }
    }

    fn port(&self, variable: &str) -> u16 {
        self.ports[variable]
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// Panics with the script's output.
    fn fail(&self, what: &str) -> ! {
        panic!("{what}; scripts/up.sh said:\n{}", self.output())
    }

    /// Waits until up.sh has written `stack.json` (everything is up), and returns it.
    async fn wait_up(&mut self) -> Value {
        match self.try_wait_up().await {
            Ok(stack) => stack,
            Err(why) => self.fail(&why),
        }
    }

    async fn try_wait_up(&mut self) -> Result<Value, String> {
        // Generous: on a loaded 2-core machine PostgreSQL's initdb, the broker's JVM and six
        // services take a while; up.sh's own bounds fail it sooner if something is wrong.
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(stack) = std::fs::read_to_string(self.state.join("stack.json"))
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok())
            {
                return Ok(stack);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("up.sh exited ({status}) before the stack was up"));
            }
            if Instant::now() > deadline {
                return Err("the stack was not up within 300 s".to_owned());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether a process of the stack found one of its ports taken (its log says so).
    fn port_was_taken(&self) -> bool {
        std::fs::read_dir(self.state.join("logs"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|log| {
                std::fs::read_to_string(log.path())
                    .is_ok_and(|text| text.contains("Address already in use"))
            })
    }

    /// Waits until the output contains `needle`.
    async fn wait_said(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.output().contains(needle) {
            if Instant::now() > deadline {
                self.fail(&format!("up.sh did not say {needle:?} within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The pid up.sh recorded for a supervised process.
    fn pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.state.join(format!("run/{name}.pid")))
            .ok()
            .and_then(|text| text.trim().parse().ok())
    }

    /// Ctrl-C: SIGINT to every process of the group, as a terminal sends it.
    fn interrupt(&self) {
        signal_group("INT", self.child.id());
    }

    /// Waits for up.sh to exit, collecting every process it started meanwhile.
    async fn wait_exit(&mut self, timeout: Duration, seen: &mut BTreeSet<Process>) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            seen.extend(descendants(self.child.id()));
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                self.fail(&format!("up.sh did not exit within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // A failed test: stop the stack as up.sh's own SIGTERM handler does, then make sure.
            signal_group("TERM", self.child.id());
            let deadline = Instant::now() + Duration::from_secs(120);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            signal_group("KILL", self.child.id());
            let _ = self.child.wait();
            eprintln!("scripts/up.sh said:\n{}", self.output());
        }
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
    }
}

fn signal_group(signal: &str, group: u32) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), "--".to_owned(), format!("-{group}")])
        .stderr(Stdio::null())
        .status();
}

/// A process, told apart from a later one with the same pid by its start time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Process {
    pid: u32,
    start: u64,
    command: String,
}

/// `(pid, ppid, process group, start time, state)` of every process, from `/proc`.
fn processes() -> Vec<(u32, u32, u32, u64, char)> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (Some(state), Some(ppid), Some(group), Some(start)) = (
            fields.first().and_then(|s| s.chars().next()),
            fields.get(1).and_then(|s| s.parse().ok()),
            fields.get(2).and_then(|s| s.parse().ok()),
            fields.get(19).and_then(|s| s.parse().ok()),
        ) else {
            continue;
        };
        all.push((pid, ppid, group, start, state));
    }
    all
}

fn command_line(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .unwrap_or_default()
}

/// Every live process started under up.sh: its descendants (PostgreSQL's backends lead
/// sessions of their own) and the members of its process group.
fn descendants(root: u32) -> BTreeSet<Process> {
    let all = processes();
    let mut found = BTreeSet::new();
    let mut parents = vec![root];
    let mut seen = BTreeSet::from([root]);
    while let Some(parent) = parents.pop() {
        for (pid, ppid, group, start, state) in &all {
            if (*ppid == parent || *group == root) && *state != 'Z' && seen.insert(*pid) {
                found.insert(Process {
                    pid: *pid,
                    start: *start,
                    command: command_line(*pid),
                });
                parents.push(*pid);
            }
        }
    }
    found
}

/// The processes of `seen` still running (a zombie is not running).
fn survivors(seen: &BTreeSet<Process>) -> Vec<Process> {
    let alive: BTreeSet<(u32, u64)> = processes()
        .into_iter()
        .filter(|p| p.4 != 'Z')
        .map(|p| (p.0, p.3))
        .collect();
    seen.iter()
        .filter(|p| alive.contains(&(p.pid, p.start)))
        .cloned()
        .collect()
}

/// Removes a passed test's scratch directory, unless `TANDEM_KEEP_TEST_LOGS` asks to keep its
/// logs (up.sh's output beside the state directory, the processes' logs in its `logs/`).
fn remove_scratch(state: &Path) {
    let dir = state.parent().expect("scratch dir");
    if std::env::var_os("TANDEM_KEEP_TEST_LOGS").is_none() {
        let _ = std::fs::remove_dir_all(dir);
    } else {
        eprintln!("logs kept in {}", dir.display());
    }
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// After up.sh exited: nothing it started runs any more and none of the ports it used
/// answers. `used` names the ports its processes listened on (all of them when `None`): a port
/// that was only reserved for a service that never started may since belong to anything on
/// the machine (another test's stack, for one).
fn assert_all_gone(up: &Up, seen: &BTreeSet<Process>, used: Option<&[&str]>) {
    assert!(
        seen.iter().any(|p| p.command.contains("kafka.Kafka")),
        "the process snapshot missed the broker: {seen:#?}"
    );
    let left = survivors(seen);
    assert!(
        left.is_empty(),
        "still running after up.sh exited: {left:#?}\n{}",
        up.output()
    );
    for (variable, port) in &up.ports {
        if used.is_none_or(|used| used.contains(variable)) {
            assert!(!listening(*port), "{variable} {port} still answers");
        }
    }
    assert!(
        !up.state.join("stack.json").exists(),
        "stack.json outlived the stack"
    );
}

fn alive(pid: u32) -> bool {
    processes().iter().any(|p| p.0 == pid && p.4 != 'Z')
}

async fn pg(port: u16) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(
        &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect");
    tokio::spawn(connection);
    client
}

async fn put(up: &Up, token: &str, id: &str, data: Value) {
    let response = reqwest::Client::new()
        .put(format!(
            "http://127.0.0.1:{}/v1/stack/{id}",
            up.port("WRITE1_PORT")
        ))
        .bearer_auth(token)
        .json(&data)
        .send()
        .await
        .expect("PUT");
    assert!(
        response.status().is_success(),
        "PUT {id}: {}",
        response.status()
    );
}

/// Waits until Region 2's Read API serves the document with `data`.
async fn wait_replicated(up: &Up, id: &str, data: &Value) {
    let url = format!("http://127.0.0.1:{}/v1/stack/{id}", up.port("READ2_PORT"));
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(response) = reqwest::get(&url).await {
            if response.status() == 200 {
                let body: Value = response.json().await.unwrap_or_default();
                if body["data"] == *data {
                    return;
                }
            }
        }
        if Instant::now() > deadline {
            up.fail(&format!("{id} did not reach Region 2 within 90 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_healthy(up: &Up, variable: &str) {
    let url = format!("http://127.0.0.1:{}/healthz", up.port(variable));
    let deadline = Instant::now() + Duration::from_secs(90);
    while !reqwest::get(&url)
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if Instant::now() > deadline {
            up.fail(&format!("{variable} did not answer /healthz within 90 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A metric's value from a worker's `/metrics` (the first sample starting with `series`).
async fn metric(up: &Up, variable: &str, series: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", up.port(variable)))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// The topic's high watermarks, by partition.
async fn high_watermarks(up: &Up) -> BTreeMap<i32, i64> {
    let brokers = format!("127.0.0.1:{}", up.port("KAFKA_PORT"));
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .expect("consumer");
        let timeout = Duration::from_secs(10);
        let metadata = consumer
            .fetch_metadata(Some(TOPIC), timeout)
            .expect("metadata");
        let partitions: Vec<i32> = metadata.topics()[0]
            .partitions()
            .iter()
            .map(|p| p.id())
            .collect();
        partitions
            .into_iter()
            .map(|p| {
                let (_, high) = consumer
                    .fetch_watermarks(TOPIC, p, timeout)
                    .expect("watermarks");
                (p, high)
            })
            .collect()
    })
    .await
    .expect("watermarks task")
}

/// Region 1's outbox event ids and Region 2's applied ones, each sorted.
async fn event_ids(up: &Up) -> (Vec<uuid::Uuid>, Vec<uuid::Uuid>) {
    let ids = |rows: Vec<tokio_postgres::Row>| {
        let mut ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.get(0)).collect();
        ids.sort();
        ids
    };
    let written = pg(up.port("PG1_PORT"))
        .await
        .query("SELECT event_id FROM outbox", &[])
        .await
        .expect("outbox");
    let applied = pg(up.port("PG2_PORT"))
        .await
        .query("SELECT event_id FROM applied_events", &[])
        .await
        .expect("applied");
    (ids(written), ids(applied))
}

async fn wait_published(up: &Up) {
    let client = pg(up.port("PG1_PORT")).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        if waiting == 0 {
            return;
        }
        if Instant::now() > deadline {
            up.fail(&format!("{waiting} outbox rows unpublished after 60 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGKILLs the consumer and waits until up.sh has said so and started a new one.
async fn kill_consumer(up: &Up, expected_delay: u32) {
    let pid = up.pid("consumer2").expect("consumer pid");
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    up.wait_said(
        &format!("consumer2 exited with status 137; restarting in {expected_delay}s"),
        Duration::from_secs(30),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while up.pid("consumer2").is_none_or(|now| now == pid) {
        if Instant::now() > deadline {
            up.fail("the consumer was not started again");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_healthy(up, "CONSUMER_PORT").await;
}

/// Starts a stack on ports found free, and again on other ones (three attempts) when one of
/// them was taken before its process bound it: another test, or any outgoing connection, can
/// take a port between `free_port` and the bind. Returns the stack, its state and its ports.
async fn up_on_fresh_ports(run: &str) -> (Up, Value, PathBuf, BTreeMap<&'static str, u16>) {
    let mut attempt = 1;
    loop {
        let state = scratch_dir("up").join("state");
        let ports = ports();
        let mut up = Up::start(&state, &ports, run);
        match up.try_wait_up().await {
            Ok(stack) => return (up, stack, state, ports),
            Err(why) if attempt < 3 && up.port_was_taken() => {
                eprintln!(
                    "attempt {attempt}: {why}, a port was taken; scripts/up.sh said:\n{}",
                    up.output()
                );
                attempt += 1;
            }
            Err(why) => up.fail(&why),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_up_restarts_a_killed_consumer_stops_on_ctrl_c_and_keeps_its_data() {
    // First run: up, a write replicated.
    let (mut up, stack, state, ports) = up_on_fresh_ports("first").await;
    let token = stack["dev_token"].as_str().expect("dev token").to_owned();
    put(&up, &token, "before", json!({"n": 1})).await;
    wait_replicated(&up, "before", &json!({"n": 1})).await;

    // A developer kills the consumer, twice: restarted each time, the pause doubling.
    let others: BTreeMap<&str, u32> = OTHERS
        .iter()
        .map(|name| (*name, up.pid(name).expect("pid file")))
        .collect();
    kill_consumer(&up, 1).await;
    kill_consumer(&up, 2).await;
    for (name, pid) in &others {
        assert_eq!(up.pid(name), Some(*pid), "{name} was restarted");
        assert!(alive(*pid), "{name} (pid {pid}) is gone");
    }
    put(&up, &token, "during", json!({"n": 2})).await;
    wait_replicated(&up, "during", &json!({"n": 2})).await;

    // Everything published and applied: what the topic holds now must survive the restart.
    wait_published(&up).await;
    let before_restart = high_watermarks(&up).await;
    assert!(
        before_restart.values().sum::<i64>() >= 2,
        "{before_restart:?}"
    );
    let (written, applied) = event_ids(&up).await;
    assert_eq!(applied, written, "every event applied once");

    // Ctrl-C: everything stops.
    let mut seen = descendants(up.child.id());
    up.interrupt();
    let status = up.wait_exit(Duration::from_secs(150), &mut seen).await;
    assert!(
        status.success(),
        "up.sh exited with {status}:\n{}",
        up.output()
    );
    assert!(up.output().contains("stopped"), "{}", up.output());
    assert_all_gone(&up, &seen, None);
    drop(up);

    // Second run on the same state: the broker kept the topic and its records, the consumer
    // resumes at its stored positions.
    let mut up = Up::start(&state, &ports, "second");
    up.wait_up().await;
    let after_restart = high_watermarks(&up).await;
    for (partition, high) in &before_restart {
        assert!(
            after_restart.get(partition).is_some_and(|h| h >= high),
            "partition {partition} lost records: {before_restart:?} -> {after_restart:?}"
        );
    }
    put(&up, &token, "after", json!({"n": 3})).await;
    wait_replicated(&up, "after", &json!({"n": 3})).await;
    // Nothing read again: no partition re-read from the beginning, no event received twice.
    assert_eq!(
        metric(
            &up,
            "CONSUMER_PORT",
            "tandem_consumer_partition_rereads_total"
        )
        .await,
        Some(0.0)
    );
    assert_eq!(
        metric(
            &up,
            "CONSUMER_PORT",
            r#"tandem_consumer_events_total{outcome="duplicate"}"#
        )
        .await
        .unwrap_or(0.0),
        0.0,
        "events applied before the restart were received again"
    );
    let (written, applied) = event_ids(&up).await;
    assert_eq!(written.len(), 3);
    assert_eq!(applied, written, "every event applied once");

    // The README's switchover demonstration: Region 2 becomes the write region, a write through
    // the edge commits there and reaches Region 1's Read API.
    let switched = std::process::Command::new(tandem_tests::binary("tandem"))
        .args(["switchover", "--to", "region2", "--json"])
        .env("TANDEM_STACK_FILE", state.join("stack.json"))
        .env_remove("TANDEM_REGION1_DATABASE_URL")
        .env_remove("TANDEM_REGION2_DATABASE_URL")
        .output()
        .expect("run tandem switchover");
    assert!(
        switched.status.success(),
        "tandem switchover: {}\n{}",
        String::from_utf8_lossy(&switched.stderr),
        up.output()
    );
    let report: Value = serde_json::from_slice(&switched.stdout).expect("switchover --json");
    assert_eq!(report["outcome"], "switched");
    let response = reqwest::Client::new()
        .put(format!(
            "http://127.0.0.1:{}/v1/stack/switched",
            up.port("EDGE_PORT")
        ))
        .bearer_auth(&token)
        .json(&json!({"n": 4}))
        .send()
        .await
        .expect("PUT through the edge");
    assert!(response.status().is_success(), "{}", response.status());
    let url = format!(
        "http://127.0.0.1:{}/v1/stack/switched",
        up.port("READ1_PORT")
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reqwest::get(&url).await.is_ok_and(|r| r.status() == 200) {
        if Instant::now() > deadline {
            up.fail("a write committed in Region 2 did not reach Region 1 within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut seen = descendants(up.child.id());
    up.interrupt();
    let status = up.wait_exit(Duration::from_secs(150), &mut seen).await;
    assert!(status.success(), "up.sh exited with {status}");
    assert_all_gone(&up, &seen, None);
    drop(up);
    remove_scratch(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_up_fails_fast_with_the_brokers_error_when_the_broker_cannot_start() {
    let state = scratch_dir("up").join("state");
    let mut ports = ports();
    // The broker's port is taken by a socket that is bound but not listening: up.sh's check
    // for a running stack (a connection) passes, the broker's bind fails.
    let taken = tokio::net::TcpSocket::new_v4().expect("socket");
    taken.set_reuseaddr(false).expect("reuseaddr");
    taken
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    ports.insert("KAFKA_PORT", taken.local_addr().expect("address").port());

    let mut up = Up::start(&state, &ports, "broken");
    let mut seen = BTreeSet::new();
    // up.sh's bound for the broker is 60 s; this one only tells a failure from a hang.
    let status = up.wait_exit(Duration::from_secs(240), &mut seen).await;
    let output = up.output();
    assert!(!status.success(), "up.sh succeeded:\n{output}");
    assert!(output.contains("kafka did not start"), "{output}");
    assert!(output.contains("Address already in use"), "{output}");
    assert!(
        !output.contains("starting region1"),
        "the services were started:\n{output}"
    );
    drop(taken);
    // It never got past the broker: only the databases and caches had listened.
    assert_all_gone(
        &up,
        &seen,
        Some(&["PG1_PORT", "PG2_PORT", "REDIS1_PORT", "REDIS2_PORT"]),
    );
    drop(up);
    remove_scratch(&state);
}
