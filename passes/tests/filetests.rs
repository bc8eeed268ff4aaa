//! Filetests: each `passes/filetests/*.slir` holds a header naming the passes to run
//! (`; test: fuse-qkv` or several, comma-separated; optional `; options:` and
//! `; alias:` lines), the input graph, and after `; expect:` the exact output as comment
//! lines. `SLMC_BLESS=1 cargo test -p slmc-passes --test filetests` rewrites the
//! expectations. Non-lossy passes must also leave the interpreter's outputs unchanged
//! (1e-5 relative) on deterministic synthetic weights, over a prefill and two decode steps.

use std::path::{Path, PathBuf};

use slmc_ir::{DType, Graph, Interpreter, KvQuant, Layered, Op, OwnedWeight, OwnedWeights, Tensor};
use slmc_passes::{Instruments, PassContext, PipelineOptions, QuantMethod, QuantPolicy, Scheme};

/// Deterministic N(0, 1) from a seed and an index (splitmix64 + Box-Muller).
fn normal(seed: u64, i: u64) -> f32 {
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let a = mix(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let b = mix(a.wrapping_add(0x9E37_79B9_7F4A_7C15));
    let u1 = ((a >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let u2 = ((b >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01B3))
}

/// f32 weights for every weight node: norms near 1, biases small, matrices 1/sqrt(fan-in).
/// `aliases` give a name the content of another.
fn synthetic_weights(graph: &Graph, aliases: &[(String, String)]) -> OwnedWeights {
    let mut out = OwnedWeights::default();
    for (_, node) in graph.nodes() {
        let Op::Weight { name } = &node.op else { continue };
        let content = aliases.iter().find(|(a, _)| a == name).map(|(_, b)| b.as_str()).unwrap_or(name);
        let shape: Vec<usize> = node.ty.shape.iter().map(|d| d.as_const().unwrap() as usize).collect();
        let n: usize = shape.iter().product();
        let seed = name_seed(content);
        let values: Vec<f32> = (0..n as u64)
            .map(|i| match shape.len() {
                1 if content.contains("norm") => 1.0 + 0.1 * normal(seed, i),
                1 => 0.1 * normal(seed, i),
                _ => normal(seed, i) / (shape[1] as f32).sqrt(),
            })
            .collect();
        assert_eq!(node.ty.dtype, DType::F32, "filetests use f32 weights ({name})");
        let bytes = slmc_ir::dtype::encode_float(DType::F32, &values).unwrap();
        out.insert(name.clone(), OwnedWeight { dtype: DType::F32, shape, bytes });
    }
    out
}

/// Prefill of five tokens, then two single-token steps; all outputs concatenated.
fn execute(graph: &Graph, weights: &dyn slmc_ir::WeightSource) -> Vec<f32> {
    let mut interp = Interpreter::new(graph, weights).expect("graph runs");
    let mut all = Vec::new();
    for step in [vec![3, 1, 4, 1, 5], vec![9], vec![2]] {
        let tokens = Tensor::i32(vec![step.len()], step);
        for (_, t) in interp.run(&[("tokens", tokens)]).expect("step runs") {
            all.extend_from_slice(t.as_f32().expect("f32 outputs"));
        }
    }
    all
}

struct FileTest {
    passes: Vec<String>,
    options: PipelineOptions,
    aliases: Vec<(String, String)>,
    input: String,
    expected: String,
}

fn parse_file(text: &str) -> FileTest {
    let (input, expected) = text.split_once("; expect:\n").unwrap_or((text, ""));
    let mut passes = Vec::new();
    let mut options = PipelineOptions { context_len: 64, prefill_len: 8, ..Default::default() };
    let mut aliases = Vec::new();
    for line in input.lines() {
        if let Some(list) = line.strip_prefix("; test:") {
            passes = list.split(',').map(|p| p.trim().to_string()).collect();
        } else if let Some(opts) = line.strip_prefix("; options:") {
            for opt in opts.split_whitespace() {
                let (k, v) = opt.split_once('=').expect("options are key=value");
                match k {
                    "quant" => options.quant.scheme = Some(Scheme::parse(v).unwrap()),
                    "override" => options.quant.overrides = QuantPolicy::parse_overrides(v).unwrap(),
                    "method" => options.quant.method = QuantMethod::parse(v).unwrap(),
                    "kv" => options.kv_quant = KvQuant::from_name(v).unwrap(),
                    "gram_budget" => options.gram_budget = v.parse().unwrap(),
                    // Token sequences: `1.5.9/3.4` is two sequences.
                    "calibration" => {
                        options.calibration =
                            v.split('/').map(|seq| seq.split('.').map(|t| t.parse().unwrap()).collect()).collect()
                    }
                    other => panic!("unknown filetest option {other}"),
                }
            }
        } else if let Some(alias) = line.strip_prefix("; alias:") {
            let (a, b) = alias.split_once('=').expect("alias: A = B");
            aliases.push((a.trim().to_string(), b.trim().to_string()));
        }
    }
    let mut expected: String = expected
        .lines()
        .map(|l| l.strip_prefix("; ").unwrap_or(l.trim_start_matches(';')))
        .collect::<Vec<_>>()
        .join("\n");
    if !expected.is_empty() {
        expected.push('\n');
    }
    FileTest { passes, options, aliases, input: input.to_string(), expected }
}

fn run_file(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).unwrap();
    let test = parse_file(&text);
    if test.passes.is_empty() {
        return Err("no `; test:` line".into());
    }
    let before = slmc_ir::text::parse(&test.input).map_err(|e| format!("input: {e}"))?;
    slmc_ir::verify(&before).map_err(|e| format!("input: {e}"))?;
    let weights = synthetic_weights(&before, &test.aliases);
    let mut after = before.clone();
    let mut cx = PassContext::new(&weights, test.options.clone());
    let passes: Vec<&str> = test.passes.iter().map(|s| s.as_str()).collect();
    slmc_passes::run_passes(&mut after, &passes, &mut cx, &mut Instruments::default()).map_err(|e| e.to_string())?;
    let mut actual = slmc_ir::text::print(&after);
    if let Some(plan) = &cx.memory_plan {
        actual.push_str(&format!(
            "memory: weights {} B, kv {} B/token + {} B scales (f32 {} B)\n",
            plan.weight_bytes, plan.kv_bytes_per_token, plan.kv_scale_bytes_per_token, plan.kv_bytes_per_token_f32,
        ));
        for (label, a) in [("prefill", &plan.prefill), ("decode", &plan.decode)] {
            actual.push_str(&format!(
                "memory: {label} s={} p={}: arena {} B, one buffer per value {} B, live peak {} B, {} buffers\n",
                a.tokens, a.past, a.arena_bytes, a.one_buffer_per_value_bytes, a.live_peak_bytes, a.buffers
            ));
        }
    }
    if std::env::var("SLMC_BLESS").is_ok_and(|v| v == "1") {
        let body = actual.lines().map(|l| format!("; {l}")).collect::<Vec<_>>().join("\n");
        let input = text.split_once("; expect:\n").map(|(i, _)| i).unwrap_or(&text);
        std::fs::write(path, format!("{input}; expect:\n{body}\n")).unwrap();
    } else if actual != test.expected {
        return Err(format!("output differs from the expectation (SLMC_BLESS=1 to update):\n{actual}"));
    }
    let lossy = passes.iter().any(|p| slmc_passes::lookup_pass(p).unwrap().lossy);
    let layered = Layered { top: &cx.derived, base: &weights };
    let (a, b) = (execute(&before, &weights), execute(&after, &layered));
    if a.len() != b.len() {
        return Err("the outputs changed shape".into());
    }
    let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = a.iter().zip(&b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
    if lossy {
        // Quantization changes numerics; it must still compute nearly the same function.
        if diff.is_nan() || diff >= 0.5 {
            return Err(format!("lossy pass drifted too far: {diff}"));
        }
    } else if diff.is_nan() || diff > 1e-5 {
        return Err(format!("interpreter outputs differ by {diff} (relative) after {passes:?}"));
    }
    Ok(())
}

#[test]
fn filetests() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("filetests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "slir"))
        .collect();
    files.sort();
    let mut failures = Vec::new();
    for f in &files {
        if let Err(e) = run_file(f) {
            failures.push(format!("{}: {e}", f.display()));
        }
    }
    // Every registered pass has at least one filetest.
    for pass in slmc_passes::PASSES {
        let covered = files.iter().any(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .any(|l| l.strip_prefix("; test:").is_some_and(|list| list.split(',').any(|p| p.trim() == pass.name)))
        });
        if !covered {
            failures.push(format!("pass `{}` has no filetest", pass.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_wrong_expectation_fails() {
    let dir = std::env::temp_dir().join(format!("slmc-filetest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("wrong.slir");
    std::fs::write(
        &file,
        "; test: dce\ngraph \"g\" {\n  %tokens = input \"tokens\" : i32[s]\n  %emb = weight \"embed\" : f32[10, 4]\n  %x = embed(%emb, %tokens) : f32[s, 4]\n  output \"logits\" = %x\n}\n; expect:\n; graph \"h\" {\n",
    )
    .unwrap();
    if !std::env::var("SLMC_BLESS").is_ok_and(|v| v == "1") {
        assert!(run_file(&file).is_err());
    }
}

/// AWQ's scaling is exact before rounding: folded into the norms' gains and the up rows of
/// a fused SwiGLU projection, it leaves the interpreter's outputs as they were.
#[test]
fn awq_scaling_alone_keeps_the_function() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("filetests/quantize-weights-awq.slir");
    let test = parse_file(&std::fs::read_to_string(path).unwrap());
    let mut graph = slmc_ir::text::parse(&test.input).unwrap();
    let weights = synthetic_weights(&graph, &test.aliases);
    let mut cx = PassContext::new(&weights, test.options.clone());
    let fuse = ["fuse-gate-up", "fuse-swiglu"];
    slmc_passes::run_passes(&mut graph, &fuse, &mut cx, &mut Instruments::default()).unwrap();
    let reference = execute(&graph, &cx.weights());
    let linears: Vec<slmc_ir::NodeId> =
        graph.nodes().filter(|(_, n)| matches!(n.op, Op::Linear | Op::LinearSwiglu)).map(|(id, _)| id).collect();
    let mut stats = slmc_passes::calibrate::collect(&graph, &cx, &linears, false).unwrap();
    let targets = linears.iter().map(|u| (*u, Scheme::Q4 { group: 32, sym: true })).collect();
    let rescaled = slmc_passes::awq::rescale(&mut graph, &mut cx, &targets, &mut stats).unwrap();
    let folds = graph.nodes().filter(|(_, n)| matches!(&n.op, Op::Weight { name } if name.ends_with("@awq-out")));
    let swiglu_fold = graph
        .nodes()
        .any(|(_, n)| matches!(&n.op, Op::Weight { name } if name.contains("gate_proj") && name.ends_with("@awq-out")));
    assert!(rescaled >= 5 && folds.count() == rescaled && swiglu_fold, "{rescaled} activations rescaled");
    slmc_ir::verify(&graph).unwrap();
    let scaled = execute(&graph, &cx.weights());
    let scale = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = reference.iter().zip(&scaled).fold(0.0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
    assert!(reference.len() == scaled.len() && diff < 1e-4, "outputs moved by {diff} (relative)");
}
