//! The fuzz targets' inputs, replayed on stable in the ordinary test run: every file of
//! `fuzz/corpus/<target>/` (the committed seeds) and of `fuzz/artifacts/<target>/` (crash
//! reproducers cargo-fuzz wrote, committed once fixed) goes through the same function
//! cargo-fuzz runs (`slmc_compiler::fuzzing`), under the same allocation bound
//! (`fuzz/alloc_bound.rs`). A target whose corpus is empty fails: a replay that ran
//! nothing would pass by default. See fuzz/README.md.

#[path = "../fuzz/alloc_bound.rs"]
mod alloc_bound;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The allocator's high-water mark is process-wide, and tests run on parallel threads:
/// one input at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("fuzz")
}

/// The regular files of `dir` (none if it does not exist), hidden ones (`.gitkeep`) aside,
/// sorted.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "(a panic without a message)".into(),
    }
}

fn replay(target: &str, run: fn(&[u8])) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let fuzz = fuzz_dir();
    let corpus = inputs(&fuzz.join("corpus").join(target));
    assert!(!corpus.is_empty(), "fuzz/corpus/{target}/ holds no inputs: the replay would check nothing");
    let artifacts = inputs(&fuzz.join("artifacts").join(target));
    let (seeds, reproducers) = (corpus.len(), artifacts.len());
    let mut failures = Vec::new();
    for path in corpus.into_iter().chain(artifacts) {
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: cannot read: {e}", path.display()));
        let outcome = std::panic::catch_unwind(|| {
            alloc_bound::reset();
            run(&data);
            alloc_bound::check_allocation_bound(data.len());
        });
        if let Err(panic) = outcome {
            failures.push(format!("{}: {}", path.display(), panic_text(&*panic)));
        }
    }
    eprintln!("{target}: {seeds} corpus inputs, {reproducers} reproducers");
    assert!(
        failures.is_empty(),
        "{target}: {} of {} inputs failed (rerun one with `cargo +nightly fuzz run {target} FILE`):\n{}",
        failures.len(),
        seeds + reproducers,
        failures.join("\n")
    );
}

#[test]
fn gguf() {
    replay("gguf", slmc_compiler::fuzzing::gguf);
}

#[test]
fn safetensors_config() {
    replay("safetensors_config", slmc_compiler::fuzzing::safetensors_config);
}

#[test]
fn tokenizer_files() {
    replay("tokenizer_files", slmc_compiler::fuzzing::tokenizer_files);
}

#[test]
fn ir_text() {
    replay("ir_text", slmc_compiler::fuzzing::ir_text);
}

#[test]
fn bundle_json() {
    replay("bundle_json", slmc_compiler::fuzzing::bundle_json);
}

#[test]
fn coreml() {
    replay("coreml", slmc_compiler::fuzzing::coreml);
}
