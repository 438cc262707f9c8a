//! Core attention as one operation: scores, scale, ALiBi bias, causal and padding masks,
//! softmax (in fp32), attention dropout, and the product with the values. The products
//! are [`MegatronOps::batched_gemm`] calls (cuBLASLt on CUDA); those whose heads the
//! caller merges next (the context, the gradients of Q, K and V) store them merged
//! ([`MegatronOps::batched_gemm_heads_merged`]).
//!
//! With [`Recompute::Selective`] (Megatron's selective activation recomputation) the
//! autodiff op keeps only Q, K, V and the padding mask, and its backward recomputes the
//! probabilities, so no `[batch, heads, seq, seq]` tensor outlives the forward.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Tensor, TensorData, TensorPrimitive, backend::Backend};

use burn_megatron_kernels::{Dropout, FusedKernels, attention_mask, softmax_dtype};

use super::{MegatronOps, with_dtype};

/// What core attention keeps for its backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recompute {
    /// Store every intermediate (scores, probabilities, dropout mask).
    Off,
    /// Store Q, K and V only; recompute the probabilities in the backward (the default).
    #[default]
    Selective,
}

/// Dropout on the attention probabilities, consistent across tensor-parallel ranks: the
/// local heads are the part at `offsets` of the full `[batch, heads, seq, seq]` tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionDropout {
    /// Probability of dropping an element.
    pub p: f64,
    /// Seed of this site and pass.
    pub seed: u64,
    /// Shape of the probabilities over all heads.
    pub full: [usize; 4],
    /// Position of the local heads in it.
    pub offsets: [usize; 4],
}

/// How core attention computes: scale, masks, bias, dropout, and what it recomputes.
#[derive(Debug, Clone, PartialEq)]
pub struct CoreAttention {
    /// Factor on the scores (usually `1 / sqrt(head_dim)`).
    pub scale: f64,
    /// Hide later keys from each query.
    pub causal: bool,
    /// ALiBi slope of each local head (BLOOM), added as `slope * key_position`.
    pub alibi_slopes: Option<Vec<f32>>,
    /// Dropout on the probabilities.
    pub dropout: Option<AttentionDropout>,
    /// What the autodiff op keeps for its backward.
    pub recompute: Recompute,
}

impl CoreAttention {
    /// Causal attention with scale `1 / sqrt(head_dim)`, no bias or dropout, selective
    /// recompute.
    pub fn causal(head_dim: usize) -> Self {
        Self {
            scale: 1.0 / (head_dim as f64).sqrt(),
            causal: true,
            alibi_slopes: None,
            dropout: None,
            recompute: Recompute::default(),
        }
    }

    /// Attention dropout through [`FusedKernels::dropout_mask_apply`] (one kernel on
    /// CUDA): the heads' `[batch, heads, seq, seq]` block is the `[batch, heads · seq,
    /// seq]` block at `heads_offset · seq` of the full tensor, the same flat positions.
    fn drop<B: FusedKernels>(&self, probabilities: Tensor<B, 4>) -> Tensor<B, 4> {
        match &self.dropout {
            Some(d) if d.p > 0.0 => {
                let [batch, heads, queries, keys] = probabilities.dims();
                let [_, all_heads, _, _] = d.full;
                let site = Dropout {
                    p: d.p,
                    seed: d.seed,
                    full: [d.full[0], all_heads * queries, keys],
                    offsets: [d.offsets[0], d.offsets[1] * queries, 0],
                };
                let flat = probabilities.reshape([batch, heads * queries, keys]);
                B::dropout_mask_apply(flat, site).reshape([batch, heads, queries, keys])
            }
            _ => probabilities,
        }
    }

    /// Softmax probabilities (before dropout; computed in fp32, returned in the scores'
    /// type), through the fused kernel unless there is an ALiBi bias.
    fn probabilities<B: MegatronOps>(
        &self,
        query: Tensor<B, 4>,
        key: Tensor<B, 4>,
        padding: Option<Tensor<B, 2, Bool>>,
    ) -> Tensor<B, 4> {
        let query_dtype = query.dtype();
        let scores = B::batched_gemm(query, key, false, true);
        let Some(slopes) = &self.alibi_slopes else {
            return B::scaled_masked_softmax(scores, self.scale, self.causal, padding);
        };
        let [batch, heads, seq, _] = scores.dims();
        let device = scores.device();
        let wide = softmax_dtype(scores.dtype());
        let positions: Vec<f32> = slopes
            .iter()
            .flat_map(|slope| (0..seq).map(move |j| slope * j as f32))
            .collect();
        let bias = Tensor::<B, 4>::from_data(
            TensorData::new(positions, [1, heads, 1, seq]),
            (&device, wide),
        );
        let mut scores = with_dtype(scores * self.scale, wide) + bias;
        if let Some(mask) = attention_mask([batch, heads, seq, seq], self.causal, padding, &device)
        {
            scores = scores.mask_fill(mask, f32::MIN);
        }
        with_dtype(softmax(scores, 3), query_dtype)
    }
}

/// Core attention in plain Burn ops (on an autodiff backend every intermediate is kept
/// for the backward).
pub fn reference_attention<B: MegatronOps>(
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    value: Tensor<B, 4>,
    padding: Option<Tensor<B, 2, Bool>>,
    spec: &CoreAttention,
) -> Tensor<B, 4> {
    let probabilities = spec.probabilities(query, key, padding);
    B::batched_gemm_heads_merged(spec.drop(probabilities), value, false, false)
}

/// The gradients of query, key and value given the context's, recomputing the
/// probabilities.
fn attention_backward<B: MegatronOps>(
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    value: Tensor<B, 4>,
    padding: Option<Tensor<B, 2, Bool>>,
    spec: &CoreAttention,
    grad: Tensor<B, 4>,
) -> [Tensor<B, 4>; 3] {
    let probabilities = spec.probabilities(query.clone(), key.clone(), padding.clone());
    let dropped = spec.drop(probabilities.clone());
    // Each pair of products below is one group (see `MegatronOps::gemm_group`).
    let (grad_value, grad_dropped) = B::gemm_group(|| {
        (
            B::batched_gemm_heads_merged(dropped, grad.clone(), true, false),
            B::batched_gemm(grad, value, false, true),
        )
    });
    // Dropout multiplies by a fixed mask: its backward is the same multiplication.
    let grad_probabilities = spec.drop(grad_dropped);
    // The softmax backward; with ALiBi (a constant added to the scores) it is the same.
    let grad_scores = B::scaled_masked_softmax_backward(
        probabilities,
        grad_probabilities,
        spec.scale,
        spec.causal,
        padding,
    );
    let (grad_query, grad_key) = B::gemm_group(|| {
        (
            B::batched_gemm_heads_merged(grad_scores.clone(), key, false, false),
            B::batched_gemm_heads_merged(grad_scores, query, true, false),
        )
    });
    [grad_query, grad_key, grad_value]
}

/// What the selective-recompute backward keeps: the inputs, the mask, the spec.
#[derive(Debug, Clone)]
struct Saved<B: Backend> {
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    value: Tensor<B, 4>,
    padding: Option<Tensor<B, 2, Bool>>,
    spec: CoreAttention,
}

#[derive(Debug)]
struct RecomputedAttention;

impl<B: MegatronOps> Backward<B, 3> for RecomputedAttention {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad =
            Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let Saved {
            query,
            key,
            value,
            padding,
            spec,
        } = ops.state;
        let inputs = attention_backward(query, key, value, padding, &spec, grad);
        for (parent, grad) in ops.parents.into_iter().zip(inputs) {
            if let Some(parent) = parent {
                grads.register::<B>(parent.id, grad.into_primitive().tensor());
            }
        }
    }
}

/// Core attention on an autodiff backend as one op that keeps only its inputs.
pub(super) fn recomputed_attention<B: MegatronOps, C: CheckpointStrategy>(
    query: Tensor<Autodiff<B, C>, 4>,
    key: Tensor<Autodiff<B, C>, 4>,
    value: Tensor<Autodiff<B, C>, 4>,
    padding: Option<Tensor<Autodiff<B, C>, 2, Bool>>,
    spec: &CoreAttention,
) -> Tensor<Autodiff<B, C>, 4> {
    let (query, key, value, nodes) = burn_megatron_kernels::detach_inner!(B; query, key, value);
    let padding = padding.map(|p| Tensor::<B, 2, Bool>::from_primitive(p.into_primitive()));
    let output = B::core_attention(
        query.clone(),
        key.clone(),
        value.clone(),
        padding.clone(),
        spec,
    )
    .into_primitive()
    .tensor();
    let output = match RecomputedAttention
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            Saved {
                query,
                key,
                value,
                padding,
                spec: spec.clone(),
            },
            output,
        ),
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    Tensor::from_primitive(TensorPrimitive::Float(output))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{DType, Distribution};

    type Inner = burn_ndarray::NdArray<f64>;
    type B = Autodiff<Inner>;

    fn random(shape: [usize; 4], seed: u64) -> Tensor<Inner, 4> {
        let device = Default::default();
        Inner::seed(&device, seed);
        Tensor::<Inner, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device).cast(DType::F64)
    }

    /// Output and the three input gradients (in fp64, so that the comparison sees the
    /// formulas rather than rounding).
    fn run(
        inputs: &[Tensor<Inner, 4>; 3],
        padding: Option<Tensor<Inner, 2, Bool>>,
        spec: &CoreAttention,
    ) -> [TensorData; 4] {
        let [q, k, v] = inputs
            .clone()
            .map(|t| Tensor::<B, 4>::from_inner(t).require_grad());
        let padding = padding.map(|p| Tensor::<B, 2, Bool>::from_primitive(p.into_primitive()));
        let out = B::core_attention(q.clone(), k.clone(), v.clone(), padding, spec);
        // A weighting makes every output element's gradient different.
        let weights = Tensor::<B, 4>::from_inner(random(out.dims(), 99));
        let grads = (out.clone() * weights).sum().backward();
        let grad = |t: &Tensor<B, 4>| t.grad(&grads).expect("gradient").into_data();
        [out.into_data(), grad(&q), grad(&k), grad(&v)]
    }

    fn assert_close(what: &str, got: &TensorData, want: &TensorData) {
        let (got, want) = (got.to_vec::<f64>().unwrap(), want.to_vec::<f64>().unwrap());
        let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
        let worst = got
            .iter()
            .zip(&want)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= 1e-10 * scale.max(1.0),
            "{what}: off by {worst} (scale {scale})"
        );
    }

    #[test]
    fn selective_recompute_matches_storing_everything() {
        let device = Default::default();
        let shape = [2, 3, 7, 5];
        let inputs = [random(shape, 1), random(shape, 2), random(shape, 3)];
        let padding = Tensor::<Inner, 2, Bool>::from_data(
            TensorData::new(
                vec![
                    false, false, false, false, false, true, true, false, false, false, false,
                    false, false, false,
                ],
                [2, 7],
            ),
            &device,
        );
        let cases = [
            ("causal", CoreAttention::causal(5), None),
            (
                "causal + padding",
                CoreAttention::causal(5),
                Some(padding.clone()),
            ),
            (
                "padding only, ALiBi, dropout",
                CoreAttention {
                    causal: false,
                    alibi_slopes: Some(vec![0.5, 0.25, 0.125]),
                    dropout: Some(AttentionDropout {
                        p: 0.3,
                        seed: 11,
                        full: [2, 6, 7, 7],
                        offsets: [0, 3, 0, 0],
                    }),
                    ..CoreAttention::causal(5)
                },
                Some(padding),
            ),
        ];
        for (name, spec, padding) in cases {
            let stored = run(
                &inputs,
                padding.clone(),
                &CoreAttention {
                    recompute: Recompute::Off,
                    ..spec.clone()
                },
            );
            let recomputed = run(&inputs, padding, &spec);
            for (what, (got, want)) in ["output", "d query", "d key", "d value"]
                .iter()
                .zip(recomputed.iter().zip(&stored))
            {
                assert_close(&format!("{name}: {what}"), got, want);
            }
        }
    }
}
