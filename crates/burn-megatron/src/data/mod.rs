//! Megatron's datasets: the indexed `.bin/.idx` files, their builder, and the GPT sampler.

mod dtype;
mod indexed;
pub mod numpy_random;
mod preprocess;
mod tokenizer;

pub use dtype::{DType, Element};
pub use indexed::{IndexHeader, IndexedDataset, IndexedDatasetBuilder, MAGIC, dataset_paths};
pub use preprocess::{PreprocessOptions, PreprocessSummary, preprocess};
pub use tokenizer::{Tokenizer, TokenizerType};
