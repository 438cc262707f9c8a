//! [`LayerSplit`]: which transformer layers each pipeline stage and model chunk holds.

use std::ops::Range;

use crate::parallel::Layout;
use crate::{Error, Result};

/// The layers of a model divided over `stages x chunks` virtual pipeline stages.
///
/// Virtual stage `chunk * stages + stage` is model chunk `chunk` of pipeline stage
/// `stage`: with interleaving, a stage holds every `stages`-th slice of the model, so
/// activations go round the pipeline `chunks` times (Megatron's assignment). Without
/// interleaving (one chunk) virtual and pipeline stages are the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSplit {
    /// Layers of each virtual stage, in virtual-stage order.
    counts: Vec<usize>,
    stages: usize,
    chunks: usize,
}

/// One model chunk: the part of the model one rank runs as one virtual stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelChunk {
    /// Pipeline stage (rank in the pipeline group).
    pub stage: usize,
    /// Chunk of that stage (0 without interleaving).
    pub chunk: usize,
    /// Position along the whole pipeline: `chunk * stages + stage`.
    pub virtual_stage: usize,
    /// The transformer layers, by global index.
    pub layers: Range<usize>,
    /// Holds the embeddings (the first virtual stage).
    pub first: bool,
    /// Holds the final norm, output layer and loss (the last virtual stage).
    pub last: bool,
}

impl LayerSplit {
    /// `layers` split evenly over the layout's stages and chunks, or as `explicit` gives
    /// (layers per virtual stage, in virtual-stage order).
    ///
    /// # Errors
    ///
    /// `InvalidLayout` when the even split does not divide, or the explicit list has the
    /// wrong length or total.
    pub fn new(layers: usize, layout: &Layout, explicit: Option<&[usize]>) -> Result<Self> {
        let (stages, chunks) = (layout.pipeline(), layout.virtual_pipeline());
        let virtual_stages = stages * chunks;
        let counts = match explicit {
            Some(counts) => {
                if counts.len() != virtual_stages || counts.iter().sum::<usize>() != layers {
                    return Err(Error::InvalidLayout(format!(
                        "--pipeline-layers {counts:?} must give the layers of each of the \
                         {virtual_stages} virtual stages (pipeline-parallel size {stages} x \
                         virtual stages {chunks}) and add up to the {layers} layers"
                    )));
                }
                counts.to_vec()
            }
            None => {
                if layers == 0 || !layers.is_multiple_of(virtual_stages) {
                    return Err(Error::InvalidLayout(format!(
                        "{layers} layers do not split evenly into pipeline-parallel size \
                         {stages} x virtual stages {chunks} = {virtual_stages} model chunks; \
                         choose sizes whose product divides {layers}, or list the layers of \
                         each stage with --pipeline-layers"
                    )));
                }
                vec![layers / virtual_stages; virtual_stages]
            }
        };
        Ok(Self {
            counts,
            stages,
            chunks,
        })
    }

    /// Pipeline stages.
    pub fn stages(&self) -> usize {
        self.stages
    }

    /// Model chunks per stage.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// Chunk `chunk` of pipeline stage `stage`.
    ///
    /// # Panics
    ///
    /// When `stage` or `chunk` is out of range.
    pub fn chunk(&self, stage: usize, chunk: usize) -> ModelChunk {
        assert!(
            stage < self.stages && chunk < self.chunks,
            "stage {stage} chunk {chunk} is outside {} stages x {} chunks",
            self.stages,
            self.chunks
        );
        let virtual_stage = chunk * self.stages + stage;
        let start: usize = self.counts[..virtual_stage].iter().sum();
        ModelChunk {
            stage,
            chunk,
            virtual_stage,
            layers: start..start + self.counts[virtual_stage],
            first: virtual_stage == 0,
            last: virtual_stage + 1 == self.counts.len(),
        }
    }

    /// The chunks of pipeline stage `stage`, in chunk order.
    pub fn chunks_of(&self, stage: usize) -> Vec<ModelChunk> {
        (0..self.chunks).map(|c| self.chunk(stage, c)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_chunks_take_every_stages_th_slice() {
        let layout = Layout::new(1, 2, 1)
            .unwrap()
            .with_virtual_pipeline(2)
            .unwrap();
        let split = LayerSplit::new(8, &layout, None).unwrap();
        let layers: Vec<_> = split.chunks_of(0).into_iter().map(|c| c.layers).collect();
        assert_eq!(layers, vec![0..2, 4..6]);
        let last = split.chunk(1, 1);
        assert_eq!((last.layers, last.first, last.last), (6..8, false, true));
        assert!(split.chunk(0, 0).first);
    }

    #[test]
    fn explicit_lists_are_checked() {
        let layout = Layout::new(1, 2, 1).unwrap();
        let split = LayerSplit::new(5, &layout, Some(&[2, 3])).unwrap();
        assert_eq!(split.chunk(1, 0).layers, 2..5);
        let error = LayerSplit::new(5, &layout, Some(&[2, 2])).unwrap_err();
        assert!(
            error.to_string().contains("add up to the 5 layers"),
            "{error}"
        );
        let error = LayerSplit::new(5, &layout, None).unwrap_err();
        assert!(error.to_string().contains("--pipeline-layers"), "{error}");
    }
}
