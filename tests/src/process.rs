//! Child processes that cannot outlive the test run.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on loopback (bind to 0, read it, release it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on loopback")
}

/// Waits until something accepts TCP connections on `port`.
pub async fn wait_for_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "nothing listens on port {port} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A process run under a watchdog shell that terminates it when the test process exits.
pub struct ManagedProcess {
    child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl ManagedProcess {
    /// Starts `program args…` with `envs`, logging to `log`. `cleanup` (a shell snippet) runs
    /// after the process has exited, e.g. to delete its data directory.
    pub fn start(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(String, String)],
        log: &Path,
        cleanup: &str,
    ) -> anyhow::Result<Self> {
        let quoted: Vec<String> = std::iter::once(program.display().to_string())
            .chain(args.iter().cloned())
            .map(|a| shell_quote(&a))
            .collect();
        // The watchdog: run the program in the background, stop it when our parent (the
        // test process) is gone or when we are told to stop, then clean up.
        let script = format!(
            "{cmd} >>{log} 2>&1 & child=$!\n\
             echo $child >{pidfile}\n\
             trap 'kill -TERM $child 2>/dev/null' TERM INT\n\
             while kill -0 {parent} 2>/dev/null && kill -0 $child 2>/dev/null; do sleep 0.2; done\n\
             kill -TERM $child 2>/dev/null\n\
             wait $child 2>/dev/null; echo \"[watchdog] exited with status $?\" >>{log}\n\
             {cleanup}\n",
            cmd = quoted.join(" "),
            log = shell_quote(&log.display().to_string()),
            pidfile = shell_quote(&pidfile(log).display().to_string()),
            parent = std::process::id(),
        );
        // A pid file left by an earlier run on the same log would name a dead process.
        let _ = std::fs::remove_file(pidfile(log));
        let child = Command::new("bash")
            .arg("-c")
            .arg(script)
            .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Self {
            child,
            name: name.to_owned(),
            log: log.to_owned(),
        })
    }

    /// The watchdog's pid (its child is the real program).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The real program's pid, as the watchdog recorded it right after starting it. (Not
    /// "the watchdog's child": its `sleep` is one too, and once pids wrap around, which takes
    /// seconds on a busy machine with a 32768 pid limit, it can come first.)
    pub fn program_pid(&self) -> Option<u32> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let recorded = std::fs::read_to_string(pidfile(&self.log))
                .ok()
                .and_then(|text| text.trim().parse().ok());
            if recorded.is_some() || Instant::now() > deadline {
                return recorded;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal to the real program (`KILL`, `STOP`, `CONT`, `TERM`).
    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.program_pid() {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(pid.to_string())
                .status();
        }
    }

    /// SIGKILLs the program and waits until it is gone (a crash, as far as it can tell).
    pub fn kill_and_wait(&self) {
        let pid = self.program_pid();
        for _ in 0..100 {
            self.signal("KILL");
            let alive = pid.is_some_and(|pid| {
                // A zombie (state Z) is dead: it only waits for its parent to reap it.
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|stat| stat.split_whitespace().nth(2).is_none_or(|s| s != "Z"))
            });
            if !alive {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("{} (pid {pid:?}) survived SIGKILL", self.name);
    }

    /// Stops the program and waits for the watchdog (and its cleanup) to finish.
    pub fn stop(&mut self) {
        // Already reaped (stopped before, then dropped): its pid may belong to another
        // process by now.
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        // A program a test paused (SIGSTOP) and did not resume, because the test failed first,
        // would hold its SIGTERM forever, and the watchdog with it: resume it.
        self.signal("CONT");
        let _ = self.child.wait();
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

fn pidfile(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".pid");
    PathBuf::from(name)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A fresh scratch directory for this test process.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tandem-test-{}-{name}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("cannot create a scratch directory");
    dir
}

/// Finds a PostgreSQL server program (`initdb`, `pg_ctl`, `postgres`): `TANDEM_PG_BINDIR`,
/// then the newest `/usr/lib/postgresql/*/bin`, then `PATH`.
pub fn pg_program(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("TANDEM_PG_BINDIR") {
        return Path::new(&dir).join(name);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.exists())
        .collect();
    versions.sort();
    versions.pop().unwrap_or_else(|| PathBuf::from(name))
}

/// The workspace's compiled binaries (`target/<profile>/`), next to this test executable
/// (`target/<profile>/deps/<test-binary>`) or next to a workspace binary that uses the
/// harness as a library (`target/<profile>/tandem-bench`), so a release build finds the
/// release binaries.
pub fn binary(name: &str) -> PathBuf {
    let path = binary_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`, which `make test` does)",
        path.display()
    );
    path
}

/// `target/<profile>/` of the running executable (see [`binary`]).
pub fn binary_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("executable directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target dir").to_owned()
    } else {
        dir.to_owned()
    }
}
