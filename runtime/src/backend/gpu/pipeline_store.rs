//! Compiled pipelines kept between runs, in a directory the embedder chooses
//! ([`super::GpuOptions::pipeline_cache`]):
//! - `<device>.pipelines`: the driver's compiled code (wgpu's `PipelineCache`, Vulkan only). Desktop
//!   drivers keep a disk cache of their own; many phone drivers leave it to the application, so
//!   without this every launch compiles every kernel again (seconds on a phone).
//! - `<device>-<model>.keys`: which pipelines a model used (kernel file, entry point, weight-type
//!   bits). The next run of that model on that device builds them on background threads while its
//!   weights load, several at a time, instead of one at a time inside its first passes (the first
//!   token waited 1.5 s for them on an H100 without the driver's own cache, 60–100 ms with it;
//!   with the store, 20 ms: docs/PERF.md).
//!
//! Both are hints: a file that is missing, truncated, corrupted or from another build is ignored
//! (and replaced at the next save), never an error, and nothing else in the directory is touched.
//! Files are written whole to a temporary name and renamed, so a reader never sees half of one and
//! concurrent processes leave one of their versions. The driver data carries a header of ours
//! (length and hash of what wgpu returned) because wgpu checks its own header but not the bytes
//! after it.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A pipeline by name: (kernel file, entry point, weight-type bits).
pub type KeyName = (String, String, u32);

const MAGIC: &[u8; 8] = b"EDPIPE01";
/// The most keys one model's list keeps (a list grows with knob settings; past this it stops).
const MAX_KEYS: usize = 1024;

pub struct PipelineStore {
    dir: PathBuf,
    /// File stem naming the device, driver and build.
    device: String,
    /// The driver's cache, where the device lends one.
    pub cache: Option<wgpu::PipelineCache>,
    /// Bytes of driver data last written or read (a save with no more is skipped).
    saved_data: Mutex<usize>,
    /// Pipelines that existed at the last [`PipelineStore::grew`] that said so.
    seen: std::sync::atomic::AtomicUsize,
    /// The model whose key list this run keeps.
    model: Mutex<Option<ModelList>>,
}

struct ModelList {
    name: String,
    /// The keys saved for it so far.
    keys: BTreeSet<KeyName>,
    /// The file holds lines `keys` does not: write it at the next save.
    stale: bool,
}

fn hash_of(bytes: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// The stored form of driver data: magic, length, hash, then the bytes.
fn wrap(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 24);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&hash_of(data).to_le_bytes());
    out.extend_from_slice(data);
    out
}

/// The bytes [`wrap`] stored, if `file` is exactly that.
fn unwrap(file: &[u8]) -> Option<&[u8]> {
    let (head, data) = file.split_at_checked(24)?;
    let len = u64::from_le_bytes(head[8..16].try_into().ok()?);
    let sum = u64::from_le_bytes(head[16..24].try_into().ok()?);
    (head[..8] == MAGIC[..] && len == data.len() as u64 && sum == hash_of(data)).then_some(data)
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The keys of a `.keys` file: lines `file entry wtype`; malformed lines are skipped.
pub fn parse_keys(text: &str) -> Vec<KeyName> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split('\t');
            let (f, e, w) = (it.next()?, it.next()?, it.next()?.parse().ok()?);
            (it.next().is_none() && !f.is_empty() && !e.is_empty())
                .then(|| (f.to_string(), e.to_string(), w))
        })
        .collect()
}

impl PipelineStore {
    /// Opens the store in `dir` for `info`'s device (creating the directory), with the driver's
    /// cache data from the last run where `with_cache` (the device lends PIPELINE_CACHE).
    pub fn open(
        dir: &Path,
        device: &wgpu::Device,
        info: &wgpu::AdapterInfo,
        with_cache: bool,
    ) -> PipelineStore {
        let mut h = std::hash::DefaultHasher::new();
        (
            &info.name,
            info.vendor,
            info.device,
            &info.driver,
            &info.driver_info,
        )
            .hash(&mut h);
        (info.backend.to_str(), env!("CARGO_PKG_VERSION")).hash(&mut h);
        let stem = h.finish();
        let store = PipelineStore {
            dir: dir.to_path_buf(),
            device: format!("{stem:016x}"),
            cache: None,
            saved_data: Mutex::new(0),
            seen: std::sync::atomic::AtomicUsize::new(0),
            model: Mutex::new(None),
        };
        if let Err(e) = std::fs::create_dir_all(dir) {
            tracing::warn!("pipeline cache {}: {e}", dir.display());
        }
        if !with_cache {
            return store;
        }
        let file = std::fs::read(store.data_path()).ok();
        let data = file.as_deref().and_then(unwrap);
        // SAFETY: wgpu requires `data` to be bytes an earlier `PipelineCache::get_data` returned.
        // These are exactly such bytes: this store writes only get_data's output, behind a header
        // with its length and hash, and `unwrap` gives the bytes back only where both match (a
        // truncated or altered file gives None and a fresh cache). wgpu itself then checks its own
        // header (device, driver, wgpu version) and `fallback` makes a mismatch an empty cache.
        let cache = unsafe {
            device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                label: Some("edgediff pipelines"),
                data,
                fallback: true,
            })
        };
        *store.saved_data.lock().unwrap() = data.map_or(0, <[u8]>::len);
        PipelineStore {
            cache: Some(cache),
            ..store
        }
    }

    fn data_path(&self) -> PathBuf {
        self.dir.join(format!("{}.pipelines", self.device))
    }

    fn keys_path(&self, model: &str) -> PathBuf {
        self.dir.join(format!("{}-{model}.keys", self.device))
    }

    /// The pipelines `model` used in earlier runs on this device that `known` accepts (an
    /// entry point this build has); from now on this run's saves keep that model's list.
    pub fn model_keys(&self, model: &str, known: impl Fn(&KeyName) -> bool) -> Vec<KeyName> {
        let text = std::fs::read(self.keys_path(model)).unwrap_or_default();
        let keys: Vec<KeyName> = parse_keys(&String::from_utf8_lossy(&text))
            .into_iter()
            .filter(known)
            .collect();
        // A list with lines it does not keep (broken, or kernels this build lacks) is written
        // again at the next save even if nothing is added.
        let lines = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count();
        *self.model.lock().unwrap() = Some(ModelList {
            name: model.to_string(),
            keys: keys.iter().cloned().collect(),
            stale: lines != keys.len(),
        });
        keys
    }

    /// Whether `pipelines` (the count that exist now) is more than at the last call that said so:
    /// the one check a generation pays when nothing was built.
    pub fn grew(&self, pipelines: usize) -> bool {
        self.seen
            .fetch_max(pipelines, std::sync::atomic::Ordering::Relaxed)
            < pipelines
    }

    /// Writes what is new since the last save: the driver's data where it grew, and the model's
    /// key list where `built` adds to it. Failures are logged, not returned: the store is a hint.
    pub fn save(&self, built: &[KeyName]) {
        if let Some(cache) = &self.cache {
            if let Some(data) = cache.get_data() {
                let mut saved = self.saved_data.lock().unwrap();
                if data.len() > *saved {
                    match write_whole(&self.data_path(), &wrap(&data)) {
                        Ok(()) => *saved = data.len(),
                        Err(e) => tracing::warn!("pipeline cache {}: {e}", self.dir.display()),
                    }
                }
            }
        }
        let mut model = self.model.lock().unwrap();
        let Some(list) = model.as_mut() else {
            return;
        };
        let before = list.keys.len();
        list.keys.extend(built.iter().cloned());
        if list.keys.len() == before && !list.stale {
            return;
        }
        let mut text = String::new();
        for (f, e, w) in list.keys.iter().take(MAX_KEYS) {
            text.push_str(&format!("{f}\t{e}\t{w}\n"));
        }
        match write_whole(&self.keys_path(&list.name), text.as_bytes()) {
            Ok(()) => list.stale = false,
            Err(e) => tracing::warn!("pipeline cache {}: {e}", self.dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_data_comes_back_only_whole_and_unaltered() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let w = wrap(&data);
        assert_eq!(unwrap(&w), Some(&data[..]));
        assert_eq!(unwrap(&w[..w.len() - 1]), None, "truncated");
        assert_eq!(unwrap(&w[..10]), None, "header cut");
        let mut flipped = w.clone();
        flipped[500] ^= 1;
        assert_eq!(unwrap(&flipped), None, "a byte altered");
        let mut longer = w.clone();
        longer.push(0);
        assert_eq!(unwrap(&longer), None, "extended");
        assert_eq!(unwrap(&wrap(&[])), Some(&[][..]));
    }

    #[test]
    fn key_lists_skip_malformed_lines() {
        let text = "gemv.wgsl\tgemv\t3\nbroken\nx\ty\tnotanumber\n\tgemv\t1\na\tb\t2\textra\nmoe.wgsl\troute\t0\n";
        assert_eq!(
            parse_keys(text),
            vec![
                ("gemv.wgsl".into(), "gemv".into(), 3),
                ("moe.wgsl".into(), "route".into(), 0)
            ]
        );
        assert!(parse_keys("\u{0}\u{1}binary").is_empty());
    }
}
