//! Self-contained HTML reports (`--report FILE.html`): charts as inline SVG (`svg`), pages
//! from tera templates, no script and nothing fetched when opened.

pub mod svg;

use std::sync::OnceLock;

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
#[error("rendering the report: {0}")]
pub struct ReportError(String);

fn tera() -> &'static tera::Tera {
    static TERA: OnceLock<tera::Tera> = OnceLock::new();
    TERA.get_or_init(|| {
        let mut t = tera::Tera::default();
        // `.html` names get tera's HTML escaping of every value not marked safe.
        t.add_raw_template("bench.html", include_str!("bench.html.tera")).expect("the bench report template parses");
        t.add_raw_template("compile.html", include_str!("compile.html.tera"))
            .expect("the compile report template parses");
        t
    })
}

fn fixed(v: &Value, digits: usize) -> String {
    v.as_f64().map_or("n/a".into(), |x| format!("{x:.digits$}"))
}

fn sensor_line(v: &Value) -> String {
    if v["exposed"] == json!(true) {
        format!("read from {}", v["sources"])
    } else {
        format!("not exposed on this machine (searched {})", v["searched"])
    }
}

/// The `slmc bench` report from its JSON runs and ratios (the `--json` objects).
pub fn bench_html(runs: &[Value], ratios: &[Value]) -> Result<String, ReportError> {
    let rows: Vec<Value> = runs
        .iter()
        .map(|r| {
            let l = &r["latency_ms"];
            json!({
                "model": r["model"], "executor": r["executor"], "load_s": fixed(&r["load_s"], 2),
                "ttft_s": fixed(&r["ttft_s"], 3), "prefill": fixed(&r["prefill_tokens_per_s"], 1),
                "decode": fixed(&r["decode_tokens_per_s"], 1), "p50": fixed(&l["p50"], 2),
                "p95": fixed(&l["p95"], 2), "p99": fixed(&l["p99"], 2),
                "rss": r["peak_rss_bytes"].as_f64().map_or("n/a".into(), |b| format!("{:.0}", b / 1048576.0)),
            })
        })
        .collect();
    let ratio_rows: Vec<Value> = ratios
        .iter()
        .map(|r| {
            json!({ "model": r["model"], "decode": fixed(&r["decode_tokens_per_s"], 2), "prefill": fixed(&r["prefill_tokens_per_s"], 2),
                "ttft": fixed(&r["ttft_s"], 2), "p50": fixed(&r["latency_p50_ms"], 2) })
        })
        .collect();
    let memory: Vec<(String, f64)> = runs
        .iter()
        .map(|r| {
            (
                r["model"].as_str().unwrap_or_default().to_string(),
                r["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            )
        })
        .collect();
    let sections: Vec<Value> = runs.iter().map(section).collect();
    let summary = match runs.first().and_then(|r| r["duration_s"].as_u64()) {
        Some(d) => format!("Sustained runs of {d} s per model: back-to-back requests of the built-in prompt mix."),
        None => format!(
            "{} timed requests per model of {} prompt tokens and {} generated tokens, models alternating.",
            runs.first().map_or(json!(0), |r| r["requests"].clone()),
            runs.first().map_or("?".into(), |r| fixed(&r["prompt_tokens"], 0)),
            runs.first()
                .and_then(|r| Some(r["generated_tokens"].as_u64()? / r["requests"].as_u64()?.max(1)))
                .unwrap_or(0)
        ),
    };
    let title = runs.iter().filter_map(|r| r["model"].as_str()).collect::<Vec<_>>().join(", ");
    let ctx = tera::Context::from_value(json!({
        "title": title, "summary": summary, "rows": rows, "ratios": ratio_rows, "sections": sections,
        "memory_chart": svg::bar_chart("Peak resident memory", &memory, "MiB"),
    }))
    .map_err(|e| ReportError(e.to_string()))?;
    tera().render("bench.html", &ctx).map_err(|e| ReportError(format!("{e:?}")))
}

/// One model's charts: tokens/s over time with the throttling point (sustained runs),
/// temperature over time where exposed, and the decode latency histogram.
fn section(r: &Value) -> Value {
    let mut charts = Vec::new();
    let mut sustained = "A burst run (no --duration): no time series.".to_string();
    if let Some(series) = r["series"].as_array() {
        let tps: Vec<(f64, f64)> =
            series.iter().filter_map(|s| Some((s["t_s"].as_f64()?, s["tokens_per_s"].as_f64()?))).collect();
        let throttled = r["throttled_at_s"].as_f64();
        sustained = match throttled {
            Some(t) => format!(
                "Throughput fell below 80% of its start at {t:.0} s (median {} tokens/s).",
                fixed(&r["sustained_tokens_per_s"], 1)
            ),
            None => format!(
                "Throughput never fell below 80% of its start (median {} tokens/s).",
                fixed(&r["sustained_tokens_per_s"], 1)
            ),
        };
        charts.push(svg::line_chart(
            "Tokens per second",
            "seconds",
            "tokens/s",
            &tps,
            throttled.map(|t| (t, "throttled")),
        ));
        let temps: Vec<(f64, f64)> =
            series.iter().filter_map(|s| Some((s["t_s"].as_f64()?, s["temperature_c"].as_f64()?))).collect();
        if !temps.is_empty() {
            charts.push(svg::line_chart("Hottest temperature", "seconds", "°C", &temps, None));
        }
    }
    let bins: Vec<(f64, f64, u64)> = r["latency_ms"]["histogram"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter_map(|b| Some((b["from_ms"].as_f64()?, b["to_ms"].as_f64()?, b["count"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default();
    if !bins.is_empty() {
        charts.push(svg::histogram("Decode step latency (slower than p99: last bin)", "ms per token", &bins));
    }
    json!({ "model": r["model"], "sustained": sustained, "charts": charts,
        "temperature": sensor_line(&r["temperature"]), "power": sensor_line(&r["power"]) })
}

/// One pass of this compile's pipeline, for the compile report.
pub struct PassRow {
    pub pass: &'static str,
    pub wall_ms: f64,
    pub changes: usize,
    pub nodes_after: usize,
}

fn mib(v: &Value) -> String {
    v.as_f64().map_or("n/a".into(), |b| format!("{:.1}", b / 1048576.0))
}

/// The `slmc compile` report from the written bundles' manifests (so cached bundles report
/// the same) and, when this compile ran the pipeline, its passes and IR sizes.
pub fn compile_html(manifests: &[Value], passes: Option<(usize, &[PassRow])>) -> Result<String, ReportError> {
    let first = manifests.first().ok_or_else(|| ReportError("no bundle to report on".into()))?;
    let targets: Vec<Value> = manifests
        .iter()
        .map(|m| {
            let bytes: f64 = m["files"].as_array().map_or(0.0, |f| f.iter().filter_map(|x| x["bytes"].as_f64()).sum());
            let mem = &m["memory"];
            let npu = &m["npu_support"];
            json!({
                "name": m["target"]["name"], "backend": m["target"]["backend"], "executor": m["required"]["executor"],
                "weights": m["quantization"]["weights"], "kv": m["quantization"]["kv_cache"],
                "bundle_bytes": bytes, "bundle_mib": format!("{:.1}", bytes / 1048576.0),
                "weight_mib": mib(&mem["weight_bytes"]), "kv_mib": mib(&mem["kv_cache_bytes"]),
                "act_mib": mib(&mem["activation_bytes"]), "total_mib": mib(&mem["total_bytes"]),
                "ram_mib": mib(&mem["device_ram_bytes"]), "kv_layout": mem["kv_cache_layout"],
                "npu": format!("{} / {}", npu["ops_on_npu"], npu["ops_total"]),
                "bytes_first": mib(&m["cost"]["bytes_per_token_first"]), "bytes_last": mib(&m["cost"]["bytes_per_token_last"]),
                "mflops": m["cost"]["flops_per_token_first"].as_f64().map_or("n/a".into(), |x| format!("{:.1}", x / 1e6)),
                "predicted": match (m["cost"]["predicted_decode_tokens_per_s_first"].as_f64(), m["cost"]["predicted_decode_tokens_per_s_last"].as_f64()) {
                    (Some(a), Some(b)) => format!("{a:.1} .. {b:.1}"),
                    _ => "n/a (no bandwidth figure)".into(),
                },
            })
        })
        .collect();
    let name = |t: &Value| t["name"].as_str().unwrap_or_default().to_string();
    let sizes: Vec<(String, f64)> =
        targets.iter().map(|t| (name(t), t["bundle_bytes"].as_f64().unwrap_or(0.0) / 1048576.0)).collect();
    let memory: Vec<(String, f64)> = manifests
        .iter()
        .map(|m| (name(&m["target"]), m["memory"]["total_bytes"].as_f64().unwrap_or(0.0) / 1048576.0))
        .collect();
    let q = &first["quality"];
    let quality = (!q.is_null()).then(|| {
        json!({ "positions": q["positions"], "top1": fixed(&q["top1_agreement"], 4), "kl": fixed(&q["mean_kl"], 4),
            "ppl_base": fixed(&q["perplexity_base"], 3), "ppl_opt": fixed(&q["perplexity_optimized"], 3), "method": q["method"] })
    });
    let evals: Vec<Value> = manifests
        .iter()
        .filter(|m| m["eval"].is_object())
        .map(|m| {
            let e = &m["eval"];
            let regressed = e["regressed"].as_array().map(|r| r.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", "));
            json!({ "target": m["target"]["name"], "items": e["items"], "accuracy": fixed(&e["accuracy"], 1),
                "base": fixed(&e["base_accuracy"], 1), "max_drop": e["max_drop"], "regressed": regressed.unwrap_or_default() })
        })
        .collect();
    let (nodes_before, rows) = passes.unwrap_or((0, &[]));
    let pass_rows: Vec<Value> = rows
        .iter()
        .map(|p| json!({ "pass": p.pass, "wall_ms": format!("{:.3}", p.wall_ms), "changes": p.changes, "nodes": p.nodes_after }))
        .collect();
    let pass_chart = svg::bar_chart(
        "Wall time per pass",
        &rows.iter().map(|p| (p.pass.to_string(), p.wall_ms)).collect::<Vec<_>>(),
        "ms",
    );
    let ctx = tera::Context::from_value(json!({
        "model": first["model"], "compiler": first["compiler"]["version"], "passes": pass_rows,
        "nodes_before": nodes_before, "nodes_after": rows.last().map_or(0, |p| p.nodes_after),
        "pass_chart": pass_chart, "targets": targets, "quality": quality, "evals": evals,
        "size_chart": svg::bar_chart("Bundle size per target", &sizes, "MiB"),
        "memory_chart": svg::bar_chart("Memory needed at the compiled context (weights + KV + activations)", &memory, "MiB"),
    }))
    .map_err(|e| ReportError(e.to_string()))?;
    tera().render("compile.html", &ctx).map_err(|e| ReportError(format!("{e:?}")))
}
