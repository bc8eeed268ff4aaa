//! The optimizer commands: `slmc opt`, `slmc quality`, and the preparation (lower +
//! pipeline) every command that optimizes shares.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use slmc_compiler::import::Model;
use slmc_compiler::lower;
use slmc_compiler::optimize::{golden_sequences, is_json_sample, optimize, Optimized};
use slmc_ir::Layered;
use slmc_runtime::InterpreterExecutor;

use crate::*;

/// The graph a command executes: lowered, then optimized when asked (or `force`d).
pub(crate) fn prepare(model: &Model, opt: &OptArgs, force: bool) -> Result<Optimized> {
    let graph = lower::lower(model)?;
    let req = opt.request();
    if !force && !req.is_active() {
        return Ok(Optimized {
            lowered_nodes: graph.len(),
            graph,
            derived: Default::default(),
            passes: vec![],
            timings: vec![],
            memory_plan: None,
            policy: Default::default(),
            kv_quant: Default::default(),
        });
    }
    let mut stderr = std::io::stderr();
    let optimized = optimize(model, graph, &req, Some(&mut stderr))?;
    if opt.time_passes {
        eprint!("{}", slmc_passes::format_timings(&optimized.timings));
    }
    Ok(optimized)
}

pub(crate) fn memory_json(plan: &slmc_passes::MemoryPlan) -> Value {
    let arena = |a: &slmc_passes::memory::ArenaPlan| {
        json!({
            "tokens": a.tokens,
            "past": a.past,
            "buffers": a.buffers,
            "arena_bytes": a.arena_bytes,
            "one_buffer_per_value_bytes": a.one_buffer_per_value_bytes,
            "live_peak_bytes": a.live_peak_bytes,
        })
    };
    json!({
        "weight_bytes": plan.weight_bytes,
        "kv_bytes_per_token": plan.kv_bytes_per_token,
        "kv_scale_bytes_per_token": plan.kv_scale_bytes_per_token,
        "kv_bytes_per_token_f32": plan.kv_bytes_per_token_f32,
        "context_len": plan.context_len,
        "prefill": arena(&plan.prefill),
        "decode": arena(&plan.decode),
    })
}

pub(crate) fn opt_command(common: &Common, opt: &OptArgs, emit: Emit) -> Result<()> {
    let model = load(common)?;
    let optimized = prepare(&model, opt, true)?;
    let text = match emit {
        Emit::Ir => slmc_ir::text::print(&optimized.graph),
        Emit::Dot => optimized.graph.to_dot(),
        Emit::None => String::new(),
    };
    if common.json {
        let passes: Vec<Value> = optimized
            .timings
            .iter()
            .map(|t| json!({ "pass": t.pass, "wall_ms": t.wall.as_secs_f64() * 1e3, "changes": t.changes, "nodes": t.nodes_after }))
            .collect();
        print_json(&json!({
            "pipeline": optimized.passes,
            "passes": passes,
            "quant": optimized.policy.scheme.map(|s| s.name()),
            "quant_method": optimized.policy.method.name(),
            "kv_quant": optimized.kv_quant.name(),
            "derived_weights": optimized.derived.len(),
            "memory": optimized.memory_plan.as_ref().map(memory_json),
            "nodes": optimized.graph.len(),
            "text": text,
        }));
    } else {
        print!("{text}");
        if let Some(plan) = &optimized.memory_plan {
            eprintln!(
                "memory: weights {} B, KV {} B/token (f32 would be {}), activations prefill({}) {} B planned vs {} B one-per-value, decode {} B vs {} B",
                plan.weight_bytes,
                plan.kv_bytes_per_token,
                plan.kv_bytes_per_token_f32,
                plan.prefill.tokens,
                plan.prefill.arena_bytes,
                plan.prefill.one_buffer_per_value_bytes,
                plan.decode.arena_bytes,
                plan.decode.one_buffer_per_value_bytes
            );
        }
    }
    Ok(())
}

pub(crate) fn default_prompts_file() -> Option<PathBuf> {
    let dir = std::env::var_os("SLMC_GOLDEN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("../shared/golden"));
    let file = dir.join("smollm2-135m-greedy.json");
    file.exists().then_some(file)
}

pub(crate) fn quality_cases(model: &Model, file: &std::path::Path) -> Result<Vec<slmc_runtime::QualityCase>> {
    let cases = read_quality_cases(model, file)?;
    // Ids index the logits: one past the vocabulary would panic deep in the comparison.
    let vocab = model.config.vocab_size;
    for (i, c) in cases.iter().enumerate() {
        if let Some(bad) = c.prompt.iter().chain(&c.continuation).find(|t| **t as usize >= vocab) {
            bail!("{}: prompt {i} has token id {bad}, outside the model's vocabulary of {vocab}", file.display());
        }
    }
    Ok(cases)
}

fn read_quality_cases(model: &Model, file: &std::path::Path) -> Result<Vec<slmc_runtime::QualityCase>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("{}: cannot read", file.display()))?;
    if let Some(json) = serde_json::from_str::<Value>(&text).ok().filter(|j| !is_json_sample(j)) {
        let prompts = golden_sequences(&json).with_context(|| format!("{}: not a prompts file", file.display()))?;
        let lens: Vec<usize> = json["prompts"]
            .as_array()
            .map(|a| a.iter().map(|p| p["input_ids"].as_array().map(|x| x.len()).unwrap_or(0)).collect())
            .unwrap_or_default();
        return Ok(prompts
            .into_iter()
            .zip(lens)
            .map(|(seq, n)| slmc_runtime::QualityCase { prompt: seq[..n].to_vec(), continuation: seq[n..].to_vec() })
            .collect());
    }
    // JSON Lines samples (an eval set, calibration-style conversations) are rendered as for
    // calibration; text lines are tokenized as they are. Each is scored on itself after its
    // first token.
    let sequences = if text.lines().find(|l| !l.trim().is_empty()).is_some_and(|l| l.trim_start().starts_with('{')) {
        slmc_compiler::optimize::calibration_sequences(model, Some(file))?
    } else {
        let tok = model.tokenizer.as_ref().map_err(|e| anyhow!("text prompts need a tokenizer: {e}"))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| Ok(tok.encode(l, false).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids().to_vec()))
            .collect::<Result<Vec<_>>>()?
    };
    sequences
        .into_iter()
        .map(|ids| {
            if ids.len() < 2 {
                bail!("{}: a prompt needs at least two tokens", file.display());
            }
            Ok(slmc_runtime::QualityCase { prompt: ids[..1].to_vec(), continuation: ids[1..].to_vec() })
        })
        .collect()
}

pub(crate) fn quality_command(
    common: &Common,
    opt: &OptArgs,
    prompts: Option<&std::path::Path>,
    max_drop: Option<f64>,
) -> Result<()> {
    let model = load(common)?;
    let file = match prompts {
        Some(p) => p.to_path_buf(),
        None => default_prompts_file().ok_or_else(|| anyhow!("no golden prompts found: give --prompts FILE"))?,
    };
    let cases = quality_cases(&model, &file)?;
    let base_graph = lower::lower(&model)?;
    let optimized = prepare(&model, opt, true)?;
    let weights = Layered { top: &optimized.derived, base: &model.weights };
    let ctx = model.config.max_position_embeddings;
    let mut base = InterpreterExecutor::new(&base_graph, &model.weights, ctx)?;
    let mut opt_exec = InterpreterExecutor::new(&optimized.graph, &weights, ctx)?;
    let r = slmc_runtime::compare_quality(&mut base, &mut opt_exec, &cases)?;
    drop(opt_exec);
    // A calibrated method is shown beside round to nearest on the same scheme.
    let rtn = if optimized.policy.method != slmc_passes::QuantMethod::Rtn {
        let rtn_args = OptArgs { quant_method: Some("rtn".into()), time_passes: false, ..opt.clone() };
        let rtn_opt = prepare(&model, &rtn_args, true)?;
        let rtn_weights = Layered { top: &rtn_opt.derived, base: &model.weights };
        let mut rtn_exec = InterpreterExecutor::new(&rtn_opt.graph, &rtn_weights, ctx)?;
        let q = slmc_runtime::compare_quality(&mut base, &mut rtn_exec, &cases)?;
        Some(json!({
            "top1_agreement": q.top1_agreement,
            "mean_kl": q.mean_kl,
            "perplexity_optimized": q.perplexity_optimized,
            "mean_kl_ratio": r.mean_kl / q.mean_kl,
        }))
    } else {
        None
    };
    let drop_points = 100.0 * (1.0 - r.top1_agreement);
    let report = json!({
        "prompts_file": file,
        "cases": r.cases,
        "positions": r.positions,
        "quant": optimized.policy.scheme.map(|s| s.name()),
        "quant_method": optimized.policy.method.name(),
        "kv_quant": optimized.kv_quant.name(),
        "top1_agreement": r.top1_agreement,
        "top1_agreement_reference": r.top1_agreement_reference,
        "base_top1_agreement_reference": r.base_top1_agreement_reference,
        "mean_kl": r.mean_kl,
        "perplexity_base": r.perplexity_base,
        "perplexity_optimized": r.perplexity_optimized,
        "perplexity_change_pct": 100.0 * (r.perplexity_optimized / r.perplexity_base - 1.0),
        "quality_drop_points": drop_points,
        "max_quality_drop": max_drop,
        "memory": optimized.memory_plan.as_ref().map(memory_json),
        "rtn": rtn,
    });
    let failure = max_drop
        .filter(|limit| drop_points > *limit)
        .map(|limit| format!("quality drop of {drop_points:.2} top-1 points exceeds --max-quality-drop {limit}"));
    if common.json {
        let mut report = report;
        report["passed"] = json!(failure.is_none());
        if let Some(f) = &failure {
            report["error"] = json!(f);
        }
        print_json(&report);
        if let Some(f) = failure {
            // The report above is the one JSON document on stdout; the error goes to stderr.
            eprintln!("error: {f}");
            std::process::exit(1);
        }
    } else {
        println!("positions:                {} over {} prompts", r.positions, r.cases);
        println!("top-1 agreement:          {:.4} (with the unoptimized model)", r.top1_agreement);
        println!(
            "top-1 vs reference:       {:.4} (unoptimized: {:.4})",
            r.top1_agreement_reference, r.base_top1_agreement_reference
        );
        println!("mean KL:                  {:.4} nats", r.mean_kl);
        println!("perplexity:               {:.3} -> {:.3}", r.perplexity_base, r.perplexity_optimized);
        if let Some(q) = &rtn {
            println!(
                "round to nearest:         top-1 {:.4}, mean KL {:.4} nats ({:.2}x this method's)",
                q["top1_agreement"].as_f64().unwrap_or(f64::NAN),
                q["mean_kl"].as_f64().unwrap_or(f64::NAN),
                1.0 / q["mean_kl_ratio"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    match failure {
        Some(f) => bail!(f),
        None => Ok(()),
    }
}
