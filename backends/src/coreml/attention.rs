//! Attention in the ML program: rotary tables and rotation, the KV cache (state on
//! iOS 18, inputs/outputs on iOS 17), masks, and grouped-query attention.

use slmc_ir::{NodeId, RopeStyle};
use slmc_targets::coreml::{RING_MASK_PREFIX, RING_SLOT_PREFIX, WINDOW_MASK_PREFIX};

use super::mil::{self, Arg, Dt, MilOp, Var};
use super::*;

/// Which additive mask a layer reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum MaskKind {
    Causal,
    /// A window over a cache of the whole context.
    Window(usize),
    /// A window over a ring cache.
    Ring(usize),
}

impl<'a> Emitter<'a> {
    /// The slots of a sliding layer's ring cache, when smaller than the context.
    ///
    /// iOS 17: the host keeps positions before the step, p in slot p % slots, and the
    /// step's own keys come with it. A step near the end of the context starts up to T - 1
    /// positions early and feeds cached tokens again (see the host), and those rows need
    /// their own windows, so the ring holds w + T - 1 positions (w alone lost them:
    /// measured by the differential harness and tests/coreml.rs at the context's end).
    ///
    /// iOS 18: the step's T rows are written into the state before attention reads them,
    /// in one contiguous slice from slot start % (w + T - 1), so the state has that many
    /// slots plus T for a slice that runs past the end. Any slot is overwritten only by a
    /// position at least w + T - 1 later, and steps near the end all start at context - T,
    /// so no query ever needs a position its ring has lost.
    pub(super) fn ring_slots(&self, window: usize) -> Option<usize> {
        let (t, c) = (self.t(), self.opts.context_len);
        let (ring, width) = match self.opts.deployment {
            Deployment::Ios17 => (window + t - 1, window + t - 1),
            Deployment::Ios18 => (window + t - 1, window + 2 * t - 1),
        };
        (width < c).then_some(ring)
    }

    /// cos and sin at the step's positions, `[T, 1, r/2]` (half style) or `[T, 1, r/2, 1]`.
    pub(super) fn rope_tables(&mut self, rotary: &slmc_ir::Rotary) -> (Var, Var) {
        let key = format!("{rotary:?}");
        if let Some(t) = self.rope.get(&key) {
            return t.clone();
        }
        let ctx = self.opts.context_len;
        let (cos, sin) = rotary.tables(ctx);
        let i = self.rope.len();
        let half = rotary.rotary_dim / 2;
        let t = self.t();
        let shape: Vec<usize> =
            if matches!(rotary.style, RopeStyle::Half) { vec![t, 1, half] } else { vec![t, 1, half, 1] };
        let mut out = Vec::new();
        for (what, table) in [("cos", cos), ("sin", sin)] {
            let c = self.b.const_f16(&format!("rope{i}_{what}_table"), &[ctx, half], &table);
            let ids = self.position_ids.clone();
            let inputs =
                vec![("x", Arg::Var(&c)), ("indices", Arg::Var(&ids)), ("axis", Arg::Value(mil::i32_value(&[], &[0])))];
            let g = self.b.op(MilOp::Gather, &format!("rope{i}_{what}"), inputs, Dt::F16, &[t, half]);
            out.push(self.reshape(&format!("rope{i}_{what}_b"), &g, &shape));
        }
        let pair = (out[0].clone(), out[1].clone());
        self.rope.insert(key, pair.clone());
        pair
    }

    /// Rotary embedding of `x [T, h, d]` on its first `rotary_dim` dims.
    pub(super) fn rotate(&mut self, hint: &str, x: &Var, rotary: &slmc_ir::Rotary) -> Var {
        if rotary.rotary_dim == 0 {
            return x.clone();
        }
        let (cos, sin) = self.rope_tables(rotary);
        let [t, h, d] = x.shape[..] else { unreachable!("attention operands are [T, heads, dim]") };
        let r = rotary.rotary_dim;
        let xr = if r < d { self.slice(&format!("{hint}_rot_in"), x, 2, 0, r) } else { x.clone() };
        let rotated = match rotary.style {
            RopeStyle::Half => {
                let x1 = self.slice(&format!("{hint}_x1"), &xr, 2, 0, r / 2);
                let x2 = self.slice(&format!("{hint}_x2"), &xr, 2, r / 2, r);
                let a = self.binary(MilOp::Mul, &format!("{hint}_x1c"), &x1, &cos);
                let b = self.binary(MilOp::Mul, &format!("{hint}_x2s"), &x2, &sin);
                let o1 = self.binary(MilOp::Sub, &format!("{hint}_o1"), &a, &b);
                let c = self.binary(MilOp::Mul, &format!("{hint}_x2c"), &x2, &cos);
                let e = self.binary(MilOp::Mul, &format!("{hint}_x1s"), &x1, &sin);
                let o2 = self.binary(MilOp::Add, &format!("{hint}_o2"), &c, &e);
                self.concat(&format!("{hint}_rot"), &[&o1, &o2], 2)
            }
            RopeStyle::Interleaved => {
                let pairs = self.reshape(&format!("{hint}_pairs"), &xr, &[t, h, r / 2, 2]);
                let xe = self.slice(&format!("{hint}_even"), &pairs, 3, 0, 1);
                let xo = self.slice(&format!("{hint}_odd"), &pairs, 3, 1, 2);
                let a = self.binary(MilOp::Mul, &format!("{hint}_ec"), &xe, &cos);
                let b = self.binary(MilOp::Mul, &format!("{hint}_os"), &xo, &sin);
                let oe = self.binary(MilOp::Sub, &format!("{hint}_oe"), &a, &b);
                let c = self.binary(MilOp::Mul, &format!("{hint}_oc"), &xo, &cos);
                let e = self.binary(MilOp::Mul, &format!("{hint}_es"), &xe, &sin);
                let oo = self.binary(MilOp::Add, &format!("{hint}_oo"), &c, &e);
                let cat = self.concat(&format!("{hint}_pairs_rot"), &[&oe, &oo], 3);
                self.reshape(&format!("{hint}_rot"), &cat, &[t, h, r])
            }
        };
        if r < d {
            let rest = self.slice(&format!("{hint}_pass"), x, 2, r, d);
            self.concat(hint, &[&rotated, &rest], 2)
        } else {
            rotated
        }
    }

    /// A KV-cache function input: fp16 model state (iOS 18) or a plain tensor (iOS 17).
    pub(super) fn cache_input(&mut self, name: &str, shape: &[usize], state: bool) -> Var {
        self.b.reserve(name);
        let ty = if state { mil::state_type(Dt::F16, shape) } else { mil::tensor_type(Dt::F16, shape) };
        self.extra_inputs.push(proto::NamedValueType { name: name.into(), r#type: Some(ty) });
        Var { name: name.into(), dt: Dt::F16, shape: shape.to_vec() }
    }

    /// `x @ y` (or `x @ y^T`) over equal leading dimensions, fp16.
    pub(super) fn matmul(&mut self, hint: &str, x: &Var, y: &Var, transpose_y: bool) -> Var {
        let r = x.shape.len();
        let mut shape = x.shape.clone();
        shape[r - 1] = if transpose_y { y.shape[r - 2] } else { y.shape[r - 1] };
        let inputs = vec![
            ("x", Arg::Var(x)),
            ("y", Arg::Var(y)),
            ("transpose_x", Arg::Value(mil::bool_value(&[], &[false]))),
            ("transpose_y", Arg::Value(mil::bool_value(&[], &[transpose_y]))),
        ];
        self.b.op(MilOp::Matmul, hint, inputs, Dt::F16, &shape)
    }

    /// The additive mask for `group` query heads per key head: causal, causal within a
    /// sliding window over the whole cache (an input `window_mask_<w>` the host builds like
    /// `causal_mask`), or over a ring (`ring_mask_<w>`, by the slots' positions).
    pub(super) fn tiled_mask(&mut self, group: usize, kind: MaskKind) -> Var {
        if let Some(m) = self.tiled_masks.get(&(group, kind)) {
            return m.clone();
        }
        let mask = match kind {
            MaskKind::Causal => self.causal_mask.clone(),
            MaskKind::Window(w) => self
                .window_masks
                .entry(w)
                .or_insert_with(|| {
                    let name = format!("{WINDOW_MASK_PREFIX}{w}");
                    self.b.reserve(&name);
                    Var { name, dt: Dt::F16, shape: self.causal_mask.shape.clone() }
                })
                .clone(),
            MaskKind::Ring(w) => self.ring_inputs(w).0,
        };
        let m = if group == 1 {
            mask
        } else {
            let mut shape = mask.shape.clone();
            shape[2] *= group;
            let reps = mil::i32_value(&[4], &[1, 1, group as i32, 1]);
            self.b.op(
                MilOp::Tile,
                &format!("{}_x{group}", mask.name),
                vec![("x", Arg::Var(&mask)), ("reps", Arg::Value(reps))],
                Dt::F16,
                &shape,
            )
        };
        self.tiled_masks.insert((group, kind), m.clone());
        m
    }

    /// A ring's mask input `[1, 1, T, slots + T]` and, on iOS 18, its write-slot input.
    fn ring_inputs(&mut self, window: usize) -> (Var, Option<Var>) {
        if let Some(r) = self.ring_inputs.get(&window) {
            return r.clone();
        }
        let (t, ring) = (self.t(), self.ring_slots(window).expect("a ring layer"));
        let name = format!("{RING_MASK_PREFIX}{window}");
        self.b.reserve(&name);
        let mask = Var { name, dt: Dt::F16, shape: vec![1, 1, t, ring + t] };
        let slot = (self.opts.deployment == Deployment::Ios18).then(|| {
            let name = format!("{RING_SLOT_PREFIX}{window}");
            self.b.reserve(&name);
            Var { name, dt: Dt::I32, shape: vec![1] }
        });
        self.ring_inputs.insert(window, (mask.clone(), slot.clone()));
        (mask, slot)
    }

    /// Where an iOS 18 ring's step goes: `[0, 0, slot, 0]` to `[1, hk, slot + T, d]`.
    fn ring_write(&mut self, window: usize, hk: usize, d: usize) -> (Var, Var) {
        if let Some(w) = self.ring_writes.get(&(window, hk, d)) {
            return w.clone();
        }
        let slot = self.ring_inputs(window).1.expect("iOS 18 rings have a write slot");
        let zeros2 = self.b.const_i32(&format!("ring{window}_zeros2_{hk}_{d}"), &[2], &[0, 0]);
        let zero1 = self.b.const_i32(&format!("ring{window}_zero1_{hk}_{d}"), &[1], &[0]);
        let begin = self.concat(&format!("ring{window}_write_begin_{hk}_{d}"), &[&zeros2, &slot, &zero1], 0);
        let extent = self.b.const_i32(
            &format!("ring{window}_write_extent_{hk}_{d}"),
            &[4],
            &[1, hk as i32, self.t() as i32, d as i32],
        );
        let end = self.binary(MilOp::Add, &format!("ring{window}_write_end_{hk}_{d}"), &begin, &extent);
        self.ring_writes.insert((window, hk, d), (begin.clone(), end.clone()));
        (begin, end)
    }

    /// `[0, 0, p, 0]` and `[1, hk, p + T, d]`: where this step's keys and values go.
    pub(super) fn cache_window(&mut self, hk: usize, d: usize) -> (Var, Var) {
        if self.write_begin.is_none() {
            let pos = self.position_ids.clone();
            let p0 = self.slice("step_start", &pos, 0, 0, 1);
            let zeros2 = self.b.const_i32("zeros2", &[2], &[0, 0]);
            let zero1 = self.b.const_i32("zero1", &[1], &[0]);
            self.write_begin = Some(self.concat("cache_write_begin", &[&zeros2, &p0, &zero1], 0));
        }
        let begin = self.write_begin.clone().unwrap();
        if let Some(e) = self.write_ends.get(&(hk, d)) {
            return (begin, e.clone());
        }
        let extent = self.b.const_i32("cache_write_extent", &[4], &[1, hk as i32, self.t() as i32, d as i32]);
        let end = self.binary(MilOp::Add, "cache_write_end", &begin, &extent);
        self.write_ends.insert((hk, d), end.clone());
        (begin, end)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention(
        &mut self,
        id: NodeId,
        layer: usize,
        (scale, limits): (f32, slmc_ir::AttnLimits),
        rotary: &slmc_ir::Rotary,
        (q, k, v): (Var, Var, Var),
        (hq, hk, d): (usize, usize, usize),
    ) -> Result<Var, CoremlError> {
        let t = self.t();
        let c = self.opts.context_len;
        if hq % hk != 0 {
            return Err(self.err(id, format!("{hq} query heads are not a multiple of {hk} key/value heads")));
        }
        let g = hq / hk;
        let l = format!("l{layer}");
        let qr = self.rotate(&format!("{l}_q_rope"), &q, rotary);
        let kr = self.rotate(&format!("{l}_k_rope"), &k, rotary);
        let qt = self.transpose(&format!("{l}_q_heads"), &qr, &[1, 0, 2]);
        // Query heads of one key/value head are adjacent: [hq, T, d] = [hk, g * T, d].
        let mut q4 = self.reshape(&format!("{l}_q_groups"), &qt, &[1, hk, g * t, d]);
        let kt = self.transpose(&format!("{l}_k_heads"), &kr, &[1, 0, 2]);
        let vt = self.transpose(&format!("{l}_v_heads"), &v, &[1, 0, 2]);
        // A window at least the context never hides a key: plain causal attention, exactly.
        let window = limits.window.filter(|w| *w < c);
        let ring = window.and_then(|w| self.ring_slots(w).map(|slots| (w, slots)));
        let kind = match (ring, window) {
            (Some((w, _)), _) => MaskKind::Ring(w),
            (None, Some(w)) => MaskKind::Window(w),
            (None, None) => MaskKind::Causal,
        };
        let mask = self.tiled_mask(g, kind);
        let attended = match self.opts.deployment {
            Deployment::Ios18 => {
                let k4 = self.reshape(&format!("{l}_k_new"), &kt, &[1, hk, t, d]);
                let v4 = self.reshape(&format!("{l}_v_new"), &vt, &[1, hk, t, d]);
                let (slots, (begin, end)) = match ring {
                    Some((w, r)) => (r + t, self.ring_write(w, hk, d)),
                    None => (c, self.cache_window(hk, d)),
                };
                self.cache_slots.insert(layer, slots);
                let mut caches = Vec::new();
                for (kind, new) in [("key", &k4), ("value", &v4)] {
                    let state = self.cache_input(&format!("{kind}_cache_{layer}"), &[1, hk, slots, d], true);
                    let cur = self.b.op(
                        MilOp::ReadState,
                        &format!("{l}_{kind}_cache"),
                        vec![("input", Arg::Var(&state))],
                        Dt::F16,
                        &[1, hk, slots, d],
                    );
                    let inputs = vec![
                        ("x", Arg::Var(&cur)),
                        ("update", Arg::Var(new)),
                        ("begin", Arg::Var(&begin)),
                        ("end", Arg::Var(&end)),
                    ];
                    let upd = self.b.op(
                        MilOp::SliceUpdate,
                        &format!("{l}_{kind}_cache_new"),
                        inputs,
                        Dt::F16,
                        &[1, hk, slots, d],
                    );
                    self.b.effect(
                        MilOp::WriteState,
                        &format!("{l}_{kind}_cache_write"),
                        vec![("input", Arg::Var(&state)), ("data", Arg::Var(&upd))],
                    );
                    caches.push(upd);
                }
                if let Some(cap) = limits.softcap {
                    // scaled_dot_product_attention has no soft cap: scores in explicit ops.
                    let keys_values = (caches[0].clone(), caches[1].clone());
                    return Ok(self.explicit_attention(&l, q4, keys_values, (scale, Some(cap)), &mask, (hq, t, d)));
                }
                // The op's scale is fixed at 1/sqrt(d): fold any other scale into q.
                let default = 1.0 / (d as f32).sqrt();
                if (scale - default).abs() > 1e-7 * default {
                    let s = self.b.scalar_f16(&format!("{l}_q_scale"), scale / default);
                    q4 = self.binary(MilOp::Mul, &format!("{l}_q_scaled"), &q4, &s);
                }
                let inputs = vec![
                    ("query", Arg::Var(&q4)),
                    ("key", Arg::Var(&caches[0])),
                    ("value", Arg::Var(&caches[1])),
                    ("attn_mask", Arg::Var(&mask)),
                ];
                self.b.op(
                    MilOp::ScaledDotProductAttention,
                    &format!("{l}_attention"),
                    inputs,
                    Dt::F16,
                    &[1, hk, g * t, d],
                )
            }
            Deployment::Ios17 => {
                let k4 = self.reshape_named(&format!("new_key_{layer}"), &kt, &[1, hk, t, d]);
                let v4 = self.reshape_named(&format!("new_value_{layer}"), &vt, &[1, hk, t, d]);
                let slots = ring.map_or(c, |(_, r)| r);
                self.cache_slots.insert(layer, slots);
                let mut all = Vec::new();
                for (kind, new) in [("key", &k4), ("value", &v4)] {
                    let past = self.cache_input(&format!("{kind}_cache_{layer}"), &[1, hk, slots, d], false);
                    all.push(self.concat(&format!("{l}_{kind}_all"), &[&past, new], 2));
                }
                self.extra_outputs.push(k4.clone());
                self.extra_outputs.push(v4.clone());
                let keys_values = (all[0].clone(), all[1].clone());
                return Ok(self.explicit_attention(&l, q4, keys_values, (scale, limits.softcap), &mask, (hq, t, d)));
            }
        };
        Ok(self.attention_out(&l, &attended, (hq, t, d)))
    }

    /// Attention in matmul/softmax ops over all key slots: q scaled first (which keeps the
    /// fp16 scores small), the soft cap if any, the additive mask, softmax, the values.
    fn explicit_attention(
        &mut self,
        l: &str,
        q4: Var,
        (keys, values): (Var, Var),
        (scale, softcap): (f32, Option<f32>),
        mask: &Var,
        (hq, t, d): (usize, usize, usize),
    ) -> Var {
        let s = self.b.scalar_f16(&format!("{l}_q_scale"), scale);
        let q4 = self.binary(MilOp::Mul, &format!("{l}_q_scaled"), &q4, &s);
        let mut scores = self.matmul(&format!("{l}_scores"), &q4, &keys, true);
        if let Some(cap) = softcap {
            let inv = self.b.scalar_f16(&format!("{l}_inv_cap"), 1.0 / cap);
            let divided = self.binary(MilOp::Mul, &format!("{l}_scores_divided"), &scores, &inv);
            let tanh = self.unary(MilOp::Tanh, &format!("{l}_scores_tanh"), &divided);
            let c = self.b.scalar_f16(&format!("{l}_cap"), cap);
            scores = self.binary(MilOp::Mul, &format!("{l}_scores_capped"), &tanh, &c);
        }
        let masked = self.binary(MilOp::Add, &format!("{l}_scores_masked"), &scores, mask);
        let shape = masked.shape.clone();
        let inputs = vec![("x", Arg::Var(&masked)), ("axis", Arg::Value(mil::i32_value(&[], &[-1])))];
        let probs = self.b.op(MilOp::Softmax, &format!("{l}_probs"), inputs, Dt::F16, &shape);
        let attended = self.matmul(&format!("{l}_attention"), &probs, &values, false);
        self.attention_out(l, &attended, (hq, t, d))
    }

    fn attention_out(&mut self, l: &str, attended: &Var, (hq, t, d): (usize, usize, usize)) -> Var {
        let heads = self.reshape(&format!("{l}_attention_heads"), attended, &[hq, t, d]);
        self.transpose(&format!("{l}_attention_out"), &heads, &[1, 0, 2])
    }
}
