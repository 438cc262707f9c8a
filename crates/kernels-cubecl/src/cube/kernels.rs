//! The CubeCL kernels. Inputs and outputs take the tensors' float type (`F`, chosen at
//! launch: f32, bf16 or f16); all arithmetic is fp32. Row kernels run [`GROUP_UNITS`]
//! units per row, [`ROW_GROUPS`] rows per cube, and reduce a row in one plane (a CUDA
//! warp) or through shared memory where planes have another size (wgpu on lavapipe).
//!
//! Matrices are addressed through their row strides: CubeCL allocates pitched tensors on
//! CUDA (each row padded to an alignment), so rows are not `width` apart in general. The
//! last dimension is always dense, and 1-D tensors (weights, biases, statistics) too.
//!
//! Buffers are `Array` arguments, never `Tensor` ones, and the strides come in as scalar
//! arguments (in elements): for every `Tensor` argument CubeCL copies its shape and strides
//! to the device at each launch (whether the kernel reads them or not), one host-to-device
//! copy per launch, and every 64 copies the host waits for the device to reach the copy 64
//! before (CubeCL's pending-drop queue). An `Array`'s length and a kernel's scalars travel
//! in the launch's parameters.

use cubecl::prelude::*;

/// Units per row in the row kernels (a power of two: the tree reduction halves it), one
/// CUDA warp.
pub(super) const GROUP_UNITS: u32 = 32;
/// The shuffle steps of a butterfly over [`GROUP_UNITS`] units.
const GROUP_STEPS: u32 = GROUP_UNITS.trailing_zeros();
/// Rows per cube in the row kernels.
pub(super) const ROW_GROUPS: u32 = 8;

/// The sum of `value` over the [`GROUP_UNITS`] units of this unit's plane (a CUDA warp;
/// every unit gets the same sum, each step adding the same two values in either unit): a
/// butterfly of [`GROUP_STEPS`] shuffles, unrolled. CubeCL's `plane_sum` loops up to the
/// plane's size, known only at run time, a compare and a branch a step, and two sums wait
/// for each other's loop: on an H200 (bf16) the norm backward with this (and its warps'
/// first units found without a division) moved 49% and 68% of 4.3 TB/s at 8192 and 32768
/// x 1280, against 44% and 62% (a fifth fewer instructions). The row kernels'
/// [`group_sum`] keeps `plane_sum`: with this there, the cross-entropy statistics (a sum
/// a row of 50304 logits) moved 69% in two runs, against 83-84% in four without.
#[cube]
fn warp_sum(value: f32) -> f32 {
    let mut total = value;
    #[unroll]
    for step in 0..GROUP_STEPS {
        total += plane_shuffle_xor(total, (GROUP_UNITS / 2) >> step);
    }
    total
}

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

/// The sum of a vector's lanes.
#[cube]
fn lanes_sum<N: Size>(vector: Vector<f32, N>) -> f32 {
    let mut total = vector[0usize];
    #[unroll]
    for lane in 1..vector.vector_size() {
        total += vector[lane];
    }
    total
}

/// The largest of a vector's lanes.
#[cube]
fn lanes_max<N: Size>(vector: Vector<f32, N>) -> f32 {
    let mut largest = f32::new(MASKED);
    #[unroll]
    for lane in 0..vector.vector_size() {
        largest = f32::max(largest, vector[lane]);
    }
    largest
}

/// LayerNorm (`centered`) or RMSNorm of this unit's row, read in vectors of `N`
/// elements: writes the output and the row's mean and reciprocal standard deviation.
/// With `unrolled` (the row's vectors per unit, where few) both passes are unrolled, so
/// that a unit's loads are all in flight at once; a loop waits for each load before the
/// next (H200, bf16, 8192 x 1280: 67% of 4.3 TB/s against 59%). A cube takes `CUBE_DIM_Y`
/// rows (without planes at most [`ROW_GROUPS`]: the shared memory holds that many).
#[cube(launch_unchecked)]
pub(super) fn norm_forward<F: Float, N: Size>(
    input: &Array<Vector<F, N>>,
    weight: &Array<Vector<F, N>>,
    bias: &Array<Vector<F, N>>,
    output: &mut Array<Vector<F, N>>,
    mean: &mut Array<f32>,
    rstd: &mut Array<f32>,
    rows: u32,
    width: u32,
    input_stride: u32,
    output_stride: u32,
    epsilon: f32,
    #[comptime] centered: bool,
    #[comptime] plane: bool,
    #[comptime] unrolled: usize,
    #[define(F)] _dtype: StorageType,
) {
    // The output pass reads the row again rather than keeping it in registers: on an H200
    // that was faster (bf16, 8192 x 1280: 2880 against 2490 GB/s).
    let lanes = input.vector_size();
    let slot = row_slot(rows, width / lanes as u32);
    let row = slot.row;
    let vectors = slot.columns;
    let mut shared = SharedMemory::<f32>::new(256usize);
    let start = row * input_stride as usize / lanes;
    let output_start = row * output_stride as usize / lanes;
    let step = CUBE_DIM_X as usize;
    let count = f32::cast_from(width);

    // One pass for Σx and Σx²; the variance `E[x²] - mean²` is exact enough unless the
    // mean dominates the spread, and then a second pass sums `(x - mean)²`.
    let mut sum = Vector::<f32, N>::new(0.0f32);
    let mut squares = Vector::<f32, N>::new(0.0f32);
    if comptime!(unrolled > 0) {
        #[unroll]
        for i in 0..unrolled {
            let vector = UNIT_POS_X as usize + i * step;
            if vector < vectors {
                let x = Vector::<f32, N>::cast_from(input[start + vector]);
                sum += x;
                squares += x * x;
            }
        }
    } else {
        let mut vector = UNIT_POS_X as usize;
        while vector < vectors {
            let x = Vector::<f32, N>::cast_from(input[start + vector]);
            sum += x;
            squares += x * x;
            vector += step;
        }
    }
    let mut row_mean = 0.0f32;
    if centered {
        row_mean = group_sum(lanes_sum(sum), &mut shared, plane) / count;
    }
    let mean_vector = Vector::<f32, N>::new(row_mean);
    let mut variance =
        group_sum(lanes_sum(squares), &mut shared, plane) / count - row_mean * row_mean;
    if centered {
        // Whether this row needs the exact pass is the same for all its units, but not
        // for all rows of the cube: the reduction stays outside the condition, since
        // without planes it synchronizes the whole cube.
        let exact = row_mean * row_mean > variance;
        let mut squares = Vector::<f32, N>::new(0.0f32);
        let mut vector = select(exact, UNIT_POS_X as usize, vectors);
        while vector < vectors {
            let centered_value = Vector::<f32, N>::cast_from(input[start + vector]) - mean_vector;
            squares += centered_value * centered_value;
            vector += step;
        }
        let exact_variance = group_sum(lanes_sum(squares), &mut shared, plane) / count;
        if exact {
            variance = exact_variance;
        }
    }
    let row_rstd = 1.0f32 / f32::sqrt(f32::max(variance, 0.0f32) + epsilon);
    let rstd_vector = Vector::<f32, N>::new(row_rstd);

    if comptime!(unrolled > 0) {
        #[unroll]
        for i in 0..unrolled {
            let vector = UNIT_POS_X as usize + i * step;
            if vector < vectors {
                output[output_start + vector] = norm_output(
                    Vector::<f32, N>::cast_from(input[start + vector]),
                    weight[vector],
                    bias[vector],
                    mean_vector,
                    rstd_vector,
                    centered,
                );
            }
        }
    } else {
        let mut vector = UNIT_POS_X as usize;
        while vector < vectors {
            output[output_start + vector] = norm_output(
                Vector::<f32, N>::cast_from(input[start + vector]),
                weight[vector],
                bias[vector],
                mean_vector,
                rstd_vector,
                centered,
            );
            vector += step;
        }
    }
    if slot.active && UNIT_POS_X == 0 {
        mean[row] = row_mean;
        rstd[row] = row_rstd;
    }
}

/// The norm's output `(x - mean) · rstd · weight (+ bias)` of the vector `x`.
#[cube]
fn norm_output<F: Float, N: Size>(
    x: Vector<f32, N>,
    weight: Vector<F, N>,
    bias: Vector<F, N>,
    mean: Vector<f32, N>,
    rstd: Vector<f32, N>,
    #[comptime] centered: bool,
) -> Vector<F, N> {
    let mut value = (x - mean) * rstd * Vector::<f32, N>::cast_from(weight);
    if centered {
        value += Vector::<f32, N>::cast_from(bias);
    }
    Vector::cast_from(value)
}

/// LayerNorm (`centered`) or RMSNorm of wide rows split over a cube's `row_units` units,
/// each holding its `per_unit` vectors `UNIT_POS_X + i · row_units` in registers, `slots`
/// rows a cube (row `CUBE_POS · slots + UNIT_POS_Y`); a row's units reduce together
/// through [`row_sums`]. For rows whose warp would loop over more than a few vectors a
/// unit in [`norm_forward`] (H200, bf16, 8192 x 4096: 58% of 4.3 TB/s against 47%, with
/// the variance from the sums shifted by the row's first element; now from two
/// reductions, not measured). LayerNorm's variance is the mean of `(x - mean)²` from the
/// registers, after the mean: exact whether the mean dwarfs the spread or an outlier does.
#[cube(launch_unchecked)]
pub(super) fn norm_forward_rows<F: Float, N: Size>(
    input: &Array<Vector<F, N>>,
    weight: &Array<Vector<F, N>>,
    bias: &Array<Vector<F, N>>,
    output: &mut Array<Vector<F, N>>,
    mean: &mut Array<f32>,
    rstd: &mut Array<f32>,
    rows: u32,
    width: u32,
    input_stride: u32,
    output_stride: u32,
    epsilon: f32,
    #[comptime] centered: bool,
    #[comptime] plane: bool,
    #[comptime] slots: usize,
    #[comptime] row_units: usize,
    #[comptime] per_unit: usize,
    #[define(F)] _dtype: StorageType,
) {
    let lanes = input.vector_size();
    let unit = UNIT_POS_X as usize;
    let row_vectors = width as usize / lanes;
    let inverse_count = 1.0f32 / f32::cast_from(width);
    let mut scratch =
        SharedMemory::<f32>::new(comptime!(row_scratch_len(2, slots, row_units, plane)));
    let visited = CUBE_POS * slots + UNIT_POS_Y as usize;
    let active = visited < rows as usize;
    let row = select(active, visited, 0usize);
    let start = row * input_stride as usize / lanes;
    let mut values = Array::<Vector<f32, N>>::new(per_unit);
    let mut sum = Vector::<f32, N>::new(0.0f32);
    let mut squares = Vector::<f32, N>::new(0.0f32);
    #[unroll]
    for i in 0..per_unit {
        let vector = unit + i * row_units;
        let mut x = Vector::<f32, N>::new(0.0f32);
        if vector < row_vectors {
            x = Vector::<f32, N>::cast_from(input[start + vector]);
        }
        values[i] = x;
        sum += x;
        squares += x * x;
    }
    // RMSNorm's mean square comes from the first reduction; LayerNorm's variance from a
    // second one, of `(x - mean)²` (the scratch's other buffer; a pair again, so that both
    // buffers have one layout).
    let mut totals = Array::<f32>::new(2usize);
    totals[0usize] = lanes_sum(sum);
    totals[1usize] = lanes_sum(squares);
    row_sums(
        &mut totals,
        &mut scratch,
        0usize,
        2usize,
        slots,
        row_units,
        plane,
    );
    let mut row_mean = 0.0f32;
    if centered {
        row_mean = totals[0usize] * inverse_count;
    }
    let mean_vector = Vector::<f32, N>::new(row_mean);
    let mut variance = totals[1usize] * inverse_count;
    if centered {
        let mut deviations = Vector::<f32, N>::new(0.0f32);
        #[unroll]
        for i in 0..per_unit {
            if unit + i * row_units < row_vectors {
                let deviation = values[i] - mean_vector;
                deviations += deviation * deviation;
            }
        }
        totals[0usize] = lanes_sum(deviations);
        totals[1usize] = 0.0f32;
        row_sums(
            &mut totals,
            &mut scratch,
            1usize,
            2usize,
            slots,
            row_units,
            plane,
        );
        variance = totals[0usize] * inverse_count;
    }
    let row_rstd = 1.0f32 / f32::sqrt(f32::max(variance, 0.0f32) + epsilon);
    let rstd_vector = Vector::<f32, N>::new(row_rstd);
    let output_start = row * output_stride as usize / lanes;
    #[unroll]
    for i in 0..per_unit {
        let vector = unit + i * row_units;
        if active && vector < row_vectors {
            output[output_start + vector] = norm_output(
                values[i],
                weight[vector],
                bias[vector],
                mean_vector,
                rstd_vector,
                centered,
            );
        }
    }
    if active && unit == 0 {
        mean[row] = row_mean;
        rstd[row] = row_rstd;
    }
}

/// `x̂ = (x - mean) · rstd` of the input vector at `at`.
#[cube]
fn normalized_input<F: Float, N: Size>(
    input: &Array<Vector<F, N>>,
    at: usize,
    mean: Vector<f32, N>,
    rstd: Vector<f32, N>,
) -> Vector<f32, N> {
    normalized(input[at], mean, rstd)
}

/// `x̂ = (x - mean) · rstd` of the input vector `x`.
#[cube]
fn normalized<F: Float, N: Size>(
    x: Vector<F, N>,
    mean: Vector<f32, N>,
    rstd: Vector<f32, N>,
) -> Vector<f32, N> {
    (Vector::<f32, N>::cast_from(x) - mean) * rstd
}

/// `g = grad · weight` of the gradient vector at `at`, column vector `vector`.
#[cube]
fn scaled_grad<F: Float, N: Size>(
    grad: &Array<Vector<F, N>>,
    weight: &Array<Vector<F, N>>,
    at: usize,
    vector: usize,
) -> Vector<f32, N> {
    Vector::<f32, N>::cast_from(grad[at]) * Vector::<f32, N>::cast_from(weight[vector])
}

/// A row's input gradient `rstd · (g - mean(g) - x̂ · mean(g · x̂))` as two fused
/// multiply-adds an element: `g · rstd + (x̂ · slope + offset)`.
#[derive(CubeType)]
struct InputGradCoefficients {
    rstd: f32,
    /// `-rstd · mean(g · x̂)`.
    slope: f32,
    /// `-rstd · mean(g)`.
    offset: f32,
}

#[cube]
fn input_grad_coefficients(
    scaled_mean: f32,
    projection_mean: f32,
    rstd: f32,
) -> InputGradCoefficients {
    InputGradCoefficients {
        rstd,
        slope: -rstd * projection_mean,
        offset: -rstd * scaled_mean,
    }
}

/// A row's [`InputGradCoefficients`] from this unit's vector sums of `g` and `g · x̂` (the
/// row's units add them: [`group_sum`]; no `mean(g)` for RMSNorm, `centered` off).
#[cube]
fn row_input_grad_coefficients<N: Size>(
    scaled_sum: Vector<f32, N>,
    projection: Vector<f32, N>,
    shared: &mut SharedMemory<f32>,
    count: f32,
    rstd: f32,
    #[comptime] centered: bool,
    #[comptime] plane: bool,
) -> InputGradCoefficients {
    let mut scaled_mean = 0.0f32;
    if centered {
        scaled_mean = group_sum(lanes_sum(scaled_sum), shared, plane) / count;
    }
    let projection_mean = group_sum(lanes_sum(projection), shared, plane) / count;
    input_grad_coefficients(scaled_mean, projection_mean, rstd)
}

#[cube]
impl InputGradCoefficients {
    /// The input gradient of `scaled = g` and `normalized = x̂`.
    fn apply<N: Size>(&self, scaled: Vector<f32, N>, normalized: Vector<f32, N>) -> Vector<f32, N> {
        scaled * Vector::new(self.rstd)
            + (normalized * Vector::new(self.slope) + Vector::new(self.offset))
    }
}

/// The input gradient of the norm for this unit's row, in vectors of `N` elements:
/// `rstd · (g - mean(g) - x̂ · mean(g · x̂))` with `g = grad · weight` (no `mean(g)` for
/// RMSNorm). The first `cached` vectors of each unit stay in registers between the two
/// passes; the rest are read again.
#[cube(launch_unchecked)]
pub(super) fn norm_backward_input<F: Float, N: Size>(
    grad: &Array<Vector<F, N>>,
    input: &Array<Vector<F, N>>,
    weight: &Array<Vector<F, N>>,
    mean: &Array<f32>,
    rstd: &Array<f32>,
    input_grad: &mut Array<Vector<F, N>>,
    rows: u32,
    width: u32,
    grad_stride: u32,
    input_stride: u32,
    input_grad_stride: u32,
    #[comptime] centered: bool,
    #[comptime] plane: bool,
    #[comptime] cached: usize,
    #[define(F)] _dtype: StorageType,
) {
    let lanes = input.vector_size();
    let slot = row_slot(rows, width / lanes as u32);
    let row = slot.row;
    let vectors = slot.columns;
    let mut shared = SharedMemory::<f32>::new(256usize);
    let start = row * input_stride as usize / lanes;
    let grad_start = row * grad_stride as usize / lanes;
    let output_start = row * input_grad_stride as usize / lanes;
    let step = CUBE_DIM_X as usize;
    let lane = UNIT_POS_X as usize;
    let count = f32::cast_from(width);
    let mean_vector = Vector::<f32, N>::new(mean[row]);
    let row_rstd = rstd[row];
    let rstd_vector = Vector::<f32, N>::new(row_rstd);
    // `grad · weight` and `x̂` of the cached vectors.
    let mut scaled_cache = Array::<Vector<f32, N>>::new(cached);
    let mut normalized_cache = Array::<Vector<f32, N>>::new(cached);

    let mut scaled_sum = Vector::<f32, N>::new(0.0f32);
    let mut projection = Vector::<f32, N>::new(0.0f32);
    #[unroll]
    for i in 0..cached {
        let vector = lane + i * step;
        if vector < vectors {
            let scaled = scaled_grad(grad, weight, grad_start + vector, vector);
            let normalized = normalized_input(input, start + vector, mean_vector, rstd_vector);
            scaled_cache[i] = scaled;
            normalized_cache[i] = normalized;
            scaled_sum += scaled;
            projection += scaled * normalized;
        }
    }
    let mut vector = lane + cached * step;
    while vector < vectors {
        let scaled = scaled_grad(grad, weight, grad_start + vector, vector);
        scaled_sum += scaled;
        projection += scaled * normalized_input(input, start + vector, mean_vector, rstd_vector);
        vector += step;
    }
    let coefficients = row_input_grad_coefficients(
        scaled_sum,
        projection,
        &mut shared,
        count,
        row_rstd,
        centered,
        plane,
    );

    #[unroll]
    for i in 0..cached {
        let vector = lane + i * step;
        if vector < vectors {
            let value = coefficients.apply(scaled_cache[i], normalized_cache[i]);
            input_grad[output_start + vector] = Vector::cast_from(value);
        }
    }
    let mut vector = lane + cached * step;
    while vector < vectors {
        let value = coefficients.apply(
            scaled_grad(grad, weight, grad_start + vector, vector),
            normalized_input(input, start + vector, mean_vector, rstd_vector),
        );
        input_grad[output_start + vector] = Vector::cast_from(value);
        vector += step;
    }
}

/// The sums over a row's units of each of this unit's `count` `values`, in place (every
/// unit of the row gets them); the row is the cube's row group `UNIT_POS_Y` of `groups`.
/// They go through `scratch` buffer `parity` (row steps alternate two buffers, so that one
/// barrier a step is enough: a unit writing a buffer again has passed the next step's
/// barrier, which every unit reaches only after reading it). With `plane` (rows of whole
/// warps) each warp reduces ([`warp_sum`]), then its first unit's sums go through shared
/// memory; otherwise every unit's do, and each unit adds its row's, in warp-sized groups
/// first.
#[cube]
fn row_sums(
    values: &mut Array<f32>,
    scratch: &mut SharedMemory<f32>,
    parity: usize,
    #[comptime] count: usize,
    #[comptime] groups: usize,
    #[comptime] row_units: usize,
    #[comptime] plane: bool,
) {
    let unit = UNIT_POS_X as usize;
    let group = UNIT_POS_Y as usize;
    let warps = comptime!(row_units / GROUP_UNITS as usize);
    if plane {
        let base = (parity * groups + group) * warps * count;
        #[unroll]
        for k in 0..count {
            values[k] = warp_sum(values[k]);
        }
        let warp = unit / GROUP_UNITS as usize;
        // The warp's first unit.
        if unit == warp * GROUP_UNITS as usize {
            #[unroll]
            for k in 0..count {
                scratch[base + warp * count + k] = values[k];
            }
        }
        sync_cube();
        #[unroll]
        for k in 0..count {
            let mut total = 0.0f32;
            #[unroll]
            for warp in 0..warps {
                total += scratch[base + warp * count + k];
            }
            values[k] = total;
        }
    } else {
        let base = (parity * groups + group) * row_units * count;
        #[unroll]
        for k in 0..count {
            scratch[base + unit * count + k] = values[k];
        }
        sync_cube();
        // Warp-sized groups first, then their totals, as the plane path adds (a single
        // running sum over hundreds of units rounds more).
        #[unroll]
        for k in 0..count {
            let mut total = 0.0f32;
            for warp in 0..warps {
                let mut part = 0.0f32;
                for lane in 0..GROUP_UNITS as usize {
                    let other = warp * GROUP_UNITS as usize + lane;
                    part += scratch[base + other * count + k];
                }
                total += part;
            }
            values[k] = total;
        }
    }
}

/// The floats of [`row_sums`]'s scratch for `count` values of `groups` rows of `row_units`
/// units: two buffers of `count` sums per warp (`plane`) or per unit.
pub(super) fn row_scratch_len(count: usize, groups: usize, row_units: usize, plane: bool) -> usize {
    let per_row = if plane {
        row_units / GROUP_UNITS as usize
    } else {
        row_units
    };
    2 * count * groups * per_row
}

/// This unit's vectors of row `row` of `grad` and `input` into `grads` and `inputs`, and the
/// row's mean and rstd into `statistics` (row 0 past the last row, vector 0 past the row's
/// end: in bounds, and masked by the caller).
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_row<F: Float, N: Size>(
    grad: &Array<Vector<F, N>>,
    input: &Array<Vector<F, N>>,
    mean: &Array<f32>,
    rstd: &Array<f32>,
    grads: &mut Array<Vector<F, N>>,
    inputs: &mut Array<Vector<F, N>>,
    statistics: &mut Array<f32>,
    row: usize,
    rows: u32,
    row_vectors: usize,
    grad_stride: u32,
    input_stride: u32,
    #[comptime] row_units: usize,
    #[comptime] per_unit: usize,
) {
    let lanes = input.vector_size();
    let row = select(row < rows as usize, row, 0usize);
    statistics[0usize] = mean[row];
    statistics[1usize] = rstd[row];
    #[unroll]
    for i in 0..per_unit {
        let wanted = UNIT_POS_X as usize + i * row_units;
        let vector = select(wanted < row_vectors, wanted, 0usize);
        grads[i] = grad[row * grad_stride as usize / lanes + vector];
        inputs[i] = input[row * input_stride as usize / lanes + vector];
    }
}

/// The whole norm backward in one pass, a row split over a cube's `row_units` units (each
/// its `per_unit` vectors `UNIT_POS_X + i · row_units`, so always the same columns) and
/// `slots` rows at a time: slot `UNIT_POS_Y` of cube `CUBE_POS` takes rows `CUBE_POS · slots
/// + UNIT_POS_Y`, then `CUBE_COUNT · slots` further, `row_steps` times (the last ones past
/// the end for some slots). For each row a unit reads its `grad`, `input`, mean and rstd
/// once, issuing the next row's loads (its mean and rstd with them) before this row's sums
/// so that they are in flight while it works and waits; it adds `grad · x̂` and `grad` to
/// its columns' sums, in registers (few per unit, since a row has many units), the row's
/// units add their two sums ([`row_sums`]), and each unit writes its input gradient
/// ([`InputGradCoefficients`]) from `grad · weight` and `x̂` kept in registers with
/// `cache`, else computed again. At the end the slots add their sums in
/// shared memory one after another (a fixed order), and the cube writes them as rows
/// `CUBE_POS` (weight) and `CUBE_COUNT + CUBE_POS` (bias, for LayerNorm) of the `[(1 or 2)
/// · cubes, width]` fp32 partials, summed over cubes afterwards.
#[cube(launch_unchecked)]
pub(super) fn norm_backward_rows<F: Float, N: Size>(
    grad: &Array<Vector<F, N>>,
    input: &Array<Vector<F, N>>,
    weight: &Array<Vector<F, N>>,
    mean: &Array<f32>,
    rstd: &Array<f32>,
    input_grad: &mut Array<Vector<F, N>>,
    partials: &mut Array<Vector<f32, N>>,
    rows: u32,
    width: u32,
    grad_stride: u32,
    input_stride: u32,
    input_grad_stride: u32,
    partials_stride: u32,
    row_steps: u32,
    #[comptime] centered: bool,
    #[comptime] plane: bool,
    #[comptime] slots: usize,
    #[comptime] row_units: usize,
    #[comptime] per_unit: usize,
    #[comptime] cache: bool,
    #[define(F)] _dtype: StorageType,
) {
    let lanes = input.vector_size();
    let unit = UNIT_POS_X as usize;
    let slot = UNIT_POS_Y as usize;
    let row_vectors = width as usize / lanes;
    let inverse_count = 1.0f32 / f32::cast_from(width);
    let span = comptime!(per_unit * row_units);
    let mut scratch =
        SharedMemory::<f32>::new(comptime!(row_scratch_len(2, slots, row_units, plane)));
    let mut totals = Array::<f32>::new(2usize);
    let mut weights = Array::<Vector<f32, N>>::new(per_unit);
    let mut weight_sums = Array::<Vector<f32, N>>::new(per_unit);
    let mut bias_sums = Array::<Vector<f32, N>>::new(per_unit);
    #[unroll]
    for i in 0..per_unit {
        let vector = unit + i * row_units;
        let inside = vector < row_vectors;
        // Zero past the row's end: such a vector adds nothing to the row's sums.
        weights[i] = select(
            inside,
            Vector::<f32, N>::cast_from(weight[select(inside, vector, 0usize)]),
            Vector::new(0.0f32),
        );
        weight_sums[i] = Vector::<f32, N>::new(0.0f32);
        bias_sums[i] = Vector::<f32, N>::new(0.0f32);
    }
    // This row's `grad` and `input` as loaded, and the next row's with its mean and rstd,
    // whose loads are in flight while this row is reduced.
    let mut grads = Array::<Vector<F, N>>::new(per_unit);
    let mut inputs = Array::<Vector<F, N>>::new(per_unit);
    let mut next_grads = Array::<Vector<F, N>>::new(per_unit);
    let mut next_inputs = Array::<Vector<F, N>>::new(per_unit);
    let mut next_statistics = Array::<f32>::new(2usize);
    // With `cache`, `grad · weight` and `x̂` as computed for the row's sums, for its input
    // gradient.
    let mut cached_scaled = Array::<Vector<f32, N>>::new(per_unit);
    let mut cached_x_hat = Array::<Vector<f32, N>>::new(per_unit);
    let rows_apart = CUBE_COUNT * slots;
    let first = CUBE_POS * slots + slot;
    load_row(
        grad,
        input,
        mean,
        rstd,
        &mut next_grads,
        &mut next_inputs,
        &mut next_statistics,
        first,
        rows,
        row_vectors,
        grad_stride,
        input_stride,
        row_units,
        per_unit,
    );

    for row_step in 0..row_steps as usize {
        let visited = first + row_step * rows_apart;
        let active = visited < rows as usize;
        let mean_vector = Vector::<f32, N>::new(next_statistics[0usize]);
        let row_rstd = next_statistics[1usize];
        let rstd_vector = Vector::<f32, N>::new(row_rstd);
        #[unroll]
        for i in 0..per_unit {
            grads[i] = next_grads[i];
            inputs[i] = next_inputs[i];
        }
        // The next row's loads, in flight while this row is reduced (on an H200, bf16,
        // issued here rather than after this row's sums: 69% against 65% of 4.3 TB/s at
        // 8192 x 4096).
        load_row(
            grad,
            input,
            mean,
            rstd,
            &mut next_grads,
            &mut next_inputs,
            &mut next_statistics,
            visited + rows_apart,
            rows,
            row_vectors,
            grad_stride,
            input_stride,
            row_units,
            per_unit,
        );
        // The row's two sums over this unit's elements, each from its first term (a
        // vector past the row's end has a zero weight, so adds nothing to them), and this
        // unit's columns' weight and bias sums (a row past the end must not add to those).
        if active {
            #[unroll]
            for i in 0..per_unit {
                let upstream = Vector::<f32, N>::cast_from(grads[i]);
                let x_hat = normalized(inputs[i], mean_vector, rstd_vector);
                let scaled = upstream * weights[i];
                weight_sums[i] += upstream * x_hat;
                bias_sums[i] += upstream;
                if cache {
                    cached_scaled[i] = scaled;
                    cached_x_hat[i] = x_hat;
                }
                #[unroll]
                for lane in 0..lanes {
                    if comptime!(i == 0 && lane == 0) {
                        totals[0usize] = scaled[lane];
                        totals[1usize] = scaled[lane] * x_hat[lane];
                    } else {
                        totals[0usize] += scaled[lane];
                        totals[1usize] += scaled[lane] * x_hat[lane];
                    }
                }
            }
        }
        row_sums(
            &mut totals,
            &mut scratch,
            row_step % 2,
            2usize,
            slots,
            row_units,
            plane,
        );
        let mut scaled_mean = 0.0f32;
        if centered {
            scaled_mean = totals[0usize] * inverse_count;
        }
        let coefficients =
            input_grad_coefficients(scaled_mean, totals[1usize] * inverse_count, row_rstd);

        let output_start = visited * input_grad_stride as usize / lanes;
        #[unroll]
        for i in 0..per_unit {
            let vector = unit + i * row_units;
            if active && vector < row_vectors {
                let value = if cache {
                    coefficients.apply(cached_scaled[i], cached_x_hat[i])
                } else {
                    coefficients.apply(
                        Vector::<f32, N>::cast_from(grads[i]) * weights[i],
                        normalized(inputs[i], mean_vector, rstd_vector),
                    )
                };
                input_grad[output_start + vector] = Vector::cast_from(value);
            }
        }
    }

    // The cube's sums: the weight's at vectors `[0, span)`, the bias's after them.
    let mut cube_sums = SharedMemory::<Vector<f32, N>>::new(comptime!(2 * span));
    #[unroll]
    for adding in 0..slots {
        if slot == adding {
            #[unroll]
            for i in 0..per_unit {
                let vector = unit + i * row_units;
                if adding == 0 {
                    cube_sums[vector] = weight_sums[i];
                    cube_sums[span + vector] = bias_sums[i];
                } else {
                    cube_sums[vector] = cube_sums[vector] + weight_sums[i];
                    cube_sums[span + vector] = cube_sums[span + vector] + bias_sums[i];
                }
            }
        }
        sync_cube();
    }
    // Whole vectors: written a float at a time, the stores' drain took 40% of the kernel's
    // samples at 528 x 1280 (H200, bf16).
    let weight_row = CUBE_POS * partials_stride as usize / lanes;
    let bias_row = (CUBE_COUNT + CUBE_POS) * partials_stride as usize / lanes;
    let mut vector = UNIT_POS as usize;
    while vector < row_vectors {
        partials[weight_row + vector] = cube_sums[vector];
        if centered {
            partials[bias_row + vector] = cube_sums[span + vector];
        }
        vector += row_units * slots;
    }
}

/// The rows `[first, end)` of chunk `chunk = CUBE_POS_Y` (`rows_per_chunk` rows each, the
/// last chunk shorter) that a unit of [`norm_backward_parameters`] adds up.
#[derive(CubeType)]
struct ChunkRows {
    chunk: usize,
    first: usize,
    end: usize,
}

#[cube]
fn chunk_rows(rows: u32, rows_per_chunk: u32) -> ChunkRows {
    let chunk = CUBE_POS_Y as usize;
    let first = chunk * rows_per_chunk as usize;
    let mut end = first + rows_per_chunk as usize;
    if end > rows as usize {
        end = rows as usize;
    }
    ChunkRows { chunk, first, end }
}

/// Partial weight and bias gradients of the norm: unit `vector` of cube
/// `(CUBE_POS_X, chunk = CUBE_POS_Y)` sums `grad · x̂` and `grad` over the chunk's rows for
/// `N` adjacent columns into rows `chunk` (weight) and `chunks + chunk` (bias, for
/// LayerNorm) of the `[(1 or 2) · chunks, width]` fp32 partials (summed over chunks
/// afterwards). Adjacent units read adjacent vectors.
#[cube(launch_unchecked)]
pub(super) fn norm_backward_parameters<F: Float, N: Size>(
    grad: &Array<Vector<F, N>>,
    input: &Array<Vector<F, N>>,
    mean: &Array<f32>,
    rstd: &Array<f32>,
    partials: &mut Array<Vector<f32, N>>,
    rows: u32,
    width: u32,
    grad_stride: u32,
    input_stride: u32,
    partials_stride: u32,
    rows_per_chunk: u32,
    #[comptime] centered: bool,
    #[define(F)] _dtype: StorageType,
) {
    let lanes = grad.vector_size();
    let vector = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    if vector >= width as usize / lanes {
        terminate!();
    }
    let ChunkRows { chunk, first, end } = chunk_rows(rows, rows_per_chunk);
    let mut weight_sum = Vector::<f32, N>::new(0.0f32);
    let mut bias_sum = Vector::<f32, N>::new(0.0f32);
    let mut row = first;
    while row < end {
        let upstream =
            Vector::<f32, N>::cast_from(grad[row * grad_stride as usize / lanes + vector]);
        let x = Vector::<f32, N>::cast_from(input[row * input_stride as usize / lanes + vector]);
        let normalized = (x - Vector::new(mean[row])) * Vector::new(rstd[row]);
        weight_sum += upstream * normalized;
        bias_sum += upstream;
        row += 1;
    }
    let stride = partials_stride as usize / lanes;
    partials[chunk * stride + vector] = weight_sum;
    if centered {
        partials[(CUBE_COUNT_Y as usize + chunk) * stride + vector] = bias_sum;
    }
}

/// Column sums in one pass, with no partial rows to add afterwards: cube `CUBE_POS_X` owns
/// `slice` adjacent column vectors (`N` columns each) over every row. Unit (`UNIT_POS_X`, a
/// vector of the slice; `UNIT_POS_Y`, one of `groups` row groups) adds rows `group, group +
/// groups, ...` (four a step, their loads independent); the cube then adds its groups'
/// sums in shared memory, halving them `log2(groups)` times (always the same order), and
/// writes the fp32 totals. On an H200 (bf16 bias gradient) this moved 79% of 4.3 TB/s at
/// 8192 x 5120, 98% at 8192 x 16384 and 91% at 32768 x 5120, against 71-72%, 88% and 94%
/// for partial sums of 128 row chunks and a second kernel adding them (same call).
#[cube(launch_unchecked)]
pub(super) fn column_totals<F: Float, N: Size>(
    input: &Array<Vector<F, N>>,
    sums: &mut Array<Vector<f32, N>>,
    rows: u32,
    width: u32,
    input_stride: u32,
    #[comptime] slice: usize,
    #[comptime] groups: usize,
    #[define(F)] _dtype: StorageType,
) {
    let lanes = input.vector_size();
    let lane = UNIT_POS_X as usize;
    let group = UNIT_POS_Y as usize;
    let wanted = CUBE_POS_X as usize * slice + lane;
    let inside = wanted < width as usize / lanes;
    let vector = select(inside, wanted, 0usize);
    let end = select(inside, rows as usize, 0usize);
    let stride = input_stride as usize / lanes;
    let mut total = Vector::<f32, N>::new(0.0f32);
    let mut row = group;
    while row + 3 * groups < end {
        let at = row * stride + vector;
        let a = Vector::<f32, N>::cast_from(input[at]);
        let b = Vector::<f32, N>::cast_from(input[at + groups * stride]);
        let c = Vector::<f32, N>::cast_from(input[at + 2 * groups * stride]);
        let d = Vector::<f32, N>::cast_from(input[at + 3 * groups * stride]);
        total += (a + b) + (c + d);
        row += 4 * groups;
    }
    while row < end {
        total += Vector::<f32, N>::cast_from(input[row * stride + vector]);
        row += groups;
    }
    let mut shared = SharedMemory::<Vector<f32, N>>::new(comptime!(slice * groups));
    let at = group * slice + lane;
    shared[at] = total;
    sync_cube();
    #[unroll]
    for step in 0..comptime!(groups.trailing_zeros()) {
        let half = comptime!(groups >> (step + 1));
        if group < half {
            shared[at] = shared[at] + shared[at + half * slice];
        }
        sync_cube();
    }
    if group == 0 && inside {
        sums[wanted] = shared[lane];
    }
}

/// Columns per cube of [`partial_sums`] (a warp: adjacent units read adjacent columns).
pub(super) const SUM_COLUMNS: u32 = 32;
/// Row groups per cube of [`partial_sums`], each adding every `SUM_GROUPS`-th partial row.
pub(super) const SUM_GROUPS: u32 = 16;

/// The totals of `[kinds · chunks, width]` fp32 partial rows over their chunks (a norm's
/// weight and bias partials), written in `F` as row `kind` of the `[kinds, width]` sums.
/// Cube `(CUBE_POS_X, kind = CUBE_POS_Y)` takes [`SUM_COLUMNS`] adjacent columns of partial
/// rows `kind · chunks ..`; its [`SUM_GROUPS`] row groups add every `SUM_GROUPS`-th row,
/// and shared memory adds the groups, always in the same order.
#[cube(launch_unchecked)]
pub(super) fn partial_sums<F: Float>(
    partials: &Array<f32>,
    sums: &mut Array<F>,
    chunks: u32,
    width: u32,
    partials_stride: u32,
    sums_stride: u32,
    #[define(F)] _dtype: StorageType,
) {
    let column = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    let kind = CUBE_POS_Y as usize;
    let group = UNIT_POS_Y as usize;
    let inside = column < width as usize;
    // Four partial rows a step, their loads independent: one row at a time, each load
    // waited for the last one's add (16 in a row at 256 partial rows).
    let first_row = kind * chunks as usize;
    let stride = partials_stride as usize;
    let groups = SUM_GROUPS as usize;
    let end = select(inside, chunks as usize, 0usize);
    let mut total = 0.0f32;
    let mut chunk = group;
    while chunk + 3 * groups < end {
        let at = (first_row + chunk) * stride + column;
        let a = partials[at];
        let b = partials[at + groups * stride];
        let c = partials[at + 2 * groups * stride];
        let d = partials[at + 3 * groups * stride];
        total += (a + b) + (c + d);
        chunk += 4 * groups;
    }
    while chunk < end {
        total += partials[(first_row + chunk) * stride + column];
        chunk += groups;
    }
    let mut shared = SharedMemory::<f32>::new((SUM_GROUPS * SUM_COLUMNS) as usize);
    shared[group * SUM_COLUMNS as usize + UNIT_POS_X as usize] = total;
    sync_cube();
    if group == 0 && inside {
        let mut sum = 0.0f32;
        #[unroll]
        for g in 0..SUM_GROUPS as usize {
            sum += shared[g * SUM_COLUMNS as usize + UNIT_POS_X as usize];
        }
        sums[kind * sums_stride as usize + column] = F::cast_from(sum);
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
/// Compiled with fast math: CUDA's `__expf` and `__fdividef` (a few ulp) in place of the
/// accurate `expf` and division, whose instructions bound the kernel on an H200 (GeLU
/// forward moved 48% of copy's bytes per second). `__expf` keeps infinities and NaN; the
/// divisions' denominators lie in [1, 2], where `__fdividef` is within 2 ulp.
#[cube(
    launch_unchecked,
    fast_math = FastMath::ReducedPrecision
        | FastMath::NotNaN
        | FastMath::NotInf
        | FastMath::AllowReciprocal
        | FastMath::UnsignedZero
)]
pub(super) fn bias_gelu<F: Float, N: Size>(
    input: &Array<Vector<F, N>>,
    bias: &Array<Vector<F, N>>,
    grad: &Array<Vector<F, N>>,
    output: &mut Array<Vector<F, N>>,
    vectors: u32,
    row_vectors: u32,
    input_stride: u32,
    grad_stride: u32,
    output_stride: u32,
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
    let mut x = Vector::<f32, N>::cast_from(input[row * input_stride as usize / lanes + column]);
    if has_bias {
        x += Vector::<f32, N>::cast_from(bias[column]);
    }
    let half = Vector::<f32, N>::new(0.5f32);
    let one = Vector::<f32, N>::new(1.0f32);
    let value = if tanh {
        // With u = c (x + a x³): ½(1 + tanh u) = σ(2u) and ½(1 - tanh² u) = 2σ(2u)σ(-2u),
        // from one exponential e = exp(-2|u|) (never overflowing) and one division.
        let c = Vector::<f32, N>::new(SQRT_2_OVER_PI);
        let cubic = Vector::<f32, N>::new(TANH_CUBIC);
        let zero = Vector::<f32, N>::new(0.0f32);
        let u = c * (x + cubic * x * x * x);
        let e = Vector::exp(Vector::new(-2.0f32) * Vector::abs(u));
        let near = one / (one + e);
        let far = e * near;
        let negative = u.less_than(zero);
        let sigmoid = select_many(negative, far, near);
        if derivative {
            let complement = select_many(negative, near, far);
            let three = Vector::<f32, N>::new(3.0f32);
            let slope = c * (one + three * cubic * x * x);
            sigmoid + Vector::new(2.0f32) * x * sigmoid * complement * slope
        } else {
            x * sigmoid
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
    let output_index = row * output_stride as usize / lanes + column;
    if derivative {
        let upstream =
            Vector::<f32, N>::cast_from(grad[row * grad_stride as usize / lanes + column]);
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

/// SplitMix64's output function (`dropout::mix`): the increment added, then the finalizer.
#[cube]
fn wide_mix(x: Wide) -> Wide {
    let x = wide_add(x, wide_constant(GAMMA));
    let x = wide_multiply(
        wide_xor_shift(x, 30u32),
        wide_constant(0xBF58_476D_1CE4_E5B9u64),
    );
    let x = wide_multiply(
        wide_xor_shift(x, 27u32),
        wide_constant(0x94D0_49BB_1331_11EBu64),
    );
    wide_xor_shift(x, 31u32)
}

/// `x >> 2`.
#[cube]
fn wide_quarter(x: Wide) -> Wide {
    Wide {
        high: x.high >> 2u32,
        low: (x.low >> 2u32) | (x.high << 30u32),
    }
}

/// SplitMix64's increment γ (`dropout::kept` draws group `g` as `mix(seed + g · γ)`).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// `value` as a [`Wide`] constant.
#[cube]
fn wide_constant(#[comptime] value: u64) -> Wide {
    Wide {
        high: comptime!((value >> 32) as u32),
        low: comptime!(value as u32),
    }
}

/// `seed + group · γ`, the value whose mix is group `group`'s 64-bit draw (later groups
/// `group + k` add `k · γ` to it).
#[cube]
fn group_base(seed: Wide, group: Wide) -> Wide {
    wide_add(seed, wide_multiply(group, wide_constant(GAMMA)))
}

/// 16-bit field `field` (0 to 3, from the least significant) of `hash`.
#[cube]
fn sixteen_bits(hash: Wide, field: u32) -> u32 {
    let word = select(field >= 2u32, hash.high, hash.low);
    (word >> ((field % 2u32) * 16u32)) & 0xFFFFu32
}

/// The factor of the `N` elements from flat position `first` of the full tensor: `scale`
/// where `dropout::kept` keeps the element, else 0. With `grouped` (`first` and `N` a
/// multiple of four) each hash serves four lanes and is computed once per group, the
/// groups' bases one constant apart.
#[cube]
fn dropout_mask<N: Size>(
    seed: Wide,
    first: Wide,
    threshold: u32,
    scale: f32,
    #[comptime] grouped: bool,
) -> Vector<f32, N> {
    let lanes = N::value();
    let mut mask = RuntimeCell::<Vector<f32, N>>::new(Vector::new(0.0f32));
    if grouped {
        let base = group_base(seed, wide_quarter(first));
        #[unroll]
        for group in 0..comptime!(lanes / 4) {
            let hash = wide_mix(wide_add(
                base,
                wide_constant(comptime!(GAMMA.wrapping_mul(group as u64))),
            ));
            #[unroll]
            for field in 0..4usize {
                let kept = sixteen_bits(hash, field as u32) >= threshold;
                mask.store_at(group * 4 + field, select(kept, scale, 0.0f32));
            }
        }
    } else {
        #[unroll]
        for lane in 0..lanes {
            let global = wide_add(
                first,
                Wide {
                    high: 0u32,
                    low: lane as u32,
                },
            );
            let hash = wide_mix(group_base(seed, wide_quarter(global)));
            let kept = sixteen_bits(hash, global.low % 4u32) >= threshold;
            mask.store_at(lane, select(kept, scale, 0.0f32));
        }
    }
    mask.consume()
}

/// The index, in vectors of `lanes` elements, of the vector at `column` of token `step` of
/// batch `batch` in a tensor with those strides (in elements).
#[cube]
fn token_vector(
    batch: u32,
    step: u32,
    batch_stride: u32,
    token_stride: u32,
    column: usize,
    lanes: usize,
) -> usize {
    (batch as usize * batch_stride as usize + step as usize * token_stride as usize + column)
        / lanes
}

/// `residual + dropout(input + bias)` over a `[batch, seq, width]` tensor, the part at
/// `offset_*` of a `[_, full_seq, full_width]` one (each part optional at compile time;
/// without residual and bias it is the dropout's backward; the seed comes as high and low
/// halves). A unit takes column vector `CUBE_POS_X · CUBE_DIM_X + UNIT_POS_X` (`N` elements)
/// of token `CUBE_POS_Y` of batch `CUBE_POS_Z`, and the same vector `CUBE_COUNT_Y` tokens
/// and `CUBE_COUNT_Z` batches further while any are left (a launch has at most 65535 cubes
/// along y and z): no division finds a unit's element. Elements are kept as
/// `dropout::kept` decides from their flat position in the full tensor; with `grouped`
/// (vectors of a multiple of four elements starting at multiples of four in the full
/// tensor) one hash serves four lanes.
#[cube(launch_unchecked)]
pub(super) fn bias_dropout_add<F: Float, N: Size>(
    input: &Array<Vector<F, N>>,
    bias: &Array<Vector<F, N>>,
    residual: &Array<Vector<F, N>>,
    output: &mut Array<Vector<F, N>>,
    batches: u32,
    seq: u32,
    width: u32,
    full_seq: u32,
    full_width: u32,
    input_batch_stride: u32,
    input_token_stride: u32,
    residual_batch_stride: u32,
    residual_token_stride: u32,
    output_batch_stride: u32,
    output_token_stride: u32,
    offset_batch: u32,
    offset_seq: u32,
    offset_column: u32,
    seed_high: u32,
    seed_low: u32,
    threshold: u32,
    scale: f32,
    #[comptime] has_bias: bool,
    #[comptime] has_residual: bool,
    #[comptime] has_dropout: bool,
    #[comptime] grouped: bool,
    #[define(F)] _dtype: StorageType,
) {
    let lanes = input.vector_size();
    let vector = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    if vector >= width as usize / lanes {
        terminate!();
    }
    // The first column of this vector.
    let column = vector * lanes;
    let mut bias_value = Vector::<f32, N>::new(0.0f32);
    if has_bias {
        bias_value = Vector::<f32, N>::cast_from(bias[vector]);
    }
    let seed = Wide {
        high: seed_high,
        low: seed_low,
    };
    let mut batch = CUBE_POS_Z;
    while batch < batches {
        let mut step = CUBE_POS_Y;
        while step < seq {
            let mut value = Vector::<f32, N>::cast_from(
                input[token_vector(
                    batch,
                    step,
                    input_batch_stride,
                    input_token_stride,
                    column,
                    lanes,
                )],
            );
            if has_bias {
                value += bias_value;
            }
            if has_dropout {
                let full_row = (batch + offset_batch) * full_seq + step + offset_seq;
                // The flat position of the vector's first element in the full tensor.
                let first = wide_add(
                    Wide {
                        high: u32::mul_hi(full_row, full_width),
                        low: full_row * full_width,
                    },
                    Wide {
                        high: 0u32,
                        low: column as u32 + offset_column,
                    },
                );
                value *= dropout_mask::<N>(seed, first, threshold, scale, grouped);
            }
            if has_residual {
                value += Vector::<f32, N>::cast_from(
                    residual[token_vector(
                        batch,
                        step,
                        residual_batch_stride,
                        residual_token_stride,
                        column,
                        lanes,
                    )],
                );
            }
            output[token_vector(
                batch,
                step,
                output_batch_stride,
                output_token_stride,
                column,
                lanes,
            )] = Vector::cast_from(value);
            step += CUBE_COUNT_Y;
        }
        batch += CUBE_COUNT_Z;
    }
}

// The kernels with exponentials compile with fast math: CUDA's `__expf` (within a few
// ulp; Megatron's fused softmax is built with `--use_fast_math` too). Their values are
// finite: masked scores are `MASKED`, not infinities.

/// What a masked score becomes (as the reference's `mask_fill(f32::MIN)`): a fully masked
/// row comes out uniform.
const MASKED: f32 = -3.402_823_5e38;

/// Whether key `key` is hidden from query `query` whose batch's padding row starts at
/// `padding_start`.
#[cube]
fn hidden_key(
    padding: &Array<f32>,
    padding_start: usize,
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
        hidden = hidden || padding[padding_start + key] > 0.5f32;
    }
    hidden
}

/// An attention row: query `query` of head `head` of batch `batch`, whose batch's row of
/// the padding mask starts at `padding_start`.
#[derive(CubeType, Clone, Copy)]
struct AttentionRow {
    batch: usize,
    head: usize,
    query: usize,
    padding_start: usize,
}

#[cube]
fn attention_row(row: usize, heads: u32, queries: u32, padding_stride: u32) -> AttentionRow {
    let queries = queries as usize;
    let batch = row / (queries * heads as usize);
    AttentionRow {
        batch,
        head: (row / queries) % heads as usize,
        query: row % queries,
        padding_start: batch * padding_stride as usize,
    }
}

/// Where the row's first key is in a `[batch, heads, queries, keys]` tensor whose first
/// three dimensions have these strides (in elements).
#[cube]
fn row_start(batch_stride: u32, head_stride: u32, query_stride: u32, at: AttentionRow) -> usize {
    at.batch * batch_stride as usize
        + at.head * head_stride as usize
        + at.query * query_stride as usize
}

/// This row's scores of key vector `vector` times `scale`, masked keys at [`MASKED`].
#[cube]
fn scaled_scores<F: Float, N: Size>(
    scores: &Array<Vector<F, N>>,
    padding: &Array<f32>,
    start: usize,
    vector: usize,
    at: AttentionRow,
    scale: f32,
    #[comptime] causal: bool,
    #[comptime] has_padding: bool,
) -> Vector<f32, N> {
    let values = Vector::<f32, N>::cast_from(scores[start + vector]) * Vector::new(scale);
    with_masked_keys(
        values,
        f32::new(MASKED),
        padding,
        at,
        vector,
        causal,
        has_padding,
    )
}

/// Softmax of this unit's row of `scores · scale` over the keys, masked keys at
/// [`MASKED`], in vectors of `N` keys; arithmetic in fp32, probabilities in `F`. Under a
/// causal mask alone, the key vectors past the query are not read (their probabilities
/// are written as 0).
#[cube(launch_unchecked, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
pub(super) fn softmax_forward<F: Float, N: Size>(
    scores: &Array<Vector<F, N>>,
    padding: &Array<f32>,
    probabilities: &mut Array<Vector<F, N>>,
    scores_batch_stride: u32,
    scores_head_stride: u32,
    scores_query_stride: u32,
    probabilities_batch_stride: u32,
    probabilities_head_stride: u32,
    probabilities_query_stride: u32,
    padding_stride: u32,
    rows: u32,
    heads: u32,
    queries: u32,
    keys: u32,
    scale: f32,
    #[comptime] causal: bool,
    #[comptime] has_padding: bool,
    #[comptime] plane: bool,
    #[comptime] cached: usize,
    #[define(F)] _dtype: StorageType,
) {
    let lanes = scores.vector_size();
    let slot = row_slot(rows, keys / lanes as u32);
    let row = slot.row;
    let vectors = slot.columns;
    let mut shared = SharedMemory::<f32>::new(256usize);
    let at = attention_row(row, heads, queries, padding_stride);
    let start = row_start(
        scores_batch_stride,
        scores_head_stride,
        scores_query_stride,
        at,
    ) / lanes;
    let out_start = row_start(
        probabilities_batch_stride,
        probabilities_head_stride,
        probabilities_query_stride,
        at,
    ) / lanes;
    let step = CUBE_DIM_X as usize;

    let lane = UNIT_POS_X as usize;
    let visible = visible_vectors(vectors, at.query, lanes, causal && !has_padding);
    // The first `cached` vectors of the unit stay in registers (scores, then their
    // exponentials): the row is read once and each exponential taken once when it fits.
    let mut cache = Array::<Vector<f32, N>>::new(cached);
    let mut largest = f32::new(MASKED);
    #[unroll]
    for i in 0..cached {
        let vector = lane + i * step;
        let mut values = Vector::<f32, N>::new(MASKED);
        if vector < visible {
            values = scaled_scores(
                scores,
                padding,
                start,
                vector,
                at,
                scale,
                causal,
                has_padding,
            );
        }
        cache[i] = values;
        largest = f32::max(largest, lanes_max(values));
    }
    // Beyond the cache: the maximum and the sum of exponentials in one pass (the sum
    // rescaled whenever the maximum grows), the exponentials again when writing.
    let mut rest_sum = 0.0f32;
    let mut rest_max = largest;
    let mut vector = lane + cached * step;
    while vector < visible {
        let values = scaled_scores(
            scores,
            padding,
            start,
            vector,
            at,
            scale,
            causal,
            has_padding,
        );
        let grown = f32::max(rest_max, lanes_max(values));
        rest_sum = rest_sum * f32::exp(rest_max - grown)
            + lanes_sum(Vector::exp(values - Vector::new(grown)));
        rest_max = grown;
        vector += step;
    }
    let row_max = group_max(rest_max, &mut shared, plane);
    let row_max_vector = Vector::<f32, N>::new(row_max);
    let mut sum = rest_sum * f32::exp(rest_max - row_max);
    #[unroll]
    for i in 0..cached {
        let vector = lane + i * step;
        if vector < visible {
            let exponentials = Vector::exp(cache[i] - row_max_vector);
            cache[i] = exponentials;
            sum += lanes_sum(exponentials);
        }
    }
    let reciprocal = Vector::<f32, N>::new(1.0f32 / group_sum(sum, &mut shared, plane));

    #[unroll]
    for i in 0..cached {
        let vector = lane + i * step;
        if vector < vectors {
            let mut value = Vector::<f32, N>::new(0.0f32);
            if vector < visible {
                value = cache[i] * reciprocal;
            }
            probabilities[out_start + vector] = Vector::cast_from(value);
        }
    }
    let mut vector = lane + cached * step;
    while vector < vectors {
        let mut value = Vector::<f32, N>::new(0.0f32);
        if vector < visible {
            let values = scaled_scores(
                scores,
                padding,
                start,
                vector,
                at,
                scale,
                causal,
                has_padding,
            );
            value = Vector::exp(values - row_max_vector) * reciprocal;
        }
        probabilities[out_start + vector] = Vector::cast_from(value);
        vector += step;
    }
}

/// How many of a row's `vectors` key vectors (of `lanes` keys) hold a key that query
/// `query` may see: with `causal_only` (a causal mask and no other), those up to the one
/// holding key `query` (the others are all masked: their probabilities are 0 and their
/// scores need not be read); otherwise all.
#[cube]
fn visible_vectors(
    vectors: usize,
    query: usize,
    lanes: usize,
    #[comptime] causal_only: bool,
) -> usize {
    let mut visible = vectors;
    if causal_only {
        let reached = query / lanes + 1;
        visible = select(reached < vectors, reached, vectors);
    }
    visible
}

/// The scores' gradient for this unit's row, in vectors of `N` keys:
/// `scale · p · (dp - Σ p·dp)`, zero where masked (all three in `F`, arithmetic in fp32).
/// The first `cached` vectors of each
/// unit stay in registers between the two passes; the rest are read again.
#[cube(launch_unchecked)]
pub(super) fn softmax_backward<F: Float, N: Size>(
    probabilities: &Array<Vector<F, N>>,
    grad: &Array<Vector<F, N>>,
    padding: &Array<f32>,
    grad_scores: &mut Array<Vector<F, N>>,
    probabilities_batch_stride: u32,
    probabilities_head_stride: u32,
    probabilities_query_stride: u32,
    grad_batch_stride: u32,
    grad_head_stride: u32,
    grad_query_stride: u32,
    grad_scores_batch_stride: u32,
    grad_scores_head_stride: u32,
    grad_scores_query_stride: u32,
    padding_stride: u32,
    rows: u32,
    heads: u32,
    queries: u32,
    keys: u32,
    scale: f32,
    #[comptime] causal: bool,
    #[comptime] has_padding: bool,
    #[comptime] plane: bool,
    #[comptime] cached: usize,
    #[define(F)] _dtype: StorageType,
) {
    let lanes = probabilities.vector_size();
    let slot = row_slot(rows, keys / lanes as u32);
    let row = slot.row;
    let vectors = slot.columns;
    let mut shared = SharedMemory::<f32>::new(256usize);
    let at = attention_row(row, heads, queries, padding_stride);
    let p_start = row_start(
        probabilities_batch_stride,
        probabilities_head_stride,
        probabilities_query_stride,
        at,
    ) / lanes;
    let g_start = row_start(grad_batch_stride, grad_head_stride, grad_query_stride, at) / lanes;
    let out_start = row_start(
        grad_scores_batch_stride,
        grad_scores_head_stride,
        grad_scores_query_stride,
        at,
    ) / lanes;
    let step = CUBE_DIM_X as usize;
    let lane = UNIT_POS_X as usize;
    // Key vectors past the query under a causal mask: their gradient is 0, nothing to read.
    let visible = visible_vectors(vectors, at.query, lanes, causal);
    let mut p_cache = Array::<Vector<f32, N>>::new(cached);
    let mut g_cache = Array::<Vector<f32, N>>::new(cached);

    let mut weighted = Vector::<f32, N>::new(0.0f32);
    #[unroll]
    for i in 0..cached {
        let vector = lane + i * step;
        if vector < visible {
            let p = Vector::<f32, N>::cast_from(probabilities[p_start + vector]);
            let g = Vector::<f32, N>::cast_from(grad[g_start + vector]);
            p_cache[i] = p;
            g_cache[i] = g;
            weighted += p * g;
        }
    }
    let mut vector = lane + cached * step;
    while vector < visible {
        weighted += Vector::<f32, N>::cast_from(probabilities[p_start + vector])
            * Vector::<f32, N>::cast_from(grad[g_start + vector]);
        vector += step;
    }
    let total = Vector::<f32, N>::new(group_sum(lanes_sum(weighted), &mut shared, plane));
    let scale_vector = Vector::<f32, N>::new(scale);

    #[unroll]
    for i in 0..cached {
        let vector = lane + i * step;
        if vector < vectors {
            let mut value = Vector::<f32, N>::new(0.0f32);
            if vector < visible {
                value = with_masked_keys(
                    p_cache[i] * (g_cache[i] - total) * scale_vector,
                    0.0f32,
                    padding,
                    at,
                    vector,
                    causal,
                    has_padding,
                );
            }
            grad_scores[out_start + vector] = Vector::cast_from(value);
        }
    }
    let mut vector = lane + cached * step;
    while vector < vectors {
        let mut value = Vector::<f32, N>::new(0.0f32);
        if vector < visible {
            let p = Vector::<f32, N>::cast_from(probabilities[p_start + vector]);
            let g = Vector::<f32, N>::cast_from(grad[g_start + vector]);
            value = with_masked_keys(
                p * (g - total) * scale_vector,
                0.0f32,
                padding,
                at,
                vector,
                causal,
                has_padding,
            );
        }
        grad_scores[out_start + vector] = Vector::cast_from(value);
        vector += step;
    }
}

/// `value` (the keys of vector `vector` of an attention row) with the masked keys set to
/// `fill`.
#[cube]
fn with_masked_keys<N: Size>(
    value: Vector<f32, N>,
    fill: f32,
    padding: &Array<f32>,
    at: AttentionRow,
    vector: usize,
    #[comptime] causal: bool,
    #[comptime] has_padding: bool,
) -> Vector<f32, N> {
    let mut result = value;
    if causal || has_padding {
        let lanes = value.vector_size();
        let mut masked = RuntimeCell::<Vector<f32, N>>::new(value);
        #[unroll]
        for lane in 0..lanes {
            let key = vector * lanes + lane;
            let hidden = hidden_key(
                padding,
                at.padding_start,
                at.query,
                key,
                causal,
                has_padding,
            );
            masked.store_at(lane, select(hidden, fill, value[lane]));
        }
        result = masked.consume();
    }
    result
}

/// The statistics of this unit's row of logits over its first `real_width` columns (in
/// `real_vectors` vectors, the last one possibly part padding; see
/// `LogitStatistics`): the maximum, `Σ exp(x - max)` (each unit keeps a running maximum
/// and rescales its sum, so the row is read once), `Σ x`, and the logit of column
/// `targets[row]` when it is a real one (else 0).
#[cube(launch_unchecked, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
pub(super) fn logit_statistics<F: Float, N: Size>(
    logits: &Array<Vector<F, N>>,
    targets: &Array<i32>,
    max: &mut Array<f32>,
    sum_exp: &mut Array<f32>,
    target: &mut Array<f32>,
    sum: &mut Array<f32>,
    rows: u32,
    logits_stride: u32,
    real_width: u32,
    real_vectors: u32,
    #[comptime] plane: bool,
    #[define(F)] _dtype: StorageType,
) {
    let lanes = logits.vector_size();
    let real = real_width as usize;
    let slot = row_slot(rows, real_vectors);
    let row = slot.row;
    let start = row * logits_stride as usize / lanes;
    let mut shared = SharedMemory::<f32>::new(256usize);

    let step = CUBE_DIM_X as usize;
    // Whole vectors of real columns without per-column checks...
    let whole = select(slot.active, real / lanes, 0usize);
    let mut largest = f32::new(MASKED);
    let mut exponentials = 0.0f32;
    let mut logit_sums = Vector::<f32, N>::new(0.0f32);
    let mut vector = UNIT_POS_X as usize;
    while vector < whole {
        let values = Vector::<f32, N>::cast_from(logits[start + vector]);
        let grown = f32::max(largest, lanes_max(values));
        exponentials = exponentials * f32::exp(largest - grown)
            + lanes_sum(Vector::exp(values - Vector::new(grown)));
        largest = grown;
        logit_sums += values;
        vector += step;
    }
    let mut logit_sum = lanes_sum(logit_sums);
    // ...then the vector holding the last real columns and padding, by the unit whose
    // turn it is.
    if vector == whole && whole < slot.columns {
        let values = Vector::<f32, N>::cast_from(logits[start + vector]);
        let first = vector * lanes;
        let mut grown = largest;
        #[unroll]
        for lane in 0..lanes {
            if first + lane < real {
                grown = f32::max(grown, values[lane]);
            }
        }
        let mut added = 0.0f32;
        #[unroll]
        for lane in 0..lanes {
            if first + lane < real {
                added += f32::exp(values[lane] - grown);
                logit_sum += values[lane];
            }
        }
        exponentials = exponentials * f32::exp(largest - grown) + added;
        largest = grown;
    }
    let row_max = group_max(largest, &mut shared, plane);
    let row_exponentials = group_sum(
        exponentials * f32::exp(largest - row_max),
        &mut shared,
        plane,
    );
    let row_sum = group_sum(logit_sum, &mut shared, plane);
    if slot.active && UNIT_POS_X == 0 {
        let column = targets[row];
        let mut picked = 0.0f32;
        if column >= 0 && column < real_width as i32 {
            let column = column as usize;
            let values = logits[start + column / lanes];
            picked = f32::cast_from(values[column % lanes]);
        }
        max[row] = row_max;
        sum_exp[row] = row_exponentials;
        target[row] = picked;
        sum[row] = row_sum;
    }
}

/// The cross-entropy's gradient for logit vector `ABSOLUTE_POS` (`N` columns of one row):
/// `grad · (exp(x - log_sum_exp) - target_weight · [column = target] - smoothing_share)`
/// on the first `real_width` columns, zero on the padding after them.
#[cube(launch_unchecked, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
pub(super) fn cross_entropy_backward<F: Float, N: Size>(
    logits: &Array<Vector<F, N>>,
    targets: &Array<i32>,
    log_sum_exp: &Array<f32>,
    grad: &Array<f32>,
    grad_logits: &mut Array<Vector<F, N>>,
    vectors: u32,
    logits_stride: u32,
    grad_logits_stride: u32,
    row_vectors: u32,
    real_width: u32,
    target_weight: f32,
    smoothing_share: f32,
    #[define(F)] _dtype: StorageType,
) {
    let position = ABSOLUTE_POS;
    if position >= vectors as usize {
        terminate!();
    }
    let lanes = logits.vector_size();
    let index = position as u32;
    let row = (index / row_vectors) as usize;
    let vector = (index % row_vectors) as usize;
    let shift = Vector::<f32, N>::new(log_sum_exp[row]);
    let x = Vector::<f32, N>::cast_from(logits[row * logits_stride as usize / lanes + vector]);
    let probabilities = Vector::exp(x - shift);
    let upstream = grad[row];
    let target_column = targets[row];
    let first = vector * lanes;
    let mut gradient = RuntimeCell::<Vector<f32, N>>::new(Vector::new(0.0f32));
    #[unroll]
    for lane in 0..lanes {
        let column = first + lane;
        let mut coefficient = probabilities[lane] - smoothing_share;
        if i32::cast_from(column) == target_column {
            coefficient -= target_weight;
        }
        gradient.store_at(
            lane,
            select(column < real_width as usize, coefficient * upstream, 0.0f32),
        );
    }
    grad_logits[row * grad_logits_stride as usize / lanes + vector] =
        Vector::cast_from(gradient.consume());
}

/// One AdamW step for this unit's vector of elements, in place on the master weights and
/// moments (see `FusedKernels::adamw`; `correction1`, `correction2`: `1 - β₁ᵗ`, `1 - β₂ᵗ`):
/// the plain-Burn reference's operations in its order, each rounded to fp32.
#[cube(launch)]
pub(super) fn adamw<N: Size>(
    master: &mut Array<Vector<f32, N>>,
    exp_avg: &mut Array<Vector<f32, N>>,
    exp_avg_sq: &mut Array<Vector<f32, N>>,
    grads: &Array<Vector<f32, N>>,
    decay: &Array<Vector<f32, N>>,
    vectors: u32,
    grad_factor: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    correction1: f32,
    correction2: f32,
    eps: f32,
    weight_decay: f32,
    lr: f32,
    #[comptime] scaled: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= vectors as usize {
        terminate!();
    }
    let mut grad = grads[i];
    if scaled {
        grad *= Vector::new(grad_factor);
    }
    let first = exp_avg[i] * Vector::new(beta1) + grad * Vector::new(one_minus_beta1);
    let second = exp_avg_sq[i] * Vector::new(beta2) + grad * grad * Vector::new(one_minus_beta2);
    exp_avg[i] = first;
    exp_avg_sq[i] = second;
    let corrected_first = first / Vector::new(correction1);
    let corrected_second = second / Vector::new(correction2);
    let weight = master[i];
    let update = corrected_first / (Vector::sqrt(corrected_second) + Vector::new(eps))
        + weight * decay[i] * Vector::new(weight_decay);
    master[i] = weight - update * Vector::new(lr);
}

/// An embedding's gradient: unit `i` adds element `i % width` of `grad`'s row `i / width`
/// (a token) to the same column of `table`'s row `ids[token]`, atomically in fp32 (tokens
/// that share an id add to one row).
#[cube(launch)]
pub(super) fn embedding_grad<F: Float>(
    grad: &Array<F>,
    ids: &Array<i32>,
    table: &mut Array<Atomic<f32>>,
    elements: u32,
    width: u32,
    grad_stride: u32,
    table_stride: u32,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= elements as usize {
        terminate!();
    }
    let token = i / width as usize;
    let column = i % width as usize;
    let row = usize::cast_from(ids[token]);
    let value = f32::cast_from(grad[token * grad_stride as usize + column]);
    table[row * table_stride as usize + column].fetch_add(value);
}

/// `flat[offset + i] = part[i]` in fp32 for the `vectors` vectors of `part` (`add`:
/// `flat[offset + i] += part[i]`): one parameter's gradient into the flat main-grad buffer.
#[cube(launch)]
pub(super) fn flatten_into<F: Float, N: Size>(
    part: &Array<Vector<F, N>>,
    flat: &mut Array<Vector<f32, N>>,
    offset: u32,
    vectors: u32,
    #[comptime] add: bool,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= vectors as usize {
        terminate!();
    }
    let at = offset as usize + i;
    let value = Vector::<f32, N>::cast_from(part[i]);
    if add {
        flat[at] += value;
    } else {
        flat[at] = value;
    }
}

/// Partial sums of squares in fp64: unit `ABSOLUTE_POS` adds the squares of vectors
/// `unit, unit + units, ...` of `values` (times `counted`'s, in fp32, where `masked`),
/// each element cast to fp64 before squaring, into `partials[unit]`.
#[cube(launch)]
pub(super) fn squares_fp64<N: Size>(
    values: &Array<Vector<f32, N>>,
    counted: &Array<Vector<f32, N>>,
    partials: &mut Array<f64>,
    vectors: u32,
    units: u32,
    #[comptime] masked: bool,
) {
    let unit = ABSOLUTE_POS;
    if unit >= units as usize {
        terminate!();
    }
    let mut sum = 0.0f64;
    let mut i = unit;
    while i < vectors as usize {
        let mut vector = values[i];
        if masked {
            vector *= counted[i];
        }
        #[unroll]
        for lane in 0..vector.vector_size() {
            let value = f64::cast_from(vector[lane]);
            sum += value * value;
        }
        i += units as usize;
    }
    partials[unit] = sum;
}
