//! cargo-fuzz target `safetensors_config`: slmc_compiler::fuzzing::safetensors_config under the allocation bound
//! (see ../README.md).
#![no_main]

#[path = "../alloc_bound.rs"]
mod alloc_bound;

bounded_fuzz_target!(slmc_compiler::fuzzing::safetensors_config);
