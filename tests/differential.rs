//! The differential harness: every executor (wgpu for the plain `webgpu` kernels and the
//! `vulkan` f16/subgroup variants, ONNX Runtime for both ONNX profiles, the MIL reference
//! for both Core ML profiles) against the IR interpreter on the same optimized graph, over
//! random checkpoints (`slmc_fixtures::RandomSpec`: every supported family, tied or not,
//! f32/f16/bf16 storage, weight quantization and KV cache kind drawn from the seed) and
//! prompt lengths across the boundaries that matter: 1, the step size and the chunk size
//! +-1, several hundred, the full context (then the refusal of one more token), prefill
//! then decode and token by token. Every logit row of every step is compared; NaN, a
//! missing row or a wrong length fails.
//!
//! The suite runs `FIXED_SEEDS`. `scripts/differential` runs random seeds for a while and
//! prints the seed of every failure (`SLMC_DIFF_SEEDS=a..b` or `=s1,s2` picks seeds here),
//! so a failure becomes a new fixed seed.

mod common;

use std::path::Path;

use common::*;
use slmc_fixtures::{generate_random, Family, RandomSpec};
use slmc_ir::Layered;
use slmc_runtime::{Executor, InterpreterExecutor};

/// Seeds the suite runs (failures found by scripts/differential are added here). Among them,
/// seeds 20, 23, 24, 27, 32, 35, 37 and 40 (a 48-position context) found that compile's
/// quality report fed sequences longer than the model's context; seeds 5-12 and 1005-3310
/// (every failure of the random runs) set the tolerances of the lossy paths.
const FIXED_SEEDS: &[u64] = &[
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31,
    32, 33, 34, 35, 36, 37, 38, 39, 40, // found by scripts/differential (tolerances of lossy caches, Core ML):
    1005, 1013, 1014, 1061, 1076, 1091, 1208, 1222, 1227, 1253, 1276, 1284, 2117, 3007, 3168, 3310,
];

/// Seeds the suite also runs as checkpoints of the families `from_seed` does not draw
/// (per-head q/k norms; Gemma's windows, soft caps and four norms; StableLM's LayerNorm and
/// partial rotary; OLMo 2's post-norms; SmolLM3's NoPE layers; Phi-4-mini's LongRoPE
/// factors and partial rotary), whatever family the seed draws; `SLMC_DIFF_FAMILY=gemma3`
/// (any family name of `Family::from_name`) does the same for the seeds of a random run.
const FAMILY_SEEDS: &[(Family, &[u64])] = &[
    (Family::Qwen3, &[2, 7, 14, 19, 26, 33]),
    (Family::Gemma3, &[3, 8, 21, 30]),
    (Family::Gemma2, &[4, 11, 25]),
    (Family::StableLm, &[6, 17, 29]),
    (Family::Olmo2, &[9, 22]),
    (Family::SmolLm3, &[10, 27]),
    (Family::Phi4Mini, &[5, 12, 31, 108]),
];

const QUANTS: &[Option<&str>] = &[None, Some("q4g32"), Some("q4g32-sym"), Some("q8"), Some("f16"), Some("q4g64")];
const GPU_CACHES: &[&str] = &["f32", "f16", "int8", "int4"];
const STEP_SIZES: &[usize] = &[8, 16, 64];

fn seeds() -> Vec<u64> {
    match std::env::var("SLMC_DIFF_SEEDS") {
        Ok(v) if v.contains("..") => {
            let (a, b) = v.split_once("..").unwrap();
            (a.trim().parse().expect("seed range start")..b.trim().parse().expect("seed range end")).collect()
        }
        Ok(v) => v.split(',').map(|s| s.trim().parse().expect("a seed")).collect(),
        Err(_) => FIXED_SEEDS.to_vec(),
    }
}

/// The seeds to run with the family each one is forced to (None: as drawn).
fn cases() -> Vec<(u64, Option<Family>)> {
    let forced = std::env::var("SLMC_DIFF_FAMILY")
        .ok()
        .map(|f| Family::from_name(&f).unwrap_or_else(|| panic!("SLMC_DIFF_FAMILY: unknown family `{f}`")));
    let mut out: Vec<(u64, Option<Family>)> = seeds().into_iter().map(|s| (s, forced)).collect();
    if std::env::var("SLMC_DIFF_SEEDS").is_err() {
        for (family, seeds) in FAMILY_SEEDS {
            out.extend(seeds.iter().map(|s| (*s, Some(*family))));
        }
    }
    out
}

/// What one seed compiles: the optimizer flags and the step size, drawn from the seed.
struct Case {
    spec: RandomSpec,
    quant: Option<&'static str>,
    gpu_cache: &'static str,
    step: usize,
}

impl Case {
    fn new(seed: u64, family: Option<Family>) -> Case {
        let mut spec = RandomSpec::from_seed(seed);
        if let Some(f) = family {
            spec.family = f;
        }
        let h = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16;
        let mut quant = QUANTS[(h % QUANTS.len() as u64) as usize];
        // q4g64 needs rows of a multiple of 64.
        if quant == Some("q4g64")
            && (spec.hidden % 64 != 0 || spec.ffn % 64 != 0 || spec.heads * spec.head_dim % 64 != 0)
        {
            quant = Some("q4g32");
        }
        let gpu_cache = GPU_CACHES[((h >> 8) % GPU_CACHES.len() as u64) as usize];
        let step = STEP_SIZES[((h >> 16) % STEP_SIZES.len() as u64) as usize];
        Case { spec, quant, gpu_cache, step }
    }

    fn flags(&self, kv: &str) -> Vec<String> {
        let mut f = vec!["--pipeline".to_string(), "gpu".into()];
        if let Some(q) = self.quant {
            f.extend(["--quant".into(), q.into()]);
        }
        if kv != "f32" {
            f.extend(["--kv-quant".into(), kv.into()]);
        }
        f
    }

    fn describe(&self) -> String {
        format!("{:?} quant {:?} gpu cache {} step {}", self.spec, self.quant, self.gpu_cache, self.step)
    }
}

/// Relative tolerance of each executor: fp16 programs are looser, and Core ML iOS 17
/// re-quantizes 4-bit blocks to int8 blocks (each weight within 1/510 of its block's range:
/// measured up to 1.1e-1 on these random weights, which amplify it layer by layer).
fn tolerance(target: &str, case: &Case) -> f32 {
    match target {
        "coreml-ios17" if case.quant.is_some_and(|q| q.starts_with("q4")) => 3e-1,
        "coreml-ios17" if case.quant.is_some() => 6e-2,
        // fp16 activations: the error grows with the context (measured 3.0e-2 at 290 positions).
        "coreml-ios17" | "coreml-ios18" => 5e-2,
        // A packed or f16 cache turns float-level differences into whole code steps now and
        // then (a value on a rounding boundary), more often the longer the context: measured
        // 1.02e-2 (int8, seed 2117), 4.9e-2 (int4, one code step is 1/15 of a vector's range,
        // seed 3007; 1.07e-1 with head dim 64, Phi-4-mini family seed 108), 1.47e-3 (f16, 637
        // positions, seed 3168). A wrong index or a lost position gives errors of order 1.
        "webgpu" | "vulkan" if case.gpu_cache == "int8" => 3e-2,
        "webgpu" | "vulkan" if case.gpu_cache == "int4" => 1.2e-1,
        "webgpu" | "vulkan" if case.gpu_cache == "f16" => 3e-3,
        _ => 1e-4,
    }
}

fn compile(model: &Path, out: &Path, targets: &str, case: &Case, kv: &str) {
    let (m, o) = (model.to_str().unwrap(), out.to_str().unwrap());
    let step = case.step.to_string();
    let mut args = vec![
        "compile",
        m,
        "--target",
        targets,
        "-o",
        o,
        "--skip-smoke-check",
        "--no-cache",
        "--max-step-tokens",
        &step,
    ];
    let flags = case.flags(kv);
    args.extend(flags.iter().map(String::as_str));
    slmc_json(&args);
}

fn load(dir: &Path) -> Box<dyn Executor> {
    let open = slmc_runtime::registry::OpenOptions { adapter: None, threads: 1, mil_reference: true };
    slmc_runtime::registry::open(dir, &open).expect("the artifact loads").exec
}

/// Compares every row of one step; panics with the scenario on a difference.
fn compare(what: &str, a: &[f32], b: &[f32], rows: usize, vocab: usize, tol: f32) {
    assert_eq!(a.len(), rows * vocab, "{what}: the interpreter returned {} logits", a.len());
    assert_eq!(b.len(), a.len(), "{what}: the executor returned {} logits for {rows} rows", b.len());
    for (r, (x, y)) in a.chunks_exact(vocab).zip(b.chunks_exact(vocab)).enumerate() {
        let scale = x.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
        // Written so that NaN on either side is never within.
        let ok = x.iter().zip(y).all(|(p, q)| (p - q).abs() <= tol * scale);
        if !ok {
            let worst = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
            panic!(
                "{what}: row {r} differs by {:.2e} relative (tolerance {tol:.1e}, NaN: {})",
                worst / scale,
                y.iter().any(|v| v.is_nan())
            );
        }
    }
}

/// Runs every scenario on one executor against the interpreter.
fn scenarios(target: &str, exec: &mut dyn Executor, reference: &mut dyn Executor, case: &Case, capacity: usize) {
    let vocab = reference.vocab_size();
    assert_eq!(exec.vocab_size(), vocab, "{target}: vocabulary");
    let tol = tolerance(target, case);
    let tokens: Vec<u32> =
        (0..capacity).map(|i| ((i as u64 * 2654435761 + case.spec.seed) % vocab as u64) as u32).collect();
    let step = case.step;
    let mut lengths = vec![1, step - 1, step, step + 1, 2 * step + 1, capacity.min(300), capacity - 3];
    lengths.retain(|l| *l >= 1 && *l + 2 <= capacity);
    lengths.sort();
    lengths.dedup();
    // Prefill, then two decode steps fed the interpreter's greedy tokens.
    for &len in &lengths {
        exec.reset();
        reference.reset();
        let what = format!("{target}: prefill {len}");
        let a = reference.forward(&tokens[..len]).unwrap();
        compare(&what, &a, &exec.forward(&tokens[..len]).unwrap(), len, vocab, tol);
        let mut last = slmc_runtime::argmax(&a[a.len() - vocab..]) as u32;
        for d in 0..2 {
            let what = format!("{target}: prefill {len}, decode step {d}");
            let a = reference.forward(&[last]).unwrap();
            let b = exec.forward(&[last]).unwrap();
            compare(&what, &a, &b, 1, vocab, tol);
            last = slmc_runtime::argmax(&a) as u32;
        }
    }
    // Token by token across a step boundary.
    exec.reset();
    reference.reset();
    for (i, t) in tokens.iter().take((step + 2).min(capacity)).enumerate() {
        let what = format!("{target}: token by token, position {i}");
        compare(&what, &reference.forward(&[*t]).unwrap(), &exec.forward(&[*t]).unwrap(), 1, vocab, tol);
    }
    // The whole capacity in one call, then one token more: refused by both.
    exec.reset();
    reference.reset();
    let what = format!("{target}: a full cache of {capacity}");
    compare(&what, &reference.forward(&tokens).unwrap(), &exec.forward(&tokens).unwrap(), capacity, vocab, tol);
    assert!(exec.forward(&[1]).is_err(), "{target}: a full cache took one more token");
}

fn run_seed(seed: u64, family: Option<Family>, root: &Path) {
    let case = Case::new(seed, family);
    eprintln!("seed {seed}: {}", case.describe());
    let tag = family.map(|f| format!("{f:?}").to_lowercase()).unwrap_or_default();
    let model = root.join(format!("model-{seed}{tag}"));
    generate_random(&model, &case.spec).unwrap();
    let loaded = slmc_compiler::import::load(&model).unwrap_or_else(|e| panic!("seed {seed}: import: {e}"));
    let context = case.spec.context;
    for (targets, kv) in
        [("webgpu,vulkan", case.gpu_cache), ("onnx-cpu,onnx-portable,coreml-ios17,coreml-ios18", "f32")]
    {
        let out = root.join(format!("out-{seed}{tag}-{kv}"));
        compile(&model, &out, targets, &case, kv);
        let graph = slmc_compiler::lower::lower(&loaded).unwrap();
        let req = slmc_compiler::optimize::OptRequest {
            pipeline: Some("gpu".into()),
            quant: case.quant.map(str::to_string),
            kv_quant: (kv != "f32").then(|| kv.to_string()),
            ..Default::default()
        };
        let optimized = slmc_compiler::optimize::optimize(&loaded, graph, &req, None).unwrap();
        let weights = Layered { top: &optimized.derived, base: &loaded.weights };
        for target in targets.split(',') {
            let dir = out.join(target);
            let mut exec = load(&dir);
            // Core ML runs fixed steps of 8 tokens; its host starts a step that would pass
            // the context earlier, so every position is usable there too.
            let mut reference = InterpreterExecutor::new(&optimized.graph, &weights, context).unwrap();
            scenarios(target, exec.as_mut(), &mut reference, &case, context);
        }
    }
}

#[test]
fn every_executor_matches_the_interpreter_on_random_checkpoints() {
    let root = scratch("differential");
    let mut failures = Vec::new();
    let cases = cases();
    for &(seed, family) in &cases {
        let result = std::panic::catch_unwind(|| run_seed(seed, family, &root));
        if let Err(e) = result {
            let message = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let family = family.map(|f| format!(" ({f:?})")).unwrap_or_default();
            eprintln!("FAILED seed {seed}{family}: {message}");
            failures.push(format!("seed {seed}{family}: {message}"));
        }
    }
    eprintln!("{} cases, {} failed", cases.len(), failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
