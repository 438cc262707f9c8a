//! The distributed optimizer: data-parallel ranks that each update only their shard of
//! the fp32 master weights and Adam moments train exactly like ranks that update all of
//! them, and like one rank; its memory per rank is 12 bytes per parameter over dp plus
//! the 4-byte main grads; and dynamic loss scaling skips overflowing steps.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::Tensor;
use burn_megatron::data::GptSample;
use burn_megatron::parallel::{Layout, ParallelContext};
use burn_megatron::train::{
    FlatLayout, LossScaling, ParamRole, StageOutput, TrainConfig, TrainStep, train,
};
use burn_megatron_models::gpt::{GptConfig, GptModel, GptStep};
use common::{B, assert_same_training, run, samples, small, train_config};

fn config(distributed: bool, bucket_size: usize) -> TrainConfig {
    TrainConfig {
        distributed_optimizer: distributed,
        bucket_size,
        ..train_config(5)
    }
}

fn four_layers() -> GptConfig {
    GptConfig {
        layers: 4,
        ..small()
    }
}

#[test]
fn sharded_adam_over_four_data_parallel_ranks_equals_plain_and_one_rank() {
    let model = four_layers();
    let reference = run(
        &model,
        Layout::new(1, 1, 1).unwrap(),
        &config(false, 40_000_000),
    );
    let plain = run(
        &model,
        Layout::new(1, 1, 4).unwrap(),
        &config(false, 40_000_000),
    );
    // Small buckets: the flat buffers are reduced in many pieces.
    let sharded = run(&model, Layout::new(1, 1, 4).unwrap(), &config(true, 1000));
    // Losses within 1e-5 of one rank. Final weights: the sharded optimizer within 5e-5
    // of the plain one at the same layout, both within 1e-4 of one rank. Two runs of the
    // same layout already differ by up to 1.5e-5 of a tensor's norm after 5 steps (Burn
    // sums some gradients in hash-map order; see `common`), so that is the floor.
    assert_same_training("dp 4 plain", &plain, &reference, 1e-5, 1e-4);
    assert_same_training("dp 4 distributed", &sharded, &reference, 1e-5, 1e-4);
    assert_same_training("dp 4 distributed vs plain", &sharded, &plain, 1e-5, 5e-5);
}

#[test]
fn distributed_optimizer_with_tensor_and_pipeline_parallelism() {
    let model = four_layers().with_sequence_parallel(true);
    let reference = run(
        &model,
        Layout::new(1, 1, 1).unwrap(),
        &config(false, 40_000_000),
    );
    for layout in [Layout::new(2, 1, 2).unwrap(), Layout::new(1, 2, 2).unwrap()] {
        let plain = run(&model, layout, &config(false, 40_000_000));
        let sharded = run(&model, layout, &config(true, 4096));
        // Sharding the optimizer adds nothing to what the layout computes; the layout
        // itself matches one rank as in the tensor- and pipeline-parallel parity tests.
        assert_same_training(&format!("{layout} sharded"), &sharded, &plain, 1e-5, 5e-5);
        assert_same_training(&format!("{layout}"), &sharded, &reference, 1e-5, 1e-4);
    }
}

/// GPT-2 124M: the optimizer holds 12 bytes per parameter over dp (fp32 master weights
/// and two moments) and 4 bytes per parameter of main grads.
#[test]
fn optimizer_memory_shrinks_with_data_parallelism() {
    let model = GptConfig::gpt2_124m();
    let device = Default::default();
    let gpt =
        GptModel::<burn_ndarray::NdArray<f32>>::init(&model, &ParallelContext::single(), &device)
            .unwrap();
    let role = |_, _, _| ParamRole {
        sequence_parallel: false,
        shared_embedding: false,
        counted_in_norm: true,
    };
    let chunks = [gpt];
    for dp in [1, 2, 4, 8] {
        let layout = FlatLayout::new(&chunks, dp, 40_000_000, role);
        let params = layout.numel() as f64;
        assert!(params > 124e6 && params < 125e6, "{params} parameters");
        let memory = layout.memory(true);
        let states = (memory.master_bytes + memory.moment_bytes) as f64;
        let expected = 12.0 * params / dp as f64;
        assert!(
            (states - expected).abs() / expected < 0.01,
            "dp {dp}: {states} bytes of master weights and moments, expected {expected}"
        );
        let grads = memory.main_grad_bytes as f64;
        assert!(
            (grads - 4.0 * params).abs() / (4.0 * params) < 0.01,
            "dp {dp}: {grads} bytes of main grads"
        );
        assert!(memory.to_string().contains("optimizer memory per rank"));
    }
}

/// The GPT step whose loss is multiplied by infinity on the micro-batches of chosen
/// optimizer steps, so that their gradients overflow.
struct Overflowing {
    micro_batches: usize,
    steps: Vec<usize>,
    calls: AtomicUsize,
}

impl TrainStep<B, GptModel<B>> for Overflowing {
    fn forward(
        &self,
        model: &GptModel<B>,
        input: Option<Tensor<B, 3>>,
        samples: &[GptSample],
        device: &<B as burn::tensor::backend::BackendTypes>::Device,
    ) -> StageOutput<B> {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let step = call / self.micro_batches + 1;
        match GptStep.forward(model, input, samples, device) {
            StageOutput::Loss(loss) if self.steps.contains(&step) => {
                StageOutput::Loss(loss * f32::INFINITY)
            }
            output => output,
        }
    }
}

#[test]
fn loss_scaler_skips_overflowing_steps_backs_off_and_grows_back() {
    let model = small();
    let ctx = ParallelContext::single();
    let device = Default::default();
    let data = samples(64);
    let mut config = train_config(6);
    config.loss_scaling = Some(LossScaling {
        initial: 1024.0,
        growth_interval: 2,
    });
    let step = Overflowing {
        micro_batches: 4,
        steps: vec![2],
        calls: AtomicUsize::new(0),
    };
    let chunks = GptModel::<B>::init_chunks(&model, &ctx, &device).unwrap();
    let (_, records) = train(&ctx, chunks, &step, &data, None, &config, &device).unwrap();
    let scales: Vec<_> = records.iter().map(|r| r.loss_scale.unwrap()).collect();
    let skipped: Vec<_> = records.iter().map(|r| r.skipped).collect();
    // Step 1 runs at 1024; step 2 overflows: skipped, scale halves; two good steps at
    // 512 (3, 4) double it back for step 5.
    assert_eq!(scales, vec![1024.0, 1024.0, 512.0, 512.0, 1024.0, 1024.0]);
    assert_eq!(skipped, vec![false, true, false, false, false, false]);

    // A skipped step leaves the model as it was: one step, then a skipped one, ends
    // where one step does (up to the last bits in which two runs of Burn's backward
    // differ; an applied step would move the weights by about the learning rate).
    let run_steps = |steps: usize, overflow: Vec<usize>| {
        let mut config = train_config(steps);
        config.loss_scaling = Some(LossScaling {
            initial: 1024.0,
            growth_interval: 2,
        });
        let step = Overflowing {
            micro_batches: 4,
            steps: overflow,
            calls: AtomicUsize::new(0),
        };
        let chunks = GptModel::<B>::init_chunks(&model, &ctx, &device).unwrap();
        let (chunks, _) = train(&ctx, chunks, &step, &data, None, &config, &device).unwrap();
        chunks[0].full_parameters().unwrap()
    };
    let after_skip = run_steps(2, vec![2]);
    let after_one = run_steps(1, vec![]);
    for ((name, a), (_, b)) in after_skip.iter().zip(&after_one) {
        let (a, b) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
        let worst = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst < 1e-6, "{name} moved by {worst} in the skipped step");
    }

    // Scaling itself changes nothing but rounding: the losses of a run with a scale of
    // 1024 and no overflow equal those without scaling.
    let mut unscaled = train_config(4);
    unscaled.loss_scaling = None;
    let plain = run(&model, Layout::new(1, 1, 1).unwrap(), &unscaled);
    let mut scaled_config = unscaled.clone();
    scaled_config.loss_scaling = Some(LossScaling {
        initial: 1024.0,
        growth_interval: 1000,
    });
    let scaled = run(&model, Layout::new(1, 1, 1).unwrap(), &scaled_config);
    // Losses within 1e-5; weights within the 1e-4 of the other parity tests (a small
    // tensor such as the final norm's bias moved 1.03e-5 of its norm apart in one of four
    // runs: run-to-run noise of Burn's backward, scaled up by Adam).
    assert_same_training("loss scale 1024", &scaled, &plain, 1e-5, 1e-4);
}
