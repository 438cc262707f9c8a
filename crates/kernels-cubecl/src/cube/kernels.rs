//! The CubeCL kernels. Inputs and outputs take the tensors' float type (`F`, chosen at
//! launch: f32, bf16 or f16); all arithmetic is fp32. Row kernels run [`GROUP_UNITS`]
//! units per row, [`ROW_GROUPS`] rows per cube, and reduce a row in one plane (a CUDA
//! warp) or through shared memory where planes have another size (wgpu on lavapipe).
//!
//! Matrices are addressed through their row strides: CubeCL allocates pitched tensors on
//! CUDA (each row padded to an alignment), so rows are not `width` apart in general. The
//! last dimension is always dense, and 1-D tensors (weights, biases, statistics) too.

use cubecl::prelude::*;

/// Units per row in the row kernels (a power of two: the tree reduction halves it), one
/// CUDA warp.
pub(super) const GROUP_UNITS: u32 = 32;
/// Rows per cube in the row kernels.
pub(super) const ROW_GROUPS: u32 = 8;

/// The sum of `value` over this row's units (`CUBE_DIM_X` of them, the group `UNIT_POS_Y`;
/// every unit gets it): one plane reduction when a plane is exactly the group (`plane`,
/// CUDA's warps), a tree through shared memory otherwise.
#[cube]
fn group_sum(value: f32, shared: &mut SharedMemory<f32>, #[comptime] plane: bool) -> f32 {
    if plane {
        plane_sum(value)
    } else {
        let lane = UNIT_POS_X as usize;
        let base = UNIT_POS_Y as usize * CUBE_DIM_X as usize;
        shared[base + lane] = value;
        sync_cube();
        let mut stride = (CUBE_DIM_X / 2) as usize;
        while stride > 0 {
            if lane < stride {
                shared[base + lane] = shared[base + lane] + shared[base + lane + stride];
            }
            sync_cube();
            stride /= 2;
        }
        let total = shared[base];
        sync_cube();
        total
    }
}

/// The maximum of `value` over this row's units, as [`group_sum`].
#[cube]
fn group_max(value: f32, shared: &mut SharedMemory<f32>, #[comptime] plane: bool) -> f32 {
    if plane {
        plane_max(value)
    } else {
        let lane = UNIT_POS_X as usize;
        let base = UNIT_POS_Y as usize * CUBE_DIM_X as usize;
        shared[base + lane] = value;
        sync_cube();
        let mut stride = (CUBE_DIM_X / 2) as usize;
        while stride > 0 {
            if lane < stride {
                shared[base + lane] = f32::max(shared[base + lane], shared[base + lane + stride]);
            }
            sync_cube();
            stride /= 2;
        }
        let total = shared[base];
        sync_cube();
        total
    }
}

/// This unit's row (`row`), whether it exists (`active`: a cube's last groups may have
/// none; they still take part in the cube's barriers), and how many of its columns to
/// visit (none when inactive).
#[derive(CubeType)]
struct RowSlot {
    row: usize,
    active: bool,
    columns: usize,
}

#[cube]
fn row_slot(rows: u32, width: u32) -> RowSlot {
    let row = CUBE_POS * CUBE_DIM_Y as usize + UNIT_POS_Y as usize;
    let active = row < rows as usize;
    RowSlot {
        row: select(active, row, 0usize),
        active,
        columns: select(active, width as usize, 0usize),
    }
}

/// LayerNorm (`centered`) or RMSNorm of this unit's row: writes the output and the row's
/// mean and reciprocal standard deviation.
#[cube(launch)]
pub(super) fn norm_forward<F: Float>(
    input: &Tensor<F>,
    weight: &Tensor<F>,
    bias: &Tensor<F>,
    output: &mut Tensor<F>,
    mean: &mut Tensor<f32>,
    rstd: &mut Tensor<f32>,
    rows: u32,
    width: u32,
    epsilon: f32,
    #[comptime] centered: bool,
    #[comptime] plane: bool,
    #[define(F)] _dtype: StorageType,
) {
    let slot = row_slot(rows, width);
    let row = slot.row;
    let columns = slot.columns;
    let mut shared = SharedMemory::<f32>::new(256usize);
    let start = row * input.stride(0);
    let output_start = row * output.stride(0);
    let step = CUBE_DIM_X as usize;
    let count = f32::cast_from(width);

    let mut row_mean = 0.0f32;
    if centered {
        let mut sum = 0.0f32;
        let mut column = UNIT_POS_X as usize;
        while column < columns {
            sum += f32::cast_from(input[start + column]);
            column += step;
        }
        row_mean = group_sum(sum, &mut shared, plane) / count;
    }
    let mut squares = 0.0f32;
    let mut column = UNIT_POS_X as usize;
    while column < columns {
        let centered_value = f32::cast_from(input[start + column]) - row_mean;
        squares += centered_value * centered_value;
        column += step;
    }
    let row_rstd = 1.0f32 / f32::sqrt(group_sum(squares, &mut shared, plane) / count + epsilon);

    let mut column = UNIT_POS_X as usize;
    while column < columns {
        let normalized = (f32::cast_from(input[start + column]) - row_mean) * row_rstd;
        let mut value = normalized * f32::cast_from(weight[column]);
        if centered {
            value += f32::cast_from(bias[column]);
        }
        output[output_start + column] = F::cast_from(value);
        column += step;
    }
    if slot.active && UNIT_POS_X == 0 {
        mean[row] = row_mean;
        rstd[row] = row_rstd;
    }
}

/// The input gradient of the norm for this unit's row:
/// `rstd · (g - mean(g) - x̂ · mean(g · x̂))` with `g = grad · weight` (no `mean(g)` for
/// RMSNorm).
#[cube(launch)]
pub(super) fn norm_backward_input<F: Float>(
    grad: &Tensor<F>,
    input: &Tensor<F>,
    weight: &Tensor<F>,
    mean: &Tensor<f32>,
    rstd: &Tensor<f32>,
    input_grad: &mut Tensor<F>,
    rows: u32,
    width: u32,
    #[comptime] centered: bool,
    #[comptime] plane: bool,
    #[define(F)] _dtype: StorageType,
) {
    let slot = row_slot(rows, width);
    let row = slot.row;
    let columns = slot.columns;
    let mut shared = SharedMemory::<f32>::new(256usize);
    let start = row * input.stride(0);
    let grad_start = row * grad.stride(0);
    let step = CUBE_DIM_X as usize;
    let count = f32::cast_from(width);
    let row_mean = mean[row];
    let row_rstd = rstd[row];

    let mut scaled_sum = 0.0f32;
    let mut projection = 0.0f32;
    let mut column = UNIT_POS_X as usize;
    while column < columns {
        let scaled = f32::cast_from(grad[grad_start + column]) * f32::cast_from(weight[column]);
        let normalized = (f32::cast_from(input[start + column]) - row_mean) * row_rstd;
        scaled_sum += scaled;
        projection += scaled * normalized;
        column += step;
    }
    let mut scaled_mean = 0.0f32;
    if centered {
        scaled_mean = group_sum(scaled_sum, &mut shared, plane) / count;
    }
    let projection_mean = group_sum(projection, &mut shared, plane) / count;

    let mut column = UNIT_POS_X as usize;
    while column < columns {
        let scaled = f32::cast_from(grad[grad_start + column]) * f32::cast_from(weight[column]);
        let normalized = (f32::cast_from(input[start + column]) - row_mean) * row_rstd;
        let value = row_rstd * (scaled - scaled_mean - normalized * projection_mean);
        input_grad[row * input_grad.stride(0) + column] = F::cast_from(value);
        column += step;
    }
}

/// Partial weight and bias gradients of the norm: unit `column` of cube
/// `(CUBE_POS_X, chunk = CUBE_POS_Y)` sums `grad · x̂` and `grad` over the chunk's rows
/// into `[chunks, width]` fp32 partials (summed over chunks afterwards). Adjacent units
/// read adjacent columns.
#[cube(launch)]
pub(super) fn norm_backward_parameters<F: Float>(
    grad: &Tensor<F>,
    input: &Tensor<F>,
    mean: &Tensor<f32>,
    rstd: &Tensor<f32>,
    weight_partial: &mut Tensor<f32>,
    bias_partial: &mut Tensor<f32>,
    rows: u32,
    width: u32,
    rows_per_chunk: u32,
    #[comptime] centered: bool,
    #[define(F)] _dtype: StorageType,
) {
    let column = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    let columns = width as usize;
    if column >= columns {
        terminate!();
    }
    let chunk = CUBE_POS_Y as usize;
    let first = chunk * rows_per_chunk as usize;
    let mut end = first + rows_per_chunk as usize;
    if end > rows as usize {
        end = rows as usize;
    }
    let mut weight_sum = 0.0f32;
    let mut bias_sum = 0.0f32;
    let mut row = first;
    while row < end {
        let upstream = f32::cast_from(grad[row * grad.stride(0) + column]);
        let normalized =
            (f32::cast_from(input[row * input.stride(0) + column]) - mean[row]) * rstd[row];
        weight_sum += upstream * normalized;
        bias_sum += upstream;
        row += 1;
    }
    weight_partial[chunk * weight_partial.stride(0) + column] = weight_sum;
    if centered {
        bias_partial[chunk * bias_partial.stride(0) + column] = bias_sum;
    }
}

/// The cubic coefficient of the tanh GeLU.
const TANH_CUBIC: f32 = 0.044715;
/// `√(2/π)`.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// `1/√2`.
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1/√(2π)`.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `gelu(input + bias)` (`tanh`: the approximation), or with `derivative`
/// `grad · gelu'(input + bias)`, for vector `ABSOLUTE_POS` (`N` elements of one row).
#[cube(launch)]
pub(super) fn bias_gelu<F: Float, N: Size>(
    input: &Tensor<Vector<F, N>>,
    bias: &Tensor<Vector<F, N>>,
    grad: &Tensor<Vector<F, N>>,
    output: &mut Tensor<Vector<F, N>>,
    vectors: u32,
    row_vectors: u32,
    #[comptime] has_bias: bool,
    #[comptime] tanh: bool,
    #[comptime] derivative: bool,
    #[define(F)] _dtype: StorageType,
) {
    let position = ABSOLUTE_POS;
    if position >= vectors as usize {
        terminate!();
    }
    let lanes = input.vector_size();
    // 32-bit division: 64-bit division costs the GPU tens of instructions per element.
    let index = position as u32;
    let row = (index / row_vectors) as usize;
    let column = (index % row_vectors) as usize;
    let mut x = Vector::<f32, N>::cast_from(input[row * input.stride(0) / lanes + column]);
    if has_bias {
        x += Vector::<f32, N>::cast_from(bias[column]);
    }
    let half = Vector::<f32, N>::new(0.5f32);
    let one = Vector::<f32, N>::new(1.0f32);
    let value = if tanh {
        let c = Vector::<f32, N>::new(SQRT_2_OVER_PI);
        let cubic = Vector::<f32, N>::new(TANH_CUBIC);
        let t = Vector::tanh(c * (x + cubic * x * x * x));
        if derivative {
            let three = Vector::<f32, N>::new(3.0f32);
            let slope = c * (one + three * cubic * x * x);
            half * (one + t) + half * x * (one - t * t) * slope
        } else {
            half * x * (one + t)
        }
    } else {
        let cdf = half * (one + error_function(x * Vector::new(FRAC_1_SQRT_2)));
        if derivative {
            let density = Vector::exp(Vector::new(-0.5f32) * x * x);
            cdf + x * Vector::new(FRAC_1_SQRT_2PI) * density
        } else {
            x * cdf
        }
    };
    let output_index = row * output.stride(0) / lanes + column;
    if derivative {
        let upstream = Vector::<f32, N>::cast_from(grad[row * grad.stride(0) / lanes + column]);
        output[output_index] = Vector::cast_from(value * upstream);
    } else {
        output[output_index] = Vector::cast_from(value);
    }
}

/// The error function (Abramowitz and Stegun 7.1.26, within 1.5e-7), written with binary
/// operations only: CubeCL's own polyfill negates vectors, which its CUDA vector types
/// do not support.
#[cube]
fn error_function<N: Size>(x: Vector<f32, N>) -> Vector<f32, N> {
    let zero = Vector::<f32, N>::new(0.0f32);
    let one = Vector::<f32, N>::new(1.0f32);
    let magnitude = Vector::abs(x);
    let t = one / (one + Vector::new(0.327_591_1f32) * magnitude);
    let mut poly = Vector::<f32, N>::new(1.061_405_4f32) * t + Vector::new(-1.453_152f32);
    poly = poly * t + Vector::new(1.421_413_7f32);
    poly = poly * t + Vector::new(-0.284_496_74f32);
    poly = poly * t + Vector::new(0.254_829_6f32);
    let positive = one - poly * t * Vector::exp(zero - magnitude * magnitude);
    select_many(x.less_than(zero), zero - positive, positive)
}

/// A 64-bit unsigned integer as two 32-bit halves (WGSL has no 64-bit integers).
#[derive(CubeType, Clone, Copy)]
struct Wide {
    high: u32,
    low: u32,
}

#[cube]
fn wide_add(a: Wide, b: Wide) -> Wide {
    let low = a.low + b.low;
    let carry = u32::cast_from(low < a.low);
    Wide {
        high: a.high + b.high + carry,
        low,
    }
}

#[cube]
fn wide_multiply(a: Wide, b: Wide) -> Wide {
    Wide {
        high: u32::mul_hi(a.low, b.low) + a.low * b.high + a.high * b.low,
        low: a.low * b.low,
    }
}

/// `x ^ (x >> shift)` for `0 < shift < 32`.
#[cube]
fn wide_xor_shift(x: Wide, #[comptime] shift: u32) -> Wide {
    Wide {
        high: x.high ^ (x.high >> shift),
        low: x.low ^ ((x.low >> shift) | (x.high << (32 - shift))),
    }
}

/// SplitMix64's finalizer (`dropout::mix`).
#[cube]
fn wide_mix(x: Wide) -> Wide {
    let x = wide_add(
        x,
        Wide {
            high: 0x9E37_79B9u32,
            low: 0x7F4A_7C15u32,
        },
    );
    let x = wide_multiply(
        wide_xor_shift(x, 30u32),
        Wide {
            high: 0xBF58_476Du32,
            low: 0x1CE4_E5B9u32,
        },
    );
    let x = wide_multiply(
        wide_xor_shift(x, 27u32),
        Wide {
            high: 0x94D0_49BBu32,
            low: 0x1331_11EBu32,
        },
    );
    wide_xor_shift(x, 31u32)
}

/// `residual + dropout(input + bias)` for element `ABSOLUTE_POS` of a `[batch, seq,
/// width]` tensor, the part at `offset_*` of a `[_, full_seq, full_width]` one (each part optional at compile time; without residual and bias it is
/// the dropout's backward; 64-bit values come as high and low halves). An element is kept when the top 53 bits of
/// `mix(seed ^ mix(global))` reach the threshold, `global` being its flat position in the
/// full tensor (`dropout::kept`).
#[cube(launch)]
pub(super) fn bias_dropout_add<F: Float, N: Size>(
    input: &Tensor<Vector<F, N>>,
    bias: &Tensor<Vector<F, N>>,
    residual: &Tensor<Vector<F, N>>,
    output: &mut Tensor<Vector<F, N>>,
    vectors: u32,
    seq: u32,
    width: u32,
    full_seq: u32,
    full_width: u32,
    offset_batch: u32,
    offset_seq: u32,
    offset_column: u32,
    seed_high: u32,
    seed_low: u32,
    threshold_high: u32,
    threshold_low: u32,
    scale: f32,
    #[comptime] has_bias: bool,
    #[comptime] has_residual: bool,
    #[comptime] has_dropout: bool,
    #[define(F)] _dtype: StorageType,
) {
    let position = ABSOLUTE_POS;
    if position >= vectors as usize {
        terminate!();
    }
    let lanes = input.vector_size();
    let row_vectors = width / lanes as u32;
    let index = position as u32;
    let token = index / row_vectors;
    // The first column of this vector.
    let column = (index % row_vectors) * lanes as u32;
    let batch = (token / seq) as usize;
    let step = (token % seq) as usize;
    let within = column as usize;
    let mut value = Vector::<f32, N>::cast_from(
        input[(batch * input.stride(0) + step * input.stride(1) + within) / lanes],
    );
    if has_bias {
        value += Vector::<f32, N>::cast_from(bias[column as usize / lanes]);
    }
    if has_dropout {
        let full_row = (token / seq + offset_batch) * full_seq + token % seq + offset_seq;
        let mut mask = RuntimeCell::<Vector<f32, N>>::new(Vector::new(0.0f32));
        #[unroll]
        for lane in 0..lanes {
            let global = wide_add(
                Wide {
                    high: u32::mul_hi(full_row, full_width),
                    low: full_row * full_width,
                },
                Wide {
                    high: 0u32,
                    low: column + lane as u32 + offset_column,
                },
            );
            let mixed = wide_mix(global);
            let hash = wide_mix(Wide {
                high: seed_high ^ mixed.high,
                low: seed_low ^ mixed.low,
            });
            // The top 53 bits, compared with the 53-bit threshold.
            let draw_high = hash.high >> 11u32;
            let draw_low = (hash.low >> 11u32) | (hash.high << 21u32);
            let kept = draw_high > threshold_high
                || (draw_high == threshold_high && draw_low >= threshold_low);
            mask.store_at(lane, select(kept, scale, 0.0f32));
        }
        value *= mask.consume();
    }
    if has_residual {
        value += Vector::<f32, N>::cast_from(
            residual[(batch * residual.stride(0) + step * residual.stride(1) + within) / lanes],
        );
    }
    output[(batch * output.stride(0) + step * output.stride(1) + within) / lanes] =
        Vector::cast_from(value);
}

/// What a masked score becomes (as the reference's `mask_fill(f32::MIN)`): a fully masked
/// row comes out uniform.
const MASKED: f32 = -3.402_823_5e38;

/// Whether key `key` is hidden from query `query` of batch `batch`.
#[cube]
fn hidden_key(
    padding: &Tensor<f32>,
    batch: usize,
    query: usize,
    key: usize,
    #[comptime] causal: bool,
    #[comptime] has_padding: bool,
) -> bool {
    let mut hidden = false;
    if causal {
        hidden = key > query;
    }
    if has_padding {
        hidden = hidden || padding[batch * padding.stride(0) + key] > 0.5f32;
    }
    hidden
}

/// An attention row: query `query` of head `head` of batch `batch`.
#[derive(CubeType, Clone, Copy)]
struct AttentionRow {
    batch: usize,
    head: usize,
    query: usize,
}

#[cube]
fn attention_row(row: usize, heads: u32, queries: u32) -> AttentionRow {
    let queries = queries as usize;
    AttentionRow {
        batch: row / (queries * heads as usize),
        head: (row / queries) % heads as usize,
        query: row % queries,
    }
}

/// Where the row's first key is in `tensor` (`[batch, heads, queries, keys]`).
#[cube]
fn row_start<E: CubePrimitive>(tensor: &Tensor<E>, at: AttentionRow) -> usize {
    at.batch * tensor.stride(0) + at.head * tensor.stride(1) + at.query * tensor.stride(2)
}

/// Softmax of this unit's row of `scores · scale` over the keys, masked keys at
/// [`MASKED`]; fp32 probabilities.
#[cube(launch)]
pub(super) fn softmax_forward<F: Float>(
    scores: &Tensor<F>,
    padding: &Tensor<f32>,
    probabilities: &mut Tensor<f32>,
    rows: u32,
    heads: u32,
    queries: u32,
    keys: u32,
    scale: f32,
    #[comptime] causal: bool,
    #[comptime] has_padding: bool,
    #[comptime] plane: bool,
    #[define(F)] _dtype: StorageType,
) {
    let slot = row_slot(rows, keys);
    let row = slot.row;
    let columns = slot.columns;
    let mut shared = SharedMemory::<f32>::new(256usize);
    let at = attention_row(row, heads, queries);
    let (batch, query) = (at.batch, at.query);
    let start = row_start::<F>(scores, at);
    let out_start = row_start::<f32>(probabilities, at);
    let step = CUBE_DIM_X as usize;

    let mut largest = f32::new(MASKED);
    let mut key = UNIT_POS_X as usize;
    while key < columns {
        let mut value = f32::cast_from(scores[start + key]) * scale;
        if hidden_key(padding, batch, query, key, causal, has_padding) {
            value = f32::new(MASKED);
        }
        largest = f32::max(largest, value);
        key += step;
    }
    let row_max = group_max(largest, &mut shared, plane);

    let mut sum = 0.0f32;
    let mut key = UNIT_POS_X as usize;
    while key < columns {
        let mut value = f32::cast_from(scores[start + key]) * scale;
        if hidden_key(padding, batch, query, key, causal, has_padding) {
            value = f32::new(MASKED);
        }
        sum += f32::exp(value - row_max);
        key += step;
    }
    let total = group_sum(sum, &mut shared, plane);

    let mut key = UNIT_POS_X as usize;
    while key < columns {
        let mut value = f32::cast_from(scores[start + key]) * scale;
        if hidden_key(padding, batch, query, key, causal, has_padding) {
            value = f32::new(MASKED);
        }
        probabilities[out_start + key] = f32::exp(value - row_max) / total;
        key += step;
    }
}

/// The scores' gradient for this unit's row: `scale · p · (dp - Σ p·dp)`, zero where
/// masked.
#[cube(launch)]
pub(super) fn softmax_backward<F: Float>(
    probabilities: &Tensor<f32>,
    grad: &Tensor<f32>,
    padding: &Tensor<f32>,
    grad_scores: &mut Tensor<F>,
    rows: u32,
    heads: u32,
    queries: u32,
    keys: u32,
    scale: f32,
    #[comptime] causal: bool,
    #[comptime] has_padding: bool,
    #[comptime] plane: bool,
    #[define(F)] _dtype: StorageType,
) {
    let slot = row_slot(rows, keys);
    let row = slot.row;
    let columns = slot.columns;
    let mut shared = SharedMemory::<f32>::new(256usize);
    let at = attention_row(row, heads, queries);
    let (batch, query) = (at.batch, at.query);
    let p_start = row_start::<f32>(probabilities, at);
    let g_start = row_start::<f32>(grad, at);
    let out_start = row_start::<F>(grad_scores, at);
    let step = CUBE_DIM_X as usize;

    let mut weighted = 0.0f32;
    let mut key = UNIT_POS_X as usize;
    while key < columns {
        weighted += probabilities[p_start + key] * grad[g_start + key];
        key += step;
    }
    let total = group_sum(weighted, &mut shared, plane);

    let mut key = UNIT_POS_X as usize;
    while key < columns {
        let p = probabilities[p_start + key];
        let mut value = p * (grad[g_start + key] - total) * scale;
        if hidden_key(padding, batch, query, key, causal, has_padding) {
            value = 0.0f32;
        }
        grad_scores[out_start + key] = F::cast_from(value);
        key += step;
    }
}
