//! Column- and row-parallel linear layers.
//!
//! Inputs are `[..., seq, features]`; with sequence parallelism the sequence dimension
//! (second to last) is split across the tensor-parallel ranks outside the layers.
//! Weights are stored `[d_input, d_output]`, as in Burn's `Linear`.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{Tensor, TensorData, backend::Backend};

use super::init::ParamInit;
use super::mappings::{
    copy_to_tensor_parallel_region, gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region, reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region, scatter_to_tensor_parallel_region,
};
use crate::ops::linear_param;
use crate::parallel::{Group, ParallelBackend};
use crate::{Error, Result};

/// Configuration of a [`ColumnParallelLinear`]: `Y = X A + b` with `A` split by columns,
/// `A = [A_1 ... A_p]`, rank `i` computing `Y_i = X A_i + b_i`.
#[derive(Config, Debug)]
pub struct ColumnParallelLinearConfig {
    /// Input features.
    pub d_input: usize,
    /// Output features of the whole layer; each rank holds `d_output / tp` of them.
    pub d_output: usize,
    /// Whether the layer has a bias.
    #[config(default = true)]
    pub bias: bool,
    /// All-gather the output so that every rank gets all `d_output` features (otherwise
    /// each keeps its `d_output / tp`, ready for a row-parallel layer).
    #[config(default = false)]
    pub gather_output: bool,
    /// The input is split along the sequence dimension (sequence parallelism): it is
    /// all-gathered before the product, and its gradient reduce-scattered.
    #[config(default = false)]
    pub sequence_parallel: bool,
    /// Leave the bias out of the output, for the caller to fuse it later (read it with
    /// [`ColumnParallelLinear::bias`]).
    #[config(default = false)]
    pub skip_bias_add: bool,
    /// Initialization of the weight; the bias starts at zero.
    #[config(default = "ParamInit::Normal { std: 0.02 }")]
    pub init: ParamInit,
    /// Seed of the weight's values (the same full weight whatever the parallel layout).
    #[config(default = 0)]
    pub seed: u64,
}

/// A linear layer whose output features are split across the tensor-parallel ranks.
#[derive(Module, Debug)]
pub struct ColumnParallelLinear<B: Backend> {
    /// This rank's columns of the weight: `[d_input, d_output / tp]`.
    pub weight: Param<Tensor<B, 2>>,
    /// This rank's part of the bias: `[d_output / tp]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    group: Group,
    gather_output: bool,
    sequence_parallel: bool,
    skip_bias_add: bool,
}

impl ColumnParallelLinearConfig {
    /// This rank's layer, initialized from [`init`](Self::init) and [`seed`](Self::seed).
    ///
    /// # Errors
    ///
    /// `InvalidConfig` when the tensor-parallel size does not divide `d_output`.
    pub fn init<B: Backend>(
        &self,
        group: &Group,
        device: &B::Device,
    ) -> Result<ColumnParallelLinear<B>> {
        let (start, width) = partition(self.d_output, group, "output features")?;
        let full = [self.d_input, self.d_output];
        let weight = self
            .init
            .init_shard(full, 1, start, width, self.seed, device);
        let bias = self
            .bias
            .then(|| ParamInit::Zeros.init_shard([self.d_output], 0, start, width, 0, device));
        Ok(self.build(group, weight, bias))
    }

    /// This rank's layer, cut from the weights of the whole layer (`weight`:
    /// `[d_input, d_output]`, `bias`: `[d_output]`).
    ///
    /// # Errors
    ///
    /// `InvalidConfig` when the shapes do not match the configuration, a bias is given
    /// to a layer without one (or missing), or the tensor-parallel size does not divide
    /// `d_output`.
    pub fn init_from_full<B: Backend>(
        &self,
        group: &Group,
        weight: TensorData,
        bias: Option<TensorData>,
        device: &B::Device,
    ) -> Result<ColumnParallelLinear<B>> {
        let (start, width) = partition(self.d_output, group, "output features")?;
        let weight = full_tensor::<B, 2>(weight, [self.d_input, self.d_output], "weight", device)?
            .narrow(1, start, width);
        let bias = full_bias::<B>(self.bias, bias, self.d_output, device)?
            .map(|bias| bias.narrow(0, start, width));
        Ok(self.build(group, weight, bias))
    }

    /// This rank's layer from its own shard: `weight` `[d_input, d_output / tp]`, `bias`
    /// `[d_output / tp]`, for callers that lay out the full weight themselves.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` when the shapes do not match this rank's shard.
    pub fn init_from_shard<B: Backend>(
        &self,
        group: &Group,
        weight: TensorData,
        bias: Option<TensorData>,
        device: &B::Device,
    ) -> Result<ColumnParallelLinear<B>> {
        let (_, width) = partition(self.d_output, group, "output features")?;
        let weight = full_tensor::<B, 2>(weight, [self.d_input, width], "weight shard", device)?;
        let bias = full_bias::<B>(self.bias, bias, width, device)?;
        Ok(self.build(group, weight, bias))
    }

    fn build<B: Backend>(
        &self,
        group: &Group,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> ColumnParallelLinear<B> {
        ColumnParallelLinear {
            weight: Param::from_tensor(weight),
            bias: bias.map(Param::from_tensor),
            group: group.clone(),
            gather_output: self.gather_output,
            sequence_parallel: self.sequence_parallel,
            skip_bias_add: self.skip_bias_add,
        }
    }
}

impl<B: ParallelBackend> ColumnParallelLinear<B> {
    /// Applies the layer to `input`: `[..., seq, d_input]`, or `[..., seq / tp, d_input]`
    /// with sequence parallelism. Returns `[..., seq, d_output / tp]`, or
    /// `[..., seq, d_output]` with `gather_output`.
    ///
    /// # Panics
    ///
    /// When a collective fails (see [`mappings`](super::mappings)).
    pub fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        self.forward_with_bias(input, self.added_bias())
    }

    /// `X A` without the bias, and the bias for the caller to add (fused into what comes
    /// next): Megatron's `skip_bias_add` chosen per call.
    ///
    /// # Panics
    ///
    /// With `gather_output`, whose gathered output the bias slice does not fit.
    pub fn forward_skipping_bias<const D: usize>(
        &self,
        input: Tensor<B, D>,
    ) -> (Tensor<B, D>, Option<Tensor<B, 1>>) {
        assert!(
            !self.gather_output,
            "skipping the bias add of a gathered output is not supported"
        );
        (self.forward_with_bias(input, None), self.bias())
    }

    fn forward_with_bias<const D: usize>(
        &self,
        input: Tensor<B, D>,
        bias: Option<Tensor<B, 1>>,
    ) -> Tensor<B, D> {
        let input = if self.sequence_parallel {
            gather_from_sequence_parallel_region(input, &self.group, D - 2, true)
        } else {
            copy_to_tensor_parallel_region(input, &self.group)
        };
        let output = linear_param(input, &self.weight, bias);
        if self.gather_output {
            gather_from_tensor_parallel_region(output, &self.group)
        } else {
            output
        }
    }
}

impl<B: Backend> ColumnParallelLinear<B> {
    /// The bias, for a caller that set `skip_bias_add` to add it itself.
    pub fn bias(&self) -> Option<Tensor<B, 1>> {
        self.bias.as_ref().map(Param::val)
    }

    fn added_bias(&self) -> Option<Tensor<B, 1>> {
        (!self.skip_bias_add).then(|| self.bias()).flatten()
    }
}

/// Configuration of a [`RowParallelLinear`]: `Y = X A + b` with `A` split by rows and `X`
/// by columns, rank `i` computing `X_i A_i`, summed over the ranks, plus `b`.
#[derive(Config, Debug)]
pub struct RowParallelLinearConfig {
    /// Input features of the whole layer; each rank holds `d_input / tp` of them.
    pub d_input: usize,
    /// Output features.
    pub d_output: usize,
    /// Whether the layer has a bias (replicated on every rank, added after the sum).
    #[config(default = true)]
    pub bias: bool,
    /// The input is already split along its last dimension (the output of a
    /// column-parallel layer); otherwise the layer takes this rank's chunk of it.
    #[config(default = true)]
    pub input_is_parallel: bool,
    /// Reduce-scatter the output along the sequence dimension instead of all-reducing it
    /// (sequence parallelism). The bias gradient on each rank then covers only its
    /// sequence chunk: sum it over the tensor-parallel group before the optimizer step.
    #[config(default = false)]
    pub sequence_parallel: bool,
    /// Leave the bias out of the output, for the caller to fuse it later (read it with
    /// [`RowParallelLinear::bias`]).
    #[config(default = false)]
    pub skip_bias_add: bool,
    /// Initialization of the weight; the bias starts at zero.
    #[config(default = "ParamInit::Normal { std: 0.02 }")]
    pub init: ParamInit,
    /// Seed of the weight's values (the same full weight whatever the parallel layout).
    #[config(default = 0)]
    pub seed: u64,
}

/// A linear layer whose input features are split across the tensor-parallel ranks.
#[derive(Module, Debug)]
pub struct RowParallelLinear<B: Backend> {
    /// This rank's rows of the weight: `[d_input / tp, d_output]`.
    pub weight: Param<Tensor<B, 2>>,
    /// The bias, the same on every rank: `[d_output]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    group: Group,
    input_is_parallel: bool,
    sequence_parallel: bool,
    skip_bias_add: bool,
}

impl RowParallelLinearConfig {
    /// This rank's layer, initialized from [`init`](Self::init) and [`seed`](Self::seed).
    ///
    /// # Errors
    ///
    /// `InvalidConfig` when the tensor-parallel size does not divide `d_input`, or
    /// sequence parallelism is asked for with an input that is not parallel.
    pub fn init<B: Backend>(
        &self,
        group: &Group,
        device: &B::Device,
    ) -> Result<RowParallelLinear<B>> {
        let (start, height) = self.check(group)?;
        let full = [self.d_input, self.d_output];
        let weight = self
            .init
            .init_shard(full, 0, start, height, self.seed, device);
        let bias = self
            .bias
            .then(|| ParamInit::Zeros.init([self.d_output], 0, device));
        Ok(self.build(group, weight, bias))
    }

    /// This rank's layer, cut from the weights of the whole layer (`weight`:
    /// `[d_input, d_output]`, `bias`: `[d_output]`).
    ///
    /// # Errors
    ///
    /// As [`init`](Self::init), and when the shapes do not match the configuration.
    pub fn init_from_full<B: Backend>(
        &self,
        group: &Group,
        weight: TensorData,
        bias: Option<TensorData>,
        device: &B::Device,
    ) -> Result<RowParallelLinear<B>> {
        let (start, height) = self.check(group)?;
        let weight = full_tensor::<B, 2>(weight, [self.d_input, self.d_output], "weight", device)?
            .narrow(0, start, height);
        let bias = full_bias::<B>(self.bias, bias, self.d_output, device)?;
        Ok(self.build(group, weight, bias))
    }

    fn check(&self, group: &Group) -> Result<(usize, usize)> {
        if self.sequence_parallel && !self.input_is_parallel {
            return Err(Error::InvalidConfig(
                "a row-parallel layer with sequence parallelism needs input_is_parallel = true \
                 (its input comes split from a column-parallel layer)"
                    .to_string(),
            ));
        }
        partition(self.d_input, group, "input features")
    }

    fn build<B: Backend>(
        &self,
        group: &Group,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> RowParallelLinear<B> {
        RowParallelLinear {
            weight: Param::from_tensor(weight),
            bias: bias.map(Param::from_tensor),
            group: group.clone(),
            input_is_parallel: self.input_is_parallel,
            sequence_parallel: self.sequence_parallel,
            skip_bias_add: self.skip_bias_add,
        }
    }
}

impl<B: ParallelBackend> RowParallelLinear<B> {
    /// Applies the layer to `input`: `[..., seq, d_input / tp]` (or `[..., seq, d_input]`
    /// when the input is not parallel). Returns `[..., seq, d_output]`, or
    /// `[..., seq / tp, d_output]` with sequence parallelism.
    ///
    /// # Panics
    ///
    /// When a collective fails (see [`mappings`](super::mappings)).
    pub fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        let output = self.forward_skipping_bias(input).0;
        match self.bias() {
            Some(bias) if !self.skip_bias_add => output + bias.unsqueeze(),
            _ => output,
        }
    }

    /// `Σ_i X_i A_i` (reduced, or reduce-scattered with sequence parallelism) without the
    /// bias, and the bias for the caller to add (fused into what comes next): Megatron's
    /// `skip_bias_add` chosen per call.
    pub fn forward_skipping_bias<const D: usize>(
        &self,
        input: Tensor<B, D>,
    ) -> (Tensor<B, D>, Option<Tensor<B, 1>>) {
        let input = if self.input_is_parallel {
            input
        } else {
            scatter_to_tensor_parallel_region(input, &self.group)
        };
        let partial = linear_param(input, &self.weight, None);
        let output = if self.sequence_parallel {
            reduce_scatter_to_sequence_parallel_region(partial, &self.group, D - 2)
        } else {
            reduce_from_tensor_parallel_region(partial, &self.group)
        };
        (output, self.bias())
    }
}

impl<B: Backend> RowParallelLinear<B> {
    /// The bias, for a caller that set `skip_bias_add` to add it itself.
    pub fn bias(&self) -> Option<Tensor<B, 1>> {
        self.bias.as_ref().map(Param::val)
    }
}

/// This rank's `[start, start + len)` of `total` features split over the group.
pub(crate) fn partition(total: usize, group: &Group, what: &str) -> Result<(usize, usize)> {
    let size = group.size();
    if total == 0 || !total.is_multiple_of(size) {
        return Err(Error::InvalidConfig(format!(
            "tensor-parallel size {size} does not divide the {total} {what}; choose a size \
             that divides {total}"
        )));
    }
    let len = total / size;
    Ok((group.rank() * len, len))
}

/// A fresh tensor (no autodiff history shared with the caller) from `data`, checked
/// against the expected shape.
pub(crate) fn full_tensor<B: Backend, const D: usize>(
    data: TensorData,
    expected: [usize; D],
    what: &str,
    device: &B::Device,
) -> Result<Tensor<B, D>> {
    if data.shape.as_slice() != expected.as_slice() {
        return Err(Error::InvalidConfig(format!(
            "the full {what} has shape {:?} but the configuration needs {expected:?}",
            data.shape.as_slice()
        )));
    }
    Ok(Tensor::from_data(data, device))
}

fn full_bias<B: Backend>(
    has_bias: bool,
    bias: Option<TensorData>,
    d_output: usize,
    device: &B::Device,
) -> Result<Option<Tensor<B, 1>>> {
    match (has_bias, bias) {
        (true, Some(bias)) => full_tensor(bias, [d_output], "bias", device).map(Some),
        (false, None) => Ok(None),
        (true, None) => Err(Error::InvalidConfig(
            "the layer has a bias (bias = true) but no full bias was given".to_string(),
        )),
        (false, Some(_)) => Err(Error::InvalidConfig(
            "a full bias was given to a layer configured with bias = false".to_string(),
        )),
    }
}
