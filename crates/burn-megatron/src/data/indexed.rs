//! Megatron's indexed dataset, MMIDIDX format: a `.bin` of token arrays back to back and
//! an `.idx` that says where each sequence starts and which sequences form a document.
//!
//! The reader memory-maps both files and checks every access against their sizes, so a
//! truncated or corrupt file gives an error naming it, never a panic or an out-of-bounds
//! read. The arrays of `.idx` start at byte 34 and are not aligned: they are decoded
//! byte-wise.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::{Deref, Range};
use std::path::{Path, PathBuf};

use super::dtype::{DType, Element};
use crate::{Error, Result};

/// The first 9 bytes of an MMIDIDX `.idx` file.
pub const MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";
const HEADER_LEN: usize = 34;

/// The `.idx` and `.bin` paths of a dataset prefix.
pub fn dataset_paths(prefix: impl AsRef<Path>) -> (PathBuf, PathBuf) {
    let prefix = prefix.as_ref().as_os_str();
    let with = |extension: &str| {
        let mut path = prefix.to_os_string();
        path.push(extension);
        PathBuf::from(path)
    };
    (with(".idx"), with(".bin"))
}

/// The header of an `.idx` file, checked against the file's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexHeader {
    /// Element type of `.bin`.
    pub dtype: DType,
    /// Number of sequences.
    pub sequences: usize,
    /// Number of document-index entries (documents + 1).
    pub document_entries: usize,
    /// Whether per-sequence modes follow the document index (multimodal data).
    pub has_modes: bool,
}

impl IndexHeader {
    /// Parses and checks the header of `.idx` contents.
    ///
    /// # Errors
    ///
    /// `InvalidData` saying what is wrong: bad magic (or a legacy TNTIDX file), another
    /// version, an unknown dtype, counts that do not fit the file's length.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < HEADER_LEN {
            if bytes.starts_with(b"TNTIDX\x00\x00") {
                return Err(Error::InvalidData(legacy_message()));
            }
            return Err(Error::InvalidData(format!(
                "truncated index: {} bytes, the MMIDIDX header needs {HEADER_LEN}",
                bytes.len()
            )));
        }
        if &bytes[..9] != MAGIC {
            if bytes.starts_with(b"TNTIDX\x00\x00") {
                return Err(Error::InvalidData(legacy_message()));
            }
            return Err(Error::InvalidData(
                "not an MMIDIDX index: the file does not start with \"MMIDIDX\\0\\0\"".to_string(),
            ));
        }
        let version = read_u64(&bytes[9..17]);
        if version != 1 {
            return Err(Error::InvalidData(format!(
                "unsupported MMIDIDX version {version} (only version 1 exists)"
            )));
        }
        let dtype = DType::from_code(bytes[17] as u64)?;
        let sequences = read_u64(&bytes[18..26]);
        let document_entries = read_u64(&bytes[26..34]);
        let needed = sequences
            .checked_mul(12)
            .and_then(|n| document_entries.checked_mul(8)?.checked_add(n))
            .and_then(|n| n.checked_add(HEADER_LEN as u64))
            .filter(|&n| n <= usize::MAX as u64)
            .ok_or_else(|| {
                Error::InvalidData(format!(
                    "corrupt index: {sequences} sequences and {document_entries} document \
                     entries overflow any file size"
                ))
            })? as usize;
        let has_modes = match bytes.len().checked_sub(needed) {
            Some(0) => false,
            Some(extra) if extra as u64 == sequences => true,
            Some(extra) => {
                return Err(Error::InvalidData(format!(
                    "corrupt index: {extra} bytes after the arrays of {sequences} sequences and \
                     {document_entries} document entries"
                )));
            }
            None => {
                return Err(Error::InvalidData(format!(
                    "truncated index: {} bytes, but {sequences} sequences and \
                     {document_entries} document entries need {needed}",
                    bytes.len()
                )));
            }
        };
        if document_entries == 0 {
            return Err(Error::InvalidData(
                "corrupt index: the document index is empty (it always holds a leading 0)"
                    .to_string(),
            ));
        }
        Ok(Self {
            dtype,
            sequences: sequences as usize,
            document_entries: document_entries as usize,
            has_modes,
        })
    }
}

/// A little-endian `u64` from the first 8 bytes of `bytes`.
pub(crate) fn read_u64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))
}

fn legacy_message() -> String {
    "this is a legacy TNTIDX index: read it with LegacyIndexedDataset (lazy or cached)".to_string()
}

/// File contents: memory-mapped, or owned when the file is empty (which cannot be mapped).
enum Contents {
    Mapped(memmap2::Mmap),
    Empty,
}

impl Deref for Contents {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Contents::Mapped(map) => map,
            Contents::Empty => &[],
        }
    }
}

fn map_file(path: &Path) -> Result<Contents> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let length = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if length == 0 {
        return Ok(Contents::Empty);
    }
    // Safety: the map is read-only; the datasets are not modified while training reads
    // them (a concurrent writer could change the bytes under us, but every read is
    // bounds-checked against the length taken here, so it cannot read out of bounds).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(Contents::Mapped(map))
}

/// A memory-mapped Megatron indexed dataset (`{prefix}.idx` + `{prefix}.bin`).
pub struct IndexedDataset {
    prefix: PathBuf,
    header: IndexHeader,
    index: Contents,
    data: Contents,
}

impl std::fmt::Debug for IndexedDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexedDataset")
            .field("prefix", &self.prefix)
            .field("header", &self.header)
            .finish()
    }
}

impl IndexedDataset {
    /// Opens `{prefix}.idx` and `{prefix}.bin`.
    ///
    /// # Errors
    ///
    /// `Io` when a file cannot be read; `InvalidData` naming the file when the index is
    /// malformed.
    pub fn open(prefix: impl AsRef<Path>) -> Result<Self> {
        let prefix = prefix.as_ref().to_path_buf();
        let (idx_path, bin_path) = dataset_paths(&prefix);
        let index = map_file(&idx_path)?;
        let header = IndexHeader::parse(&index).map_err(|error| in_file(&idx_path, error))?;
        let data = map_file(&bin_path)?;
        Ok(Self {
            prefix,
            header,
            index,
            data,
        })
    }

    /// The path prefix.
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// The parsed header.
    pub fn header(&self) -> &IndexHeader {
        &self.header
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.header.dtype
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.header.sequences
    }

    /// Whether there are no sequences.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of documents.
    pub fn documents(&self) -> usize {
        self.header.document_entries - 1
    }

    /// Size of `.bin` in bytes.
    pub fn data_bytes(&self) -> usize {
        self.data.len()
    }

    fn corrupt(&self, what: String) -> Error {
        let (idx_path, _) = dataset_paths(&self.prefix);
        Error::InvalidData(format!("{}: corrupt index: {what}", idx_path.display()))
    }

    fn check_sequence(&self, sequence: usize) -> Result<()> {
        if sequence >= self.len() {
            return Err(Error::InvalidData(format!(
                "{}: sequence {sequence} is out of range ({} sequences)",
                self.prefix.display(),
                self.len()
            )));
        }
        Ok(())
    }

    /// Length of a sequence, in elements.
    ///
    /// # Errors
    ///
    /// When `sequence` is out of range or its stored length is negative.
    pub fn sequence_length(&self, sequence: usize) -> Result<usize> {
        self.check_sequence(sequence)?;
        let at = HEADER_LEN + 4 * sequence;
        let length = i32::read_le(&self.index[at..]);
        usize::try_from(length)
            .map_err(|_| self.corrupt(format!("sequence {sequence} has length {length}")))
    }

    /// All sequence lengths.
    ///
    /// # Errors
    ///
    /// When a stored length is negative.
    pub fn sequence_lengths(&self) -> Result<Vec<u32>> {
        (0..self.len())
            .map(|sequence| self.sequence_length(sequence).map(|l| l as u32))
            .collect()
    }

    /// Byte offset of a sequence in `.bin`.
    ///
    /// # Errors
    ///
    /// When `sequence` is out of range or its stored pointer is negative.
    pub fn sequence_pointer(&self, sequence: usize) -> Result<usize> {
        self.check_sequence(sequence)?;
        let at = HEADER_LEN + 4 * self.len() + 8 * sequence;
        let pointer = i64::read_le(&self.index[at..]);
        usize::try_from(pointer)
            .map_err(|_| self.corrupt(format!("sequence {sequence} has pointer {pointer}")))
    }

    /// Entry `entry` of the document index (`0..=documents()`).
    ///
    /// # Errors
    ///
    /// When `entry` is out of range or the stored value is outside `0..=len()`.
    pub fn document_index(&self, entry: usize) -> Result<usize> {
        if entry >= self.header.document_entries {
            return Err(Error::InvalidData(format!(
                "{}: document index entry {entry} is out of range ({} entries)",
                self.prefix.display(),
                self.header.document_entries
            )));
        }
        let at = HEADER_LEN + 12 * self.len() + 8 * entry;
        let value = i64::read_le(&self.index[at..]);
        usize::try_from(value)
            .ok()
            .filter(|&v| v <= self.len())
            .ok_or_else(|| {
                self.corrupt(format!(
                    "document index entry {entry} is {value}, outside 0..={}",
                    self.len()
                ))
            })
    }

    /// The sequences of document `document`.
    ///
    /// # Errors
    ///
    /// When `document` is out of range or the document index is corrupt.
    pub fn document_sequences(&self, document: usize) -> Result<Range<usize>> {
        let start = self.document_index(document)?;
        let end = self.document_index(document + 1)?;
        if end < start {
            return Err(self.corrupt(format!(
                "document {document} ends at sequence {end} before it starts at {start}"
            )));
        }
        Ok(start..end)
    }

    /// The modes of the sequences (multimodal data), if the index has them.
    pub fn sequence_modes(&self) -> Option<Vec<i8>> {
        self.header.has_modes.then(|| {
            let at = HEADER_LEN + 12 * self.len() + 8 * self.header.document_entries;
            self.index[at..at + self.len()]
                .iter()
                .map(|&b| b as i8)
                .collect()
        })
    }

    /// The bytes of elements `[offset, offset + length)` of a sequence (`length`
    /// `None`: to its end).
    fn element_bytes(
        &self,
        sequence: usize,
        offset: usize,
        length: Option<usize>,
    ) -> Result<&[u8]> {
        let sequence_length = self.sequence_length(sequence)?;
        let length = length.unwrap_or(sequence_length.saturating_sub(offset));
        if offset
            .checked_add(length)
            .is_none_or(|end| end > sequence_length)
        {
            return Err(Error::InvalidData(format!(
                "{}: elements {offset}..{} are outside sequence {sequence} of length \
                 {sequence_length}",
                self.prefix.display(),
                offset.saturating_add(length)
            )));
        }
        let size = self.dtype().size();
        let start = self.sequence_pointer(sequence)? + offset * size;
        let end = start + length * size;
        if end > self.data.len() {
            let (_, bin_path) = dataset_paths(&self.prefix);
            return Err(Error::InvalidData(format!(
                "{}: truncated data: sequence {sequence} needs bytes up to {end}, the file has {}",
                bin_path.display(),
                self.data.len()
            )));
        }
        Ok(&self.data[start..end])
    }

    /// Token ids `[offset, offset + length)` of a sequence (`length` `None`: to its end).
    ///
    /// # Errors
    ///
    /// When the range is outside the sequence, the data is truncated, or the elements are
    /// floats.
    pub fn tokens(
        &self,
        sequence: usize,
        offset: usize,
        length: Option<usize>,
    ) -> Result<Vec<i64>> {
        let dtype = self.dtype();
        if !dtype.is_integer() {
            return Err(Error::InvalidData(format!(
                "{}: elements are {dtype:?}, not token ids",
                self.prefix.display()
            )));
        }
        let bytes = self.element_bytes(sequence, offset, length)?;
        Ok(bytes
            .chunks_exact(dtype.size())
            .map(|element| dtype.decode_token(element))
            .collect())
    }

    /// A whole sequence as native values of its type.
    ///
    /// # Errors
    ///
    /// When `T` is not the dataset's type, or as [`tokens`](Self::tokens).
    pub fn sequence<T: Element>(&self, sequence: usize) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype() {
            return Err(Error::InvalidData(format!(
                "{}: elements are {:?}, not {:?}",
                self.prefix.display(),
                self.dtype(),
                T::DTYPE
            )));
        }
        let bytes = self.element_bytes(sequence, 0, None)?;
        Ok(bytes
            .chunks_exact(T::DTYPE.size())
            .map(T::read_le)
            .collect())
    }
}

fn in_file(path: &Path, error: Error) -> Error {
    match error {
        Error::InvalidData(message) => Error::InvalidData(format!("{}: {message}", path.display())),
        other => other,
    }
}

/// Writes a Megatron indexed dataset. The files appear under their names only when
/// [`finish`](Self::finish) succeeds (they are written under temporary names and renamed), so a
/// crash never leaves a dataset that looks complete.
pub struct IndexedDatasetBuilder {
    prefix: PathBuf,
    dtype: DType,
    data: BufWriter<File>,
    sequence_lengths: Vec<i32>,
    document_indices: Vec<i64>,
    modes: Option<Vec<i8>>,
    scratch: Vec<u8>,
}

/// Where `path` is written before it is renamed into place: a name of this process's own,
/// so that concurrent writers of the same dataset never share a file.
fn temporary(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    PathBuf::from(name)
}

impl IndexedDatasetBuilder {
    /// Starts `{prefix}.bin` / `{prefix}.idx` with elements of `dtype`.
    ///
    /// # Errors
    ///
    /// `Io` when the data file cannot be created.
    pub fn create(prefix: impl AsRef<Path>, dtype: DType) -> Result<Self> {
        let prefix = prefix.as_ref().to_path_buf();
        let (_, bin_path) = dataset_paths(&prefix);
        let bin_tmp = temporary(&bin_path);
        let file = File::create(&bin_tmp).map_err(|e| Error::io(&bin_tmp, e))?;
        Ok(Self {
            prefix,
            dtype,
            data: BufWriter::with_capacity(1 << 20, file),
            sequence_lengths: Vec::new(),
            document_indices: vec![0],
            modes: None,
            scratch: Vec::new(),
        })
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn push_sequence(&mut self, elements: usize) -> Result<()> {
        let length = i32::try_from(elements).map_err(|_| {
            Error::InvalidData(format!(
                "a sequence of {elements} elements is longer than the format allows (2^31 - 1)"
            ))
        })?;
        let (_, bin_path) = dataset_paths(&self.prefix);
        self.data
            .write_all(&self.scratch)
            .map_err(|e| Error::io(temporary(&bin_path), e))?;
        self.scratch.clear();
        self.sequence_lengths.push(length);
        if let Some(modes) = &mut self.modes {
            modes.push(0);
        }
        Ok(())
    }

    /// Appends a sequence of token ids.
    ///
    /// # Errors
    ///
    /// When an id does not fit the dtype, or writing fails.
    pub fn add_tokens(&mut self, tokens: &[i64]) -> Result<()> {
        self.scratch.clear();
        for &token in tokens {
            self.dtype.encode_token(token, &mut self.scratch)?;
        }
        self.push_sequence(tokens.len())
    }

    /// Appends a sequence of native values, which must be of the dataset's type.
    ///
    /// # Errors
    ///
    /// When `T` is not the dataset's type, or writing fails.
    pub fn add_sequence<T: Element>(&mut self, values: &[T]) -> Result<()> {
        if T::DTYPE != self.dtype {
            return Err(Error::InvalidData(format!(
                "cannot add {:?} values to a {:?} dataset",
                T::DTYPE,
                self.dtype
            )));
        }
        self.scratch.clear();
        for &value in values {
            value.write_le(&mut self.scratch);
        }
        self.push_sequence(values.len())
    }

    /// Ends the current document: the sequences added since the last call form it.
    pub fn end_document(&mut self) {
        self.document_indices
            .push(self.sequence_lengths.len() as i64);
    }

    /// Appends every sequence and document of `other` (of the same dtype), as Megatron's
    /// `add_index` merges datasets.
    ///
    /// # Errors
    ///
    /// When the dtypes differ, `other` is corrupt, or writing fails.
    pub fn append(&mut self, other: &IndexedDataset) -> Result<()> {
        if other.dtype() != self.dtype {
            return Err(Error::InvalidData(format!(
                "cannot merge {} ({:?}) into a {:?} dataset",
                other.prefix().display(),
                other.dtype(),
                self.dtype
            )));
        }
        let offset = self.sequence_lengths.len() as i64;
        let other_modes = other.sequence_modes();
        for sequence in 0..other.len() {
            self.scratch.clear();
            let bytes = other.element_bytes(sequence, 0, None)?;
            self.scratch.extend_from_slice(bytes);
            self.push_sequence(bytes.len() / self.dtype.size())?;
        }
        if let Some(other_modes) = other_modes {
            let modes = self.modes.get_or_insert_with(|| vec![0; offset as usize]);
            modes.truncate(offset as usize);
            modes.extend(other_modes);
        }
        for entry in 1..=other.documents() {
            self.document_indices
                .push(offset + other.document_index(entry)? as i64);
        }
        Ok(())
    }

    /// Writes the index and moves both files to their final names.
    ///
    /// # Errors
    ///
    /// `Io` when writing or renaming fails.
    pub fn finish(mut self) -> Result<()> {
        let (idx_path, bin_path) = dataset_paths(&self.prefix);
        let (idx_tmp, bin_tmp) = (temporary(&idx_path), temporary(&bin_path));
        self.data.flush().map_err(|e| Error::io(&bin_tmp, e))?;
        self.data
            .get_ref()
            .sync_all()
            .map_err(|e| Error::io(&bin_tmp, e))?;

        let count = self.sequence_lengths.len();
        let mut index =
            Vec::with_capacity(HEADER_LEN + 12 * count + 8 * self.document_indices.len());
        index.extend_from_slice(MAGIC);
        index.extend_from_slice(&1u64.to_le_bytes());
        index.push(self.dtype.code());
        index.extend_from_slice(&(count as u64).to_le_bytes());
        index.extend_from_slice(&(self.document_indices.len() as u64).to_le_bytes());
        for &length in &self.sequence_lengths {
            index.extend_from_slice(&length.to_le_bytes());
        }
        let mut pointer = 0i64;
        for &length in &self.sequence_lengths {
            index.extend_from_slice(&pointer.to_le_bytes());
            pointer += length as i64 * self.dtype.size() as i64;
        }
        for &entry in &self.document_indices {
            index.extend_from_slice(&entry.to_le_bytes());
        }
        if let Some(modes) = &self.modes {
            index.extend(modes.iter().map(|&m| m as u8));
        }
        std::fs::write(&idx_tmp, &index).map_err(|e| Error::io(&idx_tmp, e))?;
        std::fs::rename(&bin_tmp, &bin_path).map_err(|e| Error::io(&bin_path, e))?;
        std::fs::rename(&idx_tmp, &idx_path).map_err(|e| Error::io(&idx_path, e))?;
        Ok(())
    }
}
