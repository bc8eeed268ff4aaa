//! Crash safety of everything a user sees change: `compile --force` into an existing
//! output and `install` into a store are SIGKILLed at random points, a few hundred times,
//! and after every kill the visible output verifies and the store is exactly its state
//! before the command or after it, never a mix. Two installs at once serialize on the
//! store's lock. Each command is also stopped once at every named
//! step of its commit sequence (`SLMC_CRASH_AT`). The loop is bounded (400 runs or about 20 s, at most 90 s).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use slmc_compiler::store::{read_state, StoreState, KEPT_PREVIOUS};
use slmc_runtime::bundle::{verify, Trust};

/// The steps `slmc` can be stopped at (`output::crash_point`).
const CRASH_POINTS: &[&str] =
    &["output-written", "dir-exchanged", "store-version-written", "store-state-written", "store-switched"];

fn tiny() -> PathBuf {
    repo_root().join("fixtures/tiny-llama-sharded")
}

/// The tiny model's onnx-cpu bundle compiled into `dir/name` as model version `version`.
fn compile_version(dir: &Path, name: &str, version: &str) -> PathBuf {
    let out = dir.join(name);
    let model = tiny();
    slmc_json(&[
        "compile",
        model.to_str().unwrap(),
        "--target",
        "onnx-cpu",
        "-o",
        out.to_str().unwrap(),
        "--model-version",
        version,
    ]);
    out.join("onnx-cpu")
}

fn unsigned() -> Trust {
    Trust { public_key: None, allow_unsigned: true }
}

fn spawn(args: &[&str]) -> Child {
    spawn_crashing_at(args, "")
}

/// `slmc` stopped at a named point of its commit sequences (`SLMC_CRASH_AT`).
fn spawn_crashing_at(args: &[&str], point: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_slmc"))
        .args(args)
        .env("SLMC_CRASH_AT", point)
        .env("SLMC_ALLOW_UNSIGNED", "1")
        .env("SLMC_COMPILE_CACHE", Path::new(env!("CARGO_TARGET_TMPDIR")).join("crash-compile-cache"))
        .env("XDG_RUNTIME_DIR", std::env::var_os("XDG_RUNTIME_DIR").unwrap_or_else(|| "/tmp".into()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("slmc starts")
}

/// A small deterministic generator (xorshift), seeded and printed so a failure replays.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The state an install of `id` leads to from `before`.
fn after_install(before: &StoreState, id: &str) -> StoreState {
    if before.current.as_deref() == Some(id) {
        return before.clone();
    }
    let mut previous: Vec<String> =
        before.current.iter().chain(&before.previous).filter(|p| *p != id).cloned().collect();
    previous.truncate(KEPT_PREVIOUS);
    StoreState { current: Some(id.to_string()), previous }
}

/// Leftovers of killed commands: dot-entries other than the lock.
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with('.') && n != ".lock")
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn killed_compiles_and_installs_leave_old_or_new_never_a_mix() {
    let dir = scratch("crash-safety");
    // Three bundles of one model (model versions differ, so their manifests do).
    let mut bundles = Vec::new();
    let mut ids = Vec::new();
    for v in 0..3 {
        let b = compile_version(&dir, &format!("b{v}"), &v.to_string());
        let verified = verify(&b, &unsigned()).unwrap();
        ids.push(slmc_compiler::store::bundle_id(&verified).unwrap());
        bundles.push(b);
    }
    let store = dir.join("store");
    let out = dir.join("out");
    let compile_args = |v: u64, cache: bool| -> Vec<String> {
        let mut a: Vec<String> =
            ["compile", tiny().to_str().unwrap(), "--target", "onnx-cpu", "-o"].iter().map(|s| s.to_string()).collect();
        a.extend([out.to_str().unwrap().to_string(), "--force".into(), "--model-version".into(), v.to_string()]);
        if !cache {
            a.push("--no-cache".into());
        }
        a
    };
    let install_args = |b: &Path| -> Vec<String> {
        ["install", b.to_str().unwrap(), "--store", store.to_str().unwrap()].iter().map(|s| s.to_string()).collect()
    };
    // How long each command takes uninterrupted: kills land anywhere in that span.
    let timed = |args: &[String]| {
        let started = Instant::now();
        let status = spawn(&args.iter().map(String::as_str).collect::<Vec<_>>()).wait().unwrap();
        assert!(status.success(), "{args:?}");
        started.elapsed()
    };
    let compile_time = timed(&compile_args(0, false));
    let install_time = timed(&install_args(&bundles[0]));
    eprintln!("uninterrupted: compile {compile_time:?}, install {install_time:?}");

    // After any command, stopped or not: the output is a whole bundle (present since the
    // first compile) and the store is its state before the command or after it, with the
    // current version whole.
    let check = |what: &str, before: &StoreState, installed: Option<usize>| {
        let v = verify(&out.join("onnx-cpu"), &unsigned()).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(v.manifest.files.len() > 3);
        let now = read_state(&store).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        let expected = installed.map(|i| after_install(before, &ids[i])).unwrap_or_else(|| before.clone());
        assert!(now == *before || now == expected, "{what}: {now:?}, before {before:?}");
        verify(&store.join("current"), &unsigned()).unwrap_or_else(|e| panic!("{what}: {e}"));
        for p in &now.previous {
            assert!(store.join("versions").join(p).is_dir(), "{what}: previous version {p} is gone");
        }
    };
    // Every named step of every commit sequence, each command stopped there once.
    for point in CRASH_POINTS {
        for (i, args) in
            [install_args(&bundles[1]), compile_args(1, false), install_args(&bundles[2]), compile_args(2, true)]
                .iter()
                .enumerate()
        {
            let before = read_state(&store).unwrap();
            spawn_crashing_at(&args.iter().map(String::as_str).collect::<Vec<_>>(), point).wait().unwrap();
            let installed = [Some(1), None, Some(2), None][i];
            check(&format!("{args:?} stopped at {point}"), &before, installed);
        }
    }

    let seed = std::env::var("SLMC_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_c0de_u64);
    eprintln!("seed {seed} (SLMC_CRASH_SEED replays)");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let (mut kills, mut runs) = (0usize, 0usize);
    // Bounded: 400 runs, or 20 s once 100 kills have landed (a loaded machine runs fewer
    // per second), and never past 90 s.
    let enough = |kills: usize| started.elapsed() > Duration::from_secs(20) && kills >= 100;
    // Each command's span adapts to the machine's load: shorter after a run that ended
    // before its kill, longer after one that was killed, so kills keep landing inside it.
    let mut spans = [install_time.as_micros() as u64, compile_time.as_micros() as u64];
    while runs < 400 && !enough(kills) && started.elapsed() < Duration::from_secs(90) {
        runs += 1;
        let is_install = rng.below(3) != 0;
        let which = rng.below(3) as usize;
        let before = read_state(&store).unwrap();
        let kind = if is_install { 0 } else { 1 };
        let args =
            if is_install { install_args(&bundles[which]) } else { compile_args(which as u64, rng.below(2) == 0) };
        // Half the kills anywhere, half in the last stretch where outputs are committed.
        let span = spans[kind];
        let delay = Duration::from_micros(match rng.below(2) {
            0 => rng.below(span * 5 / 4 + 1),
            _ => span * 6 / 10 + rng.below(span / 2 + 1),
        });
        let mut child = spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
            spans[kind] += spans[kind] / 50;
        } else {
            spans[kind] -= spans[kind] / 10;
        }
        child.wait().unwrap();
        check(&format!("run {runs} {args:?} killed after {delay:?}"), &before, is_install.then_some(which));
    }
    eprintln!("{runs} runs, {kills} killed, in {:?}", started.elapsed());
    assert!(kills >= 100, "too few kills to mean anything: {runs} runs, {kills} kills");

    // Uninterrupted commands finish the job and remove every leftover.
    assert!(spawn(&install_args(&bundles[2]).iter().map(String::as_str).collect::<Vec<_>>()).wait().unwrap().success());
    assert!(spawn(&compile_args(1, false).iter().map(String::as_str).collect::<Vec<_>>()).wait().unwrap().success());
    for d in [store.clone(), store.join("versions"), store.join("states")] {
        assert_eq!(temporaries(&d), Vec::<String>::new(), "{}", d.display());
    }
    assert_eq!(temporaries(&out), Vec::<String>::new(), "{}", out.display());
    let state = read_state(&store).unwrap();
    assert_eq!(state.current.as_deref(), Some(ids[2].as_str()));
    let versions = std::fs::read_dir(store.join("versions")).unwrap().count();
    assert_eq!(versions, 1 + state.previous.len(), "only the kept versions remain");
}

#[test]
fn installs_at_once_serialize_on_the_store_lock() {
    let dir = scratch("crash-two-installs");
    let mut bundles = Vec::new();
    for v in 0..2 {
        bundles.push(compile_version(&dir, &format!("b{v}"), &format!("p{v}")));
    }
    let store = dir.join("store");
    for round in 0..20 {
        // Each bundle twice: the same version written by two processes at once, too.
        let children: Vec<Child> = [&bundles[0], &bundles[1], &bundles[0], &bundles[1]]
            .iter()
            .map(|b| spawn(&["install", b.to_str().unwrap(), "--store", store.to_str().unwrap()]))
            .collect();
        for mut c in children {
            assert!(c.wait().unwrap().success(), "round {round}: an install failed");
        }
        let state = read_state(&store).unwrap();
        // One after the other: the two bundles are current and previous, in some order.
        assert_eq!(state.previous.len(), 1, "round {round}: {state:?}");
        assert_ne!(state.current.as_ref(), state.previous.first(), "round {round}: {state:?}");
        verify(&store.join("current"), &unsigned()).unwrap();
        verify(&store.join("versions").join(&state.previous[0]), &unsigned()).unwrap();
    }
}

/// A version already in the store is reused only if it still verifies: a damaged copy is
/// replaced by the bundle being installed, not made current as it is.
#[test]
fn a_damaged_version_in_the_store_is_replaced_not_reused() {
    let dir = scratch("crash-damaged-version");
    let a = compile_version(&dir, "a", "a");
    let b = compile_version(&dir, "b", "b");
    let store = dir.join("store");
    let install = |bundle: &Path| {
        let mut child = spawn(&["install", bundle.to_str().unwrap(), "--store", store.to_str().unwrap()]);
        assert!(child.wait().unwrap().success(), "installing {}", bundle.display());
    };
    install(&a);
    install(&b);
    let id_a = read_state(&store).unwrap().previous[0].clone();
    let version_a = store.join("versions").join(&id_a);
    let weights = version_a.join("model.onnx.data");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    assert!(verify(&version_a, &unsigned()).is_err());
    install(&a);
    assert_eq!(read_state(&store).unwrap().current.as_deref(), Some(id_a.as_str()));
    verify(&store.join("current"), &unsigned()).unwrap();
}
