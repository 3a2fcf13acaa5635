//! Measurement helpers: latency percentiles and the process's resident memory.

use std::time::Duration;

/// Median, tail percentiles and extremes of a set of latencies, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// 50th percentile.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Fastest.
    pub min_ms: f64,
    /// Slowest.
    pub max_ms: f64,
    /// Arithmetic mean.
    pub mean_ms: f64,
}

/// Nearest-rank percentile of sorted values (`q` in 0..=1).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarises durations.
pub fn summarize(samples: &[Duration]) -> Summary {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    if ms.is_empty() {
        return Summary::default();
    }
    Summary {
        n: ms.len(),
        p50_ms: percentile(&ms, 0.5),
        p90_ms: percentile(&ms, 0.9),
        p99_ms: percentile(&ms, 0.99),
        min_ms: ms[0],
        max_ms: ms[ms.len() - 1],
        mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
    }
}

/// Latency distribution in constant memory (an HDR histogram: 1 us to 1 h, 3 significant
/// digits), for streams that run for months; percentiles are exact to 0.1%.
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    hist: hdrhistogram::Histogram<u64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        let hist = hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
            .expect("static histogram bounds");
        LatencyHistogram { hist }
    }
}

impl LatencyHistogram {
    /// Records one duration (clamped to the range).
    pub fn record(&mut self, d: Duration) {
        self.hist.saturating_record((d.as_micros() as u64).max(1));
    }

    /// Percentiles, mean and extremes in milliseconds.
    pub fn summary(&self) -> Summary {
        let h = &self.hist;
        if h.is_empty() {
            return Summary::default();
        }
        let ms = |us: u64| us as f64 / 1e3;
        Summary {
            n: h.len() as usize,
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            min_ms: ms(h.min()),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1e3,
        }
    }
}

/// Current and peak resident set size in bytes (Linux `/proc/self/status`; None elsewhere).
pub fn resident_memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = summarize(&d);
        assert_eq!(
            (s.p50_ms, s.p90_ms, s.p99_ms, s.min_ms, s.max_ms),
            (50.0, 90.0, 99.0, 1.0, 100.0)
        );
        assert_eq!(s.mean_ms, 50.5);
        assert_eq!(summarize(&[]).n, 0);
    }

    #[test]
    fn histogram_percentiles_match_the_exact_ones() {
        let d: Vec<Duration> = (1..=1000).map(|i| Duration::from_micros(i * 37)).collect();
        let mut h = LatencyHistogram::default();
        d.iter().for_each(|&x| h.record(x));
        let (exact, approx) = (summarize(&d), h.summary());
        assert_eq!(approx.n, 1000);
        for (a, b) in [
            (exact.p50_ms, approx.p50_ms),
            (exact.p90_ms, approx.p90_ms),
            (exact.p99_ms, approx.p99_ms),
        ] {
            assert!((a - b).abs() <= a * 1e-3 + 1e-3, "{a} vs {b}");
        }
    }

    #[test]
    fn resident_memory_reads_proc_on_linux() {
        if cfg!(target_os = "linux") {
            let (rss, peak) = resident_memory().unwrap();
            assert!(rss > 0 && peak >= rss);
        }
    }
}
