//! Training parity: 5 optimizer steps of a small GPT at tp 2 x dp 2 (4 thread ranks), with
//! and without sequence parallelism, for learned, rotary and ALiBi positions and GQA, log
//! the same losses as one rank on the same global batch, within 1e-4 relative.

use burn::backend::Autodiff;
use burn_megatron::Error;
use burn_megatron::data::{GptSample, SampleSource};
use burn_megatron::parallel::{Layout, LocalCluster};
use burn_megatron::train::{Decay, LrSchedule, TrainConfig, train};
use burn_megatron_models::gpt::{
    Activation, GptConfig, GptModel, GptStep, NormKind, PositionEmbedding,
};

type B = Autodiff<burn_ndarray::NdArray<f32>>;

const SEQ: usize = 16;
const VOCAB: usize = 100;

struct Samples(Vec<GptSample>);

impl SampleSource for Samples {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn get(&self, index: usize) -> burn_megatron::Result<GptSample> {
        Ok(self.0[index].clone())
    }
}

/// Token streams with structure to learn: each sequence counts up from a random start.
fn samples(count: usize) -> Samples {
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

fn train_config() -> TrainConfig {
    TrainConfig {
        steps: 5,
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
        adam_eps: 1e-8,
        clip_grad: 0.5,
        log_interval: 1,
        eval_interval: 0,
        eval_iters: 1,
        metrics: None,
        progress: false,
    }
}

fn losses(model: &GptConfig, tp: usize, dp: usize) -> (Vec<f64>, Vec<f64>) {
    let data = samples(64);
    let outcomes = LocalCluster::new(Layout::new(tp, 1, dp).unwrap())
        .run(|ctx| {
            let device = Default::default();
            let gpt = GptModel::<B>::init(model, &ctx, &device)?;
            let (_, records) = train(&ctx, gpt, &GptStep, &data, None, &train_config(), &device)?;
            Ok::<_, Error>(records)
        })
        .unwrap();
    let records = &outcomes[0];
    let values = |records: &Vec<burn_megatron::train::StepRecord>| -> Vec<(f64, f64)> {
        records.iter().map(|r| (r.loss, r.grad_norm)).collect()
    };
    for other in &outcomes[1..] {
        assert_eq!(
            values(other),
            values(records),
            "every rank logs the same loss and norm"
        );
    }
    (
        records.iter().map(|r| r.loss).collect(),
        records.iter().map(|r| r.grad_norm).collect(),
    )
}

fn assert_parity(name: &str, model: GptConfig) {
    let (reference, reference_norms) = losses(&model, 1, 1);
    assert!(
        reference[4] < reference[0],
        "{name}: the loss falls ({reference:?})"
    );
    for sequence_parallel in [false, true] {
        let model = GptConfig {
            sequence_parallel,
            ..model.clone()
        };
        let (parallel, norms) = losses(&model, 2, 2);
        for (step, (a, b)) in parallel.iter().zip(&reference).enumerate() {
            assert!(
                ((a - b) / b).abs() < 1e-4,
                "{name} sp={sequence_parallel} step {}: loss {a} at tp2 x dp2, {b} on one rank",
                step + 1
            );
        }
        for (a, b) in norms.iter().zip(&reference_norms) {
            assert!(
                ((a - b) / b).abs() < 1e-3,
                "{name} sp={sequence_parallel}: grad norm {a} vs {b}"
            );
        }
    }
}

fn small() -> GptConfig {
    GptConfig::new(VOCAB, 32, 2, 4)
        .with_max_seq_len(SEQ)
        .with_make_vocab_size_divisible_by(8)
}

#[test]
fn learned_positions() {
    assert_parity("learned", small());
}

#[test]
fn rotary_gqa_rmsnorm_swiglu() {
    let model = small()
        .with_position(PositionEmbedding::Rotary { base: 10_000.0 })
        .with_query_groups(Some(2))
        .with_norm(NormKind::RmsNorm)
        .with_activation(Activation::SwiGlu)
        .with_bias(false)
        .with_tied_embeddings(false);
    assert_parity("rotary+gqa", model);
}

#[test]
fn alibi_and_multi_query() {
    let model = small()
        .with_position(PositionEmbedding::Alibi)
        .with_embedding_norm(true)
        .with_query_groups(Some(1));
    assert_parity("alibi+mqa", model);
}
