//! Megatron's GPT sampler: fixed-length samples cut from a split's documents laid end to
//! end, over as many epochs as the requested samples need, in Megatron's shuffled order.
//!
//! The three indices follow Megatron-Core's `GPTDataset`:
//! - the document index: the split's sequence ids tiled once per epoch, shuffled with
//!   numpy's `RandomState(seed)` (the last epoch shuffled on its own when it is used for
//!   less than 80 % of its samples);
//! - the sample index: where each sample starts (position in the document index, token
//!   offset); a sample takes `seq_length + 1` tokens and the next starts on its last one;
//! - the shuffle index: a permutation of the samples, drawn from the same generator.
//!
//! They are cached next to the data and reused when the settings match.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::IndexedDataset;
use super::numpy_random::RandomState;
use super::split::Split;
use crate::{Error, Result};

/// Settings of a GPT dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptDatasetConfig {
    /// Tokens per sample (the model's sequence length).
    pub seq_length: usize,
    /// Seed of the shuffles.
    pub seed: u32,
    /// Where to cache the indices; `None` caches in `{data prefix}.cache/`.
    pub cache_dir: Option<PathBuf>,
}

/// One sample: `tokens` and the next-token `labels`, each `seq_length` long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptSample {
    /// Input token ids.
    pub tokens: Vec<i64>,
    /// Target token ids (the input shifted by one).
    pub labels: Vec<i64>,
}

/// The samples of one split of an indexed dataset.
#[derive(Debug)]
pub struct GptDataset {
    dataset: Arc<IndexedDataset>,
    seq_length: usize,
    document_index: Vec<i32>,
    /// (position in the document index, token offset) where each sample starts; one more
    /// entry than samples.
    sample_index: Vec<(i64, i64)>,
    shuffle_index: Vec<u64>,
}

/// Tokens a sample reads beyond its length: the label of its last token.
const EXTRA_TOKEN: i64 = 1;
/// The share of an epoch under which the last epoch is shuffled separately.
const SEPARATE_EPOCH_THRESHOLD: f64 = 0.80;

impl GptDataset {
    /// Builds (or loads from the cache) the indices for at least `num_samples` samples of
    /// the sequences `sequences` of `dataset`.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` for a sequence length under 2 or an empty split; `InvalidData` for
    /// a corrupt dataset or cache; `Io` when the cache cannot be written.
    pub fn build(
        dataset: Arc<IndexedDataset>,
        sequences: Range<usize>,
        num_samples: usize,
        split: Split,
        config: &GptDatasetConfig,
    ) -> Result<Self> {
        if config.seq_length < 2 {
            return Err(Error::InvalidConfig(format!(
                "sequence length {} is too short; use at least 2",
                config.seq_length
            )));
        }
        if sequences.end > dataset.len() {
            return Err(Error::InvalidConfig(format!(
                "split {} covers sequences {sequences:?} of a dataset of {}",
                split.name(),
                dataset.len()
            )));
        }
        let lengths = dataset.sequence_lengths()?;
        let tokens_per_epoch: i64 = lengths[sequences.clone()].iter().map(|&l| l as i64).sum();
        if tokens_per_epoch <= EXTRA_TOKEN {
            return Err(Error::InvalidConfig(format!(
                "the {} split of {} has {tokens_per_epoch} tokens, too few for one sample; \
                 give it more weight in --split or more data",
                split.name(),
                dataset.prefix().display()
            )));
        }
        let description = format!(
            "GPTDataset v1\nprefix={}\nbin_bytes={}\nsequences={sequences:?}\nsplit={}\n\
             num_samples={num_samples}\nseq_length={}\nseed={}\n",
            dataset.prefix().display(),
            dataset.data_bytes(),
            split.name(),
            config.seq_length,
            config.seed
        );
        let cache = cache_path(&dataset, config, split, &description);
        if let Some(indices) = cache::load(&cache, &description)? {
            let (document_index, sample_index, shuffle_index) = indices;
            return Ok(Self {
                dataset,
                seq_length: config.seq_length,
                document_index,
                sample_index,
                shuffle_index,
            });
        }

        let seq_length = config.seq_length as i64;
        let tokens_requested = num_samples as i64 * seq_length + EXTRA_TOKEN;
        let epochs = ((tokens_requested + tokens_per_epoch - 1) / tokens_per_epoch).max(1);
        let samples_before_last_epoch =
            ((epochs - 1) * tokens_per_epoch - EXTRA_TOKEN) / seq_length;
        let separate_last_epoch = epochs > 1 && {
            let from_last_epoch = num_samples as i64 - samples_before_last_epoch;
            let per_epoch = (tokens_per_epoch - EXTRA_TOKEN) / seq_length;
            from_last_epoch < (SEPARATE_EPOCH_THRESHOLD * per_epoch as f64) as i64
        };

        let mut random = RandomState::new(config.seed);
        let ids: Vec<i32> = sequences.map(|s| s as i32).collect();
        let document_index = if separate_last_epoch {
            let mut index = tiled_shuffled(&ids, epochs as usize - 1, &mut random);
            index.extend(tiled_shuffled(&ids, 1, &mut random));
            index
        } else {
            tiled_shuffled(&ids, epochs as usize, &mut random)
        };
        let sample_index = build_sample_index(
            &lengths,
            &document_index,
            seq_length,
            epochs,
            tokens_per_epoch,
        );
        let total = sample_index.len() as u64 - 1;
        let first_range = if separate_last_epoch {
            samples_before_last_epoch as u64
        } else {
            total
        };
        let mut shuffle_index: Vec<u64> = (0..first_range).collect();
        random.shuffle(&mut shuffle_index);
        let mut rest: Vec<u64> = (first_range..total).collect();
        random.shuffle(&mut rest);
        shuffle_index.extend(rest);

        cache::store(
            &cache,
            &description,
            &document_index,
            &sample_index,
            &shuffle_index,
        )?;
        Ok(Self {
            dataset,
            seq_length: config.seq_length,
            document_index,
            sample_index,
            shuffle_index,
        })
    }

    /// Number of samples (all those of the epochs built, at least the requested number).
    pub fn len(&self) -> usize {
        self.shuffle_index.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens per sample.
    pub fn seq_length(&self) -> usize {
        self.seq_length
    }

    /// The underlying indexed dataset.
    pub fn dataset(&self) -> &IndexedDataset {
        &self.dataset
    }

    /// Sample `index`, in Megatron's shuffled order.
    ///
    /// # Errors
    ///
    /// When `index` is out of range or the data is corrupt.
    pub fn get(&self, index: usize) -> Result<GptSample> {
        let sample = *self.shuffle_index.get(index).ok_or_else(|| {
            Error::InvalidConfig(format!(
                "sample {index} is out of range ({} samples)",
                self.len()
            ))
        })? as usize;
        let (first, first_offset) = self.sample_index[sample];
        let (last, last_offset) = self.sample_index[sample + 1];
        let sequence = |position: i64| self.document_index[position as usize] as usize;
        let mut text = Vec::with_capacity(self.seq_length + 1);
        if first == last {
            let length = (last_offset - first_offset + EXTRA_TOKEN) as usize;
            text.extend(self.dataset.tokens(
                sequence(first),
                first_offset as usize,
                Some(length),
            )?);
        } else {
            for position in first..=last {
                let offset = if position == first {
                    first_offset as usize
                } else {
                    0
                };
                let length = (position == last).then(|| (last_offset + EXTRA_TOKEN) as usize);
                text.extend(self.dataset.tokens(sequence(position), offset, length)?);
            }
        }
        if text.len() != self.seq_length + 1 {
            return Err(Error::InvalidData(format!(
                "{}: sample {index} has {} tokens instead of {}",
                self.dataset.prefix().display(),
                text.len(),
                self.seq_length + 1
            )));
        }
        Ok(GptSample {
            labels: text[1..].to_vec(),
            tokens: text[..self.seq_length].to_vec(),
        })
    }
}

/// The ids tiled `epochs` times and shuffled (Megatron's `_build_document_index`).
fn tiled_shuffled(ids: &[i32], epochs: usize, random: &mut RandomState) -> Vec<i32> {
    let mut index: Vec<i32> = ids
        .iter()
        .copied()
        .cycle()
        .take(ids.len() * epochs)
        .collect();
    random.shuffle(&mut index);
    index
}

/// Where each sample starts, dropping the last partial sample (Megatron's
/// `build_sample_idx` in `helpers.cpp`).
fn build_sample_index(
    lengths: &[u32],
    document_index: &[i32],
    seq_length: i64,
    epochs: i64,
    tokens_per_epoch: i64,
) -> Vec<(i64, i64)> {
    let num_samples = (epochs * tokens_per_epoch - EXTRA_TOKEN) / seq_length;
    let mut index = Vec::with_capacity(num_samples as usize + 1);
    let (mut position, mut offset) = (0i64, 0i64);
    index.push((position, offset));
    while (index.len() as i64) <= num_samples {
        let mut remaining = seq_length + EXTRA_TOKEN;
        while remaining != 0 {
            let document_length =
                lengths[document_index[position as usize] as usize] as i64 - offset;
            remaining -= document_length;
            if remaining <= 0 {
                offset += remaining + document_length - EXTRA_TOKEN;
                remaining = 0;
            } else if position as usize == document_index.len() - 1 {
                offset = lengths[document_index[position as usize] as usize] as i64 - EXTRA_TOKEN;
                break;
            } else {
                position += 1;
                offset = 0;
            }
        }
        index.push((position, offset));
    }
    index
}

fn cache_path(
    dataset: &IndexedDataset,
    config: &GptDatasetConfig,
    split: Split,
    description: &str,
) -> PathBuf {
    let directory = config.cache_dir.clone().unwrap_or_else(|| {
        let mut name = dataset.prefix().as_os_str().to_os_string();
        name.push(".cache");
        PathBuf::from(name)
    });
    // FNV-1a of the description names the file; the description inside confirms it.
    let hash = description.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    directory.join(format!("gpt-{}-{hash:016x}.indices", split.name()))
}

/// The index cache: the description, then the three arrays, little-endian.
mod cache {
    use super::*;

    const MAGIC: &[u8; 8] = b"BMGPTIX1";

    type Indices = (Vec<i32>, Vec<(i64, i64)>, Vec<u64>);

    pub(super) fn store(
        path: &Path,
        description: &str,
        document_index: &[i32],
        sample_index: &[(i64, i64)],
        shuffle_index: &[u64],
    ) -> Result<()> {
        let mut bytes = Vec::with_capacity(
            64 + description.len()
                + 4 * document_index.len()
                + 16 * sample_index.len()
                + 8 * shuffle_index.len(),
        );
        bytes.extend_from_slice(MAGIC);
        for length in [
            description.len(),
            document_index.len(),
            sample_index.len(),
            shuffle_index.len(),
        ] {
            bytes.extend_from_slice(&(length as u64).to_le_bytes());
        }
        bytes.extend_from_slice(description.as_bytes());
        document_index
            .iter()
            .for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
        for (position, offset) in sample_index {
            bytes.extend_from_slice(&position.to_le_bytes());
            bytes.extend_from_slice(&offset.to_le_bytes());
        }
        shuffle_index
            .iter()
            .for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
        if let Some(directory) = path.parent() {
            std::fs::create_dir_all(directory).map_err(|e| Error::io(directory, e))?;
        }
        let mut temporary = path.as_os_str().to_os_string();
        temporary.push(format!(".tmp{}", std::process::id()));
        let temporary = PathBuf::from(temporary);
        std::fs::write(&temporary, &bytes).map_err(|e| Error::io(&temporary, e))?;
        std::fs::rename(&temporary, path).map_err(|e| Error::io(path, e))
    }

    /// The cached indices, or `None` when there is no cache for this description.
    pub(super) fn load(path: &Path, description: &str) -> Result<Option<Indices>> {
        let Ok(bytes) = std::fs::read(path) else {
            return Ok(None);
        };
        let corrupt = || {
            Error::InvalidData(format!(
                "{}: corrupt index cache; delete it",
                path.display()
            ))
        };
        let mut reader = Reader {
            bytes: &bytes,
            at: 0,
        };
        if reader.take(8).ok_or_else(corrupt)? != MAGIC {
            return Err(corrupt());
        }
        let mut lengths = [0usize; 4];
        for length in &mut lengths {
            *length = reader.u64().ok_or_else(corrupt)? as usize;
        }
        if reader.take(lengths[0]).ok_or_else(corrupt)? != description.as_bytes() {
            return Ok(None);
        }
        let document_index = (0..lengths[1])
            .map(|_| {
                reader
                    .take(4)
                    .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")))
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(corrupt)?;
        let sample_index = (0..lengths[2])
            .map(|_| Some((reader.u64()? as i64, reader.u64()? as i64)))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(corrupt)?;
        let shuffle_index = (0..lengths[3])
            .map(|_| reader.u64())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(corrupt)?;
        let positions_valid = sample_index
            .iter()
            .all(|&(p, o)| p >= 0 && (p as usize) < document_index.len() && o >= 0);
        let samples_valid = !sample_index.is_empty()
            && shuffle_index
                .iter()
                .all(|&s| (s as usize) + 1 < sample_index.len());
        if !positions_valid || !samples_valid || reader.at != bytes.len() {
            return Err(corrupt());
        }
        Ok(Some((document_index, sample_index, shuffle_index)))
    }

    struct Reader<'a> {
        bytes: &'a [u8],
        at: usize,
    }

    impl<'a> Reader<'a> {
        fn take(&mut self, count: usize) -> Option<&'a [u8]> {
            let end = self.at.checked_add(count)?;
            let slice = self.bytes.get(self.at..end)?;
            self.at = end;
            Some(slice)
        }

        fn u64(&mut self) -> Option<u64> {
            self.take(8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        }
    }
}
