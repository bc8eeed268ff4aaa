//! Timing loops and statistics for `slmc bench`, written once against the `Executor`
//! trait: one request (prefill, then a fixed number of decode steps, end tokens ignored so
//! every request does the same work), latency percentiles, per-second series and the point
//! where sustained throughput drops (throttling).

use std::time::Instant;

use crate::{ExecError, Executor};

/// One timed request.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt_tokens: usize,
    /// Prefill of the prompt up to the first generated token.
    pub ttft_s: f64,
    /// Each decode step's latency (one token each), in seconds.
    pub step_s: Vec<f64>,
    /// When each generated token (the first from prefill) was ready, in seconds on the
    /// caller's clock.
    pub token_at_s: Vec<f64>,
}

impl Request {
    pub fn generated(&self) -> usize {
        self.token_at_s.len()
    }
}

/// Runs `prompt` then `new_tokens - 1` greedy decode steps from an empty cache.
pub fn time_request(
    exec: &mut dyn Executor,
    prompt: &[u32],
    new_tokens: usize,
    clock: Instant,
) -> Result<Request, ExecError> {
    if prompt.is_empty() || new_tokens == 0 {
        return Err(ExecError::Usage("a benchmark request needs prompt tokens and at least one new token".into()));
    }
    exec.reset();
    let start = Instant::now();
    let mut next = exec.next_token(prompt)?;
    let ttft_s = start.elapsed().as_secs_f64();
    let mut token_at_s = vec![clock.elapsed().as_secs_f64()];
    let mut step_s = Vec::with_capacity(new_tokens.saturating_sub(1));
    for _ in 1..new_tokens {
        let t = Instant::now();
        next = exec.next_token(&[next])?;
        step_s.push(t.elapsed().as_secs_f64());
        token_at_s.push(clock.elapsed().as_secs_f64());
    }
    Ok(Request { prompt_tokens: prompt.len(), ttft_s, step_s, token_at_s })
}

/// The `p`-th percentile (0..=100) by linear interpolation between closest ranks; None
/// for no values. NaN sorts last, so a NaN in the data shows in the top percentiles.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = (p / 100.0).clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    Some(v[lo] + (v[hi] - v[lo]) * (rank - lo as f64))
}

pub fn median(values: &[f64]) -> Option<f64> {
    percentile(values, 50.0)
}

/// Generated tokens per whole second of a run `seconds` long (the last, partial second is
/// dropped: its rate would be measured over less than a second).
pub fn tokens_per_second_series(token_at_s: &[f64], seconds: usize) -> Vec<usize> {
    let mut counts = vec![0usize; seconds];
    for &t in token_at_s {
        let i = t.floor();
        if i >= 0.0 && (i as usize) < seconds {
            counts[i as usize] += 1;
        }
    }
    counts
}

/// The first second at which throughput has fallen below `fraction` of its start, as a
/// rolling 3-second mean against the median of the first 5 seconds (or of the first quarter
/// of a shorter run). None when it never does, or the run is too short to tell.
pub fn throttled_at(series: &[f64], fraction: f64) -> Option<usize> {
    let warm = series.len().div_ceil(4).min(5);
    if series.len() < warm + 3 || warm == 0 {
        return None;
    }
    let baseline = median(&series[..warm])?;
    (warm..=series.len() - 3).find(|&i| series[i..i + 3].iter().sum::<f64>() / 3.0 < fraction * baseline)
}

/// The best of three passes, in seconds, of one thread per core each running `work(i)`.
fn best_of_three_on_every_core(work: impl Fn(usize, usize) + Sync) -> (usize, f64) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let start = Instant::now();
        std::thread::scope(|s| {
            for i in 0..threads {
                let work = &work;
                s.spawn(move || work(i, threads));
            }
        });
        best = best.min(start.elapsed().as_secs_f64());
    }
    (threads, best)
}

/// This machine's memory read bandwidth in GB/s: every core sums its share of a 256 MiB
/// buffer (far past any cache), best of three passes. The cost model's prediction for a
/// target whose profile states no bandwidth (a generic CPU profile) uses it.
pub fn memory_read_bandwidth_gbps() -> f64 {
    let data = vec![1u64; 32 << 20];
    let (_, seconds) = best_of_three_on_every_core(|i, threads| {
        let share = data.len().div_ceil(threads);
        let part = &data[(i * share).min(data.len())..((i + 1) * share).min(data.len())];
        std::hint::black_box(part.iter().fold(0u64, |a, &x| a.wrapping_add(x)));
    });
    (data.len() * 8) as f64 / seconds / 1e9
}

/// This machine's f32 multiply-add throughput in GFLOP/s: every core runs a 256-cube
/// matrix product through `matrixmultiply` (the interpreter's GEMM), best of three passes.
/// The cost model charges a token's FLOPs at this rate on top of its bytes.
pub fn compute_gflops() -> f64 {
    const N: usize = 256;
    let a = vec![0.5f32; N * N];
    let (threads, seconds) = best_of_three_on_every_core(|_, _| {
        let mut c = vec![0.0f32; N * N];
        // SAFETY: a is N x N and c is N x N, both row-major with stride N.
        unsafe {
            matrixmultiply::sgemm(
                N,
                N,
                N,
                1.0,
                a.as_ptr(),
                N as isize,
                1,
                a.as_ptr(),
                N as isize,
                1,
                0.0,
                c.as_mut_ptr(),
                N as isize,
                1,
            )
        };
        std::hint::black_box(&c);
    });
    (threads * 2 * N * N * N) as f64 / seconds / 1e9
}

/// This process's resident set (`VmRSS`) from /proc, in bytes; None where there is no /proc.
pub fn current_rss_bytes() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|k| k * 1024)
}

/// This process's peak resident set (`VmHWM`) since it started or since the last
/// `reset_peak_rss`, in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|k| k * 1024)
}

/// Resets the peak resident set to the current one (Linux `clear_refs` 5); false where the
/// kernel does not allow it, so peaks then count from the process start.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn proc_status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_and_keep_nan_visible() {
        let v = [4.0, 1.0, 3.0, 2.0, 5.0];
        assert_eq!(percentile(&v, 50.0), Some(3.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(5.0));
        assert!((percentile(&v, 95.0).unwrap() - 4.8).abs() < 1e-12);
        assert_eq!(percentile(&[], 50.0), None);
        assert!(percentile(&[1.0, f64::NAN], 99.0).unwrap().is_nan());
    }

    #[test]
    fn series_buckets_whole_seconds() {
        assert_eq!(tokens_per_second_series(&[0.1, 0.9, 1.0, 2.5, 3.2], 3), vec![2, 1, 1]);
    }

    #[test]
    fn throttling_is_found_where_throughput_drops() {
        let mut s = vec![10.0; 8];
        s.extend([4.0; 6]);
        assert_eq!(throttled_at(&s, 0.8), Some(7), "seconds 7-9 are the first whose mean is below 8");
        assert_eq!(throttled_at(&[10.0; 20], 0.8), None);
        assert_eq!(throttled_at(&[10.0, 1.0], 0.8), None, "too short to tell");
    }

    #[test]
    fn peak_memory_is_read_and_reset() {
        let before = peak_rss_bytes().expect("Linux has /proc/self/status");
        let big = vec![1u8; 64 << 20];
        assert!(
            peak_rss_bytes().unwrap() >= before.max(64 << 20),
            "{}",
            big.iter().map(|&b| b as usize).sum::<usize>()
        );
        drop(big);
        // Other tests of this process allocate too: only the order of the figures is certain.
        reset_peak_rss();
        assert!(peak_rss_bytes().unwrap() >= current_rss_bytes().unwrap() / 2);
        assert!(current_rss_bytes().unwrap() > 0);
    }
}
