//! `uniffi-bindgen-swift`: Swift sources, C headers and module maps generated separately, as an
//! XCFramework needs them. Use through `ios/build-xcframework.sh`.

fn main() {
    uniffi::uniffi_bindgen_swift()
}
