//! Attention in the ONNX model: GroupQueryAttention (contrib ops) with packed QKV where
//! the graph allows, or explicit attention in standard ops; rotary tables and rotation.

use slmc_ir::{KvQuant, Op, RopeStyle};

use super::proto::{self, attr_int, data_type};
use super::*;

impl<'a> Builder<'a> {
    /// GroupQueryAttention's sequence inputs from the attention mask, as onnxruntime-genai
    /// feeds them: `seqlens_k` = sum(mask) - 1, `total_seq_len` = mask width (int32); made
    /// once, before the first GroupQueryAttention node.
    pub(super) fn gqa_sequence_inputs(&mut self) {
        if self.gqa_inputs_made {
            return;
        }
        self.gqa_inputs_made = true;
        let axes = self.inline_i64("axes", &[1], false);
        self.node("ReduceSum", "", &["attention_mask", &axes], &["mask_sum"], vec![attr_int("keepdims", 0)]);
        let one = self.inline_i64("one", &[1], true);
        self.node("Sub", "", &["mask_sum", &one], &["seqlens_k_i64"], vec![]);
        self.node("Cast", "", &["seqlens_k_i64"], &["seqlens_k"], vec![attr_int("to", data_type::INT32 as i64)]);
        self.node("Shape", "", &["attention_mask"], &["mask_shape"], vec![]);
        let idx = self.inline_i64("index", &[1], true);
        self.node("Gather", "", &["mask_shape", &idx], &["total_seq_len_i64"], vec![]);
        let to = attr_int("to", data_type::INT32 as i64);
        self.node("Cast", "", &["total_seq_len_i64"], &["total_seq_len"], vec![to]);
    }

    /// Positions of this step's tokens (`[s]`, int64) and the causal mask `[s, total]`
    /// (true where visible), from the past length of layer 0's cache; made once.
    pub(super) fn positions_and_mask(&mut self) -> (String, String) {
        if self.step_positions.is_none() {
            let one_i = self.inline_i64("one", &[1], true);
            let zero_i = self.inline_i64("zero", &[0], true);
            let idx1 = self.inline_i64("index", &[1], true);
            let idx2 = self.inline_i64("index", &[2], true);
            self.node("Shape", "", &["input_ids"], &["step/ids_shape"], vec![]);
            self.node("Gather", "", &["step/ids_shape", &idx1], &["step/tokens"], vec![]);
            self.node("Shape", "", &["past_key_values.0.key"], &["step/past_shape"], vec![]);
            self.node("Gather", "", &["step/past_shape", &idx2], &["step/past_len"], vec![]);
            self.node("Add", "", &["step/past_len", "step/tokens"], &["step/total_len"], vec![]);
            self.node("Range", "", &["step/past_len", "step/total_len", &one_i], &["step/positions"], vec![]);
            self.node("Range", "", &[&zero_i, "step/total_len", &one_i], &["step/key_positions"], vec![]);
            let ax0 = self.inline_i64("axes", &[0], false);
            let ax1 = self.inline_i64("axes", &[1], false);
            self.node("Unsqueeze", "", &["step/key_positions", &ax0], &["step/key_row"], vec![]);
            self.node("Unsqueeze", "", &["step/positions", &ax1], &["step/query_column"], vec![]);
            self.node("LessOrEqual", "", &["step/key_row", "step/query_column"], &["step/causal_mask"], vec![]);
            self.step_positions = Some(("step/positions".into(), "step/causal_mask".into()));
        }
        self.step_positions.clone().expect("just set")
    }

    /// The causal mask narrowed to a sliding window: query position q sees key position j
    /// when q - j < window (built once per window size).
    fn window_mask(&mut self, causal: &str, window: usize) -> String {
        let name = format!("step/window_mask_{window}");
        if !self.window_masks.insert(window) {
            return name;
        }
        let w = self.inline_i64("window", &[window as i64], true);
        let distance = self.fresh("step/query_key_distance");
        self.node("Sub", "", &["step/query_column", "step/key_row"], &[&distance], vec![]);
        let near = self.fresh("step/within_window");
        self.node("Less", "", &[&distance, &w], &[&near], vec![]);
        self.node("And", "", &[causal, &near], &[&name], vec![]);
        name
    }

    /// Rotary embedding of `x` `[1, s, heads, d]` in standard ops (the first `rotary_dim`
    /// dims; half or interleaved pairs), with cos/sin gathered at the step's positions.
    pub(super) fn rotate(&mut self, x: &str, heads: usize, hd: usize, rotary: &slmc_ir::Rotary, out: &str) {
        if rotary.rotary_dim == 0 {
            self.node("Identity", "", &[x], &[out], vec![]);
            return;
        }
        let (pos, _) = self.positions_and_mask();
        let (cos_t, sin_t) = self.rope_tables(rotary);
        let rd = rotary.rotary_dim;
        let half = rd / 2;
        let interleaved = matches!(rotary.style, RopeStyle::Interleaved);
        let key = format!("{rotary:?}");
        let (cos, sin) = match self.gathered_rope.get(&key) {
            Some(t) => t.clone(),
            None => {
                // [1, s, 1, rd/2] (half) or [1, s, 1, rd/2, 1] (interleaved) to broadcast.
                let shape: Vec<i64> =
                    if interleaved { vec![1, -1, 1, half as i64, 1] } else { vec![1, -1, 1, half as i64] };
                let sh = self.inline_i64("shape", &shape, false);
                let mut names = Vec::new();
                for (table, label) in [(&cos_t, "cos"), (&sin_t, "sin")] {
                    let g = self.fresh(&format!("rope/{label}_rows"));
                    self.node("Gather", "", &[table, &pos], &[&g], vec![]);
                    let r = self.fresh(&format!("rope/{label}"));
                    self.node("Reshape", "", &[&g, &sh], &[&r], vec![]);
                    names.push(r);
                }
                let t = (names[0].clone(), names[1].clone());
                self.gathered_rope.insert(key, t.clone());
                t
            }
        };
        let slice = |b: &mut Self, src: &str, start: i64, end: i64, axis: i64, hint: &str| {
            let st = b.inline_i64("starts", &[start], false);
            let en = b.inline_i64("ends", &[end], false);
            let ax = b.inline_i64("axes", &[axis], false);
            let o = b.fresh(&format!("{out}/{hint}"));
            b.node("Slice", "", &[src, &st, &en, &ax], &[&o], vec![]);
            o
        };
        let (rot_src, axis) = if interleaved {
            let head = slice(self, x, 0, rd as i64, 3, "rotary_part");
            let sh = self.inline_i64("shape", &[0, 0, heads as i64, half as i64, 2], false);
            let pairs = self.fresh(&format!("{out}/pairs"));
            self.node("Reshape", "", &[&head, &sh], &[&pairs], vec![]);
            (pairs, 4)
        } else {
            (x.to_string(), 3)
        };
        let (a, b) = if interleaved {
            (slice(self, &rot_src, 0, 1, axis, "even"), slice(self, &rot_src, 1, 2, axis, "odd"))
        } else {
            (
                slice(self, &rot_src, 0, half as i64, axis, "first"),
                slice(self, &rot_src, half as i64, rd as i64, axis, "second"),
            )
        };
        let mul = |bl: &mut Self, p: &str, q: &str, hint: &str| {
            let o = bl.fresh(&format!("{out}/{hint}"));
            bl.node("Mul", "", &[p, q], &[&o], vec![]);
            o
        };
        let (ac, bs, bc, as_) = (
            mul(self, &a, &cos, "a_cos"),
            mul(self, &b, &sin, "b_sin"),
            mul(self, &b, &cos, "b_cos"),
            mul(self, &a, &sin, "a_sin"),
        );
        let (ra, rb) = (self.fresh(&format!("{out}/rot_a")), self.fresh(&format!("{out}/rot_b")));
        self.node("Sub", "", &[&ac, &bs], &[&ra], vec![]);
        self.node("Add", "", &[&bc, &as_], &[&rb], vec![]);
        let mut parts = Vec::new();
        if interleaved {
            let joined = self.fresh(&format!("{out}/joined"));
            self.node("Concat", "", &[&ra, &rb], &[&joined], vec![attr_int("axis", 4)]);
            let sh = self.inline_i64("shape", &[0, 0, heads as i64, rd as i64], false);
            let flat = self.fresh(&format!("{out}/rotated"));
            self.node("Reshape", "", &[&joined, &sh], &[&flat], vec![]);
            parts.push(flat);
        } else {
            parts.push(ra);
            parts.push(rb);
        }
        if rd < hd {
            parts.push(slice(self, x, rd as i64, hd as i64, 3, "pass_through"));
        }
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        self.node("Concat", "", &refs, &[out], vec![attr_int("axis", 3)]);
    }

    /// Causal grouped-query attention in standard ops over the cache: rotary on q and k,
    /// `present = concat(past, new)` in [1, heads, positions, d], then per kv head the
    /// `group` query heads' rows at once: softmax(q k^T * scale, masked) v.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn explicit_attention(
        &mut self,
        q: &str,
        k: &str,
        v: &str,
        (hq, hk, hd): (usize, usize, usize),
        (scale, limits): (f32, slmc_ir::AttnLimits),
        rotary: &slmc_ir::Rotary,
        io: AttentionIo,
    ) {
        let out = io.out.clone();
        let (_, mut mask) = self.positions_and_mask();
        if let Some(w) = limits.window {
            mask = self.window_mask(&mask, w);
        }
        let (q_rot, k_rot) = (self.fresh(&format!("{out}/q_rot")), self.fresh(&format!("{out}/k_rot")));
        self.rotate(q, hq, hd, rotary, &q_rot);
        self.rotate(k, hk, hd, rotary, &k_rot);
        let bnsh = [0i64, 2, 1, 3];
        let (k_t, v_t, q_t) = (
            self.fresh(&format!("{out}/k_bnsh")),
            self.fresh(&format!("{out}/v_bnsh")),
            self.fresh(&format!("{out}/q_bnsh")),
        );
        self.node("Transpose", "", &[&k_rot], &[&k_t], vec![proto::attr_ints("perm", &bnsh)]);
        self.node("Transpose", "", &[v], &[&v_t], vec![proto::attr_ints("perm", &bnsh)]);
        self.node("Transpose", "", &[&q_rot], &[&q_t], vec![proto::attr_ints("perm", &bnsh)]);
        self.node("Concat", "", &[&io.past_k, &k_t], &[&io.present_k], vec![attr_int("axis", 2)]);
        self.node("Concat", "", &[&io.past_v, &v_t], &[&io.present_v], vec![attr_int("axis", 2)]);
        let group = hq / hk;
        // Query head h uses kv head h / group: [1, hq, s, d] -> [1, hk, group * s, d].
        let sh = self.inline_i64("shape", &[1, hk as i64, -1, hd as i64], false);
        let q_g = self.fresh(&format!("{out}/q_grouped"));
        self.node("Reshape", "", &[&q_t, &sh], &[&q_g], vec![]);
        let k_tt = self.fresh(&format!("{out}/k_transposed"));
        self.node("Transpose", "", &[&io.present_k], &[&k_tt], vec![proto::attr_ints("perm", &[0, 1, 3, 2])]);
        let scores = self.fresh(&format!("{out}/scores"));
        self.node("MatMul", "", &[&q_g, &k_tt], &[&scores], vec![]);
        let sc = self.inline_f32("scale", scale);
        let mut scaled = self.fresh(&format!("{out}/scaled"));
        self.node("Mul", "", &[&scores, &sc], &[&scaled], vec![]);
        if let Some(cap) = limits.softcap {
            let capped = self.fresh(&format!("{out}/capped"));
            self.softcap(&scaled, cap, &capped);
            scaled = capped;
        }
        let rows = match self.tiled_masks.get(&(group, limits.window)) {
            Some(m) => m.clone(),
            None => {
                let reps = self.inline_i64("repeats", &[group as i64, 1], false);
                let m = self.fresh("step/causal_mask_tiled");
                self.node("Tile", "", &[&mask, &reps], &[&m], vec![]);
                self.tiled_masks.insert((group, limits.window), m.clone());
                m
            }
        };
        let neg = self.inline_f32("masked", f32::NEG_INFINITY);
        let masked = self.fresh(&format!("{out}/masked"));
        self.node("Where", "", &[&rows, &scaled, &neg], &[&masked], vec![]);
        let probs = self.fresh(&format!("{out}/probs"));
        self.node("Softmax", "", &[&masked], &[&probs], vec![attr_int("axis", -1)]);
        let ctx = self.fresh(&format!("{out}/context"));
        self.node("MatMul", "", &[&probs, &io.present_v], &[&ctx], vec![]);
        let sh = self.inline_i64("shape", &[1, hq as i64, -1, hd as i64], false);
        let heads = self.fresh(&format!("{out}/heads"));
        self.node("Reshape", "", &[&ctx, &sh], &[&heads], vec![]);
        self.node("Transpose", "", &[&heads], &[&out], vec![proto::attr_ints("perm", &bnsh)]);
    }

    pub(super) fn rope_tables(&mut self, rotary: &slmc_ir::Rotary) -> (String, String) {
        let key = format!("{rotary:?}");
        if let Some(t) = self.rope_tables.get(&key) {
            return t.clone();
        }
        // cos/sin [context, rotary_dim / 2] in f32, computed as the interpreter does.
        let ctx = self.opts.context_len;
        let (cos, sin) = rotary.tables(ctx);
        let half = rotary.rotary_dim / 2;
        let (cos, sin): (Vec<u8>, Vec<u8>) =
            (cos.iter().flat_map(|v| v.to_le_bytes()).collect(), sin.iter().flat_map(|v| v.to_le_bytes()).collect());
        let i = self.rope_tables.len();
        let names = (format!("rope.{i}.cos"), format!("rope.{i}.sin"));
        let dims = [ctx as i64, half as i64];
        self.external(&names.0, data_type::FLOAT, &dims, &cos);
        self.external(&names.1, data_type::FLOAT, &dims, &sin);
        self.rope_tables.insert(key, names.clone());
        names
    }

    /// Finds gqa nodes whose q, k, v are `reshape(slice(x))` of one packed projection `x`
    /// in q, k, v order with nothing else reading the slices, and whose head shapes suit
    /// GroupQueryAttention: their slices and reshapes are skipped and GQA reads `x` packed.
    /// A gqa read only by a reshape to `[s, hq * d]` hands that reshape its flat output.
    pub(super) fn find_packed_attention(&mut self) {
        let g = self.graph;
        for (id, node) in g.nodes() {
            if !matches!(node.op, Op::Gqa { quant: KvQuant::F32, .. }) {
                continue;
            }
            let qd = dims_of(g, node.inputs[0]);
            let kd = dims_of(g, node.inputs[1]);
            let (Some(hq), Some(hk), Some(hd)) = (qd[1], kd[1], qd[2]) else { continue };
            let Op::Gqa { rotary, .. } = &node.op else { continue };
            if !gqa_kernel_accepts(hd, rotary) {
                continue;
            }
            let mut chain = Vec::new();
            let mut source = None;
            let mut expected_start = 0i64;
            for (i, heads) in [(0usize, hq), (1, hk), (2, hk)] {
                let r = node.inputs[i];
                let ok = (|| {
                    let rn = g.node(r);
                    if !matches!(rn.op, Op::Reshape { .. }) || g.users(r) != vec![id] {
                        return None;
                    }
                    let sl = rn.inputs[0];
                    let Op::Slice { axis: 1, start, end } = g.node(sl).op else { return None };
                    if g.users(sl) != vec![r] || start != expected_start || end != start + (heads * hd) as i64 {
                        return None;
                    }
                    let x = g.node(sl).inputs[0];
                    if source.is_some_and(|s| s != x) {
                        return None;
                    }
                    Some((sl, x, end))
                })();
                let Some((sl, x, end)) = ok else {
                    chain.clear();
                    break;
                };
                source = Some(x);
                expected_start = end;
                chain.extend([r, sl]);
            }
            let Some(x) = source else { continue };
            if chain.len() != 6 || dims_of(g, x).get(1).copied().flatten() != Some((hq + 2 * hk) * hd) {
                continue;
            }
            self.skipped.extend(chain);
            self.packed_qkv.insert(id, x);
        }
    }
}

/// Whether ONNX Runtime's CPU GroupQueryAttention kernel takes these shapes: head sizes a
/// multiple of 16, and rotary tables (rotary_dim / 2 columns) a multiple of 8 (a partial
/// rotary of 8 dims, as in the StableLM 2 fixture, is refused at run time). Other shapes
/// use the standard-ops attention.
pub(super) fn gqa_kernel_accepts(head_dim: usize, rotary: &slmc_ir::Rotary) -> bool {
    head_dim % 16 == 0 && (rotary.rotary_dim / 2) % 8 == 0
}
