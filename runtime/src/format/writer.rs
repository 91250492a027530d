//! Writing a model file in two phases: plan the layout (every offset is known from dtypes and
//! shapes alone), then stream the bytes in. Nothing is held in memory but the tensor being written,
//! so a multi-gigabyte synthetic model is produced in constant memory. The file is written under a
//! temporary name and renamed into place when complete.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::header::*;
use super::{DType, FormatError};

/// Assigns data-section offsets in the order items are added.
pub struct LayoutBuilder {
    header: Header,
    cursor: u64,
}

impl LayoutBuilder {
    pub fn new(metadata: Metadata) -> Self {
        LayoutBuilder {
            header: Header {
                metadata,
                tensors: Vec::new(),
                experts: Vec::new(),
                blobs: Vec::new(),
            },
            cursor: 0,
        }
    }

    fn place(&mut self, len: u64, align: u64) -> u64 {
        let off = align_up(self.cursor, align);
        self.cursor = off + len;
        off
    }

    pub fn tensor(&mut self, name: &str, dtype: DType, shape: &[usize]) -> Result<(), FormatError> {
        let length = byte_len(name, dtype, shape)?;
        let offset = self.place(length, TENSOR_ALIGN);
        self.header.tensors.push(TensorEntry {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            offset,
            length,
        });
        Ok(())
    }

    /// All experts of one layer, each holding `parts` back to back (64-byte aligned inside).
    pub fn experts(
        &mut self,
        layer: usize,
        num_experts: usize,
        parts: &[(&str, DType, Vec<usize>)],
    ) -> Result<(), FormatError> {
        self.experts_subset(layer, &vec![true; num_experts], parts)
    }

    /// The experts of one layer for which `keep` is true; the others get no bytes (`null` offsets).
    pub fn experts_subset(
        &mut self,
        layer: usize,
        keep: &[bool],
        parts: &[(&str, DType, Vec<usize>)],
    ) -> Result<(), FormatError> {
        let mut entries = Vec::new();
        let mut len = 0u64;
        for (name, dtype, shape) in parts {
            let length = byte_len(name, *dtype, shape)?;
            let offset = align_up(len, 64);
            len = offset + length;
            entries.push(TensorEntry {
                name: name.to_string(),
                dtype: *dtype,
                shape: shape.clone(),
                offset,
                length,
            });
        }
        let offsets = keep
            .iter()
            .map(|&k| k.then(|| self.place(len, EXPERT_ALIGN)))
            .collect();
        self.header.experts.push(ExpertTable {
            layer,
            length: len,
            parts: entries,
            offsets,
        });
        Ok(())
    }

    pub fn blob(&mut self, name: &str, length: u64) {
        let offset = self.place(length, TENSOR_ALIGN);
        self.header.blobs.push(BlobEntry {
            name: name.to_string(),
            offset,
            length,
        });
    }

    pub fn finish(self) -> Header {
        self.header
    }
}

fn byte_len(name: &str, dtype: DType, shape: &[usize]) -> Result<u64, FormatError> {
    dtype
        .byte_len(shape)
        .map(|n| n as u64)
        .ok_or_else(|| FormatError::BadShape {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
        })
}

/// Streams the data of a planned [`Header`] into a new file.
pub struct EdmWriter {
    out: BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    header: Header,
    data_start: u64,
    written: u64,
    expected: u64,
}

impl EdmWriter {
    pub fn create(path: impl AsRef<Path>, header: Header) -> Result<Self, FormatError> {
        let path = path.as_ref().to_path_buf();
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let io = |e| FormatError::Io {
            path: tmp.clone(),
            source: e,
        };
        let json = serde_json::to_vec(&header).map_err(FormatError::HeaderJson)?;
        let data_start = data_start(json.len() as u64);
        let mut out = BufWriter::new(File::create(&tmp).map_err(io)?);
        out.write_all(MAGIC).map_err(io)?;
        out.write_all(&VERSION.to_le_bytes()).map_err(io)?;
        out.write_all(&0u32.to_le_bytes()).map_err(io)?;
        out.write_all(&(json.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(&json).map_err(io)?;
        let expected = header.tensors.iter().map(|t| t.length).sum::<u64>()
            + header.blobs.iter().map(|b| b.length).sum::<u64>()
            + header
                .experts
                .iter()
                // The parts' bytes: the padding that aligns a part inside an expert is not written.
                .map(|t| {
                    t.parts.iter().map(|p| p.length).sum::<u64>()
                        * t.offsets.iter().flatten().count() as u64
                })
                .sum::<u64>();
        Ok(EdmWriter {
            out,
            tmp,
            path,
            header,
            data_start,
            written: 0,
            expected,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<(), FormatError> {
        let io = |e| FormatError::Io {
            path: self.tmp.clone(),
            source: e,
        };
        self.out
            .seek(SeekFrom::Start(self.data_start + offset))
            .map_err(io)?;
        self.out.write_all(bytes).map_err(io)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<(), FormatError> {
        let t = self
            .header
            .tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| FormatError::MissingTensor(name.to_string()))?;
        check_len(name, t.length, bytes)?;
        let offset = t.offset;
        self.write_at(offset, bytes)
    }

    pub fn write_expert_part(
        &mut self,
        layer: usize,
        expert: usize,
        part: &str,
        bytes: &[u8],
    ) -> Result<(), FormatError> {
        let name = format!("layer {layer} expert {expert} {part}");
        let t = self
            .header
            .experts
            .iter()
            .find(|t| t.layer == layer)
            .ok_or_else(|| FormatError::MissingTensor(name.clone()))?;
        let base = t
            .offsets
            .get(expert)
            .copied()
            .flatten()
            .ok_or_else(|| FormatError::MissingTensor(name.clone()))?;
        let p = t
            .parts
            .iter()
            .find(|p| p.name == part)
            .ok_or_else(|| FormatError::MissingTensor(name.clone()))?;
        check_len(&name, p.length, bytes)?;
        let offset = base + p.offset;
        self.write_at(offset, bytes)
    }

    pub fn write_blob(&mut self, name: &str, bytes: &[u8]) -> Result<(), FormatError> {
        let b = self
            .header
            .blobs
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| FormatError::MissingTensor(format!("blob {name}")))?;
        check_len(name, b.length, bytes)?;
        let offset = b.offset;
        self.write_at(offset, bytes)
    }

    /// Pads the file to its full length, flushes and renames it into place.
    pub fn finish(self) -> Result<PathBuf, FormatError> {
        if self.written != self.expected {
            return Err(FormatError::Invalid(format!(
                "writer finished with {} of {} data bytes written",
                self.written, self.expected
            )));
        }
        let tmp = self.tmp.clone();
        let io = |e| FormatError::Io {
            path: tmp.clone(),
            source: e,
        };
        let end = self.data_start
            + self
                .header
                .tensors
                .iter()
                .map(|t| t.offset + t.length)
                .chain(self.header.blobs.iter().map(|b| b.offset + b.length))
                .chain(
                    self.header
                        .experts
                        .iter()
                        .flat_map(|t| t.offsets.iter().flatten().map(move |o| o + t.length)),
                )
                .max()
                .unwrap_or(0);
        let file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        file.set_len(end.max(self.data_start)).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| FormatError::Io {
            path: self.path.clone(),
            source: e,
        })?;
        Ok(self.path)
    }
}

fn check_len(name: &str, expected: u64, bytes: &[u8]) -> Result<(), FormatError> {
    if bytes.len() as u64 != expected {
        return Err(FormatError::LengthMismatch {
            name: name.to_string(),
            expected,
            stated: bytes.len() as u64,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::format::{DType, EdmFile};
    use crate::model::Architecture;
    use crate::synth::{self, SynthSpec};

    /// An expert's gate_up of 14 × 36 f32 (2016 bytes) leaves 32 bytes of padding before its down
    /// part (parts are 64-byte aligned): the file is complete without them being written.
    #[test]
    fn experts_whose_parts_need_padding_write_and_read_back() {
        let spec = SynthSpec {
            hidden: 36,
            expert_ffn: 7,
            ..SynthSpec::tiny(Architecture::Qwen3Moe)
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd.edm");
        synth::write_edm(&synth::build(&spec).unwrap(), &path, DType::F32, &|_, _| {}).unwrap();
        let f = EdmFile::open(&path).unwrap();
        let t = f.expert_table(0).unwrap();
        assert_eq!(t.parts[1].offset, 2048);
        let down = f.expert_part(0, 1, "down").unwrap().to_f32().unwrap();
        assert_eq!(down.len(), 36 * 7);
        assert!(down.iter().any(|v| *v != 0.0));
    }
}
