//! Megatron's split strings ("949,50,1"): weights normalized into cumulative bounds, each
//! split a contiguous range of the dataset's sequences.

use crate::{Error, Result};

/// The three splits, in Megatron's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// Training data.
    Train,
    /// Validation data.
    Valid,
    /// Test data.
    Test,
}

impl Split {
    /// The three splits in order.
    pub const ALL: [Split; 3] = [Split::Train, Split::Valid, Split::Test];

    /// Megatron's name of the split.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
}

/// Parses a split string into normalized bounds `(lo, hi)` per split, `None` for a
/// split of zero weight (Megatron's `parse_and_normalize_split` and
/// `convert_split_vector_to_split_matrix`).
///
/// # Errors
///
/// `InvalidConfig` for more than three numbers, a number that does not parse or is
/// negative, or weights that sum to zero.
pub fn parse_split(split: &str) -> Result<[Option<(f64, f64)>; 3]> {
    let invalid = |why: String| {
        Error::InvalidConfig(format!(
            "split \"{split}\": {why}; write up to three non-negative weights for train, valid \
             and test, such as \"949,50,1\""
        ))
    };
    let mut weights = split
        .split([',', '/'])
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            part.parse::<f64>()
                .ok()
                .filter(|w| w.is_finite() && *w >= 0.0)
                .ok_or_else(|| invalid(format!("`{part}` is not a non-negative number")))
        })
        .collect::<Result<Vec<f64>>>()?;
    if weights.len() > 3 {
        return Err(invalid(format!("{} weights", weights.len())));
    }
    weights.resize(3, 0.0);
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return Err(invalid("the weights sum to zero".to_string()));
    }
    let mut bounds = [0.0f64; 4];
    for (i, weight) in weights.iter().enumerate() {
        bounds[i + 1] = bounds[i] + weight / total;
    }
    Ok(std::array::from_fn(|i| {
        (bounds[i + 1] > bounds[i]).then_some((bounds[i], bounds[i + 1]))
    }))
}

/// The sequences of each split of a dataset of `sequences` sequences:
/// `[round(lo * n), round(hi * n))` with Python's rounding (half to even).
///
/// # Errors
///
/// As [`parse_split`].
pub fn split_ranges(split: &str, sequences: usize) -> Result<[Option<std::ops::Range<usize>>; 3]> {
    let n = sequences as f64;
    Ok(parse_split(split)?.map(|bounds| {
        bounds.map(|(lo, hi)| {
            (lo * n).round_ties_even() as usize..(hi * n).round_ties_even() as usize
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn megatron_split_strings() {
        assert_eq!(
            split_ranges("949,50,1", 600).unwrap(),
            [Some(0..569), Some(569..599), Some(599..600)]
        );
        assert_eq!(
            split_ranges("99,1,0", 1000).unwrap(),
            [Some(0..990), Some(990..1000), None]
        );
        assert_eq!(split_ranges("1", 10).unwrap(), [Some(0..10), None, None]);
        // 0.5 * 5 = 2.5 rounds to 2 (half to even), as Python's round does.
        assert_eq!(split_ranges("50,50", 5).unwrap()[0], Some(0..2));
        assert!(parse_split("1,2,3,4").is_err());
        assert!(
            parse_split("0,0")
                .unwrap_err()
                .to_string()
                .contains("sum to zero")
        );
        assert!(
            parse_split("a,1")
                .unwrap_err()
                .to_string()
                .contains("`a` is not")
        );
    }
}
