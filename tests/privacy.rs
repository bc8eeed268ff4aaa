//! Inference never touches the network: `run` on the interpreter, a webgpu bundle (wgpu on
//! lavapipe) and an onnx-cpu bundle (ONNX Runtime), and `eval` and `bench` on each bundle, behave
//! exactly the same inside a network namespace with no interfaces (`unshare -n`), and under
//! `strace -f -e trace=network` the interpreter and ONNX Runtime make no socket call at all.
//! The GPU path opens only local (AF_UNIX) sockets, none of them slmc's: Mesa's Vulkan
//! device-select layer probes for a Wayland display, and Mesa's shader cache looks the user
//! up through the name service (nscd); any other address family fails the test. Both tools
//! come from scripts/setup (util-linux, strace); the namespace needs root (the suite runs as
//! root; the test says so and fails otherwise).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn slmc_bin() -> &'static str {
    env!("CARGO_BIN_EXE_slmc")
}

/// Runs slmc through `wrapper` (e.g. `unshare -n`), returning stdout; panics on failure.
fn wrapped(wrapper: &[&str], args: &[&str]) -> String {
    let (program, rest) = wrapper.split_first().expect("a wrapper command");
    let out = Command::new(program)
        .args(rest)
        .arg(slmc_bin())
        .args(args)
        .env("SLMC_ALLOW_UNSIGNED", "1")
        .env("XDG_RUNTIME_DIR", std::env::var("XDG_RUNTIME_DIR").unwrap_or_else(|_| "/tmp".into()))
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (scripts/setup installs it)"));
    assert!(out.status.success(), "{wrapper:?} slmc {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The commands whose output must not depend on the network, and must not use it.
fn inference_commands(dir: &Path) -> Vec<Vec<String>> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-llama-sharded");
    let out = dir.join("bundles");
    let (f, o) = (fixture.to_str().unwrap().to_string(), out.to_str().unwrap().to_string());
    slmc_json(&["compile", &f, "--target", "webgpu,onnx-cpu", "-o", &o, "--context", "64"]);
    let run = |model: String| -> Vec<String> {
        ["run", &model, "--prompt-ids", "5,17,3,88,41", "--max-new-tokens", "6", "--ignore-eos", "--json"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let mut cmds = vec![run(f)];
    for target in ["webgpu", "onnx-cpu"] {
        let bundle = out.join(target).to_str().unwrap().to_string();
        cmds.push(run(bundle.clone()));
        cmds.push(vec!["eval".into(), bundle.clone(), "--json".into()]);
        let bench = ["bench", &bundle, "--prompt-tokens", "8", "--gen-tokens", "4", "--repetitions", "2", "--json"];
        cmds.push(bench.iter().map(|s| s.to_string()).collect());
    }
    cmds
}

/// Timing fields differ between any two runs; everything else must be equal.
fn without_timings(json: &str) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(json).expect("JSON output");
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                // Memory figures and bench's bandwidth measurement vary between runs too.
                let measured = ["_per_s", "_ms", "_s", "_bytes", "_gbps", "_gflops", "_over_predicted"];
                map.retain(|k, _| !measured.iter().any(|m| k.ends_with(m)));
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

#[test]
fn inference_works_without_a_network_and_makes_no_network_calls() {
    assert_eq!(unsafe { libc_geteuid() }, 0, "the network-namespace check needs root (unshare -n)");
    let dir = scratch("privacy");
    let trace = dir.join("network.trace");
    for cmd in inference_commands(&dir) {
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let plain = wrapped(&["env"], &args);
        let isolated = wrapped(&["unshare", "-n"], &args);
        assert_eq!(without_timings(&plain), without_timings(&isolated), "slmc {args:?} differs without a network");
        let t = trace.to_str().unwrap();
        wrapped(&["strace", "-f", "-qq", "-e", "trace=network", "-e", "signal=none", "-o", t], &args);
        let calls: Vec<String> = std::fs::read_to_string(&trace)
            .unwrap()
            .lines()
            .filter(|l| !l.contains("+++ exited") && !l.trim().is_empty() && !is_detach_notice(l))
            .map(str::to_string)
            .collect();
        let gpu = args.iter().any(|a| a.ends_with("webgpu"));
        // A local socket names AF_UNIX in its socket() or connect() line; anything else
        // (AF_INET, AF_INET6, AF_NETLINK, a sendto without one) is the network.
        let not_local: Vec<&String> = calls.iter().filter(|l| !gpu || !l.contains("AF_UNIX")).collect();
        assert!(not_local.is_empty(), "slmc {args:?} made network system calls:\n{}", calls.join("\n"));
        eprintln!(
            "slmc {}: same output without a network; {} socket calls, all local (AF_UNIX) driver probes",
            args[..2].join(" "),
            calls.len()
        );
    }
}

/// strace's own notice for a thread it lost track of while that thread was inside some
/// system call (`PID ???( <detached ...>`, seen when a thread exits under `-f`): no call
/// is named, so it is not evidence of network use. Anything with a name still counts.
fn is_detach_notice(line: &str) -> bool {
    let rest = line.trim_start_matches(|c: char| c.is_ascii_digit()).trim();
    rest == "???( <detached ...>"
}

#[test]
fn a_detach_notice_is_the_only_nameless_line_ignored() {
    assert!(is_detach_notice("23390 ???( <detached ...>"));
    assert!(!is_detach_notice("23390 socket(AF_INET, SOCK_STREAM, 0) = 3"));
    assert!(!is_detach_notice("23390 ???(AF_INET <detached ...>"));
    assert!(!is_detach_notice("23390 <... connect resumed>) = 0"));
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
