//! Pipeline parity: 3 optimizer steps of a small GPT with pipeline stages (1F1B and
//! interleaved), alone and combined with tensor, sequence and data parallelism on 8
//! thread ranks, log the same losses and reach the same final weights as one rank on the
//! same global batch, within 1e-4 relative (weights: of each tensor's norm). Also: the
//! 1F1B schedule bounds the activations a stage holds.

mod common;

use burn_megatron::parallel::Layout;
use burn_megatron::pipeline::{Schedule, ScheduleKind};
use burn_megatron_models::gpt::{Activation, GptConfig, NormKind, PositionEmbedding};
use common::{assert_same_training, run, small, train_config};

const STEPS: usize = 3;

fn layers(count: usize) -> GptConfig {
    GptConfig {
        layers: count,
        ..small()
    }
}

fn four_layers() -> GptConfig {
    layers(4)
}

fn assert_pipeline_parity(name: &str, model: GptConfig, layout: Layout) {
    let config = train_config(STEPS);
    let single = GptConfig {
        pipeline_layers: None,
        ..model.clone()
    };
    let reference = run(&single, Layout::new(1, 1, 1).unwrap(), &config);
    let pipelined = run(&model, layout, &config);
    assert_same_training(
        &format!("{name} {layout}"),
        &pipelined,
        &reference,
        1e-4,
        1e-4,
    );
}

#[test]
fn two_stages_one_f_one_b() {
    assert_pipeline_parity("tied", four_layers(), Layout::new(1, 2, 1).unwrap());
}

#[test]
fn four_stages_one_f_one_b_untied_rotary() {
    let model = four_layers()
        .with_position(PositionEmbedding::Rotary { base: 10_000.0 })
        .with_norm(NormKind::RmsNorm)
        .with_activation(Activation::SwiGlu)
        .with_tied_embeddings(false);
    assert_pipeline_parity("untied", model, Layout::new(1, 4, 1).unwrap());
}

#[test]
fn two_stages_interleaved_over_two_chunks() {
    let layout = Layout::new(1, 2, 1)
        .unwrap()
        .with_virtual_pipeline(2)
        .unwrap();
    assert_pipeline_parity("interleaved", four_layers(), layout);
}

#[test]
fn uneven_stages_from_an_explicit_layer_list() {
    let model = layers(3).with_pipeline_layers(Some(vec![1, 2]));
    assert_pipeline_parity("explicit", model, Layout::new(1, 2, 1).unwrap());
}

#[test]
fn tensor_sequence_pipeline_and_data_parallel_on_eight_ranks() {
    let model = four_layers().with_sequence_parallel(true);
    assert_pipeline_parity("tp2 pp2 dp2 sp tied", model, Layout::new(2, 2, 2).unwrap());
}

/// Counted by the engine: under 1F1B stage `s` of `pp` holds at most `pp - s`
/// micro-batches of activations at once, however many micro-batches the step has;
/// GPipe's all-forwards-first order would hold all of them.
#[test]
fn one_f_one_b_holds_at_most_pp_micro_batches() {
    let mut config = train_config(1);
    config.micro_batch_size = 1; // 8 micro-batches per step
    let outcome = run(&four_layers(), Layout::new(1, 4, 1).unwrap(), &config);
    let peaks: Vec<usize> = outcome
        .records
        .iter()
        .map(|records| records[0].peak_in_flight)
        .collect();
    assert_eq!(peaks, vec![4, 3, 2, 1], "activations held per stage");
    let gpipe = Schedule::new(ScheduleKind::GPipe, 4, 1, 8).unwrap();
    assert_eq!(gpipe.simulate(1.0, 2.0).unwrap().peak_in_flight, vec![8; 4]);
}
