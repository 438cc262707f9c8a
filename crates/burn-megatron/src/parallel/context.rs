//! [`ParallelContext`]: one rank's view of the job.

use super::{Group, Layout, LocalWorld, RankCoords};

/// One rank's place in the job: its layout coordinates and its process groups.
///
/// Layers take the groups they need from here (`ctx.tensor()` for tensor parallelism).
#[derive(Debug, Clone)]
pub struct ParallelContext {
    layout: Layout,
    rank: usize,
    tensor: Group,
    data: Group,
    pipeline: Group,
    pipeline_gradients: Group,
    embedding: Option<Group>,
    world: Group,
}

impl ParallelContext {
    /// Builds the context of `rank`, making each group with `make_group(name, members)`.
    ///
    /// Every rank must call this, so that each group is made by all of its members.
    pub fn new(
        layout: Layout,
        rank: usize,
        mut make_group: impl FnMut(&str, Vec<usize>) -> Group,
    ) -> Self {
        let embedding_members = layout.embedding_group(rank);
        Self {
            layout,
            rank,
            tensor: make_group("tp", layout.tensor_group(rank)),
            data: make_group("dp", layout.data_group(rank)),
            pipeline: make_group("pp", layout.pipeline_group(rank)),
            pipeline_gradients: make_group("pp-grad", layout.pipeline_group(rank)),
            embedding: (!embedding_members.is_empty())
                .then(|| make_group("embedding", embedding_members)),
            world: make_group("world", (0..layout.world_size()).collect()),
        }
    }

    /// The context of `rank` in a job of thread ranks.
    pub fn local(layout: Layout, rank: usize, world: &LocalWorld) -> Self {
        Self::new(layout, rank, |name, members| {
            world.group(name, members, rank)
        })
    }

    /// A job of one rank: every group has just this rank.
    pub fn single() -> Self {
        let layout = Layout::new(1, 1, 1).expect("sizes of 1 are valid");
        Self::local(layout, 0, &LocalWorld::new(1, super::DEFAULT_TIMEOUT))
    }

    /// The job's layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// This rank's global rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// This rank's tensor-, data- and pipeline-parallel coordinates.
    pub fn coords(&self) -> RankCoords {
        self.layout.coords(self.rank)
    }

    /// The tensor-parallel group.
    pub fn tensor(&self) -> &Group {
        &self.tensor
    }

    /// The data-parallel group.
    pub fn data(&self) -> &Group {
        &self.data
    }

    /// The pipeline group (this rank's counterparts on every stage), which carries
    /// activations forward between stages.
    pub fn pipeline(&self) -> &Group {
        &self.pipeline
    }

    /// The pipeline group's members again, for the gradients that go backward between
    /// stages: a channel of its own, so that activations and gradients between the same
    /// two stages (interleaved schedules) never queue behind one another.
    pub fn pipeline_gradients(&self) -> &Group {
        &self.pipeline_gradients
    }

    /// The embedding group (first and last stage), or `None` on a middle stage.
    pub fn embedding(&self) -> Option<&Group> {
        self.embedding.as_ref()
    }

    /// All ranks of the job.
    pub fn world(&self) -> &Group {
        &self.world
    }

    /// This context with every group replaced by `map(group)`, in a fixed order (tensor,
    /// data, pipeline, pipeline gradients, embedding, world) that is the same on every
    /// rank, so that groups whose setup is itself collective are set up in step.
    ///
    /// # Errors
    ///
    /// The first error of `map`.
    pub fn map_groups(
        &self,
        mut map: impl FnMut(&Group) -> crate::Result<Group>,
    ) -> crate::Result<Self> {
        Ok(Self {
            layout: self.layout,
            rank: self.rank,
            tensor: map(&self.tensor)?,
            data: map(&self.data)?,
            pipeline: map(&self.pipeline)?,
            pipeline_gradients: map(&self.pipeline_gradients)?,
            embedding: self.embedding.as_ref().map(&mut map).transpose()?,
            world: map(&self.world)?,
        })
    }
}
