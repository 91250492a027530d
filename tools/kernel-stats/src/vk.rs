//! The Vulkan side: one device with the features wgpu would enable for the runtime, and a compute
//! pipeline per entry point whose executables' statistics the driver reports
//! (VK_KHR_pipeline_executable_properties).

use std::ffi::{c_char, CStr};

use ash::vk;

const EXEC_PROPS: &CStr = ash::khr::pipeline_executable_properties::NAME;
const ROBUSTNESS2: &CStr = ash::ext::robustness2::NAME;
const COOP_MATRIX: &CStr = ash::khr::cooperative_matrix::NAME;

/// What the device is made for.
pub struct Want {
    /// `--device N`; `None`: the first discrete GPU, else the first device.
    pub index: Option<usize>,
    /// Statistics (needs VK_KHR_pipeline_executable_properties); false: pipelines only.
    pub stats: bool,
    /// Robust buffer access (core) and robustBufferAccess2 (VK_EXT_robustness2), as wgpu enables.
    pub robust: bool,
    /// VK_KHR_cooperative_matrix and the Vulkan memory model, for the tensor-core kernels.
    pub coop: bool,
    /// Whether the runtime would enable subgroups (wgpu then lets the subgroup size vary).
    pub subgroups: bool,
}

pub struct Gpu {
    // Kept alive: the instance's function pointers come from the library it loaded.
    _entry: ash::Entry,
    instance: ash::Instance,
    device: ash::Device,
    exec: Option<ash::khr::pipeline_executable_properties::Device>,
    /// "name (type, driver, Vulkan x.y)".
    pub describe: String,
    pub api_version: u32,
    /// robustBufferAccess2 enabled (wgpu then leaves buffer indices to the driver).
    pub robust2: bool,
    /// VK_KHR_cooperative_matrix enabled (asked for and present).
    pub coop: bool,
    /// shaderFloat16, shaderInt8 and shaderIntegerDotProduct enabled (the device has them; wgpu
    /// then lets naga use them).
    pub f16: bool,
    pub int8: bool,
    pub dot_product: bool,
    /// Pipelines get ALLOW_VARYING_SUBGROUP_SIZE, as wgpu's do when subgroups are enabled.
    varying_subgroup: bool,
}

/// One executable of a pipeline (compute pipelines usually have one) and its statistics.
pub struct Executable {
    pub name: String,
    pub subgroup_size: u32,
    /// In the driver's order.
    pub stats: Vec<Stat>,
}

pub struct Stat {
    pub name: String,
    pub value: String,
    /// The driver's description, with the value's format.
    pub about: String,
}

/// A buffer binding of group 0.
#[derive(Clone, Copy, Debug)]
pub enum Binding {
    Uniform { dynamic: bool },
    Storage,
}

fn text(chars: &[c_char]) -> String {
    // Fixed-size, NUL-terminated driver strings; a missing NUL reads as the whole array.
    let bytes: Vec<u8> = chars
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn version(v: u32) -> String {
    format!("{}.{}", vk::api_version_major(v), vk::api_version_minor(v))
}

fn device_type(t: vk::PhysicalDeviceType) -> &'static str {
    match t {
        vk::PhysicalDeviceType::DISCRETE_GPU => "discrete GPU",
        vk::PhysicalDeviceType::INTEGRATED_GPU => "integrated GPU",
        vk::PhysicalDeviceType::VIRTUAL_GPU => "virtual GPU",
        vk::PhysicalDeviceType::CPU => "CPU",
        _ => "other",
    }
}

impl Gpu {
    pub fn new(want: &Want) -> Result<Gpu, String> {
        // SAFETY: loads the system's libvulkan; nothing else in this process loads or unloads it.
        let entry = unsafe { ash::Entry::load() }
            .map_err(|e| format!("cannot load the Vulkan loader (libvulkan): {e}"))?;
        let app = vk::ApplicationInfo::default()
            .application_name(c"kernel-stats")
            .api_version(vk::API_VERSION_1_3);
        // SAFETY: the create info and what it points to live across the call.
        let instance = unsafe {
            entry.create_instance(
                &vk::InstanceCreateInfo::default().application_info(&app),
                None,
            )
        }
        .map_err(|e| format!("vkCreateInstance: {e}"))?;
        match Self::with_instance(entry.clone(), instance.clone(), want) {
            Ok(g) => Ok(g),
            Err(e) => {
                // SAFETY: nothing was created from the instance (with_instance destroys what it
                // made before failing).
                unsafe { instance.destroy_instance(None) };
                Err(e)
            }
        }
    }

    fn with_instance(
        entry: ash::Entry,
        instance: ash::Instance,
        want: &Want,
    ) -> Result<Gpu, String> {
        // SAFETY: a valid instance.
        let pds = unsafe { instance.enumerate_physical_devices() }
            .map_err(|e| format!("vkEnumeratePhysicalDevices: {e}"))?;
        // SAFETY: each handle comes from the enumeration above.
        let props: Vec<vk::PhysicalDeviceProperties> = pds
            .iter()
            .map(|&pd| unsafe { instance.get_physical_device_properties(pd) })
            .collect();
        let list = || {
            props
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    format!(
                        "  {i}: {} ({})",
                        text(&p.device_name),
                        device_type(p.device_type)
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let index = match want.index {
            Some(i) if i < pds.len() => i,
            Some(i) => {
                return Err(format!(
                    "--device {i}: Vulkan devices: {}\n{}",
                    pds.len(),
                    list()
                ))
            }
            None if pds.is_empty() => return Err("no Vulkan device".into()),
            None => props
                .iter()
                .position(|p| p.device_type == vk::PhysicalDeviceType::DISCRETE_GPU)
                .unwrap_or(0),
        };
        let pd = pds[index];
        let p = &props[index];
        // Device-level functionality stops at the instance's version (1.3) too.
        let api = p.api_version.min(vk::API_VERSION_1_3);
        let name = text(&p.device_name);
        let mut driver = String::new();
        if api >= vk::API_VERSION_1_2 {
            let mut dp = vk::PhysicalDeviceDriverProperties::default();
            let mut p2 = vk::PhysicalDeviceProperties2::default().push_next(&mut dp);
            // SAFETY: a Vulkan 1.2 device; the chain lives across the call.
            unsafe { instance.get_physical_device_properties2(pd, &mut p2) };
            driver = format!(", {} {}", text(&dp.driver_name), text(&dp.driver_info));
        }
        let describe = format!(
            "{index}: {name} ({}{driver}, Vulkan {})",
            device_type(p.device_type),
            version(p.api_version)
        );

        // SAFETY: pd is a valid physical device of this instance.
        let exts = unsafe { instance.enumerate_device_extension_properties(pd) }
            .map_err(|e| format!("vkEnumerateDeviceExtensionProperties: {e}"))?;
        let has = |n: &CStr| exts.iter().any(|e| e.extension_name_as_c_str() == Ok(n));
        let has_exec = has(EXEC_PROPS);
        let has_robust2 = has(ROBUSTNESS2);
        let has_coop = has(COOP_MATRIX);
        if want.stats && !has_exec {
            return Err(format!(
                "device {describe} lacks VK_KHR_pipeline_executable_properties, so its driver \
                 reports no compile statistics (--modules-only still checks that every kernel \
                 compiles; --device N picks another device):\n{}",
                list()
            ));
        }

        // What the device has.
        let mut v11 = vk::PhysicalDeviceVulkan11Features::default();
        let mut v12 = vk::PhysicalDeviceVulkan12Features::default();
        let mut v13 = vk::PhysicalDeviceVulkan13Features::default();
        let mut r2 = vk::PhysicalDeviceRobustness2FeaturesEXT::default();
        let mut ex = vk::PhysicalDevicePipelineExecutablePropertiesFeaturesKHR::default();
        let mut cm = vk::PhysicalDeviceCooperativeMatrixFeaturesKHR::default();
        let mut f2 = vk::PhysicalDeviceFeatures2::default();
        if api >= vk::API_VERSION_1_2 {
            f2 = f2.push_next(&mut v11).push_next(&mut v12);
        }
        if api >= vk::API_VERSION_1_3 {
            f2 = f2.push_next(&mut v13);
        }
        if has_robust2 {
            f2 = f2.push_next(&mut r2);
        }
        if has_exec {
            f2 = f2.push_next(&mut ex);
        }
        if has_coop {
            f2 = f2.push_next(&mut cm);
        }
        // SAFETY: every struct chained is known to this device (version or extension checked).
        unsafe { instance.get_physical_device_features2(pd, &mut f2) };
        let core = f2.features;
        let on = |b: vk::Bool32| b == vk::TRUE;
        if want.stats && !on(ex.pipeline_executable_info) {
            return Err(format!(
                "device {describe} lists VK_KHR_pipeline_executable_properties but not its \
                 pipelineExecutableInfo feature (--modules-only still checks the kernels)"
            ));
        }

        // What this tool enables: wgpu-hal's choices for the runtime's features (SHADER_F16,
        // SUBGROUP, EXPERIMENTAL_COOPERATIVE_MATRIX where the device has them; robust buffer
        // access always): wgpu-hal 30 src/vulkan/adapter.rs,
        // PhysicalDeviceFeatures::from_extensions_and_requested_features.
        let robust = want.robust && on(core.robust_buffer_access);
        let robust2 = robust && has_robust2 && on(r2.robust_buffer_access2);
        let coop = want.coop && has_coop && on(cm.cooperative_matrix);
        let varying_subgroup = want.subgroups && on(v13.subgroup_size_control);
        let f16 = on(v12.shader_float16);
        let int8 = on(v12.shader_int8);
        let dot_product = on(v13.shader_integer_dot_product);
        let core_on = vk::PhysicalDeviceFeatures::default().robust_buffer_access(robust);
        let mut e11 = vk::PhysicalDeviceVulkan11Features::default()
            .storage_buffer16_bit_access(on(v11.storage_buffer16_bit_access))
            .uniform_and_storage_buffer16_bit_access(on(
                v11.uniform_and_storage_buffer16_bit_access
            ));
        let mut e12 = vk::PhysicalDeviceVulkan12Features::default()
            .shader_float16(f16)
            .shader_int8(int8)
            .vulkan_memory_model(coop && on(v12.vulkan_memory_model))
            .vulkan_memory_model_device_scope(coop && on(v12.vulkan_memory_model_device_scope));
        let mut e13 = vk::PhysicalDeviceVulkan13Features::default()
            .subgroup_size_control(varying_subgroup)
            .shader_integer_dot_product(dot_product);
        let mut er2 = vk::PhysicalDeviceRobustness2FeaturesEXT::default()
            .robust_buffer_access2(robust2)
            .robust_image_access2(robust2 && on(r2.robust_image_access2));
        let mut eex = vk::PhysicalDevicePipelineExecutablePropertiesFeaturesKHR::default()
            .pipeline_executable_info(want.stats);
        let mut ecm =
            vk::PhysicalDeviceCooperativeMatrixFeaturesKHR::default().cooperative_matrix(coop);
        let mut enable = vk::PhysicalDeviceFeatures2::default().features(core_on);
        let mut ext_names: Vec<*const c_char> = vec![];
        if api >= vk::API_VERSION_1_2 {
            enable = enable.push_next(&mut e11).push_next(&mut e12);
        }
        if api >= vk::API_VERSION_1_3 {
            enable = enable.push_next(&mut e13);
        }
        if robust2 {
            enable = enable.push_next(&mut er2);
            ext_names.push(ROBUSTNESS2.as_ptr());
        }
        if want.stats {
            enable = enable.push_next(&mut eex);
            ext_names.push(EXEC_PROPS.as_ptr());
        }
        if coop {
            enable = enable.push_next(&mut ecm);
            ext_names.push(COOP_MATRIX.as_ptr());
        }

        // SAFETY: pd is valid.
        let families = unsafe { instance.get_physical_device_queue_family_properties(pd) };
        let family = families
            .iter()
            .position(|f| f.queue_flags.contains(vk::QueueFlags::COMPUTE))
            .ok_or_else(|| format!("device {describe} has no compute queue"))?;
        let priorities = [1.0f32];
        let queues = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(family as u32)
            .queue_priorities(&priorities)];
        let info = vk::DeviceCreateInfo::default()
            .queue_create_infos(&queues)
            .enabled_extension_names(&ext_names)
            .push_next(&mut enable);
        // SAFETY: the create info and its chain (features the device reports, extensions it
        // lists) live across the call.
        let device = unsafe { instance.create_device(pd, &info, None) }
            .map_err(|e| format!("vkCreateDevice on {describe}: {e}"))?;
        let exec = want
            .stats
            .then(|| ash::khr::pipeline_executable_properties::Device::new(&instance, &device));
        Ok(Gpu {
            _entry: entry,
            instance,
            device,
            exec,
            describe,
            api_version: api,
            robust2,
            coop,
            f16,
            int8,
            dot_product,
            varying_subgroup,
        })
    }

    /// The SPIR-V version wgpu-hal writes for this device (adapter.rs, `lang_version`).
    pub fn spirv_version(&self) -> (u8, u8) {
        match self.api_version {
            v if v >= vk::API_VERSION_1_3 => (1, 6),
            v if v >= vk::API_VERSION_1_2 => (1, 5),
            v if v >= vk::API_VERSION_1_1 => (1, 3),
            _ => (1, 0),
        }
    }

    /// Builds the compute pipeline of `entry` in `spirv` with a layout of `bindings` (set 0,
    /// binding i the i-th) and returns its executables with their statistics (none asked for:
    /// an empty list).
    pub fn pipeline(
        &self,
        spirv: &[u32],
        entry: &str,
        bindings: &[Binding],
    ) -> Result<Vec<Executable>, String> {
        let d = &self.device;
        let mut o = Objects {
            d,
            module: vk::ShaderModule::null(),
            set_layout: vk::DescriptorSetLayout::null(),
            layout: vk::PipelineLayout::null(),
            pipeline: vk::Pipeline::null(),
        };
        // SAFETY: the code slice outlives the call; the driver copies it.
        o.module = unsafe {
            d.create_shader_module(&vk::ShaderModuleCreateInfo::default().code(spirv), None)
        }
        .map_err(|e| format!("vkCreateShaderModule: {e}"))?;
        let layout_bindings: Vec<vk::DescriptorSetLayoutBinding> = bindings
            .iter()
            .enumerate()
            .map(|(i, &kind)| {
                vk::DescriptorSetLayoutBinding::default()
                    .binding(i as u32)
                    .descriptor_type(match kind {
                        Binding::Uniform { dynamic: false } => vk::DescriptorType::UNIFORM_BUFFER,
                        Binding::Uniform { dynamic: true } => {
                            vk::DescriptorType::UNIFORM_BUFFER_DYNAMIC
                        }
                        Binding::Storage => vk::DescriptorType::STORAGE_BUFFER,
                    })
                    .descriptor_count(1)
                    .stage_flags(vk::ShaderStageFlags::COMPUTE)
            })
            .collect();
        // SAFETY: the binding list outlives the call.
        o.set_layout = unsafe {
            d.create_descriptor_set_layout(
                &vk::DescriptorSetLayoutCreateInfo::default().bindings(&layout_bindings),
                None,
            )
        }
        .map_err(|e| format!("vkCreateDescriptorSetLayout: {e}"))?;
        let set_layouts = [o.set_layout];
        // SAFETY: set_layouts holds a live layout of this device.
        o.layout = unsafe {
            d.create_pipeline_layout(
                &vk::PipelineLayoutCreateInfo::default().set_layouts(&set_layouts),
                None,
            )
        }
        .map_err(|e| format!("vkCreatePipelineLayout: {e}"))?;
        let name = std::ffi::CString::new(entry).map_err(|e| format!("entry name: {e}"))?;
        let mut stage_flags = vk::PipelineShaderStageCreateFlags::empty();
        if self.varying_subgroup {
            // As wgpu-hal's compile_stage (device.rs) does when the SUBGROUP feature is on.
            stage_flags |= vk::PipelineShaderStageCreateFlags::ALLOW_VARYING_SUBGROUP_SIZE;
        }
        let stage = vk::PipelineShaderStageCreateInfo::default()
            .flags(stage_flags)
            .stage(vk::ShaderStageFlags::COMPUTE)
            .module(o.module)
            .name(&name);
        let mut flags = vk::PipelineCreateFlags::empty();
        if self.exec.is_some() {
            flags |= vk::PipelineCreateFlags::CAPTURE_STATISTICS_KHR;
        }
        let info = vk::ComputePipelineCreateInfo::default()
            .flags(flags)
            .stage(stage)
            .layout(o.layout);
        // SAFETY: module, layout and entry name are live; CAPTURE_STATISTICS only with the
        // extension and its feature enabled.
        let pipes = unsafe { d.create_compute_pipelines(vk::PipelineCache::null(), &[info], None) }
            .map_err(|(pipes, e)| {
                for p in pipes.into_iter().filter(|p| *p != vk::Pipeline::null()) {
                    // SAFETY: a pipeline of this device, unused.
                    unsafe { d.destroy_pipeline(p, None) };
                }
                format!("vkCreateComputePipelines: {e}")
            })?;
        o.pipeline = pipes[0];
        let Some(exec) = &self.exec else {
            return Ok(vec![]);
        };
        // SAFETY: a pipeline created with CAPTURE_STATISTICS_KHR on a device with the feature.
        let executables = unsafe {
            exec.get_pipeline_executable_properties(
                &vk::PipelineInfoKHR::default().pipeline(o.pipeline),
            )
        }
        .map_err(|e| format!("vkGetPipelineExecutablePropertiesKHR: {e}"))?;
        let mut out = vec![];
        for (i, x) in executables.iter().enumerate() {
            let info = vk::PipelineExecutableInfoKHR::default()
                .pipeline(o.pipeline)
                .executable_index(i as u32);
            // SAFETY: as above; i is below the executable count the driver gave.
            let stats = unsafe { exec.get_pipeline_executable_statistics(&info) }
                .map_err(|e| format!("vkGetPipelineExecutableStatisticsKHR: {e}"))?;
            out.push(Executable {
                name: text(&x.name),
                subgroup_size: x.subgroup_size,
                stats: stats
                    .iter()
                    .map(|s| Stat {
                        name: text(&s.name),
                        value: value(s),
                        about: format!("{} ({})", text(&s.description), format_name(s.format)),
                    })
                    .collect(),
            });
        }
        Ok(out)
    }
}

fn value(s: &vk::PipelineExecutableStatisticKHR) -> String {
    // SAFETY: the union member read is the one `format` names.
    unsafe {
        match s.format {
            vk::PipelineExecutableStatisticFormatKHR::BOOL32 => (s.value.b32 != 0).to_string(),
            vk::PipelineExecutableStatisticFormatKHR::INT64 => s.value.i64.to_string(),
            vk::PipelineExecutableStatisticFormatKHR::UINT64 => u64_text(s.value.u64),
            vk::PipelineExecutableStatisticFormatKHR::FLOAT64 => {
                let v = s.value.f64;
                if v.fract() == 0.0 && v.abs() < 1e15 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.3}")
                }
            }
            f => format!("(format {})", f.as_raw()),
        }
    }
}

/// Decimal, or hex from 2^32 up: NVIDIA 580's "Local Memory Size" (bytes per thread) comes as
/// 0x1000000000 plus the bytes, which hex shows as such.
fn u64_text(v: u64) -> String {
    if v >> 32 != 0 {
        format!("{v:#x}")
    } else {
        v.to_string()
    }
}

fn format_name(f: vk::PipelineExecutableStatisticFormatKHR) -> String {
    match f {
        vk::PipelineExecutableStatisticFormatKHR::BOOL32 => "bool".into(),
        vk::PipelineExecutableStatisticFormatKHR::INT64 => "i64".into(),
        vk::PipelineExecutableStatisticFormatKHR::UINT64 => "u64".into(),
        vk::PipelineExecutableStatisticFormatKHR::FLOAT64 => "f64".into(),
        f => format!("format {}", f.as_raw()),
    }
}

/// The objects of one pipeline, destroyed (those created) however `pipeline` returns.
struct Objects<'a> {
    d: &'a ash::Device,
    module: vk::ShaderModule,
    set_layout: vk::DescriptorSetLayout,
    layout: vk::PipelineLayout,
    pipeline: vk::Pipeline,
}

impl Drop for Objects<'_> {
    fn drop(&mut self) {
        // SAFETY: each handle is null or an unused object of this device, destroyed once.
        unsafe {
            if self.pipeline != vk::Pipeline::null() {
                self.d.destroy_pipeline(self.pipeline, None);
            }
            if self.layout != vk::PipelineLayout::null() {
                self.d.destroy_pipeline_layout(self.layout, None);
            }
            if self.set_layout != vk::DescriptorSetLayout::null() {
                self.d.destroy_descriptor_set_layout(self.set_layout, None);
            }
            if self.module != vk::ShaderModule::null() {
                self.d.destroy_shader_module(self.module, None);
            }
        }
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // SAFETY: every object made from the device was destroyed (Objects); nothing runs on it.
        unsafe {
            self.device.destroy_device(None);
            self.instance.destroy_instance(None);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn large_values_read_in_hex() {
        assert_eq!(super::u64_text(168), "168");
        assert_eq!(super::u64_text((1 << 36) + 32), "0x1000000020");
    }
}
