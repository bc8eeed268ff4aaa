//! Snapshot tests of generated WGSL: one kernel of each template and layout, rendered for
//! fixed shapes and compared with `tests/snapshots/<name>.wgsl`. `SLMC_BLESS=1` rewrites
//! them. Every snapshot must also pass naga validation and translate to MSL and SPIR-V.

use std::path::PathBuf;

use slmc_backends::gpu::kernels::{self, WeightLayout};
use slmc_ir::{RopeScaling, RopeStyle, Rotary};

fn layouts() -> Vec<WeightLayout> {
    vec![
        WeightLayout { kind: "f32", rows: 64, cols: 32, group: 1, codes_offset: 0, sym: false },
        WeightLayout { kind: "q4", rows: 64, cols: 64, group: 32, codes_offset: 256, sym: false },
        WeightLayout { kind: "q4", rows: 64, cols: 64, group: 32, codes_offset: 256, sym: true },
        WeightLayout { kind: "q8", rows: 64, cols: 64, group: 32, codes_offset: 128, sym: true },
    ]
}

fn all_kernels() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for l in layouts() {
        out.push(kernels::embed(&l, 0).unwrap());
        out.push(kernels::linear(&l, l.rows, false, l.rows, 0).unwrap());
        out.push(kernels::linear(&l, l.rows / 2, true, l.rows / 2, 0).unwrap());
    }
    out.push(kernels::rms_norm(64, 1e-5, false).unwrap());
    out.push(kernels::rms_norm(64, 1e-6, true).unwrap());
    out.push(kernels::elementwise("add", 64, 0, false).unwrap());
    out.push(kernels::elementwise("add", 64, 64, true).unwrap());
    out.push(kernels::elementwise("mul", 64, 0, false).unwrap());
    out.push(kernels::elementwise("silu", 64, 0, false).unwrap());
    out.push(kernels::slice(96, 32, 16).unwrap());
    for style in [RopeStyle::Half, RopeStyle::Interleaved] {
        let rotary = Rotary { theta: 10000.0, rotary_dim: 8, style, scaling: RopeScaling::None };
        for kv in ["f32", "int8", "int4"] {
            out.push(kernels::rope_cache(&rotary, 4, 2, 8, 16, kv).unwrap());
        }
    }
    out.push(kernels::argmax(300).unwrap());
    // A chunk of a split table and of a split LM head.
    let chunk = WeightLayout { kind: "q8", rows: 16, cols: 64, group: 32, codes_offset: 32, sym: true };
    out.push(kernels::embed(&chunk, 48).unwrap());
    out.push(kernels::linear(&chunk, 16, false, 64, 48).unwrap());
    for kv in ["f32", "int8", "int4"] {
        out.push(kernels::attention(4, 2, 8, 0.35355338, 16, kv).unwrap());
    }
    out
}

#[test]
fn wgsl_snapshots() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots");
    let bless = std::env::var_os("SLMC_BLESS").is_some();
    let mut failures = Vec::new();
    for (name, src) in all_kernels() {
        if let Err(e) = kernels::validate_and_translate(&src) {
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
