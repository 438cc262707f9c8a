//! Tensor-parallel parts to full tensors and back, on the host: what lets a checkpoint
//! written at one tensor-parallel size load at another.

use crate::{Error, Result};

/// `(outer, inner)`: elements before and after dimension `dim` of `shape`.
fn around(shape: &[usize], dim: usize) -> (usize, usize) {
    (
        shape[..dim].iter().product(),
        shape[dim + 1..].iter().product(),
    )
}

/// The full tensor of shape `global` from the parts of every tensor-parallel rank (in
/// rank order, each of shape `local`), concatenated along `split_dim` and cut to the
/// full length there (dropping vocabulary padding). `None` means replicated: the one
/// part is the tensor.
///
/// # Errors
///
/// When the parts do not make up `global`.
pub fn merge_shards(
    parts: &[Vec<f32>],
    local: &[usize],
    global: &[usize],
    split_dim: Option<usize>,
) -> Result<Vec<f32>> {
    let bad = |what: String| Error::InvalidData(format!("cannot merge tensor parts: {what}"));
    let local_len: usize = local.iter().product();
    if let Some(part) = parts.iter().find(|part| part.len() != local_len) {
        return Err(bad(format!(
            "a part has {} elements, its shape {local:?} needs {local_len}",
            part.len()
        )));
    }
    let Some(dim) = split_dim else {
        return match (parts.first(), local == global) {
            (Some(part), true) => Ok(part.clone()),
            _ => Err(bad(format!(
                "replicated part of shape {local:?} for a tensor of shape {global:?}"
            ))),
        };
    };
    let same_elsewhere =
        local.len() == global.len() && (0..local.len()).all(|d| d == dim || local[d] == global[d]);
    if !same_elsewhere || local[dim] * parts.len() < global[dim] {
        return Err(bad(format!(
            "{} parts of shape {local:?} along dimension {dim} cannot make shape {global:?}",
            parts.len()
        )));
    }
    let (outer, inner) = around(global, dim);
    let mut out = Vec::with_capacity(global.iter().product());
    for o in 0..outer {
        for index in 0..global[dim] {
            let (part, row) = (index / local[dim], index % local[dim]);
            let start = (o * local[dim] + row) * inner;
            out.extend_from_slice(&parts[part][start..start + inner]);
        }
    }
    Ok(out)
}

/// Rank `rank`'s part of shape `local` of the full tensor `full` (shape `global`), split
/// along `split_dim`; positions past the full length (vocabulary padding) are zero.
///
/// # Errors
///
/// When the shapes do not fit.
pub fn split_shard(
    full: &[f32],
    global: &[usize],
    local: &[usize],
    split_dim: Option<usize>,
    rank: usize,
) -> Result<Vec<f32>> {
    let bad = || {
        Error::InvalidData(format!(
            "a part of shape {local:?} (rank {rank}, split along {split_dim:?}) does not fit a \
             tensor of shape {global:?}"
        ))
    };
    if full.len() != global.iter().product::<usize>() || local.len() != global.len() {
        return Err(bad());
    }
    let Some(dim) = split_dim else {
        return if local == global {
            Ok(full.to_vec())
        } else {
            Err(bad())
        };
    };
    if (0..local.len()).any(|d| d != dim && local[d] != global[d]) {
        return Err(bad());
    }
    let (outer, inner) = around(global, dim);
    let mut out = vec![0f32; local.iter().product()];
    for o in 0..outer {
        for row in 0..local[dim] {
            let index = rank * local[dim] + row;
            if index < global[dim] {
                let from = (o * global[dim] + index) * inner;
                let to = (o * local[dim] + row) * inner;
                out[to..to + inner].copy_from_slice(&full[from..from + inner]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full tensor `[3, 5]` split over 2 ranks along columns with padding to 6: each
    /// rank's part is the columns it should hold, and merging gives the tensor back.
    #[test]
    fn split_then_merge_is_the_identity_with_padding() {
        let full: Vec<f32> = (0..15).map(|v| v as f32).collect();
        let parts: Vec<Vec<f32>> = (0..2)
            .map(|rank| split_shard(&full, &[3, 5], &[3, 3], Some(1), rank).unwrap())
            .collect();
        assert_eq!(parts[0], vec![0., 1., 2., 5., 6., 7., 10., 11., 12.]);
        assert_eq!(parts[1], vec![3., 4., 0., 8., 9., 0., 13., 14., 0.]);
        assert_eq!(
            merge_shards(&parts, &[3, 3], &[3, 5], Some(1)).unwrap(),
            full
        );
        let rows: Vec<Vec<f32>> = (0..3)
            .map(|rank| split_shard(&full, &[3, 5], &[1, 5], Some(0), rank).unwrap())
            .collect();
        assert_eq!(rows[2], vec![10., 11., 12., 13., 14.]);
        assert_eq!(
            merge_shards(&rows, &[1, 5], &[3, 5], Some(0)).unwrap(),
            full
        );
    }

    #[test]
    fn mismatched_parts_are_errors() {
        assert!(merge_shards(&[vec![0.0; 4]], &[2, 2], &[2, 5], Some(1)).is_err());
        assert!(merge_shards(&[vec![0.0; 3]], &[2, 2], &[2, 2], None).is_err());
        assert!(split_shard(&[0.0; 6], &[2, 3], &[3, 3], Some(1), 0).is_err());
    }
}
