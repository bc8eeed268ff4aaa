//! The allocation bound every fuzz input is held to: a counting global allocator (wrapping
//! `std::alloc::System`) records the largest single allocation (`alloc`, `alloc_zeroed`,
//! `realloc`'s new size) since the last [`reset`], and [`check_allocation_bound`] panics
//! when it exceeds `ALLOC_FACTOR * input_len + ALLOC_CONSTANT`.
//!
//! A parser that sizes a buffer from a count in the file before checking the count against
//! the bytes that remain can be made to ask for gigabytes by a few-byte file; ASan and
//! libFuzzer's `-rss_limit_mb` only notice when the request is absurd, this notices when it
//! is out of proportion.
//!
//! Included with `#[path = ...] mod alloc_bound;` by every fuzz target (fuzz/fuzz_targets/)
//! and by the stable replay (tests/fuzz_replay.rs): a global allocator is declared once per
//! binary. The high-water mark is process-wide; callers run one input at a time.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes one input byte may legitimately cost in a single allocation. The largest honest
/// ratios in slmc's parsers: a GGUF metadata array decodes each element (1 byte in the
/// file at the least) into a 32-byte `Value`, a Core ML uint4 blob (half a byte per value)
/// becomes 4-byte f32s (8x), and Vec growth doubles a buffer (2x). 64 leaves room for
/// those; a length field trusted before it is checked blows through it by orders of
/// magnitude.
pub const ALLOC_FACTOR: usize = 64;

/// Allowance independent of the input: fixed tables and caches the libraries build on first
/// use (tokenizers' byte-level tables, regex and Aho-Corasick automata, minijinja's
/// environment, serde buffers) and small inputs whose legitimate working set is a few
/// megabytes. 64 MiB is above all of those and well below what a lying header asks for.
pub const ALLOC_CONSTANT: usize = 64 << 20;

pub struct CountingAlloc;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn record(size: usize) {
    LARGEST.fetch_max(size, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // `vec![0; n]` comes here: calloc is lazy, so without this a huge zeroed
        // request would go unnoticed until something touched it.
        record(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Forgets the high-water mark; call before each input.
pub fn reset() {
    LARGEST.store(0, Ordering::Relaxed);
}

/// The largest single allocation since the last [`reset`], in bytes.
pub fn largest() -> usize {
    LARGEST.load(Ordering::Relaxed)
}

/// The most one allocation may take for an input of `input_len` bytes.
pub fn bound(input_len: usize) -> usize {
    input_len.saturating_mul(ALLOC_FACTOR).saturating_add(ALLOC_CONSTANT)
}

/// Panics when an allocation since the last [`reset`] exceeded [`bound`]`(input_len)`.
/// To find where it was made, rerun the input under cargo-fuzz with
/// `-malloc_limit_mb=<a little below the reported size>`: libFuzzer then stops at the
/// allocation and prints its stack.
pub fn check_allocation_bound(input_len: usize) {
    let largest = largest();
    let bound = bound(input_len);
    if largest > bound {
        panic!(
            "allocation bound exceeded: one allocation of {largest} bytes for a {input_len}-byte input \
             (bound {ALLOC_FACTOR} * {input_len} + {ALLOC_CONSTANT} = {bound})"
        );
    }
}

/// A cargo-fuzz target running `body` (a `fn(&[u8])` of `slmc_compiler::fuzzing`) under the
/// allocation bound; the including file declares `mod alloc_bound`.
#[macro_export]
macro_rules! bounded_fuzz_target {
    ($body:path) => {
        libfuzzer_sys::fuzz_target!(|data: &[u8]| {
            alloc_bound::reset();
            $body(data);
            alloc_bound::check_allocation_bound(data.len());
        });
    };
}
