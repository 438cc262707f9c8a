//! Writing a checkpoint directory safely, and reading one back.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::manifest::{CheckpointInfo, FORMAT, Piece, Placement, RankManifest, StateKind};
use super::reshard::merge_shards;
use crate::{Error, Result};

/// The file in a save directory that names its newest complete checkpoint.
pub const LATEST: &str = "latest";

/// The environment variable that makes a save abort the process right before it is
/// committed when its iteration equals the value: fault injection, for testing that a
/// save cut off mid-way never looks complete.
const CRASH_BEFORE_COMMIT: &str = "BURN_MEGATRON_CRASH_BEFORE_COMMIT";

/// The directory of the checkpoint of `iteration` under `root`.
pub fn iteration_dir(root: &Path, iteration: usize) -> PathBuf {
    root.join(format!("iter_{iteration:07}"))
}

/// Where the checkpoint of `iteration` is written before it is complete.
pub fn staging_dir(root: &Path, iteration: usize) -> PathBuf {
    root.join(format!("iter_{iteration:07}.tmp"))
}

/// Creates an empty staging directory for the checkpoint of `iteration` (removing what
/// an earlier, interrupted save left there) and returns it. One rank calls it, before
/// the others write.
///
/// # Errors
///
/// When the directory cannot be made.
pub fn prepare_staging(root: &Path, iteration: usize) -> Result<PathBuf> {
    let staging = staging_dir(root, iteration);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    }
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    Ok(staging)
}

/// FNV-1a over 8-byte words (and the tail bytes): a fast check that a file is the one
/// that was written.
fn hash(bytes: &[u8]) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        h = (h ^ u64::from_le_bytes(word.try_into().expect("8 bytes")))
            .wrapping_mul(0x0100_0000_01b3);
    }
    for &byte in words.remainder() {
        h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Writes `bytes` to `path` and flushes them to the disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    file.write_all(bytes).map_err(|e| Error::io(path, e))?;
    file.sync_all().map_err(|e| Error::io(path, e))
}

/// Flushes a directory's entries (renames) to the disk, where the platform allows.
fn sync_dir(path: &Path) {
    if let Ok(dir) = std::fs::File::open(path) {
        let _ = dir.sync_all();
    }
}

/// Collects one rank's tensors and writes its file and manifest.
pub struct RankWriter {
    rank: usize,
    coords: [usize; 3],
    pieces: Vec<(Piece, Vec<f32>)>,
}

impl RankWriter {
    /// A writer for global rank `rank` at tensor-, pipeline- and data-parallel
    /// coordinates `coords`.
    pub fn new(rank: usize, coords: [usize; 3]) -> Self {
        Self {
            rank,
            coords,
            pieces: Vec::new(),
        }
    }

    /// Adds elements `offset ..` of the flattened part `placement` describes.
    pub fn add(&mut self, kind: StateKind, placement: Placement, offset: usize, values: Vec<f32>) {
        let key = format!(
            "{}/{}/tp{}/{offset}",
            kind.name(),
            placement.name,
            placement.tp_rank
        );
        let piece = Piece {
            key,
            kind,
            placement,
            offset,
            len: values.len(),
        };
        self.pieces.push((piece, values));
    }

    /// Writes `rank-NNNNN.safetensors` and `rank-NNNNN.json` into `dir`; returns the
    /// manifest's file name.
    ///
    /// # Errors
    ///
    /// When a file cannot be written.
    pub fn write(self, dir: &Path) -> Result<String> {
        let file = format!("rank-{:05}.safetensors", self.rank);
        let bytes: Vec<(String, Vec<u8>, usize)> = self
            .pieces
            .iter()
            .map(|(piece, values)| {
                let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (piece.key.clone(), data, values.len())
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(key, data, len)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*len], data)
                    .map(|view| (key.as_str(), view))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::InvalidData(format!("{file}: {e}")))?;
        let content = safetensors::serialize(views, None)
            .map_err(|e| Error::InvalidData(format!("{file}: {e}")))?;
        write_synced(&dir.join(&file), &content)?;
        let manifest = RankManifest {
            rank: self.rank,
            coords: self.coords,
            file,
            bytes: content.len() as u64,
            hash: hash(&content),
            pieces: self.pieces.into_iter().map(|(piece, _)| piece).collect(),
        };
        let name = format!("rank-{:05}.json", self.rank);
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        write_synced(&dir.join(&name), &json)?;
        Ok(name)
    }
}

/// Completes the checkpoint of `info.iteration` once every rank has written its files
/// into the staging directory: writes `checkpoint.json`, renames the directory to its
/// final name, then points `latest` at it. One rank calls it.
///
/// # Errors
///
/// When a file cannot be written or renamed.
pub fn commit(root: &Path, info: &CheckpointInfo) -> Result<PathBuf> {
    if std::env::var(CRASH_BEFORE_COMMIT)
        .ok()
        .and_then(|v| v.parse().ok())
        == Some(info.iteration)
    {
        eprintln!(
            "{CRASH_BEFORE_COMMIT}={}: aborting before the checkpoint is committed",
            info.iteration
        );
        std::process::abort();
    }
    let staging = staging_dir(root, info.iteration);
    let json = serde_json::to_vec_pretty(info).expect("checkpoint info serializes");
    write_synced(&staging.join("checkpoint.json"), &json)?;
    sync_dir(&staging);
    let final_dir = iteration_dir(root, info.iteration);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&staging, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    sync_dir(root);
    let name = final_dir
        .file_name()
        .expect("a directory name")
        .to_string_lossy()
        .into_owned();
    let pointer = root.join(format!("{LATEST}.tmp"));
    write_synced(&pointer, format!("{name}\n").as_bytes())?;
    std::fs::rename(&pointer, root.join(LATEST)).map_err(|e| Error::io(root.join(LATEST), e))?;
    sync_dir(root);
    Ok(final_dir)
}

/// Saves under `root` that never completed (cut off mid-write): they are ignored.
pub fn incomplete_saves(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            name.is_some_and(|n| n.starts_with("iter_"))
                && path.is_dir()
                && !path.join("checkpoint.json").is_file()
        })
        .collect();
    found.sort();
    found
}

/// The newest complete checkpoint under `root` by directory name.
fn newest_complete(root: &Path) -> Option<PathBuf> {
    let mut complete: Vec<PathBuf> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            name.is_some_and(|n| n.starts_with("iter_") && !n.ends_with(".tmp"))
                && path.join("checkpoint.json").is_file()
        })
        .collect();
    complete.sort();
    complete.pop()
}

/// A tensor's bytes inside a rank file: the file and the byte range.
struct Location {
    file: usize,
    bytes: std::ops::Range<usize>,
    piece: Piece,
}

/// An opened, verified checkpoint.
pub struct Checkpoint {
    dir: PathBuf,
    info: CheckpointInfo,
    files: Vec<memmap2::Mmap>,
    /// `(kind, name)` to the pieces holding it.
    tensors: BTreeMap<(StateKind, String), Vec<Location>>,
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::InvalidData(format!("{}: {what}", path.display()))
}

impl Checkpoint {
    /// Opens the checkpoint at `path`: a checkpoint directory, or a save directory (the
    /// checkpoint `latest` names, or else the newest complete one).
    ///
    /// # Errors
    ///
    /// When there is no complete checkpoint, or a file is missing, truncated, corrupt
    /// (its hash differs from the one written) or malformed; the error names the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let dir = Self::resolve(path)?;
        let info_path = dir.join("checkpoint.json");
        let text = std::fs::read(&info_path).map_err(|e| Error::io(&info_path, e))?;
        let info: CheckpointInfo =
            serde_json::from_slice(&text).map_err(|e| invalid(&info_path, e))?;
        if info.format != FORMAT {
            return Err(invalid(
                &info_path,
                format!("format {:?}, this version reads {FORMAT:?}", info.format),
            ));
        }
        let mut files = Vec::new();
        let mut tensors: BTreeMap<(StateKind, String), Vec<Location>> = BTreeMap::new();
        for manifest_name in &info.ranks {
            let manifest_path = dir.join(manifest_name);
            let text = std::fs::read(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
            let manifest: RankManifest =
                serde_json::from_slice(&text).map_err(|e| invalid(&manifest_path, e))?;
            let file_path = dir.join(&manifest.file);
            let file = std::fs::File::open(&file_path).map_err(|e| Error::io(&file_path, e))?;
            // Safety: a read-only map of a finished checkpoint; every range read from it
            // is checked against its length first.
            let bytes =
                unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&file_path, e))?;
            if bytes.len() as u64 != manifest.bytes {
                return Err(invalid(
                    &file_path,
                    format!(
                        "{} bytes, {} were written: the file is truncated or corrupt",
                        bytes.len(),
                        manifest.bytes
                    ),
                ));
            }
            if hash(&bytes) != manifest.hash {
                return Err(invalid(
                    &file_path,
                    "its contents differ from what was written (hash mismatch): the file is corrupt",
                ));
            }
            let (header, metadata) = safetensors::SafeTensors::read_metadata(&bytes)
                .map_err(|e| invalid(&file_path, e))?;
            let tensors_info = metadata.tensors();
            for piece in manifest.pieces {
                let stored = tensors_info.get(&piece.key).ok_or_else(|| {
                    invalid(&file_path, format!("no tensor {} in the file", piece.key))
                })?;
                let (start, end) = stored.data_offsets;
                if stored.dtype != safetensors::Dtype::F32 || (end - start) != 4 * piece.len {
                    return Err(invalid(
                        &file_path,
                        format!("tensor {} is not {} f32 values", piece.key, piece.len),
                    ));
                }
                let base = 8 + header;
                tensors
                    .entry((piece.kind, piece.placement.name.clone()))
                    .or_default()
                    .push(Location {
                        file: files.len(),
                        bytes: base + start..base + end,
                        piece,
                    });
            }
            files.push(bytes);
        }
        Ok(Self {
            dir,
            info,
            files,
            tensors,
        })
    }

    fn resolve(path: &Path) -> Result<PathBuf> {
        if path.join("checkpoint.json").is_file() {
            return Ok(path.to_path_buf());
        }
        if !path.is_dir() {
            return Err(Error::InvalidConfig(format!(
                "--load {}: no such directory",
                path.display()
            )));
        }
        let latest = path.join(LATEST);
        if let Ok(name) = std::fs::read_to_string(&latest) {
            let dir = path.join(name.trim());
            if dir.join("checkpoint.json").is_file() {
                return Ok(dir);
            }
        }
        newest_complete(path).ok_or_else(|| {
            let incomplete = incomplete_saves(path);
            let note = if incomplete.is_empty() {
                String::new()
            } else {
                format!(
                    " (incomplete saves, ignored: {})",
                    incomplete
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            Error::InvalidConfig(format!(
                "--load {}: no complete checkpoint there{note}",
                path.display()
            ))
        })
    }

    /// The checkpoint's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What `checkpoint.json` says.
    pub fn info(&self) -> &CheckpointInfo {
        &self.info
    }

    /// Whether the checkpoint holds optimizer state.
    pub fn has_optimizer_state(&self) -> bool {
        self.info.optimizer_steps.is_some()
    }

    /// The names and full shapes of the tensors of `kind`, in name order.
    pub fn names(&self, kind: StateKind) -> Vec<(String, Vec<usize>)> {
        self.tensors
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|((_, name), pieces)| {
                (name.clone(), pieces[0].piece.placement.global_shape.clone())
            })
            .collect()
    }

    /// The dimension tensor `kind` `name` is split along over tensor-parallel ranks
    /// (`None`: replicated or absent).
    pub fn split_of(&self, kind: StateKind, name: &str) -> Option<usize> {
        self.tensors
            .get(&(kind, name.to_string()))
            .and_then(|pieces| pieces[0].piece.placement.split_dim)
    }

    /// The full tensor of `kind` and `name` (f32, row-major) and its shape, merged from
    /// every rank's pieces; `None` when the checkpoint does not hold it.
    ///
    /// # Errors
    ///
    /// When the pieces do not cover the tensor.
    pub fn full(&self, kind: StateKind, name: &str) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        let Some(locations) = self.tensors.get(&(kind, name.to_string())) else {
            return Ok(None);
        };
        let first = &locations[0].piece.placement;
        let (local, global, split) = (&first.local_shape, &first.global_shape, first.split_dim);
        let parts_needed = if split.is_some() { first.tp_size } else { 1 };
        let local_len: usize = local.iter().product();
        let mut parts = vec![vec![0f32; local_len]; parts_needed];
        let mut filled = vec![0usize; parts_needed];
        for location in locations {
            let piece = &location.piece;
            let place = &piece.placement;
            if place.local_shape != *local
                || place.global_shape != *global
                || place.split_dim != split
            {
                return Err(invalid(
                    &self.dir,
                    format!("the pieces of {} {name} disagree on its shape", kind.name()),
                ));
            }
            let part = if split.is_some() { place.tp_rank } else { 0 };
            if part >= parts_needed || piece.offset + piece.len > local_len {
                return Err(invalid(
                    &self.dir,
                    format!("a piece of {} {name} lies outside the tensor", kind.name()),
                ));
            }
            let bytes = &self.files[location.file][location.bytes.clone()];
            for (slot, value) in parts[part][piece.offset..piece.offset + piece.len]
                .iter_mut()
                .zip(bytes.chunks_exact(4))
            {
                *slot = f32::from_le_bytes(value.try_into().expect("4 bytes"));
            }
            filled[part] += piece.len;
        }
        if let Some(part) = (0..parts_needed).find(|&p| filled[p] != local_len) {
            return Err(invalid(
                &self.dir,
                format!(
                    "{} {name}: tensor-parallel part {part} has {} of its {local_len} elements",
                    kind.name(),
                    filled[part]
                ),
            ));
        }
        let values = merge_shards(&parts, local, global, split)?;
        Ok(Some((values, global.clone())))
    }
}
