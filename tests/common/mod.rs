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

/// The Gemma 3 270M GGUF (Q4_K_M) installed by `scripts/setup gemma3` (scripts/test asks
/// for it). Missing is a failure, not a skip.
pub fn gemma3_gguf() -> PathBuf {
    let path = slmc_compiler::cache_dir().join("models").join("gemma-3-270m-q4_k_m.gguf");
    assert!(path.is_file(), "{} is missing: run scripts/setup gemma3 (scripts/test does)", path.display());
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
        // Whole bundles: a few of the Gemma 3 ones would otherwise fill a CI disk.
        .env("SLMC_COMPILE_CACHE_MAX_BYTES", (2u64 << 30).to_string())
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

/// A scratch directory under cargo's per-target temp dir, emptied first and removed when
/// the guard drops: a suite run writes tens of GB of bundles in all, more than a CI disk
/// holds at once. A failing test (the guard drops while panicking) or
/// `SLMC_KEEP_SCRATCH=1` keeps it for a look.
pub fn scratch(name: &str) -> Scratch {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    Scratch { path: root.clone(), root: Some(root) }
}

/// SmolLM2 compiled for `target` without the compile-time smoke set (for tests that need a
/// bundle, not its checks); the guard stands for the bundle inside scratch directory `name`.
pub fn smollm2_bundle(name: &str, target: &str) -> Scratch {
    let out = scratch(name);
    let o = out.to_str().unwrap();
    slmc_json(&["compile", smollm2_gguf().to_str().unwrap(), "--target", target, "-o", o, "--skip-smoke-check"]);
    out.into_sub(target)
}

/// A path inside a scratch directory that is removed when this drops (see `scratch`).
#[must_use = "the directory is removed when the guard drops"]
pub struct Scratch {
    /// Removed on drop; `None` once kept.
    root: Option<PathBuf>,
    /// What the guard stands for: the root or a path inside it.
    path: PathBuf,
}

impl Scratch {
    /// The same scratch directory, standing for `sub` inside it.
    pub fn into_sub(mut self, sub: impl AsRef<Path>) -> Scratch {
        let path = self.path.join(sub);
        Scratch { root: self.root.take(), path }
    }

    /// Keeps the directory past the guard (shared by every test of a binary).
    pub fn keep(mut self) -> PathBuf {
        self.root = None;
        std::mem::take(&mut self.path)
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.path.as_os_str()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let keep = std::thread::panicking() || std::env::var_os("SLMC_KEEP_SCRATCH").is_some_and(|v| v == "1");
        if let (Some(root), false) = (&self.root, keep) {
            let _ = std::fs::remove_dir_all(root);
        }
    }
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
        // One directory per dtype, shared by the binary's tests and replaced by the next
        // binary's conversion (test binaries run one after another).
        let out = scratch(&format!("smollm2-hf-{dtype}")).keep().join("model");
        let gguf = smollm2_gguf();
        slmc_json(&["convert", gguf.to_str().unwrap(), "--to", "hf", out.to_str().unwrap(), "--dtype", dtype]);
        out
    })
    .clone()
}

/// A compiled SmolLM2 artifact (or the GGUF itself) on the 8 golden prompts: teacher-forced
/// argmax equals the golden wherever the golden gap is at least 0.02, and greedy generation
/// reproduces the golden ids up to and including the first near-tie. Prints a report.
pub fn check_smollm2_goldens(artifact: &Path) {
    check_goldens(artifact, &Goldens::short(), 0.02, true, &[]);
}

/// The goldens with a stated bound, for executors that are not f32 (fp16 programs): the
/// teacher-forced argmax equals the golden token wherever the golden gap is at least
/// `bound`, and greedy generation equals the golden ids before the first position whose
/// gap is below `bound` (that position itself may flip). `extra` goes to `run` and `score`.
pub fn check_smollm2_goldens_within(artifact: &Path, bound: f64, extra: &[&str]) {
    check_goldens(artifact, &Goldens::short(), bound, false, extra);
}

/// Which golden file and how each prompt is checked.
pub struct Goldens {
    pub file: &'static str,
    /// Teacher-forced with the continuation fed one token per step (`score --decode`): the
    /// computation greedy generation does, so argmax equal to the golden token at every
    /// step before the first near-tie is greedy reproducing the golden ids there.
    pub decode: bool,
    /// New tokens of the separate greedy `run` (0: none; the decode-path score stands in).
    pub greedy_tokens: usize,
}

impl Goldens {
    pub fn short() -> Goldens {
        Goldens { file: "smollm2-135m-greedy.json", decode: false, greedy_tokens: 48 }
    }
}

/// Greedy must match before the first gap below `bound`, and at it too when `tie_included`.
pub fn check_goldens(artifact: &Path, goldens: &Goldens, bound: f64, tie_included: bool, extra: &[&str]) {
    check_golden_prompts(artifact, goldens, bound, tie_included, None, extra);
}

/// `check_goldens` on the named prompts only (each must exist), the near-tie itself free
/// to flip (for executors held to a wider bound or too slow for every prompt).
pub fn check_goldens_of(artifact: &Path, goldens: &Goldens, bound: f64, only: &[&str], extra: &[&str]) {
    check_golden_prompts(artifact, goldens, bound, false, Some(only), extra);
}

fn check_golden_prompts(
    artifact: &Path,
    goldens: &Goldens,
    bound: f64,
    tie_included: bool,
    only: Option<&[&str]>,
    extra: &[&str],
) {
    let a = artifact.to_str().unwrap();
    let golden = read_json(&golden_dir().join(goldens.file));
    let prompts: Vec<&Value> = golden["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| only.is_none_or(|ids| ids.contains(&p["id"].as_str().unwrap())))
        .collect();
    assert_eq!(prompts.len(), only.map_or(prompts.len(), |o| o.len()), "{}: prompts {only:?}", goldens.file);
    assert!(!prompts.is_empty(), "{}: no prompts", goldens.file);
    let mut report = Vec::new();
    for p in prompts {
        let id = p["id"].as_str().unwrap();
        let (input, cont) = (as_ids(&p["input_ids"]), as_ids(&p["generated_ids"]));
        let gaps: Vec<f64> =
            p["greedy_top1_minus_top2"].as_array().unwrap().iter().map(|g| g.as_f64().unwrap()).collect();
        assert_eq!(gaps.len(), cont.len(), "{id}: one gap per generated token");
        let must = gaps.iter().position(|g| *g < bound).map(|i| i + tie_included as usize).unwrap_or(cont.len());
        let input_arg = ids_arg(&input);
        // Decoded step by step, the steps before the first near-tie are greedy's own.
        let greedy_prefix = if goldens.decode { must } else { 0 };
        let check = TeacherForced { bound, greedy_prefix, decode: goldens.decode };
        let score = check.assert_matches(a, &input, &cont, &gaps, extra, id);
        let positions = score["positions"].as_array().unwrap();
        let mut same = positions.iter().zip(&cont).take_while(|(p, c)| p["argmax"].as_u64() == Some(**c)).count();
        if goldens.greedy_tokens > 0 {
            let n = goldens.greedy_tokens.min(cont.len());
            let n_arg = n.to_string();
            let mut args = vec!["run", a, "--prompt-ids", &input_arg, "--max-new-tokens", &n_arg, "--ignore-eos"];
            args.extend_from_slice(extra);
            let generated = as_ids(&slmc_json(&args)["generated_ids"]);
            assert_eq!(generated.len(), n, "{id}: {n} greedy tokens");
            let must = must.min(n);
            assert_eq!(generated[..must], cont[..must], "{id}: greedy differs before the first gap below {bound}");
            same = generated.iter().zip(&cont).take_while(|(a, b)| a == b).count();
        }
        report.push(format!(
            "{id}: {same}/{} identical (bound {must}), top-1 {:.3}",
            cont.len(),
            score["top1_agreement"]
        ));
    }
    eprintln!("{}", report.join("\n"));
}

/// A teacher-forced check of a continuation against a reference's tokens and top-2 gaps.
pub struct TeacherForced {
    /// The argmax must equal the reference wherever its gap is at least this...
    pub bound: f64,
    /// ...and at every step before this one (decoded step by step, greedy's own steps).
    pub greedy_prefix: usize,
    /// `score --decode`: the continuation one token per step.
    pub decode: bool,
}

impl TeacherForced {
    /// Scores `cont` after `prompt` on `model` and asserts every checked position; returns
    /// the score's JSON.
    pub fn assert_matches(
        &self,
        model: &str,
        prompt: &[u64],
        cont: &[u64],
        gaps: &[f64],
        extra: &[&str],
        label: &str,
    ) -> Value {
        let (prompt_arg, cont_arg) = (ids_arg(prompt), ids_arg(cont));
        let mut args = vec!["score", model, "--prompt-ids", &prompt_arg, "--continuation-ids", &cont_arg];
        if self.decode {
            args.push("--decode");
        }
        args.extend_from_slice(extra);
        let score = slmc_json(&args);
        let positions = score["positions"].as_array().unwrap();
        assert_eq!(positions.len(), cont.len(), "{label}: a score for every continuation position");
        for (i, pos) in positions.iter().enumerate() {
            if gaps[i] >= self.bound || i < self.greedy_prefix {
                assert_eq!(pos["argmax"].as_u64(), Some(cont[i]), "{label} step {i} (gap {})", gaps[i]);
            }
        }
        score
    }
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
    // Every id recorded once, every logit a number: a missing or NaN entry fails here.
    assert!(logits.iter().all(|l| l.is_finite()), "{model}: missing or non-finite logits");
    let generated = as_ids(&out["generated_ids"]);
    assert_eq!(generated.len(), new_tokens, "{model}: {new_tokens} greedy tokens");
    (logits, generated, out["executor"].as_str().unwrap().to_string())
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
    let diff = max_relative_difference(&a, &b);
    eprintln!("{} {} {flags:?}: max relative logit difference {diff:.2e}", artifact.display(), model.display());
    assert!(diff <= tolerance, "{} {flags:?}: logits differ by {diff}", artifact.display());
    assert_eq!(a_ids, b_ids, "{} {flags:?}", artifact.display());
}

/// max |a - b| / max |a| over equally long vectors; NaN (which then fails any `<=` bound)
/// when either side holds a NaN or infinity or the lengths differ.
pub fn max_relative_difference(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() || a.is_empty() || a.iter().chain(b).any(|v| !v.is_finite()) {
        return f64::NAN;
    }
    let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(f64::MIN_POSITIVE);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}

/// A prompt of exactly `n` SmolLM2 tokens that no golden file holds: numbered stock records
/// with varied items, quantities, days and bays, tokenized by the model's own tokenizer.
pub fn own_long_prompt(n: usize) -> Vec<u64> {
    const ITEMS: [&str; 7] = [
        "tinned tomatoes",
        "dish soap",
        "printer paper",
        "bicycle tyres",
        "frozen peas",
        "garden hoses",
        "lamp shades",
    ];
    const DAYS: [&str; 5] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"];
    let mut text = String::from("Stock log for the north warehouse, week 14.\n");
    for i in 0..n / 12 + 20 {
        text.push_str(&format!(
            "Record {}: {} cartons of {} arrived on {} and were put away in bay {}{}; {} were damaged.\n",
            i + 1,
            (i * 37) % 90 + 10,
            ITEMS[i % ITEMS.len()],
            DAYS[(i * 3) % DAYS.len()],
            (b'A' + (i % 6) as u8) as char,
            (i * 7) % 19 + 1,
            (i * 5) % 4,
        ));
    }
    let out = slmc_json(&["tokenize", smollm2_gguf().to_str().unwrap(), "--text", &text]);
    let ids = as_ids(&out[0]["ids"]);
    assert!(ids.len() >= n, "the stock log is only {} tokens", ids.len());
    ids[..n].to_vec()
}

/// The interpreter's reference on `own_long_prompt(1500)`: its greedy continuation of
/// `new_tokens` and, teacher-forced on it, each position's top-2 gap. Computed once per
/// test binary.
pub fn own_long_reference(new_tokens: usize) -> (Vec<u64>, Vec<u64>, Vec<f64>) {
    static REF: OnceLock<(Vec<u64>, Vec<u64>, Vec<f64>)> = OnceLock::new();
    let r = REF.get_or_init(|| {
        let gguf = smollm2_gguf();
        let g = gguf.to_str().unwrap();
        let prompt = own_long_prompt(1500);
        let p = ids_arg(&prompt);
        let n = new_tokens.to_string();
        let cont = as_ids(
            &slmc_json(&["run", g, "--prompt-ids", &p, "--max-new-tokens", &n, "--ignore-eos"])["generated_ids"],
        );
        assert_eq!(cont.len(), new_tokens);
        let score = slmc_json(&["score", g, "--prompt-ids", &p, "--continuation-ids", &ids_arg(&cont), "--decode"]);
        let positions = score["positions"].as_array().unwrap();
        assert_eq!(positions.len(), cont.len());
        let mut gaps = Vec::new();
        for (pos, c) in positions.iter().zip(&cont) {
            assert_eq!(pos["argmax"].as_u64(), Some(*c), "the interpreter's score and run agree");
            gaps.push(pos["top1_minus_top2"].as_f64().unwrap());
        }
        (prompt, cont, gaps)
    });
    assert_eq!(r.1.len(), new_tokens, "one reference length per test binary");
    r.clone()
}

/// A compiled SmolLM2 artifact on `own_long_prompt(1500)` against the interpreter, the way
/// the goldens are checked (`score --decode`: argmax equal wherever the interpreter's gap
/// is at least `bound`, and at every step before its first smaller gap, i.e. greedy).
pub fn check_own_long_prompt(artifact: &Path, new_tokens: usize, bound: f64) {
    let (prompt, cont, gaps) = own_long_reference(new_tokens);
    let a = artifact.to_str().unwrap();
    let first_tie = gaps.iter().position(|g| *g < bound).unwrap_or(cont.len());
    let check = TeacherForced { bound, greedy_prefix: first_tie, decode: true };
    check.assert_matches(a, &prompt, &cont, &gaps, &[], &format!("{a}: 1500-token prompt"));
    eprintln!(
        "{a}: 1500-token prompt, {} steps match the interpreter (first gap below {bound}: {first_tie})",
        cont.len()
    );
}
