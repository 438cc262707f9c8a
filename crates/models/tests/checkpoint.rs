//! Distributed checkpoints: a resumed run continues exactly, a checkpoint loads into other
//! layouts with the same model and optimizer, and damaged checkpoints are caught.

mod common;

use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};
use burn_megatron::checkpoint::Checkpoint;
use burn_megatron::parallel::{Layout, LocalCluster};
use burn_megatron::train::TrainConfig;
use burn_megatron_models::gpt::{GptConfig, GptModel, Weights};
use common::{Run, relative, run, small, train_config};

type Inner = burn_ndarray::NdArray<f32>;

/// `config` saving under `dir` and stopping after step `exit`.
fn saving(config: &TrainConfig, model: &GptConfig, dir: &Path, exit: usize) -> TrainConfig {
    let mut config = config.clone();
    config.exit_interval = exit;
    config.checkpoint.save = Some(dir.to_path_buf());
    config.checkpoint.model = model.checkpoint_json(None);
    config
}

/// `config` continuing from the checkpoint under `dir`.
fn loading(config: &TrainConfig, dir: &Path, distributed: bool) -> TrainConfig {
    let mut config = config.clone();
    config.checkpoint.load = Some(dir.to_path_buf());
    config.distributed_optimizer = distributed;
    config
}

/// 10 steps at tp 2 x pp 2 x dp 2 with the distributed optimizer and dropout equal 5
/// steps, a checkpoint, and 5 more steps of fresh ranks loading it.
///
/// The loaded model is the saved one bit for bit. The continued steps are compared with
/// a bound rather than bit for bit: Burn's NdArray backward is not bitwise reproducible
/// between calls in one process (the same cross-entropy backward on the same input
/// differs in the last bits between the first call and later ones), so two
/// uninterrupted runs already differ by about 1e-7 in the loss; the bound is a hundred
/// times that, far below what a lost or misplaced piece of state would cause.
#[test]
fn a_resumed_run_continues_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let model = small().with_hidden_dropout(0.1);
    let layout = Layout::new(2, 2, 2).unwrap();
    let mut config = train_config(10);
    config.schedule.decay_steps = 10;
    config.distributed_optimizer = true;

    let whole = run(&model, layout, &config);
    let first = run(&model, layout, &saving(&config, &model, dir.path(), 5));
    assert_eq!(first.losses().len(), 5, "the first run stops after step 5");

    // Loading without training gives back the saved model exactly.
    let mut no_steps = loading(&config, dir.path(), true);
    no_steps.steps = 5;
    let loaded = run(&model, layout, &no_steps);
    assert_eq!(
        loaded.weights, first.weights,
        "the loaded model, bit for bit"
    );

    let second = run(&model, layout, &loading(&config, dir.path(), true));
    let steps: Vec<usize> = second
        .records
        .last()
        .unwrap()
        .iter()
        .map(|r| r.step)
        .collect();
    assert_eq!(
        steps,
        vec![6, 7, 8, 9, 10],
        "the second run continues at step 6"
    );
    let mut resumed = first.records.last().unwrap().clone();
    resumed.extend(second.records.last().unwrap().iter().cloned());
    for (a, b) in resumed.iter().zip(whole.records.last().unwrap()) {
        assert_eq!(
            a.lr.to_bits(),
            b.lr.to_bits(),
            "step {}: learning rate",
            a.step
        );
        assert!(
            relative(a.loss, b.loss) < 1e-5 && relative(a.grad_norm, b.grad_norm) < 1e-4,
            "step {}: resumed loss {} norm {}, uninterrupted {} {}",
            a.step,
            a.loss,
            a.grad_norm,
            b.loss,
            b.grad_norm
        );
    }
    let whole_run = Run {
        records: vec![whole.records.last().unwrap()[5..].to_vec()],
        weights: whole.weights.clone(),
    };
    common::assert_same_training("resumed", &second, &whole_run, 1e-5, 1e-4);
}

/// The logits of `weights` (full tensors by name) at tensor-parallel size `tp`, on a fixed
/// batch.
type FullTensor<'a> = dyn Fn(&str) -> burn_megatron::Result<TensorData> + Sync + 'a;

fn logits(model: &GptConfig, tp: usize, weights: &FullTensor<'_>) -> Vec<f32> {
    let layout = Layout::new(tp, 1, 1).unwrap();
    let outputs = LocalCluster::new(layout)
        .run(|ctx| {
            let device = Default::default();
            let built = GptModel::<Inner>::build(model, &ctx, &Weights::Full(weights), &device)?;
            let ids: Vec<i64> = (0..2 * common::SEQ as i64).map(|i| (7 * i) % 100).collect();
            let ids = Tensor::<Inner, 1, Int>::from_ints(ids.as_slice(), &device)
                .reshape([2, common::SEQ]);
            let local = built.forward(ids, None);
            let full = ctx.tensor().all_gather(local, 2)?;
            Ok::<_, burn_megatron::Error>(
                full.narrow(2, 0, model.vocab_size)
                    .into_data()
                    .to_vec::<f32>()
                    .unwrap(),
            )
        })
        .unwrap();
    outputs[0].clone()
}

/// A checkpoint of tp 2 x pp 2 x dp 2 (distributed optimizer) loads at tp 1 x pp 1 x dp 1,
/// at tp 4 x dp 2 and at pp 2 x 2 virtual stages: the model gives the original weights'
/// logits, and the next two training steps (the second depends on the reshaped Adam
/// moments) log the losses the original layout logs.
#[test]
fn a_checkpoint_loads_into_other_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = small();
    model.layers = 4;
    let original = Layout::new(2, 2, 2).unwrap();
    let mut config = train_config(4);
    config.distributed_optimizer = true;
    let whole = run(&model, original, &config);
    let saved = run(&model, original, &saving(&config, &model, dir.path(), 2));
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(checkpoint.info().iteration, 2);

    let reference = logits(&model, 1, &|name| Ok(saved.weights[name].clone()));
    let from_checkpoint =
        |name: &str| burn_megatron_models::gpt::checkpoint_tensor(&checkpoint, name);
    for tp in [1, 4] {
        let loaded = logits(&model, tp, &from_checkpoint);
        let largest = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = loaded
            .iter()
            .zip(&reference)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst < 1e-5 * largest,
            "tp {tp}: logits differ by up to {worst:e} (largest {largest})"
        );
    }

    let layouts = [
        (Layout::new(1, 1, 1).unwrap(), false),
        (Layout::new(4, 1, 2).unwrap(), true),
        (
            Layout::new(1, 2, 1)
                .unwrap()
                .with_virtual_pipeline(2)
                .unwrap(),
            false,
        ),
    ];
    for (layout, distributed) in layouts {
        let resumed = run(&model, layout, &loading(&config, dir.path(), distributed));
        let losses = resumed.losses();
        assert_eq!(losses.len(), 2);
        for (step, (a, b)) in losses.iter().zip(&whole.losses()[2..]).enumerate() {
            assert!(
                relative(*a, *b) < 1e-5,
                "{layout} step {}: loss {a}, original layout {b}",
                step + 3
            );
        }
    }
}

/// A damaged file is named in the error; a save that never completed is ignored in
/// favour of the previous checkpoint.
#[test]
fn damaged_and_incomplete_checkpoints_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let model = small();
    let layout = Layout::new(2, 1, 1).unwrap();
    let config = train_config(2);
    let mut saving_every_step = saving(&config, &model, dir.path(), 0);
    saving_every_step.checkpoint.save_interval = 1;
    run(&model, layout, &saving_every_step);
    let root = dir.path();
    assert_eq!(Checkpoint::open(root).unwrap().info().iteration, 2);

    // A save of step 3 cut off before its commit: files, but no checkpoint.json, and
    // `latest` still names step 2.
    let partial = root.join("iter_0000003.tmp");
    std::fs::create_dir(&partial).unwrap();
    std::fs::copy(
        root.join("iter_0000002/rank-00000.safetensors"),
        partial.join("rank-00000.safetensors"),
    )
    .unwrap();
    assert_eq!(Checkpoint::open(root).unwrap().info().iteration, 2);
    assert_eq!(
        burn_megatron::checkpoint::incomplete_saves(root),
        vec![partial]
    );
    // Without `latest`, the newest complete checkpoint.
    std::fs::remove_file(root.join("latest")).unwrap();
    assert_eq!(Checkpoint::open(root).unwrap().info().iteration, 2);

    // One flipped byte in a shard of step 2.
    let shard = root.join("iter_0000002/rank-00001.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&shard, &bytes).unwrap();
    let error = Checkpoint::open(root)
        .err()
        .expect("a corrupt shard is an error")
        .to_string();
    assert!(
        error.contains("rank-00001.safetensors") && error.contains("corrupt"),
        "{error}"
    );
    // Truncated.
    std::fs::write(&shard, &bytes[..middle]).unwrap();
    let error = Checkpoint::open(root).err().unwrap().to_string();
    assert!(
        error.contains("rank-00001.safetensors") && error.contains("truncated"),
        "{error}"
    );
    // The older checkpoint of step 1 is intact and still loads by its directory.
    assert_eq!(
        Checkpoint::open(root.join("iter_0000001"))
            .unwrap()
            .info()
            .iteration,
        1
    );
}
