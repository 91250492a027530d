//! Read-ahead of paged experts on reader threads: the bytes of experts about to be paged in are
//! read from the model file (positional reads, not through the mapping) into host staging
//! buffers by a few std threads, while the calling thread uploads earlier ones or waits for the GPU.
//!
//! The reader only reads: which expert goes into which slot, and when, is still decided by the
//! [`Pager`](super::Pager) on the calling thread, in the same order as without read-ahead. A staged
//! expert is the same file bytes the calling thread would have read, so paging with read-ahead is
//! bit-identical to paging without it and its hits, misses, evictions and bytes read are the same;
//! only where the read happens (and so the stall) changes. A guess that turns out unneeded costs a
//! read and is dropped.
//!
//! Host memory: at most `limit` experts are staged or being read at once (the caller sizes it from
//! a byte budget); nothing of a paged expert is mapped into the process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::ExpertKey;
use crate::format::{EdmFile, FormatError};
use crate::model::names;

/// The file bytes of one expert's parts, in [`STAGED_PARTS`] order.
pub struct StagedExpert {
    pub parts: [Vec<u8>; 2],
}

/// The parts a staged expert holds.
pub const STAGED_PARTS: [&str; 2] = [names::EXPERT_GATE_UP, names::EXPERT_DOWN];

enum Entry {
    /// Asked for; a reader will fill it (or has it in hand).
    Pending,
    Ready(Result<StagedExpert, FormatError>),
}

struct Staging {
    entries: Mutex<HashMap<ExpertKey, Entry>>,
    changed: Condvar,
    /// Reader threads still running (a panicking one must not leave a waiter hanging).
    alive: AtomicUsize,
}

/// Whether [`ExpertReader::stage`] took the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Queued,
    /// Already staged or being read.
    Present,
    /// `limit` experts are staged already.
    Full,
}

/// A few reader threads and the experts they have staged.
pub struct ExpertReader {
    file: Arc<EdmFile>,
    jobs: Option<Sender<ExpertKey>>,
    staging: Arc<Staging>,
    workers: Vec<JoinHandle<()>>,
    limit: usize,
}

/// Counts a reader thread out when it ends, even by a panic.
struct AliveGuard(Arc<Staging>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_all();
    }
}

fn read(file: &EdmFile, key: ExpertKey) -> Result<StagedExpert, FormatError> {
    // Positional reads into the staged buffers: nothing of the expert is mapped in this process.
    let part = |name| -> Result<Vec<u8>, FormatError> {
        let mut bytes = Vec::new();
        file.read_expert_part(key.layer, key.expert, name, &mut bytes)?;
        Ok(bytes)
    };
    Ok(StagedExpert {
        parts: [part(STAGED_PARTS[0])?, part(STAGED_PARTS[1])?],
    })
}

fn work(file: Arc<EdmFile>, jobs: Arc<Mutex<Receiver<ExpertKey>>>, staging: Arc<Staging>) {
    let _alive = AliveGuard(staging.clone());
    let wanted = |key| {
        matches!(
            staging
                .entries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key),
            Some(Entry::Pending)
        )
    };
    loop {
        let key = {
            let rx = jobs.lock().unwrap_or_else(|p| p.into_inner());
            match rx.recv() {
                Ok(k) => k,
                // The reader was dropped.
                Err(_) => return,
            }
        };
        // Dropped (or already read for an earlier request) while queued: skip the read.
        if !wanted(key) {
            continue;
        }
        let got = read(&file, key);
        let mut entries = staging.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e @ Entry::Pending) = entries.get_mut(&key) {
            *e = Entry::Ready(got);
        }
        drop(entries);
        staging.changed.notify_all();
    }
}

impl ExpertReader {
    /// `threads` reader threads over `file`, staging at most `limit` experts (≥ 1) at once.
    pub fn new(file: Arc<EdmFile>, threads: usize, limit: usize) -> std::io::Result<ExpertReader> {
        let (tx, rx) = channel();
        let jobs = Arc::new(Mutex::new(rx));
        let staging = Arc::new(Staging {
            entries: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            alive: AtomicUsize::new(0),
        });
        let mut reader = ExpertReader {
            file: file.clone(),
            jobs: Some(tx),
            staging: staging.clone(),
            workers: Vec::new(),
            limit: limit.max(1),
        };
        for i in 0..threads.max(1) {
            let (file, jobs, mine) = (file.clone(), jobs.clone(), staging.clone());
            staging.alive.fetch_add(1, Ordering::SeqCst);
            let spawned = std::thread::Builder::new()
                .name(format!("expert-reader-{i}"))
                .spawn(move || work(file, jobs, mine));
            match spawned {
                Ok(h) => reader.workers.push(h),
                Err(e) => {
                    staging.alive.fetch_sub(1, Ordering::SeqCst);
                    // Dropping `reader` joins the threads already started.
                    return Err(e);
                }
            }
        }
        Ok(reader)
    }

    /// Asks for `key` to be read ahead.
    pub fn stage(&self, key: ExpertKey) -> Stage {
        let mut entries = self
            .staging
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if entries.contains_key(&key) {
            return Stage::Present;
        }
        if entries.len() >= self.limit {
            return Stage::Full;
        }
        let Some(tx) = &self.jobs else {
            return Stage::Full;
        };
        if tx.send(key).is_err() {
            return Stage::Full;
        }
        entries.insert(key, Entry::Pending);
        // The flash read starts now, whichever reader thread takes the job.
        self.file.will_need_expert(key.layer, key.expert);
        Stage::Queued
    }

    /// The staged bytes of `key`, waiting for a reader that has it in hand; `None` when it was
    /// never staged (or every reader thread is gone): the caller reads it itself.
    pub fn take(&self, key: ExpertKey) -> Option<Result<StagedExpert, FormatError>> {
        let mut entries = self
            .staging
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        loop {
            match entries.get(&key) {
                None => return None,
                Some(Entry::Ready(_)) => match entries.remove(&key) {
                    Some(Entry::Ready(r)) => return Some(r),
                    _ => unreachable!("checked above"),
                },
                Some(Entry::Pending) if self.staging.alive.load(Ordering::SeqCst) == 0 => {
                    entries.remove(&key);
                    return None;
                }
                Some(Entry::Pending) => {
                    entries = self
                        .staging
                        .changed
                        .wait(entries)
                        .unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }

    /// Drops every staged (or queued) expert `unwanted` selects; a read in hand finishes and is
    /// thrown away.
    pub fn discard(&self, unwanted: impl Fn(ExpertKey) -> bool) {
        self.staging
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|&k, _| !unwanted(k));
    }

    /// Experts staged or being read.
    pub fn staged(&self) -> usize {
        self.staging
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl Drop for ExpertReader {
    fn drop(&mut self) {
        // Closing the channel ends each thread after its current read.
        self.jobs = None;
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::DType;
    use crate::model::Architecture;
    use crate::synth::{self, SynthSpec};

    fn file(dir: &std::path::Path) -> Arc<EdmFile> {
        let spec = SynthSpec {
            experts: 8,
            top_k: 2,
            ..SynthSpec::tiny(Architecture::Qwen3Moe)
        };
        let path = dir.join("reader.edm");
        synth::write_edm(&synth::build(&spec).unwrap(), &path, DType::Q4, &|_, _| {}).unwrap();
        Arc::new(EdmFile::open(path).unwrap())
    }

    #[test]
    fn staged_experts_hold_the_file_bytes_and_respect_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(dir.path());
        let layer = f.header.experts[0].layer;
        let r = ExpertReader::new(f.clone(), 2, 3).unwrap();
        assert_eq!(r.stage(ExpertKey::new(layer, 0)), Stage::Queued);
        assert_eq!(r.stage(ExpertKey::new(layer, 0)), Stage::Present);
        assert_eq!(r.stage(ExpertKey::new(layer, 1)), Stage::Queued);
        assert_eq!(r.stage(ExpertKey::new(layer, 2)), Stage::Queued);
        assert_eq!(r.stage(ExpertKey::new(layer, 3)), Stage::Full);
        for e in 0..3 {
            let got = r.take(ExpertKey::new(layer, e)).expect("staged").unwrap();
            for (bytes, name) in got.parts.iter().zip(STAGED_PARTS) {
                assert_eq!(bytes[..], *f.expert_part(layer, e, name).unwrap().bytes);
            }
        }
        // Taken experts leave the staging area; one never staged is the caller's to read.
        assert_eq!(r.staged(), 0);
        assert!(r.take(ExpertKey::new(layer, 0)).is_none());
        assert!(r.take(ExpertKey::new(layer, 5)).is_none());
    }

    #[test]
    fn discarded_experts_are_not_returned_and_a_missing_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(dir.path());
        let layer = f.header.experts[0].layer;
        let r = ExpertReader::new(f.clone(), 1, 8).unwrap();
        r.stage(ExpertKey::new(layer, 4));
        r.stage(ExpertKey::new(layer, 5));
        r.discard(|k| k.expert == 4);
        assert!(r.take(ExpertKey::new(layer, 4)).is_none());
        assert!(r.take(ExpertKey::new(layer, 5)).unwrap().is_ok());
        // Expert 99 does not exist: the reader's error reaches the caller.
        r.stage(ExpertKey::new(layer, 99));
        assert!(matches!(
            r.take(ExpertKey::new(layer, 99)),
            Some(Err(FormatError::MissingTensor(_)))
        ));
    }
}
