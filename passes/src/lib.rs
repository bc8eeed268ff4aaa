//! Graph passes and the pass manager.
//!
//! Passes are named and registered in one table ([`PASSES`]); pipelines are data: a
//! name and a list of pass names per target family ([`PIPELINES`]). The manager verifies
//! the graph after every pass and offers the instruments a developer needs to see what a
//! pass did: print after a pass, dump numbered IR files, disable a pass, time passes.
//! Every pass is deterministic.

pub mod awq;
pub mod calibrate;
pub mod cleanup;
pub mod fuse;
pub mod gptq;
pub mod kv;
pub mod linalg;
pub mod memory;
pub mod quant;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use slmc_ir::{Graph, KvQuant, Layered, OwnedWeights, WeightSource};

pub use cleanup::{dead_code_elimination, referenced_weights};
pub use memory::MemoryPlan;
pub use quant::{QuantMethod, QuantPolicy, Scheme};

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("unknown pass `{0}` (known: {known})", known = PASSES.iter().map(|p| p.name).collect::<Vec<_>>().join(", "))]
    UnknownPass(String),
    #[error("unknown pipeline `{0}` (known: {known})", known = PIPELINES.iter().map(|p| p.0).collect::<Vec<_>>().join(", "))]
    UnknownPipeline(String),
    #[error("pass `{pass}` produced an invalid graph: {error}")]
    Invalid { pass: &'static str, error: slmc_ir::VerifyError },
    #[error("pass `{pass}`: {message}")]
    Failed { pass: &'static str, message: String },
    #[error("writing IR dumps: {0}")]
    Io(#[from] std::io::Error),
}

/// Options the passes read.
#[derive(Debug, Clone, Default)]
pub struct PipelineOptions {
    pub quant: QuantPolicy,
    pub kv_quant: KvQuant,
    /// Token sequences run through the interpreter to collect activations for
    /// calibration-based quantization.
    pub calibration: Vec<Vec<u32>>,
    /// Context length the memory plan sizes the decode step for.
    pub context_len: usize,
    /// Prompt length the memory plan sizes the prefill step for.
    pub prefill_len: usize,
    /// Bytes of Gram matrices one GPTQ calibration run may hold (0: the default budget).
    pub gram_budget: usize,
}

/// What passes work with besides the graph: the imported weights, the weights passes
/// derive (fused, requantized), options, and analysis results.
pub struct PassContext<'a> {
    pub base: &'a dyn WeightSource,
    pub derived: OwnedWeights,
    pub options: PipelineOptions,
    pub memory_plan: Option<MemoryPlan>,
}

impl<'a> PassContext<'a> {
    pub fn new(base: &'a dyn WeightSource, options: PipelineOptions) -> Self {
        PassContext { base, derived: OwnedWeights::default(), options, memory_plan: None }
    }

    /// Derived weights layered over the imported ones.
    pub fn weights(&self) -> Layered<'_> {
        Layered { top: &self.derived, base: self.base }
    }
}

/// A pass: rewrites the graph in place and returns how many rewrites it made.
pub type PassFn = fn(&mut Graph, &mut PassContext) -> Result<usize, String>;

pub struct PassInfo {
    pub name: &'static str,
    pub description: &'static str,
    /// Whether the pass changes numerics (quantization); the others must leave the
    /// interpreter's outputs equal up to float rounding.
    pub lossy: bool,
    pub run: PassFn,
}

pub const PASSES: &[PassInfo] = &[
    PassInfo { name: "dce", description: "remove values no output depends on", lossy: false, run: cleanup::dce },
    PassInfo { name: "cse", description: "merge identical pure computations", lossy: false, run: cleanup::cse },
    PassInfo {
        name: "fold-reshape",
        description: "fold reshape chains and no-op reshapes",
        lossy: false,
        run: cleanup::fold_reshape,
    },
    PassInfo {
        name: "dedup-weights",
        description: "one node per distinct weight content (shared blocks, tied tables)",
        lossy: false,
        run: cleanup::dedup_weights,
    },
    PassInfo {
        name: "fuse-qkv",
        description: "q/k/v projections of one input into one matmul (biases included)",
        lossy: false,
        run: fuse::fuse_qkv,
    },
    PassInfo {
        name: "fuse-gate-up",
        description: "gate/up projections into one matmul",
        lossy: false,
        run: fuse::fuse_gate_up,
    },
    PassInfo {
        name: "fuse-swiglu",
        description: "silu(gate) * up as the epilogue of the gate/up matmul",
        lossy: false,
        run: fuse::fuse_swiglu,
    },
    PassInfo {
        name: "fuse-add-rmsnorm",
        description: "residual add feeding an RMSNorm into one op",
        lossy: false,
        run: fuse::fuse_add_rmsnorm,
    },
    PassInfo {
        name: "fuse-rope-attention",
        description: "rope + kv_append + attention into one gqa op",
        lossy: false,
        run: fuse::fuse_rope_attention,
    },
    PassInfo {
        name: "quantize-weights",
        description: "pack weights per the quantization policy",
        lossy: true,
        run: quant::quantize_weights,
    },
    PassInfo {
        name: "kv-quant",
        description: "quantize the KV cache (int8/int4, per token and head)",
        lossy: true,
        run: kv::kv_quant,
    },
    PassInfo {
        name: "plan-memory",
        description: "liveness-based static activation arena (analysis)",
        lossy: false,
        run: memory::plan_memory,
    },
];

/// Every fusion, then quantization and planning: the interpreter's default, and what GPU
/// targets need (their kernels implement the fused ops, `gqa` included).
const FUSED: &[&str] = &[
    "fold-reshape",
    "cse",
    "dedup-weights",
    "dce",
    "fuse-qkv",
    "fuse-gate-up",
    "fuse-swiglu",
    "fuse-add-rmsnorm",
    "fuse-rope-attention",
    "quantize-weights",
    "kv-quant",
    "dce",
    "plan-memory",
];

/// Named pipelines per target family. Dequantize + matmul needs no pass: `linear`
/// consumes packed weights directly.
pub const PIPELINES: &[(&str, &[&str])] = &[
    ("default", FUSED),
    ("gpu", FUSED),
    // Standard ONNX ops only: attention stays explicit.
    (
        "portable",
        &[
            "fold-reshape",
            "cse",
            "dedup-weights",
            "dce",
            "fuse-qkv",
            "fuse-gate-up",
            "quantize-weights",
            "kv-quant",
            "dce",
            "plan-memory",
        ],
    ),
    // No fusion: clean-ups and quantization only (the interpreter's view of the source graph).
    ("minimal", &["fold-reshape", "cse", "dedup-weights", "dce", "quantize-weights", "kv-quant", "dce", "plan-memory"]),
];

pub fn lookup_pass(name: &str) -> Result<&'static PassInfo, PassError> {
    PASSES.iter().find(|p| p.name == name).ok_or_else(|| PassError::UnknownPass(name.to_string()))
}

pub fn lookup_pipeline(name: &str) -> Result<&'static [&'static str], PassError> {
    PIPELINES.iter().find(|p| p.0 == name).map(|p| p.1).ok_or_else(|| PassError::UnknownPipeline(name.to_string()))
}

/// Developer instruments around a pipeline run.
#[derive(Default)]
pub struct Instruments<'w> {
    /// Pass names (or "all") after which the IR is printed to `print_sink`.
    pub print_after: Vec<String>,
    pub print_sink: Option<&'w mut dyn Write>,
    /// Writes `000_input.slir`, then `NNN_<pass>.slir` after each pass.
    pub dump_dir: Option<PathBuf>,
    pub disabled: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct PassTiming {
    pub pass: &'static str,
    pub wall: Duration,
    pub changes: usize,
    pub nodes_after: usize,
}

/// Runs `passes` in order, verifying after each.
pub fn run_passes(
    graph: &mut Graph,
    passes: &[&str],
    cx: &mut PassContext,
    instruments: &mut Instruments,
) -> Result<Vec<PassTiming>, PassError> {
    for name in passes.iter().copied().chain(instruments.disabled.iter().map(|s| s.as_str())) {
        lookup_pass(name)?;
    }
    if let Some(dir) = &instruments.dump_dir {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("000_input.slir"), slmc_ir::text::print(graph))?;
    }
    let mut timings = Vec::new();
    for (i, name) in passes.iter().enumerate() {
        if instruments.disabled.iter().any(|d| d == name) {
            continue;
        }
        let pass = lookup_pass(name)?;
        let start = Instant::now();
        let changes = (pass.run)(graph, cx).map_err(|message| PassError::Failed { pass: pass.name, message })?;
        let wall = start.elapsed();
        slmc_ir::verify(graph).map_err(|error| PassError::Invalid { pass: pass.name, error })?;
        timings.push(PassTiming { pass: pass.name, wall, changes, nodes_after: graph.len() });
        if instruments.print_after.iter().any(|p| p == "all" || p == name) {
            if let Some(sink) = instruments.print_sink.as_deref_mut() {
                writeln!(sink, "; IR after {name}")?;
                sink.write_all(slmc_ir::text::print(graph).as_bytes())?;
            }
        }
        if let Some(dir) = &instruments.dump_dir {
            std::fs::write(dir.join(format!("{:03}_{name}.slir", i + 1)), slmc_ir::text::print(graph))?;
        }
    }
    Ok(timings)
}

/// The `--time-passes` table.
pub fn format_timings(timings: &[PassTiming]) -> String {
    let total: Duration = timings.iter().map(|t| t.wall).sum();
    let mut out = format!("{:<22} {:>10} {:>7} {:>8} {:>7}\n", "pass", "wall ms", "share", "changes", "nodes");
    for t in timings {
        let share = if total.is_zero() { 0.0 } else { 100.0 * t.wall.as_secs_f64() / total.as_secs_f64() };
        out.push_str(&format!(
            "{:<22} {:>10.3} {:>6.1}% {:>8} {:>7}\n",
            t.pass,
            t.wall.as_secs_f64() * 1e3,
            share,
            t.changes,
            t.nodes_after
        ));
    }
    out.push_str(&format!("{:<22} {:>10.3}\n", "total", total.as_secs_f64() * 1e3));
    out
}
