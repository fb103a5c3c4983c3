//! Fuzz target: constrained BIO decoding; see `checks::bio_decode`.
#![no_main]

#[path = "../checks.rs"]
mod checks;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| checks::bio_decode(data));
