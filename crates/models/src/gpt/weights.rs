//! Where a model's parameters come from: fresh initialization, or the full (unsplit)
//! tensors of a checkpoint, by canonical name. Either way each rank builds just its
//! shard, so the model is the same whatever the parallel layout.

use burn::tensor::{Tensor, TensorData, backend::Backend};
use burn_megatron::tensor_parallel::ParamInit;
use burn_megatron::{Error, Result};

/// A function that gives the full tensor of a canonical parameter name.
pub type FullTensors<'a> = dyn Fn(&str) -> Result<TensorData> + 'a;

/// The source of a model's parameters.
pub enum Weights<'a> {
    /// Fresh values: normal with `std` for weights (scaled for output projections), zeros
    /// for biases, ones for norm weights; each parameter seeded from `seed` and its name.
    Init {
        /// The model's seed.
        seed: u64,
        /// Standard deviation of the weights.
        std: f64,
    },
    /// The full tensors of a checkpoint, by canonical name, in `[in, out]` layout for
    /// linear weights.
    Full(&'a FullTensors<'a>),
}

impl Weights<'_> {
    /// The seed of parameter `name`: the model's seed mixed with the name (FNV-1a).
    pub fn seed_of(seed: u64, name: &str) -> u64 {
        name.bytes().fold(0xcbf2_9ce4_8422_2325u64 ^ seed, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        })
    }

    /// The full tensor of `name`, checked against `shape`, when loading; `None` when
    /// initializing.
    ///
    /// # Errors
    ///
    /// When the checkpoint lacks the tensor or its shape differs.
    pub fn full(&self, name: &str, shape: &[usize]) -> Result<Option<TensorData>> {
        match self {
            Weights::Init { .. } => Ok(None),
            Weights::Full(get) => {
                let data = get(name)?;
                if data.shape.as_slice() != shape {
                    return Err(Error::InvalidData(format!(
                        "parameter {name} has shape {:?} in the checkpoint, the model needs {shape:?}",
                        data.shape.as_slice()
                    )));
                }
                Ok(Some(data))
            }
        }
    }

    /// The part `[start, start + len)` along `dim` of parameter `name` of full shape
    /// `full`, initialized with `init` (ignored when loading).
    ///
    /// # Errors
    ///
    /// As [`full`](Self::full).
    pub fn shard<B: Backend, const D: usize>(
        &self,
        name: &str,
        full: [usize; D],
        (dim, start, len): (usize, usize, usize),
        init: ParamInit,
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        match self.full(name, &full)? {
            Some(data) => {
                let part = Tensor::<B, D>::from_data(data, device).narrow(dim, start, len);
                // A fresh leaf, with no history shared between ranks.
                Ok(Tensor::from_data(part.into_data(), device))
            }
            None => Ok(init.init_shard(full, dim, start, len, self.param_seed(name), device)),
        }
    }

    /// The seed of fresh values for parameter `name` (0 when loading).
    pub fn param_seed(&self, name: &str) -> u64 {
        match self {
            Weights::Init { seed, .. } => Self::seed_of(*seed, name),
            Weights::Full(_) => 0,
        }
    }

    /// The whole parameter `name` (replicated on every rank).
    ///
    /// # Errors
    ///
    /// As [`full`](Self::full).
    pub fn whole<B: Backend, const D: usize>(
        &self,
        name: &str,
        full: [usize; D],
        init: ParamInit,
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        self.shard(name, full, (0, 0, full[0]), init, device)
    }

    /// The standard deviation of fresh weights (0 when loading).
    pub fn std(&self) -> f64 {
        match self {
            Weights::Init { std, .. } => *std,
            Weights::Full(_) => 0.0,
        }
    }
}
