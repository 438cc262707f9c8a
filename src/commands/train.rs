//! `train`: GPT pretraining with tensor x pipeline x data parallelism, on thread ranks or
//! as one rank of a launched job.
//!
//! Every setting is a flag and a key of the TOML file given with `--config` (the flag's
//! name with underscores); flags win over the file, the file over the defaults. With no
//! arguments it trains a small GPT on the embedded tinyshakespeare, tokenized with the
//! embedded GPT-2 BPE, at tp 2 x dp 2.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn_megatron::checkpoint::{Checkpoint, incomplete_saves};
use burn_megatron::data::{
    DType, GptDatasetConfig, IndexedDatasetBuilder, SampleSource, build_gpt_splits, dataset_paths,
    parse_data_path,
};
use burn_megatron::launch::LaunchEnv;
use burn_megatron::parallel::{
    DEFAULT_TIMEOUT, Layout, LocalCluster, ParallelBackend, ParallelContext,
};
use burn_megatron::train::{
    CheckpointConfig, Decay, LossScaling, LrSchedule, StepRecord, TrainConfig, train,
};
use burn_megatron::{Error, Result};
use burn_megatron_models::gpt::{
    Activation, GptConfig, GptModel, GptStep, NormKind, PositionEmbedding, RecomputeMethod,
    hf_config_of,
};
use clap::Args;
use serde::Deserialize;

use crate::tokenizer_args::TokenizerArgs;

const TINYSHAKESPEARE: &str = include_str!("../../data/corpora/tinyshakespeare.txt");

/// Flags of `train` (also the keys of its TOML file).
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct TrainArgs {
    /// TOML file with any of these settings (flag names with underscores).
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,

    /// Where the ranks compute: cpu, or cuda (one GPU per launched rank, its LOCAL_RANK;
    /// thread ranks share GPU 0) when built with `--features cuda`: GEMMs on cuBLASLt,
    /// the fused CubeCL kernels, NCCL between launched ranks; the first step compiles
    /// the kernels (seconds; `CUBECL_AUTOTUNE_LEVEL=minimal` shortens Burn's autotuning)
    /// [default: cpu].
    #[arg(long)]
    device: Option<String>,
    /// Tensor-parallel size [default: 2].
    #[arg(long)]
    tp: Option<usize>,
    /// Data-parallel size [default: 2].
    #[arg(long)]
    dp: Option<usize>,
    /// Pipeline-parallel size (stages); micro-batches per step = global batch / (micro
    /// batch x dp) [default: 1].
    #[arg(long)]
    pp: Option<usize>,
    /// Model chunks per pipeline stage: above 1 selects the interleaved 1F1B schedule,
    /// which needs the micro-batches to be a multiple of --pp [default: 1].
    #[arg(long)]
    virtual_stages: Option<usize>,
    /// Layers of each virtual pipeline stage, comma-separated, in virtual-stage order
    /// (for example 3,5 with --pp 2) [default: an even split].
    #[arg(long, value_delimiter = ',')]
    pipeline_layers: Option<Vec<usize>>,

    /// Model preset (gpt2-124m, gpt2-355m, gpt2-774m, gpt2-1.5b); other model flags
    /// override it. Without it: a small GPT (4 layers, hidden 128, 4 heads).
    #[arg(long)]
    preset: Option<String>,
    /// Transformer layers.
    #[arg(long)]
    num_layers: Option<usize>,
    /// Hidden size.
    #[arg(long)]
    hidden_size: Option<usize>,
    /// Attention heads.
    #[arg(long)]
    num_attention_heads: Option<usize>,
    /// Key/value head groups (grouped-query attention; 1 for multi-query).
    #[arg(long)]
    num_query_groups: Option<usize>,
    /// Feed-forward hidden size [default: 4 x hidden].
    #[arg(long)]
    ffn_hidden_size: Option<usize>,
    /// Positions: learned, rope or alibi [default: learned].
    #[arg(long)]
    position_embedding: Option<String>,
    /// Rotary base (with --position-embedding rope) [default: 10000].
    #[arg(long)]
    rotary_base: Option<f64>,
    /// Normalization: LayerNorm or RMSNorm [default: LayerNorm].
    #[arg(long)]
    normalization: Option<String>,
    /// Feed-forward activation: gelu, gelu-tanh or swiglu [default: gelu-tanh].
    #[arg(long)]
    activation: Option<String>,
    /// Give the output layer its own weights instead of sharing the embeddings.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    untie_embeddings: Option<bool>,
    /// Linear layers without biases.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    disable_bias: Option<bool>,
    /// Dropout probability on the embeddings and on the attention and feed-forward block
    /// outputs (training only) [default: 0, or the preset's].
    #[arg(long)]
    hidden_dropout: Option<f64>,
    /// Dropout probability on the attention probabilities (training only) [default: 0, or
    /// the preset's].
    #[arg(long)]
    attention_dropout: Option<f64>,
    /// Split the residual stream along the sequence over tensor-parallel ranks.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    sequence_parallel: Option<bool>,
    /// Pad the vocabulary to a multiple of this times tp [default: 128].
    #[arg(long)]
    make_vocab_size_divisible_by: Option<usize>,
    /// Standard deviation of the initial weights [default: 0.02].
    #[arg(long)]
    init_method_std: Option<f64>,

    /// Tokens per sample [default: 64].
    #[arg(long)]
    seq_length: Option<usize>,
    /// Samples per micro-batch per data-parallel rank [default: 4].
    #[arg(long)]
    micro_batch_size: Option<usize>,
    /// Samples per optimizer step; micro-batches = global / (micro x dp) [default: 8].
    #[arg(long)]
    global_batch_size: Option<usize>,
    /// Optimizer steps [default: 400].
    #[arg(long)]
    steps: Option<usize>,
    /// Seed of the weights and the data order [default: 1234].
    #[arg(long)]
    seed: Option<u64>,

    /// Peak learning rate [default: 3e-3, or with --preset the rate GPT-3 used at its
    /// size: 6e-4, 3e-4, 2.5e-4, 2e-4 from gpt2-124m to gpt2-1.5b].
    #[arg(long)]
    lr: Option<f64>,
    /// Final learning rate [default: lr / 10].
    #[arg(long)]
    min_lr: Option<f64>,
    /// Linear warmup steps [default: steps / 10].
    #[arg(long)]
    lr_warmup_steps: Option<usize>,
    /// Decay after warmup: constant, linear, cosine or WSD [default: cosine].
    #[arg(long)]
    lr_decay_style: Option<String>,
    /// Steps over which the schedule runs [default: steps].
    #[arg(long)]
    lr_decay_steps: Option<usize>,
    /// Final decay steps of the WSD schedule [default: steps / 5].
    #[arg(long)]
    lr_wsd_decay_steps: Option<usize>,
    /// AdamW weight decay [default: 0.1].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// AdamW beta 1 [default: 0.9].
    #[arg(long)]
    adam_beta1: Option<f64>,
    /// AdamW beta 2 [default: 0.95].
    #[arg(long)]
    adam_beta2: Option<f64>,
    /// AdamW epsilon [default: 1e-8].
    #[arg(long)]
    adam_eps: Option<f64>,
    /// Clip the global gradient norm to this; 0 disables [default: 1.0].
    #[arg(long)]
    clip_grad: Option<f64>,
    /// Shard the fp32 master weights and Adam moments over the data-parallel ranks
    /// (Megatron's distributed optimizer).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    use_distributed_optimizer: Option<bool>,
    /// Parameters and activations in fp32, bf16 or fp16 (Megatron's mixed precision:
    /// fp32 main grads, master weights and Adam moments; norms, softmax and the loss in
    /// fp32; fp16 turns on dynamic loss scaling). bf16 and fp16 need --device cuda
    /// [default: fp32].
    #[arg(long)]
    precision: Option<String>,
    /// What the forward keeps for the backward: `selective` (Megatron's selective
    /// recompute: core attention keeps only Q, K, V and recomputes the attention
    /// probabilities), `full` (only the input of each group of --recompute-num-layers
    /// transformer layers is kept and the group's forward runs again in the backward: the
    /// least memory, about a third more compute) or `none` (every intermediate is stored)
    /// [default: selective].
    #[arg(long)]
    recompute_granularity: Option<String>,
    /// Under --recompute-granularity full: the transformer layers per recomputed group
    /// (uniform), or the layers of each model chunk that are recomputed (block) [default:
    /// 1].
    #[arg(long)]
    recompute_num_layers: Option<usize>,
    /// Under --recompute-granularity full: `uniform` (every layer is recomputed, in
    /// groups of --recompute-num-layers) or `block` (only the first --recompute-num-layers
    /// layers of each model chunk are, one by one; the others keep their activations:
    /// less compute, more memory) [default: uniform].
    #[arg(long)]
    recompute_method: Option<String>,
    /// Run every fast op (cuBLASLt GEMMs) through its plain-Burn reference instead, for
    /// comparisons; the environment variable BURN_MEGATRON_REFERENCE_OPS=1 does the same.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    reference_ops: Option<bool>,
    /// Run the fused kernels (norms, bias-GeLU, bias-dropout-add) through their plain-Burn
    /// references, keeping the other fast ops: measures what the kernels bring.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    reference_kernels: Option<bool>,
    /// Let fp32 GEMMs on CUDA use TF32 tensor cores (faster, 10-bit mantissa products).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    tf32: Option<bool>,
    /// Megatron's gradient-accumulation fusion: the linear layers' weight-gradient GEMMs
    /// add into fp32 accumulators kept for the whole step instead of making gradients in
    /// the weights' type that are cast and added per micro-batch [default: true with
    /// --device cuda and more than one micro-batch a step, else false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    gradient_accumulation_fusion: Option<bool>,
    /// Elements per gradient bucket of the data-parallel reduction [default: 40000000].
    #[arg(long)]
    bucket_size: Option<usize>,
    /// Turn on dynamic loss scaling, starting at this scale (steps whose gradients
    /// overflow are skipped and halve the scale).
    #[arg(long)]
    initial_loss_scale: Option<f64>,
    /// Steps without overflow before the loss scale doubles [default: 1000].
    #[arg(long)]
    loss_scale_window: Option<usize>,

    /// Dataset prefix, or `WEIGHT PREFIX` pairs for a blend [default: the embedded
    /// tinyshakespeare].
    #[arg(long, num_args = 1..)]
    data_path: Option<Vec<String>>,
    /// Train/valid/test split weights [default: 95,5,0].
    #[arg(long)]
    split: Option<String>,
    /// Where dataset index caches go [default: next to the data].
    #[arg(long)]
    data_cache_path: Option<PathBuf>,

    /// Log every this many steps [default: 10].
    #[arg(long)]
    log_interval: Option<usize>,
    /// Evaluate every this many steps [default: 100].
    #[arg(long)]
    eval_interval: Option<usize>,
    /// Micro-batches per data-parallel rank in an evaluation [default: 4].
    #[arg(long)]
    eval_iters: Option<usize>,
    /// Write one JSON object per logged step to this file.
    #[arg(long)]
    metrics: Option<PathBuf>,

    /// Save checkpoints under this directory (every --save-interval steps, when exiting
    /// and at the end); each rank writes its own shards.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Save every this many steps; 0 saves only when exiting and at the end [default: 0].
    #[arg(long)]
    save_interval: Option<usize>,
    /// Continue from the newest complete checkpoint under this directory (or from this
    /// checkpoint directory), in any parallel layout: model, optimizer state, learning
    /// rate schedule, loss scale and data position. The model's sizes come from the
    /// checkpoint.
    #[arg(long)]
    load: Option<PathBuf>,
    /// Stop after a step that is a multiple of this, saving first with --save; the
    /// schedule and data order stay those of --steps [default: 0, never].
    #[arg(long)]
    exit_interval: Option<usize>,

    #[command(flatten)]
    #[serde(skip)]
    tokenizer: TokenizerArgs,
}

macro_rules! merge {
    ($flags:expr, $file:expr, $($field:ident),* $(,)?) => {
        TrainArgs { $($field: $flags.$field.clone().or($file.$field.clone()),)* config: None, tokenizer: $flags.tokenizer.clone() }
    };
}

impl TrainArgs {
    /// The flags laid over the TOML file's settings.
    fn resolve(&self) -> Result<TrainArgs> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                toml::from_str::<TrainArgs>(&text).map_err(|e| {
                    Error::InvalidConfig(format!(
                        "{}: {}",
                        path.display(),
                        e.to_string().trim_end()
                    ))
                })?
            }
            None => TrainArgs::default(),
        };
        Ok(merge!(
            self,
            file,
            device,
            tp,
            dp,
            pp,
            virtual_stages,
            pipeline_layers,
            preset,
            num_layers,
            hidden_size,
            num_attention_heads,
            num_query_groups,
            ffn_hidden_size,
            position_embedding,
            rotary_base,
            normalization,
            activation,
            untie_embeddings,
            disable_bias,
            hidden_dropout,
            attention_dropout,
            sequence_parallel,
            make_vocab_size_divisible_by,
            init_method_std,
            seq_length,
            micro_batch_size,
            global_batch_size,
            steps,
            seed,
            lr,
            min_lr,
            lr_warmup_steps,
            lr_decay_style,
            lr_decay_steps,
            lr_wsd_decay_steps,
            weight_decay,
            adam_beta1,
            adam_beta2,
            adam_eps,
            clip_grad,
            use_distributed_optimizer,
            precision,
            recompute_granularity,
            recompute_num_layers,
            recompute_method,
            reference_ops,
            reference_kernels,
            tf32,
            gradient_accumulation_fusion,
            bucket_size,
            initial_loss_scale,
            loss_scale_window,
            data_path,
            split,
            data_cache_path,
            log_interval,
            eval_interval,
            eval_iters,
            metrics,
            save,
            save_interval,
            load,
            exit_interval,
        ))
    }

    fn model(&self, vocab_size: usize) -> Result<GptConfig> {
        let mut model = match &self.preset {
            Some(name) => GptConfig::preset(name)?,
            None => GptConfig::new(vocab_size, 128, 4, 4),
        };
        model.vocab_size = vocab_size;
        model.layers = self.num_layers.unwrap_or(model.layers);
        model.hidden = self.hidden_size.unwrap_or(model.hidden);
        model.heads = self.num_attention_heads.unwrap_or(model.heads);
        model.query_groups = self.num_query_groups.or(model.query_groups);
        model.ffn_hidden = self.ffn_hidden_size.or(model.ffn_hidden);
        model.max_seq_len = self.seq_length.unwrap_or(64);
        model.position = match self.position_embedding.as_deref().unwrap_or("learned") {
            "learned" => PositionEmbedding::Learned,
            "rope" => PositionEmbedding::Rotary {
                base: self.rotary_base.unwrap_or(10_000.0),
            },
            "alibi" => PositionEmbedding::Alibi,
            other => {
                return Err(invalid(
                    "position_embedding",
                    other,
                    "learned, rope or alibi",
                ));
            }
        };
        model.norm = match self.normalization.as_deref().unwrap_or("LayerNorm") {
            "LayerNorm" => NormKind::LayerNorm,
            "RMSNorm" => NormKind::RmsNorm,
            other => return Err(invalid("normalization", other, "LayerNorm or RMSNorm")),
        };
        model.activation = match self.activation.as_deref().unwrap_or("gelu-tanh") {
            "gelu" => Activation::Gelu,
            "gelu-tanh" => Activation::GeluTanh,
            "swiglu" => Activation::SwiGlu,
            other => return Err(invalid("activation", other, "gelu, gelu-tanh or swiglu")),
        };
        model.tied_embeddings = !self.untie_embeddings.unwrap_or(false);
        model.bias = !self.disable_bias.unwrap_or(false);
        model.hidden_dropout = self.hidden_dropout.unwrap_or(model.hidden_dropout);
        model.attention_dropout = self.attention_dropout.unwrap_or(model.attention_dropout);
        model.sequence_parallel = self.sequence_parallel.unwrap_or(false);
        self.set_recompute(&mut model)?;
        model.make_vocab_size_divisible_by = self.make_vocab_size_divisible_by.unwrap_or(128);
        model.init_std = self.init_method_std.unwrap_or(0.02);
        model.seed = self.seed.unwrap_or(1234);
        model.pipeline_layers = self.pipeline_layers.clone();
        Ok(model)
    }

    /// What the model recomputes (`--recompute-granularity`, `--recompute-num-layers`).
    fn set_recompute(&self, model: &mut GptConfig) -> Result<()> {
        let granularity = self.recompute_granularity.as_deref().unwrap_or("selective");
        for (flag, given) in [
            (
                "--recompute-num-layers",
                self.recompute_num_layers.is_some(),
            ),
            ("--recompute-method", self.recompute_method.is_some()),
        ] {
            if given && granularity != "full" {
                return Err(Error::InvalidConfig(format!(
                    "{flag} applies to --recompute-granularity full, not {granularity}: drop \
                     it or recompute full layers"
                )));
            }
        }
        model.recompute_method = match self.recompute_method.as_deref().unwrap_or("uniform") {
            "uniform" => RecomputeMethod::Uniform,
            "block" => RecomputeMethod::Block,
            other => return Err(invalid("recompute-method", other, "uniform or block")),
        };
        (model.recompute_attention, model.recompute_num_layers) = match granularity {
            "selective" => (true, 0),
            "none" => (false, 0),
            // Core attention stays the selective op inside the recomputed layers: storing
            // its probabilities would take Burn's plain ops, which on an H200 made the 774M
            // step 3.4 times slower than selective recompute (13.6k against 46.5k tokens/s).
            "full" => match self.recompute_num_layers.unwrap_or(1) {
                0 => {
                    return Err(Error::InvalidConfig(
                        "--recompute-num-layers must be at least 1".to_string(),
                    ));
                }
                layers => (true, layers),
            },
            other => {
                return Err(invalid(
                    "recompute-granularity",
                    other,
                    "selective, full or none",
                ));
            }
        };
        Ok(())
    }

    /// The model of the checkpoint to continue from: its sizes and variants, with the
    /// layout's settings (pipeline split, sequence parallelism, vocabulary padding) and
    /// the seed taken from the flags.
    fn model_of_checkpoint(&self, checkpoint: &Checkpoint, vocab_size: usize) -> Result<GptConfig> {
        let mut model = GptConfig::of_checkpoint(checkpoint)?;
        if model.vocab_size != vocab_size {
            return Err(Error::InvalidConfig(format!(
                "--load {}: the checkpoint's vocabulary has {} tokens, the tokenizer {vocab_size}; \
                 pass the tokenizer the checkpoint was trained with",
                checkpoint.dir().display(),
                model.vocab_size
            )));
        }
        let seq_length = self.seq_length.unwrap_or(64);
        if seq_length > model.max_seq_len {
            return Err(Error::InvalidConfig(format!(
                "--seq-length {seq_length} is longer than the checkpoint's model allows ({})",
                model.max_seq_len
            )));
        }
        model.pipeline_layers = self.pipeline_layers.clone();
        model.sequence_parallel = self.sequence_parallel.unwrap_or(false);
        self.set_recompute(&mut model)?;
        model.hidden_dropout = self.hidden_dropout.unwrap_or(model.hidden_dropout);
        model.attention_dropout = self.attention_dropout.unwrap_or(model.attention_dropout);
        if let Some(multiple) = self.make_vocab_size_divisible_by {
            model.make_vocab_size_divisible_by = multiple;
        }
        Ok(model)
    }

    /// The training settings for `layout` (its data-parallel size sets the micro-batches a
    /// step, on which the gradient-accumulation fusion default depends).
    fn train_config(&self, layout: &Layout) -> Result<TrainConfig> {
        let steps = self.steps.unwrap_or(400);
        let max_lr = self
            .lr
            .or_else(|| {
                self.preset
                    .as_deref()
                    .and_then(GptConfig::preset_learning_rate)
            })
            .unwrap_or(3e-3);
        let mut decay: Decay = self.lr_decay_style.as_deref().unwrap_or("cosine").parse()?;
        if let Decay::Wsd { .. } = decay {
            decay = Decay::Wsd {
                decay_steps: self.lr_wsd_decay_steps.unwrap_or(steps / 5),
            };
        }
        let mut config = TrainConfig {
            steps,
            micro_batch_size: self.micro_batch_size.unwrap_or(4),
            global_batch_size: self.global_batch_size.unwrap_or(8),
            seq_length: self.seq_length.unwrap_or(64),
            schedule: LrSchedule {
                max_lr,
                min_lr: self.min_lr.unwrap_or(max_lr / 10.0),
                warmup_steps: self.lr_warmup_steps.unwrap_or(steps / 10),
                decay_steps: self.lr_decay_steps.unwrap_or(steps),
                decay,
            },
            weight_decay: self.weight_decay.unwrap_or(0.1),
            adam_beta1: self.adam_beta1.unwrap_or(0.9),
            adam_beta2: self.adam_beta2.unwrap_or(0.95),
            adam_eps: self.adam_eps.unwrap_or(1e-8),
            clip_grad: self.clip_grad.unwrap_or(1.0),
            distributed_optimizer: self.use_distributed_optimizer.unwrap_or(false),
            bucket_size: self.bucket_size.unwrap_or(40_000_000),
            // fp16 needs loss scaling (Megatron's default window, a 2^16 start).
            loss_scaling: self
                .initial_loss_scale
                .or((self.precision.as_deref() == Some("fp16")).then_some(65536.0))
                .map(|initial| LossScaling {
                    initial,
                    growth_interval: self.loss_scale_window.unwrap_or(1000),
                }),
            gradient_accumulation_fusion: false,
            checkpoint: CheckpointConfig {
                save: self.save.clone(),
                save_interval: self.save_interval.unwrap_or(0),
                load: self.load.clone(),
                model: serde_json::Value::Null,
            },
            exit_interval: self.exit_interval.unwrap_or(0),
            log_interval: self.log_interval.unwrap_or(10),
            eval_interval: self.eval_interval.unwrap_or(100),
            eval_iters: self.eval_iters.unwrap_or(4),
            metrics: self.metrics.clone(),
            progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        };
        config.gradient_accumulation_fusion = match self.gradient_accumulation_fusion {
            Some(on) => on,
            // On by default where it was measured to pay: on CUDA with several micro-batches
            // a step (GPT-2 774M on an H200, four micro-batches of 2: 27.9k tokens/s against
            // 26.9k without, 21.7k against 16.7k in an earlier build; the same losses and
            // gradient norms as one CPU rank); one micro-batch of 8 ran 12% slower.
            None => {
                self.device.as_deref() == Some("cuda") && config.micro_batches(layout.data())? > 1
            }
        };
        Ok(config)
    }
}

/// What the model recomputes in its backward, for the log: `selective`, `none`, or `full`
/// with its method and layers.
fn recompute_description(model: &GptConfig) -> String {
    match (model.recompute_num_layers, model.recompute_method) {
        (0, _) if model.recompute_attention => "selective".to_string(),
        (0, _) => "none".to_string(),
        (layers, RecomputeMethod::Uniform) => format!("full (every layer, groups of {layers})"),
        (1, RecomputeMethod::Block) => "full (the first layer of each model chunk)".to_string(),
        (layers, RecomputeMethod::Block) => {
            format!("full (the first {layers} layers of each model chunk)")
        }
    }
}

fn invalid(key: &str, value: &str, valid: &str) -> Error {
    Error::InvalidConfig(format!("--{} {value}: use {valid}", key.replace('_', "-")))
}

/// Tokenizes the embedded tinyshakespeare into an indexed dataset under the system's
/// temporary directory (once), one paragraph per document with EOD appended.
fn embedded_dataset(tokenizer: &burn_megatron::data::Tokenizer) -> Result<PathBuf> {
    let directory = std::env::temp_dir().join("burn-megatron");
    std::fs::create_dir_all(&directory).map_err(|e| Error::io(&directory, e))?;
    let prefix = directory.join(format!(
        "tinyshakespeare-v{}_text_document",
        tokenizer.vocab_size()
    ));
    let (idx, bin) = dataset_paths(&prefix);
    if idx.exists() && bin.exists() {
        return Ok(prefix);
    }
    let eod = tokenizer.eod().ok_or_else(|| {
        Error::InvalidConfig("the tokenizer has no end-of-document token".to_string())
    })?;
    let mut builder =
        IndexedDatasetBuilder::create(&prefix, DType::for_vocab_size(tokenizer.vocab_size()))?;
    for paragraph in TINYSHAKESPEARE
        .split("\n\n")
        .filter(|p| !p.trim().is_empty())
    {
        let mut tokens: Vec<i64> = tokenizer
            .encode(paragraph)?
            .into_iter()
            .map(i64::from)
            .collect();
        tokens.push(eod as i64);
        builder.add_tokens(&tokens)?;
        builder.end_document();
    }
    builder.finish()?;
    Ok(prefix)
}

/// Runs the training job: on thread ranks, or as one rank of a launched job when the
/// launch environment (torchrun, SLURM, OpenMPI) is set.
pub fn run(flags: &TrainArgs) -> Result<()> {
    let args = flags.resolve()?;
    let tokenizer = args.tokenizer.build()?;
    let (tp, dp, pp) = (
        args.tp.unwrap_or(2),
        args.dp.unwrap_or(2),
        args.pp.unwrap_or(1),
    );
    let layout =
        Layout::new(tp, pp, dp)?.with_virtual_pipeline(args.virtual_stages.unwrap_or(1))?;
    let checkpoint = args.load.as_ref().map(Checkpoint::open).transpose()?;
    let model = match &checkpoint {
        Some(checkpoint) => args.model_of_checkpoint(checkpoint, tokenizer.vocab_size())?,
        None => args.model(tokenizer.vocab_size())?,
    };
    model.check(&layout)?;
    let mut config = args.train_config(&layout)?;
    // A model converted from Hugging Face keeps its original config.json.
    let hf_config = checkpoint.as_ref().and_then(hf_config_of);
    config.checkpoint.model = model.checkpoint_json(hf_config);
    if let Some(loaded) = &checkpoint
        && loaded.info().iteration >= config.steps
    {
        return Err(Error::InvalidConfig(format!(
            "--load {}: the checkpoint is at step {}, --steps {} leaves nothing to train; raise --steps",
            loaded.dir().display(),
            loaded.info().iteration,
            config.steps
        )));
    }
    if model.sequence_parallel && config.seq_length % tp != 0 {
        return Err(Error::InvalidConfig(format!(
            "--sequence-parallel splits the sequence over tp {tp}: --seq-length {} must be a multiple of it",
            config.seq_length
        )));
    }
    config.schedule(&layout)?;

    let data_path = match &args.data_path {
        Some(values) => parse_data_path(values)?,
        None => vec![(1.0, embedded_dataset(&tokenizer)?)],
    };
    for (_, prefix) in &data_path {
        check_dataset(prefix)?;
    }
    let split = args.split.clone().unwrap_or_else(|| "95,5,0".to_string());
    let evals = config.steps / config.eval_interval.max(1) + 1;
    let valid_samples = evals * config.eval_iters * config.micro_batch_size * dp;
    let data_config = GptDatasetConfig {
        seq_length: config.seq_length,
        seed: model.seed as u32,
        cache_dir: args.data_cache_path.clone(),
    };
    let [train_data, valid_data, _] = build_gpt_splits(
        &data_path,
        &split,
        [config.steps * config.global_batch_size, valid_samples, 0],
        &data_config,
    )?;
    let train_data = train_data.ok_or_else(|| {
        Error::InvalidConfig(format!("--split {split} gives the training split no data"))
    })?;
    let device = args.device.clone().unwrap_or_else(|| "cpu".to_string());
    let devices: &[&str] = if cfg!(feature = "cuda") {
        &["cpu", "cuda"]
    } else {
        &["cpu"]
    };
    if !devices.contains(&device.as_str()) {
        let hint = if cfg!(feature = "cuda") {
            ""
        } else {
            " (cuda needs a build with --features cuda)"
        };
        return Err(invalid(
            "device",
            &device,
            &format!("{}{hint}", devices.join(" or ")),
        ));
    }
    let launched = LaunchEnv::from_env()?;
    let logging = launched
        .as_ref()
        .is_none_or(|env| env.rank == layout.logging_rank());
    if logging {
        if let Some(root) = &args.load {
            for skipped in incomplete_saves(root) {
                println!(
                    "ignoring {}: a save that did not complete",
                    skipped.display()
                );
            }
        }
        println!(
            "model: {} layers, hidden {}, {} heads, {} parameters, recompute {}; data: {}",
            model.layers,
            model.hidden,
            model.heads,
            model.num_params(),
            recompute_description(&model),
            data_path
                .iter()
                .map(|(w, p)| format!("{w} x {}", p.display()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    burn_megatron::ops::use_reference_ops(args.reference_ops.unwrap_or(false));
    burn_megatron_kernels::use_reference_kernels(args.reference_kernels.unwrap_or(false));
    if args.tf32.unwrap_or(false) {
        #[cfg(feature = "cuda")]
        burn_megatron::ops::allow_tf32(true);
        #[cfg(not(feature = "cuda"))]
        return Err(Error::InvalidConfig(
            "--tf32 needs a build with the cuda feature (cargo build --features cuda)".to_string(),
        ));
    }
    #[cfg(feature = "cuda")]
    if device == "cuda" && launched.is_none() && layout.world_size() > 1 {
        // Thread ranks share GPU 0.
        burn_megatron::ops::queue_gemms_on_device_thread(false);
    }
    let started = std::time::Instant::now();
    let gpu = launched.as_ref().map_or(0, |env| env.local_rank);
    let precision = args.precision.clone().unwrap_or_else(|| "fp32".to_string());
    match (device.as_str(), precision.as_str()) {
        (_, "fp32") | ("cuda", "bf16" | "fp16") => {}
        ("cpu", "bf16" | "fp16") => {
            return Err(Error::InvalidConfig(format!(
                "--precision {precision} needs --device cuda: the CPU backend (NdArray) computes \
                 in fp32 only"
            )));
        }
        (_, other) => return Err(invalid("precision", other, "fp32, bf16 or fp16")),
    }
    let memory = match device.as_str() {
        #[cfg(feature = "cuda")]
        "cuda" => Some(burn_megatron::check_gpu(gpu)?),
        _ => available_host_memory(),
    };
    check_attention_memory(&model, &config, tp, &precision, memory)?;
    let run_rank = |ctx: ParallelContext| -> Result<Vec<StepRecord>> {
        let data = (train_data.as_ref(), valid_data.as_deref());
        #[cfg(feature = "cuda")]
        let cuda = burn_cuda::CudaDevice::new(gpu);
        let _ = gpu;
        match (device.as_str(), precision.as_str()) {
            #[cfg(feature = "cuda")]
            ("cuda", "bf16") => {
                train_rank::<CudaBackendOf<half::bf16>>(&ctx, &cuda, &model, data, &config)
            }
            #[cfg(feature = "cuda")]
            ("cuda", "fp16") => {
                train_rank::<CudaBackendOf<half::f16>>(&ctx, &cuda, &model, data, &config)
            }
            #[cfg(feature = "cuda")]
            ("cuda", _) => train_rank::<CudaBackend>(&ctx, &cuda, &model, data, &config),
            _ => train_rank::<burn_ndarray::NdArray<f32>>(
                &ctx,
                &Default::default(),
                &model,
                data,
                &config,
            ),
        }
    };
    let records = match &launched {
        // One rank of a multi-process job (started by `launch`, torchrun, srun or mpirun).
        Some(env) => {
            let (ctx, world) = env.connect(layout, DEFAULT_TIMEOUT)?;
            let outcome = device_groups(ctx, &device, gpu).and_then(run_rank);
            match &outcome {
                Ok(_) => world.finish(),
                Err(error) => world.abort(&error.to_string()),
            }
            outcome?
        }
        None => LocalCluster::new(layout)
            .run(run_rank)?
            .pop()
            .unwrap_or_default(),
    };
    if let (true, Some(last)) = (logging, records.last()) {
        let eval = last
            .eval_loss
            .map(|loss| format!(", eval loss {loss:.4}, eval perplexity {:.2}", loss.exp()))
            .unwrap_or_default();
        println!(
            "done: {} steps in {:.1} s, final training loss {:.4}{eval}",
            records.len(),
            started.elapsed().as_secs_f64(),
            last.loss
        );
        if let Some(line) = throughput(&records, &model, config.seq_length, layout.world_size()) {
            println!("{line}");
        }
    }
    Ok(())
}

/// The median throughput of the steps after the first two (which compile kernels and
/// warm caches): tokens per second, and model FLOP/s per rank counting Megatron's
/// `6 x parameters + 12 x layers x hidden x sequence` FLOPs per token.
fn throughput(
    records: &[StepRecord],
    model: &GptConfig,
    seq: usize,
    ranks: usize,
) -> Option<String> {
    let mut rates: Vec<f64> = records.iter().skip(2).map(|r| r.tokens_per_s).collect();
    if rates.is_empty() {
        return None;
    }
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    let per_token =
        6.0 * model.num_params() as f64 + 12.0 * (model.layers * model.hidden * seq) as f64;
    Some(format!(
        "throughput (median after the first 2 of {} steps): {median:.0} tokens/s, {:.2} model \
         TFLOP/s per rank ({ranks} ranks)",
        records.len(),
        median * per_token / ranks as f64 / 1e12
    ))
}

/// The CUDA backend: CubeCL without the fusion layer, whose client does not accept
/// tensors handed between the threads of thread ranks (measured on an H200: `CallError`).
/// The CUDA backend computing in `F` by default (bf16 or fp16 for mixed precision).
#[cfg(feature = "cuda")]
type CudaBackendOf<F> =
    burn_cubecl::CubeBackend<burn_cubecl::cubecl::cuda::CudaRuntime, F, i32, u8>;

#[cfg(feature = "cuda")]
pub(crate) type CudaBackend = CudaBackendOf<f32>;

/// The groups a launched rank computes with: NCCL on CUDA, the TCP ones on the CPU.
fn device_groups(ctx: ParallelContext, device: &str, gpu: usize) -> Result<ParallelContext> {
    match device {
        #[cfg(feature = "cuda")]
        "cuda" => ctx.with_nccl(gpu),
        _ => {
            let _ = gpu;
            Ok(ctx)
        }
    }
}

/// Trains one rank on backend `B` (with autodiff).
fn train_rank<B: ParallelBackend>(
    ctx: &ParallelContext,
    device: &B::Device,
    model: &GptConfig,
    (train_data, valid_data): (&dyn SampleSource, Option<&dyn SampleSource>),
    config: &TrainConfig,
) -> Result<Vec<StepRecord>> {
    let chunks = GptModel::<Autodiff<B>>::init_chunks(model, ctx, device)?;
    let (_, records) = train(
        ctx, chunks, &GptStep, train_data, valid_data, config, device,
    )?;
    Ok(records)
}

fn check_dataset(prefix: &Path) -> Result<()> {
    let (idx, bin) = dataset_paths(prefix);
    for path in [idx, bin] {
        if !path.is_file() {
            return Err(Error::InvalidConfig(format!(
                "--data-path: {} does not exist; give the prefix of a .bin/.idx pair made by \
                 `burn-megatron preprocess`",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Refuses a run whose attention scores alone cannot fit in `memory` (bytes, where
/// known): one layer's `[micro-batch, heads / tp, seq, seq]` scores exist at least once on
/// every rank whatever the recomputation, so such a run would only be killed for want of
/// memory later.
fn check_attention_memory(
    model: &GptConfig,
    config: &TrainConfig,
    tp: usize,
    precision: &str,
    memory: Option<u64>,
) -> Result<()> {
    let Some(memory) = memory else {
        return Ok(());
    };
    let element = if precision == "fp32" { 4.0 } else { 2.0 };
    let scores = (config.micro_batch_size * (model.heads / tp.max(1))) as f64
        * (config.seq_length as f64).powi(2)
        * element;
    if scores > memory as f64 {
        let gib = |bytes: f64| bytes / (1u64 << 30) as f64;
        return Err(Error::InvalidConfig(format!(
            "one layer's attention scores ([micro-batch {}, heads {} / tp {tp}, seq {}, seq {}] \
             in {precision}) take {:.1} GiB on each rank, more than the {:.1} GiB available: \
             lower --micro-batch-size or --seq-length, or raise --tp",
            config.micro_batch_size,
            model.heads,
            config.seq_length,
            config.seq_length,
            gib(scores),
            gib(memory as f64)
        )));
    }
    Ok(())
}

/// The memory the kernel says is available for new work (Linux's `MemAvailable`), in
/// bytes; `None` where it cannot be read.
fn available_host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info
        .lines()
        .find(|line| line.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_lr(args: TrainArgs) -> f64 {
        let layout = Layout::new(1, 1, 1).unwrap();
        args.train_config(&layout).unwrap().schedule.max_lr
    }

    #[test]
    fn the_learning_rate_defaults_to_the_presets_and_yields_to_the_flag() {
        let preset = |name: &str| TrainArgs {
            preset: Some(name.to_string()),
            ..Default::default()
        };
        assert_eq!(max_lr(TrainArgs::default()), 3e-3);
        assert_eq!(max_lr(preset("gpt2-124m")), 6e-4);
        assert_eq!(max_lr(preset("gpt2-1.5b")), 2e-4);
        let flagged = TrainArgs {
            lr: Some(1e-3),
            ..preset("gpt2-774m")
        };
        assert_eq!(max_lr(flagged), 1e-3);
    }
}
