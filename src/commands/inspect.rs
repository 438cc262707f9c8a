//! `inspect`: what an indexed dataset holds, and the samples the GPT sampler draws from it.

use std::path::PathBuf;
use std::sync::Arc;

use burn_megatron::data::{
    GptDataset, GptDatasetConfig, IndexedDataset, SampleSource, Split, split_ranges,
};
use burn_megatron::{Error, Result};
use clap::Args;

use crate::tokenizer_args::TokenizerArgs;

/// Flags of `inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Dataset prefix (the path of `.bin`/`.idx` without the extension).
    prefix: PathBuf,
    /// Documents to decode and print.
    #[arg(long, default_value_t = 3)]
    show: usize,
    #[command(flatten)]
    tokenizer: TokenizerArgs,
    /// Train/valid/test split weights for the sampler.
    #[arg(long, default_value = "969,30,1")]
    split: String,
    /// Tokens per sample.
    #[arg(long, default_value_t = 1024)]
    seq_length: usize,
    /// Seed of the sampler's shuffles.
    #[arg(long, default_value_t = 1234)]
    seed: u32,
    /// Samples to draw for train, valid and test, as `TRAIN,VALID,TEST`; runs the sampler.
    #[arg(long, value_delimiter = ',')]
    num_samples: Option<Vec<usize>>,
    /// Write every sample as int64 arrays `{train,valid,test}.tokens` and `.labels`.
    #[arg(long, requires = "num_samples")]
    dump_samples: Option<PathBuf>,
    /// Where the sampler caches its indices (default: next to the data).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

/// Prints the dataset's summary and, with `--num-samples`, the sampler's.
pub fn run(args: &InspectArgs) -> Result<()> {
    let dataset = Arc::new(IndexedDataset::open(&args.prefix)?);
    let lengths = dataset.sequence_lengths()?;
    let tokens: u64 = lengths.iter().map(|&l| l as u64).sum();
    println!("{}", args.prefix.display());
    println!(
        "  {} documents, {} sequences, {tokens} tokens, dtype {:?}, {} bytes of data",
        dataset.documents(),
        dataset.len(),
        dataset.dtype(),
        dataset.data_bytes()
    );
    if args.show > 0 && dataset.dtype().is_integer() {
        let tokenizer = args.tokenizer.build()?;
        for document in 0..args.show.min(dataset.documents()) {
            let mut ids = Vec::new();
            for sequence in dataset.document_sequences(document)? {
                ids.extend(dataset.tokens(sequence, 0, None)?);
            }
            let ids: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
            let text = tokenizer.decode(&ids)?;
            let shown: String = text.chars().take(200).collect();
            let more = if text.chars().count() > 200 {
                " ..."
            } else {
                ""
            };
            println!(
                "  document {document} ({} tokens): {shown:?}{more}",
                ids.len()
            );
        }
    }
    let Some(num_samples) = &args.num_samples else {
        return Ok(());
    };
    if num_samples.len() != 3 {
        return Err(Error::InvalidConfig(format!(
            "--num-samples takes three counts, TRAIN,VALID,TEST (got {num_samples:?})"
        )));
    }
    let config = GptDatasetConfig {
        seq_length: args.seq_length,
        seed: args.seed,
        cache_dir: args.cache_dir.clone(),
    };
    let ranges = split_ranges(&args.split, dataset.len())?;
    let mut arrays: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (split, range) in Split::ALL.into_iter().zip(ranges) {
        let Some(range) = range else {
            println!("  {}: no data (zero weight in --split)", split.name());
            continue;
        };
        let requested = num_samples[split as usize];
        let sampler = GptDataset::build(dataset.clone(), range.clone(), requested, split, &config)?;
        println!(
            "  {}: sequences {range:?}, {} samples of {} tokens ({requested} requested)",
            split.name(),
            sampler.len(),
            args.seq_length
        );
        if args.dump_samples.is_some() {
            let (mut tokens, mut labels) = (Vec::new(), Vec::new());
            for index in 0..sampler.len() {
                let sample = SampleSource::get(&sampler, index)?;
                tokens.extend(sample.tokens.iter().flat_map(|t| t.to_le_bytes()));
                labels.extend(sample.labels.iter().flat_map(|t| t.to_le_bytes()));
            }
            let shape = vec![sampler.len(), args.seq_length];
            arrays.push((format!("{}.tokens", split.name()), shape.clone(), tokens));
            arrays.push((format!("{}.labels", split.name()), shape, labels));
        }
    }
    if let Some(path) = &args.dump_samples {
        let views = arrays
            .iter()
            .map(|(name, shape, bytes)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::I64, shape.clone(), bytes)
                    .map(|view| (name.clone(), view))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::InvalidData(format!("building the sample arrays: {e}")))?;
        safetensors::serialize_to_file(views, None, path)
            .map_err(|e| Error::InvalidData(format!("{}: {e}", path.display())))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
