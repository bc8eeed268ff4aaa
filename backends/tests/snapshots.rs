//! Snapshot tests of generated WGSL: one kernel of each template and layout, rendered for
//! fixed shapes and compared with `tests/snapshots/<name>.wgsl`. `SLMC_BLESS=1` rewrites
//! them. Every snapshot must also pass naga validation (allowing only the optional features
//! it was generated for) and translate to MSL and SPIR-V. Plain kernels come from
//! `GpuFeatures::NONE`; the f16 and subgroup variants from the features that select them.

use std::path::PathBuf;

use slmc_backends::gpu::kernels::{self, CacheLayout, GpuFeatures, WeightLayout};
use slmc_ir::{AttnLimits, KvQuant, Op, RopeScaling, RopeStyle, Rotary};

fn layouts() -> Vec<WeightLayout> {
    vec![
        WeightLayout { kind: "f32", rows: 64, cols: 32, group: 1, codes_offset: 0, sym: false },
        WeightLayout { kind: "q4", rows: 64, cols: 64, group: 32, codes_offset: 256, sym: false },
        WeightLayout { kind: "q4", rows: 64, cols: 64, group: 32, codes_offset: 256, sym: true },
        WeightLayout { kind: "q8", rows: 64, cols: 64, group: 32, codes_offset: 128, sym: true },
        WeightLayout { kind: "f16", rows: 64, cols: 32, group: 1, codes_offset: 0, sym: false },
    ]
}

/// Every kernel with the features it is generated for.
fn all_kernels() -> Vec<(String, String, GpuFeatures)> {
    let none = GpuFeatures::NONE;
    let f16 = GpuFeatures { shader_f16: true, subgroups: false };
    let sg = GpuFeatures { shader_f16: false, subgroups: true };
    let mut out = Vec::new();
    let mut push = |k: (String, String), f: GpuFeatures| out.push((k.0, k.1, f));
    for l in layouts() {
        let variants: &[GpuFeatures] = if l.kind == "f16" { &[none, f16] } else { &[none] };
        for &f in variants {
            push(kernels::embed(&l, 0, f).unwrap(), f);
            push(kernels::linear(&l, l.rows, false, l.rows, 0, f).unwrap(), f);
            push(kernels::linear(&l, l.rows / 2, true, l.rows / 2, 0, f).unwrap(), f);
        }
    }
    for f in [none, sg] {
        push(kernels::rms_norm(&Op::RmsNorm { eps: 1e-5 }, 64, 1, f).unwrap(), f);
        push(kernels::rms_norm(&Op::AddRmsNorm { eps: 1e-6 }, 64, 1, f).unwrap(), f);
        push(kernels::argmax(300, f).unwrap(), f);
    }
    // LayerNorm has one (plain) variant whatever the features.
    push(kernels::rms_norm(&Op::LayerNorm { eps: 1e-5 }, 64, 1, none).unwrap(), none);
    push(kernels::elementwise(kernels::Elementwise::Scale(25.3f32.to_bits()), 64, 0, false).unwrap(), none);
    push(kernels::elementwise(kernels::Elementwise::Softcap(30f32.to_bits()), 64, 0, false).unwrap(), none);
    push(kernels::elementwise(kernels::Elementwise::Add, 64, 0, false).unwrap(), none);
    push(kernels::elementwise(kernels::Elementwise::Add, 64, 64, true).unwrap(), none);
    push(kernels::elementwise(kernels::Elementwise::Mul, 64, 0, false).unwrap(), none);
    push(kernels::elementwise(kernels::Elementwise::Silu, 64, 0, false).unwrap(), none);
    push(kernels::slice(96, 32, 16).unwrap(), none);
    let caches =
        [(KvQuant::F32, none), (KvQuant::F16, none), (KvQuant::F16, f16), (KvQuant::Int8, none), (KvQuant::Int4, none)];
    for style in [RopeStyle::Half, RopeStyle::Interleaved] {
        let rotary = Rotary { theta: 10000.0, rotary_dim: 8, style, scaling: RopeScaling::None };
        for (kv, f) in caches {
            push(kernels::rope_cache(&rotary, (4, 2, 8), CacheLayout::full(16), kv, 40, f).unwrap(), f);
        }
    }
    // A chunk of a split table and of a split LM head.
    let chunk = WeightLayout { kind: "q8", rows: 16, cols: 64, group: 32, codes_offset: 32, sym: true };
    push(kernels::embed(&chunk, 48, none).unwrap(), none);
    push(kernels::linear(&chunk, 16, false, 64, 48, none).unwrap(), none);
    for (kv, f) in caches {
        let split = kernels::KeySplit::for_context(16);
        push(
            kernels::attention((4, 2, 8), 0.35355338, AttnLimits::NONE, CacheLayout::full(16), split, kv, 40, f)
                .unwrap(),
            f,
        );
    }
    // A context of several splits (the combine kernel merges them).
    let long = kernels::KeySplit::for_context(600);
    push(
        kernels::attention(
            (4, 2, 8),
            0.35355338,
            AttnLimits::NONE,
            CacheLayout::full(600),
            long,
            KvQuant::F32,
            0,
            none,
        )
        .unwrap(),
        none,
    );
    // Gemma: a sliding window across splits, and a soft cap.
    let gemma = AttnLimits { window: Some(512), softcap: Some(50.0) };
    push(
        kernels::attention((4, 1, 8), 0.0625, gemma, CacheLayout::full(600), long, KvQuant::F32, 0, none).unwrap(),
        none,
    );
    // A sliding-window layer's ring (512 + 64 - 1 slots of a 600-position context), plain
    // and with int8 codes and their exact ring.
    let ring = CacheLayout::for_window(600, Some(512), 64);
    let half = Rotary { theta: 10000.0, rotary_dim: 8, style: RopeStyle::Half, scaling: RopeScaling::None };
    for (kv, exact) in [(KvQuant::F32, 0), (KvQuant::Int8, 96)] {
        push(kernels::rope_cache(&half, (4, 1, 8), ring, kv, exact, none).unwrap(), none);
        push(kernels::attention((4, 1, 8), 0.0625, gemma, ring, long, kv, exact, none).unwrap(), none);
    }
    push(kernels::attention_combine((4, 8), long).unwrap(), none);
    out
}

/// A variant that uses an optional feature does not validate without it, and the
/// features a kernel declares it uses are exactly the ones that selected it.
#[test]
fn variants_need_their_features() {
    for (name, src, f) in all_kernels() {
        assert_eq!(GpuFeatures::used_by(&src), f, "{name}");
        if f != GpuFeatures::NONE {
            assert!(
                kernels::validate_and_translate(&src, GpuFeatures::NONE).is_err(),
                "{name} validates without {f:?}"
            );
        }
    }
}

#[test]
fn wgsl_snapshots() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots");
    let bless = std::env::var("SLMC_BLESS").is_ok_and(|v| v == "1");
    let mut failures = Vec::new();
    for (name, src, features) in all_kernels() {
        if let Err(e) = kernels::validate_and_translate(&src, features) {
            failures.push(format!("{name}: does not validate:\n{e}"));
        }
        let path = dir.join(format!("{name}.wgsl"));
        if bless {
            std::fs::write(&path, &src).unwrap();
        } else {
            match std::fs::read_to_string(&path) {
                Ok(expected) if expected == src => {}
                Ok(_) => failures.push(format!("{name}: differs from {} (SLMC_BLESS=1 to update)", path.display())),
                Err(_) => failures.push(format!("{name}: no snapshot at {} (SLMC_BLESS=1 to write)", path.display())),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
