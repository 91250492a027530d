//! Buffers: every GPU buffer carries an id (bind groups are cached by the ids they bind), and
//! activation / scratch buffers come from a pool of power-of-two size classes. A forward pass asks
//! for the same sizes in the same order every time, so after the first pass no buffer (and no bind
//! group) is created. A buffer goes back to the pool when its handle drops, which is safe inside one
//! recording: commands run in recording order, so a later op that reuses it runs after every op that
//! read it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Bytes of the GPU buffers this process has created and not yet dropped, and their peak: every
/// weight, expert pool, KV cache, activation and staging buffer goes through [`GpuBuffer::new`]
/// (wgpu's own upload staging for `write_buffer` is not counted).
static LIVE_BYTES: AtomicU64 = AtomicU64::new(0);
static PEAK_BYTES: AtomicU64 = AtomicU64::new(0);

/// (live, peak) bytes of GPU buffers in this process (all backends together).
pub fn gpu_bytes() -> (u64, u64) {
    (
        LIVE_BYTES.load(Ordering::Relaxed),
        PEAK_BYTES.load(Ordering::Relaxed),
    )
}

/// Starts a new peak from the bytes live now.
pub fn reset_peak_gpu_bytes() {
    PEAK_BYTES.store(LIVE_BYTES.load(Ordering::Relaxed), Ordering::Relaxed);
}

pub struct GpuBuffer {
    pub id: u64,
    pub raw: wgpu::Buffer,
    pub size: u64,
}

impl GpuBuffer {
    /// The size a buffer asked for `size` bytes gets: whole 16-byte words (at least one), so a
    /// kernel may read any buffer as `vec4<u32>`s up to its end. Checks of a buffer's size compare
    /// with this, not with the bytes asked for.
    pub fn padded(size: u64) -> u64 {
        size.max(16).div_ceil(16) * 16
    }

    pub fn new(
        device: &wgpu::Device,
        size: u64,
        usage: wgpu::BufferUsages,
        label: &str,
    ) -> Arc<GpuBuffer> {
        let size = Self::padded(size);
        let raw = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: false,
        });
        let live = LIVE_BYTES.fetch_add(size, Ordering::Relaxed) + size;
        PEAK_BYTES.fetch_max(live, Ordering::Relaxed);
        Arc::new(GpuBuffer {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            raw,
            size,
        })
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        LIVE_BYTES.fetch_sub(self.size, Ordering::Relaxed);
    }
}

pub const ACT_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::INDIRECT);

/// Free buffers by size class.
pub struct ActPool {
    device: wgpu::Device,
    free: Mutex<HashMap<u64, Vec<Arc<GpuBuffer>>>>,
    usage: wgpu::BufferUsages,
    label: &'static str,
}

/// A pooled buffer; returns to its pool on drop.
pub struct Pooled {
    buf: Option<Arc<GpuBuffer>>,
    pool: Arc<ActPool>,
}

impl std::ops::Deref for Pooled {
    type Target = GpuBuffer;
    fn deref(&self) -> &GpuBuffer {
        self.buf.as_ref().expect("present until drop")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            let mut free = self.pool.free.lock().unwrap_or_else(|p| p.into_inner());
            free.entry(b.size).or_default().push(b);
        }
    }
}

pub fn size_class(bytes: u64) -> u64 {
    bytes.max(256).next_power_of_two()
}

impl ActPool {
    pub fn new(
        device: wgpu::Device,
        usage: wgpu::BufferUsages,
        label: &'static str,
    ) -> Arc<ActPool> {
        Arc::new(ActPool {
            device,
            free: Mutex::new(HashMap::new()),
            usage,
            label,
        })
    }

    /// A buffer of at least `bytes` (its class: the next power of two); `fresh` is true when it was
    /// just created.
    pub fn take(self: &Arc<Self>, bytes: u64) -> (Pooled, bool) {
        let class = size_class(bytes);
        let reused = self
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&class)
            .and_then(Vec::pop);
        let fresh = reused.is_none();
        let buf =
            reused.unwrap_or_else(|| GpuBuffer::new(&self.device, class, self.usage, self.label));
        (
            Pooled {
                buf: Some(buf),
                pool: self.clone(),
            },
            fresh,
        )
    }

    /// Bytes held by free buffers.
    pub fn free_bytes(&self) -> u64 {
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(c, v)| c * v.len() as u64)
            .sum()
    }
}
