//! The full (unsplit) parameters of a model chunk by canonical name: the shards of the
//! tensor-parallel ranks gathered, vocabulary padding removed. The inverse of building a
//! model from [`Weights::Full`](super::Weights::Full).

use burn::module::Param;
use burn::tensor::{Tensor, TensorData};
use burn_megatron::Result;
use burn_megatron::parallel::ParallelBackend;

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
        let mut out = Vec::new();
        let vocab = self.vocab_partition().vocab_size;
        let group = self.tensor_group();
        let mut push = |name: String, tensor: Tensor<B, 2>, split: Split| -> Result<()> {
            let full = match split {
                Split::Along(dim) if group.size() > 1 => group.all_gather(tensor, dim)?,
                _ => tensor,
            };
            // Vectors travel as one-row matrices; the vocabulary loses its padding.
            let full = match name.as_str() {
                "embedding" => full.narrow(0, 0, vocab),
                "output.weight" => full.narrow(1, 0, vocab),
                _ => full,
            };
            let data = if name.ends_with(".bias") || is_norm_weight(&name) {
                full.flatten::<1>(0, 1).into_data()
            } else {
                full.into_data()
            };
            out.push((name, data));
            Ok(())
        };
        let row = |param: &Param<Tensor<B, 1>>| param.val().unsqueeze::<2>();
        let norm = |push: &mut dyn FnMut(String, Tensor<B, 2>, Split) -> Result<()>,
                    name: &str,
                    norm: &Norm<B>| {
            push(
                format!("{name}.weight"),
                row(&norm.weight),
                Split::Replicated,
            )?;
            if let Some(bias) = &norm.bias {
                push(format!("{name}.bias"), row(bias), Split::Replicated)?;
            }
            Ok::<_, burn_megatron::Error>(())
        };

        if let (Some(embedding), true) = (&self.embedding, self.is_first_chunk()) {
            push("embedding".into(), embedding.weight.val(), Split::Along(0))?;
        }
        if let Some(positions) = &self.positions {
            push("positions".into(), positions.val(), Split::Replicated)?;
        }
        if let Some(embedding_norm) = &self.embedding_norm {
            norm(&mut push, "embedding_norm", embedding_norm)?;
        }
        for (offset, layer) in self.layers.iter().enumerate() {
            let name = format!("layers.{}", self.first_layer() + offset);
            norm(&mut push, &format!("{name}.norm1"), &layer.norm1)?;
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
                    weight.val(),
                    split,
                )?;
                if let Some(biases) = &attention.qkv_bias {
                    push(
                        format!("{name}.attention.{what}.bias"),
                        row(&biases[index]),
                        split,
                    )?;
                }
            }
            push(
                format!("{name}.attention.output.weight"),
                attention.output.weight.val(),
                Split::Along(0),
            )?;
            if let Some(bias) = &attention.output.bias {
                push(
                    format!("{name}.attention.output.bias"),
                    row(bias),
                    Split::Replicated,
                )?;
            }
            norm(&mut push, &format!("{name}.norm2"), &layer.norm2)?;
            let columns = std::iter::once(("fc1", &layer.mlp.fc1))
                .chain(layer.mlp.gate.as_ref().map(|gate| ("gate", gate)));
            for (what, column) in columns {
                push(
                    format!("{name}.mlp.{what}.weight"),
                    column.weight.val(),
                    Split::Along(1),
                )?;
                if let Some(bias) = &column.bias {
                    push(
                        format!("{name}.mlp.{what}.bias"),
                        row(bias),
                        Split::Along(1),
                    )?;
                }
            }
            push(
                format!("{name}.mlp.fc2.weight"),
                layer.mlp.fc2.weight.val(),
                Split::Along(0),
            )?;
            if let Some(bias) = &layer.mlp.fc2.bias {
                push(format!("{name}.mlp.fc2.bias"), row(bias), Split::Replicated)?;
            }
        }
        if let Some(final_norm) = &self.final_norm {
            norm(&mut push, "final_norm", final_norm)?;
        }
        if let Some(output) = &self.output {
            push("output.weight".into(), output.weight.val(), Split::Along(1))?;
        }
        Ok(out)
    }
}

fn is_norm_weight(name: &str) -> bool {
    [
        "norm1.weight",
        "norm2.weight",
        "final_norm.weight",
        "embedding_norm.weight",
    ]
    .iter()
    .any(|suffix| name.ends_with(suffix))
}
