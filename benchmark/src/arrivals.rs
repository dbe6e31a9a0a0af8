//! Request arrival times of an open-loop load: a Poisson process, reproducible from a seed.

/// SplitMix64: a tiny, well-mixed generator; the benchmark needs reproducibility, not
/// cryptographic quality, and no dependency for it.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: never 0, so that `ln` stays finite.
    pub fn next_unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

/// Arrival times, in seconds from the start, of a Poisson process of `rate` requests per
/// second: the gaps are exponential with mean `1 / rate`. `rate` must be positive and finite.
pub fn poisson_arrivals(rate: f64, seed: u64) -> impl Iterator<Item = f64> {
    assert!(rate > 0.0 && rate.is_finite(), "request rate {rate}");
    let mut rng = SplitMix64::new(seed);
    let mut t = 0.0;
    std::iter::from_fn(move || {
        t += -rng.next_unit().ln() / rate;
        Some(t)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_arrivals_other_seed_other_arrivals() {
        let a: Vec<f64> = poisson_arrivals(5.0, 42).take(100).collect();
        let b: Vec<f64> = poisson_arrivals(5.0, 42).take(100).collect();
        let c: Vec<f64> = poisson_arrivals(5.0, 43).take(100).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn arrivals_increase_and_gaps_are_exponential() {
        let rate = 8.0;
        let n = 20_000;
        let times: Vec<f64> = poisson_arrivals(rate, 7).take(n).collect();
        let gaps: Vec<f64> = std::iter::once(times[0])
            .chain(times.windows(2).map(|w| w[1] - w[0]))
            .collect();
        assert!(gaps.iter().all(|&g| g > 0.0 && g.is_finite()));
        let mean = gaps.iter().sum::<f64>() / n as f64;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n as f64;
        // Exponential: mean 1/rate, standard deviation equal to the mean. With 20k samples the
        // mean's standard error is under 1%; 3% leaves room without admitting a wrong rate.
        assert!((mean * rate - 1.0).abs() < 0.03, "mean gap {mean}");
        assert!(
            (var.sqrt() * rate - 1.0).abs() < 0.05,
            "std dev {}",
            var.sqrt()
        );
        // Memorylessness shows as P(gap > mean) = e^-1.
        let above = gaps.iter().filter(|&&g| g > 1.0 / rate).count() as f64 / n as f64;
        assert!((above - (-1.0f64).exp()).abs() < 0.02, "{above}");
    }

    #[test]
    fn unit_draws_stay_in_the_open_closed_interval() {
        let mut rng = SplitMix64::new(0);
        for _ in 0..10_000 {
            let u = rng.next_unit();
            assert!(u > 0.0 && u <= 1.0);
        }
    }
}
