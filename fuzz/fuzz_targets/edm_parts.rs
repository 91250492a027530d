//! Structure-aware twin of `edm_open`: the input is `header JSON, NUL, data section`, and the target
//! writes the preamble and alignment padding itself. Raw-file mutations that change the JSON's
//! length almost always just break the header length field; here they reach the index checks, the
//! config checks and the model.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = edgediff_fuzz::scratch();
    std::fs::write(path, edgediff_fuzz::assemble_parts(data)).expect("writing the scratch file");
    edgediff_fuzz::exercise(path);
});
