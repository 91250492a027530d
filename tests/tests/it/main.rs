//! The integration tests, one binary: each module is what was once a test binary of its own (tests/tests/<name>.rs),
//! so CI compiles and links one test crate instead of 22 (≈ 2 minutes on its 2 cores). Select a module with its
//! path: `cargo test --release -p edgediff-tests --test it gpu_forward::`.

mod bad_checkpoints;
mod bad_model_files;
mod batched_forward;
mod block_experts;
mod canvas_engine;
mod canvas_paging;
mod cpu_forward;
mod decode_engine;
mod default_model;
mod device_steps;
mod diffusion_gemma;
mod gguf_smollm2;
mod gpu_engine;
mod gpu_forward;
mod gpu_gemma;
mod gpu_paging;
mod paging;
mod parity;
mod pruning;
mod rsa;
mod test_deps;
mod zaya;
