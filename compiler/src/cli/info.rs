//! `slmc inspect` and `slmc targets`.

use anyhow::Result;
use serde_json::{json, Value};
use slmc_compiler::import::Model;

use crate::*;

pub(crate) fn targets_command(action: TargetsAction, json: bool) -> Result<()> {
    match action {
        TargetsAction::List => {
            let all = slmc_targets::catalog();
            if json {
                let rows: Vec<Value> = all
                    .iter()
                    .map(|p| json!({ "name": p.name, "version": p.version, "backend": p.backend, "family": p.family, "description": p.description }))
                    .collect();
                print_json(&json!({ "targets": rows }));
            } else {
                for p in all {
                    println!("{:<20} v{:<3} {:<7} {}", p.name, p.version, p.backend, p.description);
                }
            }
        }
        TargetsAction::Show { name } => {
            let p = slmc_targets::lookup(&name)?;
            if json {
                print_json(&serde_json::to_value(p)?);
            } else {
                let unknown = |v: Option<String>| v.unwrap_or_else(|| "unknown".into());
                let bytes = |v: Option<u64>| unknown(v.map(|b| format!("{b} bytes")));
                println!("{} (version {}): {}", p.name, p.version, p.description);
                println!("  family:              {}", p.family);
                println!("  backend:             {}", p.backend);
                println!("  shader language:     {}", p.shader_language.clone().unwrap_or_else(|| "none".into()));
                println!("  storage binding:     {}", bytes(p.limits.max_storage_buffer_binding_size));
                println!("  buffer:              {}", bytes(p.limits.max_buffer_size));
                println!("  workgroup storage:   {}", bytes(p.limits.max_compute_workgroup_storage_size));
                println!(
                    "  invocations/group:   {}",
                    unknown(p.limits.max_compute_invocations_per_workgroup.map(|v| v.to_string()))
                );
                println!(
                    "  storage buffers:     {}",
                    unknown(p.limits.max_storage_buffers_per_shader_stage.map(|v| v.to_string()))
                );
                println!(
                    "  features:            {}",
                    if p.features.is_empty() { "none".into() } else { p.features.join(", ") }
                );
                println!("  subgroup sizes:      {}", unknown(p.subgroup_sizes.map(|[a, b]| format!("{a}..{b}"))));
                println!("  RAM:                 {}", bytes(p.ram_bytes));
                println!("  memory bandwidth:    {}", unknown(p.memory_bandwidth_gbps.map(|v| format!("{v} GB/s"))));
                println!(
                    "  NPU:                 {}",
                    unknown(
                        p.npu
                            .clone()
                            .map(|n| format!("{n} via {}", p.npu_runtime.clone().unwrap_or_else(|| "unknown".into())))
                    )
                );
                println!("  minimum OS:          {}", unknown(p.min_os.clone()));
                println!("  minimum runtime:     {}", unknown(p.min_runtime.clone()));
                println!("  sources:             {}", p.sources);
            }
        }
    }
    Ok(())
}

pub(crate) fn inspect(model: &Model, as_json: bool) -> Result<()> {
    // A config that disagrees with the weights (more layers than stored, a vocabulary the
    // embedding does not have) is an error here too, not a plausible-looking report:
    // lowering checks every tensor the config implies against the files.
    slmc_compiler::lower::lower(model)?;
    let mut by_dtype: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    let mut params = 0usize;
    let mut table = Vec::new();
    for (name, t) in model.weights.tensors() {
        // Tensors the importer derived (Gemma's folded norms) are listed, not counted.
        let derived = model.weights.is_derived(t);
        if !derived {
            params += t.shape.iter().product::<usize>();
            let e = by_dtype.entry(t.dtype.name()).or_default();
            e.0 += t.len;
            e.1 += 1;
        }
        table.push(
            json!({ "name": name, "dtype": t.dtype.name(), "shape": t.shape, "bytes": t.len, "derived": derived }),
        );
    }
    let files: Vec<String> = model.weights.files().map(|p| p.display().to_string()).collect();
    let report = json!({
        "path": model.path,
        "format": model.format.name(),
        "architecture": model.config.arch_name,
        "parameters": params,
        "bytes_by_dtype": by_dtype.iter().map(|(k, v)| (k.to_string(), json!(v.0))).collect::<serde_json::Map<_, _>>(),
        "tensors_by_dtype": by_dtype.iter().map(|(k, v)| (k.to_string(), json!(v.1))).collect::<serde_json::Map<_, _>>(),
        "config": model.config.to_json(),
        "files": files,
        "tokenizer": match &model.tokenizer { Ok(t) => json!({ "vocab_size": t.get_vocab_size(true) }), Err(e) => json!({ "error": e }) },
        "chat_template": model.chat_template.is_some(),
        "tensors": table,
    });
    if as_json {
        print_json(&report);
        return Ok(());
    }
    let c = &model.config;
    println!("model:        {}", model.path.display());
    println!("format:       {}", model.format.name());
    println!(
        "architecture: {} ({} layers, hidden {}, heads {}/{} kv, head_dim {}, ffn {}, vocab {})",
        c.arch_name,
        c.num_layers(),
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size
    );
    println!("parameters:   {params} ({:.1} M)", params as f64 / 1e6);
    for (dtype, (bytes, count)) in &by_dtype {
        println!("  {dtype:>5}: {count:>4} tensors, {bytes} bytes");
    }
    for feature in c.features() {
        println!("feature:      {feature}");
    }
    println!("tensors:");
    for row in &table {
        println!(
            "  {:<48} {:>5} {}{}",
            row["name"].as_str().unwrap_or(""),
            row["dtype"].as_str().unwrap_or(""),
            row["shape"],
            if row["derived"] == true { " (derived at import)" } else { "" }
        );
    }
    Ok(())
}
