//! Training parity: 5 optimizer steps of a small GPT at tp 2 x dp 2 (4 thread ranks), with
//! and without sequence parallelism, for learned, rotary and ALiBi positions and GQA, log
//! the same losses as one rank on the same global batch within 1e-4 relative, and reach
//! the same weights within 1e-4 of each tensor's norm.

mod common;

use burn_megatron::parallel::Layout;
use burn_megatron_models::gpt::{Activation, GptConfig, NormKind, PositionEmbedding};
use common::{assert_same_training, run, small, train_config};

fn assert_parity(name: &str, model: GptConfig) {
    let config = train_config(5);
    let reference = run(&model, Layout::new(1, 1, 1).unwrap(), &config);
    let losses = reference.losses();
    assert!(losses[4] < losses[0], "{name}: the loss falls ({losses:?})");
    for sequence_parallel in [false, true] {
        let model = GptConfig {
            sequence_parallel,
            ..model.clone()
        };
        let parallel = run(&model, Layout::new(2, 1, 2).unwrap(), &config);
        let name = format!("{name} sp={sequence_parallel}");
        assert_same_training(&name, &parallel, &reference, 1e-4, 1e-4);
    }
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
