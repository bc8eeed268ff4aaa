//! Bundles end to end: reproducible builds, signatures and tamper detection, the runtime's
//! refusals, the golden smoke eval, the on-device store with rollback, the compile cache,
//! and per-profile handling of an embedding table past WebGPU's binding limit.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn tiny() -> PathBuf {
    repo_root().join("fixtures/tiny-llama-sharded")
}

fn compile(model: &Path, targets: &str, out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["compile", model.to_str().unwrap(), "--target", targets, "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    slmc_json(&args)
}

/// Every file under `dir` with its bytes, by relative path.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.strip_prefix(dir).unwrap().display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn three_compiles_for_three_targets_are_byte_identical() {
    let gguf = smollm2_gguf();
    let outs: Vec<Scratch> = (0..3).map(|i| scratch(&format!("bundle-repro-{i}"))).collect();
    for out in &outs {
        // The smoke check reads the bundle, never writes it; other tests run it.
        compile(&gguf, "webgpu,vulkan,onnx-cpu", out, &["--no-cache", "--skip-smoke-check"]);
    }
    for target in ["webgpu", "vulkan", "onnx-cpu"] {
        let first = tree(&outs[0].join(target));
        assert!(first.iter().any(|(p, _)| p == "manifest.json"));
        for out in &outs[1..] {
            let other = tree(&out.join(target));
            assert_eq!(first.len(), other.len(), "{target}: file lists differ");
            for ((pa, a), (pb, b)) in first.iter().zip(&other) {
                assert_eq!(pa, pb, "{target}: file lists differ");
                assert!(a == b, "{target}/{pa} differs between compiles");
            }
        }
        // No absolute paths or timestamps leak into the manifest.
        let manifest = std::fs::read_to_string(outs[0].join(target).join("manifest.json")).unwrap();
        assert!(
            !manifest.contains(outs[0].to_str().unwrap()) && !manifest.contains("/root"),
            "{target}: a path leaked"
        );
    }
}

#[test]
fn signed_bundles_verify_and_every_flipped_byte_is_named() {
    let dir = scratch("bundle-sign");
    let key = dir.join("release.key");
    slmc_json(&["keygen", "--out", key.to_str().unwrap()]);
    let public = dir.join("release.key.pub");
    compile(&tiny(), "webgpu", &dir.join("out"), &[]);
    let bundle = dir.join("out/webgpu");
    let b = bundle.to_str().unwrap();
    let p = public.to_str().unwrap();
    // Unsigned: refused unless allowed.
    let err = slmc_strict_fails(&["run", b, "--prompt-ids", "1,2"]);
    assert!(err.contains("unsigned bundle refused"), "{err}");
    slmc_json(&["sign", b, "--key", key.to_str().unwrap()]);
    let v = slmc_json(&["verify", b, "--pubkey", p]);
    assert_eq!((v["verified"].as_bool(), v["signature_checked"].as_bool()), (Some(true), Some(true)));
    // Signed but no key given: refused; with the key: runs.
    let err = slmc_strict_fails(&["run", b, "--prompt-ids", "1,2"]);
    assert!(err.contains("no public key"), "{err}");
    let out = slmc_strict(&["run", b, "--prompt-ids", "1,2", "--max-new-tokens", "2", "--pubkey", p, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Another key: refused.
    let other = dir.join("other.key");
    slmc_json(&["keygen", "--out", other.to_str().unwrap()]);
    let err = slmc_fails(&["verify", b, "--pubkey", dir.join("other.key.pub").to_str().unwrap()]);
    assert!(err.contains("manifest.json") && err.contains("signature does not match"), "{err}");
    // One flipped byte in any file: verify names that file.
    let files = read_json(&bundle.join("manifest.json"))["files"].as_array().unwrap().clone();
    assert!(files.len() >= 10);
    for f in files.iter().map(|f| f["path"].as_str().unwrap().to_string()).chain(["manifest.json".to_string()]) {
        let path = bundle.join(&f);
        let original = std::fs::read(&path).unwrap();
        let mut flipped = original.clone();
        let at = original.len() / 2;
        flipped[at] ^= 0x20;
        std::fs::write(&path, &flipped).unwrap();
        let err = slmc_fails(&["verify", b, "--pubkey", p]);
        assert!(err.contains(path.to_str().unwrap()), "{f}: {err}");
        std::fs::write(&path, &original).unwrap();
    }
    slmc_json(&["verify", b, "--pubkey", p]);
    // A file the manifest does not list is refused too.
    std::fs::write(bundle.join("extra.bin"), b"x").unwrap();
    let err = slmc_fails(&["verify", b, "--pubkey", p]);
    assert!(err.contains("extra.bin") && err.contains("not in the manifest"), "{err}");
    std::fs::remove_file(bundle.join("extra.bin")).unwrap();
}

#[test]
fn a_bundle_needing_a_newer_runtime_is_refused_with_both_versions() {
    let dir = scratch("bundle-runtime");
    compile(&tiny(), "onnx-cpu", &dir.join("out"), &["--skip-smoke-check"]);
    let bundle = dir.join("out/onnx-cpu");
    let path = bundle.join("manifest.json");
    let mut manifest = read_json(&path);
    manifest["min_runtime_version"] = serde_json::json!("99.1.0");
    std::fs::write(&path, serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    let key = dir.join("k");
    slmc_json(&["keygen", "--out", key.to_str().unwrap()]);
    slmc_json(&["sign", bundle.to_str().unwrap(), "--key", key.to_str().unwrap()]);
    let p = dir.join("k.pub");
    let err =
        slmc_strict_fails(&["run", bundle.to_str().unwrap(), "--prompt-ids", "1", "--pubkey", p.to_str().unwrap()]);
    let ours = env!("CARGO_PKG_VERSION");
    assert!(err.contains("99.1.0") && err.contains(&format!("this runtime is {ours}")), "{err}");
}

#[test]
fn eval_runs_the_golden_smoke_set_and_catches_a_disagreeing_bundle() {
    let dir = scratch("bundle-eval");
    compile(&tiny(), "webgpu,onnx-cpu", &dir.join("out"), &[]);
    for target in ["webgpu", "onnx-cpu"] {
        let b = dir.join("out").join(target);
        let report = slmc_json(&["eval", b.to_str().unwrap()]);
        assert_eq!(report["passed"], true, "{target}: {report}");
        let prompts = report["prompts"].as_array().unwrap();
        // Two short prompts and the long one, checked at every prompt position too.
        assert_eq!(prompts.len(), 3);
        assert_eq!(prompts[2]["prompt_ids"].as_array().unwrap().len(), 120, "128 positions less 8 generated");
        assert!(prompts[2]["prompt_positions_checked"].as_u64().unwrap() > 60, "{target}: {}", prompts[2]);
    }
    // A long prompt whose recorded argmax at one position no longer matches: eval fails.
    let b = dir.join("out/webgpu");
    let path = b.join("manifest.json");
    let original = std::fs::read(&path).unwrap();
    let mut manifest = read_json(&path);
    let long = &mut manifest["smoke"]["prompts"][2];
    let i = long["prompt_gaps"].as_array().unwrap().iter().position(|g| g.as_f64().unwrap() >= 0.02).unwrap();
    long["prompt_argmax"][i] = serde_json::json!((long["prompt_argmax"][i].as_u64().unwrap() + 1) % 96);
    std::fs::write(&path, serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    let err = slmc_fails(&["eval", b.to_str().unwrap()]);
    assert!(err.contains("smoke set disagrees"), "{err}");
    std::fs::write(&path, original).unwrap();
    // Expectations that no longer match the artifact (a manifest edited after the fact,
    // then re-signed so only the smoke set can notice): eval fails.
    let b = dir.join("out/onnx-cpu");
    let path = b.join("manifest.json");
    let mut manifest = read_json(&path);
    for p in manifest["smoke"]["prompts"].as_array_mut().unwrap() {
        let first = p["expected_ids"][0].as_u64().unwrap();
        p["expected_ids"][0] = serde_json::json!((first + 1) % 96);
        p["gaps"][0] = serde_json::json!(1.0);
    }
    std::fs::write(&path, serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    let err = slmc_fails(&["eval", b.to_str().unwrap()]);
    assert!(err.contains("smoke set disagrees"), "{err}");
}

#[test]
fn install_keeps_two_previous_versions_and_rollback_switches_back() {
    let dir = scratch("bundle-store");
    let key = dir.join("k");
    slmc_json(&["keygen", "--out", key.to_str().unwrap()]);
    let p = dir.join("k.pub");
    let store = dir.join("store");
    let s = store.to_str().unwrap();
    let mut ids = Vec::new();
    for v in 1..=4 {
        let out = dir.join(format!("v{v}"));
        compile(&tiny(), "onnx-cpu", &out, &["--model-version", &v.to_string()]);
        let b = out.join("onnx-cpu");
        slmc_json(&["sign", b.to_str().unwrap(), "--key", key.to_str().unwrap()]);
        let r = slmc_json(&["install", b.to_str().unwrap(), "--store", s, "--pubkey", p.to_str().unwrap()]);
        eprintln!("install v{v}: {:.2} s", r["seconds"].as_f64().unwrap());
        ids.push(r["installed"].as_str().unwrap().to_string());
    }
    let state = slmc_compiler::store::read_state(&store).unwrap();
    assert_eq!(state.current.as_deref(), Some(ids[3].as_str()));
    assert_eq!(state.previous, [ids[2].clone(), ids[1].clone()]);
    let versions: Vec<String> = std::fs::read_dir(store.join("versions"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(versions.len(), 3, "{versions:?}");
    assert!(!versions.contains(&ids[0]), "the oldest version is pruned");
    let current = || std::fs::read_link(store.join("current")).unwrap();
    assert!(current().ends_with(&ids[3]));
    let r = slmc_json(&["rollback", "--store", s]);
    eprintln!("rollback: {:.3} s", r["seconds"].as_f64().unwrap());
    assert_eq!(r["current"], ids[2].as_str());
    assert!(current().ends_with(&ids[2]));
    // The store's current version runs (signature and hashes checked on the way).
    let out = slmc_strict(&[
        "run",
        store.join("current").to_str().unwrap(),
        "--prompt-ids",
        "1,2",
        "--pubkey",
        p.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A tampered bundle is refused and the store is left exactly as it was.
    let before: Vec<_> = tree(&store);
    let bad = dir.join("v4/onnx-cpu");
    let data = bad.join("model.onnx.data");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&data, &bytes).unwrap();
    let err = slmc_fails(&["install", bad.to_str().unwrap(), "--store", s, "--pubkey", p.to_str().unwrap()]);
    assert!(err.contains(data.to_str().unwrap()), "{err}");
    assert!(tree(&store) == before, "a failed install changed the store");
    assert!(current().ends_with(&ids[2]));
}

#[test]
fn an_unchanged_compile_is_served_from_the_cache() {
    let dir = scratch("bundle-cache");
    let cache = dir.join("cache");
    let run_with = |out: &str, extra: &[&str], max_bytes: &str| {
        let started = std::time::Instant::now();
        let mut args = vec!["compile", "", "--target", "webgpu,onnx-cpu", "-o", out];
        let gguf = smollm2_gguf();
        let g = gguf.to_str().unwrap().to_string();
        args[1] = &g;
        args.extend_from_slice(extra);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_slmc"))
            .args(&args)
            .arg("--json")
            .env("SLMC_COMPILE_CACHE", &cache)
            .env("SLMC_COMPILE_CACHE_MAX_BYTES", max_bytes)
            .env("XDG_RUNTIME_DIR", "/tmp")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (v, started.elapsed().as_secs_f64())
    };
    let run = |out: &str, extra: &[&str]| run_with(out, extra, "8589934592");
    let cold_dir = dir.join("cold");
    let warm_dir = dir.join("warm");
    let (cold, cold_s) = run(cold_dir.to_str().unwrap(), &[]);
    assert_eq!(cold["cached"], serde_json::json!([false, false]));
    let (warm, warm_s) = run(warm_dir.to_str().unwrap(), &[]);
    assert_eq!(warm["cached"], serde_json::json!([true, true]));
    eprintln!("compile SmolLM2 for webgpu,onnx-cpu: cold {cold_s:.2} s, warm (cache) {warm_s:.2} s");
    for t in ["webgpu", "onnx-cpu"] {
        assert!(tree(&cold_dir.join(t)) == tree(&warm_dir.join(t)), "{t}: the cached bundle differs");
    }
    // Other options are another key; --no-cache bypasses the cache.
    let (other, _) = run(dir.join("other").to_str().unwrap(), &["--context", "512"]);
    assert_eq!(other["cached"], serde_json::json!([false, false]));
    let (bypass, _) = run(dir.join("bypass").to_str().unwrap(), &["--no-cache"]);
    assert_eq!(bypass["cached"], serde_json::json!([false, false]));
    // A byte bound smaller than any bundle empties the cache (entries are whole bundles).
    let entries = || {
        std::fs::read_dir(&cache)
            .unwrap()
            .filter(|e| !e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.'))
            .count()
    };
    assert_eq!(entries(), 4);
    run_with(dir.join("tiny-cache").to_str().unwrap(), &["--context", "256", "--skip-smoke-check"], "1");
    assert_eq!(entries(), 0, "every entry is past a 1-byte bound");
}

/// An embedding table of 143 MB (past WebGPU's default 128 MiB binding), per profile:
/// GPU profiles split it by rows (and the split bundle still passes its smoke set), ONNX
/// needs no split, and a binding too small for even one row is refused with advice.
#[test]
fn an_embedding_past_the_binding_limit_is_split_or_refused_per_profile() {
    let dir = scratch("bundle-wide");
    let model = dir.join("wide-vocab");
    slmc_fixtures::generate_wide_vocab(&model, 140_000).unwrap();
    let out = dir.join("out");
    // 140,000 logits per token: at most 239 tokens' logits fit one 128 MiB binding. A step
    // of 256 asked for is refused with that advice; without one the step is lowered to fit.
    let err = slmc_fails(&[
        "compile",
        model.to_str().unwrap(),
        "--target",
        "webgpu",
        "-o",
        dir.join("steps").to_str().unwrap(),
        "--max-step-tokens",
        "256",
    ]);
    assert!(err.contains("buffer `logits`") && err.contains("lower --max-step-tokens"), "{err}");
    compile(&model, "webgpu", &dir.join("default-step"), &["--skip-smoke-check"]);
    let artifact = read_json(&dir.join("default-step/webgpu/artifact.json"));
    assert_eq!(artifact["model"]["max_step_tokens"].as_u64(), Some(224), "239 rounded down to a multiple of 16");
    compile(&model, "webgpu-browser,raspberry-pi-5,onnx-cpu", &out, &["--max-step-tokens", "64"]);
    for gpu in ["webgpu-browser", "raspberry-pi-5"] {
        let artifact = read_json(&out.join(gpu).join("artifact.json"));
        let names: Vec<&str> =
            artifact["buffers"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap()).collect();
        assert!(names.contains(&"model.embed_tokens.weight#1"), "{gpu}: not split: {names:?}");
        let manifest = read_json(&out.join(gpu).join("manifest.json"));
        assert!(manifest["required"]["max_storage_buffer_binding_size"].as_u64().unwrap() <= 128 << 20);
    }
    let err = slmc_fails(&[
        "compile",
        model.to_str().unwrap(),
        "--target",
        "webgpu",
        "-o",
        dir.join("refused").to_str().unwrap(),
        "--max-binding-bytes",
        "512",
    ]);
    assert!(err.contains("a single row is larger than a binding") && err.contains("512"), "{err}");
    assert!(!dir.join("refused/webgpu").exists());
}

/// A configured public key wins over `--allow-unsigned` and `SLMC_ALLOW_UNSIGNED=1`: a
/// signed bundle with its signature deleted is refused by run, eval and install.
#[test]
fn a_configured_key_refuses_a_stripped_signature_whatever_unsigned_allows() {
    let dir = scratch("bundle-stripped-signature");
    let key = dir.join("k");
    slmc_json(&["keygen", "--out", key.to_str().unwrap()]);
    let p = dir.join("k.pub");
    let p = p.to_str().unwrap();
    compile(&tiny(), "onnx-cpu", &dir.join("out"), &["--skip-smoke-check"]);
    let bundle = dir.join("out/onnx-cpu");
    let b = bundle.to_str().unwrap();
    slmc_json(&["sign", b, "--key", key.to_str().unwrap()]);
    std::fs::remove_file(bundle.join("manifest.sig")).unwrap();
    let store = dir.join("store");
    let s = store.to_str().unwrap();
    for args in [
        vec!["run", b, "--prompt-ids", "1", "--pubkey", p],
        vec!["eval", b, "--pubkey", p],
        vec!["install", b, "--store", s, "--pubkey", p],
    ] {
        // The flag, and the ambient variable.
        let mut flagged = args.clone();
        flagged.push("--allow-unsigned");
        let err = slmc_strict_fails(&flagged);
        assert!(err.contains("no signature"), "{args:?}: {err}");
        let err = slmc_fails(&args);
        assert!(err.contains("no signature"), "{args:?}: {err}");
    }
    assert!(!store.join("current").exists(), "nothing was installed");
}

/// Listed files that are symlinks or FIFOs are refused (a FIFO must not hang
/// verification), and a manifest's target name cannot climb out of the store.
#[test]
fn links_fifos_and_climbing_target_names_are_refused() {
    let dir = scratch("bundle-links-fifos");
    compile(&tiny(), "onnx-cpu", &dir.join("out"), &["--skip-smoke-check"]);
    let bundle = dir.join("out/onnx-cpu");
    let b = bundle.to_str().unwrap();
    slmc_json(&["verify", b]);
    let listed = bundle.join("tokenizer_config.json");
    let original = std::fs::read(&listed).unwrap();

    // A symlink to an identical copy outside the bundle: same bytes, still refused.
    let outside = dir.join("copy.json");
    std::fs::write(&outside, &original).unwrap();
    std::fs::remove_file(&listed).unwrap();
    std::os::unix::fs::symlink(&outside, &listed).unwrap();
    let err = slmc_fails(&["verify", b]);
    assert!(err.contains("tokenizer_config.json") && err.contains("not a regular file"), "{err}");

    // A FIFO: refused promptly instead of blocking on the read.
    std::fs::remove_file(&listed).unwrap();
    let made = std::process::Command::new("mkfifo").arg(&listed).status().unwrap();
    assert!(made.success());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_slmc"))
        .args(["verify", b])
        .env("SLMC_ALLOW_UNSIGNED", "1")
        .env_remove("SLMC_PUBKEY")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("verify hung on a FIFO");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success() && err.contains("not a regular file"), "{err}");
    std::fs::remove_file(&listed).unwrap();
    std::fs::write(&listed, &original).unwrap();
    slmc_json(&["verify", b]);

    // An unsigned manifest naming its target `../../escape`: install refuses it and writes
    // nothing outside the store.
    let path = bundle.join("manifest.json");
    let mut manifest = read_json(&path);
    manifest["target"]["name"] = serde_json::json!("../../escape");
    std::fs::write(&path, serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    let store = dir.join("deep/store");
    let err = slmc_fails(&["install", b, "--store", store.to_str().unwrap()]);
    assert!(err.contains("target name"), "{err}");
    for level in [dir.to_path_buf(), dir.join("deep")] {
        let names: Vec<_> = std::fs::read_dir(&level).into_iter().flatten().flatten().map(|e| e.file_name()).collect();
        assert!(!names.iter().any(|n| n.to_string_lossy().contains("escape")), "{}: {names:?}", level.display());
    }
    assert!(!store.join("current").exists());
}

/// `keygen --force` over a world-readable file leaves the secret key readable by its owner
/// only.
#[test]
fn keygen_force_makes_a_replaced_secret_key_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("keygen-force-mode");
    let key = dir.join("k");
    std::fs::write(&key, "old").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    slmc_json(&["keygen", "--out", key.to_str().unwrap(), "--force"]);
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "secret key mode {mode:o}");
}

/// Bare artifacts (no bundle manifest, run with --allow-unsigned): an ONNX artifact must
/// list its files, and a GPU artifact's weights file and kernel names stay inside it.
#[test]
fn bare_artifacts_name_only_their_own_files() {
    let dir = scratch("bare-artifacts");
    compile(&tiny(), "onnx-cpu,webgpu", &dir.join("out"), &["--skip-smoke-check"]);
    let onnx = dir.join("out/onnx-cpu");
    std::fs::remove_file(onnx.join("manifest.json")).unwrap();
    let path = onnx.join("artifact.json");
    let mut artifact = read_json(&path);
    artifact["files"] = serde_json::json!([]);
    std::fs::write(&path, serde_json::to_string_pretty(&artifact).unwrap()).unwrap();
    let err = slmc_fails(&["run", onnx.to_str().unwrap(), "--prompt-ids", "1"]);
    assert!(err.contains("artifact.json") && err.contains("lists no files"), "{err}");

    let gpu = dir.join("out/webgpu");
    std::fs::remove_file(gpu.join("manifest.json")).unwrap();
    let path = gpu.join("artifact.json");
    let original = read_json(&path);
    for (field, value) in [("weights_file", "../onnx-cpu/model.onnx.data"), ("weights_file", "/etc/passwd")] {
        let mut artifact = original.clone();
        artifact[field] = serde_json::json!(value);
        std::fs::write(&path, serde_json::to_string_pretty(&artifact).unwrap()).unwrap();
        let err = slmc_fails(&["run", gpu.to_str().unwrap(), "--prompt-ids", "1"]);
        assert!(err.contains("outside the artifact"), "{value}: {err}");
    }
    // A bare GPU artifact's files carry digests too: a changed kernel is named.
    let kernel = gpu.join("kernels").join(format!("{}.wgsl", original["kernels"][0]["name"].as_str().unwrap()));
    let wgsl = std::fs::read_to_string(&kernel).unwrap();
    std::fs::write(&kernel, wgsl.replace("fn ", "fn  ")).unwrap();
    let err = slmc_fails(&["run", gpu.to_str().unwrap(), "--prompt-ids", "1"]);
    assert!(err.contains(kernel.to_str().unwrap()) && err.contains("manifest says"), "{err}");
    std::fs::write(&kernel, wgsl).unwrap();
    let mut artifact = original.clone();
    artifact["kernels"][0]["name"] = serde_json::json!("../../escape");
    std::fs::write(&path, serde_json::to_string_pretty(&artifact).unwrap()).unwrap();
    let err = slmc_fails(&["run", gpu.to_str().unwrap(), "--prompt-ids", "1"]);
    assert!(err.contains("outside kernels/"), "{err}");
    // Indices and sizes the loader used unchecked: refused before any device work.
    let edits: [(&str, fn(&mut serde_json::Value), &str); 3] = [
        ("argmax kernel", |a| a["argmax_dispatch"]["kernel"] = serde_json::json!(99999), "names kernel"),
        ("next-token buffer", |a| a["next_token_buffer"] = serde_json::json!(99999), "out of range"),
        ("vocabulary", |a| a["model"]["vocab_size"] = serde_json::json!(1u64 << 40), "does not fit the logits buffer"),
    ];
    for (what, edit, expected) in edits {
        let mut artifact = original.clone();
        edit(&mut artifact);
        std::fs::write(&path, serde_json::to_string_pretty(&artifact).unwrap()).unwrap();
        let err = slmc_fails(&["run", gpu.to_str().unwrap(), "--prompt-ids", "1"]);
        assert!(err.contains("artifact.json") && err.contains(expected), "{what}: {err}");
    }
}

/// Fields of artifact.json that size work or memory are checked against something real
/// before they are used: GPU workgroup counts at the largest step, a device error raised
/// outside the loader's error scopes (wgpu's default handler panicked), the ONNX KV
/// buffer's dimensions against the graph and its size against memory.
#[test]
fn artifact_fields_that_size_work_are_checked() {
    let dir = scratch("artifact-sizes");
    compile(&tiny(), "onnx-cpu,webgpu", &dir.join("out"), &["--skip-smoke-check"]);
    let gpu = dir.join("out/webgpu");
    std::fs::remove_file(gpu.join("manifest.json")).unwrap();
    let path = gpu.join("artifact.json");
    let original = read_json(&path);
    let run_with = |path: &Path, artifact: &serde_json::Value, dir: &Path| {
        std::fs::write(path, serde_json::to_string_pretty(artifact).unwrap()).unwrap();
        slmc_fails(&["run", dir.to_str().unwrap(), "--prompt-ids", "1,2,3"])
    };
    let mut artifact = original.clone();
    artifact["dispatches"][0]["workgroups"][0]["per_token"] = serde_json::json!(u64::MAX / 2);
    let err = run_with(&path, &artifact, &gpu);
    assert!(err.contains("artifact.json") && err.contains("workgroups at the largest step"), "{err}");
    // A kernel's output bound to the buffer it reads: a usage conflict wgpu reports only
    // when the step is submitted, outside any error scope.
    let mut artifact = original.clone();
    let dispatch = artifact["dispatches"]
        .as_array()
        .unwrap()
        .iter()
        .position(|d| d["bindings"].as_array().unwrap().len() >= 2)
        .expect("a dispatch with an input and an output");
    let bindings = artifact["dispatches"][dispatch]["bindings"].as_array_mut().unwrap();
    let first = bindings[0].clone();
    *bindings.last_mut().unwrap() = first;
    let err = run_with(&path, &artifact, &gpu);
    assert!(err.contains("the device reported an error"), "{err}");
    std::fs::write(&path, serde_json::to_string_pretty(&original).unwrap()).unwrap();

    let onnx = dir.join("out/onnx-cpu");
    std::fs::remove_file(onnx.join("manifest.json")).unwrap();
    let path = onnx.join("artifact.json");
    let original = read_json(&path);
    let edits: [(fn(&mut serde_json::Value), &str); 3] = [
        (|a| a["kv_heads"] = serde_json::json!(a["kv_heads"].as_u64().unwrap() + 1), "disagree with the graph"),
        (|a| a["layers"] = serde_json::json!(1_000_000), "disagree with the graph"),
        (
            |a| {
                a["kv_buffer_shared"] = serde_json::json!(true);
                a["model"]["context_len"] = serde_json::json!(1u64 << 40);
            },
            "more than this machine's memory",
        ),
    ];
    for (edit, expected) in edits {
        let mut artifact = original.clone();
        edit(&mut artifact);
        let err = run_with(&path, &artifact, &onnx);
        assert!(err.contains("artifact.json") && err.contains(expected), "{expected}: {err}");
    }
}

/// Verification reads every file once, and the executor and the store use exactly those
/// bytes: with the bundle's files replaced after verification (a swap between the check and
/// the use), the executor still runs what was verified and the store receives it.
#[test]
fn executors_and_the_store_use_the_bytes_verification_checked() {
    use slmc_runtime::registry::{open, open_files, OpenOptions};
    let dir = scratch("bundle-verified-bytes");
    compile(&tiny(), "onnx-cpu,webgpu,coreml-ios18", &dir.join("out"), &["--skip-smoke-check"]);
    compile(
        &tiny(),
        "onnx-cpu,webgpu,coreml-ios18",
        &dir.join("other"),
        &["--model-version", "other", "--context", "64", "--skip-smoke-check"],
    );
    let trust = slmc_runtime::bundle::Trust { public_key: None, allow_unsigned: true };
    let opts = OpenOptions { mil_reference: true, ..Default::default() };
    let prompt = [3u32, 1, 4, 1, 5, 9, 2, 6];
    for target in ["onnx-cpu", "webgpu", "coreml-ios18"] {
        let bundle = dir.join("out").join(target);
        let expected = open(&bundle, &opts).unwrap().exec.forward(&prompt).unwrap();
        let verified = slmc_runtime::bundle::verify(&bundle, &trust).unwrap();
        // Swap every file for another bundle's (a different context: other weights layout
        // and shapes), after the check.
        std::fs::remove_dir_all(&bundle).unwrap();
        std::fs::rename(dir.join("other").join(target), &bundle).unwrap();
        let got = open_files(&verified.files, &opts).unwrap().exec.forward(&prompt).unwrap();
        assert_eq!(got, expected, "{target}: the executor read something other than the verified bytes");
        let store = dir.join(format!("store-{target}"));
        let id = slmc_compiler::store::install(&verified, &store, &trust, None).unwrap();
        let installed = slmc_runtime::bundle::verify(&store.join("versions").join(&id), &trust).unwrap();
        assert_eq!(installed.manifest, verified.manifest, "{target}: the store got other bytes");
    }
}
