//! cargo-fuzz target `ir_text`: slmc_compiler::fuzzing::ir_text under the allocation bound
//! (see ../README.md).
#![no_main]

#[path = "../alloc_bound.rs"]
mod alloc_bound;

bounded_fuzz_target!(slmc_compiler::fuzzing::ir_text);
