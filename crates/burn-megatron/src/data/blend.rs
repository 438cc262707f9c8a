//! Weighted blends of several datasets, the data-parallel micro-batch sampler, and the
//! builder of the train/valid/test sample sources from `--data-path` and `--split`.

use std::path::PathBuf;
use std::sync::Arc;

use super::{GptDataset, GptDatasetConfig, GptSample, IndexedDataset, Split, split_ranges};
use crate::{Error, Result};

/// Samples by index: one GPT dataset or a blend of several.
pub trait SampleSource: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sample `index`.
    ///
    /// # Errors
    ///
    /// When `index` is out of range or the data is corrupt.
    fn get(&self, index: usize) -> Result<GptSample>;
}

impl SampleSource for GptDataset {
    fn len(&self) -> usize {
        GptDataset::len(self)
    }
    fn get(&self, index: usize) -> Result<GptSample> {
        GptDataset::get(self, index)
    }
}

/// For each of `size` samples, the dataset it comes from and its index there, so that
/// every prefix of the blend follows the weights as closely as possible: sample `k` goes
/// to the dataset with the largest `weight * max(k, 1) - taken` (the first on ties), as
/// Megatron's `build_blending_indices`.
pub fn blending_indices(weights: &[f64], size: usize) -> (Vec<u16>, Vec<u64>) {
    let mut taken = vec![0u64; weights.len()];
    let mut dataset_index = Vec::with_capacity(size);
    let mut sample_index = Vec::with_capacity(size);
    for k in 0..size {
        let progress = (k as f64).max(1.0);
        let mut best = 0;
        let mut best_error = weights[0] * progress - taken[0] as f64;
        for (d, weight) in weights.iter().enumerate().skip(1) {
            let error = weight * progress - taken[d] as f64;
            if error > best_error {
                best_error = error;
                best = d;
            }
        }
        dataset_index.push(best as u16);
        sample_index.push(taken[best]);
        taken[best] += 1;
    }
    (dataset_index, sample_index)
}

/// A weighted blend of GPT datasets.
pub struct BlendedDataset {
    datasets: Vec<GptDataset>,
    dataset_index: Vec<u16>,
    sample_index: Vec<u64>,
}

impl BlendedDataset {
    /// A blend of `size` samples drawn from `datasets` in proportion to `weights`.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` when the weights do not match the datasets or are not positive, or
    /// a dataset has fewer samples than the blend takes from it.
    pub fn new(datasets: Vec<GptDataset>, weights: &[f64], size: usize) -> Result<Self> {
        let weights = normalized(weights)?;
        if weights.len() != datasets.len() || datasets.len() > u16::MAX as usize {
            return Err(Error::InvalidConfig(format!(
                "{} weights for {} datasets",
                weights.len(),
                datasets.len()
            )));
        }
        let (dataset_index, sample_index) = blending_indices(&weights, size);
        for (d, dataset) in datasets.iter().enumerate() {
            let needed = dataset_index.iter().filter(|&&i| i as usize == d).count();
            if needed > dataset.len() {
                return Err(Error::InvalidConfig(format!(
                    "the blend takes {needed} samples from {} but it has {}",
                    dataset.dataset().prefix().display(),
                    dataset.len()
                )));
            }
        }
        Ok(Self {
            datasets,
            dataset_index,
            sample_index,
        })
    }
}

impl SampleSource for BlendedDataset {
    fn len(&self) -> usize {
        self.dataset_index.len()
    }

    fn get(&self, index: usize) -> Result<GptSample> {
        let dataset = *self.dataset_index.get(index).ok_or_else(|| {
            Error::InvalidConfig(format!(
                "sample {index} is out of range ({} samples)",
                self.len()
            ))
        })?;
        self.datasets[dataset as usize].get(self.sample_index[index] as usize)
    }
}

fn normalized(weights: &[f64]) -> Result<Vec<f64>> {
    let total: f64 = weights.iter().sum();
    if weights.is_empty() || weights.iter().any(|w| !w.is_finite() || *w <= 0.0) {
        return Err(Error::InvalidConfig(format!(
            "blend weights {weights:?} must all be positive numbers"
        )));
    }
    Ok(weights.iter().map(|w| w / total).collect())
}

/// Parses Megatron's `--data-path`: one prefix, or pairs of weight and prefix
/// (`0.3 wiki_text_document 0.7 books_text_document`).
///
/// # Errors
///
/// `InvalidConfig` for an empty list, an odd-length list of pairs, or a weight that does
/// not parse.
pub fn parse_data_path(arguments: &[String]) -> Result<Vec<(f64, PathBuf)>> {
    match arguments {
        [] => Err(Error::InvalidConfig(
            "--data-path needs at least one prefix".to_string(),
        )),
        [prefix] => Ok(vec![(1.0, PathBuf::from(prefix))]),
        pairs if pairs.len() % 2 == 0 => pairs
            .chunks(2)
            .map(|pair| {
                let weight = pair[0].parse::<f64>().map_err(|_| {
                    Error::InvalidConfig(format!(
                        "--data-path: `{}` is not a weight; write `WEIGHT PREFIX` pairs or a \
                         single prefix",
                        pair[0]
                    ))
                })?;
                Ok((weight, PathBuf::from(&pair[1])))
            })
            .collect(),
        _ => Err(Error::InvalidConfig(format!(
            "--data-path has {} values; write one prefix or `WEIGHT PREFIX` pairs",
            arguments.len()
        ))),
    }
}

/// The share by which each dataset of a blend is built larger than its part, so that the
/// blend is sure to be served (Megatron's default `mid_level_dataset_surplus`).
const BLEND_SURPLUS: f64 = 0.005;

/// The train, valid and test sample sources of `--data-path` and `--split`, with at least
/// `num_samples[i]` samples each (`None` where the split has no weight).
///
/// # Errors
///
/// When a dataset cannot be opened, the split or weights are invalid, or a split is too
/// small.
pub fn build_gpt_splits(
    data_path: &[(f64, PathBuf)],
    split: &str,
    num_samples: [usize; 3],
    config: &GptDatasetConfig,
) -> Result<[Option<Box<dyn SampleSource>>; 3]> {
    let weights = normalized(&data_path.iter().map(|(w, _)| *w).collect::<Vec<_>>())?;
    let mut per_split: [Vec<GptDataset>; 3] = Default::default();
    for ((_, prefix), weight) in data_path.iter().zip(&weights) {
        let dataset = Arc::new(IndexedDataset::open(prefix)?);
        let ranges = split_ranges(split, dataset.len())?;
        for (s, range) in Split::ALL.into_iter().zip(ranges) {
            let Some(range) = range else { continue };
            let requested = if data_path.len() == 1 {
                num_samples[s as usize]
            } else {
                let share = (num_samples[s as usize] as f64 * weight).ceil();
                (share * (1.0 + BLEND_SURPLUS)).ceil() as usize
            };
            per_split[s as usize].push(GptDataset::build(
                dataset.clone(),
                range,
                requested,
                s,
                config,
            )?);
        }
    }
    let mut sources: [Option<Box<dyn SampleSource>>; 3] = Default::default();
    for (s, datasets) in per_split.into_iter().enumerate() {
        sources[s] = match datasets.len() {
            0 => None,
            1 if data_path.len() == 1 => datasets
                .into_iter()
                .next()
                .map(|d| Box::new(d) as Box<dyn SampleSource>),
            _ => Some(Box::new(BlendedDataset::new(
                datasets,
                &weights,
                num_samples[s],
            )?)),
        };
    }
    Ok(sources)
}

/// Which samples a data-parallel rank reads, micro-batch by micro-batch, as Megatron's
/// `MegatronPretrainingSampler`: each step takes the next `micro_batch * dp` samples and
/// rank `r` reads the `r`-th block of `micro_batch`. The position is `consumed_samples`,
/// so a resumed run continues where it stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroBatchSampler {
    total: usize,
    consumed: usize,
    micro_batch: usize,
    dp_rank: usize,
    dp_size: usize,
}

impl MicroBatchSampler {
    /// A sampler over `total` samples that has already consumed `consumed_samples`.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` for a zero micro-batch or data-parallel size, or a rank outside it.
    pub fn new(
        total: usize,
        consumed_samples: usize,
        micro_batch: usize,
        dp_rank: usize,
        dp_size: usize,
    ) -> Result<Self> {
        if micro_batch == 0 || dp_size == 0 || dp_rank >= dp_size {
            return Err(Error::InvalidConfig(format!(
                "micro batch {micro_batch}, data-parallel rank {dp_rank} of {dp_size}: the sizes \
                 must be positive and the rank below the data-parallel size"
            )));
        }
        Ok(Self {
            total,
            consumed: consumed_samples,
            micro_batch,
            dp_rank,
            dp_size,
        })
    }

    /// This rank's sample indices of the next micro-batch, or `None` when fewer than a
    /// whole step of samples is left.
    pub fn next_micro_batch(&mut self) -> Option<std::ops::Range<usize>> {
        let step = self.micro_batch * self.dp_size;
        if self.consumed + step > self.total {
            return None;
        }
        let start = self.consumed + self.dp_rank * self.micro_batch;
        self.consumed += step;
        Some(start..start + self.micro_batch)
    }

    /// Samples consumed by all data-parallel ranks together: the position to resume from.
    pub fn consumed_samples(&self) -> usize {
        self.consumed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blending_follows_the_weights_on_every_prefix() {
        let (datasets, samples) = blending_indices(&[0.25, 0.75], 8);
        // k=0: errors (0.25, 0.75) -> 1; k=1: (0.25, -0.25) -> 0; ...
        assert_eq!(datasets, vec![1, 0, 1, 1, 0, 1, 1, 1]);
        assert_eq!(samples, vec![0, 0, 1, 2, 1, 3, 4, 5]);
        // Ties go to the first dataset.
        assert_eq!(blending_indices(&[0.5, 0.5], 2).0, vec![0, 1]);
    }

    #[test]
    fn ranks_read_disjoint_blocks_and_resume() {
        let mut rank1 = MicroBatchSampler::new(10, 0, 2, 1, 2).unwrap();
        assert_eq!(rank1.next_micro_batch(), Some(2..4));
        assert_eq!(rank1.next_micro_batch(), Some(6..8));
        assert_eq!(rank1.consumed_samples(), 8);
        assert_eq!(rank1.next_micro_batch(), None, "a partial step is dropped");
        let mut resumed = MicroBatchSampler::new(10, 4, 2, 1, 2).unwrap();
        assert_eq!(resumed.next_micro_batch(), Some(6..8));
        assert!(MicroBatchSampler::new(10, 0, 2, 2, 2).is_err());
    }

    #[test]
    fn data_path_forms() {
        assert_eq!(
            parse_data_path(&["a".into()]).unwrap(),
            vec![(1.0, PathBuf::from("a"))]
        );
        let pairs = parse_data_path(&["0.3".into(), "a".into(), "0.7".into(), "b".into()]).unwrap();
        assert_eq!(pairs[1], (0.7, PathBuf::from("b")));
        assert!(
            parse_data_path(&["x".into(), "a".into()])
                .unwrap_err()
                .to_string()
                .contains("not a weight")
        );
        assert!(parse_data_path(&["1".into(), "a".into(), "b".into()]).is_err());
    }
}
