//! Dropout under tensor parallelism drops what one rank drops: the same training-mode
//! forward pass at tp 2 (sequence parallelism off and on) gives the single-rank logits.

use burn::tensor::{Int, Tensor, TensorData};
use burn_megatron::Error;
use burn_megatron::parallel::{Layout, LocalCluster};
use burn_megatron_models::gpt::{GptConfig, GptModel};

type B = burn_ndarray::NdArray<f32>;

fn logits(config: &GptConfig, tp: usize, training: bool) -> Vec<f32> {
    let ids: Vec<i64> = (0..32).map(|i| (i * 7) % 50).collect();
    let outcomes = LocalCluster::new(Layout::new(tp, 1, 1).unwrap())
        .run(|ctx| {
            let device = Default::default();
            let model = GptModel::<B>::init(config, &ctx, &device)?;
            model.set_training(training);
            let ids =
                Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [2, 16]), &device);
            let local = model.forward(ids, None);
            let full = ctx.tensor().all_gather(local, 2)?;
            Ok::<_, Error>(full.narrow(2, 0, 50).into_data().to_vec::<f32>().unwrap())
        })
        .unwrap();
    outcomes[0].clone()
}

#[test]
fn dropout_masks_agree_across_tensor_parallel_ranks() {
    let config = GptConfig::new(50, 32, 2, 4)
        .with_max_seq_len(16)
        .with_make_vocab_size_divisible_by(4)
        .with_hidden_dropout(0.3)
        .with_attention_dropout(0.2);
    let reference = logits(&config, 1, true);
    assert_ne!(
        reference,
        logits(&config, 1, false),
        "dropout changes the training forward"
    );
    for sequence_parallel in [false, true] {
        let config = GptConfig {
            sequence_parallel,
            ..config.clone()
        };
        let parallel = logits(&config, 2, true);
        let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = parallel
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst / scale < 1e-5,
            "sp={sequence_parallel}: relative error {}",
            worst / scale
        );
    }
}
