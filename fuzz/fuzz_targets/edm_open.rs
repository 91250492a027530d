//! Any bytes as a model file: opening, reading every tensor, expert part and blob the header names,
//! decoding them, loading the model on the CPU backend and running one tiny forward pass must
//! return errors, never panic, read out of bounds or allocate without bound.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = edgediff_fuzz::scratch();
    std::fs::write(path, data).expect("writing the scratch file");
    edgediff_fuzz::exercise(path);
});
