//! Measurement 6, footprint: binary and Lambda package sizes, start-up time, idle and loaded memory; and the
//! description of the machine the figures come from.

use std::path::Path;
use std::process::Command;

use tandem_tests::binary;

/// Size of a file in bytes.
pub fn file_size(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}

/// The Lambda package of a function: its binary as `bootstrap` in a deflated zip (what
/// `cargo lambda build --output-format zip` produces; here for this machine's architecture).
pub fn lambda_zip_size(name: &str, scratch: &Path) -> Option<u64> {
    let zip = scratch.join(format!("{name}.zip"));
    let status = Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile\n\
             with zipfile.ZipFile(sys.argv[2], 'w', zipfile.ZIP_DEFLATED) as z:\n\
             \x20   z.write(sys.argv[1], 'bootstrap')",
        ])
        .arg(binary(name))
        .arg(&zip)
        .status()
        .ok()?;
    if !status.success() {
        return None;
    }
    let size = file_size(&zip);
    let _ = std::fs::remove_file(&zip);
    size
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Markdown lines describing the machine and the software versions.
pub fn machine() -> Vec<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown".to_owned(), |m| m.trim().to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<f64>().ok())
        .map_or("unknown".to_owned(), |kib| {
            format!("{:.1} GiB", kib / 1024.0 / 1024.0)
        });
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or("unknown".to_owned(), |s| s.trim().to_owned());
    let load = std::fs::read_to_string("/proc/loadavg").map_or("unknown".to_owned(), |s| {
        s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    });
    let postgres = tandem_tests::process::pg_program("postgres");
    let (_, librdkafka) = rdkafka::util::get_rdkafka_version();
    vec![
        format!("- CPU: {cores} cores ({model})"),
        format!("- memory: {memory}"),
        format!("- kernel: Linux {kernel}; load average at the start: {load}"),
        format!("- {}", first_line("rustc", &["--version"])),
        format!(
            "- build: {}",
            if cfg!(debug_assertions) {
                "debug (figures not meaningful)"
            } else {
                "release (profile.release: thin LTO, 4 codegen units)"
            }
        ),
        format!(
            "- {} (durable: fsync and synchronous_commit on, as on RDS)",
            first_line(&postgres.display().to_string(), &["--version"])
        ),
        format!("- {}", first_line("redis-server", &["--version"])),
        format!(
            "- broker: Apache Kafka {} (one KRaft node, scripts/kafka-broker.sh); librdkafka {librdkafka}",
            tandem_tests::kafka::kafka_version()
        ),
        format!(
            "- pgbench: {}",
            first_line(
                &crate::write::pgbench_program().display().to_string(),
                &["--version"]
            )
        ),
        format!(
            "- commit: {}",
            first_line("git", &["rev-parse", "--short", "HEAD"])
        ),
    ]
}
