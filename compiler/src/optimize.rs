//! The optimizer driver: builds pipeline options from the CLI's flags, gathers
//! calibration sequences, and runs a named pipeline over a lowered model.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use slmc_ir::{Graph, KvQuant, OwnedWeights};
use slmc_passes::{
    Instruments, MemoryPlan, PassContext, PassTiming, PipelineOptions, QuantMethod, QuantPolicy, Scheme,
};

use crate::import::Model;

/// Built-in calibration samples (JSON Lines: conversations on everyday, technical,
/// customer-support, coding and arithmetic topics, and a few plain passages), used when no
/// `--calibration` file is given; conversations are rendered with the model's chat
/// template, as the prompts it will serve are. It is not the evaluation set of `slmc quality`.
const CALIBRATION_SAMPLES: &str = include_str!("calibration.jsonl");

/// Built-in held-out text (English prose, chat, code, numbers; one sample per line) that
/// the compile report's quality figures are measured on: no quantizer calibrates on it.
const HELD_OUT_TEXT: &str = include_str!("quality.txt");

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
/// `generated_ids`; JSON Lines of `messages`, `prompt` or `text` samples, so an eval set
/// serves; or text with one sample per line) or the built-in samples.
pub fn calibration_sequences(model: &Model, file: Option<&Path>) -> Result<Vec<Vec<u32>>> {
    let (name, text) = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
            // A whole-file JSON object is a prompts file, unless it is one JSON Lines sample.
            if let Some(json) = serde_json::from_str::<serde_json::Value>(&text).ok().filter(|j| !is_json_sample(j)) {
                return golden_sequences(&json).with_context(|| format!("{}: not a prompts file", path.display()));
            }
            (path.display().to_string(), text)
        }
        None => ("the built-in calibration samples".to_string(), CALIBRATION_SAMPLES.to_string()),
    };
    sample_sequences(model, &name, &text)
}

/// Whether a JSON value is one JSON Lines sample (`messages`, `prompt` or `text`) rather than
/// a prompts file: a one-line samples file parses as a whole too.
pub fn is_json_sample(json: &serde_json::Value) -> bool {
    ["messages", "prompt", "text"].iter().any(|k| json.get(k).is_some())
}

/// The held-out text's lines, tokenized as they are (`\\n` in a line is a newline).
pub fn held_out_sequences(model: &Model) -> Result<Vec<Vec<u32>>> {
    sample_sequences(model, "the built-in held-out text", HELD_OUT_TEXT)
}

/// Samples one a line, `name` in errors: JSON Lines (see [`calibration_sample`]) when the
/// first line is an object, else text tokenized as it is (`\\n` in a line is a newline).
fn sample_sequences(model: &Model, name: &str, text: &str) -> Result<Vec<Vec<u32>>> {
    let tokenizer = model.tokenizer.as_ref().map_err(|e| anyhow!("{name} needs a tokenizer: {e}"))?;
    let renderer = crate::evalset::Renderer {
        tokenizer,
        chat_template: model.chat_template.as_deref(),
        bos_token: model.bos_token.as_deref(),
        eos_token: model.eos_token.as_deref(),
    };
    let lines: Vec<(usize, &str)> =
        text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).map(|(i, l)| (i + 1, l)).collect();
    let json_lines = lines.first().is_some_and(|(_, l)| l.trim_start().starts_with('{'));
    let sequences: Vec<Vec<u32>> = lines
        .iter()
        .map(|(number, line)| {
            let ids = if json_lines {
                calibration_sample(&renderer, line)
            } else {
                renderer.plain_ids(&line.replace("\\n", "\n"))
            };
            ids.map_err(|e| anyhow!("{name}:{number}: {e}"))
        })
        .collect::<Result<_>>()?;
    if sequences.is_empty() {
        bail!("{name}: no samples");
    }
    Ok(sequences)
}

/// One JSON Lines sample: `messages` (rendered with the chat template), `prompt` (one
/// user message) or `text` (tokenized as it is); other fields (an eval item's) are ignored.
fn calibration_sample(renderer: &crate::evalset::Renderer, line: &str) -> Result<Vec<u32>, String> {
    #[derive(serde::Deserialize)]
    struct Sample {
        messages: Option<Vec<crate::import::tokenizer::Message>>,
        prompt: Option<String>,
        text: Option<String>,
    }
    let sample: Sample = serde_json::from_str(line).map_err(|e| format!("not a calibration sample: {e}"))?;
    match (sample.messages, sample.prompt, sample.text) {
        (Some(m), None, None) if !m.is_empty() => renderer.ids(&m),
        (None, Some(p), None) => renderer.ids(&[crate::import::tokenizer::Message { role: "user".into(), content: p }]),
        (None, None, Some(t)) => renderer.plain_ids(&t),
        _ => Err("a sample has exactly one of non-empty `messages`, `prompt` or `text`".into()),
    }
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
    if method.needs_calibration() && policy.is_noop() {
        bail!("--quant-method {} needs --quant or --quant-override", method.name());
    }
    let calibration =
        if method.needs_calibration() { calibration_sequences(model, req.calibration.as_deref())? } else { Vec::new() };
    let options = PipelineOptions {
        quant: policy.clone(),
        kv_quant,
        calibration,
        context_len: model.config.max_position_embeddings.min(4096),
        prefill_len: 128,
        gram_budget: 0,
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
