//! Megatron's datasets: the indexed `.bin/.idx` files, their builder, and the GPT sampler.

mod dtype;
mod gpt_dataset;
mod indexed;
pub mod numpy_random;
mod preprocess;
mod split;
mod tokenizer;

pub use dtype::{DType, Element};
pub use gpt_dataset::{GptDataset, GptDatasetConfig, GptSample};
pub use indexed::{IndexHeader, IndexedDataset, IndexedDatasetBuilder, MAGIC, dataset_paths};
pub use preprocess::{PreprocessOptions, PreprocessSummary, preprocess};
pub use split::{Split, parse_split, split_ranges};
pub use tokenizer::{Tokenizer, TokenizerType};
