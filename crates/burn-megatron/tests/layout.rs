//! `Layout`: Megatron's rank order and the documented errors.

use burn_megatron::Error;
use burn_megatron::parallel::{Layout, ModelDims, RankCoords};

fn message(error: Error) -> String {
    error.to_string()
}

#[test]
fn tp2_dp2_pp2_follows_megatron_rank_order() {
    let layout = Layout::for_world(8, 2, 2).unwrap();
    assert_eq!(layout.data(), 2);
    // rank = pp * dp * tp + dp * tp + tp, written out for all eight ranks.
    let expected = [
        (0, 0, 0),
        (1, 0, 0),
        (0, 1, 0),
        (1, 1, 0),
        (0, 0, 1),
        (1, 0, 1),
        (0, 1, 1),
        (1, 1, 1),
    ];
    for (rank, &(tp, dp, pp)) in expected.iter().enumerate() {
        assert_eq!(
            layout.coords(rank),
            RankCoords { tp, dp, pp },
            "rank {rank}"
        );
        assert_eq!(layout.rank(RankCoords { tp, dp, pp }), rank);
    }
    // The groups Megatron-LM builds for tp 2, pp 2 on 8 GPUs.
    assert_eq!(layout.tensor_group(5), vec![4, 5]);
    assert_eq!(layout.data_group(5), vec![5, 7]);
    assert_eq!(layout.data_group(2), vec![0, 2]);
    assert_eq!(layout.pipeline_group(5), vec![1, 5]);
    assert_eq!(layout.pipeline_group(2), vec![2, 6]);
    let tensor_groups: Vec<Vec<usize>> =
        (0..8).step_by(2).map(|r| layout.tensor_group(r)).collect();
    assert_eq!(
        tensor_groups,
        vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]
    );
    let data_groups: Vec<Vec<usize>> = [0, 1, 4, 5].iter().map(|&r| layout.data_group(r)).collect();
    assert_eq!(
        data_groups,
        vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]
    );
    let pipeline_groups: Vec<Vec<usize>> = (0..4).map(|r| layout.pipeline_group(r)).collect();
    assert_eq!(
        pipeline_groups,
        vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]
    );
    assert_eq!(layout.embedding_group(3), vec![3, 7]);
    assert_eq!(layout.embedding_group(7), vec![3, 7]);
    assert!(layout.is_first_stage(3) && layout.is_last_stage(7));
    assert_eq!(layout.logging_rank(), 7);
}

#[test]
fn middle_stages_have_no_embedding_group() {
    let layout = Layout::new(1, 4, 1).unwrap();
    assert_eq!(layout.embedding_group(0), vec![0, 3]);
    assert!(layout.embedding_group(1).is_empty());
    assert!(layout.embedding_group(2).is_empty());
    assert_eq!(Layout::new(2, 1, 2).unwrap().embedding_group(3), vec![3]);
}

#[test]
fn world_size_that_tp_times_pp_does_not_divide_is_rejected() {
    let error = message(Layout::for_world(6, 4, 1).unwrap_err());
    assert!(
        error.contains(
            "world size 6 is not divisible by tensor-parallel size 4 x pipeline-parallel size 1 = 4"
        ),
        "{error}"
    );
    let error = message(
        Layout::new(2, 2, 2)
            .unwrap()
            .check_world_size(4)
            .unwrap_err(),
    );
    assert!(
        error.contains("tp 2 x pp 2 x dp 2 = 8 ranks, but the world has 4"),
        "{error}"
    );
    let error = message(Layout::new(0, 1, 1).unwrap_err());
    assert!(
        error.contains("tensor-parallel size must be at least 1"),
        "{error}"
    );
}

fn gpt2_small() -> ModelDims {
    ModelDims {
        hidden: 768,
        heads: 12,
        query_groups: 12,
        ffn_hidden: 3072,
        layers: 12,
        vocab: 50257,
    }
}

#[test]
fn layouts_that_do_not_divide_the_model_are_rejected() {
    let model = gpt2_small();
    Layout::new(4, 2, 1).unwrap().check_model(&model).unwrap();

    let error = message(
        Layout::new(8, 1, 1)
            .unwrap()
            .check_model(&model)
            .unwrap_err(),
    );
    assert!(
        error.contains("tensor-parallel size 8 does not divide 12 attention heads"),
        "{error}"
    );
    assert!(
        error.contains("[1, 2, 3, 4, 6, 12]"),
        "the error lists valid sizes: {error}"
    );

    let error = message(
        Layout::new(1, 5, 1)
            .unwrap()
            .check_model(&model)
            .unwrap_err(),
    );
    assert!(error.contains("12 layers do not split evenly"), "{error}");

    let interleaved = Layout::new(1, 2, 1)
        .unwrap()
        .with_virtual_pipeline(4)
        .unwrap();
    let error = message(interleaved.check_model(&model).unwrap_err());
    assert!(error.contains("= 8 model chunks"), "{error}");

    let error = message(
        Layout::new(1, 1, 1)
            .unwrap()
            .with_virtual_pipeline(2)
            .unwrap_err(),
    );
    assert!(
        error.contains("virtual pipeline stages need pipeline-parallel size > 1"),
        "{error}"
    );

    let gqa = ModelDims {
        query_groups: 3,
        ..model
    };
    let error = message(Layout::new(2, 1, 1).unwrap().check_model(&gqa).unwrap_err());
    assert!(
        error.contains("3 query groups (key/value heads)"),
        "{error}"
    );
    let mqa = ModelDims {
        query_groups: 1,
        ..model
    };
    Layout::new(4, 1, 1).unwrap().check_model(&mqa).unwrap();
}
