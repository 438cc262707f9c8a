//! [`FusedKernels`] on Burn's CubeCL backends (CUDA, wgpu): the launchers of the kernels in
//! [`kernels`].
//!
//! The memory-bound kernels are launched without CubeCL's bounds checks
//! (`launch_unchecked`): a checked launch clamps every index and selects the loaded value
//! against the array's length, which on an H200 (bf16) slowed a norm backward by 1.9x and
//! cost the GeLU, softmax and cross-entropy kernels 3-11% of their bandwidth. Each kernel
//! keeps its reads and writes inside its arrays itself (rows past the end read row 0,
//! vectors past a row's end vector 0, and the results are masked; writes are guarded), and
//! `bench kernels --parts checks` run with CubeCL's `check_mode = "validate"` (see
//! `benches/gpu_kernels.sh`) reports any access outside an array.

mod kernels;

use burn::tensor::{Bool, DType, Int, IntDType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::{empty_device_contiguous_dtype, empty_device_dtype};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{CubeCount, CubeDim, calculate_cube_count_elemwise, tensor_vector_size_parallel};

use crate::as_rows;
use crate::dropout::keep_threshold;
use crate::{
    AdamWState, AdamWStep, CrossEntropy, Dropout, FusedKernels, Gelu, LogitStatistics,
    NormGradients, NormStatistics, reference_adamw, reference_bias_dropout_add,
    reference_bias_gelu, reference_bias_gelu_backward, reference_column_sums,
    reference_cross_entropy_backward, reference_embedding, reference_embedding_grad,
    reference_flatten_into, reference_kernels, reference_logit_statistics, reference_norm_backward,
    reference_norm_forward, reference_softmax, reference_softmax_backward,
    reference_sum_of_squares, with_dtype,
};
use kernels::{GROUP_UNITS, ROW_GROUPS, SUM_COLUMNS, SUM_GROUPS};

/// Units per cube of the element-wise kernels.
const ELEMENT_UNITS: u32 = 256;
/// The most vectors of its row that a unit of the norm kernels holds: the warp-per-row
/// forward unrolls its passes up to this many, the row-splitting kernels give each unit at
/// most this many, and the two-kernel backward keeps this many in registers between passes
/// (beyond, the later passes read the rest again).
const CACHED_VECTORS: usize = 8;

/// The most vectors of its row that a unit of the softmax kernels keeps in registers between
/// passes (the later passes read the rest again, from the cache). Fewer registers, more
/// rows at once: on an H200 (bf16, [8, 20, 1024, 1024] causal) the backward with 4 cached
/// vectors held 110 registers a unit and 25% occupancy and moved 2610 GB/s; with 2 the
/// forward moved 3290 against 2931 GB/s and the backward 3456 (none cached: 3120).
const SOFTMAX_CACHED_VECTORS: usize = 2;

/// The most cubes of the sum of squares (beyond, each unit loops over more vectors): 4 per
/// multiprocessor of an H200, whose fp64 partials (2 MiB) are then summed by Burn.
const SQUARES_CUBES: usize = 528;

/// Rows per cube of the norm forward where rows are planes (CUDA): cubes of 1024 units, 256
/// of them at 8192 rows, all resident at once on an H200 (two a multiprocessor). On an H200
/// (bf16) with 32 rows a cube it moved 77% of 4.3 TB/s at 8192 x 1280 against 65% with 8,
/// 72% against 73% at 32768 x 1280 and 70% against 67% at 8192 x 4096 (2 and 4 rows: 66%,
/// 75%, 70%; 16: 64%, 70%, 69%).
const NORM_FORWARD_ROWS: u32 = 32;

/// Cubes of the row-splitting norm backward per multiprocessor (each writes a row of
/// partials). A cube of 640 units fills a multiprocessor's registers: on an H200 (bf16,
/// 8192 x 1280) one cube a multiprocessor moved 41-45% of 4.3 TB/s (without and with its
/// rows' statistics loaded ahead), two (run in two waves) 37-39%.
const NORM_BACKWARD_SPLIT_CUBES_PER_MULTIPROCESSOR: usize = 1;

/// The most units a row of the row-splitting norm kernels takes.
const ROW_SPLIT_UNITS: usize = 256;
/// About how many units a cube of the row-splitting norm kernels has (rows of fewer units
/// share a cube). On an H200 (bf16) the backward (its loads issued a row ahead, before the
/// row's sums) with 640 (four rows of 160 at 1280 columns, one cube per multiprocessor)
/// moved 52%, 74% and 69% of 4.3 TB/s at 8192 x 1280, 32768 x 1280 and 8192 x 4096; with
/// 320 (two cubes a multiprocessor) 47%, 72%, 60%; 480: 48%, 66%, 59%; 800: 40%, 56%, 31%
/// (an earlier kernel, 1024: 37%, 50%, 15%; at hidden 4096 a cube's rows of 256 units
/// outgrow the registers beyond 640).
const ROW_SPLIT_CUBE_UNITS: usize = 640;

/// The most shared memory a cube of the row-splitting norm backward (its fp32 weight and
/// bias sums, its reductions) or of the column totals (its units' fp32 sums) takes: the
/// 48 KiB a cube gets without opting in.
const CUBE_SHARED_BYTES: usize = 48 * 1024;

/// Row chunks of the norm's weight- and bias-gradient partials where its row-splitting
/// kernel does not apply (at most: fewer for short inputs). On an H200, for the bias
/// gradient's former column sums in the same form (bf16, 8192 x 5120), 128 chunks moved
/// 2970 GB/s, 256 2540 and 64 2580: fewer chunks write fewer partials to sum, more keep
/// more loads in flight.
const PARAMETER_CHUNKS: usize = 128;

type Backend<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// The tensor's primitive with a dense last dimension: the kernels follow the other
/// dimensions' strides (pitched rows, views), so only a strided last dimension is copied.
fn primitive<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    tensor: Tensor<Backend<R, F, I, BT>, D>,
) -> CubeTensor<R> {
    let tensor = tensor.into_primitive().tensor();
    let dense_last = tensor.meta.strides().last() == Some(&1)
        || tensor.meta.shape().last().is_none_or(|&len| len <= 1);
    if dense_last {
        tensor
    } else {
        into_contiguous(tensor)
    }
}

/// Integer indices as a dense i32 tensor's primitive (what the kernels read).
fn index_primitive<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    indices: Tensor<Backend<R, F, I, BT>, 1, Int>,
) -> CubeTensor<R> {
    let indices = indices.cast(IntDType::I32).into_primitive();
    if indices
        .meta
        .strides()
        .last()
        .is_none_or(|&stride| stride == 1)
    {
        indices
    } else {
        into_contiguous(indices)
    }
}

fn tensor<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    primitive: CubeTensor<R>,
) -> Tensor<Backend<R, F, I, BT>, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

fn empty_like<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape, dtype: DType) -> CubeTensor<R> {
    empty_device_dtype(like.client.clone(), like.device.clone(), shape, dtype)
}

/// An uninitialized tensor of `shape` stored contiguously (rows not padded to CubeCL's
/// pitch): for an output that callers reshape (Burn copies a pitched tensor to merge its
/// rows: for GPT-2's logits' gradient, `[8192, 50304]` in bf16, a 1.5 ms copy a step on
/// an H200), or whose rows a kernel writes in vectors of another tensor's lanes.
fn empty_contiguous_like<R: CubeRuntime>(
    like: &CubeTensor<R>,
    shape: Shape,
    dtype: DType,
) -> CubeTensor<R> {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, dtype)
}

/// The row kernels' cubes: `groups` rows of [`GROUP_UNITS`] units each (most kernels take
/// [`ROW_GROUPS`]).
fn row_cube_dim(groups: u32) -> CubeDim {
    CubeDim::new_2d(GROUP_UNITS, groups)
}

/// Enough row-kernel cubes of `groups` rows for `rows` rows, counted in as many grid
/// dimensions as the runtime needs.
fn row_cubes<R: CubeRuntime>(like: &CubeTensor<R>, rows: usize, groups: u32) -> CubeCount {
    let units = rows.div_ceil(groups as usize) * (GROUP_UNITS * groups) as usize;
    calculate_cube_count_elemwise(&like.client, units, row_cube_dim(groups))
}

/// Rows per cube of the norm forward ([`kernels::norm_forward`]): [`NORM_FORWARD_ROWS`]
/// where rows are planes and a cube can have that many units, else [`ROW_GROUPS`] (the
/// shared-memory reduction holds that many rows).
fn norm_forward_groups<R: CubeRuntime>(like: &CubeTensor<R>) -> u32 {
    let most_units = like.client.properties().hardware.max_units_per_cube;
    if rows_are_planes(like) && most_units >= GROUP_UNITS * NORM_FORWARD_ROWS {
        NORM_FORWARD_ROWS
    } else {
        ROW_GROUPS
    }
}

/// Whether a plane (warp) is exactly one row's units on this device, so that rows reduce
/// with plane operations instead of shared memory.
fn rows_are_planes<R: CubeRuntime>(like: &CubeTensor<R>) -> bool {
    let hardware = &like.client.properties().hardware;
    hardware.plane_size_min == GROUP_UNITS && hardware.plane_size_max == GROUP_UNITS
}

/// The padding mask as fp32 (1 for padding) for the softmax kernels, and whether there is
/// one (without, a one-element placeholder that the kernel never reads).
fn padding_mask<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    like: &CubeTensor<R>,
    padding: Option<Tensor<Backend<R, F, I, BT>, 2, Bool>>,
) -> (CubeTensor<R>, bool) {
    match padding {
        Some(padding) => (primitive(with_dtype(padding.float(), DType::F32)), true),
        None => (empty_like(like, Shape::new([1]), DType::F32), false),
    }
}

/// The widest vector (up to 16 bytes) that every tensor's rows allow: the last dimension
/// and every other stride divisible by it.
fn vector_lanes<R: CubeRuntime>(tensors: &[&CubeTensor<R>]) -> usize {
    tensors
        .iter()
        .map(|t| {
            tensor_vector_size_parallel(
                t.client.io_optimized_vector_sizes(t.dtype.size()),
                t.meta.shape(),
                t.meta.strides(),
                t.meta.num_dims() - 1,
            )
        })
        .min()
        .unwrap_or(1)
}

/// How many of its row's vectors a unit of the norm's backward caches: all of them
/// (`vectors / GROUP_UNITS`, rounded up) up to [`CACHED_VECTORS`].
fn cached_vectors(vectors: usize) -> usize {
    vectors.div_ceil(GROUP_UNITS as usize).min(CACHED_VECTORS)
}

/// How many of its row's vectors a unit of the softmax kernels caches: up to
/// [`SOFTMAX_CACHED_VECTORS`].
fn softmax_cached_vectors(vectors: usize) -> usize {
    vectors
        .div_ceil(GROUP_UNITS as usize)
        .min(SOFTMAX_CACHED_VECTORS)
}

/// How the row-splitting norm kernels ([`kernels::norm_forward_rows`],
/// [`kernels::norm_backward_rows`]) spread a row over a cube's units.
#[derive(Debug, Clone, Copy)]
struct RowSplit {
    /// Units per row (a multiple of [`GROUP_UNITS`]).
    row_units: usize,
    /// Vectors of a row per unit.
    per_unit: usize,
    /// Rows a cube takes at a time.
    slots: usize,
}

impl RowSplit {
    /// Rows of `row_vectors` vectors over up to [`ROW_SPLIT_UNITS`] units each, or `None`
    /// where a unit would hold more than [`CACHED_VECTORS`] vectors or a row would take
    /// more units than a cube of `like`'s device has.
    fn of<R: CubeRuntime>(like: &CubeTensor<R>, row_vectors: usize) -> Option<Self> {
        let per_unit = row_vectors.div_ceil(ROW_SPLIT_UNITS).max(1);
        let row_units = row_vectors
            .div_ceil(per_unit)
            .next_multiple_of(GROUP_UNITS as usize);
        let most_units = like.client.properties().hardware.max_units_per_cube as usize;
        if per_unit > CACHED_VECTORS || row_units > most_units {
            return None;
        }
        Some(Self {
            row_units,
            per_unit,
            slots: (ROW_SPLIT_CUBE_UNITS.min(most_units) / row_units).clamp(1, ROW_GROUPS as usize),
        })
    }

    fn cube_dim(self) -> CubeDim {
        CubeDim::new_2d(self.row_units as u32, self.slots as u32)
    }

    /// Whether the norm backward keeps each row's `grad · weight` and `x̂` in registers
    /// between its sums and its input gradient: where a unit has one vector of the row
    /// (more would outgrow the registers of a cube's units). On an H200 (bf16) that moved
    /// 51% and 72% of 4.3 TB/s at 8192 and 32768 x 1280, against 49% and 69% computing
    /// them again.
    fn caches(self) -> bool {
        self.per_unit == 1
    }
}

/// The multiprocessors of `like`'s device (64 where its runtime does not say).
fn multiprocessors<R: CubeRuntime>(like: &CubeTensor<R>) -> usize {
    let hardware = &like.client.properties().hardware;
    hardware.num_streaming_multiprocessors.unwrap_or(64) as usize
}

/// The shared memory a cube may take on `like`'s device: [`CUBE_SHARED_BYTES`], or less
/// where the device has less.
fn cube_shared_bytes<R: CubeRuntime>(like: &CubeTensor<R>) -> usize {
    let hardware = &like.client.properties().hardware;
    CUBE_SHARED_BYTES.min(hardware.max_shared_memory_size)
}

/// How the row-splitting norm backward ([`kernels::norm_backward_rows`]) takes its rows.
struct NormBackwardSplit {
    split: RowSplit,
    /// A few per multiprocessor, each writing a row of partials.
    cubes: usize,
    /// Rows each slot takes (the last ones past the end for some slots).
    row_steps: usize,
}

impl NormBackwardSplit {
    /// For `rows` rows of `row_vectors` vectors of `lanes` elements, or `None` where the
    /// kernel's weight and bias sums and its reductions would not fit
    /// [`CUBE_SHARED_BYTES`] (or the device's shared memory).
    fn of<R: CubeRuntime>(
        like: &CubeTensor<R>,
        rows: usize,
        row_vectors: usize,
        lanes: usize,
    ) -> Option<Self> {
        let split = RowSplit::of(like, row_vectors)?;
        let sums = 2 * split.per_unit * split.row_units * lanes * 4;
        let scratch =
            4 * kernels::row_scratch_len(2, split.slots, split.row_units, rows_are_planes(like));
        if sums + scratch > cube_shared_bytes(like) {
            return None;
        }
        let cubes = rows.div_ceil(split.slots).clamp(
            1,
            NORM_BACKWARD_SPLIT_CUBES_PER_MULTIPROCESSOR * multiprocessors(like),
        );
        Some(Self {
            split,
            cubes,
            row_steps: rows.div_ceil(cubes * split.slots),
        })
    }
}

/// How [`kernels::column_totals`] splits `[rows, width]` columns: `cubes` slices of `slice`
/// column vectors, each over every row in `groups` row groups.
struct ColumnSlices {
    slice: usize,
    groups: usize,
    cubes: usize,
}

impl ColumnSlices {
    /// For `rows` rows of `row_vectors` vectors of `lanes` elements of `input`: slices of
    /// whole 32-byte sectors (the memory's unit of transfer: where rows start on one, as
    /// CubeCL's pitched rows do, no two cubes read a sector), about one a multiprocessor,
    /// and as many row groups (a power of two) as a cube's units and shared memory allow,
    /// no more than the rows need. At 5120 bf16 columns on an H200: 107 slices of 6
    /// vectors, 128 row groups.
    fn of<R: CubeRuntime>(
        input: &CubeTensor<R>,
        rows: usize,
        row_vectors: usize,
        lanes: usize,
    ) -> Self {
        let units = input.client.properties().hardware.max_units_per_cube as usize;
        let most_units = units.min(cube_shared_bytes(input) / (lanes * 4));
        let sector = (32 / (lanes * input.dtype.size())).max(1);
        let slice = row_vectors
            .div_ceil(multiprocessors(input))
            .next_multiple_of(sector)
            .min(most_units);
        let groups = 1 << (most_units / slice).max(1).ilog2();
        Self {
            slice,
            groups: groups.min(rows.next_power_of_two()),
            cubes: row_vectors.div_ceil(slice),
        }
    }
}

/// The most cubes a launch takes along y and z (CUDA's limit, and wgpu's default).
const MAX_CUBES_YZ: usize = 65_535;

/// Cubes along x, and their size, covering a row of `vectors` vectors a unit each: the
/// fewest cubes of at most [`ELEMENT_UNITS`] units, each of whole warps (a row of 160
/// vectors takes one cube of 160 units; a row of 640, three of 224).
fn row_vector_cubes(vectors: usize) -> (u32, CubeDim) {
    let cubes = vectors.div_ceil(ELEMENT_UNITS as usize).max(1);
    let units = vectors
        .div_ceil(cubes)
        .next_multiple_of(GROUP_UNITS as usize);
    (u32_of(cubes, "row vectors"), CubeDim::new_1d(units as u32))
}

/// The cubes of [`kernels::norm_backward_parameters`]: [`ELEMENT_UNITS`] column vectors by
/// one row chunk each, over `vectors` column vectors and `chunks` row chunks.
fn column_chunk_cubes(vectors: usize, chunks: usize) -> CubeCount {
    CubeCount::Static(
        vectors.div_ceil(ELEMENT_UNITS as usize) as u32,
        chunks as u32,
        1,
    )
}

/// The totals over chunks of `[kinds · chunks, width]` fp32 partial rows, as `[kinds,
/// width]` in `dtype` (one kernel, in a fixed order: Burn's reduction and cast would be
/// three launches). This second launch is what keeps the norm backward below 70% of 4.3
/// TB/s at 8192 x 1280 on an H200 (bf16): 26.4 us with it, 23.3 us (63%) without it (a
/// measurement build that skipped it; 70% is 20.9 us). One launch would need the cube
/// that adds the partials to see the other cubes' writes, a grid-scope fence that
/// CubeCL 0.10's kernels cannot express (its synchronizations are the cube's and the
/// plane's barriers and an async-proxy fence), and float atomics would make the weight
/// gradient differ from run to run.
fn sum_partials<R: CubeRuntime>(
    partials: &CubeTensor<R>,
    kinds: usize,
    chunks: usize,
    width: usize,
    dtype: DType,
) -> CubeTensor<R> {
    let sums = empty_like(partials, Shape::new([kinds, width]), dtype);
    // SAFETY: the kernel keeps its accesses inside its arrays (module docs).
    unsafe {
        kernels::partial_sums::launch_unchecked::<R>(
            &partials.client,
            CubeCount::Static(
                u32_of(width.div_ceil(SUM_COLUMNS as usize), "width"),
                kinds as u32,
                1,
            ),
            CubeDim::new_2d(SUM_COLUMNS, SUM_GROUPS),
            partials.clone().into_array_arg(),
            sums.clone().into_array_arg(),
            u32_of(chunks, "chunks"),
            u32_of(width, "width"),
            stride(partials, 0),
            stride(&sums, 0),
            dtype.into(),
        )
    };
    sums
}

/// `tensor`'s stride along `dim`, in elements, as the kernels take it (a scalar: see
/// [`kernels`] for why).
fn stride<R: CubeRuntime>(tensor: &CubeTensor<R>, dim: usize) -> u32 {
    u32_of(tensor.meta.strides()[dim], "a stride")
}

/// Whether `device` runs on CUDA.
fn on_cuda<R: CubeRuntime>(device: &R::Device) -> bool {
    R::name(&R::client(device)) == "cuda"
}

/// Checked narrowing of a size the kernels index with 32-bit integers.
fn u32_of(value: usize, what: &str) -> u32 {
    u32::try_from(value).unwrap_or_else(|_| {
        panic!("{what} = {value} is beyond the kernels' 32-bit indexing; split the batch")
    })
}

impl<R, F, I, BT> FusedKernels for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn has_fused_kernels() -> bool {
        true
    }

    fn norm<const D: usize>(
        input: Tensor<Self, D>,
        weight: Tensor<Self, 1>,
        bias: Option<Tensor<Self, 1>>,
        epsilon: f64,
    ) -> Tensor<Self, D> {
        let (rows, shape) = as_rows(input);
        Self::norm_forward(rows, weight, bias, epsilon)
            .0
            .reshape(shape)
    }

    fn norm_forward(
        input: Tensor<Self, 2>,
        weight: Tensor<Self, 1>,
        bias: Option<Tensor<Self, 1>>,
        epsilon: f64,
    ) -> (Tensor<Self, 2>, NormStatistics<Self>) {
        if reference_kernels() {
            return reference_norm_forward(input, weight, bias, epsilon);
        }
        let [rows, width] = input.dims();
        let dtype = input.dtype();
        let centered = bias.is_some();
        let weight = primitive(with_dtype(weight, dtype));
        let bias = bias
            .map(|b| primitive(with_dtype(b, dtype)))
            .unwrap_or_else(|| weight.clone());
        let input = primitive(input);
        let output = empty_like(&input, Shape::new([rows, width]), dtype);
        let mean = empty_like(&input, Shape::new([rows]), DType::F32);
        let rstd = empty_like(&input, Shape::new([rows]), DType::F32);
        let lanes = vector_lanes(&[&input, &weight, &bias, &output]);
        let (rows32, width32) = (u32_of(rows, "rows"), u32_of(width, "width"));
        let (input_stride, output_stride) = (stride(&input, 0), stride(&output, 0));
        let plane = rows_are_planes(&input);
        // A warp per row where a unit holds at most `CACHED_VECTORS` of its vectors (its
        // passes unrolled); wider rows split over a cube's units, or looped over beyond.
        // H200, bf16, 8192 tokens: at hidden 1280 the warp per row moved 67% of 4.3 TB/s,
        // the split 48%; at 4096 the split 58%, the loop 47%.
        let per_lane = (width / lanes).div_ceil(GROUP_UNITS as usize);
        let split = RowSplit::of(&input, width / lanes).filter(|_| per_lane > CACHED_VECTORS);
        if rows == 0 {
            // Nothing to normalize.
        } else if let Some(split) = split {
            // SAFETY: the kernel keeps its accesses inside its arrays (module docs).
            unsafe {
                kernels::norm_forward_rows::launch_unchecked::<R>(
                    &input.client,
                    calculate_cube_count_elemwise(
                        &input.client,
                        rows.div_ceil(split.slots) * split.slots * split.row_units,
                        split.cube_dim(),
                    ),
                    split.cube_dim(),
                    lanes,
                    input.clone().into_array_arg(),
                    weight.into_array_arg(),
                    bias.into_array_arg(),
                    output.clone().into_array_arg(),
                    mean.clone().into_array_arg(),
                    rstd.clone().into_array_arg(),
                    rows32,
                    width32,
                    input_stride,
                    output_stride,
                    epsilon as f32,
                    centered,
                    plane,
                    split.slots,
                    split.row_units,
                    split.per_unit,
                    dtype.into(),
                )
            };
        } else {
            let groups = norm_forward_groups(&input);
            // SAFETY: the kernel keeps its accesses inside its arrays (module docs).
            unsafe {
                kernels::norm_forward::launch_unchecked::<R>(
                    &input.client,
                    row_cubes(&input, rows, groups),
                    row_cube_dim(groups),
                    lanes,
                    input.clone().into_array_arg(),
                    weight.into_array_arg(),
                    bias.into_array_arg(),
                    output.clone().into_array_arg(),
                    mean.clone().into_array_arg(),
                    rstd.clone().into_array_arg(),
                    rows32,
                    width32,
                    input_stride,
                    output_stride,
                    epsilon as f32,
                    centered,
                    plane,
                    if per_lane <= CACHED_VECTORS {
                        per_lane
                    } else {
                        0
                    },
                    dtype.into(),
                )
            };
        }
        let statistics = NormStatistics {
            mean: tensor(mean),
            rstd: tensor(rstd),
        };
        (tensor(output), statistics)
    }

    fn norm_backward(
        grad: Tensor<Self, 2>,
        input: Tensor<Self, 2>,
        weight: Tensor<Self, 1>,
        has_bias: bool,
        statistics: NormStatistics<Self>,
    ) -> NormGradients<Self> {
        let [rows, width] = input.dims();
        // Without rows the weight and bias gradients are zeros, which the reference gives.
        if reference_kernels() || rows == 0 || width == 0 {
            return reference_norm_backward(grad, input, weight, has_bias, statistics);
        }
        let (dtype, weight_dtype) = (input.dtype(), weight.dtype());
        let grad = primitive(with_dtype(grad, dtype));
        let input = primitive(input);
        let weight = primitive(with_dtype(weight, dtype));
        let mean = primitive(statistics.mean);
        let rstd = primitive(statistics.rstd);
        let input_grad = empty_like(&input, Shape::new([rows, width]), dtype);
        let lanes = vector_lanes(&[&grad, &input, &weight, &input_grad]);
        let row_vectors = width / lanes;
        let row_split = NormBackwardSplit::of(&input, rows, row_vectors, lanes);
        // Partial rows: one per cube of the one-pass kernel, or per row chunk.
        let chunks = match &row_split {
            Some(plan) => plan.cubes,
            None => rows.clamp(1, PARAMETER_CHUNKS),
        };
        // Weight partials, then bias partials for LayerNorm: one buffer, one reduction.
        let kinds = 1 + usize::from(has_bias);
        // Dense partial rows: `width` apart, so whole vectors of the input's lanes.
        let partials =
            empty_contiguous_like(&input, Shape::new([kinds * chunks, width]), DType::F32);
        let (rows32, width32) = (u32_of(rows, "rows"), u32_of(width, "width"));
        let (grad_stride, input_stride) = (stride(&grad, 0), stride(&input, 0));
        let (input_grad_stride, partials_stride) = (stride(&input_grad, 0), stride(&partials, 0));
        if let Some(NormBackwardSplit {
            split,
            cubes,
            row_steps,
        }) = row_split
        {
            // SAFETY: the kernel keeps its accesses inside its arrays (module docs).
            unsafe {
                kernels::norm_backward_rows::launch_unchecked::<R>(
                    &input.client,
                    CubeCount::Static(cubes as u32, 1, 1),
                    split.cube_dim(),
                    lanes,
                    grad.into_array_arg(),
                    input.clone().into_array_arg(),
                    weight.into_array_arg(),
                    mean.into_array_arg(),
                    rstd.into_array_arg(),
                    input_grad.clone().into_array_arg(),
                    partials.clone().into_array_arg(),
                    rows32,
                    width32,
                    grad_stride,
                    input_stride,
                    input_grad_stride,
                    partials_stride,
                    u32_of(row_steps, "rows per slot"),
                    has_bias,
                    rows_are_planes(&input),
                    split.slots,
                    split.row_units,
                    split.per_unit,
                    split.caches(),
                    dtype.into(),
                )
            };
        } else {
            let rows_per_chunk = rows.div_ceil(chunks).max(1);
            // SAFETY: the kernel keeps its accesses inside its arrays (module docs).
            unsafe {
                kernels::norm_backward_input::launch_unchecked::<R>(
                    &input.client,
                    row_cubes(&input, rows, ROW_GROUPS),
                    row_cube_dim(ROW_GROUPS),
                    lanes,
                    grad.clone().into_array_arg(),
                    input.clone().into_array_arg(),
                    weight.into_array_arg(),
                    mean.clone().into_array_arg(),
                    rstd.clone().into_array_arg(),
                    input_grad.clone().into_array_arg(),
                    rows32,
                    width32,
                    grad_stride,
                    input_stride,
                    input_grad_stride,
                    has_bias,
                    rows_are_planes(&input),
                    cached_vectors(row_vectors),
                    dtype.into(),
                )
            };
            let lanes = vector_lanes(&[&grad, &input, &partials]);
            // SAFETY: the kernel keeps its accesses inside its arrays (module docs).
            unsafe {
                kernels::norm_backward_parameters::launch_unchecked::<R>(
                    &input.client,
                    column_chunk_cubes(width / lanes, chunks),
                    CubeDim::new_1d(ELEMENT_UNITS),
                    lanes,
                    grad.into_array_arg(),
                    input.clone().into_array_arg(),
                    mean.into_array_arg(),
                    rstd.into_array_arg(),
                    partials.clone().into_array_arg(),
                    rows32,
                    width32,
                    grad_stride,
                    input_stride,
                    partials_stride,
                    u32_of(rows_per_chunk, "rows per chunk"),
                    has_bias,
                    dtype.into(),
                )
            };
        }
        // [kinds, width] sums in the weight's type: row 0 the weight's, row 1 the bias's.
        let sums: Tensor<Self, 2> =
            tensor(sum_partials(&partials, kinds, chunks, width, weight_dtype));
        let row = |kind: usize| sums.clone().slice(kind..kind + 1).reshape([width]);
        NormGradients {
            input: tensor(input_grad),
            weight: row(0),
            bias: has_bias.then(|| row(1)),
        }
    }

    fn bias_gelu(
        input: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
        gelu: Gelu,
    ) -> Tensor<Self, 2> {
        if reference_kernels() {
            return reference_bias_gelu(input, bias, gelu);
        }
        let dtype = input.dtype();
        launch_bias_gelu(input.clone(), bias, input, gelu, false, dtype)
    }

    fn bias_gelu_backward(
        grad: Tensor<Self, 2>,
        input: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
        gelu: Gelu,
    ) -> Tensor<Self, 2> {
        if reference_kernels() {
            return reference_bias_gelu_backward(grad, input, bias, gelu);
        }
        let dtype = input.dtype();
        launch_bias_gelu(input, bias, with_dtype(grad, dtype), gelu, true, dtype)
    }

    fn column_sums(input: Tensor<Self, 2>) -> Tensor<Self, 1> {
        if reference_kernels() {
            return reference_column_sums(input);
        }
        let [rows, width] = input.dims();
        if rows == 0 || width == 0 {
            return Tensor::zeros([width], (&input.device(), DType::F32));
        }
        let input = primitive(input);
        let lanes = vector_lanes(&[&input]);
        let sums = empty_contiguous_like(&input, Shape::new([width]), DType::F32);
        let slices = ColumnSlices::of(&input, rows, width / lanes, lanes);
        // SAFETY: the kernel keeps its accesses inside its arrays (module docs).
        unsafe {
            kernels::column_totals::launch_unchecked::<R>(
                &input.client,
                CubeCount::Static(u32_of(slices.cubes, "column slices"), 1, 1),
                CubeDim::new_2d(slices.slice as u32, slices.groups as u32),
                lanes,
                input.clone().into_array_arg(),
                sums.clone().into_array_arg(),
                u32_of(rows, "rows"),
                u32_of(width, "width"),
                stride(&input, 0),
                slices.slice,
                slices.groups,
                input.dtype.into(),
            )
        };
        tensor(sums)
    }

    fn bias_dropout_add(
        input: Tensor<Self, 3>,
        bias: Option<Tensor<Self, 1>>,
        residual: Tensor<Self, 3>,
        dropout: Option<Dropout>,
    ) -> Tensor<Self, 3> {
        if reference_kernels() {
            return reference_bias_dropout_add(input, bias, residual, dropout);
        }
        launch_bias_dropout_add(input, bias, Some(residual), dropout)
    }

    fn sum_of_squares(values: &Tensor<Self, 1>, counted: Option<&Tensor<Self, 1>>) -> f64 {
        let fp32 = |t: &Tensor<Self, 1>| t.dtype() == DType::F32;
        if !Self::sums_squares_in_kernel(&values.device())
            || !fp32(values)
            || !counted.is_none_or(fp32)
        {
            return reference_sum_of_squares(values, counted);
        }
        let values_p = primitive(values.clone());
        let counted_p = counted.map(|counted| primitive(counted.clone()));
        let len = values_p.meta.shape()[0];
        if let Some(counted) = &counted_p {
            assert_eq!(
                counted.meta.shape()[0],
                len,
                "sum_of_squares: the mask's length differs from the values'"
            );
        }
        let lanes = vector_lanes(&[&values_p, counted_p.as_ref().unwrap_or(&values_p)]);
        let vectors = len / lanes;
        if vectors == 0 {
            return 0.0;
        }
        let cubes = vectors.div_ceil(ELEMENT_UNITS as usize).min(SQUARES_CUBES);
        let units = cubes * ELEMENT_UNITS as usize;
        let partials = empty_like(&values_p, Shape::new([units]), DType::F64);
        kernels::squares_fp64::launch::<R>(
            &values_p.client,
            CubeCount::Static(cubes as u32, 1, 1),
            CubeDim::new_1d(ELEMENT_UNITS),
            lanes,
            values_p.clone().into_array_arg(),
            counted_p
                .clone()
                .unwrap_or_else(|| values_p.clone())
                .into_array_arg(),
            partials.clone().into_array_arg(),
            u32_of(vectors, "elements"),
            u32_of(units, "units"),
            counted_p.is_some(),
        );
        // Read as fp64 data: a scalar would come back in the backend's float type (bf16
        // when training in bf16, which rounded the sum by up to 0.2%).
        let partials: Tensor<Self, 1> = tensor(partials);
        let sum = partials.sum().into_data().convert::<f64>();
        sum.as_slice::<f64>().map_or(f64::NAN, |values| values[0])
    }

    /// On CUDA only, which compiles fp64 kernels (Burn's own fp64 ops run there) though
    /// cubecl 0.10 does not list fp64 among its types; wgpu on lavapipe lists it, but the
    /// kernel's sums came out 3e-2 off there (600,001 elements; not investigated further).
    fn sums_squares_in_kernel(device: &Self::Device) -> bool {
        !reference_kernels() && on_cuda::<R>(device)
    }

    fn embedding_lookup(weight: Tensor<Self, 2>, ids: Tensor<Self, 2, Int>) -> Tensor<Self, 3> {
        if reference_kernels() {
            return reference_embedding(weight, ids);
        }
        // No gradient here (the inner backend of autodiff, or inference): no fp32 copy.
        burn::tensor::module::embedding(weight, ids)
    }

    fn embedding_grad(
        grad: Tensor<Self, 2>,
        ids: Tensor<Self, 1, Int>,
        rows: usize,
    ) -> Tensor<Self, 2> {
        let device = grad.device();
        // fp32 atomic adds: CUDA's (WGSL has no float atomics).
        if reference_kernels() || !on_cuda::<R>(&device) || grad.dtype() == DType::F64 {
            return reference_embedding_grad(grad, ids, rows);
        }
        let [tokens, width] = grad.dims();
        assert_eq!(
            ids.dims()[0],
            tokens,
            "embedding_grad: one id per row of the gradient"
        );
        let table = Tensor::<Self, 2>::zeros([rows, width], (&device, DType::F32));
        let elements = tokens * width;
        if elements == 0 || rows == 0 {
            return table;
        }
        let table = primitive(table);
        let grad = primitive(grad);
        let ids = index_primitive(ids);
        let cube_dim = CubeDim::new_1d(ELEMENT_UNITS);
        kernels::embedding_grad::launch::<R>(
            &table.client,
            calculate_cube_count_elemwise(&table.client, elements, cube_dim),
            cube_dim,
            grad.clone().into_array_arg(),
            ids.into_array_arg(),
            table.clone().into_array_arg(),
            u32_of(elements, "embedding gradient elements"),
            u32_of(width, "width"),
            stride(&grad, 0),
            stride(&table, 0),
            grad.dtype.into(),
        );
        tensor(table)
    }

    fn flatten_into(parts: Vec<Tensor<Self, 1>>, sum: Option<Tensor<Self, 1>>) -> Tensor<Self, 1> {
        let float = |dtype: DType| matches!(dtype, DType::F32 | DType::BF16 | DType::F16);
        if reference_kernels()
            || !parts.iter().all(|part| float(part.dtype()))
            || sum.as_ref().is_some_and(|sum| sum.dtype() != DType::F32)
            || (parts.is_empty() && sum.is_none())
        {
            return reference_flatten_into(parts, sum);
        }
        let total: usize = parts.iter().map(|part| part.dims()[0]).sum();
        let add = sum.is_some();
        let flat = match sum {
            Some(sum) => {
                assert_eq!(
                    sum.dims()[0],
                    total,
                    "flatten_into: the sum's length differs from the parts'"
                );
                // Written in place: a buffer another tensor shares is copied first.
                let sum = into_contiguous(sum.into_primitive().tensor());
                if sum.can_mut() { sum } else { sum.copy() }
            }
            None => {
                let like = parts[0].clone().into_primitive().tensor();
                empty_contiguous_like(&like, Shape::new([total]), DType::F32)
            }
        };
        // Where a buffer's view starts in its allocation (which CubeCL aligns), in elements.
        let start =
            |t: &CubeTensor<R>| t.handle.offset_start.unwrap_or(0) as usize / t.dtype.size();
        let flat_start = start(&flat);
        let mut offset = 0;
        for part in parts {
            let len = part.dims()[0];
            let part = into_contiguous(part.into_primitive().tensor());
            // Vectors of up to 4 lanes (16 bytes of fp32) that start aligned in both
            // buffers.
            let lanes = [4, 2, 1]
                .into_iter()
                .find(|&lanes| (len | (flat_start + offset) | start(&part)).is_multiple_of(lanes))
                .unwrap_or(1);
            let vectors = len / lanes;
            if vectors > 0 {
                let cube_dim = CubeDim::new_1d(ELEMENT_UNITS);
                kernels::flatten_into::launch::<R>(
                    &flat.client,
                    calculate_cube_count_elemwise(&flat.client, vectors, cube_dim),
                    cube_dim,
                    lanes,
                    part.clone().into_array_arg(),
                    flat.clone().into_array_arg(),
                    u32_of(offset / lanes, "flat gradients"),
                    u32_of(vectors, "gradient"),
                    add,
                    part.dtype.into(),
                );
            }
            offset += len;
        }
        tensor(flat)
    }

    fn adamw(
        state: AdamWState<Self>,
        grads: Tensor<Self, 1>,
        decay: Tensor<Self, 1>,
        step: AdamWStep,
    ) -> AdamWState<Self> {
        let all_fp32 = [
            &state.master,
            &state.exp_avg,
            &state.exp_avg_sq,
            &grads,
            &decay,
        ]
        .iter()
        .all(|t| t.dtype() == DType::F32);
        if reference_kernels() || !all_fp32 {
            return reference_adamw(state, grads, decay, step);
        }
        // Written in place: a buffer another tensor shares is copied first.
        let owned = |t: Tensor<Self, 1>| {
            let t = into_contiguous(t.into_primitive().tensor());
            if t.can_mut() { t } else { t.copy() }
        };
        let [master, exp_avg, exp_avg_sq] =
            [state.master, state.exp_avg, state.exp_avg_sq].map(owned);
        let [grads, decay] = [grads, decay].map(|t| primitive(t));
        let len = master.meta.shape()[0];
        for (name, t) in [
            ("moment", &exp_avg),
            ("moment", &exp_avg_sq),
            ("gradient", &grads),
            ("decay mask", &decay),
        ] {
            assert_eq!(
                t.meta.shape()[0],
                len,
                "adamw: the {name} buffer's length differs from the master weights'"
            );
        }
        let lanes = vector_lanes(&[&master, &exp_avg, &exp_avg_sq, &grads, &decay]);
        let vectors = len / lanes;
        if vectors > 0 {
            let cube_dim = CubeDim::new_1d(ELEMENT_UNITS);
            let f = |x: f64| x as f32;
            kernels::adamw::launch::<R>(
                &master.client,
                calculate_cube_count_elemwise(&master.client, vectors, cube_dim),
                cube_dim,
                lanes,
                master.clone().into_array_arg(),
                exp_avg.clone().into_array_arg(),
                exp_avg_sq.clone().into_array_arg(),
                grads.into_array_arg(),
                decay.into_array_arg(),
                u32_of(vectors, "optimizer elements"),
                f(step.grad_factor),
                f(step.beta1),
                f(1.0 - step.beta1),
                f(step.beta2),
                f(1.0 - step.beta2),
                f(1.0 - step.beta1.powi(step.step)),
                f(1.0 - step.beta2.powi(step.step)),
                f(step.eps),
                f(step.weight_decay),
                f(step.lr),
                step.grad_factor != 1.0,
            );
        }
        AdamWState {
            master: tensor(master),
            exp_avg: tensor(exp_avg),
            exp_avg_sq: tensor(exp_avg_sq),
        }
    }

    fn scaled_masked_softmax(
        scores: Tensor<Self, 4>,
        scale: f64,
        causal: bool,
        padding: Option<Tensor<Self, 2, Bool>>,
    ) -> Tensor<Self, 4> {
        if reference_kernels() || scores.dtype() == DType::F64 {
            return reference_softmax(scores, scale, causal, padding);
        }
        let shape = scores.dims();
        let dtype = scores.dtype();
        let scores = primitive(scores);
        let probabilities = empty_like(&scores, Shape::new(shape), dtype);
        let (padding, has_padding) = padding_mask(&scores, padding);
        let plane = rows_are_planes(&scores);
        let [batch, heads, queries, keys] = shape;
        let rows = batch * heads * queries;
        let lanes = vector_lanes(&[&scores, &probabilities]);
        if rows > 0 {
            // SAFETY: the kernel keeps its accesses inside its arrays (module docs).
            unsafe {
                kernels::softmax_forward::launch_unchecked::<R>(
                    &scores.client,
                    row_cubes(&scores, rows, ROW_GROUPS),
                    row_cube_dim(ROW_GROUPS),
                    lanes,
                    scores.clone().into_array_arg(),
                    padding.clone().into_array_arg(),
                    probabilities.clone().into_array_arg(),
                    stride(&scores, 0),
                    stride(&scores, 1),
                    stride(&scores, 2),
                    stride(&probabilities, 0),
                    stride(&probabilities, 1),
                    stride(&probabilities, 2),
                    stride(&padding, 0),
                    u32_of(rows, "attention rows"),
                    heads as u32,
                    queries as u32,
                    u32_of(keys, "keys"),
                    scale as f32,
                    causal,
                    has_padding,
                    plane,
                    softmax_cached_vectors(keys / lanes),
                    dtype.into(),
                )
            };
        }
        tensor(probabilities)
    }

    fn scaled_masked_softmax_backward(
        probabilities: Tensor<Self, 4>,
        grad: Tensor<Self, 4>,
        scale: f64,
        causal: bool,
        padding: Option<Tensor<Self, 2, Bool>>,
    ) -> Tensor<Self, 4> {
        let dtype = probabilities.dtype();
        if reference_kernels() || dtype == DType::F64 {
            return reference_softmax_backward(probabilities, grad, scale, causal, padding);
        }
        let shape = probabilities.dims();
        let probabilities = primitive(probabilities);
        let grad = primitive(with_dtype(grad, dtype));
        let grad_scores = empty_like(&probabilities, Shape::new(shape), dtype);
        let (padding, has_padding) = padding_mask(&probabilities, padding);
        let plane = rows_are_planes(&probabilities);
        let [batch, heads, queries, keys] = shape;
        let rows = batch * heads * queries;
        if rows > 0 {
            let lanes = vector_lanes(&[&probabilities, &grad, &grad_scores]);
            // SAFETY: the kernel keeps its accesses inside its arrays (module docs).
            unsafe {
                kernels::softmax_backward::launch_unchecked::<R>(
                    &probabilities.client,
                    row_cubes(&probabilities, rows, ROW_GROUPS),
                    row_cube_dim(ROW_GROUPS),
                    lanes,
                    probabilities.clone().into_array_arg(),
                    grad.clone().into_array_arg(),
                    padding.clone().into_array_arg(),
                    grad_scores.clone().into_array_arg(),
                    stride(&probabilities, 0),
                    stride(&probabilities, 1),
                    stride(&probabilities, 2),
                    stride(&grad, 0),
                    stride(&grad, 1),
                    stride(&grad, 2),
                    stride(&grad_scores, 0),
                    stride(&grad_scores, 1),
                    stride(&grad_scores, 2),
                    stride(&padding, 0),
                    u32_of(rows, "attention rows"),
                    heads as u32,
                    queries as u32,
                    u32_of(keys, "keys"),
                    scale as f32,
                    causal,
                    has_padding,
                    plane,
                    softmax_cached_vectors(keys / lanes),
                    dtype.into(),
                )
            };
        }
        tensor(grad_scores)
    }

    fn logit_statistics(
        logits: Tensor<Self, 2>,
        targets: Tensor<Self, 1, Int>,
        real_width: usize,
    ) -> LogitStatistics<Self> {
        if reference_kernels() || logits.dtype() == DType::F64 {
            return reference_logit_statistics(logits, targets, real_width);
        }
        let [rows, width] = logits.dims();
        assert!(
            real_width <= width,
            "{real_width} real columns in logits {width} wide"
        );
        let dtype = logits.dtype();
        let logits = primitive(logits);
        let targets = index_primitive(targets);
        let [max, sum_exp, target, sum] =
            [(); 4].map(|_| empty_like(&logits, Shape::new([rows]), DType::F32));
        let lanes = vector_lanes(&[&logits]);
        if rows > 0 {
            // SAFETY: the kernel keeps its accesses inside its arrays (module docs).
            unsafe {
                kernels::logit_statistics::launch_unchecked::<R>(
                    &logits.client,
                    row_cubes(&logits, rows, ROW_GROUPS),
                    row_cube_dim(ROW_GROUPS),
                    lanes,
                    logits.clone().into_array_arg(),
                    targets.into_array_arg(),
                    max.clone().into_array_arg(),
                    sum_exp.clone().into_array_arg(),
                    target.clone().into_array_arg(),
                    sum.clone().into_array_arg(),
                    u32_of(rows, "rows"),
                    stride(&logits, 0),
                    u32_of(real_width, "vocabulary slice"),
                    u32_of(real_width.div_ceil(lanes), "vocabulary slice"),
                    rows_are_planes(&logits),
                    dtype.into(),
                )
            };
        }
        LogitStatistics {
            max: tensor(max),
            sum_exp: tensor(sum_exp),
            target: tensor(target),
            sum: tensor(sum),
        }
    }

    fn cross_entropy_backward(
        logits: Tensor<Self, 2>,
        targets: Tensor<Self, 1, Int>,
        log_sum_exp: Tensor<Self, 1>,
        grad: Tensor<Self, 1>,
        cross_entropy: CrossEntropy,
    ) -> Tensor<Self, 2> {
        if reference_kernels() || logits.dtype() == DType::F64 {
            return reference_cross_entropy_backward(
                logits,
                targets,
                log_sum_exp,
                grad,
                cross_entropy,
            );
        }
        let [rows, width] = logits.dims();
        let dtype = logits.dtype();
        let logits = primitive(logits);
        let targets = index_primitive(targets);
        let log_sum_exp = primitive(with_dtype(log_sum_exp, DType::F32));
        let grad = primitive(with_dtype(grad, DType::F32));
        let output = empty_contiguous_like(&logits, Shape::new([rows, width]), dtype);
        let lanes = vector_lanes(&[&logits, &output]);
        let vectors = rows * width / lanes;
        let smoothing = cross_entropy.label_smoothing;
        if vectors > 0 {
            let cube_dim = CubeDim::new_1d(ELEMENT_UNITS);
            // SAFETY: the kernel keeps its accesses inside its arrays (module docs).
            unsafe {
                kernels::cross_entropy_backward::launch_unchecked::<R>(
                    &logits.client,
                    calculate_cube_count_elemwise(&logits.client, vectors, cube_dim),
                    cube_dim,
                    lanes,
                    logits.clone().into_array_arg(),
                    targets.into_array_arg(),
                    log_sum_exp.into_array_arg(),
                    grad.into_array_arg(),
                    output.clone().into_array_arg(),
                    u32_of(vectors, "logits"),
                    stride(&logits, 0),
                    stride(&output, 0),
                    u32_of(width / lanes, "width"),
                    u32_of(cross_entropy.real_width, "vocabulary slice"),
                    (1.0 - smoothing) as f32,
                    (smoothing / cross_entropy.vocab_size.max(1) as f64) as f32,
                    dtype.into(),
                )
            };
        }
        tensor(output)
    }

    fn dropout_mask_apply(tensor: Tensor<Self, 3>, dropout: Dropout) -> Tensor<Self, 3> {
        if reference_kernels() {
            return crate::dropout::dropout(
                tensor,
                dropout.p,
                dropout.seed,
                dropout.full,
                dropout.offsets,
            );
        }
        launch_bias_dropout_add(tensor, None, None, Some(dropout))
    }
}

/// `gelu(input + bias)`, or with `derivative` `grad · gelu'(input + bias)`.
fn launch_bias_gelu<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    input: Tensor<Backend<R, F, I, BT>, 2>,
    bias: Option<Tensor<Backend<R, F, I, BT>, 1>>,
    grad: Tensor<Backend<R, F, I, BT>, 2>,
    gelu: Gelu,
    derivative: bool,
    dtype: DType,
) -> Tensor<Backend<R, F, I, BT>, 2> {
    let [rows, width] = input.dims();
    let has_bias = bias.is_some();
    let input = primitive(input);
    let grad = if derivative {
        primitive(grad)
    } else {
        input.clone()
    };
    let bias = bias
        .map(|b| primitive(with_dtype(b, dtype)))
        .unwrap_or_else(|| input.clone());
    let output = empty_like(&input, Shape::new([rows, width]), dtype);
    let lanes = vector_lanes(&[&input, &bias, &grad, &output]);
    let vectors = rows * width / lanes;
    if vectors > 0 {
        let cube_dim = CubeDim::new_1d(ELEMENT_UNITS);
        let (input_stride, grad_stride) = (stride(&input, 0), stride(&grad, 0));
        let output_stride = stride(&output, 0);
        // SAFETY: the kernel keeps its accesses inside its arrays (module docs).
        unsafe {
            kernels::bias_gelu::launch_unchecked::<R>(
                &input.client,
                calculate_cube_count_elemwise(&input.client, vectors, cube_dim),
                cube_dim,
                lanes,
                input.clone().into_array_arg(),
                bias.into_array_arg(),
                grad.into_array_arg(),
                output.clone().into_array_arg(),
                u32_of(vectors, "elements"),
                u32_of(width / lanes, "width"),
                input_stride,
                grad_stride,
                output_stride,
                has_bias,
                gelu == Gelu::Tanh,
                derivative,
                dtype.into(),
            )
        };
    }
    tensor(output)
}

/// `residual + dropout(input + bias)`, each part optional.
fn launch_bias_dropout_add<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    input: Tensor<Backend<R, F, I, BT>, 3>,
    bias: Option<Tensor<Backend<R, F, I, BT>, 1>>,
    residual: Option<Tensor<Backend<R, F, I, BT>, 3>>,
    dropout: Option<Dropout>,
) -> Tensor<Backend<R, F, I, BT>, 3> {
    let [batch, seq, width] = input.dims();
    let dtype = input.dtype();
    let (has_bias, has_residual) = (bias.is_some(), residual.is_some());
    let input = primitive(input);
    let bias = bias
        .map(|b| primitive(with_dtype(b, dtype)))
        .unwrap_or_else(|| input.clone());
    let residual = residual
        .map(|r| primitive(with_dtype(r, dtype)))
        .unwrap_or_else(|| input.clone());
    let output = empty_like(&input, Shape::new([batch, seq, width]), dtype);
    let site = dropout.unwrap_or(Dropout {
        p: 0.0,
        seed: 0,
        full: [batch, seq, width],
        offsets: [0; 3],
    });
    assert!(
        (0.0..1.0).contains(&site.p),
        "dropout probability {} must be in [0, 1)",
        site.p
    );
    for dim in 0..3 {
        assert!(
            site.offsets[dim] + [batch, seq, width][dim] <= site.full[dim],
            "part {:?} at {:?} is outside {:?}",
            [batch, seq, width],
            site.offsets,
            site.full
        );
    }
    let has_dropout = site.p > 0.0;
    let threshold = keep_threshold(site.p);
    let rows = site.full[0] * site.full[1];
    u32_of(rows, "rows of the full tensor");
    let lanes = vector_lanes(&[&input, &bias, &residual, &output]);
    if batch * seq * width > 0 {
        let (cubes, cube_dim) = row_vector_cubes(width / lanes);
        let token_strides = |t: &CubeTensor<R>| [stride(t, 0), stride(t, 1)];
        let [input_batch, input_token] = token_strides(&input);
        let [residual_batch, residual_token] = token_strides(&residual);
        let [output_batch, output_token] = token_strides(&output);
        // SAFETY: the kernel keeps its accesses inside its arrays (module docs).
        unsafe {
            kernels::bias_dropout_add::launch_unchecked::<R>(
                &input.client,
                CubeCount::Static(
                    cubes,
                    seq.min(MAX_CUBES_YZ) as u32,
                    batch.min(MAX_CUBES_YZ) as u32,
                ),
                cube_dim,
                lanes,
                input.clone().into_array_arg(),
                bias.into_array_arg(),
                residual.into_array_arg(),
                output.clone().into_array_arg(),
                u32_of(batch, "batch"),
                u32_of(seq, "sequence length"),
                u32_of(width, "hidden"),
                site.full[1] as u32,
                u32_of(site.full[2], "hidden"),
                input_batch,
                input_token,
                residual_batch,
                residual_token,
                output_batch,
                output_token,
                site.offsets[0] as u32,
                site.offsets[1] as u32,
                site.offsets[2] as u32,
                (site.seed >> 32) as u32,
                site.seed as u32,
                threshold,
                (1.0 / (1.0 - site.p)) as f32,
                has_bias,
                has_residual,
                has_dropout,
                lanes.is_multiple_of(4)
                    && site.full[2].is_multiple_of(4)
                    && site.offsets[2].is_multiple_of(4),
                dtype.into(),
            )
        };
    }
    tensor(output)
}
