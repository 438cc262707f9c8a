//! Megatron's datasets: the indexed `.bin/.idx` files, their builder, and the GPT sampler.

mod blend;
mod dtype;
mod gpt_dataset;
mod indexed;
mod legacy;
pub mod numpy_random;
mod preprocess;
mod split;
mod tokenizer;

pub use blend::{
    BlendedDataset, MicroBatchSampler, SampleSource, blending_indices, build_gpt_splits,
    parse_data_path,
};
pub use dtype::{DType, Element};
pub use gpt_dataset::{GptDataset, GptDatasetConfig, GptSample};
pub use indexed::{IndexHeader, IndexedDataset, IndexedDatasetBuilder, MAGIC, dataset_paths};
pub use legacy::{LegacyIndexedDataset, LegacyMode};
pub use preprocess::{PreprocessOptions, PreprocessSummary, preprocess};
pub use split::{Split, parse_split, split_ranges};
pub use tokenizer::{Tokenizer, TokenizerType};
