//! The crate's error type.

use std::time::Duration;

/// Everything that can go wrong in burn-megatron, with a message that says what to change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A parallel layout that does not fit the world size or the model.
    #[error("invalid parallel layout: {0}")]
    InvalidLayout(String),

    /// A layer or tensor configuration that cannot be built.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// A collective operation failed on this rank.
    #[error("{op} on group `{group}` failed on rank {rank}: {reason}")]
    Collective {
        /// The group's name, with its member ranks.
        group: String,
        /// The global rank that observed the failure.
        rank: usize,
        /// The operation, such as `all_reduce`.
        op: &'static str,
        /// What went wrong.
        reason: CollectiveFailure,
    },

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the operating system said.
        source: std::io::Error,
    },

    /// A file's contents are malformed (truncated, corrupt, or of another format).
    #[error("{0}")]
    InvalidData(String),

    /// Training produced a gradient norm that is not finite (without loss scaling, which
    /// skips such steps instead); the step was not applied.
    #[error(
        "step {step}: the gradient norm is {grad_norm}: training diverged; the step was not \
         applied. Lower --lr, lengthen --lr-warmup-steps or clip with --clip-grad, and resume \
         from the last checkpoint"
    )]
    Diverged {
        /// The optimizer step (from 1).
        step: usize,
        /// The global gradient norm (NaN or an infinity).
        grad_norm: f64,
    },

    /// An operation on the accelerator failed (the library's message).
    #[error("device: {0}")]
    Device(String),

    /// A rank of a local (thread) run panicked or returned an error.
    #[error("rank {rank} failed: {message}")]
    RankFailed {
        /// The global rank that failed.
        rank: usize,
        /// Its panic message or error.
        message: String,
    },
}

/// Why a collective operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CollectiveFailure {
    /// Not every member arrived within the group's timeout.
    #[error(
        "timed out after {waited:?} waiting for ranks {missing:?}; a rank is stuck or called \
         collectives in another order (raise the timeout if the work between collectives is long)"
    )]
    Timeout {
        /// How long this rank waited.
        waited: Duration,
        /// Global ranks that had not arrived.
        missing: Vec<usize>,
    },
    /// Another rank failed, so the group was aborted.
    #[error("the group was aborted: {0}")]
    Aborted(String),
    /// Ranks called different operations at the same point of the program.
    #[error(
        "rank {other_rank} called `{other_op}` at the same point; every rank of a group must call the same collectives in the same order"
    )]
    Mismatch {
        /// A rank that called something else.
        other_rank: usize,
        /// What that rank called.
        other_op: &'static str,
    },
    /// The tensors given by the ranks do not fit the operation.
    #[error("{0}")]
    BadInput(String),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
