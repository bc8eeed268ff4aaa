//! `slmc bench`: load time, time to first token, prefill and decode throughput, per-token
//! latency percentiles and peak memory of bundles (on their own executors) and checkpoints
//! (on the interpreter); `--duration` runs a sustained workload and records a per-second
//! series with whatever temperature and power readings the machine exposes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use slmc_compiler::import::Model;
use slmc_compiler::optimize::Optimized;
use slmc_ir::Layered;
use slmc_runtime::bench::{
    compute_gflops, current_rss_bytes, median, memory_read_bandwidth_gbps, peak_rss_bytes, percentile, reset_peak_rss,
    throttled_at, time_request, tokens_per_second_series, Request,
};
use slmc_runtime::sensors::{sysfs_root, Sample, Sensors};
use slmc_runtime::{Executor, InterpreterExecutor};
use slmc_targets::bundle::CostModel;

use crate::cli::args::{Common, OptArgs, PromptArgs, RunArgs};
use crate::cli::run::{artifact_executor, LoadedArtifact, TextSide};
use crate::*;

#[derive(clap::Args, Clone)]
pub(crate) struct BenchArgs {
    /// Bundles (or bare artifacts) run on their executors, checkpoints on the interpreter
    /// (default: the default model on the interpreter). Several are run alternately.
    pub(crate) models: Vec<PathBuf>,
    /// Prompt length of each timed request (the built-in prompt text, repeated to length).
    #[arg(long, default_value_t = 128)]
    pub(crate) prompt_tokens: usize,
    /// Tokens generated per request (end tokens are ignored: every request does the same work).
    #[arg(long, default_value_t = 64)]
    pub(crate) gen_tokens: usize,
    /// Timed requests per model (after the warm-up ones).
    #[arg(long, default_value_t = 3)]
    pub(crate) repetitions: usize,
    /// Untimed requests per model first (caches, lazy initialisation).
    #[arg(long, default_value_t = 1)]
    pub(crate) warmup: usize,
    /// A sustained run of this length per model (`20s`, `10m`, `1h`): back-to-back
    /// requests of the built-in prompt mix, recorded per second. Several models run their
    /// sustained workloads one after another (each heats the machine on its own).
    #[arg(long, value_parser = parse_duration)]
    pub(crate) duration: Option<Duration>,
    /// Print ratios of every model to the first (implied by several models).
    #[arg(long)]
    pub(crate) compare: bool,
    /// Also write a self-contained HTML report (inline SVG charts: tokens/s over time with
    /// the throttling point, latency histograms, memory).
    #[arg(long)]
    pub(crate) report: Option<PathBuf>,
    /// Print machine-readable JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
    /// Say more on stderr (the GPU adapter, for example).
    #[arg(long)]
    pub(crate) verbose: bool,
    #[command(flatten)]
    pub(crate) run: RunArgs,
}

/// `20s`, `10m`, `1h`, `90` (seconds).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.find(|c: char| !c.is_ascii_digit() && c != '.').map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = number.parse().map_err(|_| format!("`{s}`: a duration is a number and s, m or h (20s, 10m)"))?;
    let scale = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (s, m or h)")),
    };
    if !(n * scale).is_finite() || n * scale < 1.0 || n * scale > 24.0 * 3600.0 {
        return Err(format!("`{s}`: a sustained run lasts from 1 second to 24 hours"));
    }
    Ok(Duration::from_secs_f64(n * scale))
}

/// The built-in prompt mix: what the deployments this compiler serves send (a question on
/// a pasted policy, a short instruction, a summary request, a form field).
const PROMPT_MIX: &[&str] = &[
    "Returns policy, Section 4: items may be returned within 30 days with a receipt; opened \
     electronics carry a 15% restocking fee unless defective. Section 6: refunds go to the \
     original payment method within 10 business days. Question: a customer opened a tablet \
     that works and returns it after 12 days. What do they get back, and when? Cite the section.",
    "Write three short bullet points on how to lift a heavy box safely.",
    "Summarise in one sentence: the scanner battery lasts a full shift when the screen \
     brightness stays below 60% and Wi-Fi roaming is limited to the warehouse access points.",
    "Extract the order number and the reason from: 'Order 55-1209 arrived with a cracked \
     lid, please replace it.' Answer as JSON.",
];

/// What is being benchmarked, loaded: an artifact's executor, or a checkpoint with its
/// graph (the interpreter borrows both, so it is made once everything is loaded).
enum Loaded {
    Artifact(Box<dyn Executor>),
    Checkpoint(Box<(Model, Optimized)>),
}

struct Subject {
    path: PathBuf,
    executor: &'static str,
    /// The bundle's cost model (the interpreter's for a checkpoint; None for a bare artifact).
    cost: Cost,
    side: TextSide,
    load_s: f64,
    rss_before_load: Option<u64>,
    peak_rss: Option<u64>,
    requests: Vec<Request>,
    sustained: Option<Sustained>,
}

struct Sustained {
    seconds: usize,
    /// (seconds since the run's start, the sensors then).
    samples: Vec<(f64, Sample)>,
}

type Cost = Option<(CostModel, &'static str)>;

fn load_one(path: &Path, args: &BenchArgs) -> Result<(Loaded, TextSide, &'static str, Cost)> {
    let common = Common { model: Some(path.to_path_buf()), json: args.json, verbose: args.verbose };
    if let Some(LoadedArtifact { exec, name, side, bundle }) =
        artifact_executor(&common, &args.run, &OptArgs::default())?
    {
        let cost = bundle.and_then(|b| b.manifest.cost).map(|c| (c, "the bundle's manifest"));
        return Ok((Loaded::Artifact(exec), side, name, cost));
    }
    if !path.exists() {
        bail!("{}: no such model or bundle", path.display());
    }
    let model = slmc_compiler::import::load(path)?;
    let prepared = prepare(&model, &OptArgs::default(), false)?;
    let side = TextSide::of_model(&model);
    let cost = slmc_compiler::cost::interpreter_cost_model(&prepared.graph, model.config.max_position_embeddings);
    let cost = Some((cost, "the interpreter's (f32 copies of the weights)"));
    Ok((Loaded::Checkpoint(Box::new((model, prepared))), side, "interpreter", cost))
}

/// `n` ids for a model without a tokenizer (a bare test checkpoint): spread over the
/// vocabulary, deterministic.
fn synthetic_ids(n: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + seed * 104_729 + 11) % vocab.max(1)) as u32).collect()
}

/// `n` prompt tokens: the built-in text, tokenized and repeated to length.
fn fixed_prompt(side: &TextSide, n: usize, vocab: usize) -> Result<Vec<u32>> {
    let Ok(tok) = side.tokenizer.as_ref() else { return Ok(synthetic_ids(n, vocab, 0)) };
    let text = PROMPT_MIX.join("\n\n");
    let ids = tok.encode(text.as_str(), false).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids().to_vec();
    if ids.is_empty() {
        bail!("{}: the tokenizer gives no tokens for the built-in prompt", side.origin.display());
    }
    Ok(ids.iter().copied().cycle().take(n).collect())
}

/// The prompt mix, each rendered with the chat template when the model has one (synthetic
/// prompts of the mix's rough lengths without a tokenizer).
fn mix_prompts(side: &TextSide, vocab: usize) -> Result<Vec<Vec<u32>>> {
    if side.tokenizer.is_err() {
        return Ok([96, 24, 48, 40].iter().enumerate().map(|(i, &n)| synthetic_ids(n, vocab, i + 1)).collect());
    }
    PROMPT_MIX
        .iter()
        .map(|text| {
            let prompt =
                PromptArgs { prompt: Some(text.to_string()), prompt_ids: None, chat: side.chat_template.is_some() };
            side.prompt_ids(&prompt)
        })
        .collect()
}

pub(crate) fn bench(args: &BenchArgs) -> Result<()> {
    if args.gen_tokens == 0 || args.prompt_tokens == 0 {
        bail!("--prompt-tokens and --gen-tokens must be at least 1");
    }
    if args.duration.is_none() && args.repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    let paths = if args.models.is_empty() { vec![slmc_compiler::default_model_path()] } else { args.models.clone() };
    if args.compare && paths.len() < 2 {
        bail!("--compare needs at least two bundles or checkpoints");
    }
    let sensors = Sensors::discover(&sysfs_root());
    // Before anything is loaded: the measurement's buffer is freed again.
    let host = Host { bandwidth_gbps: memory_read_bandwidth_gbps(), compute_gflops: compute_gflops() };
    let peak_resettable = reset_peak_rss();
    // Load everything first (each load timed, with its own peak memory), then run.
    // Artifacts own their executors; checkpoints' interpreters borrow graph and weights.
    let (mut artifacts, mut checkpoints, mut order) = (Vec::new(), Vec::new(), Vec::new());
    let mut subjects = Vec::new();
    for path in &paths {
        reset_peak_rss();
        let rss_before_load = current_rss_bytes();
        let start = Instant::now();
        let (l, side, executor, cost) = load_one(path, args).with_context(|| format!("{}: loading", path.display()))?;
        let load_s = start.elapsed().as_secs_f64();
        match l {
            Loaded::Artifact(exec) => {
                order.push((true, artifacts.len()));
                artifacts.push(exec);
            }
            Loaded::Checkpoint(c) => {
                order.push((false, checkpoints.len()));
                checkpoints.push(*c);
            }
        }
        subjects.push(Subject {
            path: path.clone(),
            executor,
            cost,
            side,
            load_s,
            rss_before_load,
            peak_rss: peak_rss_bytes(),
            requests: vec![],
            sustained: None,
        });
    }
    let layered: Vec<Layered> =
        checkpoints.iter().map(|(m, p)| Layered { top: &p.derived, base: &m.weights }).collect();
    let mut interpreters = checkpoints
        .iter()
        .zip(&layered)
        .map(|((m, p), w)| InterpreterExecutor::new(&p.graph, w, m.config.max_position_embeddings))
        .collect::<Result<Vec<_>, _>>()?;
    // (Shortening the artifacts' `dyn Executor + 'static` to the interpreters' lifetime.)
    let mut of_artifacts: Vec<Option<&mut dyn Executor>> =
        artifacts.iter_mut().map(|e| -> Option<&mut dyn Executor> { Some(&mut **e) }).collect();
    let mut of_checkpoints: Vec<Option<&mut dyn Executor>> =
        interpreters.iter_mut().map(|e| Some(e as &mut dyn Executor)).collect();
    let mut execs: Vec<&mut dyn Executor> = order
        .iter()
        .map(|&(artifact, i)| {
            let slot = if artifact { &mut of_artifacts[i] } else { &mut of_checkpoints[i] };
            slot.take().expect("each executor is ordered once")
        })
        .collect();
    let bar = progress(args);
    let start_sample = sensors.sample();
    let bench_start = Instant::now();
    if let Some(duration) = args.duration {
        bar.set_length(duration.as_secs() * subjects.len() as u64);
        for (s, exec) in subjects.iter_mut().zip(execs.iter_mut()) {
            sustained_run(s, &mut **exec, args, duration, &sensors, &bar)?;
        }
    } else {
        let prompts = subjects
            .iter()
            .zip(&execs)
            .map(|(s, e)| fixed_prompt(&s.side, args.prompt_tokens, e.vocab_size()))
            .collect::<Result<Vec<_>>>()?;
        bar.set_length(((args.warmup + args.repetitions) * subjects.len()) as u64);
        // Alternating rounds: every model sees the same machine load.
        for round in 0..args.warmup + args.repetitions {
            for (i, (s, exec)) in subjects.iter_mut().zip(execs.iter_mut()).enumerate() {
                bar.set_message(s.path.display().to_string());
                let r = time_request(&mut **exec, &prompts[i], args.gen_tokens, Instant::now())
                    .with_context(|| format!("{}: running", s.path.display()))?;
                if round >= args.warmup {
                    s.requests.push(r);
                }
                s.peak_rss = s.peak_rss.max(peak_rss_bytes());
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    let wall = bench_start.elapsed().as_secs_f64();
    let end_sample = sensors.sample();
    let energy = sensors.energy_between(&start_sample, &end_sample);
    let runs: Vec<Value> = subjects
        .iter()
        .map(|s| {
            let mut v = run_json(s, &sensors, peak_resettable);
            v["cost_model"] = cost_json(s, &host, v["decode_tokens_per_s"].as_f64());
            if s.sustained.is_none() {
                v["temperature"] = temperature_json(&sensors, [start_sample.max_celsius, end_sample.max_celsius], None);
                // Energy of the whole alternating run, shared by every model in it.
                v["power"] = power_json(&sensors, energy, wall, subjects.len() > 1);
                // Only a single model's run has its own energy.
                let tokens: usize = s.requests.iter().map(Request::generated).sum();
                v["tokens_per_joule"] = per_joule(tokens, energy.filter(|_| subjects.len() == 1));
            }
            v
        })
        .collect();
    report(args, runs)
}

/// Back-to-back requests of the prompt mix for `duration`, with a sampler thread reading
/// the sensors once a second.
fn sustained_run(
    s: &mut Subject,
    exec: &mut dyn Executor,
    args: &BenchArgs,
    duration: Duration,
    sensors: &Sensors,
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    let prompts = mix_prompts(&s.side, exec.vocab_size())?;
    bar.set_message(s.path.display().to_string());
    // This model's own peak from here on (the models before it ran their workloads already).
    reset_peak_rss();
    // One untimed request first, as in burst runs.
    for _ in 0..args.warmup {
        time_request(exec, &prompts[0], args.gen_tokens, Instant::now())
            .with_context(|| format!("{}: running", s.path.display()))?;
    }
    let clock = Instant::now();
    let done = std::sync::atomic::AtomicBool::new(false);
    let samples = std::thread::scope(|scope| -> Result<_> {
        let sampler = scope.spawn(|| {
            let mut samples = Vec::new();
            let mut next = 0.0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let t = clock.elapsed().as_secs_f64();
                if t >= next {
                    samples.push((t, sensors.sample()));
                    next += 1.0;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            samples.push((clock.elapsed().as_secs_f64(), sensors.sample()));
            samples
        });
        let mut i = 0;
        let result = (|| -> Result<()> {
            while clock.elapsed() < duration {
                let r = time_request(exec, &prompts[i % prompts.len()], args.gen_tokens, clock)
                    .with_context(|| format!("{}: running", s.path.display()))?;
                s.requests.push(r);
                s.peak_rss = s.peak_rss.max(peak_rss_bytes());
                bar.set_position(bar.position().max(clock.elapsed().as_secs()));
                i += 1;
            }
            Ok(())
        })();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples = sampler.join().map_err(|_| anyhow!("the sensor sampler stopped"))?;
        result.map(|()| samples)
    })?;
    s.sustained = Some(Sustained { seconds: duration.as_secs() as usize, samples });
    Ok(())
}

/// This machine's measured figures the cost model predicts from.
struct Host {
    bandwidth_gbps: f64,
    compute_gflops: f64,
}

/// The cost model's decode prediction at the run's mean decode position, from this
/// machine's measured bandwidth and compute (a token's bytes and its FLOPs, charged one after
/// the other: a CPU does not hide one behind the other), against the measured decode speed.
fn cost_json(s: &Subject, host: &Host, measured: Option<f64>) -> Value {
    let Some((cost, source)) = &s.cost else { return json!(null) };
    let steps: usize = s.requests.iter().map(|r| r.step_s.len()).sum();
    // Decode step i of a request feeds the token at position prompt + i.
    let positions: usize =
        s.requests.iter().map(|r| (1..=r.step_s.len()).map(|i| r.prompt_tokens + i - 1).sum::<usize>()).sum();
    let position = positions / steps.max(1);
    let (bytes, flops) = (cost.bytes_at(position), cost.flops_at(position));
    let seconds = bytes as f64 / (host.bandwidth_gbps * 1e9) + flops as f64 / (host.compute_gflops * 1e9);
    let predicted = 1.0 / seconds.max(f64::MIN_POSITIVE);
    json!({
        "source": source,
        "host_memory_bandwidth_gbps": host.bandwidth_gbps,
        "host_compute_gflops": host.compute_gflops,
        "profile_memory_bandwidth_gbps": cost.memory_bandwidth_gbps,
        "mean_decode_position": position,
        "bytes_per_token": bytes,
        "flops_per_token": flops,
        "predicted_decode_tokens_per_s": predicted,
        "predicted_bandwidth_bound_tokens_per_s": host.bandwidth_gbps * 1e9 / bytes.max(1) as f64,
        "measured_over_predicted": measured.map(|m| m / predicted),
    })
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("n/a".into(), |b| format!("{:.0} MiB", b as f64 / (1 << 20) as f64))
}

fn sources(files: impl Iterator<Item = PathBuf>) -> Vec<String> {
    files.map(|p| p.display().to_string()).collect()
}

/// The searched directories whose class names contain one of `classes`.
fn searched(sensors: &Sensors, classes: &[&str]) -> Vec<String> {
    sources(sensors.searched.iter().filter(|p| classes.iter().any(|c| p.ends_with(c))).cloned())
}

const TEMPERATURE_CLASSES: &[&str] = &["thermal", "hwmon"];
const POWER_CLASSES: &[&str] = &["powercap", "power_supply"];

/// Tokens per joule where a positive energy was measured.
fn per_joule(tokens: usize, energy_j: Option<f64>) -> Value {
    json!(energy_j.filter(|&e| e > 0.0).map(|e| tokens as f64 / e))
}

fn temperature_json(sensors: &Sensors, start_end: [Option<f64>; 2], max: Option<f64>) -> Value {
    if !sensors.temperature_exposed() {
        return json!({ "exposed": false, "sources": [], "searched": searched(sensors, TEMPERATURE_CLASSES),
            "note": "not exposed on this machine: no thermal zone or hwmon temperature" });
    }
    let max = max.or(start_end[0].into_iter().chain(start_end[1]).reduce(f64::max));
    json!({ "exposed": true, "sources": sources(sensors.temperature_files.iter().cloned()), "searched": searched(sensors, TEMPERATURE_CLASSES),
        "start_c": start_end[0], "end_c": start_end[1], "max_c": max })
}

fn power_json(sensors: &Sensors, energy_j: Option<f64>, seconds: f64, shared: bool) -> Value {
    if !sensors.power_exposed() {
        return json!({ "exposed": false, "sources": [], "searched": searched(sensors, POWER_CLASSES),
            "note": "not exposed on this machine: no powercap (RAPL) energy counter or battery power reading" });
    }
    let files = sensors.energy_counters.iter().map(|(f, _)| f.clone()).chain(sensors.power_files.iter().cloned());
    json!({ "exposed": true, "sources": sources(files), "searched": searched(sensors, POWER_CLASSES),
        "scope": if shared { "the whole machine, over the alternating run of every model" } else { "the whole machine" },
        "energy_j": energy_j, "mean_w": energy_j.map(|e| e / seconds.max(1e-9)) })
}

fn run_json(s: &Subject, sensors: &Sensors, peak_resettable: bool) -> Value {
    let ttft: Vec<f64> = s.requests.iter().map(|r| r.ttft_s).collect();
    let prefill: Vec<f64> = s.requests.iter().map(|r| r.prompt_tokens as f64 / r.ttft_s.max(1e-9)).collect();
    let steps: Vec<f64> = s.requests.iter().flat_map(|r| r.step_s.iter().map(|x| x * 1e3)).collect();
    let decode_s: f64 = steps.iter().sum::<f64>() / 1e3;
    let generated: usize = s.requests.iter().map(Request::generated).sum();
    let mean_prompt = s.requests.iter().map(|r| r.prompt_tokens).sum::<usize>() as f64 / s.requests.len().max(1) as f64;
    let mut v = json!({
        "model": s.path.display().to_string(),
        "executor": s.executor,
        "load_s": s.load_s,
        "requests": s.requests.len(),
        "prompt_tokens": mean_prompt,
        "prompt": if s.side.tokenizer.is_ok() { "built-in text" } else { "synthetic ids (no tokenizer)" },
        "generated_tokens": generated,
        "ttft_s": median(&ttft),
        "prefill_tokens_per_s": median(&prefill),
        "decode_tokens_per_s": (decode_s > 0.0).then(|| steps.len() as f64 / decode_s),
        "latency_ms": {
            "p50": percentile(&steps, 50.0), "p95": percentile(&steps, 95.0), "p99": percentile(&steps, 99.0),
            "mean": (!steps.is_empty()).then(|| steps.iter().sum::<f64>() / steps.len() as f64),
            "steps": steps.len(),
            "histogram": latency_histogram(&steps, 20),
        },
        "peak_rss_bytes": s.peak_rss,
        "rss_before_load_bytes": s.rss_before_load,
        "peak_rss_scope": if peak_resettable { "from this model's load (models loaded before it stay resident)" } else { "since the process started" },
    });
    if let Some(sus) = &s.sustained {
        let at: Vec<f64> = s.requests.iter().flat_map(|r| r.token_at_s.iter().copied()).collect();
        let counts = tokens_per_second_series(&at, sus.seconds);
        let tps: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
        // Each second's reading: the last sample taken in it; power from the energy
        // counters across it (or the battery's power_now).
        let series: Vec<Value> = counts
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let within = |t: f64| t >= i as f64 && t < (i + 1) as f64;
                let sample = sus.samples.iter().rev().find(|(t, ..)| within(*t));
                let bounds = (
                    sus.samples.iter().rfind(|(t, ..)| *t <= i as f64),
                    sus.samples.iter().find(|(t, ..)| *t >= (i + 1) as f64),
                );
                let power = match bounds {
                    (Some(a), Some(b)) if !sensors.energy_counters.is_empty() => {
                        sensors.energy_between(&a.1, &b.1).map(|e| e / (b.0 - a.0).max(1e-9))
                    }
                    _ => sample.and_then(|s| s.1.power_watts),
                };
                json!({ "t_s": i, "tokens": c, "tokens_per_s": c as f64,
                    "temperature_c": sample.and_then(|s| s.1.max_celsius), "power_w": power })
            })
            .collect();
        let first = sus.samples.first();
        let last = sus.samples.last();
        let energy = match (first, last) {
            (Some(a), Some(b)) => sensors.energy_between(&a.1, &b.1),
            _ => None,
        };
        let max_temp = sus.samples.iter().filter_map(|s| s.1.max_celsius).reduce(f64::max);
        let seconds = last.map_or(0.0, |l| l.0);
        v["duration_s"] = json!(sus.seconds);
        v["series"] = Value::Array(series);
        v["throttled_at_s"] = json!(throttled_at(&tps, 0.8));
        v["sustained_tokens_per_s"] = json!(median(&tps));
        v["temperature"] = temperature_json(
            sensors,
            [first.and_then(|s| s.1.max_celsius), last.and_then(|s| s.1.max_celsius)],
            max_temp,
        );
        v["power"] = power_json(sensors, energy, seconds, false);
        v["tokens_per_joule"] = per_joule(generated, energy);
    }
    v
}

/// `bins` equal-width bins from the smallest value to the 99th percentile, `[{from_ms,
/// to_ms, count}]`; the rare slower steps are counted in the last bin (one outlier would
/// otherwise squeeze every other step into the first).
fn latency_histogram(ms: &[f64], bins: usize) -> Value {
    let finite: Vec<f64> = ms.iter().copied().filter(|x| x.is_finite()).collect();
    let (Some(lo), Some(hi)) = (finite.iter().copied().reduce(f64::min), percentile(&finite, 99.0)) else {
        return json!([]);
    };
    let width = ((hi - lo) / bins as f64).max(1e-9);
    let mut counts = vec![0u64; bins];
    for x in finite {
        counts[(((x - lo) / width) as usize).min(bins - 1)] += 1;
    }
    Value::Array(
        counts
            .iter()
            .enumerate()
            .map(
                |(i, &c)| json!({ "from_ms": lo + width * i as f64, "to_ms": lo + width * (i + 1) as f64, "count": c }),
            )
            .collect(),
    )
}

/// Progress on a terminal only (never with --json).
fn progress(args: &BenchArgs) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    crate::cli::bundle::progress(!args.json && std::io::stderr().is_terminal(), 0)
}

/// Ratios of each model to the first, on the figures where higher is better (throughput)
/// and where lower is (times).
fn ratios(runs: &[Value]) -> Vec<Value> {
    let ratio = |a: &Value, b: &Value| match (a.as_f64(), b.as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => json!(a / b),
        _ => json!(null),
    };
    runs[1..]
        .iter()
        .map(|r| {
            let base = &runs[0];
            json!({
                "model": r["model"], "baseline": base["model"],
                "decode_tokens_per_s": ratio(&r["decode_tokens_per_s"], &base["decode_tokens_per_s"]),
                "prefill_tokens_per_s": ratio(&r["prefill_tokens_per_s"], &base["prefill_tokens_per_s"]),
                "ttft_s": ratio(&r["ttft_s"], &base["ttft_s"]),
                "latency_p50_ms": ratio(&r["latency_ms"]["p50"], &base["latency_ms"]["p50"]),
                "load_s": ratio(&r["load_s"], &base["load_s"]),
            })
        })
        .collect()
}

fn report(args: &BenchArgs, runs: Vec<Value>) -> Result<()> {
    let ratios = if runs.len() > 1 { ratios(&runs) } else { vec![] };
    if let Some(path) = &args.report {
        let html = slmc_compiler::report::bench_html(&runs, &ratios)?;
        slmc_compiler::output::write_file_atomically(path, html.as_bytes())
            .with_context(|| format!("{}: writing the report", path.display()))?;
    }
    if args.json {
        // The first (or only) model's figures at the top level, every model under `runs`.
        let mut top = runs[0].clone();
        top["runs"] = Value::Array(runs);
        top["ratios"] = Value::Array(ratios);
        print_json(&top);
        return Ok(());
    }
    let f = |v: &Value, digits: usize| v.as_f64().map_or("n/a".into(), |x| format!("{x:.digits$}"));
    println!(
        "{:<40} {:<12} {:>7} {:>8} {:>9} {:>9} {:>22} {:>9}",
        "model", "executor", "load s", "TTFT s", "prefill/s", "decode/s", "ms/token p50/p95/p99", "peak RSS"
    );
    for r in &runs {
        let l = &r["latency_ms"];
        println!(
            "{:<40} {:<12} {:>7} {:>8} {:>9} {:>9} {:>22} {:>9}",
            r["model"].as_str().unwrap_or_default(),
            r["executor"].as_str().unwrap_or_default(),
            f(&r["load_s"], 2),
            f(&r["ttft_s"], 3),
            f(&r["prefill_tokens_per_s"], 1),
            f(&r["decode_tokens_per_s"], 1),
            format!("{}/{}/{}", f(&l["p50"], 1), f(&l["p95"], 1), f(&l["p99"], 1)),
            mib(r["peak_rss_bytes"].as_u64()),
        );
        let c = &r["cost_model"];
        if !c.is_null() {
            println!(
                "  cost model ({}): {} bytes/token at position {}, this machine reads {} GB/s: predicted decode {} tok/s, measured/predicted {}",
                c["source"].as_str().unwrap_or_default(),
                c["bytes_per_token"],
                c["mean_decode_position"],
                f(&c["host_memory_bandwidth_gbps"], 1),
                f(&c["predicted_decode_tokens_per_s"], 1),
                f(&c["measured_over_predicted"], 2)
            );
        }
        if let Some(series) = r["series"].as_array() {
            let throttle = r["throttled_at_s"]
                .as_u64()
                .map_or("no drop below 80% of the start".into(), |s| format!("throttled at {s} s"));
            println!(
                "  sustained {} s: median {} tokens/s, {throttle}",
                series.len(),
                f(&r["sustained_tokens_per_s"], 1)
            );
        }
    }
    for r in &ratios {
        println!(
            "ratio {} / {}: decode {}x, prefill {}x, TTFT {}x",
            r["model"].as_str().unwrap_or_default(),
            r["baseline"].as_str().unwrap_or_default(),
            f(&r["decode_tokens_per_s"], 2),
            f(&r["prefill_tokens_per_s"], 2),
            f(&r["ttft_s"], 2)
        );
    }
    for (what, key) in [("temperature", "temperature"), ("power", "power")] {
        let v = &runs[0][key];
        if v["exposed"] == json!(true) {
            println!("{what}: read from {}", v["sources"]);
        } else {
            println!("{what}: not exposed on this machine (searched {})", v["searched"]);
        }
    }
    Ok(())
}
