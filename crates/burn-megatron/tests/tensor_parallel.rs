//! Parity of the tensor-parallel layers with the unsplit computation.
//!
//! Reference: the same full weights applied with plain Burn ops on one thread
//! (`linear`, `embedding`, a hand-written log-softmax), never our layers. For tp in
//! {1, 2, 4} with sequence parallelism off and on, every rank's output and the gradients of
//! its input and weights must equal the matching slice of the reference within 1e-5
//! relative (f32, NdArray).

mod common;

use burn::tensor::{
    Int, Tensor, TensorData, activation::log_softmax, module::embedding, module::linear,
};
use burn_megatron::Error;
use burn_megatron::parallel::ReduceOp;
use burn_megatron::tensor_parallel::{
    ColumnParallelLinearConfig, RowParallelLinearConfig, VocabParallelEmbeddingConfig,
    VocabPartition, padded_vocab_size, vocab_parallel_cross_entropy,
    vocab_parallel_cross_entropy_from_statistics,
};
use common::{Device, TestBackend, assert_close, random, tensor_parallel_cluster};

const TOLERANCE: f32 = 1e-5;
const BATCH: usize = 2;
const SEQ: usize = 8;

type Inner = burn_ndarray::NdArray<f32>;

fn tensor<const D: usize>(data: &TensorData) -> Tensor<TestBackend, D> {
    Tensor::from_data(data.clone(), &Device::default())
}

/// `tensor` cut to `[start, start + len)` along `dim`, as data.
fn slice<const D: usize>(data: &TensorData, dim: usize, start: usize, len: usize) -> TensorData {
    Tensor::<Inner, D>::from_data(data.clone(), &Device::default())
        .narrow(dim, start, len)
        .into_data()
}

fn chunk<const D: usize>(data: &TensorData, dim: usize, rank: usize, parts: usize) -> TensorData {
    let len = data.shape[dim] / parts;
    slice::<D>(data, dim, rank * len, len)
}

/// The reference of a linear layer: output and the gradients of input, weight and bias for
/// the loss `sum(output * upstream)`.
struct LinearReference {
    output: TensorData,
    input_grad: TensorData,
    weight_grad: TensorData,
    bias_grad: TensorData,
}

fn linear_reference(
    input: &TensorData,
    weight: &TensorData,
    bias: &TensorData,
    upstream: &TensorData,
) -> LinearReference {
    let x = tensor::<3>(input).require_grad();
    let w = tensor::<2>(weight).require_grad();
    let b = tensor::<1>(bias).require_grad();
    let output = linear(x.clone(), w.clone(), Some(b.clone()));
    let grads = (output.clone() * tensor::<3>(upstream)).sum().backward();
    LinearReference {
        output: output.into_data(),
        input_grad: x.grad(&grads).unwrap().into_data(),
        weight_grad: w.grad(&grads).unwrap().into_data(),
        bias_grad: b.grad(&grads).unwrap().into_data(),
    }
}

/// What one rank computed: output and the gradients of input, weight and bias.
struct RankResult {
    output: TensorData,
    input_grad: TensorData,
    weight_grad: TensorData,
    bias_grad: TensorData,
}

#[test]
fn column_parallel_linear_matches_the_unsplit_layer() {
    let (d_in, d_out) = (6, 8);
    let input = random(&[BATCH, SEQ, d_in], 1);
    let weight = random(&[d_in, d_out], 2);
    let bias = random(&[d_out], 3);
    let upstream = random(&[BATCH, SEQ, d_out], 4);
    let reference = linear_reference(&input, &weight, &bias, &upstream);

    for tp in [1, 2, 4] {
        for sequence_parallel in [false, true] {
            for gather_output in [false, true] {
                let case = format!("tp={tp} sp={sequence_parallel} gather={gather_output}");
                let results = tensor_parallel_cluster(tp)
                    .run(|ctx| {
                        let group = ctx.tensor();
                        let rank = group.rank();
                        let layer = ColumnParallelLinearConfig::new(d_in, d_out)
                            .with_sequence_parallel(sequence_parallel)
                            .with_gather_output(gather_output)
                            .init_from_full::<TestBackend>(
                                group,
                                weight.clone(),
                                Some(bias.clone()),
                                &Device::default(),
                            )?;
                        let my_input = if sequence_parallel {
                            chunk::<3>(&input, 1, rank, tp)
                        } else {
                            input.clone()
                        };
                        let x = tensor::<3>(&my_input).require_grad();
                        let output = layer.forward(x.clone());
                        let my_upstream = if gather_output {
                            upstream.clone()
                        } else {
                            chunk::<3>(&upstream, 2, rank, tp)
                        };
                        // Each rank's loss covers its own output columns; with a gathered
                        // output, every rank computes the whole (replicated) loss, as the
                        // layers after a gather do in Megatron.
                        let loss = (output.clone() * tensor::<3>(&my_upstream)).sum();
                        let grads = loss.backward();
                        let input_grad = x.grad(&grads).unwrap();
                        Ok::<_, Error>(RankResult {
                            output: output.into_data(),
                            input_grad: input_grad.into_data(),
                            weight_grad: layer.weight.grad(&grads).unwrap().into_data(),
                            bias_grad: layer
                                .bias
                                .as_ref()
                                .unwrap()
                                .grad(&grads)
                                .unwrap()
                                .into_data(),
                        })
                    })
                    .unwrap();
                for (rank, result) in results.iter().enumerate() {
                    let expected_output = if gather_output {
                        reference.output.clone()
                    } else {
                        chunk::<3>(&reference.output, 2, rank, tp)
                    };
                    let expected_input_grad = if sequence_parallel {
                        chunk::<3>(&reference.input_grad, 1, rank, tp)
                    } else {
                        reference.input_grad.clone()
                    };
                    let at = format!("{case} rank={rank}");
                    assert_close(
                        &result.output,
                        &expected_output,
                        TOLERANCE,
                        &format!("{at} output"),
                    );
                    assert_close(
                        &result.input_grad,
                        &expected_input_grad,
                        TOLERANCE,
                        &format!("{at} input grad"),
                    );
                    assert_close(
                        &result.weight_grad,
                        &chunk::<2>(&reference.weight_grad, 1, rank, tp),
                        TOLERANCE,
                        &format!("{at} weight grad"),
                    );
                    assert_close(
                        &result.bias_grad,
                        &chunk::<1>(&reference.bias_grad, 0, rank, tp),
                        TOLERANCE,
                        &format!("{at} bias grad"),
                    );
                }
            }
        }
    }
}

#[test]
fn row_parallel_linear_matches_the_unsplit_layer() {
    let (d_in, d_out) = (8, 6);
    let input = random(&[BATCH, SEQ, d_in], 11);
    let weight = random(&[d_in, d_out], 12);
    let bias = random(&[d_out], 13);
    let upstream = random(&[BATCH, SEQ, d_out], 14);
    let reference = linear_reference(&input, &weight, &bias, &upstream);

    for tp in [1, 2, 4] {
        for (sequence_parallel, input_is_parallel) in [(false, true), (false, false), (true, true)]
        {
            let case =
                format!("tp={tp} sp={sequence_parallel} input_is_parallel={input_is_parallel}");
            let results = tensor_parallel_cluster(tp)
                .run(|ctx| {
                    let group = ctx.tensor();
                    let rank = group.rank();
                    let layer = RowParallelLinearConfig::new(d_in, d_out)
                        .with_sequence_parallel(sequence_parallel)
                        .with_input_is_parallel(input_is_parallel)
                        .init_from_full::<TestBackend>(
                            group,
                            weight.clone(),
                            Some(bias.clone()),
                            &Device::default(),
                        )?;
                    let my_input = if input_is_parallel {
                        chunk::<3>(&input, 2, rank, tp)
                    } else {
                        input.clone()
                    };
                    let x = tensor::<3>(&my_input).require_grad();
                    let output = layer.forward(x.clone());
                    let my_upstream = if sequence_parallel {
                        chunk::<3>(&upstream, 1, rank, tp)
                    } else {
                        upstream.clone()
                    };
                    let grads = (output.clone() * tensor::<3>(&my_upstream))
                        .sum()
                        .backward();
                    let mut bias_grad = layer.bias.as_ref().unwrap().grad(&grads).unwrap();
                    if sequence_parallel {
                        // Each rank's bias gradient covers its sequence chunk; the layer's
                        // documented contract is to sum it over the tensor-parallel group.
                        bias_grad = group.all_reduce(bias_grad, ReduceOp::Sum)?;
                    }
                    Ok::<_, Error>(RankResult {
                        output: output.into_data(),
                        input_grad: x.grad(&grads).unwrap().into_data(),
                        weight_grad: layer.weight.grad(&grads).unwrap().into_data(),
                        bias_grad: bias_grad.into_data(),
                    })
                })
                .unwrap();
            for (rank, result) in results.iter().enumerate() {
                let expected_output = if sequence_parallel {
                    chunk::<3>(&reference.output, 1, rank, tp)
                } else {
                    reference.output.clone()
                };
                let expected_input_grad = if input_is_parallel {
                    chunk::<3>(&reference.input_grad, 2, rank, tp)
                } else {
                    reference.input_grad.clone()
                };
                let at = format!("{case} rank={rank}");
                assert_close(
                    &result.output,
                    &expected_output,
                    TOLERANCE,
                    &format!("{at} output"),
                );
                assert_close(
                    &result.input_grad,
                    &expected_input_grad,
                    TOLERANCE,
                    &format!("{at} input grad"),
                );
                assert_close(
                    &result.weight_grad,
                    &chunk::<2>(&reference.weight_grad, 0, rank, tp),
                    TOLERANCE,
                    &format!("{at} weight grad"),
                );
                assert_close(
                    &result.bias_grad,
                    &reference.bias_grad,
                    TOLERANCE,
                    &format!("{at} bias grad"),
                );
            }
        }
    }
}

#[test]
fn megatron_mlp_matches_the_unsplit_mlp() {
    // Column-parallel, GeLU, row-parallel: the block the layers exist for.
    let (hidden, ffn) = (4, 16);
    let input = random(&[BATCH, SEQ, hidden], 21);
    let w1 = random(&[hidden, ffn], 22);
    let b1 = random(&[ffn], 23);
    let w2 = random(&[ffn, hidden], 24);
    let b2 = random(&[hidden], 25);
    let upstream = random(&[BATCH, SEQ, hidden], 26);

    let x = tensor::<3>(&input).require_grad();
    let (rw1, rw2) = (
        tensor::<2>(&w1).require_grad(),
        tensor::<2>(&w2).require_grad(),
    );
    let hidden_act =
        burn::tensor::activation::gelu(linear(x.clone(), rw1.clone(), Some(tensor(&b1))));
    let output = linear(hidden_act, rw2.clone(), Some(tensor(&b2)));
    let grads = (output.clone() * tensor::<3>(&upstream)).sum().backward();
    let (ref_out, ref_dx) = (output.into_data(), x.grad(&grads).unwrap().into_data());
    let (ref_dw1, ref_dw2) = (
        rw1.grad(&grads).unwrap().into_data(),
        rw2.grad(&grads).unwrap().into_data(),
    );

    for tp in [1, 2, 4] {
        for sequence_parallel in [false, true] {
            let results = tensor_parallel_cluster(tp)
                .run(|ctx| {
                    let group = ctx.tensor();
                    let rank = group.rank();
                    let device = Device::default();
                    let fc1 = ColumnParallelLinearConfig::new(hidden, ffn)
                        .with_sequence_parallel(sequence_parallel)
                        .init_from_full::<TestBackend>(
                            group,
                            w1.clone(),
                            Some(b1.clone()),
                            &device,
                        )?;
                    let fc2 = RowParallelLinearConfig::new(ffn, hidden)
                        .with_sequence_parallel(sequence_parallel)
                        .init_from_full::<TestBackend>(
                            group,
                            w2.clone(),
                            Some(b2.clone()),
                            &device,
                        )?;
                    let (my_input, my_upstream) = if sequence_parallel {
                        (
                            chunk::<3>(&input, 1, rank, tp),
                            chunk::<3>(&upstream, 1, rank, tp),
                        )
                    } else {
                        (input.clone(), upstream.clone())
                    };
                    let x = tensor::<3>(&my_input).require_grad();
                    let output =
                        fc2.forward(burn::tensor::activation::gelu(fc1.forward(x.clone())));
                    let grads = (output.clone() * tensor::<3>(&my_upstream))
                        .sum()
                        .backward();
                    Ok::<_, Error>([
                        output.into_data(),
                        x.grad(&grads).unwrap().into_data(),
                        fc1.weight.grad(&grads).unwrap().into_data(),
                        fc2.weight.grad(&grads).unwrap().into_data(),
                    ])
                })
                .unwrap();
            for (rank, [out, dx, dw1, dw2]) in results.iter().enumerate() {
                let at = format!("tp={tp} sp={sequence_parallel} rank={rank}");
                let (expected_out, expected_dx) = if sequence_parallel {
                    (
                        chunk::<3>(&ref_out, 1, rank, tp),
                        chunk::<3>(&ref_dx, 1, rank, tp),
                    )
                } else {
                    (ref_out.clone(), ref_dx.clone())
                };
                assert_close(out, &expected_out, TOLERANCE, &format!("{at} output"));
                assert_close(dx, &expected_dx, TOLERANCE, &format!("{at} input grad"));
                assert_close(
                    dw1,
                    &chunk::<2>(&ref_dw1, 1, rank, tp),
                    TOLERANCE,
                    &format!("{at} fc1 grad"),
                );
                assert_close(
                    dw2,
                    &chunk::<2>(&ref_dw2, 0, rank, tp),
                    TOLERANCE,
                    &format!("{at} fc2 grad"),
                );
            }
        }
    }
}

#[test]
fn vocab_parallel_embedding_matches_the_unsplit_table() {
    // A vocabulary of 50 padded to a multiple of 4 x tp: 52, 56, 64 for tp 1, 2, 4.
    let (vocab, d_model, divisible_by) = (50, 6, 4);
    let table = random(&[vocab, d_model], 31);
    let ids_values: Vec<i64> = (0..BATCH * SEQ)
        .map(|i| ((i * 37 + 5) % vocab) as i64)
        .collect();
    let ids = TensorData::new(ids_values, [BATCH, SEQ]);
    let upstream = random(&[BATCH, SEQ, d_model], 32);

    let weight = tensor::<2>(&table).require_grad();
    let ids_tensor = Tensor::<TestBackend, 2, Int>::from_data(ids.clone(), &Device::default());
    let output = embedding(weight.clone(), ids_tensor);
    let grads = (output.clone() * tensor::<3>(&upstream)).sum().backward();
    let (ref_out, ref_grad) = (output.into_data(), weight.grad(&grads).unwrap().into_data());

    for tp in [1, 2, 4] {
        for sequence_parallel in [false, true] {
            let results = tensor_parallel_cluster(tp)
                .run(|ctx| {
                    let group = ctx.tensor();
                    let rank = group.rank();
                    let config = VocabParallelEmbeddingConfig::new(vocab, d_model)
                        .with_make_vocab_size_divisible_by(divisible_by)
                        .with_sequence_parallel(sequence_parallel);
                    let layer = config.init_from_full::<TestBackend>(
                        group,
                        table.clone(),
                        &Device::default(),
                    )?;
                    let ids =
                        Tensor::<TestBackend, 2, Int>::from_data(ids.clone(), &Device::default());
                    let output = layer.forward(ids);
                    let my_upstream = if sequence_parallel {
                        chunk::<3>(&upstream, 1, rank, tp)
                    } else {
                        upstream.clone()
                    };
                    let grads = (output.clone() * tensor::<3>(&my_upstream))
                        .sum()
                        .backward();
                    Ok::<_, Error>((
                        layer.partition(),
                        output.into_data(),
                        layer.weight.grad(&grads).unwrap().into_data(),
                    ))
                })
                .unwrap();
            for (rank, (partition, output, grad)) in results.iter().enumerate() {
                let at = format!("tp={tp} sp={sequence_parallel} rank={rank}");
                assert_eq!(
                    partition.padded_size,
                    padded_vocab_size(vocab, divisible_by, tp)
                );
                assert_eq!(
                    partition.padded_size,
                    [52, 56, 64][tp.trailing_zeros() as usize]
                );
                let expected_out = if sequence_parallel {
                    chunk::<3>(&ref_out, 1, rank, tp)
                } else {
                    ref_out.clone()
                };
                assert_close(output, &expected_out, TOLERANCE, &format!("{at} output"));
                // Real rows match the reference; padding rows get no gradient.
                let real = partition.real_len();
                let grad_tensor = Tensor::<Inner, 2>::from_data(grad.clone(), &Device::default());
                if real > 0 {
                    assert_close(
                        &grad_tensor.clone().narrow(0, 0, real).into_data(),
                        &slice::<2>(&ref_grad, 0, partition.start, real),
                        TOLERANCE,
                        &format!("{at} table grad"),
                    );
                }
                if real < partition.len() {
                    let padding = grad_tensor.narrow(0, real, partition.len() - real);
                    assert_eq!(padding.abs().max().into_scalar(), 0.0, "{at} padding grad");
                }
            }
        }
    }
}

#[test]
fn vocab_parallel_cross_entropy_matches_the_unsplit_loss() {
    // Vocabulary 50 padded to 56 at tp 2 and 64 at tp 4; padding logits set huge so that
    // any probability mass leaking to them would show.
    let (vocab, divisible_by) = (50, 4);
    let logits = random(&[BATCH, SEQ, vocab], 41);
    let target_values: Vec<i64> = (0..BATCH * SEQ)
        .map(|i| ((i * 13 + 3) % vocab) as i64)
        .collect();
    let targets = TensorData::new(target_values, [BATCH, SEQ]);
    let upstream = random(&[BATCH, SEQ], 42);

    for label_smoothing in [0.0, 0.1] {
        // Reference: log-softmax over the real vocabulary.
        let x = tensor::<3>(&logits).require_grad();
        let log_probs = log_softmax(x.clone(), 2);
        let target_tensor =
            Tensor::<TestBackend, 2, Int>::from_data(targets.clone(), &Device::default());
        let nll = -log_probs
            .clone()
            .gather(2, target_tensor.unsqueeze_dim(2))
            .squeeze_dim::<2>(2);
        let smooth = -log_probs.mean_dim(2).squeeze_dim::<2>(2);
        let loss = nll * (1.0 - label_smoothing) + smooth * label_smoothing;
        let grads = (loss.clone() * tensor::<2>(&upstream)).sum().backward();
        let (ref_loss, ref_grad) = (loss.into_data(), x.grad(&grads).unwrap().into_data());

        for (tp, from_statistics) in [1, 2, 4]
            .into_iter()
            .flat_map(|tp| [(tp, false), (tp, true)])
        {
            let cross_entropy = if from_statistics {
                vocab_parallel_cross_entropy_from_statistics::<TestBackend>
            } else {
                vocab_parallel_cross_entropy::<TestBackend>
            };
            let results = tensor_parallel_cluster(tp)
                .run(|ctx| {
                    let group = ctx.tensor();
                    let partition = VocabPartition::new(vocab, divisible_by, group)?;
                    // This rank's slice of the padded logits: real columns, then padding.
                    let real = partition.real_len();
                    let mut columns = Vec::new();
                    if real > 0 {
                        columns.push(tensor::<3>(&slice::<3>(&logits, 2, partition.start, real)));
                    }
                    if real < partition.len() {
                        columns.push(Tensor::full(
                            [BATCH, SEQ, partition.len() - real],
                            80.0,
                            &Device::default(),
                        ));
                    }
                    let local = Tensor::cat(columns, 2).detach().require_grad();
                    let targets = Tensor::<TestBackend, 2, Int>::from_data(
                        targets.clone(),
                        &Device::default(),
                    );
                    let loss =
                        cross_entropy(local.clone(), targets, &partition, group, label_smoothing);
                    let grads = (loss.clone() * tensor::<2>(&upstream)).sum().backward();
                    Ok::<_, Error>((
                        partition,
                        loss.into_data(),
                        local.grad(&grads).unwrap().into_data(),
                    ))
                })
                .unwrap();
            for (rank, (partition, loss, grad)) in results.iter().enumerate() {
                let at = format!(
                    "tp={tp} statistics={from_statistics} smoothing={label_smoothing} rank={rank}"
                );
                assert_close(loss, &ref_loss, TOLERANCE, &format!("{at} loss"));
                let real = partition.real_len();
                let grad = Tensor::<Inner, 3>::from_data(grad.clone(), &Device::default());
                if real > 0 {
                    assert_close(
                        &grad.clone().narrow(2, 0, real).into_data(),
                        &slice::<3>(&ref_grad, 2, partition.start, real),
                        TOLERANCE,
                        &format!("{at} logits grad"),
                    );
                }
                if real < partition.len() {
                    let padding = grad.narrow(2, real, partition.len() - real);
                    assert_eq!(padding.abs().max().into_scalar(), 0.0, "{at} padding grad");
                }
            }
        }
    }
}

#[test]
fn layers_reject_sizes_the_group_cannot_split() {
    let outcomes = tensor_parallel_cluster(4).run_each(|ctx| {
        ColumnParallelLinearConfig::new(4, 6)
            .init::<TestBackend>(ctx.tensor(), &Device::default())
            .map(|_| ())
    });
    let message = outcomes[0].as_ref().unwrap_err().to_string();
    assert!(
        message.contains("tensor-parallel size 4 does not divide the 6 output features"),
        "{message}"
    );

    let outcomes = tensor_parallel_cluster(1).run_each(|ctx| {
        RowParallelLinearConfig::new(4, 6)
            .with_sequence_parallel(true)
            .with_input_is_parallel(false)
            .init::<TestBackend>(ctx.tensor(), &Device::default())
            .map(|_| ())
    });
    let message = outcomes[0].as_ref().unwrap_err().to_string();
    assert!(
        message.contains("needs input_is_parallel = true"),
        "{message}"
    );

    let outcomes = tensor_parallel_cluster(2).run_each(|ctx| {
        ColumnParallelLinearConfig::new(4, 6)
            .init_from_full::<TestBackend>(
                ctx.tensor(),
                random(&[6, 4], 0),
                None,
                &Device::default(),
            )
            .map(|_| ())
    });
    let message = outcomes[0].as_ref().unwrap_err().to_string();
    assert!(
        message.contains("the full weight has shape [6, 4] but the configuration needs [4, 6]"),
        "{message}"
    );
}

#[test]
fn initialization_does_not_depend_on_the_tensor_parallel_size() {
    // The shards of tp = 2 and 4 put together are the tp = 1 weight.
    let full = |tp: usize| -> TensorData {
        let shards = tensor_parallel_cluster(tp)
            .run(|ctx| {
                let layer = ColumnParallelLinearConfig::new(3, 8)
                    .with_seed(9)
                    .init::<Inner>(ctx.tensor(), &Device::default())?;
                Ok::<_, Error>(layer.weight.val())
            })
            .unwrap();
        Tensor::cat(shards, 1).into_data()
    };
    let single = full(1);
    let spread = common::values(&single)
        .iter()
        .map(|v| v.abs())
        .fold(0f32, f32::max);
    assert!(spread > 0.0, "the weight was initialized");
    assert_eq!(full(2), single);
    assert_eq!(full(4), single);
}
