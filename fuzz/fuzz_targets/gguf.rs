//! cargo-fuzz target `gguf`: slmc_compiler::fuzzing::gguf under the allocation bound
//! (see ../README.md).
#![no_main]

#[path = "../alloc_bound.rs"]
mod alloc_bound;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    alloc_bound::reset();
    slmc_compiler::fuzzing::gguf(data);
    alloc_bound::check_allocation_bound(data.len());
});
