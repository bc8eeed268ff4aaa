//! cargo-fuzz target `tokenizer_files`: slmc_compiler::fuzzing::tokenizer_files under the allocation bound
//! (see ../README.md).
#![no_main]

#[path = "../alloc_bound.rs"]
mod alloc_bound;

bounded_fuzz_target!(slmc_compiler::fuzzing::tokenizer_files);
