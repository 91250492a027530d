//! The server's counters and histograms, rendered as Prometheus text at `GET /metrics`.
//!
//! Plain atomics and fixed-bucket histograms: a scrape reads them without stopping generation.
//! Latencies are what a client sees: time to first token counts from the request's arrival (queue
//! wait included); the inter-token histogram holds the gaps between a generation's streamed pieces
//! (a diffusion step may commit several tokens at once: one piece).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::experts::PagerStats;

/// Latency buckets in seconds: 1 ms to 60 s.
const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Batch-size buckets: sequences in flight when a pass starts.
const SEQUENCES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const ROWS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// A cumulative histogram over fixed upper bounds.
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound plus +Inf.
    counts: Vec<AtomicU64>,
    /// Sum of observations in micro-units (µs for seconds), so it fits an atomic integer.
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((v.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(b) => format!("{b}"),
                None => "+Inf".into(),
            };
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Everything `/metrics` reports; shared by the HTTP layer and the scheduler.
pub struct Metrics {
    /// Finished HTTP requests by (endpoint, status).
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub prompt_tokens: Counter,
    pub completion_tokens: Counter,
    pub forward_passes: Counter,
    pub cancelled: Counter,
    pub rejected_queue_full: Counter,
    pub batch_size: Histogram,
    pub batch_rows: Histogram,
    pub pass_seconds: Histogram,
    pub time_to_first_token: Histogram,
    pub inter_token: Histogram,
    pub queue_wait: Histogram,
}

/// Point-in-time values the scheduler owns, read at scrape time.
pub struct Gauges {
    pub running: usize,
    pub queued: usize,
    pub kv_bytes_in_use: u64,
    pub kv_bytes_budget: u64,
    pub max_batch: usize,
    pub experts: Option<PagerStats>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: Counter::default(),
            completion_tokens: Counter::default(),
            forward_passes: Counter::default(),
            cancelled: Counter::default(),
            rejected_queue_full: Counter::default(),
            batch_size: Histogram::new(SEQUENCES),
            batch_rows: Histogram::new(ROWS),
            pass_seconds: Histogram::new(SECONDS),
            time_to_first_token: Histogram::new(SECONDS),
            inter_token: Histogram::new(SECONDS),
            queue_wait: Histogram::new(SECONDS),
        }
    }
}

impl Metrics {
    pub fn request_done(&self, endpoint: &'static str, status: u16) {
        let mut r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *r.entry((endpoint, status)).or_default() += 1;
    }

    /// The Prometheus text exposition (version 0.0.4).
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP edgediff_requests_total HTTP requests answered, by endpoint and status.\n\
             # TYPE edgediff_requests_total counter"
        );
        for ((endpoint, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "edgediff_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        let counters = [
            (
                "edgediff_prompt_tokens_total",
                "Prompt tokens of admitted generations.",
                self.prompt_tokens.get(),
            ),
            (
                "edgediff_completion_tokens_total",
                "Tokens generated.",
                self.completion_tokens.get(),
            ),
            (
                "edgediff_forward_passes_total",
                "Forward passes of finished generations.",
                self.forward_passes.get(),
            ),
            (
                "edgediff_generations_cancelled_total",
                "Generations ended early because the client went away.",
                self.cancelled.get(),
            ),
            (
                "edgediff_rejected_queue_full_total",
                "Requests refused with 429 because the wait queue was full.",
                self.rejected_queue_full.get(),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let gauges = [
            (
                "edgediff_sequences_running",
                "Sequences admitted and decoding.",
                g.running as u64,
            ),
            (
                "edgediff_queue_depth",
                "Requests waiting for admission.",
                g.queued as u64,
            ),
            (
                "edgediff_kv_bytes_in_use",
                "KV cache bytes reserved by running sequences.",
                g.kv_bytes_in_use,
            ),
            (
                "edgediff_kv_bytes_budget",
                "The KV memory budget (--kv-memory).",
                g.kv_bytes_budget,
            ),
            (
                "edgediff_max_batch",
                "Most sequences in flight (--max-batch).",
                g.max_batch as u64,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        if let Some(p) = &g.experts {
            let pool = [
                ("hits", "Routed experts found in the pool.", p.hits),
                ("misses", "Routed experts read into the pool.", p.misses),
                (
                    "prefetched",
                    "Experts brought in by prefetch.",
                    p.prefetched,
                ),
                ("evictions", "Experts evicted from the pool.", p.evictions),
                (
                    "bytes_read",
                    "Expert bytes read from the file.",
                    p.bytes_read,
                ),
            ];
            for (what, help, v) in pool {
                let name = format!("edgediff_expert_pool_{what}_total");
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
                );
            }
        }
        self.batch_size.render(
            &mut out,
            "edgediff_batch_size",
            "Sequences in one batched forward pass.",
        );
        self.batch_rows.render(
            &mut out,
            "edgediff_batch_rows",
            "Rows (tokens of all its sequences) in one batched forward pass.",
        );
        self.pass_seconds.render(
            &mut out,
            "edgediff_pass_seconds",
            "Duration of one batched forward pass.",
        );
        self.time_to_first_token.render(
            &mut out,
            "edgediff_time_to_first_token_seconds",
            "From a request's arrival to its first streamed text.",
        );
        self.inter_token.render(
            &mut out,
            "edgediff_inter_token_seconds",
            "Gaps between a generation's streamed pieces of text.",
        );
        self.queue_wait.render(
            &mut out,
            "edgediff_queue_wait_seconds",
            "From a request's arrival to its admission.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_sum_and_count() {
        let h = Histogram::new(SECONDS);
        h.observe(0.0005);
        h.observe(0.02);
        h.observe(100.0);
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.025\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"60\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
        assert!(out.contains("x_sum 100.0205\n"), "{out}");
    }
}
