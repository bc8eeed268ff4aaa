//! The optimizer driver: builds pipeline options from the CLI's flags, gathers
//! calibration sequences, and runs a named pipeline over a lowered model.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use slmc_ir::{Graph, KvQuant, OwnedWeights};
use slmc_passes::{
    Instruments, MemoryPlan, PassContext, PassTiming, PipelineOptions, QuantMethod, QuantPolicy, Scheme,
};

use crate::import::Model;

/// Built-in calibration text (English prose, chat, code, numbers), used when no
/// `--calibration` file is given. It is not the evaluation set of `slmc quality`.
const CALIBRATION_TEXT: &str = include_str!("calibration.txt");

/// What the user asked the optimizer for.
#[derive(Debug, Clone, Default)]
pub struct OptRequest {
    pub pipeline: Option<String>,
    /// An explicit pass list; overrides `pipeline`.
    pub passes: Vec<String>,
    pub quant: Option<String>,
    pub quant_override: Option<String>,
    pub quant_method: Option<String>,
    pub kv_quant: Option<String>,
    pub calibration: Option<PathBuf>,
    pub print_after: Vec<String>,
    pub dump_ir: Option<PathBuf>,
    pub disable_pass: Vec<String>,
}

impl OptRequest {
    /// Whether any optimization was asked for (otherwise commands run the lowered graph).
    pub fn is_active(&self) -> bool {
        self.pipeline.is_some()
            || !self.passes.is_empty()
            || self.quant.is_some()
            || self.quant_override.is_some()
            || self.kv_quant.is_some()
            || !self.print_after.is_empty()
            || self.dump_ir.is_some()
            || !self.disable_pass.is_empty()
    }
}

pub struct Optimized {
    pub graph: Graph,
    /// Nodes of the lowered graph the passes started from (the compile report's "before").
    pub lowered_nodes: usize,
    pub derived: OwnedWeights,
    pub passes: Vec<&'static str>,
    pub timings: Vec<PassTiming>,
    pub memory_plan: Option<MemoryPlan>,
    pub policy: QuantPolicy,
    pub kv_quant: KvQuant,
}

/// Token sequences for calibration: a file (golden JSON with `prompts[].input_ids` and
/// `generated_ids`, or text with one sample per line) or the built-in text.
pub fn calibration_sequences(model: &Model, file: Option<&Path>) -> Result<Vec<Vec<u32>>> {
    let text = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
            if let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) {
                return golden_sequences(&json).with_context(|| format!("{}: not a prompts file", path.display()));
            }
            text
        }
        None => CALIBRATION_TEXT.to_string(),
    };
    let tok = model.tokenizer.as_ref().map_err(|e| anyhow!("calibration text needs a tokenizer: {e}"))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let l = l.replace("\\n", "\n");
            Ok(tok
                .encode(l.as_str(), false)
                .map_err(|e| anyhow!("tokenizing calibration text: {e}"))?
                .get_ids()
                .to_vec())
        })
        .collect()
}

/// `prompts[].input_ids` followed by `generated_ids`, as in the golden files.
pub fn golden_sequences(json: &serde_json::Value) -> Result<Vec<Vec<u32>>> {
    let prompts = json.get("prompts").and_then(|p| p.as_array()).ok_or_else(|| anyhow!("no `prompts` array"))?;
    prompts
        .iter()
        .map(|p| {
            let ids = |key: &str| -> Result<Vec<u32>> {
                p.get(key)
                    .and_then(|v| v.as_array())
                    .ok_or_else(|| anyhow!("a prompt has no `{key}`"))?
                    .iter()
                    .map(|v| v.as_u64().map(|x| x as u32).ok_or_else(|| anyhow!("`{key}` holds a non-id")))
                    .collect()
            };
            let mut seq = ids("input_ids")?;
            seq.extend(ids("generated_ids").unwrap_or_default());
            Ok(seq)
        })
        .collect()
}

pub fn optimize(
    model: &Model,
    graph: Graph,
    req: &OptRequest,
    sink: Option<&mut dyn std::io::Write>,
) -> Result<Optimized> {
    let lowered_nodes = graph.len();
    let passes: Vec<&'static str> = if req.passes.is_empty() {
        slmc_passes::lookup_pipeline(req.pipeline.as_deref().unwrap_or("default"))?.to_vec()
    } else {
        req.passes.iter().map(|p| slmc_passes::lookup_pass(p).map(|info| info.name)).collect::<Result<_, _>>()?
    };
    let method = QuantMethod::parse(req.quant_method.as_deref().unwrap_or("rtn")).map_err(|e| anyhow!(e))?;
    let policy = QuantPolicy {
        scheme: req.quant.as_deref().map(Scheme::parse).transpose().map_err(|e| anyhow!(e))?,
        overrides: req
            .quant_override
            .as_deref()
            .map(QuantPolicy::parse_overrides)
            .transpose()
            .map_err(|e| anyhow!(e))?
            .unwrap_or_default(),
        method,
    };
    let kv_quant = match req.kv_quant.as_deref() {
        None => KvQuant::F32,
        Some(name) => {
            KvQuant::from_name(name).ok_or_else(|| anyhow!("unknown --kv-quant `{name}` (f32, f16, int8, int4)"))?
        }
    };
    if method == QuantMethod::Clip && policy.is_noop() {
        bail!("--quant-method clip needs --quant or --quant-override");
    }
    let calibration = if method == QuantMethod::Clip {
        calibration_sequences(model, req.calibration.as_deref())?
    } else {
        Vec::new()
    };
    let options = PipelineOptions {
        quant: policy.clone(),
        kv_quant,
        calibration,
        context_len: model.config.max_position_embeddings.min(4096),
        prefill_len: 128,
    };
    let mut cx = PassContext::new(&model.weights, options);
    let mut graph = graph;
    let mut instruments = Instruments {
        print_after: req.print_after.clone(),
        print_sink: sink,
        dump_dir: req.dump_ir.clone(),
        disabled: req.disable_pass.clone(),
    };
    let timings = slmc_passes::run_passes(&mut graph, &passes, &mut cx, &mut instruments)?;
    Ok(Optimized {
        graph,
        lowered_nodes,
        derived: cx.derived,
        passes,
        timings,
        memory_plan: cx.memory_plan,
        policy,
        kv_quant,
    })
}
