//! cargo-fuzz target `tokenizer_files`: slmc_compiler::fuzzing::tokenizer_files under the allocation bound
//! (see ../README.md).
#![no_main]

#[path = "../alloc_bound.rs"]
mod alloc_bound;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    alloc_bound::reset();
    slmc_compiler::fuzzing::tokenizer_files(data);
    alloc_bound::check_allocation_bound(data.len());
});
