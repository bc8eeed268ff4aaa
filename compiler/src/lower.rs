//! Lowering: a model's configuration and weight store into slmc's graph IR.
//!
//! One function covers the llama family (SmolLM, TinyLlama, MobileLLM), Qwen2 (q/k/v
//! biases), Phi-3 (fused qkv and gate/up, split with `slice`), Qwen3 (per-head q/k norms),
//! Gemma 2/3 (scaled embeddings, four norms per block, GeGLU, sliding-window layers with
//! their own RoPE base, soft caps), StableLM 2 (LayerNorm with bias, partial rotary) and
//! OLMo 2 (norms after attention and the MLP only, q/k norms over the whole projection).
//! Every weight the graph names is checked against the store: a tensor whose shape
//! contradicts the config is an error naming the file and the tensor.

use slmc_ir::{AttnLimits, DType, Dim, Graph, KvKind, KvQuant, NodeId, Op, TensorType};

use crate::import::config::{Activation, NormKind, Role};
use crate::import::{Arch, ImportError, Model};

struct Lowering<'m> {
    model: &'m Model,
    graph: Graph,
}

impl Lowering<'_> {
    fn err(&self, message: String) -> ImportError {
        ImportError::file(&self.model.path, message)
    }

    /// The weight node for `role` in stored block `block`, checked against `shape`.
    fn weight(&mut self, role: Role, block: usize, value: &str, shape: &[usize]) -> Result<NodeId, ImportError> {
        let name = self.model.config.weight_name(role, block);
        self.named_weight(&name, value, shape)
    }

    fn named_weight(&mut self, name: &str, value: &str, shape: &[usize]) -> Result<NodeId, ImportError> {
        let store = &self.model.weights;
        let t = store.get(name).ok_or_else(|| self.err(format!("missing tensor `{name}`")))?;
        if t.shape != shape {
            let source = match self.model.format {
                crate::import::Format::Gguf => "the GGUF metadata",
                crate::import::Format::HuggingFace => "config.json",
            };
            return Err(ImportError::file(
                store.file_of(t),
                format!("tensor `{name}` has shape {:?} but {source} implies {shape:?}", t.shape),
            ));
        }
        if t.dtype.is_quantized() && shape.len() != 2 {
            return Err(ImportError::file(
                store.file_of(t),
                format!("tensor `{name}`: quantized {} is only supported for matrices", t.dtype),
            ));
        }
        let ty = TensorType::new(t.dtype, shape.iter().map(|d| Dim::from(*d)).collect());
        self.graph.weight(value, name, ty).map_err(|m| self.err(m))
    }

    fn has(&self, role: Role, block: usize) -> bool {
        self.model.weights.get(&self.model.config.weight_name(role, block)).is_some()
    }

    fn push(&mut self, name: &str, op: Op, inputs: &[NodeId]) -> Result<NodeId, ImportError> {
        self.graph.push(name, op, inputs).map_err(|m| self.err(format!("lowering produced an ill-typed graph: {m}")))
    }

    /// The family's norm of `x` with the weight of `role` (and, for LayerNorm, its bias).
    fn norm(&mut self, name: &str, x: NodeId, role: Role, block: usize) -> Result<NodeId, ImportError> {
        let cfg = &self.model.config;
        let (d, eps, kind) = (cfg.hidden_size, cfg.rms_norm_eps, cfg.arch.norm_kind());
        let value = |suffix: &str| match role {
            Role::FinalNorm => format!("final_norm{suffix}.w"),
            _ => format!("blk{block}.{}{suffix}.w", name.rsplit('.').next().unwrap_or(name)),
        };
        let w = self.weight(role, block, &value(""), &[d])?;
        match (kind, role.norm_bias()) {
            (NormKind::LayerNorm, Some(bias)) => {
                let b = self.weight(bias, block, &value("_bias"), &[d])?;
                self.push(name, Op::LayerNorm { eps }, &[x, w, b])
            }
            (NormKind::LayerNorm, None) => Err(self.err(format!("no LayerNorm bias for the {role:?} norm"))),
            (NormKind::Rms, _) => self.push(name, Op::RmsNorm { eps }, &[x, w]),
        }
    }

    /// RMSNorm of the queries and keys with `q_norm`/`k_norm` weights of `widths` values (a
    /// head, or the whole projection).
    fn qk_norm(
        &mut self,
        (q, k): (NodeId, NodeId),
        widths: (usize, usize),
        (l, b): (&str, usize),
    ) -> Result<(NodeId, NodeId), ImportError> {
        let eps = self.model.config.rms_norm_eps;
        let qn = self.weight(Role::QNorm, b, &format!("blk{b}.q_norm.w"), &[widths.0])?;
        let kn = self.weight(Role::KNorm, b, &format!("blk{b}.k_norm.w"), &[widths.1])?;
        Ok((
            self.push(&format!("{l}.q_norm"), Op::RmsNorm { eps }, &[q, qn])?,
            self.push(&format!("{l}.k_norm"), Op::RmsNorm { eps }, &[k, kn])?,
        ))
    }
}

/// Lowers a model to a verified graph with input `tokens: i32[s]` and output
/// `logits: f32[s, vocab]`.
pub fn lower(model: &Model) -> Result<Graph, ImportError> {
    let cfg = &model.config;
    let name = model.path.file_stem().and_then(|s| s.to_str()).unwrap_or("model").to_string();
    let mut lw = Lowering { model, graph: Graph::new(&name) };
    let (d, v, ff) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let (hq, hk, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let s = Dim::sym("s");

    let tokens = lw
        .graph
        .add("tokens", Op::Input { name: "tokens".into() }, &[], TensorType::new(DType::I32, vec![s.clone()]))
        .map_err(|m| lw.err(m))?;
    let pos = lw.push("positions", Op::Positions, &[tokens])?;
    let embed_w = lw.weight(Role::Embed, 0, "embed.w", &[v, d])?;
    let mut h = lw.push("embed", Op::Embed, &[embed_w, tokens])?;
    if let Some(factor) = cfg.embed_scale {
        h = lw.push("embed_scaled", Op::Scale { factor }, &[h])?;
    }
    let heads = |n: usize| Op::Reshape { shape: vec![s.clone(), Dim::from(n), Dim::from(hd)] };

    for layer in 0..cfg.num_layers() {
        // With block sharing, consecutive layers run the same stored block: the graph
        // names the same weights again, and the weight nodes are shared, not copied.
        let b = layer / cfg.block_repeat;
        let l = format!("l{layer}");
        let w = |role: &str| format!("blk{b}.{role}.w");

        let place = cfg.arch.norm_placement();
        let x = if place.before() { lw.norm(&format!("{l}.attn_norm"), h, Role::AttnNorm, b)? } else { h };
        let (q, k, val) = if cfg.arch == Arch::Phi3 {
            let qkv_w = lw.weight(Role::Qkv, b, &w("qkv"), &[(hq + 2 * hk) * hd, d])?;
            let qkv = lw.push(&format!("{l}.qkv"), Op::Linear, &[x, qkv_w])?;
            let (nq, nk) = ((hq * hd) as i64, (hk * hd) as i64);
            let q = lw.push(&format!("{l}.q"), Op::Slice { axis: 1, start: 0, end: nq }, &[qkv])?;
            let k = lw.push(&format!("{l}.k"), Op::Slice { axis: 1, start: nq, end: nq + nk }, &[qkv])?;
            let v = lw.push(&format!("{l}.v"), Op::Slice { axis: 1, start: nq + nk, end: nq + 2 * nk }, &[qkv])?;
            (q, k, v)
        } else {
            let mut proj = |role: Role, bias: Role, short: &str, n: usize| -> Result<NodeId, ImportError> {
                let wt = lw.weight(role, b, &w(short), &[n * hd, d])?;
                let mut y = lw.push(&format!("{l}.{short}"), Op::Linear, &[x, wt])?;
                if cfg.attention_bias || lw.has(bias, b) {
                    let bw = lw.weight(bias, b, &format!("blk{b}.{short}_bias.w"), &[n * hd])?;
                    y = lw.push(&format!("{l}.{short}_biased"), Op::Add, &[y, bw])?;
                }
                Ok(y)
            };
            (
                proj(Role::Q, Role::QBias, "q", hq)?,
                proj(Role::K, Role::KBias, "k", hk)?,
                proj(Role::V, Role::VBias, "v", hk)?,
            )
        };
        // q/k norms: OLMo 2's over each token's whole projection, before the split into
        // heads; Qwen3's and Gemma 3's over each head's hd values, after it.
        let over_projection = cfg.arch.qk_norm_over_projection();
        let (q, k) = if over_projection { lw.qk_norm((q, k), (hq * hd, hk * hd), (&l, b))? } else { (q, k) };
        let q = lw.push(&format!("{l}.q_heads"), heads(hq), &[q])?;
        let k = lw.push(&format!("{l}.k_heads"), heads(hk), &[k])?;
        let (q, k) =
            if cfg.arch.has_qk_norm() && !over_projection { lw.qk_norm((q, k), (hd, hd), (&l, b))? } else { (q, k) };
        let val = lw.push(&format!("{l}.v_heads"), heads(hk), &[val])?;
        let sliding = cfg.is_sliding(layer);
        let theta = if sliding { cfg.rope_theta_local.unwrap_or(cfg.rope_theta) } else { cfg.rope_theta };
        let (rotary_dim, scaling) = match cfg.uses_rope(layer) {
            true => (cfg.rotary_dim, cfg.rope_scaling.clone()),
            false => (0, slmc_ir::RopeScaling::None),
        };
        let rope = Op::Rope { theta, rotary_dim, style: cfg.rope_style, scaling };
        let q = lw.push(&format!("{l}.q_rope"), rope.clone(), &[q, pos])?;
        let k = lw.push(&format!("{l}.k_rope"), rope.clone(), &[k, pos])?;
        let k_all =
            lw.push(&format!("{l}.k_cache"), Op::KvAppend { layer, kind: KvKind::Key, quant: KvQuant::F32 }, &[k])?;
        let v_all =
            lw.push(&format!("{l}.v_cache"), Op::KvAppend { layer, kind: KvKind::Value, quant: KvQuant::F32 }, &[val])?;
        let limits = AttnLimits { window: cfg.sliding_window.filter(|_| sliding), softcap: cfg.attn_softcap };
        let att = lw.push(&format!("{l}.attn"), Op::Attention { scale: cfg.attn_scale, limits }, &[q, k_all, v_all])?;
        let att =
            lw.push(&format!("{l}.attn_flat"), Op::Reshape { shape: vec![s.clone(), Dim::from(hq * hd)] }, &[att])?;
        let o_w = lw.weight(Role::O, b, &w("o"), &[d, hq * hd])?;
        let mut o = lw.push(&format!("{l}.attn_out"), Op::Linear, &[att, o_w])?;
        if place.after() {
            o = lw.norm(&format!("{l}.post_attn_norm"), o, Role::PostAttnNorm, b)?;
        }
        h = lw.push(&format!("{l}.attn_residual"), Op::Add, &[h, o])?;

        let x = if place.before() { lw.norm(&format!("{l}.ffn_norm"), h, Role::FfnNorm, b)? } else { h };
        let (gate, up) = if cfg.arch == Arch::Phi3 {
            let gu_w = lw.weight(Role::GateUp, b, &w("gate_up"), &[2 * ff, d])?;
            let gu = lw.push(&format!("{l}.gate_up"), Op::Linear, &[x, gu_w])?;
            let gate = lw.push(&format!("{l}.gate"), Op::Slice { axis: 1, start: 0, end: ff as i64 }, &[gu])?;
            let up = lw.push(&format!("{l}.up"), Op::Slice { axis: 1, start: ff as i64, end: 2 * ff as i64 }, &[gu])?;
            (gate, up)
        } else {
            let g_w = lw.weight(Role::Gate, b, &w("gate"), &[ff, d])?;
            let u_w = lw.weight(Role::Up, b, &w("up"), &[ff, d])?;
            (lw.push(&format!("{l}.gate"), Op::Linear, &[x, g_w])?, lw.push(&format!("{l}.up"), Op::Linear, &[x, u_w])?)
        };
        let m = match cfg.activation {
            Activation::Silu => {
                let act = lw.push(&format!("{l}.gate_silu"), Op::Silu, &[gate])?;
                lw.push(&format!("{l}.swiglu"), Op::Mul, &[act, up])?
            }
            Activation::GeluTanh => {
                let act = lw.push(&format!("{l}.gate_gelu"), Op::GeluTanh, &[gate])?;
                lw.push(&format!("{l}.geglu"), Op::Mul, &[act, up])?
            }
        };
        let down_w = lw.weight(Role::Down, b, &w("down"), &[d, ff])?;
        let mut down = lw.push(&format!("{l}.ffn_out"), Op::Linear, &[m, down_w])?;
        if place.after() {
            down = lw.norm(&format!("{l}.post_ffn_norm"), down, Role::PostFfnNorm, b)?;
        }
        h = lw.push(&format!("{l}.ffn_residual"), Op::Add, &[h, down])?;
    }

    let x = lw.norm("final_norm", h, Role::FinalNorm, 0)?;
    // Tied embeddings: the LM head is the embedding table's node itself.
    let head = if cfg.tie_word_embeddings || !lw.has(Role::LmHead, 0) {
        embed_w
    } else {
        lw.weight(Role::LmHead, 0, "lm_head.w", &[v, d])?
    };
    let logits = match cfg.final_softcap {
        Some(cap) => {
            let raw = lw.push("lm_head", Op::Linear, &[x, head])?;
            lw.push("logits", Op::Softcap { cap }, &[raw])?
        }
        None => lw.push("logits", Op::Linear, &[x, head])?,
    };
    lw.graph.set_output("logits", logits);
    slmc_ir::verify(&lw.graph).map_err(|e| lw.err(format!("lowering produced an invalid graph: {e}")))?;
    Ok(lw.graph)
}
