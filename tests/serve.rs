//! `slmc serve`: the official `openai` Python package against a SmolLM2 bundle (chat,
//! streaming, completions, stop sequences, logprobs, seeded sampling, errors, a bounded
//! load test), greedy output equal to `slmc run`'s; and refusals before the port opens.

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
    let mut child = Command::new(env!("CARGO_BIN_EXE_slmc"))
        .arg("serve")
        .args(args)
        .args(["--port", "0"])
        .env("SLMC_ALLOW_UNSIGNED", "1")
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
}
