//! cuBLASLt GEMMs on the device buffers of burn-cuda tensors.
//!
//! A GEMM is a task queued on cubecl's device thread (behind the Burn launches queued
//! before it; the calling thread does not wait), which runs it on our own stream, ordered
//! with Burn's stream on the device by a [`Handoff`] (one for a group of GEMMs made inside
//! `MegatronOps::gemm_group`, such as a linear layer's two backward products: five
//! launches less per GEMM after the first). Descriptors, layouts and the chosen
//! algorithm are cached per shape; the heuristic runs once per shape. Strided operands are
//! read in place: a row stride becomes the leading dimension, a transposed view flips the
//! transpose flag; anything else is made contiguous first. A `[batch, heads]` grid of
//! products is one strided-batched call, or one call per batch entry when an operand's
//! batch and head strides do not line up (attention's heads inside each token's row).

use std::cell::RefCell;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::cubecl::device::{Device as _, DeviceId, DeviceService, ServerUtilitiesHandle};
use burn_cubecl::cubecl::device_handle::DeviceHandle;
use burn_cubecl::cubecl::stream_id::StreamId;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream};

use super::{
    MegatronOps, reference_batched_gemm, reference_gemm, reference_gemm_accumulate, reference_ops,
};
use crate::cuda::{Handoff, address, host_sync, load_await_counter};

static TF32: AtomicBool = AtomicBool::new(false);

/// Lets fp32 GEMMs on CUDA use TF32 tensor cores (off by default: fp32 GEMMs are exact
/// fp32 products, as on CPU).
pub fn allow_tf32(allow: bool) {
    TF32.store(allow, Ordering::Relaxed);
}

/// Whether fp32 GEMMs queued now may use TF32 ([`allow_tf32`]).
fn tf32_allowed() -> bool {
    TF32.load(Ordering::Relaxed)
}

impl<F, I, BT> MegatronOps for CubeBackend<CudaRuntime, F, I, BT>
where
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn has_fast_gemm() -> bool {
        !reference_ops()
    }

    fn check_queued_ops() -> Result<(), String> {
        take_failure()
    }

    fn gemm_group<T>(products: impl FnOnce() -> T) -> T {
        if groups_off() {
            return products();
        }
        grouped(products)
    }

    fn memory_in_use(device: &Self::Device) -> Option<u64> {
        use burn_cubecl::cubecl::Runtime;
        let usage = CudaRuntime::client(device).memory_usage().ok()?;
        Some(usage.bytes_in_use)
    }

    fn gemm(
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> Tensor<Self, 2> {
        if reference_ops() {
            return reference_gemm(a, b, transpose_a, transpose_b);
        }
        let output = Self::batched_gemm(a.unsqueeze(), b.unsqueeze(), transpose_a, transpose_b);
        let [_, _, m, n] = output.dims();
        output.reshape([m, n])
    }

    fn batched_gemm(
        a: Tensor<Self, 4>,
        b: Tensor<Self, 4>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> Tensor<Self, 4> {
        batched_product(a, b, transpose_a, transpose_b, false, None)
    }

    fn gemm_bias(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        bias: Tensor<Self, 1>,
    ) -> Tensor<Self, 2> {
        if reference_ops() || !epilogue_bias_applies(&x, &weight, &bias) {
            let product = Self::gemm(x, weight, false, false);
            return <Self as burn_megatron_kernels::FusedKernels>::bias_add(product, bias);
        }
        let bias = bias.into_primitive().tensor();
        let output = batched_product(
            x.unsqueeze(),
            weight.unsqueeze(),
            false,
            false,
            false,
            Some(bias),
        );
        let [_, _, m, n] = output.dims();
        output.reshape([m, n])
    }

    fn batched_gemm_heads_merged(
        a: Tensor<Self, 4>,
        b: Tensor<Self, 4>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> Tensor<Self, 4> {
        batched_product(a, b, transpose_a, transpose_b, true, None)
    }

    fn gemm_accumulate(
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        transpose_a: bool,
        transpose_b: bool,
        sum: Option<Tensor<Self, 2>>,
    ) -> Tensor<Self, 2> {
        let dtype = a.dtype();
        if reference_ops()
            || dtype != b.dtype()
            || data_type(dtype).is_none()
            || sum.as_ref().is_some_and(|sum| sum.dtype() != DType::F32)
        {
            return reference_gemm_accumulate(a, b, transpose_a, transpose_b, sum);
        }
        let (a, b, [m, n, k]) = operands(
            a.unsqueeze::<4>().into_primitive().tensor(),
            b.unsqueeze::<4>().into_primitive().tensor(),
            transpose_a,
            transpose_b,
        );
        let device = a.tensor.device.clone();
        if m * n * k == 0 {
            return sum.unwrap_or_else(|| Tensor::zeros([m, n], (&device, DType::F32)));
        }
        let accumulate = sum.is_some();
        // The sum's buffer is both C and D: cuBLASLt adds the product to it in place.
        let output = sum.unwrap_or_else(|| {
            let output = contiguous_output(&a.tensor, [m, n], DType::F32);
            Tensor::from_primitive(TensorPrimitive::Float(output))
        });
        assert_eq!(output.dims(), [m, n], "gemm_accumulate: the sum's shape");
        // The 2-D tensor is the result: reshaping the 4-D view back would copy a pitched
        // sum before the GEMM has written it (see `contiguous_output`).
        let operand = Operand::new(
            output.clone().unsqueeze::<4>().into_primitive().tensor(),
            false,
        );
        queue_gemm(QueuedGemm {
            a,
            b,
            output: operand,
            dims: [m, n, k],
            grid: [1, 1],
            tf32: tf32_allowed(),
            accumulate,
            bias: None,
        });
        output
    }
}

/// Whether cuBLASLt's bias epilogue computes `x · weight + bias` here: one type for the
/// three (one cuBLASLt takes), nothing empty, and the bias a contiguous vector at a
/// 16-byte aligned address (cubecl's buffers start 512-byte aligned, so its offset in its
/// buffer tells; the epilogue's loads may assume that much, as Marian's use of it found).
fn epilogue_bias_applies<F, I, BT>(
    x: &Tensor<CubeBackend<CudaRuntime, F, I, BT>, 2>,
    weight: &Tensor<CubeBackend<CudaRuntime, F, I, BT>, 2>,
    bias: &Tensor<CubeBackend<CudaRuntime, F, I, BT>, 1>,
) -> bool
where
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    const BIAS_ALIGNMENT: u64 = 16;
    let dtype = x.dtype();
    let [m, k] = x.dims();
    let [k_weight, n] = weight.dims();
    if weight.dtype() != dtype
        || bias.dtype() != dtype
        || data_type(dtype).is_none()
        || m * n * k == 0
        || k != k_weight
        || bias.dims() != [n]
    {
        return false;
    }
    let bias = bias.clone().into_primitive().tensor();
    bias.meta.strides()[0] == 1
        && bias
            .handle
            .offset_start
            .unwrap_or(0)
            .is_multiple_of(BIAS_ALIGNMENT)
}

/// `op(a) · op(b)` over the `[batch, heads]` grid of 4-D `a` and `b` on cuBLASLt (Burn's
/// matmul where cuBLASLt does not apply); `heads_merged`: stored `[batch, m, heads, n]`
/// (see `MegatronOps::batched_gemm_heads_merged`); `bias`: added to every row in the
/// epilogue (a single product, checked by [`epilogue_bias_applies`]).
fn batched_product<F, I, BT>(
    a: Tensor<CubeBackend<CudaRuntime, F, I, BT>, 4>,
    b: Tensor<CubeBackend<CudaRuntime, F, I, BT>, 4>,
    transpose_a: bool,
    transpose_b: bool,
    heads_merged: bool,
    bias: Option<CubeTensor<CudaRuntime>>,
) -> Tensor<CubeBackend<CudaRuntime, F, I, BT>, 4>
where
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let dtype = a.dtype();
    let [batch, heads, _, _] = a.dims();
    if reference_ops()
        || dtype != b.dtype()
        || data_type(dtype).is_none()
        || b.dims()[..2] != [batch, heads]
    {
        return reference_batched_gemm(a, b, transpose_a, transpose_b);
    }
    let (a, b, [m, n, k]) = operands(
        a.into_primitive().tensor(),
        b.into_primitive().tensor(),
        transpose_a,
        transpose_b,
    );
    let device = a.tensor.device.clone();
    let shape = [batch, heads, m, n];
    if batch * heads * m * n * k == 0 {
        // An empty inner dimension sums nothing.
        return Tensor::zeros(shape, (&device, dtype));
    }
    let output = if heads_merged {
        // Stored [batch, m, heads, n]; the product's grid is its [batch, heads, m, n]
        // view (each head's rows `heads · n` apart: one strided-batched call per batch
        // entry, as for operands read that way).
        let stored = contiguous_output(&a.tensor, [batch, m, heads, n], dtype);
        Tensor::<CubeBackend<CudaRuntime, F, I, BT>, 4>::from_primitive(TensorPrimitive::Float(
            stored,
        ))
        .swap_dims(1, 2)
        .into_primitive()
        .tensor()
    } else {
        contiguous_output(&a.tensor, shape, dtype)
    };
    let output = Operand::new(output, false);
    let result = queue_gemm(QueuedGemm {
        a,
        b,
        output,
        dims: [m, n, k],
        grid: [batch, heads],
        tf32: tf32_allowed(),
        accumulate: false,
        bias,
    });
    Tensor::from_primitive(TensorPrimitive::Float(result))
}

/// An uninitialized GEMM output of `shape` on `like`'s device, stored contiguously.
/// cubecl's default layout pads rows to 512-byte multiples (pitched) where their bytes are
/// not one; Burn then makes a copy to drop the leading unit dimensions of a pitched
/// tensor, and inside a GEMM group that copy would be queued before the GEMM writes the
/// output (GPT-2's LM-head weight gradient, rows of 50304 bf16, read that way was garbage).
/// Contiguous, those reshapes only change metadata.
fn contiguous_output<const D: usize>(
    like: &CubeTensor<CudaRuntime>,
    shape: [usize; D],
    dtype: DType,
) -> CubeTensor<CudaRuntime> {
    burn_cubecl::ops::numeric::empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        shape.into(),
        dtype,
    )
}

/// The operands of `op(a) · op(b)` over the last two dimensions of 4-D `a` and `b`, and the
/// product's `[m, n, k]`.
fn operands(
    a: CubeTensor<CudaRuntime>,
    b: CubeTensor<CudaRuntime>,
    transpose_a: bool,
    transpose_b: bool,
) -> (Operand, Operand, [usize; 3]) {
    let a = Operand::new(a, transpose_a);
    let b = Operand::new(b, transpose_b);
    let (m, k) = a.product_dims();
    let (k_b, n) = b.product_dims();
    assert_eq!(
        k, k_b,
        "gemm: inner dimensions differ ({m}x{k} times {k_b}x{n})"
    );
    (a, b, [m, n, k])
}

/// Queues `gemm` after reporting an earlier GEMM's failure; gives its output.
fn queue_gemm(gemm: QueuedGemm) -> CubeTensor<CudaRuntime> {
    if let Err(error) = take_failure() {
        panic!("{error}");
    }
    let result = gemm.output.tensor.clone();
    // In an open group, the GEMM waits for the group's end (see `grouped`).
    let alone = GROUP.with(|group| match group.borrow_mut().as_mut() {
        Some(gemms) => {
            gemms.push(gemm);
            None
        }
        None => Some(gemm),
    });
    if let Some(gemm) = alone {
        dispatch(vec![gemm]);
    }
    result
}

thread_local! {
    /// The GEMMs queued on this thread since its group opened (see [`grouped`]).
    static GROUP: RefCell<Option<Vec<QueuedGemm>>> = const { RefCell::new(None) };
}

/// Whether GEMM groups are off (`BURN_MEGATRON_NO_GEMM_GROUPS=1`: each GEMM gets its own
/// hand-off, for telling a group's fault from another's; it found the pitched-output bug
/// of `contiguous_output`).
fn groups_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    burn_megatron_kernels::environment_switch(&OFF, "BURN_MEGATRON_NO_GEMM_GROUPS")
}

/// Runs `products`, queuing the GEMMs it makes together, under one hand-off, once it
/// returns (`MegatronOps::gemm_group`). A group inside another joins it.
pub(super) fn grouped<T>(products: impl FnOnce() -> T) -> T {
    /// Closes the group however `products` ends, queuing what it made.
    struct Close;
    impl Drop for Close {
        fn drop(&mut self) {
            let gemms = GROUP
                .with(|group| group.borrow_mut().take())
                .unwrap_or_default();
            if !gemms.is_empty() && !std::thread::panicking() {
                dispatch(gemms);
            }
        }
    }
    if GROUP.with(|group| group.borrow().is_some()) {
        return products();
    }
    GROUP.with(|group| *group.borrow_mut() = Some(Vec::new()));
    let _close = Close;
    products()
}

/// cuBLASLt's type of a Burn float dtype (none for the others).
fn data_type(dtype: DType) -> Option<sys::cudaDataType> {
    match dtype {
        DType::F32 => Some(sys::cudaDataType::CUDA_R_32F),
        DType::BF16 => Some(sys::cudaDataType::CUDA_R_16BF),
        DType::F16 => Some(sys::cudaDataType::CUDA_R_16F),
        _ => None,
    }
}

/// A `[batch, heads]` grid of matrices as stored: each row-major `[rows, cols]` with row
/// stride `ld`, used transposed or not, `batch_strides` elements apart.
struct Operand {
    tensor: CubeTensor<CudaRuntime>,
    rows: usize,
    cols: usize,
    ld: usize,
    transposed: bool,
    batch_strides: [usize; 2],
}

impl Operand {
    /// `tensor`: 4-D, `[batch, heads, rows, cols]`.
    fn new(tensor: CubeTensor<CudaRuntime>, transposed: bool) -> Self {
        let shape = tensor.meta.shape().to_vec();
        let strides = tensor.meta.strides().to_vec();
        let (rows, cols) = (shape[2], shape[3]);
        let (tensor, rows, cols, ld, transposed) = if strides[3] == 1 && strides[2] >= cols.max(1) {
            (tensor, rows, cols, strides[2], transposed)
        } else if strides[2] == 1 && strides[3] >= rows.max(1) {
            // Transposed views of row-major [cols, rows] matrices.
            (tensor, cols, rows, strides[3], !transposed)
        } else {
            let tensor = burn_cubecl::kernel::into_contiguous(tensor);
            (tensor, rows, cols, cols.max(1), transposed)
        };
        let batch_strides = [tensor.meta.strides()[0], tensor.meta.strides()[1]];
        Self {
            tensor,
            rows,
            cols,
            ld,
            transposed,
            batch_strides,
        }
    }

    /// The dimensions of the operand as it enters the product.
    fn product_dims(&self) -> (usize, usize) {
        if self.transposed {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }
}

/// How a `[batch, heads]` grid of products is issued: `calls` strided-batched calls of
/// `count` matrices each; per operand (A, B, D), the elements between the matrices of a
/// call and between calls.
#[derive(Debug, Clone, Copy)]
struct Batching {
    calls: usize,
    count: usize,
    strides: [usize; 3],
    call_strides: [usize; 3],
}

impl Batching {
    fn new([batch, heads]: [usize; 2], operands: [&Operand; 3]) -> Self {
        let strides = operands.map(|o| o.batch_strides);
        // One call when every operand's grid is evenly spaced.
        let even = |[outer, inner]: [usize; 2]| batch == 1 || heads == 1 || outer == heads * inner;
        if strides.iter().all(|&s| even(s)) {
            let stride = |[outer, inner]: [usize; 2]| match (batch * heads, heads) {
                (1, _) => 0,
                (_, 1) => outer,
                _ => inner,
            };
            Self {
                calls: 1,
                count: batch * heads,
                strides: strides.map(stride),
                call_strides: [0; 3],
            }
        } else {
            // Here batch > 1 and heads > 1.
            Self {
                calls: batch,
                count: heads,
                strides: strides.map(|[_, inner]| inner),
                call_strides: strides.map(|[outer, _]| outer),
            }
        }
    }
}

/// What one shape needs: the matmul descriptor, the layouts of A, B and D, the algorithm.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: Vec<sys::cublasLtMatrixLayout_t>,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // Safety: created by `Plan::new`, destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for &layout in &self.layouts {
                let _ = lt::destroy_matrix_layout(layout);
            }
        }
    }
}

/// The key of a plan: the inputs' and the output's types, TF32, transposes, sizes, leading
/// dimensions, the byte alignment of the A, B and D addresses (algorithms may assume more
/// than Burn's buffers give), the matrices per call with their strides (A, B, D), and the
/// bias's type when the epilogue adds one.
type PlanKey = (
    [DType; 2],
    bool,
    [bool; 2],
    [usize; 3],
    [usize; 3],
    [u32; 3],
    (usize, [usize; 3]),
    Option<DType>,
);

/// cuBLASLt on one GPU: handle, stream, workspace and the plans made so far.
struct Device {
    handle: sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    /// Kept alive for `workspace_address`.
    _workspace: CudaSlice<u8>,
    workspace_address: u64,
    plans: HashMap<PlanKey, Plan>,
    /// The hand-offs' waiting kernel, loaded once.
    await_counter: CudaFunction,
    /// One per cubecl stream that ran a GEMM here (each thread has its own), made with
    /// its first GEMM's output.
    handoffs: HashMap<StreamId, Handoff>,
    /// The multiprocessors the GEMMs are planned for ([`gemm_sm_count`]; `None`: all).
    sm_count: Option<i32>,
}

// Safety: used by one thread at a time (a `GemmQueue` on its device thread, or under the
// mutex of `run_here`).
unsafe impl Send for Device {}

/// Hopper's recommended cuBLASLt workspace.
const WORKSPACE_BYTES: usize = 32 << 20;

impl Device {
    fn new(index: usize) -> Result<Self, String> {
        let context = CudaContext::new(index).map_err(|e| format!("CUDA device {index}: {e:?}"))?;
        let stream = context
            .new_stream()
            .map_err(|e| format!("CUDA stream: {e:?}"))?;
        // Safety: the workspace is only handed to cuBLASLt, which writes before reading.
        let workspace = unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }
            .map_err(|e| format!("cuBLASLt workspace: {e:?}"))?;
        let workspace_address = {
            use cudarc::driver::DevicePtr;
            workspace.device_ptr(&stream).0
        };
        context
            .bind_to_thread()
            .map_err(|e| format!("CUDA context: {e:?}"))?;
        let handle = lt::create_handle().map_err(|e| format!("cuBLASLt: {e:?}"))?;
        let await_counter = load_await_counter(&context)?;
        let multiprocessors = context
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| format!("CUDA device {index}'s multiprocessors: {e:?}"))?;
        Ok(Self {
            handle,
            stream,
            _workspace: workspace,
            workspace_address,
            plans: HashMap::new(),
            await_counter,
            handoffs: HashMap::new(),
            sm_count: gemm_sm_count(multiprocessors),
        })
    }

    /// Makes the plan of `key` unless made before.
    fn ensure_plan(&mut self, key: PlanKey) -> Result<(), String> {
        if !self.plans.contains_key(&key) {
            let plan = Plan::new(self.handle, key, self.sm_count)?;
            self.plans.insert(key, plan);
        }
        Ok(())
    }
}

/// Multiprocessors a GEMM leaves to the hand-off's waiting kernel on cubecl's stream.
/// That one-thread kernel is resident while the GEMMs it waits for run, and Hopper's
/// persistent cuBLASLt kernels (one cluster of CTAs per pair of multiprocessors, all
/// launched at once) then had a cluster waiting for its multiprocessor: on an H200 the
/// 4096^3 bf16 product took 218 us with the hand-off and 175 us without it (the same
/// kernel). Planned for 4 fewer multiprocessors it ran at 730 TFLOP/s instead of 581
/// (2 fewer: 696, 8 fewer: 642; `bench ops --sizes 4096`, under the kernel tracer).
const WAITING_KERNEL_SM_RESERVE: i32 = 4;

/// The multiprocessors a GEMM is planned for on a GPU of `multiprocessors`: all but
/// [`WAITING_KERNEL_SM_RESERVE`] when a hand-off's waiting kernel runs beside the GEMMs
/// (not with `BURN_MEGATRON_HOST_SYNC=1`, where the host waits instead).
fn gemm_sm_count(multiprocessors: i32) -> Option<i32> {
    (!host_sync()).then_some(multiprocessors - WAITING_KERNEL_SM_RESERVE)
}

/// Sets attribute `attribute` of matrix layout `layout` to `value`.
fn set_layout<T>(
    layout: sys::cublasLtMatrixLayout_t,
    attribute: sys::cublasLtMatrixLayoutAttribute_t,
    value: &T,
) -> Result<(), String> {
    // Safety: `value` is a plain value of the attribute's type; `layout` is live.
    unsafe {
        lt::set_matrix_layout_attribute(
            layout,
            attribute,
            value as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    }
    .map_err(|e| format!("cuBLASLt layout attribute {attribute:?}: {e:?}"))
}

/// Sets attribute `attribute` of matmul descriptor `desc` to `value`.
fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attribute: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<(), String> {
    // Safety: `value` is a plain value of the attribute's type; `desc` is live.
    unsafe {
        lt::set_matmul_desc_attribute(
            desc,
            attribute,
            value as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    }
    .map_err(|e| format!("cuBLASLt attribute {attribute:?}: {e:?}"))
}

impl Plan {
    /// Column-major terms: `Dᵀ[n, m] = op(B)ᵀ · op(A)ᵀ`, with the row-major buffers
    /// read as their column-major transposes.
    fn new(
        handle: sys::cublasLtHandle_t,
        (
            [dtype, output_dtype],
            tf32,
            [ta, tb],
            [m, n, k],
            [lda, ldb, ldd],
            [align_a, align_b, align_d],
            (count, [stride_a, stride_b, stride_d]),
            bias,
        ): PlanKey,
        sm_count: Option<i32>,
    ) -> Result<Self, String> {
        let data = data_type(dtype).expect("checked by the caller");
        let output_data = data_type(output_dtype).expect("checked by the caller");
        let compute = match (dtype, tf32) {
            (DType::F32, true) => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            _ => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        };
        let fail = |e: lt::CublasError| format!("cuBLASLt: {e:?}");
        let desc = lt::create_matmul_desc(compute, sys::cudaDataType::CUDA_R_32F).map_err(fail)?;
        // Owned from here: on an error, dropping it destroys what was created.
        let mut plan = Self {
            desc,
            layouts: Vec::with_capacity(3),
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        // cuBLASLt's operation codes: 0 = N, 1 = T.
        let (op_b, op_a) = (i32::from(tb), i32::from(ta));
        set_desc(
            desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &op_b,
        )?;
        set_desc(
            desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            &op_a,
        )?;
        if let Some(bias) = bias {
            // Column-major D has a row per output feature: the bias is one per row.
            set_desc(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            )?;
            let bias_data = data_type(bias).expect("checked by the caller");
            set_desc(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                &bias_data,
            )?;
        }
        if let Some(sm_count) = sm_count {
            set_desc(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET,
                &sm_count,
            )?;
        }
        // Stored (column-major) dimensions of each buffer.
        let stored =
            |flag: bool, rows: usize, cols: usize| if flag { (cols, rows) } else { (rows, cols) };
        let (a_rows, a_cols) = stored(tb, n, k);
        let (b_rows, b_cols) = stored(ta, k, m);
        let layout = |data, rows: usize, cols: usize, ld: usize| {
            lt::create_matrix_layout(data, rows as u64, cols as u64, ld as i64).map_err(fail)
        };
        for (data, rows, cols, ld, stride) in [
            (data, a_rows, a_cols, ldb, stride_b),
            (data, b_rows, b_cols, lda, stride_a),
            (output_data, n, m, ldd, stride_d),
        ] {
            let layout = layout(data, rows, cols, ld)?;
            plan.layouts.push(layout);
            if count > 1 {
                use sys::cublasLtMatrixLayoutAttribute_t as Attribute;
                set_layout(
                    layout,
                    Attribute::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                    &(count as i32),
                )?;
                set_layout(
                    layout,
                    Attribute::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                    &(stride as i64),
                )?;
            }
        }
        let layouts = &plan.layouts;
        let pref = lt::create_matmul_pref().map_err(fail)?;
        let chosen = (|| {
            use sys::cublasLtMatmulPreferenceAttributes_t as Pref;
            // cuBLASLt's A is our B and the reverse.
            let alignments = [
                (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_b),
                (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_a),
                (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_d),
                (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d),
            ];
            // Safety: the preference was just created; each value has its attribute's type.
            unsafe {
                lt::set_matmul_pref_attribute(
                    pref,
                    Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &(WORKSPACE_BYTES as u64) as *const u64 as *const c_void,
                    std::mem::size_of::<u64>(),
                )
                .map_err(fail)?;
                for (attribute, alignment) in alignments {
                    lt::set_matmul_pref_attribute(
                        pref,
                        attribute,
                        &alignment as *const u32 as *const c_void,
                        std::mem::size_of::<u32>(),
                    )
                    .map_err(fail)?;
                }
                lt::get_matmul_algo_heuristic(
                    handle, desc, layouts[0], layouts[1], layouts[2], layouts[2], pref,
                )
                .map_err(fail)
            }
        })();
        // Safety: created above, destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_pref(pref);
        }
        let chosen = chosen.map_err(|error| {
            format!(
                "{error}: no algorithm for {data:?} to {output_data:?} with {compute:?}, op(A) {} op(B) {}, \
                 A {a_rows}x{a_cols} ld {ldb}, B {b_rows}x{b_cols} ld {lda}, D {n}x{m} ld {ldd} \
                 (column-major), {count} per call; {}",
                u8::from(tb),
                u8::from(ta),
                library_version()
            )
        });
        plan.algo = chosen?.algo;
        Ok(plan)
    }
}

/// cuBLASLt's version and the file it was loaded from, for error messages.
fn library_version() -> String {
    // Safety: plain queries of the loaded library.
    let (version, cudart) = unsafe { (sys::cublasLtGetVersion(), sys::cublasLtGetCudartVersion()) };
    let path = std::fs::read_to_string("/proc/self/maps")
        .ok()
        .and_then(|maps| {
            maps.lines()
                .find(|line| line.contains("libcublasLt"))
                .and_then(|line| line.split_whitespace().last().map(str::to_string))
        })
        .unwrap_or_else(|| "unknown file".to_string());
    format!("cuBLASLt {version} (CUDA runtime {cudart}) from {path}")
}

/// One grid of products to queue: `output = op(a) · op(b)` for each matrix of the `grid`
/// (holding the operands keeps their buffers alive until it has run).
struct QueuedGemm {
    a: Operand,
    b: Operand,
    output: Operand,
    /// `[m, n, k]` of each product.
    dims: [usize; 3],
    /// `[batch, heads]`: the products of the grid.
    grid: [usize; 2],
    /// fp32 products may use TF32 ([`allow_tf32`] when queued).
    tf32: bool,
    /// Add the product to the output's values (`beta = 1`) rather than overwrite them.
    accumulate: bool,
    /// Added to every row of the output by the epilogue (one product; see
    /// [`epilogue_bias_applies`]).
    bias: Option<CubeTensor<CudaRuntime>>,
}

impl QueuedGemm {
    /// What failed, with the product's shape.
    fn failure(&self, error: String) -> String {
        let [m, n, k] = self.dims;
        let [batch, heads] = self.grid;
        let dtype = self.output.tensor.dtype;
        format!("cuBLASLt GEMM {batch}x{heads} x ({m}x{k} times {k}x{n}) ({dtype:?}): {error}")
    }
}

/// What failed, naming the first of `gemms` (and how many were queued together).
fn failure(gemms: &[QueuedGemm], error: String) -> String {
    match gemms {
        [gemm] => gemm.failure(error),
        [first, ..] => format!(
            "{} (the first of {} GEMMs queued together)",
            first.failure(error),
            gemms.len()
        ),
        [] => error,
    }
}

/// The first error of a GEMM that failed on a device thread, until reported.
static FAILED: Mutex<Option<String>> = Mutex::new(None);

/// Reports (once) the error of a GEMM that failed on a device thread since the last call.
pub(super) fn take_failure() -> Result<(), String> {
    match FAILED.lock().expect("cuBLASLt failures").take() {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// See [`queue_gemms_on_device_thread`].
static QUEUE: AtomicBool = AtomicBool::new(true);

/// Whether GEMMs are queued on cubecl's device thread (the default: the calling thread
/// never waits) or run on the calling thread, which waits for that thread to reach them.
/// Turn queueing off before the first GEMM when several threads drive one GPU (thread
/// ranks sharing it): queued GEMMs of several streams hung on an H200.
pub fn queue_gemms_on_device_thread(queue: bool) {
    QUEUE.store(queue, Ordering::Relaxed);
}

/// Per GPU: the cubecl stream (thread) that ran its first GEMM, and whether another
/// stream has run one there since.
static STREAMS: Mutex<Option<HashMap<DeviceId, (StreamId, bool)>>> = Mutex::new(None);

/// Queues `gemms` (one GPU's, none reading another's output) on their GPU's device thread
/// ([`GemmQueue`]) while one stream uses the GPU (one rank per GPU); once several do, or
/// with queueing off ([`queue_gemms_on_device_thread`]) or `BURN_MEGATRON_HOST_SYNC=1`,
/// runs them on the calling thread, which waits for cubecl's device thread ([`run_here`]). Queued GEMMs of
/// several streams on one device thread hung in two of four runs on an H200 (tp 2 x pp 2
/// as four thread ranks; the cause is not found), so thread ranks turn queueing off before
/// their first GEMM; the switch here is the fallback for other multi-threaded users.
fn dispatch(gemms: Vec<QueuedGemm>) {
    let Some(id) = gemms.first().map(|gemm| gemm.output.tensor.device.to_id()) else {
        return;
    };
    let stream = StreamId::current();
    let mut streams = STREAMS.lock().expect("cuBLASLt streams");
    let (first, shared) = streams
        .get_or_insert_with(HashMap::new)
        .entry(id)
        .or_insert((stream, false));
    *shared |= *first != stream;
    if *shared || host_sync() || !QUEUE.load(Ordering::Relaxed) {
        drop(streams);
        if let Err(error) = run_here(&gemms) {
            panic!("{}", failure(&gemms, error));
        }
    } else {
        // Under the lock: no other stream runs a GEMM on this GPU meanwhile.
        queue(id, gemms);
    }
}

/// Runs `gemms` (not empty) on the calling thread with the GPU's [`Device`] of this path.
fn run_here(gemms: &[QueuedGemm]) -> Result<(), String> {
    static DEVICES: Mutex<Option<HashMap<usize, Device>>> = Mutex::new(None);
    let mut devices = DEVICES.lock().expect("cuBLASLt devices");
    let index = gemms[0].output.tensor.device.index;
    let device = match devices.get_or_insert_with(HashMap::new).entry(index) {
        Entry::Occupied(entry) => entry.into_mut(),
        Entry::Vacant(entry) => entry.insert(Device::new(index)?),
    };
    device.run(gemms, false)
}

/// cuBLASLt's state for one GPU, kept on cubecl's device thread of that GPU (a
/// [`DeviceService`] of the same stage as cubecl's compute server). A GEMM is a task
/// queued there behind the Burn launches queued before it, so it resolves its buffers and
/// queues its hand-off in the same order, and the calling thread never waits for it.
struct GemmQueue {
    index: usize,
    /// Made by the first GEMM (an error is reported by each GEMM that needs it).
    device: Option<Device>,
}

impl DeviceService for GemmQueue {
    fn init(id: DeviceId) -> Self {
        Self {
            index: usize::from(id.index_id),
            device: None,
        }
    }

    fn utilities(&self) -> ServerUtilitiesHandle {
        Arc::new(())
    }
}

/// Queues `gemms` on the device thread of GPU `id`. A failure there is kept for
/// [`take_failure`]: the outputs are then left unwritten (the hand-off still releases
/// Burn's stream).
fn queue(id: DeviceId, gemms: Vec<QueuedGemm>) {
    DeviceHandle::<GemmQueue>::new(id).submit(move |queue| {
        let device = match &mut queue.device {
            Some(device) => Ok(device),
            None => Device::new(queue.index).map(|device| queue.device.insert(device)),
        };
        if let Err(error) = device.and_then(|device| device.run(&gemms, true)) {
            let mut failed = FAILED.lock().expect("cuBLASLt failures");
            failed.get_or_insert(failure(&gemms, error));
        }
    });
}

/// A GEMM's buffers and plan, resolved on the thread that queues it.
struct Resolved {
    key: PlanKey,
    /// Addresses of A, B and D.
    addresses: [*mut c_void; 3],
    batching: Batching,
    /// Bytes per element of A, B and D.
    elements: [usize; 3],
    accumulate: bool,
    /// The bias's address, for the epilogue.
    bias: Option<*mut c_void>,
}

impl Resolved {
    /// `gemm`'s buffer addresses (cubecl resolves them in queue order) and plan key.
    fn new(gemm: &QueuedGemm) -> Result<Self, String> {
        let QueuedGemm {
            a,
            b,
            output,
            dims,
            grid,
            tf32,
            accumulate,
            bias,
        } = gemm;
        let batching = Batching::new(*grid, [a, b, output]);
        let elements = [a, b, output].map(|operand| operand.tensor.dtype.size());
        let addresses = [
            address(&a.tensor)?,
            address(&b.tensor)?,
            address(&output.tensor)?,
        ];
        // The largest power of two (up to 256) dividing each address of a call.
        let alignment = |operand: usize| {
            let strides = [batching.strides[operand], batching.call_strides[operand]];
            let offsets = strides
                .iter()
                .fold(0, |bits, &s| bits | (s * elements[operand]));
            1u32 << (addresses[operand] as usize | offsets)
                .trailing_zeros()
                .min(8)
        };
        let key: PlanKey = (
            [a.tensor.dtype, output.tensor.dtype],
            *tf32,
            [a.transposed, b.transposed],
            *dims,
            [a.ld, b.ld, output.ld],
            [alignment(0), alignment(1), alignment(2)],
            (batching.count, batching.strides),
            bias.as_ref().map(|bias| bias.dtype),
        );
        Ok(Self {
            key,
            addresses,
            batching,
            elements,
            accumulate: *accumulate,
            bias: bias.as_ref().map(address).transpose()?,
        })
    }

    /// Operand `operand`'s address in call `call`.
    fn at(&self, operand: usize, call: usize) -> *mut c_void {
        (self.addresses[operand] as usize
            + call * self.batching.call_strides[operand] * self.elements[operand])
            as *mut c_void
    }
}

impl Device {
    /// Queues `gemms` (none reading another's output) after Burn's queued work on the
    /// calling stream and before Burn's next, under one hand-off; `on_device_thread`:
    /// called from cubecl's device thread, where cubecl's calls made here (buffer
    /// addresses, the hand-off's kernels) run at once, in order with what was queued
    /// before.
    fn run(&mut self, gemms: &[QueuedGemm], on_device_thread: bool) -> Result<(), String> {
        let Some(first) = gemms.first() else {
            return Ok(());
        };
        let (handle, stream) = (self.handle, self.stream.clone());
        // cuBLASLt (the heuristic included) works on the thread's current context.
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| format!("CUDA context: {e:?}"))?;
        let resolved = gemms
            .iter()
            .map(Resolved::new)
            .collect::<Result<Vec<_>, _>>()?;
        for gemm in &resolved {
            self.ensure_plan(gemm.key)?;
        }
        let workspace = self.workspace_address;
        let handoff = match self.handoffs.entry(StreamId::current()) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(Handoff::new(
                &first.output.tensor,
                self.await_counter.clone(),
            )?),
        };
        let plans = &self.plans;
        // Safety: the pointers address live buffers of the sizes the layouts describe; the
        // workspace is ours; the hand-off runs the calls after Burn's work on the inputs and
        // before Burn's next use of the outputs.
        handoff.run(&stream, on_device_thread, || {
            for gemm in &resolved {
                let plan = &plans[&gemm.key];
                let (alpha, beta) = (1f32, if gemm.accumulate { 1f32 } else { 0f32 });
                if let Some(bias) = gemm.bias {
                    // The descriptor is this plan's, used by one thread at a time.
                    set_desc(
                        plan.desc,
                        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                        &bias,
                    )?;
                }
                for call in 0..gemm.batching.calls {
                    let (pa, pb, pd) = (gemm.at(0, call), gemm.at(1, call), gemm.at(2, call));
                    unsafe {
                        lt::matmul(
                            handle,
                            plan.desc,
                            &alpha as *const f32 as *const c_void,
                            &beta as *const f32 as *const c_void,
                            pb,
                            plan.layouts[0],
                            pa,
                            plan.layouts[1],
                            pd,
                            plan.layouts[2],
                            pd,
                            plan.layouts[2],
                            &plan.algo,
                            workspace as *mut c_void,
                            WORKSPACE_BYTES,
                            stream.cu_stream() as sys::cudaStream_t,
                        )
                    }
                    .map_err(|e| {
                        format!(
                            "cuBLASLt matmul: {e:?} (plan {:?}, addresses {pa:?} {pb:?} {pd:?})",
                            gemm.key
                        )
                    })?;
                }
            }
            Ok(())
        })
    }
}
