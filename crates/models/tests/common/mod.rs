//! What the training tests share: a small GPT, counting data, a training configuration,
//! and a runner that trains on thread ranks and gathers the final weights.

#![allow(dead_code)]

use std::collections::BTreeMap;

use burn::backend::Autodiff;
use burn::tensor::TensorData;
use burn_megatron::Error;
use burn_megatron::data::{GptSample, SampleSource};
use burn_megatron::parallel::{Layout, LocalCluster};
use burn_megatron::train::{Decay, LrSchedule, StepRecord, TrainConfig, train};
use burn_megatron_models::gpt::{GptConfig, GptModel, GptStep};

pub type B = Autodiff<burn_ndarray::NdArray<f32>>;

pub const SEQ: usize = 16;
pub const VOCAB: usize = 100;

pub struct Samples(pub Vec<GptSample>);

impl SampleSource for Samples {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn get(&self, index: usize) -> burn_megatron::Result<GptSample> {
        Ok(self.0[index].clone())
    }
}

/// Token streams with structure to learn: each sequence counts up from a random start.
pub fn samples(count: usize) -> Samples {
    let mut state = 17u64;
    Samples(
        (0..count)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let start = (state >> 33) as i64 % VOCAB as i64;
                let text: Vec<i64> = (0..=SEQ as i64)
                    .map(|i| (start + 3 * i) % VOCAB as i64)
                    .collect();
                GptSample {
                    tokens: text[..SEQ].to_vec(),
                    labels: text[1..].to_vec(),
                }
            })
            .collect(),
    )
}

/// AdamW with clipping active, warmup and cosine decay, global batch 8 of micro-batches
/// of 2.
///
/// Adam's epsilon is 1e-4 rather than the usual 1e-8, so that the final weights measure
/// the gradients. Adam divides each gradient by its own magnitude: an element whose
/// gradient is near zero moves by a learning-rate-sized step whose sign is rounding
/// noise. Burn's backward sums the gradients of a tensor with three or more consumers
/// in hash-map order, which varies between runs, so even two runs on one rank differ
/// in the last bits; with epsilon 1e-8 that ended 3 steps apart by up to 3.6e-3 of a
/// tensor's norm (rotary, SwiGLU, untied). With 1e-4 small gradients take SGD-like steps,
/// and the same two runs agree within 2e-6, pipelined runs within 5e-6 (measured), so
/// a 1e-4 bound tests the parallel layout rather than the noise.
pub fn train_config(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        micro_batch_size: 2,
        global_batch_size: 8,
        seq_length: SEQ,
        schedule: LrSchedule {
            max_lr: 1e-2,
            min_lr: 1e-3,
            warmup_steps: 2,
            decay_steps: 5,
            decay: Decay::Cosine,
        },
        weight_decay: 0.01,
        adam_beta1: 0.9,
        adam_beta2: 0.95,
        adam_eps: 1e-4,
        clip_grad: 0.5,
        distributed_optimizer: false,
        bucket_size: 40_000_000,
        loss_scaling: None,
        gradient_accumulation_fusion: false,
        checkpoint: Default::default(),
        exit_interval: 0,
        log_interval: 1,
        eval_interval: 0,
        eval_iters: 1,
        metrics: None,
        progress: false,
    }
}

/// A small GPT: 2 layers, hidden 32, 4 heads, vocabulary 100 padded to a multiple of 8.
pub fn small() -> GptConfig {
    GptConfig::new(VOCAB, 32, 2, 4)
        .with_max_seq_len(SEQ)
        .with_make_vocab_size_divisible_by(8)
}

/// What a training run gives: every rank's records, and the final full weights by name.
pub struct Run {
    pub records: Vec<Vec<StepRecord>>,
    pub weights: BTreeMap<String, TensorData>,
}

impl Run {
    /// The losses the logging rank records.
    pub fn losses(&self) -> Vec<f64> {
        self.records
            .last()
            .unwrap()
            .iter()
            .map(|r| r.loss)
            .collect()
    }

    /// The gradient norms the logging rank records.
    pub fn grad_norms(&self) -> Vec<f64> {
        self.records
            .last()
            .unwrap()
            .iter()
            .map(|r| r.grad_norm)
            .collect()
    }
}

/// Trains `model` for `config.steps` steps on `layout`'s thread ranks.
pub fn run(model: &GptConfig, layout: Layout, config: &TrainConfig) -> Run {
    let data = samples(96);
    let outcomes = LocalCluster::new(layout)
        .with_timeout(std::time::Duration::from_secs(120))
        .run(|ctx| {
            let device = Default::default();
            let chunks = GptModel::<B>::init_chunks(model, &ctx, &device)?;
            let (chunks, records) = train(&ctx, chunks, &GptStep, &data, None, config, &device)?;
            let mut weights = Vec::new();
            for chunk in &chunks {
                weights.extend(chunk.full_parameters()?);
            }
            Ok::<_, Error>((records, weights))
        })
        .unwrap();
    let mut weights = BTreeMap::new();
    let mut records = Vec::new();
    for (rank_records, rank_weights) in outcomes {
        records.push(rank_records);
        for (name, data) in rank_weights {
            // Every tensor-parallel and data-parallel rank holds the same full weights.
            if let Some(other) = weights.get(&name) {
                assert_eq!(other, &data, "ranks disagree on {name}");
            }
            weights.insert(name, data);
        }
    }
    Run { records, weights }
}

/// `|a - b| / |b|`.
pub fn relative(a: f64, b: f64) -> f64 {
    ((a - b) / b).abs()
}

/// Checks that `run` logs the losses of `reference` within `tolerance` relative (norms
/// within ten times that), and that each of its final weight tensors differs from the
/// reference's by less than `weight_tolerance` of the reference's norm.
pub fn assert_same_training(
    name: &str,
    run: &Run,
    reference: &Run,
    tolerance: f64,
    weight_tolerance: f64,
) {
    for (step, (a, b)) in run.losses().iter().zip(reference.losses()).enumerate() {
        assert!(
            relative(*a, b) < tolerance,
            "{name} step {}: loss {a}, reference {b}",
            step + 1
        );
    }
    for (a, b) in run.grad_norms().iter().zip(reference.grad_norms()) {
        assert!(
            relative(*a, b) < 10.0 * tolerance,
            "{name}: grad norm {a}, reference {b}"
        );
    }
    for ranks in &run.records {
        let logged: Vec<_> = ranks.iter().map(|r| (r.loss, r.grad_norm)).collect();
        let last: Vec<_> = run
            .records
            .last()
            .unwrap()
            .iter()
            .map(|r| (r.loss, r.grad_norm))
            .collect();
        assert_eq!(
            logged, last,
            "{name}: every rank records the same loss and norm"
        );
    }
    assert_eq!(
        run.weights.keys().collect::<Vec<_>>(),
        reference.weights.keys().collect::<Vec<_>>(),
        "{name}: the same parameters"
    );
    for (param, data) in &run.weights {
        // The exact gradient of a key bias is zero: adding `q . b` to every score of a
        // query leaves its softmax unchanged. What the backward computes for it is
        // rounding noise, which Adam scales up to learning-rate-sized steps on any
        // layout, even between two runs of the same one; there is nothing to compare.
        if param.ends_with("attention.key.bias") {
            continue;
        }
        let expected = reference.weights[param].to_vec::<f32>().unwrap();
        let actual = data.to_vec::<f32>().unwrap();
        assert_eq!(
            data.shape, reference.weights[param].shape,
            "{name}: {param}"
        );
        let norm = |values: &mut dyn Iterator<Item = f32>| {
            values.map(|v| (v as f64).powi(2)).sum::<f64>().sqrt()
        };
        let scale = norm(&mut expected.iter().copied()).max(1e-12);
        let diff = norm(&mut actual.iter().zip(&expected).map(|(a, b)| a - b));
        assert!(
            diff / scale < weight_tolerance,
            "{name}: final {param} differs from the reference by {:.2e} of its norm",
            diff / scale
        );
    }
}
