//! Weight quantization: named schemes, a per-tensor policy, round-to-nearest and an
//! activation-aware clipping search, and lossless pass-through of weights that are
//! already in the requested format (GGUF Q4_0/Q4_1/Q8_0 blocks keep their bytes).
//!
//! Packed layout: ggml's block layout (f16 scale, f16 minimum for asymmetric schemes,
//! then element j and j + g/2 in one byte, low nibble first), with groups of 32/64/128.
//! Other layouts (interleaved nibbles for MatMulNBits, f32 scales) are re-layouts of
//! the same codes, done by the backend that needs them.

use std::collections::HashMap;

use half::f16;
use rayon::prelude::*;
use slmc_ir::dtype::{encode_float, pack_q4, pack_q8_0};
use slmc_ir::{DType, Dim, Graph, NodeId, Op, OwnedWeight, TensorType, WeightSource};

use crate::calibrate::ChannelStats;
use crate::gptq::{gptq_q4, ColumnOrder, GptqConfig};
use crate::PassContext;

/// A quantization scheme for one weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Leave the weight as stored.
    Keep,
    F32,
    F16,
    /// Q8_0: symmetric int8 in blocks of 32.
    Q8,
    /// 4-bit groups: asymmetric (scale = (max - min) / 15, offset = min, 16 levels) or
    /// symmetric (scale = max|w| / 7, levels -7..7).
    Q4 {
        group: usize,
        sym: bool,
    },
}

impl Scheme {
    pub fn parse(text: &str) -> Result<Scheme, String> {
        Ok(match text {
            "keep" | "none" => Scheme::Keep,
            "f32" => Scheme::F32,
            "f16" => Scheme::F16,
            "q8" | "q8_0" => Scheme::Q8,
            _ => {
                let (body, sym) = match text.strip_suffix("-sym") {
                    Some(b) => (b, true),
                    None => (text, false),
                };
                let group = body.strip_prefix("q4g").and_then(|g| g.parse::<usize>().ok());
                match group {
                    Some(g @ (32 | 64 | 128)) => Scheme::Q4 { group: g, sym },
                    _ => {
                        return Err(format!(
                            "unknown quantization scheme `{text}` (q4g32, q4g64, q4g128, their -sym variants, q8, f16, f32, keep)"
                        ))
                    }
                }
            }
        })
    }

    pub fn name(self) -> String {
        match self {
            Scheme::Keep => "keep".into(),
            Scheme::F32 => "f32".into(),
            Scheme::F16 => "f16".into(),
            Scheme::Q8 => "q8".into(),
            Scheme::Q4 { group, sym } => format!("q4g{group}{}", if sym { "-sym" } else { "" }),
        }
    }

    /// The stored dtype this scheme produces (`None` for keep).
    pub fn dtype(self) -> Option<DType> {
        Some(match self {
            Scheme::Keep => return None,
            Scheme::F32 => DType::F32,
            Scheme::F16 => DType::F16,
            Scheme::Q8 => DType::Q8_0,
            Scheme::Q4 { group: 32, sym: true } => DType::Q4_0,
            Scheme::Q4 { group: 64, sym: true } => DType::Q4_0G64,
            Scheme::Q4 { group: _, sym: true } => DType::Q4_0G128,
            Scheme::Q4 { group: 32, sym: false } => DType::Q4_1,
            Scheme::Q4 { group: 64, sym: false } => DType::Q4_1G64,
            Scheme::Q4 { group: _, sym: false } => DType::Q4_1G128,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum QuantMethod {
    /// Round to nearest on the plain grid.
    #[default]
    Rtn,
    /// Per-group search of a clipping ratio minimizing the output error weighted by the
    /// mean squared calibration activation of each input channel (AWQ's clip search).
    Clip,
    /// AWQ's per-channel scaling folded into the producer of each linear's input (see
    /// [`crate::awq`]), then the clipping search.
    Awq,
    /// GPTQ on 4-bit matrices (see [`crate::gptq`]), each group's scale from the clipping
    /// search; other schemes and the embedding table round to nearest.
    Gptq,
}

impl QuantMethod {
    pub fn parse(text: &str) -> Result<QuantMethod, String> {
        match text {
            "rtn" => Ok(QuantMethod::Rtn),
            "clip" => Ok(QuantMethod::Clip),
            "awq" => Ok(QuantMethod::Awq),
            "gptq" => Ok(QuantMethod::Gptq),
            other => Err(format!("unknown quantization method `{other}` (rtn, clip, awq, gptq)")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantMethod::Rtn => "rtn",
            QuantMethod::Clip => "clip",
            QuantMethod::Awq => "awq",
            QuantMethod::Gptq => "gptq",
        }
    }

    /// Whether it runs calibration sequences through the model.
    pub fn needs_calibration(self) -> bool {
        self != QuantMethod::Rtn
    }

    /// Whether GPTQ quantizes a weight of `scheme` in `role` (4-bit matrices; the rest
    /// round to nearest).
    fn by_gptq(self, scheme: Scheme, role: Role) -> bool {
        self == QuantMethod::Gptq && matches!(scheme, Scheme::Q4 { .. }) && matches!(role, Role::Matrix | Role::LmHead)
    }

    /// The derived weight `name` becomes under `scheme` in `role`.
    fn derived_name(self, name: &str, scheme: Scheme, role: Role) -> String {
        let suffix = match (self, scheme) {
            _ if self.by_gptq(scheme, role) => "-gptq",
            (QuantMethod::Clip | QuantMethod::Awq, Scheme::Q4 { .. }) => "-clip",
            _ => "",
        };
        format!("{name}@{}{suffix}", scheme.name())
    }
}

/// Which scheme each weight gets. Matrices of `linear` ops take `scheme`; the embedding
/// table and an LM head tied to it are left as stored unless an override names them. Overrides
/// match the roles `embed` and `lm_head` or any substring of a weight's name; the first
/// match wins.
#[derive(Clone, Debug, Default)]
pub struct QuantPolicy {
    pub scheme: Option<Scheme>,
    pub overrides: Vec<(String, Scheme)>,
    pub method: QuantMethod,
}

impl QuantPolicy {
    /// Parses `lm_head=q8,embed=f16`.
    pub fn parse_overrides(text: &str) -> Result<Vec<(String, Scheme)>, String> {
        text.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|item| {
                let (key, scheme) =
                    item.split_once('=').ok_or_else(|| format!("override `{item}` is not KEY=SCHEME"))?;
                Ok((key.trim().to_string(), Scheme::parse(scheme.trim())?))
            })
            .collect()
    }

    pub fn is_noop(&self) -> bool {
        self.scheme.is_none() && self.overrides.is_empty()
    }

    fn scheme_for(&self, role: Role, weight: &str, tied: bool) -> Scheme {
        let role_key = match role {
            Role::Embed => "embed",
            Role::LmHead => "lm_head",
            Role::Matrix => "",
        };
        for (key, scheme) in &self.overrides {
            if key == role_key || weight.contains(key.as_str()) {
                return *scheme;
            }
        }
        match role {
            Role::Matrix => self.scheme.unwrap_or(Scheme::Keep),
            // Embedding tables (and the LM head tied to one) stay as they are by default.
            Role::Embed => Scheme::Keep,
            // A head tied to the embedding table is that table: it stays unless named.
            Role::LmHead if tied => Scheme::Keep,
            Role::LmHead => self.scheme.unwrap_or(Scheme::Keep),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Role {
    Embed,
    LmHead,
    Matrix,
}

/// Each use of a weight node: (user, operand slot, role).
fn weight_uses(graph: &Graph, w: NodeId) -> Vec<(NodeId, usize, Role)> {
    let logits: Vec<NodeId> = graph.outputs().iter().map(|(_, id)| *id).collect();
    let mut uses = Vec::new();
    for u in graph.users(w) {
        let node = graph.node(u);
        for (slot, input) in node.inputs.iter().enumerate() {
            if *input != w {
                continue;
            }
            let role = match (&node.op, slot) {
                (Op::Embed, 0) => Role::Embed,
                (Op::Linear, 1) if logits.contains(&u) => Role::LmHead,
                (Op::Linear | Op::LinearSwiglu, 1) => Role::Matrix,
                _ => continue,
            };
            uses.push((u, slot, role));
        }
    }
    uses
}

/// A weight node, the role and scheme of some of its uses, and those uses (user, slot).
type PlannedWeight = (NodeId, Role, Scheme, Vec<(NodeId, usize)>);

/// A quantized group: f16 scale, f16 minimum (zero for symmetric) and codes 0..=15.
type QuantGroup = (f16, f16, Vec<u8>);

/// Which weights get which scheme, per role.
fn plan_weights(graph: &Graph, policy: &QuantPolicy) -> Result<Vec<PlannedWeight>, String> {
    let mut plan: Vec<PlannedWeight> = Vec::new();
    for id in graph.topo_order()? {
        let Op::Weight { name } = &graph.node(id).op else { continue };
        if graph.node(id).ty.rank() != 2 {
            continue;
        }
        let mut by_role: Vec<(Role, Vec<(NodeId, usize)>)> = Vec::new();
        for (user, slot, role) in weight_uses(graph, id) {
            match by_role.iter_mut().find(|(r, _)| *r == role) {
                Some((_, v)) => v.push((user, slot)),
                None => by_role.push((role, vec![(user, slot)])),
            }
        }
        let tied = by_role.iter().any(|(r, _)| *r == Role::Embed);
        for (role, uses) in by_role {
            let scheme = policy.scheme_for(role, name, tied);
            if scheme != Scheme::Keep {
                plan.push((id, role, scheme, uses));
            }
        }
    }
    Ok(plan)
}

/// The linear nodes reading planned weights (the activation-aware methods' subjects),
/// with the scheme of the weight they read.
fn planned_linears(plan: &[PlannedWeight]) -> HashMap<NodeId, Scheme> {
    plan.iter()
        .filter(|p| matches!(p.1, Role::Matrix | Role::LmHead))
        .flat_map(|(_, _, scheme, uses)| uses.iter().map(move |(u, _)| (*u, *scheme)))
        .collect()
}

pub fn quantize_weights(graph: &mut Graph, cx: &mut PassContext) -> Result<usize, String> {
    let policy = cx.options.quant.clone();
    if policy.is_noop() {
        return Ok(0);
    }
    let mut plan = plan_weights(graph, &policy)?;
    if plan.is_empty() {
        return Ok(0);
    }
    let mut stats = HashMap::new();
    if policy.method == QuantMethod::Gptq {
        gptq_in_chunks(graph, cx, &plan)?;
        plan = plan_weights(graph, &policy)?;
    } else if policy.method.needs_calibration() {
        let mut users: Vec<NodeId> = planned_linears(&plan).into_keys().collect();
        users.sort();
        stats = crate::calibrate::collect(graph, cx, &users, false)?;
    }
    if policy.method == QuantMethod::Awq {
        let q4: HashMap<NodeId, Scheme> =
            planned_linears(&plan).into_iter().filter(|(_, s)| matches!(s, Scheme::Q4 { .. })).collect();
        if crate::awq::rescale(graph, cx, &q4, &mut stats)? > 0 {
            plan = plan_weights(graph, &policy)?;
        }
    }
    let mut changed = 0;
    for entry in &plan {
        changed += quantize_planned(graph, cx, entry, policy.method, &stats)? as usize;
    }
    crate::cleanup::dead_code_elimination(graph);
    if policy.method == QuantMethod::Awq {
        // The scaled f32 matrices were inputs to the quantizer, not weights of the graph.
        let referenced = crate::cleanup::referenced_weights(graph);
        cx.derived
            .retain(|name| !name.contains("@awq") || referenced.binary_search_by(|r| r.as_str().cmp(name)).is_ok());
    }
    Ok(changed)
}

/// Quantizes one planned weight (unless GPTQ already did) and points its uses at the
/// result; false when it is already stored in its scheme.
fn quantize_planned(
    graph: &mut Graph,
    cx: &mut PassContext,
    (w, role, scheme, uses): &PlannedWeight,
    method: QuantMethod,
    stats: &HashMap<NodeId, ChannelStats>,
) -> Result<bool, String> {
    let (w, role, scheme) = (*w, *role, *scheme);
    let name = match &graph.node(w).op {
        Op::Weight { name } => name.clone(),
        _ => unreachable!(),
    };
    let view_dtype = graph.node(w).ty.dtype;
    let target = scheme.dtype().expect("keep is filtered out");
    if target == view_dtype {
        return Ok(false); // already in the requested format: the stored bytes pass through
    }
    let shape: Vec<usize> = graph.node(w).ty.shape.iter().map(|d| d.as_const().unwrap_or(0) as usize).collect();
    let (rows, cols) = (shape[0], shape[1]);
    if cols % target.block_len() != 0 {
        return Err(format!("weight \"{name}\": {cols} columns are not a multiple of {}'s group", scheme.name()));
    }
    let derived_name = method.derived_name(&name, scheme, role);
    if cx.derived.get(&derived_name).is_none() {
        if method.by_gptq(scheme, role) {
            return Err(format!("weight \"{name}\": no calibration run reached its users"));
        }
        let values = cx.weights().to_f32(&name).ok_or_else(|| format!("weight \"{name}\" cannot be read"))?;
        // Channel weights for the clipping search: mean x^2 of the input of this weight's users.
        let importance: Option<Vec<f32>> =
            uses.iter().find_map(|(u, _)| stats.get(&graph.node(*u).inputs[0]).map(|s| s.mean_sq()));
        let bytes = quantize_matrix(&values, rows, cols, scheme, method, importance.as_deref());
        cx.derived.insert(derived_name.clone(), OwnedWeight { dtype: target, shape: shape.clone(), bytes });
    }
    let ty = TensorType::new(target, shape.iter().map(|d| Dim::from(*d)).collect());
    let base = graph.node(w).name.clone();
    let new_w = graph.weight(&graph.fresh_name(&format!("{base}.{}", scheme.name())), &derived_name, ty)?;
    for (user, slot) in uses {
        let mut inputs = graph.node(*user).inputs.clone();
        inputs[*slot] = new_w;
        graph.set_inputs(*user, &inputs);
    }
    Ok(true)
}

/// Most bytes of Gram matrices one GPTQ calibration run holds (f32, one per distinct
/// activation): a bigger model is calibrated in chunks of consecutive layers, each chunk
/// quantized before the next is calibrated on its output (GPTQ's sequential mode).
pub const GPTQ_GRAM_BUDGET: usize = 512 << 20;

/// GPTQ over the plan in chunks of linears (in graph order) whose Gram matrices fit the
/// budget (`PipelineOptions::gram_budget`, or [`GPTQ_GRAM_BUDGET`]); each chunk's weights
/// are quantized and in the graph before the next chunk is calibrated.
fn gptq_in_chunks(graph: &mut Graph, cx: &mut PassContext, plan: &[PlannedWeight]) -> Result<(), String> {
    let budget = if cx.options.gram_budget > 0 { cx.options.gram_budget } else { GPTQ_GRAM_BUDGET };
    let order = graph.topo_order()?;
    let mut users: Vec<NodeId> = planned_linears(plan).into_keys().collect();
    users.sort_by_key(|u| order.iter().position(|o| o == u));
    let mut chunks: Vec<Vec<NodeId>> = Vec::new();
    let (mut seen, mut bytes) = (Vec::new(), 0usize);
    for u in users {
        let act = graph.node(u).inputs[0];
        let k = graph.node(act).ty.shape.last().and_then(|d| d.as_const()).unwrap_or(0) as usize;
        let add = if seen.contains(&act) { 0 } else { k * k * 4 };
        if chunks.is_empty() || (bytes + add > budget && bytes > 0) {
            chunks.push(Vec::new());
            (seen, bytes) = (Vec::new(), 0);
        }
        seen.push(act);
        bytes += add;
        chunks.last_mut().expect("pushed above").push(u);
    }
    for chunk in chunks {
        let stats = crate::calibrate::collect(graph, cx, &chunk, true)?;
        let part: Vec<PlannedWeight> =
            plan.iter().filter(|p| p.3.iter().any(|(u, _)| chunk.contains(u))).cloned().collect();
        gptq_weights(graph, cx, &part, &stats)?;
        for entry in &part {
            quantize_planned(graph, cx, entry, QuantMethod::Gptq, &stats)?;
        }
    }
    Ok(())
}

/// GPTQ for every 4-bit matrix not already stored in its scheme, against the Gram matrix
/// of its users' input; results go into the derived weights under their final names.
fn gptq_weights(
    graph: &Graph,
    cx: &mut PassContext,
    plan: &[PlannedWeight],
    stats: &HashMap<NodeId, ChannelStats>,
) -> Result<(), String> {
    for (w, role, scheme, uses) in plan {
        let Scheme::Q4 { group, sym } = *scheme else { continue };
        let Op::Weight { name } = &graph.node(*w).op else { continue };
        let dtype = scheme.dtype().expect("a 4-bit scheme");
        if !QuantMethod::Gptq.by_gptq(*scheme, *role) || dtype == graph.node(*w).ty.dtype {
            continue;
        }
        let derived = QuantMethod::Gptq.derived_name(name, *scheme, *role);
        let Some(gram) =
            uses.iter().find_map(|(u, _)| stats.get(&graph.node(*u).inputs[0])).and_then(|s| s.gram.as_ref())
        else {
            return Err(format!("weight \"{name}\": no calibration run reached its users"));
        };
        let values = cx.weights().to_f32(name).ok_or_else(|| format!("weight \"{name}\" cannot be read"))?;
        let cols = *graph.node(*w).ty.shape[1].as_const().as_ref().ok_or("GPTQ: a weight of unknown shape")? as usize;
        let rows = values.len() / cols;
        let h: Vec<f64> = gram.iter().map(|v| *v as f64).collect();
        let cfg = GptqConfig { group, sym, order: ColumnOrder::ActOrder, ratios: &CLIP_RATIOS };
        let bytes = gptq_q4(&values, rows, cols, &h, cfg, dtype).map_err(|e| format!("weight \"{name}\": {e}"))?;
        cx.derived.insert(derived, OwnedWeight { dtype, shape: vec![rows, cols], bytes });
    }
    Ok(())
}

/// Quantizes a row-major `[rows, cols]` matrix into `scheme`'s packed bytes.
pub fn quantize_matrix(
    values: &[f32],
    rows: usize,
    cols: usize,
    scheme: Scheme,
    method: QuantMethod,
    importance: Option<&[f32]>,
) -> Vec<u8> {
    match scheme {
        Scheme::F32 | Scheme::F16 => encode_float(scheme.dtype().unwrap(), values).expect("float scheme"),
        Scheme::Q8 => {
            let mut out = Vec::new();
            for row in values.chunks_exact(cols) {
                pack_q8_0(row, &mut out);
            }
            out
        }
        Scheme::Q4 { group, sym } => {
            let dtype = scheme.dtype().unwrap();
            let rows_out: Vec<Vec<u8>> = values
                .par_chunks(cols)
                .map(|row| {
                    let mut codes = Vec::with_capacity(cols);
                    let (mut scales, mut mins) = (Vec::new(), Vec::new());
                    for (gi, g) in row.chunks_exact(group).enumerate() {
                        let imp = importance.map(|w| &w[gi * group..(gi + 1) * group]);
                        let (d, m, c) = quantize_group(g, sym, method, imp);
                        scales.push(d);
                        mins.push(m);
                        codes.extend(c);
                    }
                    let mut out = Vec::new();
                    pack_q4(dtype, &codes, &scales, (!sym).then_some(&mins[..]), &mut out);
                    out
                })
                .collect();
            debug_assert_eq!(rows_out.len(), rows);
            rows_out.concat()
        }
        Scheme::Keep => unreachable!("keep is never quantized"),
    }
}

/// One group: codes 0..=15 and the f16 scale (and minimum) they decode with.
pub(crate) fn quantize_group(g: &[f32], sym: bool, method: QuantMethod, importance: Option<&[f32]>) -> QuantGroup {
    let ratios: &[f32] = match method {
        QuantMethod::Rtn | QuantMethod::Gptq => &[1.0],
        QuantMethod::Clip | QuantMethod::Awq => &CLIP_RATIOS,
    };
    let mut best: Option<(f64, QuantGroup)> = None;
    for &r in ratios {
        let candidate = if sym { rtn_sym(g, r) } else { rtn_asym(g, r) };
        if ratios.len() == 1 {
            return candidate;
        }
        let (d, m) = (candidate.0.to_f32(), candidate.1.to_f32());
        let err: f64 = g
            .iter()
            .zip(&candidate.2)
            .enumerate()
            .map(|(k, (w, q))| {
                let e = (w - level(*q, d, m, sym)) as f64;
                importance.map(|i| i[k] as f64).unwrap_or(1.0) * e * e
            })
            .sum();
        if best.as_ref().is_none_or(|(b, _)| err < *b) {
            best = Some((err, candidate));
        }
    }
    best.expect("at least one ratio").1
}

const CLIP_RATIOS: [f32; 21] = [
    1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.825, 0.8, 0.775, 0.75, 0.725, 0.7, 0.675, 0.65, 0.625, 0.6, 0.575,
    0.55, 0.525, 0.5,
];

/// A group's f16 scale and minimum for clipping `ratio`: symmetric, scale = ratio *
/// max|w| / 7 and minimum zero; asymmetric, scale = (max - min) / 15 and minimum = min over
/// the range scaled by `ratio`. Every 4-bit quantizer here starts from this grid.
pub(crate) fn group_grid(g: &[f32], sym: bool, ratio: f32) -> (f16, f16) {
    if sym {
        let amax = g.iter().fold(0.0f32, |m, v| m.max(v.abs())) * ratio;
        (f16::from_f32(amax / 7.0), f16::ZERO)
    } else {
        let mn = g.iter().copied().fold(f32::INFINITY, f32::min) * ratio;
        let mx = g.iter().copied().fold(f32::NEG_INFINITY, f32::max) * ratio;
        (f16::from_f32((mx - mn) / 15.0), f16::from_f32(mn))
    }
}

/// The value code `q` decodes to: (q - 8) * d symmetric, q * d + m asymmetric.
pub(crate) fn level(q: u8, d: f32, m: f32, sym: bool) -> f32 {
    if sym {
        (q as f32 - 8.0) * d
    } else {
        q as f32 * d + m
    }
}

/// Symmetric round to nearest on levels -7..7 (codes q + 8).
fn rtn_sym(g: &[f32], ratio: f32) -> QuantGroup {
    let (d, _) = group_grid(g, true, ratio);
    let inv = if d.to_f32() > 0.0 { 1.0 / d.to_f32() } else { 0.0 };
    let codes = g.iter().map(|w| ((w * inv).round().clamp(-7.0, 7.0) + 8.0) as u8).collect();
    (d, f16::ZERO, codes)
}

/// Asymmetric round to nearest on codes 0..=15.
fn rtn_asym(g: &[f32], ratio: f32) -> QuantGroup {
    let (d, m) = group_grid(g, false, ratio);
    let (df, mf) = (d.to_f32(), m.to_f32());
    let codes = g.iter().map(|w| if df > 0.0 { ((w - mf) / df).round().clamp(0.0, 15.0) as u8 } else { 0 }).collect();
    (d, m, codes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_parse_and_name_round_trip() {
        for s in ["q4g32", "q4g64", "q4g128", "q4g32-sym", "q4g128-sym", "q8", "f16", "f32", "keep"] {
            assert_eq!(Scheme::parse(s).unwrap().name(), s);
        }
        assert!(Scheme::parse("q4g48").is_err());
        assert_eq!(Scheme::parse("q4g32").unwrap().dtype(), Some(DType::Q4_1));
        assert_eq!(Scheme::parse("q4g32-sym").unwrap().dtype(), Some(DType::Q4_0));
    }

    #[test]
    fn asym_rtn_is_exact_on_its_own_grid() {
        // Values on a q4 grid whose group spans codes 0..=15 come back exactly.
        let d = f16::from_f32(0.125).to_f32();
        let m = f16::from_f32(-1.0).to_f32();
        let g: Vec<f32> = (0..32).map(|i| ((i * 5) % 16) as f32 * d + m).collect();
        let bytes = quantize_matrix(&g, 1, 32, Scheme::Q4 { group: 32, sym: false }, QuantMethod::Rtn, None);
        let mut out = vec![0.0; 32];
        slmc_ir::dtype::dequantize_into(DType::Q4_1, &bytes, &mut out);
        assert_eq!(out, g);
    }

    #[test]
    fn sym_uses_levels_minus7_to_7() {
        let g: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) / 4.0).collect();
        let (d, _, codes) = rtn_sym(&g, 1.0);
        assert!((d.to_f32() - 4.0 / 7.0).abs() < 1e-3);
        assert!(codes.iter().all(|c| (1..=15).contains(c)));
    }

    #[test]
    fn clip_search_never_increases_weighted_error() {
        let g: Vec<f32> =
            (0..64).map(|i| ((i * 37 % 64) as f32 / 64.0 - 0.5) * if i == 3 { 8.0 } else { 1.0 }).collect();
        let imp = vec![1.0f32; 64];
        let err = |method| {
            let (d, _, c) = quantize_group(&g, true, method, Some(&imp));
            g.iter().zip(c).map(|(w, q)| ((w - (q as f32 - 8.0) * d.to_f32()) as f64).powi(2)).sum::<f64>()
        };
        assert!(err(QuantMethod::Clip) <= err(QuantMethod::Rtn));
    }
}
