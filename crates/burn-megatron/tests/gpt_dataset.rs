//! The GPT sampler against Megatron-Core's own: every sample of `GPTDataset` over the
//! fixture (seed 1234, sequence length 64, split "949,50,1", sizes [200, 40, 8]), as
//! written to `gptdataset_samples.safetensors` by Megatron-Core 0.19.2.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn_megatron::data::{GptDataset, GptDatasetConfig, IndexedDataset, Split, split_ranges};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/megatron-data")
        .join(name)
}

fn reference(name: &str) -> (Vec<usize>, Vec<i64>) {
    let bytes = std::fs::read(fixture("gptdataset_samples.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = tensors.tensor(name).unwrap();
    let values = view
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (view.shape().to_vec(), values)
}

#[test]
fn samples_match_megatron_core() {
    let cache = tempfile::tempdir().unwrap();
    let dataset = Arc::new(IndexedDataset::open(fixture("shakespeare_text_document")).unwrap());
    let ranges = split_ranges("949,50,1", dataset.len()).unwrap();
    let config = GptDatasetConfig {
        seq_length: 64,
        seed: 1234,
        cache_dir: Some(cache.path().to_path_buf()),
    };
    for build in ["fresh", "cached"] {
        for (split, requested) in Split::ALL.into_iter().zip([200, 40, 8]) {
            let range = ranges[split as usize].clone().unwrap();
            let gpt = GptDataset::build(dataset.clone(), range, requested, split, &config).unwrap();
            let (shape, tokens) = reference(&format!("{}.tokens", split.name()));
            let (_, labels) = reference(&format!("{}.labels", split.name()));
            assert_eq!(gpt.len(), shape[0], "{build} {split:?}: number of samples");
            assert!(gpt.len() >= requested);
            for index in 0..gpt.len() {
                let sample = gpt.get(index).unwrap();
                let at = index * 64..(index + 1) * 64;
                assert_eq!(
                    sample.tokens,
                    tokens[at.clone()],
                    "{build} {split:?} sample {index} tokens"
                );
                assert_eq!(
                    sample.labels, labels[at],
                    "{build} {split:?} sample {index} labels"
                );
            }
        }
    }
    assert_eq!(
        std::fs::read_dir(cache.path()).unwrap().count(),
        3,
        "one cache file per split"
    );
}
