//! cuBLASLt GEMMs on the device buffers of burn-cuda tensors.
//!
//! A GEMM runs on our own stream, ordered with Burn's stream on the device by a
//! [`Handoff`] (the host does not wait). Descriptors, layouts and the chosen algorithm are
//! cached per shape; the heuristic runs once per shape. Strided operands are read in
//! place: a row stride becomes the leading dimension, a transposed view flips the
//! transpose flag; anything else is made contiguous first.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream};

use super::{MegatronOps, reference_gemm, reference_ops};
use crate::cuda::{Handoff, address, load_await_counter};

static TF32: AtomicBool = AtomicBool::new(false);

/// Lets fp32 GEMMs on CUDA use TF32 tensor cores (off by default: fp32 GEMMs are exact
/// fp32 products, as on CPU).
pub fn allow_tf32(allow: bool) {
    TF32.store(allow, Ordering::Relaxed);
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

    fn gemm(
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> Tensor<Self, 2> {
        let dtype = a.dtype();
        if reference_ops() || dtype != b.dtype() || data_type(dtype).is_none() {
            return reference_gemm(a, b, transpose_a, transpose_b);
        }
        let a = Operand::new(a.into_primitive().tensor(), transpose_a);
        let b = Operand::new(b.into_primitive().tensor(), transpose_b);
        let (m, k) = a.product_dims();
        let (k_b, n) = b.product_dims();
        assert_eq!(
            k, k_b,
            "gemm: inner dimensions differ ({m}x{k} times {k_b}x{n})"
        );
        let device = a.tensor.device.clone();
        if m * n * k == 0 {
            // An empty inner dimension sums nothing.
            return Tensor::zeros([m, n], (&device, dtype));
        }
        let output = Tensor::<Self, 2>::empty([m, n], (&device, dtype))
            .into_primitive()
            .tensor();
        run(&a, &b, &output, [m, n, k]).unwrap_or_else(|error| {
            panic!("cuBLASLt GEMM {m}x{k} times {k}x{n} ({dtype:?}): {error}")
        });
        Tensor::from_primitive(TensorPrimitive::Float(output))
    }
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

/// A matrix operand as stored: row-major `[rows, cols]` with row stride `ld`, used
/// transposed or not.
struct Operand {
    tensor: CubeTensor<CudaRuntime>,
    rows: usize,
    cols: usize,
    ld: usize,
    transposed: bool,
}

impl Operand {
    fn new(tensor: CubeTensor<CudaRuntime>, transposed: bool) -> Self {
        let shape = tensor.meta.shape().to_vec();
        let strides = tensor.meta.strides().to_vec();
        let (rows, cols) = (shape[0], shape[1]);
        if strides[1] == 1 && strides[0] >= cols.max(1) {
            let ld = strides[0];
            Self {
                tensor,
                rows,
                cols,
                ld,
                transposed,
            }
        } else if strides[0] == 1 && strides[1] >= rows.max(1) {
            // A transposed view of a row-major [cols, rows] matrix.
            let ld = strides[1];
            Self {
                tensor,
                rows: cols,
                cols: rows,
                ld,
                transposed: !transposed,
            }
        } else {
            let tensor = burn_cubecl::kernel::into_contiguous(tensor);
            Self {
                tensor,
                rows,
                cols,
                ld: cols.max(1),
                transposed,
            }
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

/// The key of a plan: type, TF32, transposes, sizes, leading dimensions, and the byte
/// alignment of the A, B and D addresses (algorithms may assume more than Burn's buffers
/// give).
type PlanKey = (DType, bool, [bool; 2], [usize; 3], [usize; 3], [u32; 3]);

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
    /// One per thread that ran a GEMM here (each thread has its own Burn stream), made
    /// with its first GEMM's output.
    handoffs: HashMap<std::thread::ThreadId, Handoff>,
}

// Safety: used under the mutex of `devices()` only.
unsafe impl Send for Device {}

/// Hopper's recommended cuBLASLt workspace.
const WORKSPACE_BYTES: usize = 32 << 20;

fn devices() -> &'static Mutex<HashMap<usize, Device>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Device>>> = OnceLock::new();
    DEVICES.get_or_init(Default::default)
}

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
        Ok(Self {
            handle,
            stream,
            _workspace: workspace,
            workspace_address,
            plans: HashMap::new(),
            await_counter,
            handoffs: HashMap::new(),
        })
    }

    /// Makes the plan of `key` unless made before.
    fn ensure_plan(&mut self, key: PlanKey) -> Result<(), String> {
        if !self.plans.contains_key(&key) {
            let plan = Plan::new(self.handle, key)?;
            self.plans.insert(key, plan);
        }
        Ok(())
    }
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
        (dtype, tf32, [ta, tb], [m, n, k], [lda, ldb, ldd], [align_a, align_b, align_d]): PlanKey,
    ) -> Result<Self, String> {
        let data = data_type(dtype).expect("checked by the caller");
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
        // Stored (column-major) dimensions of each buffer.
        let stored =
            |flag: bool, rows: usize, cols: usize| if flag { (cols, rows) } else { (rows, cols) };
        let (a_rows, a_cols) = stored(tb, n, k);
        let (b_rows, b_cols) = stored(ta, k, m);
        let layout = |rows: usize, cols: usize, ld: usize| {
            lt::create_matrix_layout(data, rows as u64, cols as u64, ld as i64).map_err(fail)
        };
        for (rows, cols, ld) in [(a_rows, a_cols, ldb), (b_rows, b_cols, lda), (n, m, ldd)] {
            plan.layouts.push(layout(rows, cols, ld)?);
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
                "{error}: no algorithm for {data:?} with {compute:?}, op(A) {} op(B) {}, \
                 A {a_rows}x{a_cols} ld {ldb}, B {b_rows}x{b_cols} ld {lda}, D {n}x{m} ld {ldd} \
                 (column-major); {}",
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

/// Queues `output = op(a) · op(b)` after Burn's queued work, before Burn's next.
fn run(
    a: &Operand,
    b: &Operand,
    output: &CubeTensor<CudaRuntime>,
    [m, n, k]: [usize; 3],
) -> Result<(), String> {
    let ldd = output.meta.strides()[0].max(n);
    let [pa, pb, pd] = [address(&a.tensor)?, address(&b.tensor)?, address(output)?];
    // The largest power of two (up to 256) dividing each address.
    let alignment = |address: *mut c_void| 1u32 << (address as usize).trailing_zeros().min(8);
    let key: PlanKey = (
        output.dtype,
        TF32.load(Ordering::Relaxed),
        [a.transposed, b.transposed],
        [m, n, k],
        [a.ld, b.ld, ldd],
        [alignment(pa), alignment(pb), alignment(pd)],
    );
    let mut devices = devices().lock().expect("cuBLASLt devices");
    let index = output.device.index;
    let device = match devices.entry(index) {
        std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
        std::collections::hash_map::Entry::Vacant(entry) => entry.insert(Device::new(index)?),
    };
    let (handle, stream) = (device.handle, device.stream.clone());
    // cuBLASLt (the heuristic included) works on the thread's current context.
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| format!("CUDA context: {e:?}"))?;
    let workspace = device.workspace_address;
    device.ensure_plan(key)?;
    let handoff = match device.handoffs.entry(std::thread::current().id()) {
        std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
        std::collections::hash_map::Entry::Vacant(entry) => {
            entry.insert(Handoff::new(output, device.await_counter.clone())?)
        }
    };
    let (alpha, beta) = (1f32, 0f32);
    let plan = &device.plans[&key];
    // Safety: the pointers address live buffers of the sizes the layouts describe; the
    // workspace is ours; the hand-off runs the call after Burn's work on the inputs and
    // before Burn's next use of the output.
    handoff.run(&stream, || {
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
            format!("cuBLASLt matmul: {e:?} (plan {key:?}, addresses {pa:?} {pb:?} {pd:?})")
        })
    })
}
