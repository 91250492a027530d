//! Any bytes as a GGUF file: parsing the header, dequantizing every tensor it names, reading the
//! metadata into a model config and a tokenizer, and reading every tensor through the importer's
//! name mapping must return errors, never panic, read out of bounds or allocate without bound.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = edgediff_fuzz::scratch_named("input.gguf");
    std::fs::write(path, data).expect("writing the scratch file");
    edgediff_fuzz::exercise_gguf(path);
});
