//! `preprocess`: JSON lines to Megatron indexed datasets, one per JSON key.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;

use super::{DType, IndexedDatasetBuilder, Tokenizer};
use crate::{Error, Result};

/// What `preprocess` reads and writes.
#[derive(Debug, Clone)]
pub struct PreprocessOptions {
    /// The JSON-lines input: one document per line.
    pub input: PathBuf,
    /// The keys whose text to tokenize; each gets its own dataset.
    pub json_keys: Vec<String>,
    /// Outputs are `{output_prefix}_{key}_document.{bin,idx}`.
    pub output_prefix: String,
    /// Append the end-of-document token to every document.
    pub append_eod: bool,
    /// Tokenizing threads.
    pub workers: usize,
    /// Show a progress bar on standard error.
    pub progress: bool,
}

/// What `preprocess` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreprocessSummary {
    /// Documents (JSON lines) read.
    pub documents: usize,
    /// Tokens written, over all keys.
    pub tokens: usize,
    /// Bytes of `.bin` data written, over all keys.
    pub bytes: usize,
    /// The prefixes of the datasets written, one per key.
    pub outputs: Vec<String>,
}

/// Lines handed to the workers at a time.
const BATCH_LINES: usize = 4096;

/// Tokenizes every line of the input and writes one indexed dataset per JSON key, as
/// Megatron's `tools/preprocess_data.py` does at document level: each line is one
/// document of one sequence (empty text gives an empty document), with the
/// end-of-document token appended when asked. Token ids are `u16` when the vocabulary
/// has fewer than 65500 entries, else `i32`.
///
/// # Errors
///
/// When the input cannot be read, a line is not a JSON object with the keys as strings
/// (the error names the line), `append_eod` is set but the tokenizer has no
/// end-of-document token, or an output cannot be written.
pub fn preprocess(options: &PreprocessOptions, tokenizer: &Tokenizer) -> Result<PreprocessSummary> {
    if options.json_keys.is_empty() {
        return Err(Error::InvalidConfig(
            "give at least one --json-keys".to_string(),
        ));
    }
    let eod = match (options.append_eod, tokenizer.eod()) {
        (true, None) => {
            return Err(Error::InvalidConfig(
                "--append-eod: the tokenizer has no end-of-document token".to_string(),
            ));
        }
        (true, Some(eod)) => Some(eod),
        (false, _) => None,
    };
    let file = File::open(&options.input).map_err(|e| Error::io(&options.input, e))?;
    let total_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    let progress = options.progress.then(|| progress_bar(total_bytes));
    let mut reader = BufReader::new(file);

    let dtype = DType::for_vocab_size(tokenizer.vocab_size());
    let outputs: Vec<String> = options
        .json_keys
        .iter()
        .map(|key| format!("{}_{key}_document", options.output_prefix))
        .collect();
    let mut builders = outputs
        .iter()
        .map(|prefix| IndexedDatasetBuilder::create(prefix, dtype))
        .collect::<Result<Vec<_>>>()?;

    let mut summary = PreprocessSummary {
        documents: 0,
        tokens: 0,
        bytes: 0,
        outputs: outputs.clone(),
    };
    let workers = options.workers.max(1);
    let mut line_number = 0usize;
    loop {
        let mut batch = Vec::with_capacity(BATCH_LINES);
        for _ in 0..BATCH_LINES {
            let mut line = String::new();
            let read = reader
                .read_line(&mut line)
                .map_err(|e| Error::io(&options.input, e))?;
            if read == 0 {
                break;
            }
            line_number += 1;
            if let Some(bar) = &progress {
                bar.inc(read as u64);
            }
            if !line.trim().is_empty() {
                batch.push((line_number, line));
            }
        }
        if batch.is_empty() {
            break;
        }
        for document in tokenize_batch(&batch, options, tokenizer, eod, workers)? {
            summary.documents += 1;
            for (builder, tokens) in builders.iter_mut().zip(document) {
                if !tokens.is_empty() {
                    summary.tokens += tokens.len();
                    summary.bytes += tokens.len() * dtype.size();
                    builder.add_tokens(&tokens)?;
                }
                builder.end_document();
            }
        }
    }
    for builder in builders {
        builder.finish()?;
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Ok(summary)
}

/// Tokens of each line, per key, in line order, computed by `workers` threads.
fn tokenize_batch(
    batch: &[(usize, String)],
    options: &PreprocessOptions,
    tokenizer: &Tokenizer,
    eod: Option<u32>,
    workers: usize,
) -> Result<Vec<Vec<Vec<i64>>>> {
    let chunk = batch.len().div_ceil(workers);
    std::thread::scope(|scope| {
        let handles: Vec<_> = batch
            .chunks(chunk)
            .map(|lines| {
                scope.spawn(move || {
                    lines
                        .iter()
                        .map(|(number, line)| tokenize_line(*number, line, options, tokenizer, eod))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        let mut documents = Vec::with_capacity(batch.len());
        for handle in handles {
            documents.extend(handle.join().expect("tokenizer threads do not panic")?);
        }
        Ok(documents)
    })
}

fn tokenize_line(
    number: usize,
    line: &str,
    options: &PreprocessOptions,
    tokenizer: &Tokenizer,
    eod: Option<u32>,
) -> Result<Vec<Vec<i64>>> {
    let at = |what: String| {
        Error::InvalidData(format!("{} line {number}: {what}", options.input.display()))
    };
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| at(format!("not JSON: {e}")))?;
    options
        .json_keys
        .iter()
        .map(|key| {
            let text = value
                .get(key)
                .ok_or_else(|| at(format!("no key `{key}` (choose keys with --json-keys)")))?
                .as_str()
                .ok_or_else(|| at(format!("`{key}` is not a string")))?;
            let mut tokens: Vec<i64> = tokenizer
                .encode(text)
                .map_err(|e| at(e.to_string()))?
                .into_iter()
                .map(i64::from)
                .collect();
            if let (Some(eod), false) = (eod, tokens.is_empty()) {
                tokens.push(eod as i64);
            }
            Ok(tokens)
        })
        .collect()
}

fn progress_bar(total_bytes: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total_bytes);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} preprocess [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar
}
