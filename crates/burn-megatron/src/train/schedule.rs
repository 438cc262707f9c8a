//! Megatron's learning-rate schedule: linear warmup from 0, then constant, linear or
//! cosine decay to a minimum, or warmup-stable-decay (WSD).

use crate::{Error, Result};

/// How the learning rate falls after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decay {
    /// Stay at the maximum.
    Constant,
    /// Linear from the maximum to the minimum.
    Linear,
    /// Half a cosine from the maximum to the minimum.
    Cosine,
    /// Warmup-stable-decay: the maximum until the last `decay_steps` steps of the
    /// schedule, then linear to the minimum.
    Wsd {
        /// Steps of the final decay.
        decay_steps: usize,
    },
}

impl std::str::FromStr for Decay {
    type Err = Error;
    fn from_str(name: &str) -> Result<Self> {
        match name {
            "constant" => Ok(Decay::Constant),
            "linear" => Ok(Decay::Linear),
            "cosine" => Ok(Decay::Cosine),
            "WSD" | "wsd" => Ok(Decay::Wsd { decay_steps: 0 }),
            other => Err(Error::InvalidConfig(format!(
                "unknown lr decay style `{other}`; use constant, linear, cosine or WSD"
            ))),
        }
    }
}

/// A learning-rate schedule over optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub max_lr: f64,
    /// Floor after decay.
    pub min_lr: f64,
    /// Steps of linear warmup from 0.
    pub warmup_steps: usize,
    /// Steps over which warmup and decay happen (usually the run's steps).
    pub decay_steps: usize,
    /// The decay after warmup.
    pub decay: Decay,
}

impl LrSchedule {
    /// The learning rate of optimizer step `step` (counted from 1, as Megatron counts).
    pub fn lr(&self, step: usize) -> f64 {
        if self.warmup_steps > 0 && step <= self.warmup_steps {
            return self.max_lr * step as f64 / self.warmup_steps as f64;
        }
        if step > self.decay_steps {
            return match self.decay {
                Decay::Constant => self.max_lr,
                _ => self.min_lr,
            };
        }
        let span = (self.decay_steps - self.warmup_steps).max(1) as f64;
        let ratio = (step - self.warmup_steps) as f64 / span;
        let coefficient = match self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => 1.0 - ratio,
            Decay::Cosine => 0.5 * ((std::f64::consts::PI * ratio).cos() + 1.0),
            Decay::Wsd { decay_steps } => {
                let stable_end = self.decay_steps.saturating_sub(decay_steps);
                if step <= stable_end {
                    1.0
                } else {
                    1.0 - (step - stable_end) as f64 / decay_steps.max(1) as f64
                }
            }
        };
        self.min_lr + coefficient * (self.max_lr - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_as_megatron() {
        let schedule = |decay| LrSchedule {
            max_lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 10,
            decay_steps: 110,
            decay,
        };
        let cosine = schedule(Decay::Cosine);
        assert_eq!(cosine.lr(5), 0.5);
        assert_eq!(cosine.lr(10), 1.0);
        assert!(
            (cosine.lr(60) - 0.55).abs() < 1e-12,
            "half way: min + 0.5 (max - min)"
        );
        assert!((cosine.lr(110) - 0.1).abs() < 1e-12);
        assert_eq!(cosine.lr(500), 0.1);
        assert!((schedule(Decay::Linear).lr(60) - 0.55).abs() < 1e-12);
        assert!((schedule(Decay::Linear).lr(35) - 0.775).abs() < 1e-12);
        assert_eq!(schedule(Decay::Constant).lr(500), 1.0);
        let wsd = schedule(Decay::Wsd { decay_steps: 20 });
        assert_eq!(wsd.lr(90), 1.0);
        assert!((wsd.lr(100) - 0.55).abs() < 1e-12);
        assert!((wsd.lr(110) - 0.1).abs() < 1e-12);
    }
}
