//! `edgediff devices`: the GPU adapters of this machine, their optional features and the limits
//! the GPU backend works within, and which one it would choose.

use crate::backend::gpu::{list_adapters, GpuBackend, GpuOptions};
use crate::cli::human_bytes;

#[derive(clap::Args)]
pub struct Args {
    /// Also open the chosen adapter and report the features the kernels will use.
    #[arg(long)]
    pub open: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let opts = GpuOptions::from_env();
    let adapters = list_adapters(&opts)?;
    if adapters.is_empty() {
        anyhow::bail!(
            "no GPU adapter found (on Linux without a GPU: apt-get install mesa-vulkan-drivers)"
        );
    }
    for s in &adapters {
        let mark = if s.chosen { "*" } else { " " };
        println!(
            "{mark} {} [{} {}] driver: {}",
            s.name, s.backend, s.device_type, s.driver
        );
        let yes = |b: bool| if b { "yes" } else { "no" };
        let subgroups = s
            .subgroups
            .map_or("no".to_string(), |(lo, hi)| format!("yes ({lo}..{hi})"));
        println!(
            "    shader-f16 {}  subgroups {}  timestamps {}  compute {}",
            yes(s.shader_f16),
            subgroups,
            yes(s.timestamps),
            yes(s.compute)
        );
        println!(
            "    cooperative matrices: {}{}",
            if s.coop_configs.is_empty() {
                "none".to_string()
            } else {
                s.coop_configs.join(", ")
            },
            if s.coop {
                " (tensor-core matmul on)"
            } else {
                ""
            }
        );
        println!(
            "    max storage binding {}  max buffer {}  workgroup storage {}  invocations {}  storage buffers/stage {}",
            human_bytes(s.max_storage_binding),
            human_bytes(s.max_buffer),
            human_bytes(s.max_workgroup_storage as u64),
            s.max_invocations,
            s.max_storage_buffers_per_stage
        );
    }
    if !adapters.iter().any(|s| s.chosen) {
        println!("no adapter matches EDGEDIFF_ADAPTER; the GPU backend would fail to start");
    } else {
        println!("* = chosen (EDGEDIFF_ADAPTER forces one by name or backend; EDGEDIFF_GPU_DISABLE=f16,subgroups,timestamps,coop turns features off)");
    }
    match &opts.pipeline_cache {
        Some(dir) => println!(
            "compiled pipelines kept in {} (EDGEDIFF_PIPELINE_CACHE=<dir> moves it, =off keeps none)",
            dir.display()
        ),
        None => println!(
            "compiled pipelines are not kept between runs (EDGEDIFF_PIPELINE_CACHE=<dir> keeps them)"
        ),
    }
    if a.open {
        let gpu = GpuBackend::new(&opts)?;
        let c = gpu.caps();
        println!(
            "opened {}: kernels use f16 {}, subgroups {}, timestamps {}, cooperative matrices {}; largest binding {}",
            gpu.device_name(),
            c.f16,
            c.subgroups,
            c.timestamps,
            c.coop,
            human_bytes(gpu.max_binding())
        );
    }
    Ok(())
}
