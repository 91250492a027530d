//! Opening a model file: read and check the preamble, header and index with plain reads, and map the
//! data only when a tensor is asked for. Every range in the index is checked against the file before
//! anything dereferences it, so a hostile file is an error, never an out-of-bounds read.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use memmap2::{Mmap, MmapOptions};

use super::header::*;
use super::{dtype, DType, FormatError};

/// An open model file. Cheap to open: reads only preamble, header and index.
#[derive(Debug)]
pub struct EdmFile {
    path: PathBuf,
    file: File,
    pub header: Header,
    file_len: u64,
    data_start: u64,
    /// Bytes read with `read` so far (the preamble and header), for the "opening reads little" check.
    header_bytes_read: u64,
    map: OnceLock<Mmap>,
}

/// A tensor's bytes inside the mapping, with its type and shape.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl TensorView<'_> {
    /// Decodes to f32, rejecting non-finite values and scales.
    pub fn to_f32(&self) -> Result<Vec<f32>, FormatError> {
        dtype::decode(self.dtype, self.shape, self.bytes).map_err(|source| FormatError::Decode {
            name: self.name.to_string(),
            source,
        })
    }
}

impl EdmFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, FormatError> {
        let path = path.as_ref().to_path_buf();
        let io = |e: std::io::Error| FormatError::Io {
            path: path.clone(),
            source: e,
        };
        let mut file = File::open(&path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut pre = [0u8; PREAMBLE];
        if file_len < PREAMBLE as u64 {
            return Err(FormatError::Truncated {
                what: "preamble".into(),
                need: PREAMBLE as u64,
                have: file_len,
            });
        }
        file.read_exact(&mut pre).map_err(io)?;
        if &pre[0..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = u32::from_le_bytes(pre[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        let header_len = u64::from_le_bytes(pre[16..24].try_into().unwrap());
        if header_len > MAX_HEADER {
            return Err(FormatError::HeaderTooLarge(header_len));
        }
        if PREAMBLE as u64 + header_len > file_len {
            return Err(FormatError::Truncated {
                what: "header".into(),
                need: PREAMBLE as u64 + header_len,
                have: file_len,
            });
        }
        let mut json = vec![0u8; header_len as usize];
        file.read_exact(&mut json).map_err(io)?;
        let header: Header = serde_json::from_slice(&json).map_err(FormatError::HeaderJson)?;
        let data_start = data_start(header_len);
        let me = EdmFile {
            path,
            file,
            header,
            file_len,
            data_start,
            header_bytes_read: PREAMBLE as u64 + header_len,
            map: OnceLock::new(),
        };
        me.validate()?;
        Ok(me)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn file_len(&self) -> u64 {
        self.file_len
    }
    pub fn data_start(&self) -> u64 {
        self.data_start
    }
    pub fn header_bytes_read(&self) -> u64 {
        self.header_bytes_read
    }
    pub fn data_len(&self) -> u64 {
        self.file_len.saturating_sub(self.data_start)
    }

    fn validate(&self) -> Result<(), FormatError> {
        let h = &self.header;
        h.metadata.config.validate()?;
        if self.data_start > self.file_len {
            return Err(FormatError::Truncated {
                what: "data section".into(),
                need: self.data_start,
                have: self.file_len,
            });
        }
        let data_len = self.data_len();
        // (start, end, what) of every range, for the overlap check.
        let mut ranges: Vec<(u64, u64, String)> = Vec::new();
        let mut names = std::collections::HashSet::new();
        let check = |e: &TensorEntry, base: u64, limit: u64| -> Result<(u64, u64), FormatError> {
            if e.dtype == DType::U8 {
                return Err(FormatError::Invalid(format!(
                    "tensor '{}' has blob type u8",
                    e.name
                )));
            }
            if e.shape.is_empty()
                || e.shape.len() > 2
                || (e.dtype.is_quantized() && e.shape.len() != 2)
            {
                return Err(FormatError::Invalid(format!(
                    "tensor '{}' has unsupported shape {:?} for {}",
                    e.name, e.shape, e.dtype
                )));
            }
            let expected = e
                .dtype
                .byte_len(&e.shape)
                .ok_or_else(|| FormatError::BadShape {
                    name: e.name.clone(),
                    dtype: e.dtype,
                    shape: e.shape.clone(),
                })? as u64;
            if expected != e.length {
                return Err(FormatError::LengthMismatch {
                    name: e.name.clone(),
                    expected,
                    stated: e.length,
                });
            }
            let start = base
                .checked_add(e.offset)
                .ok_or_else(|| out_of_range(&e.name))?;
            let end = start
                .checked_add(e.length)
                .ok_or_else(|| out_of_range(&e.name))?;
            if end > limit {
                return Err(FormatError::OutOfBounds {
                    name: e.name.clone(),
                    end,
                    limit,
                });
            }
            Ok((start, end))
        };
        for t in &h.tensors {
            if !names.insert(t.name.as_str()) {
                return Err(FormatError::DuplicateName(t.name.clone()));
            }
            if !t.offset.is_multiple_of(TENSOR_ALIGN) {
                return Err(FormatError::Misaligned {
                    name: t.name.clone(),
                    offset: t.offset,
                    align: TENSOR_ALIGN,
                });
            }
            let (s, e) = check(t, 0, data_len)?;
            ranges.push((s, e, t.name.clone()));
        }
        // Lookups take the first match, so a second entry of a name would be unreachable data.
        let mut blob_names = std::collections::HashSet::new();
        for b in &h.blobs {
            if !blob_names.insert(b.name.as_str()) {
                return Err(FormatError::DuplicateName(format!("blob {}", b.name)));
            }
            if !b.offset.is_multiple_of(TENSOR_ALIGN) {
                return Err(FormatError::Misaligned {
                    name: b.name.clone(),
                    offset: b.offset,
                    align: TENSOR_ALIGN,
                });
            }
            let end = b
                .offset
                .checked_add(b.length)
                .ok_or_else(|| out_of_range(&b.name))?;
            if end > data_len {
                return Err(FormatError::OutOfBounds {
                    name: b.name.clone(),
                    end,
                    limit: data_len,
                });
            }
            ranges.push((b.offset, end, format!("blob {}", b.name)));
        }
        let cfg = &h.metadata.config;
        let mut seen_layers = std::collections::HashSet::new();
        for t in &h.experts {
            let what = format!("experts of layer {}", t.layer);
            if t.layer >= cfg.num_layers
                || !cfg.is_moe_layer(t.layer)
                || !seen_layers.insert(t.layer)
            {
                return Err(FormatError::Invalid(format!(
                    "{what}: not a (unique) MoE layer"
                )));
            }
            if t.offsets.len() != cfg.moe.num_experts {
                return Err(FormatError::Invalid(format!(
                    "{what}: {} offsets for {} experts",
                    t.offsets.len(),
                    cfg.moe.num_experts
                )));
            }
            let mut part_ranges = Vec::new();
            let mut part_names = std::collections::HashSet::new();
            for p in &t.parts {
                if !part_names.insert(p.name.as_str()) {
                    return Err(FormatError::DuplicateName(format!(
                        "{what} part {}",
                        p.name
                    )));
                }
                let (s, e) = check(p, 0, t.length)?;
                part_ranges.push((s, e, p.name.clone()));
            }
            overlaps(&mut part_ranges)?;
            for (e, off) in t.offsets.iter().enumerate() {
                let Some(off) = *off else { continue };
                let name = format!("layer {} expert {e}", t.layer);
                if !off.is_multiple_of(EXPERT_ALIGN) {
                    return Err(FormatError::Misaligned {
                        name,
                        offset: off,
                        align: EXPERT_ALIGN,
                    });
                }
                let end = off
                    .checked_add(t.length)
                    .ok_or_else(|| out_of_range(&name))?;
                if end > data_len {
                    return Err(FormatError::OutOfBounds {
                        name,
                        end,
                        limit: data_len,
                    });
                }
                ranges.push((off, end, name));
            }
        }
        for l in 0..cfg.num_layers {
            if cfg.is_moe_layer(l) && !seen_layers.contains(&l) {
                return Err(FormatError::Invalid(format!(
                    "no expert table for MoE layer {l}"
                )));
            }
        }
        overlaps(&mut ranges)
    }

    /// The whole file mapped read-only; pages are read only when touched.
    pub fn map(&self) -> Result<&Mmap, FormatError> {
        if let Some(m) = self.map.get() {
            return Ok(m);
        }
        // SAFETY: the mapping is read-only and we never write through it. A concurrent truncation of
        // the file by another process would fault on access; model files are treated as immutable,
        // and edgediff itself never modifies a file it has open.
        let map = unsafe { MmapOptions::new().map(&self.file) }.map_err(|e| FormatError::Io {
            path: self.path.clone(),
            source: e,
        })?;
        #[cfg(unix)]
        {
            // Experts are read one by one in routing order; read-ahead would pull in neighbours.
            let _ = map.advise(memmap2::Advice::Random);
        }
        Ok(self.map.get_or_init(|| map))
    }

    fn slice(&self, offset: u64, length: u64) -> Result<&[u8], FormatError> {
        let map = self.map()?;
        let start = (self.data_start + offset) as usize;
        // Ranges were checked at open; the mapping length is re-checked in case the file shrank.
        map.get(start..start + length as usize)
            .ok_or(FormatError::Truncated {
                what: "mapped data".into(),
                need: self.data_start + offset + length,
                have: map.len() as u64,
            })
    }

    pub fn tensor_entry(&self, name: &str) -> Option<&TensorEntry> {
        self.header.tensors.iter().find(|t| t.name == name)
    }

    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>, FormatError> {
        let e = self
            .tensor_entry(name)
            .ok_or_else(|| FormatError::MissingTensor(name.to_string()))?;
        Ok(TensorView {
            name: &e.name,
            dtype: e.dtype,
            shape: &e.shape,
            bytes: self.slice(e.offset, e.length)?,
        })
    }

    pub fn expert_table(&self, layer: usize) -> Option<&ExpertTable> {
        self.header.experts.iter().find(|t| t.layer == layer)
    }

    /// One part (`gate_up` or `down`) of one routed expert.
    pub fn expert_part(
        &self,
        layer: usize,
        expert: usize,
        part: &str,
    ) -> Result<TensorView<'_>, FormatError> {
        let (p, off) = self.expert_part_entry(layer, expert, part)?;
        Ok(TensorView {
            name: &p.name,
            dtype: p.dtype,
            shape: &p.shape,
            bytes: self.slice(off, p.length)?,
        })
    }

    /// The same part as [`EdmFile::expert_part`], its bytes read from the file into `buf` with a
    /// positional read instead of through the mapping. For paging: a page fault reads (and maps) 4
    /// KiB at a time under the mapping's random-access advice, where one read asks the OS for the
    /// whole part at once, maps nothing into this process (the bytes go straight to `buf`, which
    /// the caller reuses: it is grown, never shrunk), and leaves no mapped pages to release
    /// afterwards. The bytes are the same either way.
    pub fn read_expert_part<'a>(
        &'a self,
        layer: usize,
        expert: usize,
        part: &str,
        buf: &'a mut Vec<u8>,
    ) -> Result<TensorView<'a>, FormatError> {
        let (p, off) = self.expert_part_entry(layer, expert, part)?;
        let at = self.data_start + off;
        let len = p.length as usize;
        // Ranges were checked at open; re-checked against the file as opened, in case it shrank.
        if at + p.length > self.file_len {
            return Err(FormatError::Truncated {
                what: format!("layer {layer} expert {expert} {part}"),
                need: at + p.length,
                have: self.file_len,
            });
        }
        // The buffer only grows (zero-filled once, to the largest part read), so a reused one
        // costs no fill per read.
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let bytes = &mut buf[..len];
        read_exact_at(&self.file, bytes, at).map_err(|e| FormatError::Io {
            path: self.path.clone(),
            source: e,
        })?;
        Ok(TensorView {
            name: &p.name,
            dtype: p.dtype,
            shape: &p.shape,
            bytes,
        })
    }

    /// An expert part's entry and its offset from the start of the data.
    fn expert_part_entry(
        &self,
        layer: usize,
        expert: usize,
        part: &str,
    ) -> Result<(&TensorEntry, u64), FormatError> {
        let name = || format!("layer {layer} expert {expert} {part}");
        let t = self
            .expert_table(layer)
            .ok_or_else(|| FormatError::MissingTensor(name()))?;
        let off = t
            .offsets
            .get(expert)
            .copied()
            .flatten()
            .ok_or_else(|| FormatError::MissingTensor(name()))?;
        let p = t
            .parts
            .iter()
            .find(|p| p.name == part)
            .ok_or_else(|| FormatError::MissingTensor(name()))?;
        Ok((p, off + p.offset))
    }

    /// Asks the OS to read every dense tensor's bytes now ([`EdmFile::will_need_expert`]'s hint,
    /// for a model load that is about to read them all in order): the reads are queued together
    /// instead of faulting in a page (4 KiB) at a time under the mapping's random-access advice.
    pub fn will_need_tensors(&self) {
        for t in &self.header.tensors {
            self.will_need_range(self.data_start + t.offset, t.length);
        }
    }

    /// Asks the OS to read one expert's bytes into the page cache now (`MADV_WILLNEED` on its
    /// range), ahead of the read that wants them ([`EdmFile::read_expert_part`], or a copy out of
    /// the mapping, where the random-access advice would otherwise bring a cold expert in a page
    /// per fault): hinted up front, the misses of a pass are read together at the device's queue
    /// depth instead of one after another. A hint only: the bytes are the same either way, and an
    /// error (or a platform without it) leaves the reads to do the reading.
    pub fn will_need_expert(&self, layer: usize, expert: usize) {
        if let Some((off, len)) = self.expert_range(layer, expert) {
            self.will_need_range(off, len);
        }
    }

    /// `MADV_WILLNEED` on `len` bytes at `off` from the start of the file; a range past the
    /// mapping, or an error, is ignored.
    fn will_need_range(&self, off: u64, len: u64) {
        #[cfg(unix)]
        if let Ok(map) = self.map() {
            if off
                .checked_add(len)
                .is_some_and(|end| end <= map.len() as u64)
            {
                let _ = map.advise_range(memmap2::Advice::WillNeed, off as usize, len as usize);
            }
        }
        #[cfg(not(unix))]
        let _ = (off, len);
    }

    /// Drops the mapped pages under `bytes` — a slice of this file's mapping, such as a
    /// [`TensorView`]'s — once they were copied elsewhere (a GPU buffer); nothing is lost (a later
    /// access faults the same bytes in again from the page cache or the file). A slice from
    /// elsewhere is ignored.
    pub fn release_view(&self, bytes: &[u8]) {
        let Some(map) = self.map.get() else {
            return;
        };
        let (base, at) = (map.as_ptr() as usize, bytes.as_ptr() as usize);
        if at >= base && at + bytes.len() <= base + map.len() {
            self.release_range((at - base) as u64, bytes.len() as u64);
        }
    }

    /// `off` and `len` in bytes from the start of the file (= of the mapping); pages partly
    /// outside the range are dropped too (they fault back in when touched).
    fn release_range(&self, off: u64, len: u64) {
        #[cfg(unix)]
        if let Some(map) = self.map.get() {
            if off + len <= map.len() as u64 {
                // SAFETY: MADV_DONTNEED on a read-only, file-backed shared mapping only unmaps
                // pages; it cannot change the bytes any live slice into the mapping sees (they are
                // re-read from the file on the next access), and we never write through it.
                let _ = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        off as usize,
                        len as usize,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = (off, len);
    }

    /// The byte range of a whole expert, relative to the start of the file.
    pub fn expert_range(&self, layer: usize, expert: usize) -> Option<(u64, u64)> {
        let t = self.expert_table(layer)?;
        let off = t.offsets.get(expert).copied().flatten()?;
        Some((self.data_start + off, t.length))
    }

    pub fn blob(&self, name: &str) -> Result<&[u8], FormatError> {
        let b = self
            .header
            .blobs
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| FormatError::MissingTensor(format!("blob {name}")))?;
        self.slice(b.offset, b.length)
    }
}

fn out_of_range(name: &str) -> FormatError {
    FormatError::OutOfBounds {
        name: name.to_string(),
        end: u64::MAX,
        limit: u64::MAX,
    }
}

fn overlaps(ranges: &mut [(u64, u64, String)]) -> Result<(), FormatError> {
    ranges.sort_by_key(|r| (r.0, r.1));
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(FormatError::Overlap {
                a: w[0].2.clone(),
                b: w[1].2.clone(),
            });
        }
    }
    Ok(())
}

/// Fills `buf` from the file at byte `at` without moving the file's cursor (the file is shared by
/// every thread that pages experts).
#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, at)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut at: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, at) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                at += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(not(any(unix, windows)))]
fn read_exact_at(_: &File, _: &mut [u8], _: u64) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

#[cfg(test)]
mod tests {
    use super::EdmFile;
    use crate::format::DType;
    use crate::model::Architecture;
    use crate::synth::{self, SynthSpec};

    /// The read hints on a file opened fresh (not yet mapped), for every dense tensor and every
    /// expert, then experts and layers that are not there: no panic, no error, and the bytes read
    /// after them are the file's.
    #[test]
    fn a_read_hint_changes_no_bytes_and_skips_what_is_not_there() {
        let spec = SynthSpec::tiny(Architecture::Qwen3Moe);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.edm");
        synth::write_edm(&synth::build(&spec).unwrap(), &path, DType::Q4, &|_, _| {}).unwrap();
        let plain = EdmFile::open(&path).unwrap();
        let hinted = EdmFile::open(&path).unwrap();
        hinted.will_need_tensors();
        for t in &plain.header.tensors {
            assert_eq!(
                plain.tensor(&t.name).unwrap().bytes,
                hinted.tensor(&t.name).unwrap().bytes,
                "{}",
                t.name
            );
        }
        let layers = plain.header.metadata.config.num_layers;
        let experts = plain.header.metadata.config.moe.num_experts;
        assert!(experts > 0 && layers > 0);
        let mut seen = 0;
        for l in 0..layers {
            for e in 0..experts {
                hinted.will_need_expert(l, e);
                for part in ["gate_up", "down"] {
                    let (Ok(a), Ok(b)) = (
                        plain.expert_part(l, e, part),
                        hinted.expert_part(l, e, part),
                    ) else {
                        continue;
                    };
                    assert_eq!(a.bytes, b.bytes, "layer {l} expert {e} {part}");
                    seen += 1;
                }
            }
        }
        assert!(seen > 0, "no expert parts in the synthetic model");
        hinted.will_need_expert(layers + 3, 0);
        hinted.will_need_expert(0, experts + 7);
        hinted.will_need_expert(usize::MAX, usize::MAX);
    }

    /// A positional read of every expert part gives the mapping's bytes, dtype and shape, with
    /// one buffer reused from part to part (longer, then shorter); a part, expert or layer that
    /// is not there is the same typed error as through the mapping, and the buffer is left
    /// whole for the next read.
    #[test]
    fn positional_expert_reads_equal_the_mapping() {
        use crate::format::FormatError;
        let spec = SynthSpec::tiny(Architecture::Qwen3Moe);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.edm");
        synth::write_edm(&synth::build(&spec).unwrap(), &path, DType::Q4, &|_, _| {}).unwrap();
        let f = EdmFile::open(&path).unwrap();
        let c = &f.header.metadata.config;
        let (layers, experts) = (c.num_layers, c.moe.num_experts);
        let mut buf = vec![0xAB; 3];
        let mut seen = 0;
        for l in 0..layers {
            for e in (0..experts).rev() {
                for part in ["gate_up", "down", "gate_up"] {
                    let Ok(m) = f.expert_part(l, e, part) else {
                        continue;
                    };
                    let (mb, md, ms) = (m.bytes.to_vec(), m.dtype, m.shape.to_vec());
                    let r = f.read_expert_part(l, e, part, &mut buf).unwrap();
                    assert_eq!((r.bytes, r.dtype, r.shape), (&mb[..], md, &ms[..]));
                    assert_eq!(r.name, part);
                    seen += 1;
                }
            }
        }
        assert!(seen > 0, "no expert parts in the synthetic model");
        for (l, e, part) in [
            (layers + 3, 0, "down"),
            (0, experts + 7, "down"),
            (0, 0, "up"),
        ] {
            let before = buf.clone();
            assert!(matches!(
                f.read_expert_part(l, e, part, &mut buf),
                Err(FormatError::MissingTensor(_))
            ));
            assert!(f.expert_part(l, e, part).is_err());
            assert_eq!(buf, before);
        }
    }
}
