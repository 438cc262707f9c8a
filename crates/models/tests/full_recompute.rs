//! Full activation recompute: training that keeps only each layer group's input and runs
//! the group's forward again in the backward logs the same losses and reaches the same
//! weights as training that keeps every activation on one rank, with dropout on (the
//! recomputed forward must draw the masks of the first), alone and under tensor,
//! sequence and pipeline parallelism (where later micro-batches' forwards run between a
//! micro-batch's forward and its backward).

mod common;

use burn_megatron::parallel::Layout;
use burn_megatron_models::gpt::GptConfig;
use common::{Run, assert_same_training, run, small, train_config};

const STEPS: usize = 3;

/// Three layers (groups of two leave one of one), with dropout.
fn model(recompute_num_layers: usize) -> GptConfig {
    GptConfig {
        layers: 3,
        recompute_num_layers,
        ..small()
    }
    .with_hidden_dropout(0.1)
    .with_attention_dropout(0.1)
}

/// One rank keeping every activation (selective recompute off as well).
fn reference() -> Run {
    let stored = model(0).with_recompute_attention(false);
    run(&stored, Layout::new(1, 1, 1).unwrap(), &train_config(STEPS))
}

#[test]
fn full_recompute_on_one_rank_trains_as_storing_everything() {
    let reference = reference();
    let without_dropout = GptConfig {
        hidden_dropout: 0.0,
        attention_dropout: 0.0,
        ..model(0)
    };
    let plain = run(
        &without_dropout,
        Layout::new(1, 1, 1).unwrap(),
        &train_config(STEPS),
    );
    assert_ne!(
        plain.losses(),
        reference.losses(),
        "dropout changes the training"
    );
    for layers in [1, 2, 3] {
        let recomputed = run(
            &model(layers),
            Layout::new(1, 1, 1).unwrap(),
            &train_config(STEPS),
        );
        let name = format!("groups of {layers} layers");
        assert_same_training(&name, &recomputed, &reference, 1e-4, 1e-4);
    }
}

#[test]
fn full_recompute_under_tensor_sequence_and_pipeline_parallelism() {
    let reference = reference();
    let parallel = model(1)
        .with_sequence_parallel(true)
        .with_pipeline_layers(Some(vec![2, 1]));
    let layout = Layout::new(2, 2, 1).unwrap();
    let recomputed = run(&parallel, layout, &train_config(STEPS));
    assert_same_training("tp 2 x pp 2, sp", &recomputed, &reference, 1e-4, 1e-4);
}

#[test]
fn full_recompute_with_interleaved_pipeline_stages() {
    let reference = reference();
    let layout = Layout::new(1, 2, 1)
        .unwrap()
        .with_virtual_pipeline(2)
        .unwrap();
    let interleaved = GptConfig {
        pipeline_layers: Some(vec![1, 1, 1, 0]),
        ..model(2)
    };
    let recomputed = run(&interleaved, layout, &train_config(STEPS));
    assert_same_training("pp 2 x 2 chunks", &recomputed, &reference, 1e-4, 1e-4);
}
