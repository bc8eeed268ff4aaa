//! `slmc serve`: the official `openai` Python package against a SmolLM2 bundle (chat,
//! streaming, completions, stop sequences, logprobs, seeded sampling, errors, a bounded
//! load test), greedy output equal to `slmc run`'s; and refusals before the port opens.
//! `slmc serve --web`: the browser runtime in headless Chromium (WebGPU on SwiftShader)
//! against the native wgpu executor, and a file altered after start-up refused on the page.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `slmc serve` on a free port; returns it with its base URL once it listens.
fn start(args: &[&str]) -> (Server, String) {
    start_with(args, true)
}

fn start_with(args: &[&str], allow_unsigned: bool) -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_slmc"))
        .arg("serve")
        .args(args)
        .args(["--port", "0"])
        .env("SLMC_ALLOW_UNSIGNED", if allow_unsigned { "1" } else { "0" })
        .env("XDG_RUNTIME_DIR", std::env::var_os("XDG_RUNTIME_DIR").unwrap_or_else(|| "/tmp".into()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("slmc serve starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap_or_else(|| panic!("{line}"));
    (Server(child), url.to_string())
}

#[test]
fn the_openai_client_talks_to_serve() {
    let bundle = smollm2_bundle("serve", "onnx-cpu");
    let b = bundle.to_str().unwrap();
    let run = slmc_json(&["run", b, "--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "24"]);
    let text = run["text"].as_str().unwrap();
    let expected = text.split("<|im_end|>").next().unwrap();
    assert!(expected.split_whitespace().count() >= 4, "{text}");
    let (_server, url) = start(&[b, "--api-key", "test-key"]);
    let (_small, small_url) = start(&[b, "--api-key", "test-key", "--queue-depth", "1"]);
    let out = python(include_str!("serve/openai_client.py"), &[&url, "test-key", expected, &small_url]);
    let report: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    eprintln!("load tests: {report}");
    assert_eq!(report["default_queue"]["completed"], 100);
    assert!(report["queue_of_one"]["queue_full"].as_u64().unwrap() > 0);
}

#[test]
fn serve_refuses_what_it_cannot_run_before_listening() {
    let dir = scratch("serve-refusals");
    let err = slmc_fails(&["serve", dir.to_str().unwrap(), "--port", "0"]);
    assert!(err.contains("compiled bundle"), "{err}");
    let err = slmc_fails(&["serve", smollm2_gguf().to_str().unwrap(), "--port", "0"]);
    assert!(err.contains("compiled bundle"), "{err}");
    // The page runs GPU bundles only.
    let tiny = repo_root().join("fixtures/tiny-llama-sharded");
    let out = dir.join("onnx");
    let o = out.to_str().unwrap();
    slmc_json(&["compile", tiny.to_str().unwrap(), "--target", "onnx-cpu", "-o", o, "--skip-smoke-check"]);
    let err =
        slmc_fails(&["serve", out.join("onnx-cpu").to_str().unwrap(), "--web", "--port", "0", "--allow-unsigned"]);
    assert!(err.contains("--target webgpu"), "{err}");
}

/// Percent-encodes a query value.
fn query_value(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

/// Opens each URL in headless Chromium (runtime/web/drive.mjs) and returns the page results.
fn browse(urls: &[String], screenshot: Option<&std::path::Path>) -> Vec<serde_json::Value> {
    let web = repo_root().join("runtime/web");
    assert!(
        web.join("node_modules/playwright-core").is_dir() && web.join("dist/slmc-web.js").is_file(),
        "the browser runtime is not built: run scripts/setup (it runs scripts/build-web)"
    );
    let mut cmd = Command::new("node");
    cmd.arg(web.join("drive.mjs")).args(["--timeout", "300"]);
    if let Some(shot) = screenshot {
        cmd.arg("--screenshot").arg(shot);
    }
    let out = cmd.args(urls).output().expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "drive.mjs failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let results: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(results.len(), urls.len(), "{stdout}");
    results
}

fn native_greedy(bundle: &str, public: &str, ids: &[u64], new_tokens: usize) -> Vec<u64> {
    let n = new_tokens.to_string();
    let run = slmc_json(&["run", bundle, "--prompt-ids", &ids_arg(ids), "--max-new-tokens", &n, "--pubkey", public]);
    as_ids(&run["generated_ids"])
}

#[test]
fn the_browser_page_runs_webgpu_bundles_as_the_native_executor_does() {
    let dir = scratch("serve-web");
    let key = dir.join("web.key");
    slmc_json(&["keygen", "--out", key.to_str().unwrap()]);
    let public = dir.join("web.key.pub");
    let p = public.to_str().unwrap();
    let sign = |b: &str| slmc_json(&["sign", b, "--key", key.to_str().unwrap()]);
    // A project fixture in steps of 8 tokens: a prompt across a step boundary, and one that
    // fills the 128-position cache exactly.
    let fixture = dir.join("fixture");
    let tiny = repo_root().join("fixtures/tiny-llama-sharded");
    let (t, f) = (tiny.to_str().unwrap(), fixture.to_str().unwrap());
    slmc_json(&["compile", t, "--target", "webgpu", "-o", f, "--max-step-tokens", "8", "--skip-smoke-check"]);
    let fixture = fixture.join("webgpu");
    let fb = fixture.to_str().unwrap();
    let smol = smollm2_bundle("serve-web-smollm2", "webgpu");
    let sb = smol.to_str().unwrap();
    sign(sb);
    // The same fixture for the vulkan profile: subgroup kernels, which SwiftShader offers;
    // and with f16 weights, which it does not.
    let vulkan = dir.join("vulkan");
    let v = vulkan.to_str().unwrap();
    slmc_json(&["compile", t, "--target", "vulkan", "-o", v, "--max-step-tokens", "8", "--skip-smoke-check"]);
    let vulkan = vulkan.join("vulkan");
    let vb = vulkan.to_str().unwrap();
    let f16 = dir.join("f16");
    let h = f16.to_str().unwrap();
    slmc_json(&["compile", t, "--target", "vulkan", "--quant", "f16", "-o", h, "--skip-smoke-check"]);
    let f16 = f16.join("vulkan");
    let f16b = f16.to_str().unwrap();
    for b in [fb, vb, f16b] {
        sign(b);
    }
    let (_fixture_server, fixture_url) = start_with(&[fb, "--web", "--pubkey", p], false);
    let (_vulkan_server, vulkan_url) = start_with(&[vb, "--web", "--pubkey", p], false);
    let (_smol_server, smol_url) = start_with(&[sb, "--web", "--pubkey", p], false);

    let mut urls = Vec::new();
    let mut expected = Vec::new();
    for ids in [(1..=13).collect::<Vec<u64>>(), (0..121).map(|i| 3 + i % 90).collect()] {
        urls.push(format!("{fixture_url}/?ids={}&max_tokens=8&run=1", query_value(&ids_arg(&ids))));
        expected.push((ids.clone(), native_greedy(fb, p, &ids, 8)));
    }
    let ids: Vec<u64> = (1..=13).collect();
    urls.push(format!("{vulkan_url}/?ids={}&max_tokens=8&run=1", query_value(&ids_arg(&ids))));
    expected.push((ids.clone(), native_greedy(vb, p, &ids, 8)));
    // SmolLM2 on two golden prompts: a plain one as text, and a chat one given as its user
    // message for the page's own chat template. The page's tokenizer must give the golden ids.
    let goldens = read_json(&golden_dir().join("smollm2-135m-greedy.json"));
    let prompt = |id: &str| goldens["prompts"].as_array().unwrap().iter().find(|p| p["id"] == id).unwrap().clone();
    let text = prompt("pub-text-short");
    let chat = prompt("pub-chat-short");
    let chat_text = chat["prompt_text"].as_str().unwrap();
    let user = chat_text.split("<|im_start|>user\n").nth(1).unwrap().split("<|im_end|>").next().unwrap();
    urls.push(format!("{smol_url}/?prompt={}&max_tokens=8&run=1", query_value(text["prompt_text"].as_str().unwrap())));
    urls.push(format!("{smol_url}/?prompt={}&chat=1&max_tokens=8&run=1", query_value(user)));
    for golden in [&text, &chat] {
        let ids = as_ids(&golden["input_ids"]);
        expected.push((ids.clone(), native_greedy(sb, p, &ids, 8)));
    }
    let shot = dir.join("page.png");
    let results = browse(&urls, Some(&shot));
    for ((result, (ids, native)), url) in results.iter().zip(&expected).zip(&urls) {
        eprintln!("page: {result}");
        assert_eq!(result["ok"], true, "{url}: {result}");
        assert_eq!(result["signature_checked"], true, "{url}");
        assert_eq!(&as_ids(&result["prompt_ids"]), ids, "{url}: the page's prompt ids");
        assert_eq!(&as_ids(&result["generated_ids"]), native, "{url}: page and native greedy tokens differ");
        assert!(!native.is_empty());
    }
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "a screenshot of the page");

    // A kernel altered after the server started reaches the page altered: refused, named.
    let kernel = read_json(&fixture.join("manifest.json"))["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap().to_string())
        .find(|f| f.ends_with(".wgsl"))
        .unwrap();
    let path = fixture.join(&kernel);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(&path, bytes).unwrap();
    // And a manifest altered after start-up (a digest changed to match an altered file)
    // fails its signature on the page.
    let manifest = smol.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let at = text.find("\"sha256\": \"").unwrap() + 11;
    let flipped = if &text[at..at + 1] == "0" { "1" } else { "0" };
    std::fs::write(&manifest, format!("{}{flipped}{}", &text[..at], &text[at + 1..])).unwrap();
    // Kernels needing a feature this adapter lacks (f16 storage here) are refused by name.
    let (_f16_server, f16_url) = start_with(&[f16b, "--web", "--pubkey", p], false);
    let refused =
        browse(&[urls[0].clone(), format!("{smol_url}/?max_tokens=1&run=1"), format!("{f16_url}/?ids=1&run=1")], None);
    let error = refused[0]["error"].as_str().unwrap_or_default();
    assert!(refused[0]["ok"] == false && error.contains(&kernel) && error.contains("sha256"), "{}", refused[0]);
    let error = refused[1]["error"].as_str().unwrap_or_default();
    assert!(error.contains("manifest.json") && error.contains("signature does not match"), "{}", refused[1]);
    let error = refused[2]["error"].as_str().unwrap_or_default();
    assert!(error.contains("`shader-f16`") && error.contains("does not offer"), "{}", refused[2]);
}
