//! `slmc bench`: a sustained run of the SmolLM2 ONNX bundle (the per-second series, the
//! percentiles, and temperature and power reported as exposed or not, whichever this
//! machine's sysfs says), sensors read from a sysfs tree the test writes, alternating
//! comparisons and their ratios, and usage errors.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("a number, got {v}"))
}

/// Latency percentiles are present, positive and ordered; throughputs positive.
fn check_figures(run: &Value) {
    let l = &run["latency_ms"];
    let (p50, p95, p99) = (f(&l["p50"]), f(&l["p95"]), f(&l["p99"]));
    assert!(0.0 < p50 && p50 <= p95 && p95 <= p99, "{l}");
    assert!(l["steps"].as_u64().unwrap() > 0);
    for key in ["ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "load_s"] {
        assert!(f(&run[key]) > 0.0, "{key}: {}", run[key]);
    }
    // Decode throughput is the mean step latency inverted.
    let mean = f(&l["mean"]);
    assert!((f(&run["decode_tokens_per_s"]) * mean / 1e3 - 1.0).abs() < 1e-6, "{run}");
    assert!(run["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
}

/// Whether this machine's sysfs exposes any file of `pattern` (dir, file name predicate).
fn exposed(dir: &str, file: impl Fn(&str) -> bool) -> bool {
    let entries = |p: &Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(p).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default()
    };
    entries(Path::new(dir)).iter().flat_map(|d| entries(d)).any(|p| {
        file(&p.file_name().unwrap().to_string_lossy())
            && std::fs::read_to_string(&p).is_ok_and(|s| s.trim().parse::<i64>().is_ok())
    })
}

#[test]
fn a_sustained_run_records_every_second_and_says_what_is_not_exposed() {
    let bundle = smollm2_bundle("bench-sustained", "onnx-cpu");
    let b = slmc_json(&["bench", bundle.to_str().unwrap(), "--duration", "20s", "--gen-tokens", "16"]);
    assert_eq!(b["executor"], "onnxruntime");
    assert_eq!(b["duration_s"], 20);
    check_figures(&b);
    let series = b["series"].as_array().unwrap();
    assert_eq!(series.len(), 20, "one entry per second");
    let mut total = 0;
    for (i, s) in series.iter().enumerate() {
        assert_eq!(s["t_s"], i);
        let tokens = s["tokens"].as_u64().unwrap();
        assert!(tokens > 0, "second {i} produced no token: {s}");
        assert_eq!(f(&s["tokens_per_s"]), tokens as f64);
        total += tokens;
    }
    // Tokens of the partial last second are not in the series; nothing else is missing.
    let generated = b["generated_tokens"].as_u64().unwrap();
    let requests = b["requests"].as_u64().unwrap();
    assert_eq!(generated, requests * 16);
    assert!(total <= generated && total + 16 >= generated * 19 / 20, "series {total} of {generated}");
    // Temperature and power: exposed exactly when this machine's sysfs has them.
    let temperature = exposed("/sys/class/thermal", |n| n == "temp")
        || exposed("/sys/class/hwmon", |n| n.starts_with("temp") && n.ends_with("_input"));
    let power = exposed("/sys/class/powercap", |n| n == "energy_uj")
        || exposed("/sys/class/power_supply", |n| n == "power_now");
    for (key, field, is_exposed) in [("temperature", "temperature_c", temperature), ("power", "power_w", power)] {
        let v = &b[key];
        assert_eq!(v["exposed"], is_exposed, "{key}: {v}");
        assert!(!v["searched"].as_array().unwrap().is_empty());
        if !is_exposed {
            assert!(v["sources"].as_array().unwrap().is_empty() && v["note"].as_str().unwrap().contains("not exposed"));
            assert!(series.iter().all(|s| s[field].is_null()), "{key} invented: {series:?}");
        }
    }
    if !power {
        assert!(b["tokens_per_joule"].is_null());
    }
}

/// A sysfs tree with a thermal zone, a RAPL package counter (and a sub-zone that must not
/// be counted twice) and a battery.
fn fake_sysfs(root: &Path) {
    let w = |p: &str, v: &str| {
        let p = root.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, v).unwrap();
    };
    w("class/thermal/thermal_zone0/temp", "47250\n");
    w("class/powercap/intel-rapl:0/energy_uj", "123000000\n");
    w("class/powercap/intel-rapl:0/max_energy_range_uj", "262143328850\n");
    w("class/powercap/intel-rapl:0:0/energy_uj", "1\n");
}

#[test]
fn sensors_are_read_where_sysfs_exposes_them_and_the_report_renders() {
    let dir = scratch("bench-sysfs");
    fake_sysfs(&dir);
    let model = repo_root().join("fixtures/tiny-llama-sharded");
    let report = dir.join("report.html");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_slmc"))
        .args(["bench", model.to_str().unwrap(), "--duration", "3s", "--gen-tokens", "4", "--json"])
        .arg("--report")
        .arg(&report)
        .env("SLMC_SYSFS", dir.as_os_str())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(b["executor"], "interpreter");
    assert_eq!(b["prompt"], "synthetic ids (no tokenizer)");
    let t = &b["temperature"];
    assert_eq!(t["exposed"], true);
    assert_eq!(t["sources"].as_array().unwrap().len(), 1);
    assert_eq!(f(&t["max_c"]), 47.25);
    assert!(b["series"].as_array().unwrap().iter().all(|s| f(&s["temperature_c"]) == 47.25));
    let p = &b["power"];
    assert_eq!(p["exposed"], true);
    assert_eq!(p["sources"].as_array().unwrap().len(), 1, "the sub-zone is not counted: {p}");
    // The counter stood still: zero energy, so no tokens per joule rather than infinity.
    assert_eq!(f(&p["energy_j"]), 0.0);
    assert!(b["tokens_per_joule"].is_null());
    check_report(&report, &dir, 3);
}

/// The bench report is self-contained and holds the charts, and renders in Chromium.
fn check_report(report: &Path, dir: &Path, seconds: usize) {
    let html = self_contained_html(report);
    assert!(
        html.contains("Tokens per second")
            && html.contains("Decode step latency")
            && html.contains("Peak resident memory")
    );
    assert!(html.contains("Hottest temperature"), "the exposed temperature is plotted");
    assert_eq!(html.matches("<polyline").count(), 2, "tokens/s and temperature over time");
    let line = html.split("<polyline").nth(1).unwrap();
    let points = line.split("points=\"").nth(1).unwrap().split('"').next().unwrap();
    assert_eq!(points.split(' ').count(), seconds, "one point per second: {points}");
    render_in_chromium(report, dir);
}

/// A report's text, checked to need nothing from outside: no script, no fetched resource.
fn self_contained_html(report: &Path) -> String {
    let html = std::fs::read_to_string(report).expect("the report is written");
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
    assert!(!html.contains("<script"), "no script");
    let external = html.replace("http://www.w3.org/2000/svg", "");
    assert!(
        !external.contains("http:") && !external.contains("https:") && !external.contains("src="),
        "nothing fetched"
    );
    html
}

/// Headless Chromium (scripts/setup installs it) takes a screenshot of the page: a real
/// page of text and charts, not a blank one.
fn render_in_chromium(report: &Path, dir: &Path) {
    let png = report.with_extension("png");
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| std::process::Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
        .expect("chromium is installed by scripts/setup");
    let shot = std::process::Command::new(chromium)
        .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
        .args(["--disable-component-update", "--disable-sync", "--hide-scrollbars", "--window-size=1000,1500"])
        .arg(format!("--user-data-dir={}", dir.join("chromium-profile").display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", report.display()))
        .output()
        .unwrap();
    assert!(shot.status.success(), "{}", String::from_utf8_lossy(&shot.stderr));
    let bytes = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert_eq!(&bytes[1..4], b"PNG");
    // A blank page of this size compresses to a few KB; text and charts do not.
    assert!(bytes.len() > 30_000, "a near-empty screenshot: {} bytes", bytes.len());
}

#[test]
fn the_compile_report_shows_passes_targets_and_quality() {
    let dir = scratch("compile-report");
    let model = repo_root().join("fixtures/tiny-llama-sharded");
    // A cache of this test's own: the first compile runs the pipeline, the second is cached.
    let compile = |out: &str, report: &Path| -> serde_json::Value {
        let args = ["compile", model.to_str().unwrap(), "--target", "webgpu,onnx-cpu", "--skip-smoke-check"];
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_slmc"))
            .args(args)
            .args(["--context", "64", "--json", "-o", out, "--report"])
            .arg(report)
            .env("SLMC_COMPILE_CACHE", dir.join("cache"))
            .env("XDG_RUNTIME_DIR", "/tmp")
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let report = dir.join("compile.html");
    let v = compile(dir.join("out").to_str().unwrap(), &report);
    assert_eq!(v["cached"], serde_json::json!([false, false]));
    let html = self_contained_html(&report);
    let needles =
        ["fuse-qkv", "plan-memory", "Wall time per pass", "Bundle size per target", "top-1 agreement", "Cost model"];
    for needle in needles.iter().chain(&["webgpu", "onnx-cpu"]) {
        assert!(html.contains(needle), "{needle} missing from the compile report");
    }
    render_in_chromium(&report, &dir);
    // From the cache: the same targets and quality, and it says no pass ran.
    let cached_report = dir.join("cached.html");
    let v = compile(dir.join("out2").to_str().unwrap(), &cached_report);
    assert_eq!(v["cached"], serde_json::json!([true, true]));
    let cached = self_contained_html(&cached_report);
    assert!(cached.contains("from the compile cache") && cached.contains("onnx-cpu") && !cached.contains("fuse-qkv"));
}

#[test]
fn several_models_run_alternately_with_ratios_to_the_first() {
    let a = repo_root().join("fixtures/tiny-llama-sharded");
    let b = repo_root().join("fixtures/tiny-phi3");
    let r = slmc_json(&[
        "bench",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--compare",
        "--prompt-tokens",
        "24",
        "--gen-tokens",
        "8",
        "--repetitions",
        "4",
    ]);
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(r["model"], runs[0]["model"], "the first model's figures are at the top level");
    for run in runs {
        check_figures(run);
        assert_eq!(run["requests"], 4);
        assert_eq!(run["generated_tokens"], 32);
        assert_eq!(f(&run["prompt_tokens"]), 24.0);
    }
    let ratio = &r["ratios"][0];
    assert_eq!(ratio["baseline"], runs[0]["model"]);
    let expected = f(&runs[1]["decode_tokens_per_s"]) / f(&runs[0]["decode_tokens_per_s"]);
    assert!((f(&ratio["decode_tokens_per_s"]) - expected).abs() < 1e-9 * expected);
}

#[test]
fn bench_usage_errors_are_clear() {
    let model = repo_root().join("fixtures/tiny-llama-sharded");
    let m = model.to_str().unwrap();
    assert!(slmc_fails(&["bench", m, "--compare"]).contains("--compare needs at least two"));
    // Flags clap refuses exit with its usage status, 2.
    let usage = |args: &[&str]| {
        let out = slmc(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(usage(&["bench", m, "--duration", "10x"]).contains("unknown unit"));
    assert!(usage(&["bench", m, "--duration", "0s"]).contains("from 1 second to 24 hours"));
    assert!(slmc_fails(&["bench", m, "--gen-tokens", "0"]).contains("at least 1"));
    let missing = slmc_fails(&["bench", "/nonexistent/model"]);
    assert!(missing.contains("/nonexistent/model"), "{missing}");
    // Past the checkpoint's context: named, not a panic.
    let err = slmc_fails(&["bench", m, "--prompt-tokens", "100000", "--repetitions", "1"]);
    assert!(err.contains(m), "{err}");
}

/// The manifest's cost model counts the graph: 2 FLOPs per weight element of every matrix
/// product, per attended position 4 x query heads x head size, keys and values of every KV
/// head per position; the prediction is the profile's bandwidth over the bytes (none for a
/// profile without a bandwidth); bench predicts from this machine's measured bandwidth and
/// compute: a token's bytes over the one plus its FLOPs over the other.
#[test]
fn the_cost_model_counts_the_graph_and_bench_sets_it_against_a_measurement() {
    let dir = scratch("cost-model");
    let model = repo_root().join("fixtures/tiny-llama-sharded");
    let config = read_json(&model.join("config.json"));
    let c = |k: &str| config[k].as_u64().unwrap();
    let (h, i, v, layers, heads, kv, d) = (
        c("hidden_size"),
        c("intermediate_size"),
        c("vocab_size"),
        c("num_hidden_layers"),
        c("num_attention_heads"),
        c("num_key_value_heads"),
        c("head_dim"),
    );
    let per_layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * i;
    let matmul = 2 * (layers * per_layer + v * h);
    let o = dir.to_str().unwrap();
    let m = model.to_str().unwrap();
    slmc_json(&["compile", m, "--target", "onnx-cpu,raspberry-pi-5", "-o", o, "--skip-smoke-check", "--context", "64"]);
    for target in ["onnx-cpu", "raspberry-pi-5"] {
        let manifest = read_json(&dir.join(target).join("manifest.json"));
        let cost = &manifest["cost"];
        assert_eq!(cost["matmul_flops_per_token"], matmul, "{target}: {cost}");
        let group = &cost["attention"][0];
        assert_eq!(group["layers"], layers);
        assert_eq!(group["flops_per_position"], 4 * heads * d);
        assert_eq!(group["kv_bytes_per_position"], 2 * kv * d * 4, "an f32 cache");
        assert_eq!(cost["weight_bytes_per_token"], manifest["memory"]["weight_bytes"]);
        let weights = cost["weight_bytes_per_token"].as_u64().unwrap();
        assert_eq!(cost["bytes_per_token_first"], weights + layers * 2 * kv * d * 4);
        assert_eq!(cost["bytes_per_token_last"], weights + 64 * layers * 2 * kv * d * 4);
        assert_eq!(cost["flops_per_token_last"], matmul + 64 * layers * 4 * heads * d);
        match cost["memory_bandwidth_gbps"].as_f64() {
            Some(gbps) => {
                assert_eq!(target, "raspberry-pi-5");
                let first = cost["bytes_per_token_first"].as_f64().unwrap();
                assert!((f(&cost["predicted_decode_tokens_per_s_first"]) - gbps * 1e9 / first).abs() < 1e-6);
            }
            None => {
                assert_eq!(target, "onnx-cpu", "the generic profile states no bandwidth");
                assert!(cost["predicted_decode_tokens_per_s_first"].is_null());
            }
        }
    }
    let b = slmc_json(&["bench", dir.join("onnx-cpu").to_str().unwrap(), "--prompt-tokens", "8", "--gen-tokens", "5"]);
    let model = &b["cost_model"];
    // Decode steps feed positions 8..11: mean 9.
    assert_eq!(model["mean_decode_position"], 9);
    let bytes = model["bytes_per_token"].as_f64().unwrap();
    let flops = model["flops_per_token"].as_f64().unwrap();
    assert_eq!(model["flops_per_token"], matmul + 10 * layers * 4 * heads * d, "positions 0..=9 attended");
    let (gbps, gflops) = (f(&model["host_memory_bandwidth_gbps"]), f(&model["host_compute_gflops"]));
    assert!(gbps > 0.0 && gflops > 0.0);
    let predicted = 1.0 / (bytes / (gbps * 1e9) + flops / (gflops * 1e9));
    assert!((f(&model["predicted_decode_tokens_per_s"]) - predicted).abs() < 1e-6 * predicted);
    assert!((f(&model["predicted_bandwidth_bound_tokens_per_s"]) - gbps * 1e9 / bytes).abs() < 1e-6 * predicted);
    let ratio = f(&b["decode_tokens_per_s"]) / predicted;
    assert!((f(&model["measured_over_predicted"]) - ratio).abs() < 1e-9 * ratio.max(1.0));
}

/// Issue 18's memory bound: SmolLM2 compiled for all seven artifact kinds (smoke check
/// skipped, as the bound is stated) peaks at 1.5x the GGUF's bytes plus 200 MB. The
/// interpreter reads the stored weights, and emitters write weight files straight to disk.
#[test]
fn compiling_smollm2_for_every_artifact_kind_stays_within_one_and_a_half_checkpoints() {
    let out = scratch("compile-memory");
    let gguf = smollm2_gguf();
    let targets = "webgpu,vulkan,metal,onnx-cpu,onnx-portable,coreml-ios17,coreml-ios18";
    let (g, o) = (gguf.to_str().unwrap(), out.to_str().unwrap());
    let v = slmc_json(&["compile", g, "--target", targets, "-o", o, "--skip-smoke-check", "--no-cache"]);
    assert_eq!(v["outputs"].as_array().map(Vec::len), Some(7), "{v}");
    let peak = v["peak_rss_bytes"].as_u64().expect("the peak is measured on Linux");
    let bound = std::fs::metadata(&gguf).unwrap().len() * 3 / 2 + 200_000_000;
    eprintln!("compile for seven kinds: peak RSS {peak} bytes (bound {bound}), wall {} s", v["wall_s"]);
    assert!(peak <= bound, "peak RSS {peak} bytes exceeds 1.5x the checkpoint + 200 MB = {bound}");
}
