//! Human output: aligned tables, colours only when stdout is a terminal (and `NO_COLOR` is
//! unset), and a progress line on stderr only when it is a terminal and the work takes longer
//! than a second. `--json` output bypasses all of this.
#![allow(clippy::print_stdout)]

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

fn colours() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// `text` in green (good), yellow (attention) or red (bad), on a terminal only.
pub fn good(text: &str) -> String {
    paint(text, "32")
}
pub fn warn(text: &str) -> String {
    paint(text, "33")
}
pub fn bad(text: &str) -> String {
    paint(text, "31")
}

fn paint(text: &str, code: &str) -> String {
    if colours() {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

/// The printed width of a cell (escape sequences take none).
fn width(cell: &str) -> usize {
    let mut n = 0;
    let mut escape = false;
    for c in cell.chars() {
        match (escape, c) {
            (false, '\x1b') => escape = true,
            (true, 'm') => escape = false,
            (true, _) => {}
            (false, _) => n += 1,
        }
    }
    n
}

/// Prints a table with a header row, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(width(cell));
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths
                .get(i)
                .copied()
                .unwrap_or(0)
                .saturating_sub(width(cell));
            out.push_str(cell);
            if i + 1 < cells.len() {
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// Prints a value as pretty JSON (the `--json` output).
pub fn json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints one line of human output.
pub fn line(text: &str) {
    println!("{text}");
}

/// A progress line with rate and ETA, on stderr, shown only when stderr is a terminal and
/// the work has run for more than a second; at most ten updates a second.
pub struct Progress {
    label: &'static str,
    total: u64,
    started: Instant,
    last: Option<Instant>,
    shown: bool,
    enabled: bool,
}

impl Progress {
    pub fn new(label: &'static str, total: u64) -> Self {
        Self {
            label,
            total,
            started: Instant::now(),
            last: None,
            shown: false,
            enabled: std::io::stderr().is_terminal(),
        }
    }

    pub fn update(&mut self, done: u64) {
        let elapsed = self.started.elapsed();
        if !self.enabled || elapsed < Duration::from_secs(1) {
            return;
        }
        if self
            .last
            .is_some_and(|l| l.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(Instant::now());
        let rate = done as f64 / elapsed.as_secs_f64();
        let eta = if rate > 0.0 && self.total > done {
            format!("{:.0} s", (self.total - done) as f64 / rate)
        } else {
            "–".to_owned()
        };
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\r\x1b[2K{}: {done}/{} ({rate:.0}/s, ETA {eta})",
            self.label, self.total
        );
        let _ = err.flush();
        self.shown = true;
    }

    pub fn finish(&mut self) {
        if self.shown {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
            self.shown = false;
        }
    }
}
