//! The tokenizers Megatron's `preprocess_data.py` offers, through Hugging Face's
//! `tokenizers` crate.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use crate::{Error, Result};

/// The tokenizer families, named as Megatron's `--tokenizer-type` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerType {
    /// GPT-2 byte-level BPE from `--vocab-file` (JSON) and `--merge-file`.
    Gpt2Bpe,
    /// BERT WordPiece from `--vocab-file`, lower-casing the text.
    BertWordPieceLowerCase,
    /// BERT WordPiece from `--vocab-file`, keeping case.
    BertWordPieceCase,
    /// Any Hugging Face `tokenizer.json` from `--tokenizer-model`.
    HuggingFace,
}

impl std::str::FromStr for TokenizerType {
    type Err = Error;
    fn from_str(name: &str) -> Result<Self> {
        match name {
            "GPT2BPETokenizer" => Ok(Self::Gpt2Bpe),
            "BertWordPieceLowerCase" => Ok(Self::BertWordPieceLowerCase),
            "BertWordPieceCase" => Ok(Self::BertWordPieceCase),
            "HuggingFaceTokenizer" => Ok(Self::HuggingFace),
            other => Err(Error::InvalidConfig(format!(
                "unknown tokenizer type `{other}`; use GPT2BPETokenizer, \
                 BertWordPieceLowerCase, BertWordPieceCase or HuggingFaceTokenizer"
            ))),
        }
    }
}

/// A text tokenizer with its end-of-document token.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eod: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eod", &self.eod)
            .finish()
    }
}

fn path_str<'a>(path: &'a Path, flag: &str) -> Result<&'a str> {
    if !path.is_file() {
        return Err(Error::InvalidConfig(format!(
            "{flag} {} does not exist or is not a file",
            path.display()
        )));
    }
    path.to_str().ok_or_else(|| {
        Error::InvalidConfig(format!("{flag} {} is not valid UTF-8", path.display()))
    })
}

fn tokenizer_error(what: &str, error: impl std::fmt::Display) -> Error {
    Error::InvalidData(format!("{what}: {error}"))
}

impl Tokenizer {
    /// Builds a tokenizer of the given type from Megatron's flags.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` when a file the type needs is missing; `InvalidData` when a file
    /// cannot be parsed.
    pub fn new(
        kind: TokenizerType,
        vocab_file: Option<&Path>,
        merge_file: Option<&Path>,
        tokenizer_model: Option<&Path>,
    ) -> Result<Self> {
        fn need<'a>(path: Option<&'a Path>, kind: TokenizerType, flag: &str) -> Result<&'a Path> {
            path.ok_or_else(|| {
                Error::InvalidConfig(format!("tokenizer type {kind:?} needs {flag} <file>"))
            })
        }
        match kind {
            TokenizerType::Gpt2Bpe => Self::gpt2_bpe(
                need(vocab_file, kind, "--vocab-file")?,
                need(merge_file, kind, "--merge-file")?,
            ),
            TokenizerType::BertWordPieceLowerCase => {
                Self::bert_wordpiece(need(vocab_file, kind, "--vocab-file")?, true)
            }
            TokenizerType::BertWordPieceCase => {
                Self::bert_wordpiece(need(vocab_file, kind, "--vocab-file")?, false)
            }
            TokenizerType::HuggingFace => {
                Self::from_tokenizer_json(need(tokenizer_model, kind, "--tokenizer-model")?)
            }
        }
    }

    /// GPT-2's byte-level BPE (no prefix space), end of document `<|endoftext|>`.
    ///
    /// # Errors
    ///
    /// When a file is missing or malformed.
    pub fn gpt2_bpe(vocab_file: &Path, merge_file: &Path) -> Result<Self> {
        let read = |path: &Path, flag: &str| {
            path_str(path, flag)?;
            std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
        };
        Self::gpt2_bpe_from_strings(
            &read(vocab_file, "--vocab-file")?,
            &read(merge_file, "--merge-file")?,
        )
    }

    /// GPT-2's byte-level BPE from the contents of `vocab.json` and `merges.txt`.
    ///
    /// # Errors
    ///
    /// When the vocabulary is not a JSON map of tokens to ids, or a merge line is not two
    /// tokens.
    pub fn gpt2_bpe_from_strings(vocab_json: &str, merges_txt: &str) -> Result<Self> {
        let vocab: std::collections::HashMap<String, u32> = serde_json::from_str(vocab_json)
            .map_err(|e| tokenizer_error("GPT-2 vocabulary (a JSON map of tokens to ids)", e))?;
        let merges = merges_txt
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.starts_with("#version"))
            .map(|(number, line)| {
                line.split_once(' ')
                    .filter(|(_, right)| !right.contains(' '))
                    .map(|(left, right)| (left.to_string(), right.to_string()))
                    .ok_or_else(|| {
                        Error::InvalidData(format!(
                            "GPT-2 merges line {}: expected two tokens separated by a space",
                            number + 1
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let model = BPE::builder()
            .vocab_and_merges(
                vocab
                    .into_iter()
                    .collect::<tokenizers::models::bpe::Vocab>(),
                merges,
            )
            .build()
            .map_err(|e| tokenizer_error("GPT-2 vocabulary or merges", e))?;
        let mut inner = tokenizers::Tokenizer::new(model);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let eod = inner.token_to_id("<|endoftext|>");
        Ok(Self { inner, eod })
    }

    /// BERT's WordPiece; the end of document is `[SEP]`.
    ///
    /// # Errors
    ///
    /// When the vocabulary is missing or malformed.
    pub fn bert_wordpiece(vocab_file: &Path, lower_case: bool) -> Result<Self> {
        let model = WordPiece::from_file(path_str(vocab_file, "--vocab-file")?)
            .unk_token("[UNK]".to_string())
            .build()
            .map_err(|e| tokenizer_error("BERT vocabulary", e))?;
        let mut inner = tokenizers::Tokenizer::new(model);
        inner.with_normalizer(Some(BertNormalizer::new(true, true, None, lower_case)));
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        inner.with_decoder(Some(WordPieceDecoder::default()));
        let eod = inner.token_to_id("[SEP]");
        Ok(Self { inner, eod })
    }

    /// A Hugging Face `tokenizer.json`; the end of document is the first of
    /// `<|endoftext|>`, `</s>`, `<eos>`, `<|end_of_text|>`, `[SEP]` it knows.
    ///
    /// # Errors
    ///
    /// When the file is missing or malformed.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path_str(path, "--tokenizer-model")?)
            .map_err(|e| tokenizer_error(&path.display().to_string(), e))?;
        let eod = ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]"]
            .iter()
            .find_map(|token| inner.token_to_id(token));
        Ok(Self { inner, eod })
    }

    /// Token ids of `text`, without special tokens.
    ///
    /// # Errors
    ///
    /// When the tokenizer fails on the text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode_fast(text, false)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|e| tokenizer_error("tokenizing", e))
    }

    /// The text of token ids.
    ///
    /// # Errors
    ///
    /// When the tokenizer fails on the ids.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| tokenizer_error("decoding", e))
    }

    /// Size of the vocabulary, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The end-of-document token, if the vocabulary has one.
    pub fn eod(&self) -> Option<u32> {
        self.eod
    }
}
