//! What a run did, and checking each answer against the model: mismatches are printed at once
//! and kept for the report.

use std::collections::BTreeMap;
use std::fmt;

use super::Fuzzer;
use crate::sys::errno_name;

/// What a run did.
pub struct Report {
    pub seed: u64,
    pub calls: u64,
    pub ops: BTreeMap<&'static str, (u64, std::time::Duration)>,
    pub answers: BTreeMap<String, u64>,
    pub failures: Vec<String>,
    /// Calls that took half a second or more.
    pub slow: u64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "blktap-fuzz: operations:")?;
        for (op, (n, t)) in &self.ops {
            writeln!(f, "  {op:<16} {n:>7} {:>8.1} ms", t.as_secs_f64() * 1000.0)?;
        }
        let answers: Vec<String> = self
            .answers
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        writeln!(f, "blktap-fuzz: answers: {}", answers.join(", "))?;
        writeln!(
            f,
            "blktap-fuzz: seed {}, {} calls, {} slow calls, {} mismatches",
            self.seed,
            self.calls,
            self.slow,
            self.failures.len()
        )
    }
}

impl Fuzzer<'_> {
    /// Checks an answer against the allowed set; returns true if it was allowed.
    pub(super) fn expect(&mut self, call: &str, got: i32, allowed: &[i32]) -> bool {
        self.calls += 1;
        let now = std::time::Instant::now();
        let took = now.duration_since(self.last_answer);
        self.last_answer = now;
        if took >= std::time::Duration::from_millis(500) {
            // Nothing the fuzzer does should block: report the call (a hang shows here first).
            println!(
                "SLOW op #{} [{}] {call} -> {} took {:.2} s",
                self.op_no,
                self.what,
                errno_name(got),
                took.as_secs_f64()
            );
            self.report.slow += 1;
        }
        *self.report.answers.entry(errno_name(got)).or_default() += 1;
        let ok = allowed.is_empty() || allowed.contains(&got);
        if self.cfg.verbose {
            println!(
                "#{} call {} [{}] {call} -> {}{}",
                self.op_no,
                self.calls,
                self.what,
                errno_name(got),
                if ok { "" } else { "  <-- MISMATCH" }
            );
        }
        if !ok {
            let names: Vec<String> = allowed.iter().map(|&c| errno_name(c)).collect();
            self.record(format!(
                "op #{} call {} [{}] {call}: got {}, expected {}",
                self.op_no,
                self.calls,
                self.what,
                errno_name(got),
                names.join("|")
            ));
        }
        ok
    }

    pub(super) fn fail(&mut self, msg: String) {
        self.record(format!(
            "op #{} call {} [{}] {msg}",
            self.op_no, self.calls, self.what
        ));
    }

    /// Prints a mismatch at once (a run cut short by a hang still shows it) and keeps it.
    pub(super) fn record(&mut self, line: String) {
        if self.report.failures.len() < 50 {
            println!("MISMATCH {line}");
        }
        self.report.failures.push(line);
    }
}
