//! Tokenizer flags shared by the commands, with the GPT-2 BPE shipped in the binary as
//! the default.

use std::path::PathBuf;

use burn_megatron::data::{Tokenizer, TokenizerType};
use clap::Args;

const GPT2_VOCAB: &str = include_str!("../data/tokenizers/gpt2-vocab.json");
const GPT2_MERGES: &str = include_str!("../data/tokenizers/gpt2-merges.txt");

/// Megatron's tokenizer flags.
#[derive(Args, Debug, Clone, Default)]
pub struct TokenizerArgs {
    /// Tokenizer: GPT2BPETokenizer, BertWordPieceLowerCase, BertWordPieceCase or
    /// HuggingFaceTokenizer. Without it (and without files), the GPT-2 BPE built into
    /// burn-megatron.
    #[arg(long)]
    pub tokenizer_type: Option<String>,
    /// Vocabulary file (GPT-2 `vocab.json` or BERT `vocab.txt`).
    #[arg(long)]
    pub vocab_file: Option<PathBuf>,
    /// GPT-2 merges file.
    #[arg(long)]
    pub merge_file: Option<PathBuf>,
    /// Hugging Face `tokenizer.json` (for HuggingFaceTokenizer).
    #[arg(long)]
    pub tokenizer_model: Option<PathBuf>,
}

impl TokenizerArgs {
    /// The tokenizer the flags describe.
    pub fn build(&self) -> burn_megatron::Result<Tokenizer> {
        match &self.tokenizer_type {
            None if self.vocab_file.is_none() && self.tokenizer_model.is_none() => {
                Tokenizer::gpt2_bpe_from_strings(GPT2_VOCAB, GPT2_MERGES)
            }
            None => Err(burn_megatron::Error::InvalidConfig(
                "--vocab-file/--tokenizer-model need --tokenizer-type".to_string(),
            )),
            Some(name) => Tokenizer::new(
                name.parse::<TokenizerType>()?,
                self.vocab_file.as_deref(),
                self.merge_file.as_deref(),
                self.tokenizer_model.as_deref(),
            ),
        }
    }
}
