//! Training with your own loss: next-token cross-entropy that counts chosen "key" tokens
//! more, on tp 2 x pp 2 thread ranks.
//!
//! ```text
//! cargo run --release --example custom_loss -- --key-weight 5
//! ```
//!
//! A loss is a [`TrainStep`]: given a model chunk, its input and a micro-batch of
//! samples, run the chunk; the last pipeline stage returns the mean loss. The engine does
//! the rest (the pipeline schedule, gradient accumulation, data-parallel averaging,
//! clipping, AdamW, the learning-rate schedule), and the loss is the same whatever the
//! parallel layout.

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use burn_megatron::Error;
use burn_megatron::data::{GptSample, SampleSource};
use burn_megatron::parallel::{Layout, LocalCluster, ParallelBackend};
use burn_megatron::tensor_parallel::vocab_parallel_cross_entropy;
use burn_megatron::train::{Decay, LrSchedule, StageOutput, TrainConfig, TrainStep, train};
use burn_megatron_models::gpt::{GptConfig, GptModel, StageInput, batch_tensors};
use clap::Parser;

type Backend = Autodiff<burn_ndarray::NdArray<f32>>;

/// Trains a small GPT with a loss that up-weights key tokens.
#[derive(Parser, Debug)]
struct Args {
    /// How much more a key token's loss counts than another token's.
    #[arg(long, default_value_t = 5.0)]
    key_weight: f64,
    /// Optimizer steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
}

/// Cross-entropy with weight `key_weight` on targets that are key tokens (here: multiples
/// of 10), 1 elsewhere, normalized by the total weight.
struct KeyTokenLoss {
    key_weight: f64,
}

impl<B: AutodiffBackend + ParallelBackend> TrainStep<B, GptModel<B>> for KeyTokenLoss {
    fn forward(
        &self,
        model: &GptModel<B>,
        input: Option<Tensor<B, 3>>,
        samples: &[GptSample],
        device: &B::Device,
    ) -> StageOutput<B> {
        let (tokens, labels) = batch_tensors::<B>(samples, device);
        let output = model.forward_chunk(StageInput::of_step(input, tokens), None);
        if !model.is_last_chunk() {
            return StageOutput::Activations(output);
        }
        let weights: Vec<f32> = samples
            .iter()
            .flat_map(|s| {
                s.labels.iter().map(|&t| {
                    if t % 10 == 0 {
                        self.key_weight as f32
                    } else {
                        1.0
                    }
                })
            })
            .collect();
        let weights = Tensor::<B, 2>::from_data(TensorData::new(weights, labels.dims()), device);
        let group = model.tensor_group();
        let losses =
            vocab_parallel_cross_entropy(output, labels, &model.vocab_partition(), &group, 0.0);
        StageOutput::Loss((losses * weights.clone()).sum() / weights.sum())
    }
}

/// Sequences that count up by 3 from a start that depends on the sample.
struct Counting(usize);

impl SampleSource for Counting {
    fn len(&self) -> usize {
        self.0
    }
    fn get(&self, index: usize) -> burn_megatron::Result<GptSample> {
        let start = (index * 7919) as i64 % 100;
        let text: Vec<i64> = (0..=32).map(|i| (start + 3 * i) % 100).collect();
        Ok(GptSample {
            tokens: text[..32].to_vec(),
            labels: text[1..].to_vec(),
        })
    }
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    let model = GptConfig::new(100, 64, 2, 4)
        .with_max_seq_len(32)
        .with_make_vocab_size_divisible_by(8);
    let config = TrainConfig {
        steps: args.steps,
        micro_batch_size: 2,
        global_batch_size: 8,
        seq_length: 32,
        schedule: LrSchedule {
            max_lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 2,
            decay_steps: args.steps,
            decay: Decay::Cosine,
        },
        weight_decay: 0.1,
        adam_beta1: 0.9,
        adam_beta2: 0.95,
        adam_eps: 1e-8,
        clip_grad: 1.0,
        distributed_optimizer: false,
        bucket_size: 40_000_000,
        loss_scaling: None,
        gradient_accumulation_fusion: false,
        checkpoint: Default::default(),
        exit_interval: 0,
        log_interval: 5,
        eval_interval: 0,
        eval_iters: 1,
        metrics: None,
        progress: false,
    };
    let data = Counting(args.steps * config.global_batch_size);
    let step = KeyTokenLoss {
        key_weight: args.key_weight,
    };
    LocalCluster::new(Layout::new(2, 2, 1)?).run(|ctx| {
        let device = Default::default();
        let chunks = GptModel::<Backend>::init_chunks(&model, &ctx, &device)?;
        train(&ctx, chunks, &step, &data, None, &config, &device).map(|_| ())
    })?;
    Ok(())
}
