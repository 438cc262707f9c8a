//! `convert`: Hugging Face GPT checkpoints to burn-megatron's distributed format for a
//! target layout, and burn-megatron checkpoints back to Hugging Face safetensors.

use std::path::{Path, PathBuf};

use burn_megatron::checkpoint::{Checkpoint, StateKind};
use burn_megatron::parallel::{Layout, LocalCluster};
use burn_megatron::train::save_model;
use burn_megatron::{Error, Result};
use burn_megatron_models::gpt::hf::{Family, HfCheckpoint};
use burn_megatron_models::gpt::{
    FullTensors, GptConfig, GptModel, Weights, checkpoint_tensor, hf_config_json, hf_config_of,
    hf_tensors, write_hf,
};
use clap::{Args, ValueEnum};
use serde_json::Value;

type Backend = burn_ndarray::NdArray<f32>;

/// The format to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// burn-megatron's distributed checkpoint, split for --tp and --pp (loads into any
    /// layout with `train --load`).
    Native,
    /// Hugging Face safetensors with `config.json` (sharded by --max-shard-size).
    Hf,
}

/// Flags of `convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The checkpoint to read: a Hugging Face directory (`config.json` and safetensors),
    /// a burn-megatron save directory (its `latest`) or one checkpoint directory.
    #[arg(long)]
    load: PathBuf,
    /// Where to write: a new or empty directory.
    #[arg(long)]
    save: PathBuf,
    /// The format to write.
    #[arg(long, value_enum)]
    to: Format,
    /// Tensor-parallel size the native checkpoint is split for.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Pipeline stages the native checkpoint is split for.
    #[arg(long, default_value_t = 1)]
    pp: usize,
    /// Data-parallel size of the writing layout (parameters are written once whatever it
    /// is).
    #[arg(long, default_value_t = 1)]
    dp: usize,
    /// Largest Hugging Face safetensors file, such as 200MB, 5GB or 2GiB; a tensor larger
    /// than that gets a file of its own.
    #[arg(long, default_value = "5GB")]
    max_shard_size: String,
    /// Pad the vocabulary to a multiple of this times tp when the native checkpoint is
    /// trained or run [default: the source's, else 128]. Checkpoints store the vocabulary
    /// without padding, so any value loads.
    #[arg(long)]
    make_vocab_size_divisible_by: Option<usize>,
    /// List every tensor written: name, shape, dtype (and, for native, how it is split).
    #[arg(long)]
    print_checkpoint_structure: bool,
}

/// `200MB` (decimal), `2GiB` (binary), or plain bytes.
fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let factor: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        _ => 0,
    };
    match number.parse::<f64>() {
        Ok(value) if factor > 0 && value > 0.0 => Ok((value * factor as f64) as u64),
        _ => Err(Error::InvalidConfig(format!(
            "--max-shard-size {text}: use a size such as 200MB, 5GB or 2GiB"
        ))),
    }
}

/// The model to convert: its configuration, original `config.json` when it came from
/// Hugging Face, and its canonical full tensors.
enum Source {
    Hf(HfCheckpoint, GptConfig),
    Native(Checkpoint, GptConfig),
}

impl Source {
    fn open(path: &Path) -> Result<Self> {
        if path.join("config.json").is_file() {
            let checkpoint = HfCheckpoint::open(path)?;
            let config = checkpoint.gpt_config()?;
            Ok(Source::Hf(checkpoint, config))
        } else {
            let checkpoint = Checkpoint::open(path)?;
            let config = GptConfig::of_checkpoint(&checkpoint)?;
            Ok(Source::Native(checkpoint, config))
        }
    }

    fn config(&self) -> &GptConfig {
        match self {
            Source::Hf(_, config) | Source::Native(_, config) => config,
        }
    }

    fn hf_config(&self) -> Option<&Value> {
        match self {
            Source::Hf(checkpoint, _) => Some(checkpoint.config_json()),
            Source::Native(checkpoint, _) => hf_config_of(checkpoint),
        }
    }

    fn tensor(&self, name: &str) -> Result<burn::tensor::TensorData> {
        match self {
            Source::Hf(checkpoint, config) => checkpoint.canonical(config, name),
            Source::Native(checkpoint, _) => checkpoint_tensor(checkpoint, name),
        }
    }
}

fn check_empty(dir: &Path) -> Result<()> {
    let occupied = std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some());
    if occupied {
        return Err(Error::InvalidConfig(format!(
            "--save {} is not empty; give a new directory so nothing is overwritten",
            dir.display()
        )));
    }
    Ok(())
}

/// Converts the checkpoint.
pub fn run(args: &ConvertArgs) -> Result<()> {
    let max_shard = parse_size(&args.max_shard_size)?;
    let source = Source::open(&args.load)?;
    let mut config = source.config().clone();
    if let Some(multiple) = args.make_vocab_size_divisible_by {
        config.make_vocab_size_divisible_by = multiple;
    }
    config.pipeline_layers = None;
    config.sequence_parallel = false;
    check_empty(&args.save)?;
    let get = |name: &str| source.tensor(name);
    match args.to {
        Format::Native => {
            let layout = Layout::new(args.tp, args.pp, args.dp)?;
            config.check(&layout)?;
            let model = config.checkpoint_json(source.hf_config());
            let written = LocalCluster::new(layout).run(|ctx| {
                let device = Default::default();
                let chunks = GptModel::<Backend>::build_chunks(
                    &config,
                    &ctx,
                    &Weights::Full(&get),
                    &device,
                )?;
                save_model(&ctx, &args.save, &chunks, &model)
            })?;
            println!(
                "wrote {} ({} layers, hidden {}, vocabulary {}) split for tp {} x pp {}",
                written[0].display(),
                config.layers,
                config.hidden,
                config.vocab_size,
                args.tp,
                args.pp
            );
            if args.print_checkpoint_structure {
                print_native(&written[0])?;
            }
        }
        Format::Hf => {
            let family = Family::of(&config, source.hf_config())?;
            let full: &FullTensors<'_> = &get;
            let tensors = hf_tensors(&config, family, full)?;
            let config_json = source
                .hf_config()
                .cloned()
                .unwrap_or_else(|| hf_config_json(&config, family));
            let files = write_hf(&args.save, &config_json, &tensors, max_shard)?;
            println!(
                "wrote {} as Hugging Face {family:?}: {} tensors in {}",
                args.save.display(),
                tensors.len(),
                files.join(", ")
            );
            if args.print_checkpoint_structure {
                for (name, data) in &tensors {
                    println!("{name}\t{:?}\tF32", data.shape.as_slice());
                }
            }
        }
    }
    Ok(())
}

/// Lists a native checkpoint's parameters with their shapes and splits.
fn print_native(dir: &Path) -> Result<()> {
    let checkpoint = Checkpoint::open(dir)?;
    let info = checkpoint.info();
    println!(
        "iteration {}, written at tp {} x pp {} x dp {}",
        info.iteration, info.layout.tp, info.layout.pp, info.layout.dp
    );
    for kind in StateKind::ALL {
        for (name, shape) in checkpoint.names(kind) {
            let split = checkpoint
                .split_of(kind, &name)
                .map_or("replicated".to_string(), |dim| {
                    format!("split along dimension {dim}")
                });
            println!("{} {name}\t{shape:?}\tF32\t{split}", kind.name());
        }
    }
    Ok(())
}
