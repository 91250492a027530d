//! `uniffi-bindgen` at exactly the uniffi version the FFI crate links, so generated bindings and
//! scaffolding always agree. Use through `bindings/scripts/generate.sh`.

fn main() {
    uniffi::uniffi_bindgen_main()
}
