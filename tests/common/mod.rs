//! Shared helpers for the integration tests: the `slmc` binary, the golden data and the
//! real model fixture.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("compiler/ has a parent").to_path_buf()
}

/// `../shared/golden` beside the repository (or `$SLMC_GOLDEN`).
pub fn golden_dir() -> PathBuf {
    let dir = std::env::var_os("SLMC_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("..").join("shared").join("golden"));
    assert!(dir.is_dir(), "golden data not found at {} (set SLMC_GOLDEN)", dir.display());
    dir
}

pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The SmolLM2 GGUF installed by scripts/setup. Missing is a failure, not a skip:
/// the README's test command runs the set-up first.
pub fn smollm2_gguf() -> PathBuf {
    let path = slmc_compiler::default_model_path();
    assert!(path.is_file(), "{} is missing: run scripts/setup (the README's test command does)", path.display());
    path
}

/// Runs slmc. Compiled bundles are unsigned in most tests, so they run with
/// `SLMC_ALLOW_UNSIGNED=1` (file hashes are still checked); `slmc_strict` runs without it.
pub fn slmc(args: &[&str]) -> Output {
    slmc_with(args, true)
}

pub fn slmc_strict(args: &[&str]) -> Output {
    slmc_with(args, false)
}

fn slmc_with(args: &[&str], allow_unsigned: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_slmc"));
    if allow_unsigned {
        cmd.env("SLMC_ALLOW_UNSIGNED", "1");
    } else {
        cmd.env_remove("SLMC_ALLOW_UNSIGNED");
    }
    // The tests' compile cache lives with the build, not in the user's cache.
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("compile-cache");
    cmd.env_remove("SLMC_PUBKEY")
        .env("SLMC_COMPILE_CACHE", cache)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        // The Vulkan loader warns without it; harmless, but noisy.
        .env("XDG_RUNTIME_DIR", std::env::var_os("XDG_RUNTIME_DIR").unwrap_or_else(|| "/tmp".into()))
        .output()
        .expect("the slmc binary runs")
}

/// Runs slmc with `--json`, asserts success and parses stdout.
pub fn slmc_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = slmc(&all);
    assert!(
        out.status.success(),
        "slmc {:?} failed: {}\n{}",
        args,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("slmc {args:?}: bad JSON ({e})"))
}

/// Runs slmc expecting failure; returns stderr. Asserts a clean non-zero exit (no panic).
pub fn slmc_fails(args: &[&str]) -> String {
    failure(args, slmc(args))
}

/// `slmc_fails` without `SLMC_ALLOW_UNSIGNED`.
pub fn slmc_strict_fails(args: &[&str]) -> String {
    failure(args, slmc_strict(args))
}

fn failure(args: &[&str], out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "slmc {args:?} should fail but succeeded");
    assert_eq!(out.status.code(), Some(1), "slmc {args:?} should exit 1, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "slmc {args:?} panicked: {stderr}");
    stderr
}

pub fn ids_arg(ids: &[u64]) -> String {
    ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

pub fn as_ids(v: &Value) -> Vec<u64> {
    v.as_array().expect("an id array").iter().map(|x| x.as_u64().expect("an id")).collect()
}

/// A scratch directory under cargo's per-target temp dir, emptied first.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Converts the SmolLM2 GGUF to a Hugging Face directory once per test binary and dtype.
pub fn converted(dtype: &'static str) -> PathBuf {
    static F32: OnceLock<PathBuf> = OnceLock::new();
    static F16: OnceLock<PathBuf> = OnceLock::new();
    static BF16: OnceLock<PathBuf> = OnceLock::new();
    let cell = match dtype {
        "f32" => &F32,
        "f16" => &F16,
        "bf16" => &BF16,
        _ => panic!("dtype {dtype}"),
    };
    cell.get_or_init(|| {
        let parent = scratch(&format!("smollm2-hf-{dtype}-{}", std::process::id()));
        let out = parent.join("model");
        let gguf = smollm2_gguf();
        slmc_json(&["convert", gguf.to_str().unwrap(), "--to", "hf", out.to_str().unwrap(), "--dtype", dtype]);
        out
    })
    .clone()
}

/// A compiled SmolLM2 artifact (or the GGUF itself) on the 8 golden prompts: teacher-forced
/// argmax equals the golden wherever the golden gap is at least 0.02, and greedy generation
/// reproduces the golden ids up to the first such near-tie. Prints a per-prompt report.
pub fn check_smollm2_goldens(artifact: &Path) {
    check_goldens(artifact, 0.02, true, &[]);
}

/// The goldens with a stated bound, for executors that are not f32 (fp16 programs): the
/// teacher-forced argmax equals the golden token wherever the golden gap is at least
/// `bound`, and greedy generation equals the golden ids before the first position whose
/// gap is below `bound` (that position itself may flip). `extra` goes to `run` and `score`.
pub fn check_smollm2_goldens_within(artifact: &Path, bound: f64, extra: &[&str]) {
    check_goldens(artifact, bound, false, extra);
}

/// Greedy must match before the first gap below `bound`, and at it too when `tie_included`.
fn check_goldens(artifact: &Path, bound: f64, tie_included: bool, extra: &[&str]) {
    let a = artifact.to_str().unwrap();
    let golden = read_json(&golden_dir().join("smollm2-135m-greedy.json"));
    let mut report = Vec::new();
    for p in golden["prompts"].as_array().unwrap() {
        let id = p["id"].as_str().unwrap();
        let (input, cont) = (as_ids(&p["input_ids"]), as_ids(&p["generated_ids"]));
        let gaps: Vec<f64> =
            p["greedy_top1_minus_top2"].as_array().unwrap().iter().map(|g| g.as_f64().unwrap()).collect();
        let (input_arg, cont_arg) = (ids_arg(&input), ids_arg(&cont));
        let mut args = vec!["score", a, "--prompt-ids", &input_arg, "--continuation-ids", &cont_arg];
        args.extend_from_slice(extra);
        let score = slmc_json(&args);
        for (i, pos) in score["positions"].as_array().unwrap().iter().enumerate() {
            if gaps[i] >= bound {
                assert_eq!(pos["argmax"].as_u64().unwrap(), cont[i], "{id} step {i} (gap {})", gaps[i]);
            }
        }
        let mut args = vec!["run", a, "--prompt-ids", &input_arg, "--max-new-tokens", "48", "--ignore-eos"];
        args.extend_from_slice(extra);
        let generated = as_ids(&slmc_json(&args)["generated_ids"]);
        let must = gaps.iter().position(|g| *g < bound).map(|i| i + tie_included as usize).unwrap_or(48);
        assert_eq!(generated[..must], cont[..must], "{id}: greedy differs before the first gap below {bound}");
        let same = generated.iter().zip(&cont).take_while(|(a, b)| a == b).count();
        report.push(format!("{id}: {same}/48 identical (bound {must}), top-1 {:.3}", score["top1_agreement"]));
    }
    eprintln!("{}", report.join("\n"));
}

/// The Python environment scripts/setup creates (with `onnx`).
pub fn venv_python() -> PathBuf {
    let python = slmc_compiler::cache_dir().join("venv/bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/setup (the README's test command does)", python.display());
    python
}

/// Runs a Python snippet in the test environment; panics with its output on failure.
pub fn python(code: &str, args: &[&str]) -> String {
    let out = Command::new(venv_python()).arg("-c").arg(code).args(args).output().expect("python runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "python failed:\n{text}");
    text
}

/// Last-prompt-position logits (all `vocab` of them), the greedy continuation of
/// `new_tokens`, and the executor's name.
pub fn prompt_logits(
    model: &str,
    prompt: &str,
    vocab: usize,
    new_tokens: usize,
    extra: &[&str],
) -> (Vec<f64>, Vec<u64>, String) {
    let (v, n) = (vocab.to_string(), new_tokens.to_string());
    let mut args =
        vec!["run", model, "--prompt-ids", prompt, "--max-new-tokens", &n, "--ignore-eos", "--record-logits", "1"];
    args.extend_from_slice(&["--record-top-k", &v]);
    args.extend_from_slice(extra);
    let out = slmc_json(&args);
    let mut logits = vec![f64::NAN; vocab];
    for t in out["recorded_logits"][0]["top"].as_array().unwrap() {
        logits[t["id"].as_u64().unwrap() as usize] = t["logit"].as_f64().unwrap();
    }
    (logits, as_ids(&out["generated_ids"]), out["executor"].as_str().unwrap().to_string())
}

/// A compiled artifact against the interpreter on the same optimized graph (pipeline
/// `gpu` with the same optimizer `flags`): its executor is `executor`, the greedy tokens
/// are equal and the logits agree within `tolerance` relative to the largest.
pub fn assert_artifact_matches_interpreter(
    model: &Path,
    artifact: &Path,
    flags: &[&str],
    vocab: usize,
    executor: &str,
    tolerance: f64,
) {
    let prompt = "5,17,3,88,41,9,60,2,33,1,4,7,12";
    let mut interp_flags = vec!["--pipeline", "gpu"];
    interp_flags.extend_from_slice(flags);
    let (a, a_ids, exec) = prompt_logits(model.to_str().unwrap(), prompt, vocab, 10, &interp_flags);
    let (b, b_ids, other) = prompt_logits(artifact.to_str().unwrap(), prompt, vocab, 10, &[]);
    assert_eq!((exec.as_str(), other.as_str()), ("interpreter", executor));
    let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let diff = a.iter().zip(&b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale;
    eprintln!("{} {} {flags:?}: max relative logit difference {diff:.2e}", artifact.display(), model.display());
    assert!(diff <= tolerance, "{} {flags:?}: logits differ by {diff}", artifact.display());
    assert_eq!(a_ids, b_ids, "{} {flags:?}", artifact.display());
}
