//! Starting a job of several processes: the rendezvous environment that torchrun, SLURM
//! and OpenMPI set, and a launcher that starts the local ranks with it.

mod env;
mod spawn;

pub use env::LaunchEnv;
pub use spawn::{LaunchConfig, launch};
