//! Raw buffers of burn-cuda tensors, for the libraries Burn does not call itself (NCCL in
//! `parallel`, cuBLASLt in `ops`).
//!
//! cubecl 0.10 exposes neither its stream nor a way to order work with another stream,
//! so an external call on Burn's buffers follows one protocol: [`wait_for_burn`] (all
//! work Burn has queued is done), resolve each buffer's [`address`], queue the call on
//! our own stream, and wait for that stream before Burn touches the buffers again.

use std::ffi::c_void;

use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::tensor::CubeTensor;

/// The device address of a tensor's data, valid while the tensor lives.
///
/// # Errors
///
/// When cubecl cannot resolve the buffer (its message).
pub(crate) fn address(tensor: &CubeTensor<CudaRuntime>) -> Result<*mut c_void, String> {
    let resource = tensor
        .client
        .get_resource(tensor.handle.clone())
        .map_err(|e| format!("CUDA buffer: {e:?}"))?;
    Ok(resource.resource().ptr as *mut c_void)
}

/// Waits until the work Burn has queued on `tensor`'s device is done.
///
/// # Errors
///
/// When the device reports an error (its message).
pub(crate) fn wait_for_burn(tensor: &CubeTensor<CudaRuntime>) -> Result<(), String> {
    burn_cubecl::cubecl::future::block_on(tensor.client.sync()).map_err(|e| format!("CUDA: {e:?}"))
}
