//! slmc's driver: importers, lowering to the IR, converters. The `slmc` binary
//! (src/main.rs) is the CLI on top.

pub mod bundle;
pub mod compile;
pub mod convert;
pub mod cost;
pub mod emit;
pub mod evalset;
pub mod fuzzing;
pub mod genai;
pub mod import;
pub mod lower;
pub mod optimize;
pub mod output;
pub mod report;
pub mod store;

use std::path::PathBuf;

/// Where the set-up script puts the default model (SmolLM2-135M-Instruct, GGUF Q4_1).
pub fn default_model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SLMC_MODEL") {
        return PathBuf::from(p);
    }
    cache_dir().join("models").join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub use slmc_runtime::cache_dir;
