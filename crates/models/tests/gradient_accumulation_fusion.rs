//! Gradient-accumulation fusion (the linear layers' weight gradients added by their GEMM
//! into fp32 accumulators kept for the step) trains as the graph's gradients do: 5 steps
//! of a small GPT with fusion, on one rank (four micro-batches a step), at tp 2 x dp 2,
//! with multi-query attention at tp 2 (replicated key/value weights keep their gradient
//! in the graph) and at pp 2 with the distributed optimizer, log the losses of one rank
//! without fusion within 1e-4 relative and reach the same weights within 1e-4 of each
//! tensor's norm.

mod common;

use burn_megatron::parallel::Layout;
use burn_megatron::train::TrainConfig;
use common::{assert_same_training, run, small, train_config};

#[test]
fn fused_weight_gradients_train_as_the_graphs() {
    let unfused = train_config(5);
    let fused = TrainConfig {
        gradient_accumulation_fusion: true,
        ..unfused.clone()
    };
    let distributed = TrainConfig {
        distributed_optimizer: true,
        ..fused.clone()
    };
    let one_rank = Layout::new(1, 1, 1).unwrap();

    let model = small();
    let reference = run(&model, one_rank, &unfused);
    for (name, (tp, pp, dp), config) in [
        ("one rank", (1, 1, 1), &fused),
        ("tp 2 x dp 2", (2, 1, 2), &fused),
        (
            "pp 2 x dp 2, distributed optimizer",
            (1, 2, 2),
            &distributed,
        ),
    ] {
        let parallel = run(&model, Layout::new(tp, pp, dp).unwrap(), config);
        assert_same_training(name, &parallel, &reference, 1e-4, 1e-4);
    }

    let multi_query = small().with_query_groups(Some(1));
    let reference = run(&multi_query, one_rank, &unfused);
    let parallel = run(&multi_query, Layout::new(2, 1, 1).unwrap(), &fused);
    assert_same_training("multi-query tp 2", &parallel, &reference, 1e-4, 1e-4);
}
