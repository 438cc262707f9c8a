//! The GPT pretraining step: next-token cross-entropy over every token.

use std::collections::HashSet;

use burn::module::ParamId;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use burn_megatron::data::GptSample;
use burn_megatron::parallel::ParallelBackend;
use burn_megatron::train::{CheckpointParam, ParallelModel, Segment, StageOutput, TrainStep};

use super::model::{GptModel, StageInput};

/// Next-token cross-entropy, averaged over the micro-batch's tokens.
#[derive(Debug, Clone, Copy, Default)]
pub struct GptStep;

/// The `tokens` and `labels` of samples as `[batch, seq]` tensors.
///
/// # Panics
///
/// When the samples have different lengths.
pub fn batch_tensors<B: Backend>(
    samples: &[GptSample],
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    (
        stack_ids(samples, |s| &s.tokens, device),
        stack_ids(samples, |s| &s.labels, device),
    )
}

/// The ids `pick` gives of each sample (its tokens or labels) as a `[batch, seq]` tensor.
fn stack_ids<B: Backend>(
    samples: &[GptSample],
    pick: fn(&GptSample) -> &Vec<i64>,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let seq = samples.first().map_or(0, |s| pick(s).len());
    let values: Vec<i64> = samples
        .iter()
        .flat_map(|s| pick(s).iter().copied())
        .collect();
    assert_eq!(
        values.len(),
        samples.len() * seq,
        "samples of different lengths"
    );
    Tensor::from_data(TensorData::new(values, [samples.len(), seq]), device)
}

impl<B> TrainStep<B, GptModel<B>> for GptStep
where
    B: AutodiffBackend + ParallelBackend,
{
    fn forward(
        &self,
        model: &GptModel<B>,
        input: Option<Tensor<B, 3>>,
        samples: &[GptSample],
        device: &B::Device,
    ) -> StageOutput<B> {
        let output = model.forward_chunk(stage_input(input, samples, device), None);
        stage_output(model, output, model.is_last_chunk(), samples, device)
    }

    fn recompute_segments(&self, model: &GptModel<B>) -> Option<Vec<Segment>> {
        model.recompute_segments()
    }

    fn forward_segment(
        &self,
        model: &GptModel<B>,
        segment: usize,
        input: Option<Tensor<B, 3>>,
        samples: &[GptSample],
        device: &B::Device,
    ) -> StageOutput<B> {
        let output = model.forward_segment(segment, stage_input(input, samples, device), None);
        let last = model
            .recompute_segments()
            .is_some_and(|segments| segments.len() == segment + 1);
        stage_output(
            model,
            output,
            last && model.is_last_chunk(),
            samples,
            device,
        )
    }
}

/// What a chunk (or a segment of it) starts from: the activations `received`, or else the
/// samples' token ids (sent to the device only then: a segment runs several times a step).
fn stage_input<B: Backend>(
    received: Option<Tensor<B, 3>>,
    samples: &[GptSample],
    device: &B::Device,
) -> StageInput<B> {
    match received {
        Some(hidden) => StageInput::Hidden(hidden),
        None => StageInput::Tokens(stack_ids(samples, |s| &s.tokens, device)),
    }
}

/// The loss of the logits `output` against the samples' labels when it `gives_loss` (the
/// end of the last chunk), the activations `output` otherwise.
fn stage_output<B: ParallelBackend>(
    model: &GptModel<B>,
    output: Tensor<B, 3>,
    gives_loss: bool,
    samples: &[GptSample],
    device: &B::Device,
) -> StageOutput<B> {
    if !gives_loss {
        return StageOutput::Activations(output);
    }
    let labels = stack_ids(samples, |s| &s.labels, device);
    let mask = Tensor::ones(labels.dims(), device);
    StageOutput::Loss(model.loss_from_logits(output, labels, mask))
}

impl<B: Backend> ParallelModel for GptModel<B> {
    fn sequence_parallel_params(&self) -> HashSet<ParamId> {
        GptModel::sequence_parallel_params(self)
    }

    fn tensor_parallel_params(&self) -> HashSet<ParamId> {
        GptModel::tensor_parallel_params(self)
    }

    fn shared_embedding_params(&self) -> HashSet<ParamId> {
        GptModel::shared_embedding_params(self)
    }

    fn activation_shape(&self, batch: usize, seq: usize) -> [usize; 3] {
        GptModel::activation_shape(self, batch, seq)
    }

    fn set_training(&self, training: bool) {
        GptModel::set_training(self, training);
    }

    fn checkpoint_params(&self) -> Vec<CheckpointParam> {
        GptModel::checkpoint_params(self)
    }

    fn random_state(&self) -> u64 {
        self.dropout_passes()
    }

    fn set_random_state(&self, state: u64) {
        self.set_dropout_passes(state);
    }
}
