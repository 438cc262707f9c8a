//! The part of numpy's legacy `RandomState` that Megatron's dataset indices use: MT19937
//! seeded with an integer, and `shuffle` of a 1-D array. Reproduced draw for draw so that
//! samples come out in Megatron's order.

/// numpy's `RandomState(seed)`: the MT19937 generator with its legacy seeding.
#[derive(Clone)]
pub struct RandomState {
    state: [u32; 624],
    position: usize,
}

impl RandomState {
    /// `numpy.random.RandomState(seed)` for an integer seed below 2^32
    /// (MT19937 `init_genrand`).
    pub fn new(seed: u32) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            let previous = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(previous ^ (previous >> 30))
                .wrapping_add(i as u32);
        }
        Self {
            state,
            position: 624,
        }
    }

    fn regenerate(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX: u32 = 0x9908_b0df;
        for i in 0..624 {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % 624] & LOWER);
            let mut next = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= MATRIX;
            }
            self.state[i] = next;
        }
        self.position = 0;
    }

    /// The next 32-bit output (`genrand_int32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.position >= 624 {
            self.regenerate();
        }
        let mut y = self.state[self.position];
        self.position += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// The next 64-bit output: two 32-bit draws, the first one high.
    pub fn next_u64(&mut self) -> u64 {
        let high = self.next_u32() as u64;
        (high << 32) | self.next_u32() as u64
    }

    /// A uniform integer in `[0, max]` by masked rejection (numpy's `random_interval`).
    pub fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = u64::MAX >> max.leading_zeros();
        if max <= u32::MAX as u64 {
            loop {
                let value = self.next_u32() as u64 & mask;
                if value <= max {
                    return value;
                }
            }
        }
        loop {
            let value = self.next_u64() & mask;
            if value <= max {
                return value;
            }
        }
    }

    /// `RandomState.shuffle` of a 1-D array: Fisher-Yates from the end.
    pub fn shuffle<T>(&mut self, values: &mut [T]) {
        for i in (1..values.len()).rev() {
            let j = self.interval(i as u64) as usize;
            values.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_outputs() {
        // MT19937 seeded with init_genrand(5489): the published first outputs and the
        // 10000th output of the C++ standard (std::mt19937 default seed).
        let mut rng = RandomState::new(5489);
        assert_eq!(rng.next_u32(), 3_499_211_612);
        assert_eq!(rng.next_u32(), 581_869_302);
        let mut rng = RandomState::new(5489);
        let ten_thousandth = (0..10_000).map(|_| rng.next_u32()).last().unwrap();
        assert_eq!(ten_thousandth, 4_123_659_995);
    }

    #[test]
    fn shuffle_matches_numpy() {
        // numpy 2.x: RandomState(1234).shuffle(arange(10)), and RandomState(7) on 1000.
        let mut values: Vec<u32> = (0..10).collect();
        RandomState::new(1234).shuffle(&mut values);
        assert_eq!(values, [7, 2, 9, 1, 0, 8, 4, 5, 6, 3]);
        let mut values: Vec<i32> = (0..1000).collect();
        RandomState::new(7).shuffle(&mut values);
        assert_eq!(&values[..8], &[778, 334, 271, 802, 216, 408, 812, 94]);
        assert_eq!(&values[996..], &[502, 537, 196, 175]);
    }
}
