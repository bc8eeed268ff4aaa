//! Rotary embedding tables, computed once for the interpreter and every backend: inverse
//! frequencies (with Llama 3 scaling) and the cos/sin of each position, in f32 exactly as
//! the interpreter rotates.

use crate::op::{RopeScaling, Rotary};

/// Inverse frequencies of rotary embedding, computed in f32 as Hugging Face does.
pub fn rope_inv_freq(theta: f32, rotary_dim: usize, scaling: &RopeScaling) -> Vec<f32> {
    let base: Vec<f32> = (0..rotary_dim / 2).map(|j| 1.0 / theta.powf((2 * j) as f32 / rotary_dim as f32)).collect();
    match *scaling {
        RopeScaling::None => base,
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
            let old = original_max_position as f32;
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
    }
}

/// cos and sin of `position * frequency` for each position and frequency, row-major
/// `[positions, frequencies]`.
pub fn cos_sin(freqs: &[f32], positions: impl IntoIterator<Item = f32>) -> (Vec<f32>, Vec<f32>) {
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for p in positions {
        for f in freqs {
            cos.push((p * f).cos());
            sin.push((p * f).sin());
        }
    }
    (cos, sin)
}

impl Rotary {
    /// The inverse frequencies (`rotary_dim / 2`).
    pub fn inv_freq(&self) -> Vec<f32> {
        rope_inv_freq(self.theta, self.rotary_dim, &self.scaling)
    }

    /// cos and sin tables `[positions, rotary_dim / 2]` for positions `0..positions`.
    pub fn tables(&self, positions: usize) -> (Vec<f32>, Vec<f32>) {
        cos_sin(&self.inv_freq(), (0..positions).map(|p| p as f32))
    }
}
