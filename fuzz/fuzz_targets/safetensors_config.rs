//! cargo-fuzz target `safetensors_config`: slmc_compiler::fuzzing::safetensors_config under the allocation bound
//! (see ../README.md).
#![no_main]

#[path = "../alloc_bound.rs"]
mod alloc_bound;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    alloc_bound::reset();
    slmc_compiler::fuzzing::safetensors_config(data);
    alloc_bound::check_allocation_bound(data.len());
});
