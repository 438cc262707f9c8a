//! The full (unsplit) parameters of a model chunk by canonical name: the shards of the
//! tensor-parallel ranks gathered, vocabulary padding removed. The inverse of building a
//! model from [`Weights::Full`](super::Weights::Full); and the same walk as checkpoints see
//! it (canonical name, full shape, split).

use burn::module::{Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use burn_megatron::Result;
use burn_megatron::parallel::ParallelBackend;
use burn_megatron::train::CheckpointParam;

use super::layers::Norm;
use super::model::GptModel;

/// How a parameter is split over the tensor-parallel ranks.
#[derive(Clone, Copy)]
enum Split {
    /// The same on every rank.
    Replicated,
    /// Concatenated along this dimension in rank order.
    Along(usize),
}

/// One parameter of a chunk under its canonical name.
struct Entry<B: Backend> {
    name: String,
    id: ParamId,
    /// The rank's part; vectors as one-row matrices.
    value: Tensor<B, 2>,
    vector: bool,
    split: Split,
    /// The last chunk's copy of tied embeddings (the first chunk's is the parameter).
    copy: bool,
}

impl<B: Backend> GptModel<B> {
    /// Every parameter of the chunk with its canonical name and split, in a fixed order.
    fn entries(&self) -> Vec<Entry<B>> {
        let mut out = Vec::new();
        let mut push = |name: String, param: (ParamId, Tensor<B, 2>, bool), split: Split| {
            let copy = name == "embedding" && !self.is_first_chunk();
            let (id, value, vector) = param;
            out.push(Entry {
                name,
                id,
                value,
                vector,
                split,
                copy,
            });
        };
        let matrix = |param: &Param<Tensor<B, 2>>| (param.id, param.val(), false);
        let row = |param: &Param<Tensor<B, 1>>| (param.id, param.val().unsqueeze::<2>(), true);
        let norm = |push: &mut dyn FnMut(String, (ParamId, Tensor<B, 2>, bool), Split),
                    name: &str,
                    norm: &Norm<B>| {
            push(
                format!("{name}.weight"),
                row(&norm.weight),
                Split::Replicated,
            );
            if let Some(bias) = &norm.bias {
                push(format!("{name}.bias"), row(bias), Split::Replicated);
            }
        };

        if let Some(embedding) = &self.embedding {
            push(
                "embedding".into(),
                matrix(&embedding.weight),
                Split::Along(0),
            );
        }
        if let Some(positions) = &self.positions {
            push("positions".into(), matrix(positions), Split::Replicated);
        }
        if let Some(embedding_norm) = &self.embedding_norm {
            norm(&mut push, "embedding_norm", embedding_norm);
        }
        for (offset, layer) in self.layers.iter().enumerate() {
            let name = format!("layers.{}", self.first_layer() + offset);
            norm(&mut push, &format!("{name}.norm1"), &layer.norm1);
            let attention = &layer.attention;
            let kv = if attention.kv_replicated() {
                Split::Replicated
            } else {
                Split::Along(1)
            };
            let projections = [
                ("query", &attention.query, Split::Along(1)),
                ("key", &attention.key, kv),
                ("value", &attention.value, kv),
            ];
            for (index, (what, weight, split)) in projections.into_iter().enumerate() {
                push(
                    format!("{name}.attention.{what}.weight"),
                    matrix(weight),
                    split,
                );
                if let Some(biases) = &attention.qkv_bias {
                    push(
                        format!("{name}.attention.{what}.bias"),
                        row(&biases[index]),
                        split,
                    );
                }
            }
            push(
                format!("{name}.attention.output.weight"),
                matrix(&attention.output.weight),
                Split::Along(0),
            );
            if let Some(bias) = &attention.output.bias {
                push(
                    format!("{name}.attention.output.bias"),
                    row(bias),
                    Split::Replicated,
                );
            }
            norm(&mut push, &format!("{name}.norm2"), &layer.norm2);
            let columns = std::iter::once(("fc1", &layer.mlp.fc1))
                .chain(layer.mlp.gate.as_ref().map(|gate| ("gate", gate)));
            for (what, column) in columns {
                push(
                    format!("{name}.mlp.{what}.weight"),
                    matrix(&column.weight),
                    Split::Along(1),
                );
                if let Some(bias) = &column.bias {
                    push(
                        format!("{name}.mlp.{what}.bias"),
                        row(bias),
                        Split::Along(1),
                    );
                }
            }
            push(
                format!("{name}.mlp.fc2.weight"),
                matrix(&layer.mlp.fc2.weight),
                Split::Along(0),
            );
            if let Some(bias) = &layer.mlp.fc2.bias {
                push(format!("{name}.mlp.fc2.bias"), row(bias), Split::Replicated);
            }
        }
        if let Some(final_norm) = &self.final_norm {
            norm(&mut push, "final_norm", final_norm);
        }
        if let Some(output) = &self.output {
            push(
                "output.weight".into(),
                matrix(&output.weight),
                Split::Along(1),
            );
        }
        out
    }

    /// The full shape of an entry (unpadded) from the rank's part.
    fn global_shape(&self, entry: &Entry<B>) -> Vec<usize> {
        let [rows, columns] = entry.value.dims();
        let tp = self.tensor_group().size();
        let vocab = self.vocab_partition().vocab_size;
        let mut shape = match entry.split {
            Split::Replicated => [rows, columns],
            Split::Along(0) => [rows * tp, columns],
            Split::Along(_) => [rows, columns * tp],
        };
        match entry.name.as_str() {
            "embedding" => shape[0] = vocab,
            "output.weight" => shape[1] = vocab,
            _ => {}
        }
        if entry.vector {
            vec![shape[1]]
        } else {
            shape.to_vec()
        }
    }

    /// Every parameter of the chunk as checkpoints see it: canonical name, full shape and
    /// how the rank's part is cut from it.
    pub fn checkpoint_params(&self) -> Vec<CheckpointParam> {
        self.entries()
            .iter()
            .map(|entry| CheckpointParam {
                id: entry.id,
                name: entry.name.clone(),
                split_dim: match (entry.split, entry.vector) {
                    (Split::Replicated, _) => None,
                    (Split::Along(_), true) => Some(0),
                    (Split::Along(dim), false) => Some(dim),
                },
                global_shape: self.global_shape(entry),
                copy: entry.copy,
            })
            .collect()
    }
}

impl<B: ParallelBackend> GptModel<B> {
    /// Every parameter this chunk owns, whole, by canonical name (see
    /// [`Weights`](super::Weights)), in a fixed order. The last chunk's copy of tied
    /// embeddings is left out: the first chunk's is the parameter. Every rank of the
    /// tensor-parallel group must call it (it gathers the shards).
    ///
    /// # Errors
    ///
    /// When a collective fails.
    pub fn full_parameters(&self) -> Result<Vec<(String, TensorData)>> {
        let group = self.tensor_group();
        let mut out = Vec::new();
        for entry in self.entries() {
            if entry.copy {
                continue;
            }
            let global = self.global_shape(&entry);
            let full = match entry.split {
                Split::Along(dim) if group.size() > 1 => group.all_gather(entry.value, dim)?,
                _ => entry.value,
            };
            // The vocabulary loses its padding.
            let full = match entry.name.as_str() {
                "embedding" => full.narrow(0, 0, global[0]),
                "output.weight" => full.narrow(1, 0, global[1]),
                _ => full,
            };
            let data = if entry.vector {
                full.flatten::<1>(0, 1).into_data()
            } else {
                full.into_data()
            };
            out.push((entry.name, data));
        }
        Ok(out)
    }
}
