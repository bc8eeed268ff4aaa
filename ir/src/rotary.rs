//! Rotary embedding tables, computed once for the interpreter and every backend: inverse
//! frequencies (with Llama 3 or LongRoPE scaling) and the cos/sin of each position, in f32
//! exactly as the interpreter rotates.

use crate::graph::Graph;
use crate::op::{Op, RopeScaling, Rotary};

/// Inverse frequencies of rotary embedding, computed in f32 as Hugging Face does. LongRoPE
/// has two sets; this is the short one ([`Rotary::freqs`] gives either).
pub fn rope_inv_freq(theta: f32, rotary_dim: usize, scaling: &RopeScaling) -> Vec<f32> {
    let base: Vec<f32> = (0..rotary_dim / 2).map(|j| 1.0 / theta_power(theta, j, rotary_dim)).collect();
    match scaling {
        RopeScaling::None => base,
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
            let old = *original_max_position as f32;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen > low_wavelen {
                        f / factor
                    } else if wavelen < high_wavelen {
                        f
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
        RopeScaling::LongRope { short_factor, .. } => long_rope_inv_freq(theta, rotary_dim, short_factor),
    }
}

/// `theta ** (2j / dim)` in f32, the wavelength scale of frequency j.
fn theta_power(theta: f32, j: usize, rotary_dim: usize) -> f32 {
    theta.powf((2 * j) as f32 / rotary_dim as f32)
}

/// transformers' `1 / (factor * theta ** (2j / dim))`, in f32.
fn long_rope_inv_freq(theta: f32, rotary_dim: usize, factors: &[f32]) -> Vec<f32> {
    factors.iter().enumerate().map(|(j, f)| 1.0 / (f * theta_power(theta, j, rotary_dim))).collect()
}

/// LongRoPE's attention factor when a checkpoint does not give one, as transformers and
/// llama.cpp's converter derive it from `scale` (max positions / original length):
/// sqrt(1 + ln(scale) / ln(original)), or 1 when the context is not extended.
pub fn long_rope_attention_factor(scale: f64, original: f64) -> f64 {
    if scale > 1.0 {
        (1.0 + scale.ln() / original.ln()).sqrt()
    } else {
        1.0
    }
}

impl RopeScaling {
    /// LongRoPE's original length: a sequence longer than this is rotated with the long
    /// factors at every position (transformers re-encodes the whole sequence the first
    /// time it passes it), a shorter one with the short factors.
    pub fn long_from(&self) -> Option<usize> {
        match self {
            RopeScaling::LongRope { original_max_position, .. } => Some(*original_max_position as usize),
            _ => None,
        }
    }

    /// The scaling's own invariants for a rotation of `rotary_dim` dimensions (a LongRoPE
    /// factor list has one positive finite entry per frequency).
    pub fn check(&self, rotary_dim: usize) -> Result<(), String> {
        if let RopeScaling::LongRope { short_factor, long_factor, original_max_position, attention_factor } = self {
            for (name, list) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                if list.len() != rotary_dim / 2 {
                    return Err(format!(
                        "longrope {name} has {} entries; rotary_dim {rotary_dim} needs {}",
                        list.len(),
                        rotary_dim / 2
                    ));
                }
                if !list.iter().all(|f| f.is_finite() && *f > 0.0) {
                    return Err(format!("longrope {name} entries must be positive and finite"));
                }
            }
            if *original_max_position < 1 {
                return Err(format!("longrope original_max_position must be positive, found {original_max_position}"));
            }
            if !(attention_factor.is_finite() && *attention_factor > 0.0) {
                return Err(format!("longrope attention_factor must be positive and finite, found {attention_factor}"));
            }
        }
        Ok(())
    }
}

/// The inverse frequencies of a rotation, and the factor cos and sin are multiplied by
/// (1 unless LongRoPE says otherwise).
pub struct RotaryFreqs {
    freqs: Vec<f32>,
    attention_factor: f32,
}

impl RotaryFreqs {
    /// cos and sin of `position * frequency` for each frequency at one position.
    pub fn cos_sin(&self, position: f32) -> (Vec<f32>, Vec<f32>) {
        // x * 1.0 is x exactly: no special case for scalings without an attention factor.
        let a = self.attention_factor;
        self.freqs.iter().map(|f| ((position * f).cos() * a, (position * f).sin() * a)).unzip()
    }
}

/// The shortest LongRoPE original length among the graph's rotations: sequences longer
/// than it need the long factors. None when no rotation uses LongRoPE.
pub fn long_rope_switch(graph: &Graph) -> Option<usize> {
    graph
        .nodes()
        .filter_map(|(_, node)| match &node.op {
            Op::Rope { scaling, .. } => scaling.long_from(),
            Op::Gqa { rotary, .. } => rotary.scaling.long_from(),
            _ => None,
        })
        .min()
}

impl Rotary {
    /// The frequencies of a sequence within LongRoPE's original length (`long = false`;
    /// the only set other scalings have) or past it (`long = true`).
    pub fn freqs(&self, long: bool) -> RotaryFreqs {
        match &self.scaling {
            RopeScaling::LongRope { short_factor, long_factor, attention_factor, .. } => RotaryFreqs {
                freqs: long_rope_inv_freq(self.theta, self.rotary_dim, if long { long_factor } else { short_factor }),
                attention_factor: *attention_factor,
            },
            other => RotaryFreqs { freqs: rope_inv_freq(self.theta, self.rotary_dim, other), attention_factor: 1.0 },
        }
    }

    /// cos and sin tables `[positions, rotary_dim / 2]` for positions `0..positions` of a
    /// sequence within LongRoPE's original length (compiled bundles stay within it).
    pub fn tables(&self, positions: usize) -> (Vec<f32>, Vec<f32>) {
        let freqs = self.freqs(false);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in 0..positions {
            let (c, s) = freqs.cos_sin(p as f32);
            cos.extend(c);
            sin.extend(s);
        }
        (cos, sin)
    }
}
