//! Megatron's optimizer: gradients accumulated into contiguous fp32 buffers ("main
//! grads"), reduced over the data-parallel group bucket by bucket, and AdamW on fp32
//! master weights, either whole on every rank or sharded over the data-parallel ranks
//! (the distributed optimizer: reduce-scatter, update this rank's shard, all-gather).
//!
//! Every parameter of a rank's model chunks has a slot in one flat layout (chunks in
//! order, parameters in module order). The layout is padded to a multiple of the
//! data-parallel size and cut into buckets whose lengths are multiples of it, so that
//! each bucket splits into one equal shard per data-parallel rank.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData};
use burn_megatron_kernels::{AdamWState, AdamWStep, FusedKernels, with_dtype};

use crate::Result;
use crate::checkpoint::{ScalerState, StateKind};
use crate::ops::{WeightGrads, holds};
use crate::parallel::{Group, ParallelBackend, ReduceOp};

/// AdamW settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWSettings {
    /// Beta 1.
    pub beta1: f64,
    /// Beta 2.
    pub beta2: f64,
    /// Epsilon.
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices (not to biases, norms or other
    /// vectors, as in Megatron).
    pub weight_decay: f64,
}

/// What the optimizer must know about one parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamRole {
    /// Its gradient is a partial sum over the tensor-parallel group (sequence parallel).
    pub sequence_parallel: bool,
    /// It has a copy on another pipeline stage whose gradient must be added (tied
    /// embeddings over the embedding group).
    pub shared_embedding: bool,
    /// It counts in the global gradient norm on this rank (each element of the model
    /// is counted on exactly one rank of the tensor- and pipeline-parallel groups).
    pub counted_in_norm: bool,
}

/// One parameter's place in the flat buffers.
#[derive(Debug, Clone)]
struct Slot {
    id: ParamId,
    chunk: usize,
    shape: Vec<usize>,
    range: Range<usize>,
    role: ParamRole,
}

/// Where every parameter of a rank's model chunks lives in the flat buffers, and the
/// buckets the buffers are reduced in.
#[derive(Debug, Clone)]
pub struct FlatLayout {
    slots: Vec<Slot>,
    padded: usize,
    buckets: Vec<Range<usize>>,
    shards: usize,
}

impl FlatLayout {
    /// The layout of `chunks`' parameters for `shards` data-parallel ranks, in buckets of
    /// about `bucket_size` elements; `role` tells each parameter's role.
    pub fn new<B: Backend, M: burn::module::Module<B>>(
        chunks: &[M],
        shards: usize,
        bucket_size: usize,
        mut role: impl FnMut(usize, ParamId, usize) -> ParamRole,
    ) -> Self {
        let mut slots = Vec::new();
        let mut offset = 0;
        for (chunk, module) in chunks.iter().enumerate() {
            let mut shapes = Vec::new();
            module.visit(&mut CollectShapes::<B> {
                shapes: &mut shapes,
                _backend: std::marker::PhantomData,
            });
            for (id, shape) in shapes {
                let numel: usize = shape.iter().product();
                slots.push(Slot {
                    id,
                    chunk,
                    role: role(chunk, id, shape.len()),
                    shape,
                    range: offset..offset + numel,
                });
                offset += numel;
            }
        }
        let shards = shards.max(1);
        let padded = offset.div_ceil(shards).max(1) * shards;
        let bucket = bucket_size.max(1).div_ceil(shards) * shards;
        let buckets = (0..padded)
            .step_by(bucket)
            .map(|start| start..(start + bucket).min(padded))
            .collect();
        Self {
            slots,
            padded,
            buckets,
            shards,
        }
    }

    /// Elements of the model chunks' parameters.
    pub fn numel(&self) -> usize {
        self.slots.last().map_or(0, |slot| slot.range.end)
    }

    /// Elements of the padded flat buffer.
    pub fn padded_len(&self) -> usize {
        self.padded
    }

    /// The buckets, as ranges of the padded buffer.
    pub fn buckets(&self) -> &[Range<usize>] {
        &self.buckets
    }

    /// Elements of one data-parallel rank's shard (the sum of its part of each bucket).
    pub fn shard_len(&self) -> usize {
        self.padded / self.shards
    }

    /// The optimizer memory of one rank: fp32 master weights and the two Adam moments
    /// for its elements (all of them, or its shard with the distributed optimizer), and
    /// fp32 main grads for every element.
    pub fn memory(&self, distributed: bool) -> OptimizerMemory {
        let owned = if distributed {
            self.shard_len()
        } else {
            self.padded
        };
        OptimizerMemory {
            parameters: self.numel(),
            master_bytes: 4 * owned,
            moment_bytes: 8 * owned,
            main_grad_bytes: 4 * self.padded,
        }
    }

    /// Where rank `shard`'s buffer lies in the full flat buffer: for each bucket, the
    /// full range of its shard and where that starts in the rank's buffer.
    fn local_ranges(&self, shard: usize) -> Vec<(Range<usize>, usize)> {
        let mut local_start = 0;
        self.buckets
            .iter()
            .map(|bucket| {
                let len = bucket.len() / self.shards;
                let start = bucket.start + shard * len;
                let range = (start..start + len, local_start);
                local_start += len;
                range
            })
            .collect()
    }

    /// Rank `shard`'s part of a full flat buffer: its shard of every bucket, in order.
    fn local<B: Backend>(&self, full: Tensor<B, 1>, shard: usize) -> Tensor<B, 1> {
        let parts = self
            .buckets
            .iter()
            .map(|bucket| {
                let len = bucket.len() / self.shards;
                full.clone()
                    .slice(bucket.start + shard * len..bucket.start + (shard + 1) * len)
            })
            .collect();
        Tensor::cat(parts, 0)
    }
}

/// Bytes the optimizer holds on one rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptimizerMemory {
    /// Parameters of the rank's model chunks.
    pub parameters: usize,
    /// fp32 master weights.
    pub master_bytes: usize,
    /// fp32 Adam first and second moments.
    pub moment_bytes: usize,
    /// fp32 main-grad buffers.
    pub main_grad_bytes: usize,
}

impl fmt::Display for OptimizerMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |bytes: usize| bytes as f64 / (1u64 << 20) as f64;
        write!(
            f,
            "optimizer memory per rank: master weights {:.1} MiB, Adam moments {:.1} MiB, main \
             grads {:.1} MiB ({:.2} + {:.2} bytes per parameter of the rank's {} parameters)",
            mib(self.master_bytes),
            mib(self.moment_bytes),
            mib(self.main_grad_bytes),
            (self.master_bytes + self.moment_bytes) as f64 / self.parameters.max(1) as f64,
            self.main_grad_bytes as f64 / self.parameters.max(1) as f64,
            self.parameters
        )
    }
}

/// The fp32 main-grad buffers of a step: one flat buffer per model chunk, into which
/// every micro-batch's parameter gradients are added, and the weight gradients that
/// gradient-accumulation fusion accumulated outside the graph (see
/// [`ops::begin_weight_grads`](crate::ops::begin_weight_grads)).
pub(crate) struct MainGrads<B: Backend> {
    chunks: Vec<ChunkGrads<B>>,
}

/// One model chunk's gradients: the ones from the graph, concatenated in module order and
/// summed over micro-batches, and which parameters the accumulators hold instead.
struct ChunkGrads<B: Backend> {
    sum: Option<Tensor<B, 1>>,
    /// Every parameter in module order: id, elements, held by the accumulators.
    params: Vec<(ParamId, usize, bool)>,
}

impl<B: FusedKernels> MainGrads<B> {
    /// Empty buffers for `chunks` model chunks.
    pub fn new(chunks: usize) -> Self {
        Self {
            chunks: (0..chunks)
                .map(|_| ChunkGrads {
                    sum: None,
                    params: Vec::new(),
                })
                .collect(),
        }
    }

    /// Adds one micro-batch's gradients of chunk `chunk` (`module`) to its buffer.
    pub fn add<AB, M>(&mut self, chunk: usize, module: &M, mut grads: GradientsParams)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let mut parts = Vec::new();
        let mut params = Vec::new();
        module.visit(&mut FlattenGrads::<AB> {
            grads: &mut grads,
            parts: &mut parts,
            params: &mut params,
        });
        let slot = &mut self.chunks[chunk];
        slot.params = params;
        if parts.is_empty() {
            return;
        }
        slot.sum = Some(B::flatten_into(parts, slot.sum.take()));
    }

    /// Each chunk's flat fp32 gradients in module order (`None`: no gradients), the
    /// accumulated weight gradients `fused` put in their parameters' places.
    fn into_flat(self, mut fused: WeightGrads<B>) -> Vec<Option<Tensor<B, 1>>> {
        self.chunks
            .into_iter()
            .map(|chunk| {
                if !chunk.params.iter().any(|&(_, _, held)| held) {
                    return chunk.sum;
                }
                let mut offset = 0;
                let parts = chunk.params.iter().map(|&(id, len, held)| {
                    if held {
                        let grad = fused.remove(&id).expect("a held weight gradient");
                        grad.reshape([len])
                    } else {
                        let sum = chunk.sum.clone().expect("the graph's gradients");
                        offset += len;
                        sum.slice(offset - len..offset)
                    }
                });
                Some(B::flatten_into(parts.collect(), None))
            })
            .collect()
    }
}

/// AdamW on flat fp32 master weights, whole or sharded over the data-parallel group.
pub(crate) struct FlatAdamW<B: Backend> {
    layout: FlatLayout,
    settings: AdamWSettings,
    distributed: bool,
    /// Master weights and moments (this rank's shard with the distributed optimizer);
    /// `None` only while a step updates them in place.
    state: Option<AdamWState<B>>,
    decay: Tensor<B, 1>,
    /// 1 for the elements this rank counts in the gradient norm, else 0; `None` when it
    /// counts every parameter's (padding is zero in the gradients), so no mask is applied.
    counted: Option<Tensor<B, 1>>,
    steps: i32,
}

/// What reducing a step's gradients gives: this rank's part of them and its
/// contribution to the squared global norm.
pub(crate) struct ReducedGrads<B: Backend> {
    grads: Tensor<B, 1>,
    /// Sum of squares of the gradient elements this rank counts. Every element of the
    /// model is counted on exactly one rank (and an infinite or NaN one poisons the sum
    /// even where it is masked out), so the gradients overflowed somewhere exactly when
    /// this is not finite on some rank.
    pub norm_squared: f64,
}

impl<B: ParallelBackend> FlatAdamW<B> {
    /// The optimizer of `chunks`, its master weights copied from their parameters.
    pub fn new<AB, M>(
        layout: FlatLayout,
        chunks: &[M],
        settings: AdamWSettings,
        distributed: bool,
        data: &Group,
        device: &B::Device,
    ) -> Self
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let mut parts = Vec::new();
        for chunk in chunks {
            chunk.visit(&mut FlattenParams::<AB> { parts: &mut parts });
        }
        let shard = data.rank();
        let local = |full: Tensor<B, 1>| match distributed {
            true => layout.local(full, shard),
            false => full,
        };
        let vector = |value: &dyn Fn(&Slot) -> f32| {
            let mut values = vec![0f32; layout.padded];
            for slot in &layout.slots {
                values[slot.range.clone()].fill(value(slot));
            }
            local(fp32(values, device))
        };
        let master = local(pad(parts, layout.padded, device));
        let decay = vector(&|slot| f32::from(u8::from(slot.shape.len() >= 2)));
        let counts_all = layout.slots.iter().all(|slot| slot.role.counted_in_norm);
        let counted =
            (!counts_all).then(|| vector(&|slot| f32::from(u8::from(slot.role.counted_in_norm))));
        Self {
            state: Some(AdamWState {
                exp_avg: master.zeros_like(),
                exp_avg_sq: master.zeros_like(),
                master,
            }),
            decay,
            counted,
            layout,
            settings,
            distributed,
            steps: 0,
        }
    }

    /// The memory this optimizer holds.
    pub fn memory(&self) -> OptimizerMemory {
        self.layout.memory(self.distributed)
    }

    /// Elements of the full flat buffers (padded).
    pub fn padded_len(&self) -> usize {
        self.layout.padded
    }

    /// Steps taken (Adam's bias correction).
    pub fn steps(&self) -> u64 {
        self.steps as u64
    }

    /// Every parameter's id, shape and range in the full flat buffer.
    pub fn slots(&self) -> impl Iterator<Item = (ParamId, &[usize], Range<usize>)> {
        self.layout
            .slots
            .iter()
            .map(|slot| (slot.id, slot.shape.as_slice(), slot.range.clone()))
    }

    /// The elements of the optimizer state this rank holds (data-parallel rank
    /// `shard`), per parameter: `(id, kind, first element within the flattened
    /// parameter, values)`.
    pub fn state_pieces(&self, shard: usize) -> Vec<(ParamId, StateKind, usize, Vec<f32>)> {
        let ranges = match self.distributed {
            true => self.layout.local_ranges(shard),
            false => vec![(0..self.layout.padded, 0)],
        };
        let host = |tensor: &Tensor<B, 1>| -> Vec<f32> {
            tensor
                .clone()
                .into_data()
                .convert::<f32>()
                .into_vec()
                .expect("f32 optimizer state")
        };
        let state = self.state();
        let states = [
            (StateKind::Master, host(&state.master)),
            (StateKind::ExpAvg, host(&state.exp_avg)),
            (StateKind::ExpAvgSq, host(&state.exp_avg_sq)),
        ];
        let mut pieces = Vec::new();
        for slot in &self.layout.slots {
            for (full, local_start) in &ranges {
                let start = slot.range.start.max(full.start);
                let end = slot.range.end.min(full.end);
                if start >= end {
                    continue;
                }
                let at = local_start + (start - full.start);
                for (kind, values) in &states {
                    pieces.push((
                        slot.id,
                        *kind,
                        start - slot.range.start,
                        values[at..at + (end - start)].to_vec(),
                    ));
                }
            }
        }
        pieces
    }

    /// Replaces the state with full flat buffers (`[master, exp_avg, exp_avg_sq]`, each
    /// of the padded length) after `steps` steps, and writes the master weights into
    /// `chunks`' parameters.
    pub fn restore<AB, M>(
        &mut self,
        full: [Vec<f32>; 3],
        steps: u64,
        chunks: Vec<M>,
        shard: usize,
        device: &B::Device,
    ) -> Vec<M>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let [master, exp_avg, exp_avg_sq] = full.map(|values| {
            debug_assert_eq!(values.len(), self.layout.padded);
            fp32(values, device)
        });
        let local = |full: &Tensor<B, 1>| match self.distributed {
            true => self.layout.local(full.clone(), shard),
            false => full.clone(),
        };
        self.state = Some(AdamWState {
            master: local(&master),
            exp_avg: local(&exp_avg),
            exp_avg_sq: local(&exp_avg_sq),
        });
        self.steps = steps as i32;
        self.write_params(chunks, &master)
    }

    /// Sums partial gradients over the tensor-parallel group (sequence-parallel
    /// parameters) and the embedding group (tied embeddings), then averages over the
    /// data-parallel group bucket by bucket: all-reduce, or reduce-scatter to this rank's
    /// shard with the distributed optimizer. `scale` divides the gradients first (the
    /// loss scale).
    pub fn reduce(
        &self,
        main_grads: MainGrads<B>,
        fused: WeightGrads<B>,
        groups: &ReduceGroups<'_>,
        scale: f64,
        device: &B::Device,
    ) -> Result<ReducedGrads<B>> {
        let parts = main_grads
            .into_flat(fused)
            .into_iter()
            .zip(self.chunk_lengths())
            .map(|(grads, len)| grads.unwrap_or_else(|| Tensor::zeros([len], (device, DType::F32))))
            .collect();
        let mut flat = pad(parts, self.layout.padded, device);
        if scale != 1.0 {
            flat = flat / scale;
        }
        // One all-reduce for all sequence-parallel slots (norms and row-parallel biases:
        // many small vectors), then one for the shared embedding.
        let sequence_parallel = |slot: &Slot| slot.role.sequence_parallel;
        if groups.tensor.size() > 1 {
            flat = sum_slots(flat, &self.layout.slots, sequence_parallel, groups.tensor)?;
        }
        if let Some(embedding) = groups.embedding
            && embedding.size() > 1
        {
            let shared = |slot: &Slot| slot.role.shared_embedding;
            flat = sum_slots(flat, &self.layout.slots, shared, embedding)?;
        }
        let data = groups.data;
        // Without data parallelism the buckets would be cut out and put back unchanged.
        let grads = if data.size() == 1 {
            flat
        } else {
            let buckets = self.layout.buckets.iter().map(|bucket| {
                let part = flat.clone().slice(bucket.clone());
                if self.distributed {
                    data.reduce_scatter(part, 0, ReduceOp::Mean)
                } else {
                    data.all_reduce(part, ReduceOp::Mean)
                }
            });
            Tensor::cat(buckets.collect::<Result<Vec<_>>>()?, 0)
        };
        let norm_squared = B::sum_of_squares(&grads, self.counted.as_ref());
        Ok(ReducedGrads {
            grads,
            norm_squared,
        })
    }

    /// One AdamW step with learning rate `lr` on gradients multiplied by `factor`
    /// (clipping), then the new parameters written into `chunks` (gathered from every
    /// rank's shard with the distributed optimizer).
    pub fn step<AB, M>(
        &mut self,
        reduced: ReducedGrads<B>,
        factor: f64,
        lr: f64,
        chunks: Vec<M>,
        data: &Group,
    ) -> Result<Vec<M>>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let AdamWSettings {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.settings;
        self.steps += 1;
        let step = AdamWStep {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            grad_factor: factor,
            step: self.steps,
        };
        let state = self
            .state
            .take()
            .expect("the optimizer state between steps");
        let state = self
            .state
            .insert(B::adamw(state, reduced.grads, self.decay.clone(), step));
        let master = state.master.clone();

        let full = if self.distributed && data.size() > 1 {
            let mut offset = 0;
            let mut buckets = Vec::with_capacity(self.layout.buckets.len());
            for bucket in &self.layout.buckets {
                let len = bucket.len() / self.layout.shards;
                let part = master.clone().slice(offset..offset + len);
                buckets.push(data.all_gather(part, 0)?);
                offset += len;
            }
            Tensor::cat(buckets, 0)
        } else {
            master
        };
        Ok(self.write_params(chunks, &full))
    }

    /// Master weights and moments.
    fn state(&self) -> &AdamWState<B> {
        self.state
            .as_ref()
            .expect("the optimizer state, present between steps")
    }

    /// `chunks` with their parameters taken from the full flat buffer `full`.
    fn write_params<AB, M>(&self, chunks: Vec<M>, full: &Tensor<B, 1>) -> Vec<M>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        // One cast of the whole buffer per parameter type (one kernel instead of one per
        // parameter); the parameters are views of it, which keep it alive together.
        let mut cast = HashMap::new();
        chunks
            .into_iter()
            .enumerate()
            .map(|(index, chunk)| {
                let slots = self.layout.slots.iter().filter(|slot| slot.chunk == index);
                chunk.map(&mut WriteParams::<AB> {
                    slots: slots.collect(),
                    next: 0,
                    full,
                    cast: &mut cast,
                })
            })
            .collect()
    }

    /// Elements of each chunk's parameters.
    fn chunk_lengths(&self) -> Vec<usize> {
        let chunks = self.layout.slots.last().map_or(0, |slot| slot.chunk + 1);
        let mut lengths = vec![0; chunks.max(1)];
        for slot in &self.layout.slots {
            lengths[slot.chunk] += slot.range.len();
        }
        lengths
    }
}

/// The groups gradients are reduced over.
pub(crate) struct ReduceGroups<'a> {
    pub tensor: &'a Group,
    pub data: &'a Group,
    pub embedding: Option<&'a Group>,
}

/// `flat` with the slots that `select` picks summed over `group`, in one all-reduce.
fn sum_slots<B: ParallelBackend>(
    mut flat: Tensor<B, 1>,
    slots: &[Slot],
    select: impl Fn(&Slot) -> bool,
    group: &Group,
) -> Result<Tensor<B, 1>> {
    let picked: Vec<&Slot> = slots.iter().filter(|slot| select(slot)).collect();
    if picked.is_empty() {
        return Ok(flat);
    }
    let parts = picked
        .iter()
        .map(|slot| flat.clone().slice(slot.range.clone()))
        .collect();
    let summed = group.all_reduce(Tensor::cat(parts, 0), ReduceOp::Sum)?;
    let mut offset = 0;
    for slot in picked {
        let len = slot.range.len();
        let part = summed.clone().slice(offset..offset + len);
        flat = flat.slice_assign(slot.range.clone(), part);
        offset += len;
    }
    Ok(flat)
}

/// An fp32 vector on `device`, whatever the backend's default float type.
fn fp32<B: Backend>(values: Vec<f32>, device: &B::Device) -> Tensor<B, 1> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), (device, DType::F32))
}

/// `parts` concatenated and padded with zeros to `len` elements (fp32); one part that
/// fills `len` is returned as it is (not copied).
fn pad<B: Backend>(mut parts: Vec<Tensor<B, 1>>, len: usize, device: &B::Device) -> Tensor<B, 1> {
    let filled: usize = parts.iter().map(|part| part.dims()[0]).sum();
    if filled < len {
        parts.push(Tensor::zeros([len - filled], (device, DType::F32)));
    }
    if parts.len() == 1 {
        return parts.pop().expect("one part");
    }
    Tensor::cat(parts, 0)
}

struct CollectShapes<'a, B: Backend> {
    shapes: &'a mut Vec<(ParamId, Vec<usize>)>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: Backend> ModuleVisitor<B> for CollectShapes<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.shapes.push((param.id, param.val().dims().to_vec()));
    }
}

struct FlattenParams<'a, B: AutodiffBackend> {
    parts: &'a mut Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for FlattenParams<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.parts
            .push(param.val().inner().flatten(0, D - 1).cast(DType::F32));
    }
}

struct FlattenGrads<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    parts: &'a mut Vec<Tensor<B::InnerBackend, 1>>,
    params: &'a mut Vec<(ParamId, usize, bool)>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for FlattenGrads<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let len = param.shape().num_elements();
        let grad = self.grads.remove::<B::InnerBackend, D>(param.id);
        // A weight whose gradient the accumulators hold has no place in the graph's flat.
        let held = grad.is_none() && holds::<B::InnerBackend>(param.id);
        self.params.push((param.id, len, held));
        if held {
            return;
        }
        let grad = grad.unwrap_or_else(|| param.val().inner().zeros_like());
        // Main grads are fp32 whatever the parameters' type (cast by `flatten_into`).
        self.parts.push(grad.flatten(0, D - 1));
    }
}

struct WriteParams<'a, B: AutodiffBackend> {
    slots: Vec<&'a Slot>,
    next: usize,
    full: &'a Tensor<B::InnerBackend, 1>,
    /// `full` in each parameter type met so far.
    cast: &'a mut HashMap<DType, Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for WriteParams<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let slot = self.slots[self.next];
        self.next += 1;
        assert_eq!(slot.id, id, "parameters are visited in layout order");
        let shape: [usize; D] = slot.shape.clone().try_into().expect("the slot's rank");
        // The fp32 master value, in the parameter's own type.
        let full = self
            .cast
            .entry(tensor.dtype())
            .or_insert_with(|| with_dtype(self.full.clone(), tensor.dtype()));
        let value = full.clone().slice(slot.range.clone()).reshape(shape);
        let mut updated = Tensor::from_inner(value);
        if tensor.is_require_grad() {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// Dynamic loss scaling for fp16 (Megatron's): the loss is multiplied by the scale before
/// the backward and the gradients divided by it after; a step whose gradients overflow
/// is skipped and the scale multiplied by `backoff`; after `growth_interval` steps
/// without overflow the scale is multiplied by `growth`.
#[derive(Debug, Clone, PartialEq)]
pub struct LossScaler {
    /// The current scale.
    pub scale: f64,
    /// Steps without overflow before the scale grows.
    pub growth_interval: usize,
    /// Factor of growth.
    pub growth: f64,
    /// Factor of back-off after an overflow.
    pub backoff: f64,
    /// The scale never falls below this.
    pub min_scale: f64,
    good_steps: usize,
}

impl LossScaler {
    /// A scaler starting at `initial` that doubles after `growth_interval` good steps and
    /// halves on overflow, never below 1.
    pub fn new(initial: f64, growth_interval: usize) -> Self {
        Self {
            scale: initial,
            growth_interval: growth_interval.max(1),
            growth: 2.0,
            backoff: 0.5,
            min_scale: 1.0,
            good_steps: 0,
        }
    }

    /// The state a checkpoint keeps.
    pub fn state(&self) -> ScalerState {
        ScalerState {
            scale: self.scale,
            good_steps: self.good_steps,
        }
    }

    /// Continues from a checkpoint's state.
    pub fn restore(&mut self, state: ScalerState) {
        self.scale = state.scale;
        self.good_steps = state.good_steps;
    }

    /// Records a step's outcome; returns whether the step should be applied.
    pub fn update(&mut self, overflow: bool) -> bool {
        if overflow {
            self.scale = (self.scale * self.backoff).max(self.min_scale);
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps == self.growth_interval {
            self.scale *= self.growth;
            self.good_steps = 0;
        }
        true
    }
}
