//! The legacy `TNTIDX` indexed format of early Megatron (and fairseq), read in its two
//! modes: lazy (each item read from disk when asked) and cached (the whole `.bin` read
//! into memory at open).
//!
//! `.idx`, little-endian: magic `TNTIDX\0\0`, u64 version (1), u64 dtype code, u64
//! element size, u64 items, u64 size entries, u64 documents, then i64 dim offsets
//! (items + 1), i64 data offsets (items + 1, in elements), i64 sizes, i64 document
//! indices.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::dtype::DType;
use super::indexed::{dataset_paths, read_u64};
use crate::{Error, Result};

/// How a legacy dataset reads its `.bin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegacyMode {
    /// Read each item from the file when asked.
    Lazy,
    /// Read the whole file into memory when opening.
    Cached,
}

enum Data {
    Lazy(File),
    Cached(Vec<u8>),
}

/// A dataset in the legacy `TNTIDX` format.
pub struct LegacyIndexedDataset {
    prefix: PathBuf,
    dtype: DType,
    dim_offsets: Vec<u64>,
    data_offsets: Vec<u64>,
    sizes: Vec<u64>,
    document_index: Vec<u64>,
    data: Data,
    data_len: u64,
}

impl std::fmt::Debug for LegacyIndexedDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegacyIndexedDataset")
            .field("prefix", &self.prefix)
            .field("dtype", &self.dtype)
            .field("items", &self.len())
            .finish()
    }
}

impl LegacyIndexedDataset {
    /// Opens `{prefix}.idx` and `{prefix}.bin` in the given mode.
    ///
    /// # Errors
    ///
    /// `Io` when a file cannot be read; `InvalidData` naming the file when the index is
    /// malformed.
    pub fn open(prefix: impl AsRef<Path>, mode: LegacyMode) -> Result<Self> {
        let prefix = prefix.as_ref().to_path_buf();
        let (idx_path, bin_path) = dataset_paths(&prefix);
        let bytes = std::fs::read(&idx_path).map_err(|e| Error::io(&idx_path, e))?;
        let corrupt = |what: String| Error::InvalidData(format!("{}: {what}", idx_path.display()));
        if bytes.len() < 56 || &bytes[..8] != b"TNTIDX\x00\x00" {
            return Err(corrupt(
                "not a legacy TNTIDX index (too short or bad magic)".to_string(),
            ));
        }
        let header: Vec<u64> = (0..6).map(|i| read_u64(&bytes[8 + 8 * i..])).collect();
        let [version, code, element_size, items, size_entries, documents] = header[..] else {
            unreachable!("six header fields")
        };
        if version != 1 {
            return Err(corrupt(format!("unsupported TNTIDX version {version}")));
        }
        // Legacy codes 6 and 7 were both float64.
        let dtype = match code {
            6 | 7 => DType::F64,
            code => DType::from_code(code)?,
        };
        if dtype.size() as u64 != element_size {
            return Err(corrupt(format!(
                "element size {element_size} does not match dtype code {code}"
            )));
        }
        let counts = [
            items.checked_add(1),
            items.checked_add(1),
            Some(size_entries),
            Some(documents),
        ];
        let needed = counts.iter().try_fold(56u64, |total, count| {
            total.checked_add((*count)?.checked_mul(8)?)
        });
        if needed != Some(bytes.len() as u64) {
            return Err(corrupt(format!(
                "truncated or corrupt index: {} bytes for {items} items, {size_entries} size \
                 entries and {documents} documents",
                bytes.len()
            )));
        }
        let mut at = 56;
        let mut array = |count: u64| -> Result<Vec<u64>> {
            (0..count)
                .map(|_| {
                    let value = i64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
                    at += 8;
                    u64::try_from(value).map_err(|_| corrupt(format!("negative entry {value}")))
                })
                .collect()
        };
        let dim_offsets = array(items + 1)?;
        let data_offsets = array(items + 1)?;
        let sizes = array(size_entries)?;
        let document_index = array(documents)?;
        let monotonic = |values: &[u64], limit: u64| {
            values.windows(2).all(|w| w[0] <= w[1]) && values.last().is_none_or(|&v| v <= limit)
        };
        if !monotonic(&dim_offsets, size_entries) || !monotonic(&data_offsets, u64::MAX / 8) {
            return Err(corrupt(
                "offsets are not increasing or exceed the arrays".to_string(),
            ));
        }
        let data_file = File::open(&bin_path).map_err(|e| Error::io(&bin_path, e))?;
        let data_len = data_file
            .metadata()
            .map_err(|e| Error::io(&bin_path, e))?
            .len();
        let data = match mode {
            LegacyMode::Lazy => Data::Lazy(data_file),
            LegacyMode::Cached => {
                Data::Cached(std::fs::read(&bin_path).map_err(|e| Error::io(&bin_path, e))?)
            }
        };
        Ok(Self {
            prefix,
            dtype,
            dim_offsets,
            data_offsets,
            sizes,
            document_index,
            data,
            data_len,
        })
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.data_offsets.len() - 1
    }

    /// Whether there are no items.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The document index (first item of each document, then the item count).
    pub fn document_index(&self) -> &[u64] {
        &self.document_index
    }

    /// The dimensions of item `item`.
    ///
    /// # Errors
    ///
    /// When `item` is out of range.
    pub fn item_shape(&self, item: usize) -> Result<&[u64]> {
        self.check(item)?;
        let (start, end) = (
            self.dim_offsets[item] as usize,
            self.dim_offsets[item + 1] as usize,
        );
        Ok(&self.sizes[start..end])
    }

    fn check(&self, item: usize) -> Result<()> {
        if item >= self.len() {
            return Err(Error::InvalidData(format!(
                "{}: item {item} is out of range ({} items)",
                self.prefix.display(),
                self.len()
            )));
        }
        Ok(())
    }

    /// The elements of item `item` as token ids, flattened.
    ///
    /// # Errors
    ///
    /// When `item` is out of range, the data is truncated or unreadable, or the elements
    /// are floats.
    pub fn tokens(&self, item: usize) -> Result<Vec<i64>> {
        self.check(item)?;
        if !self.dtype.is_integer() {
            return Err(Error::InvalidData(format!(
                "{}: elements are {:?}, not token ids",
                self.prefix.display(),
                self.dtype
            )));
        }
        let size = self.dtype.size() as u64;
        let (start, end) = (
            self.data_offsets[item] * size,
            self.data_offsets[item + 1] * size,
        );
        let (_, bin_path) = dataset_paths(&self.prefix);
        if end > self.data_len {
            return Err(Error::InvalidData(format!(
                "{}: truncated data: item {item} needs bytes up to {end}, the file has {}",
                bin_path.display(),
                self.data_len
            )));
        }
        let bytes = match &self.data {
            Data::Cached(all) => all[start as usize..end as usize].to_vec(),
            Data::Lazy(file) => {
                let mut buffer = vec![0u8; (end - start) as usize];
                read_at(file, &mut buffer, start).map_err(|e| Error::io(&bin_path, e))?;
                buffer
            }
        };
        Ok(bytes
            .chunks_exact(size as usize)
            .map(|element| self.dtype.decode_token(element))
            .collect())
    }
}

#[cfg(unix)]
fn read_at(file: &File, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buffer, offset)
}

#[cfg(not(unix))]
fn read_at(file: &File, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = file.try_clone()?;
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buffer)
}
