//! cargo-fuzz target `bundle_json`: slmc_compiler::fuzzing::bundle_json under the allocation bound
//! (see ../README.md).
#![no_main]

#[path = "../alloc_bound.rs"]
mod alloc_bound;

bounded_fuzz_target!(slmc_compiler::fuzzing::bundle_json);
