use super::*;

fn greedy() -> SamplingParams {
    SamplingParams::default()
}

fn sampling(seed: u64) -> SamplingParams {
    SamplingParams {
        do_sample: true,
        seed,
        ..SamplingParams::default()
    }
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    logits.iter().map(|&l| l - max - z.ln() as f32).collect()
}

fn softmax(logits: &[f32]) -> Vec<f64> {
    log_softmax(logits)
        .iter()
        .map(|&l| (l as f64).exp())
        .collect()
}

/// A deterministic pseudo-random logits vector (independent of the sampler's RNG).
fn random_logits(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Xoshiro256StarStar::seed_from_u64(seed ^ 0xABCD);
    (0..n)
        .map(|_| (rng.next_f64() as f32 - 0.5) * 8.0)
        .collect()
}

fn draw_counts(params: SamplingParams, logits: &[f32], draws: usize) -> Vec<usize> {
    let mut sampler = Sampler::new(params, &[]);
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..draws {
        counts[sampler.next(logits, 0).id as usize] += 1;
    }
    counts
}

/// Pearson's chi-square of observed counts against expected probabilities.
fn chi_square(counts: &[usize], expected: &[f64]) -> f64 {
    let n: usize = counts.iter().sum();
    counts
        .iter()
        .zip(expected)
        .filter(|(_, &p)| p > 0.0)
        .map(|(&c, &p)| {
            let e = p * n as f64;
            (c as f64 - e).powi(2) / e
        })
        .sum()
}

#[test]
fn greedy_picks_argmax_and_lowest_id_on_ties() {
    let mut s = Sampler::new(greedy(), &[]);
    let logits = [1.0, 3.0, 3.0, 2.0];
    let out = s.next(&logits, 0);
    assert_eq!(out.id, 1);
    assert!((out.logprob - log_softmax(&logits)[1]).abs() < 1e-6);
    assert!(out.top.is_empty());
}

#[test]
fn greedy_ignores_temperature_for_logprobs() {
    let params = SamplingParams {
        temperature: 0.5,
        ..greedy()
    };
    let logits = [0.0, 1.0, 0.5];
    let out = Sampler::new(params, &[]).next(&logits, 0);
    assert_eq!(out.id, 1);
    assert!((out.logprob - log_softmax(&logits)[1]).abs() < 1e-6);
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
    let params = SamplingParams {
        repetition_penalty: 1.2,
        ..greedy()
    };
    // 2.0 / 1.2 = 1.67 < 1.9: the prompt token loses.
    let mut s = Sampler::new(params.clone(), &[0]);
    let logits = [2.0, 1.9, -1.0];
    assert_eq!(s.next(&logits, 0).id, 1);
    assert!((s.processed()[0] - 2.0 / 1.2).abs() < 1e-6);
    assert_eq!(logits[0], 2.0, "the model's row is read, not written");
    // -1.0 * 1.2 = -1.2 < -1.1.
    let mut s = Sampler::new(params.clone(), &[0]);
    assert_eq!(s.next(&[-1.0, -1.1], 0).id, 1);
    // Generated tokens are penalised too, and only once however often they appear.
    let mut s = Sampler::new(params, &[5, 5, 5]);
    assert_eq!(s.next(&[2.0, 1.9, 0.0, 0.0, 0.0, 0.0], 0).id, 0);
    let logits = [2.0, 1.9, 0.0, 0.0, 0.0, 0.0];
    assert_eq!(s.next(&logits, 0).id, 1);
    assert!((s.processed()[0] - 2.0 / 1.2).abs() < 1e-6);
}

#[test]
fn greedy_without_penalties_processes_no_copy() {
    let mut s = Sampler::new(greedy(), &[0]);
    assert_eq!(s.next(&[0.5, 2.0, 1.0], 0).id, 1);
    assert!(s.processed().is_empty());
}

#[test]
fn frequency_penalty_grows_with_count_over_generated_tokens_only() {
    let params = SamplingParams {
        frequency_penalty: 0.6,
        ..greedy()
    };
    // The prompt does not count: token 0 still wins the first step.
    let mut s = Sampler::new(params, &[0, 0, 0]);
    let ids: Vec<u32> = (0..4).map(|_| s.next(&[2.0, 1.5, 0.0], 0).id).collect();
    // 2.0 > 1.5; 1.4 < 1.5; 1.4 > 0.9; 0.8 < 0.9.
    assert_eq!(ids, vec![0, 1, 0, 1]);
    assert_eq!(s.generated_count(0), 2);
}

#[test]
fn presence_penalty_is_subtracted_once_per_generated_token() {
    let params = SamplingParams {
        presence_penalty: 0.6,
        ..greedy()
    };
    let mut s = Sampler::new(params, &[]);
    let ids: Vec<u32> = (0..4).map(|_| s.next(&[2.0, 1.5, 0.0], 0).id).collect();
    // 2.0 > 1.5; 1.4 < 1.5; then 1.4 > 0.9 for ever.
    assert_eq!(ids, vec![0, 1, 0, 0]);
}

#[test]
fn penalties_ignore_ids_outside_the_vocabulary() {
    let params = SamplingParams {
        repetition_penalty: 2.0,
        frequency_penalty: 1.0,
        ..greedy()
    };
    let mut s = Sampler::new(params, &[1000]);
    assert_eq!(s.next(&[0.0, 1.0], 0).id, 1);
}

#[test]
fn tiny_temperature_behaves_like_argmax() {
    let logits = [1.0, 1.2, 0.5, 1.19];
    for seed in 0..50 {
        let params = SamplingParams {
            temperature: 1e-3,
            ..sampling(seed)
        };
        assert_eq!(Sampler::new(params, &[]).next(&logits, 0).id, 1);
    }
    // Temperature 0 with do_sample is the limit: greedy, no division by zero.
    let params = SamplingParams {
        temperature: 0.0,
        ..sampling(1)
    };
    let out = Sampler::new(params, &[]).next(&logits, 0);
    assert_eq!(out.id, 1);
    assert!(out.logprob.is_finite());
}

#[test]
fn a_temperature_whose_scaled_logits_overflow_is_greedy() {
    // 1e-45 is the smallest f32 a request's 5e-324 narrows to: 1.2 / 1e-45 is infinite.
    let logits = [1.0, 1.2, -0.5, 1.19];
    for seed in 0..20 {
        let params = SamplingParams {
            temperature: 1e-45,
            frequency_penalty: -1.5,
            presence_penalty: -1.7,
            ..sampling(seed)
        };
        let out = Sampler::new(params.clone(), &[]).next(&logits, 0);
        assert_eq!(out.id, 1);
        let mut s = Sampler::new(params, &[]);
        for _ in 0..4 {
            let out = s.next(&logits, 0);
            assert!(out.logprob.is_finite(), "{out:?}");
        }
    }
}

#[test]
fn top_k_one_and_tiny_top_p_equal_greedy() {
    for seed in 0..20 {
        let logits = random_logits(500, seed);
        let want = Sampler::new(greedy(), &[]).next(&logits, 0).id;
        let top_k = SamplingParams {
            top_k: 1,
            ..sampling(seed)
        };
        let top_p = SamplingParams {
            top_p: 1e-6,
            ..sampling(seed)
        };
        assert_eq!(Sampler::new(top_k, &[]).next(&logits, 0).id, want);
        assert_eq!(Sampler::new(top_p, &[]).next(&logits, 0).id, want);
    }
}

#[test]
fn a_seed_fixes_the_stream() {
    let logits = random_logits(1000, 7);
    let stream = |seed| -> Vec<u32> {
        let mut s = Sampler::new(sampling(seed), &[]);
        (0..64).map(|_| s.next(&logits, 0).id).collect()
    };
    assert_eq!(stream(42), stream(42));
    assert_ne!(stream(42), stream(43));
}

#[test]
fn rng_is_xoshiro256starstar_seeded_by_splitmix64() {
    // SplitMix64's first outputs from state 0 (reference values of Vigna's splitmix64.c).
    let rng = Xoshiro256StarStar::seed_from_u64(0);
    assert_eq!(rng.s[0], 0xE220_A839_7B1D_CDAF);
    assert_eq!(rng.s[1], 0x6E78_9E6A_A1B9_65F4);
    // xoshiro256**'s first output is rotl(s1 * 5, 7) * 9.
    let mut rng = rng;
    let want = 0x6E78_9E6A_A1B9_65F4u64
        .wrapping_mul(5)
        .rotate_left(7)
        .wrapping_mul(9);
    assert_eq!(rng.next_u64(), want);
    let u = rng.next_f64();
    assert!((0.0..1.0).contains(&u));
}

#[test]
fn draws_follow_the_softmax() {
    let logits = [0.0, 1.0, 2.0, 0.5, -1.0];
    let counts = draw_counts(sampling(3), &logits, 20_000);
    // 4 degrees of freedom: P(chi2 > 30) < 1e-5; with a fixed seed it never flakes.
    assert!(chi_square(&counts, &softmax(&logits)) < 30.0, "{counts:?}");
    // The test can fail: a uniform expectation is far off.
    assert!(chi_square(&counts, &[0.2; 5]) > 1000.0);
}

#[test]
fn temperature_scales_the_distribution() {
    let logits = [0.0, 1.0, 2.0, 0.5, -1.0];
    let params = SamplingParams {
        temperature: 2.0,
        ..sampling(11)
    };
    let counts = draw_counts(params.clone(), &logits, 20_000);
    let scaled: Vec<f32> = logits.iter().map(|l| l / 2.0).collect();
    assert!(chi_square(&counts, &softmax(&scaled)) < 30.0, "{counts:?}");
    assert!(chi_square(&counts, &softmax(&logits)) > 100.0);
    // The chosen token's logprob is that of the tempered distribution.
    let out = Sampler::new(params, &[]).next(&logits, 0);
    let want = log_softmax(&scaled)[out.id as usize];
    assert!((out.logprob - want).abs() < 1e-5);
}

#[test]
fn top_k_renormalises_over_the_k_best() {
    let logits = [0.0, 1.0, 2.0, 0.5, -1.0];
    let params = SamplingParams {
        top_k: 2,
        ..sampling(5)
    };
    let counts = draw_counts(params, &logits, 10_000);
    assert_eq!(counts[0] + counts[3] + counts[4], 0, "{counts:?}");
    let expected = softmax(&[
        f32::NEG_INFINITY,
        1.0,
        2.0,
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
    ]);
    assert!(chi_square(&counts, &expected) < 30.0, "{counts:?}");
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_p() {
    // probs 0.5, 0.25, 0.125, 0.125: top_p 0.7 keeps {0, 1}; 0.75 too (0.5 + 0.25 ≥ 0.75).
    let logits: Vec<f32> = [0.5f32, 0.25, 0.125, 0.125]
        .iter()
        .map(|p| p.ln())
        .collect();
    for top_p in [0.7, 0.75] {
        let params = SamplingParams {
            top_p,
            ..sampling(9)
        };
        let counts = draw_counts(params, &logits, 6_000);
        assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
        let expected = [2.0 / 3.0, 1.0 / 3.0, 0.0, 0.0];
        assert!(chi_square(&counts, &expected) < 30.0, "{counts:?}");
    }
    // 0.8 needs a third token: of the tied 1/8s the lower id; 0.9 needs all four.
    for (top_p, kept) in [(0.8, 3), (0.9, 4)] {
        let params = SamplingParams {
            top_p,
            ..sampling(9)
        };
        let counts = draw_counts(params, &logits, 6_000);
        assert!(counts[..kept].iter().all(|&c| c > 0), "{counts:?}");
        assert!(counts[kept..].iter().all(|&c| c == 0), "{counts:?}");
    }
}

#[test]
fn top_p_over_a_flat_vocabulary_keeps_exactly_the_nucleus() {
    // 1000 nearly equal tokens: hundreds are kept, cut exactly where the mass reaches p.
    let logits: Vec<f32> = (0..1000).map(|i| -(i as f32) * 1e-3).collect();
    let probs = softmax(&logits);
    let top_p = 0.5;
    let mut acc = 0.0;
    let kept = probs
        .iter()
        .position(|&p| {
            acc += p;
            acc >= top_p
        })
        .unwrap()
        + 1;
    assert!(kept > 300);
    let params = SamplingParams {
        top_p: top_p as f32,
        ..sampling(2)
    };
    let counts = draw_counts(params, &logits, 20_000);
    assert!(counts[kept..].iter().all(|&c| c == 0));
    assert!(counts[kept - 20..kept].iter().any(|&c| c > 0));
    assert!(counts[..kept].iter().filter(|&&c| c == 0).count() < kept / 10);
}

#[test]
fn typical_p_keeps_the_tokens_closest_to_the_entropy() {
    // probs 1/2, 1/4, 1/8, 1/8: H = 1.75 bits; |-log2 p - H| = 0.75, 0.25, 1.25, 1.25.
    // Typical order: 1, 0, {2, 3}. typical_p 0.2 keeps only token 1, not the argmax.
    let logits: Vec<f32> = [0.5f32, 0.25, 0.125, 0.125]
        .iter()
        .map(|p| p.ln())
        .collect();
    let params = SamplingParams {
        typical_p: 0.2,
        ..sampling(4)
    };
    let counts = draw_counts(params, &logits, 500);
    assert_eq!(counts, vec![0, 500, 0, 0]);
    // 0.7 keeps {1, 0} (0.25 + 0.5 ≥ 0.7), renormalised 1/3 : 2/3.
    let params = SamplingParams {
        typical_p: 0.7,
        ..sampling(4)
    };
    let counts = draw_counts(params, &logits, 6_000);
    assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
    assert!(chi_square(&counts, &[2.0 / 3.0, 1.0 / 3.0, 0.0, 0.0]) < 30.0);
}

#[test]
fn logprobs_are_normalised_and_top_n_is_descending() {
    let logits = [0.1, 3.0, 2.0, 3.0, -1.0];
    let lsm = log_softmax(&logits);
    let out = Sampler::new(greedy(), &[]).next(&logits, 3);
    let ids: Vec<u32> = out.top.iter().map(|t| t.0).collect();
    assert_eq!(ids, vec![1, 3, 2]);
    for (id, lp) in &out.top {
        assert!((lp - lsm[*id as usize]).abs() < 1e-6);
    }
    // Every token's logprob: they sum to one and include the chosen one.
    let out = Sampler::new(sampling(8), &[]).next(&logits, 100);
    assert_eq!(out.top.len(), logits.len());
    let total: f64 = out.top.iter().map(|t| (t.1 as f64).exp()).sum();
    assert!((total - 1.0).abs() < 1e-5);
    let chosen = out.top.iter().find(|t| t.0 == out.id).unwrap();
    assert_eq!(chosen.1, out.logprob);
}

#[test]
fn top_n_small_and_large_paths_agree_with_a_full_sort() {
    let logits = random_logits(300, 1);
    let mut order: Vec<u32> = (0..300).collect();
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    for n in [1, 5, SMALL_TOP_N, SMALL_TOP_N + 1, 100] {
        let out = Sampler::new(greedy(), &[]).next(&logits, n);
        let ids: Vec<u32> = out.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, order[..n], "n = {n}");
    }
}

#[test]
fn logprob_of_is_log_softmax() {
    let logits = [1.0, 2.0, 3.0];
    let want = 3.0 - (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
    assert!((logprob_of(&logits, 2) - want).abs() < 1e-6);
    let logits = random_logits(1001, 3);
    let lsm = log_softmax(&logits);
    for id in [0, 500, 1000] {
        assert!((logprob_of(&logits, id) - lsm[id as usize]).abs() < 1e-5);
    }
    assert_eq!(logprob_of(&logits, 1001), f32::NEG_INFINITY);
}

#[test]
fn degenerate_logits_do_not_panic() {
    let mut s = Sampler::new(sampling(1), &[]);
    let out = s.next(&[f32::NEG_INFINITY; 4], 2);
    assert_eq!(out.id, 0);
    let out = s.next(&[], 2);
    assert_eq!(out.logprob, f32::NEG_INFINITY);
    // Masked (-inf) tokens are never drawn.
    let counts = draw_counts(
        sampling(6),
        &[f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0],
        2_000,
    );
    assert_eq!(counts[0] + counts[2], 0);
}

#[test]
fn top_k_path_applies_top_p_and_typical_p_like_the_dense_path() {
    // Same hand-made distribution as above plus four negligible tokens that top-k drops.
    let mut logits: Vec<f32> = [0.5f32, 0.25, 0.125, 0.125]
        .iter()
        .map(|p| p.ln())
        .collect();
    logits.extend([-30.0; 4]);
    for (top_p, typical_p, kept) in [(0.7, 1.0, vec![0, 1]), (1.0, 0.2, vec![1])] {
        let params = SamplingParams {
            top_k: 4,
            top_p,
            typical_p,
            ..sampling(10)
        };
        let counts = draw_counts(params, &logits, 3_000);
        let drawn: Vec<usize> = (0..logits.len()).filter(|&i| counts[i] > 0).collect();
        assert_eq!(drawn, kept, "{counts:?}");
    }
}

#[test]
fn smallest_mass_breaks_ties_by_id_and_keeps_at_least_one() {
    // Keys ascending = preference; ids 1 and 3 tie.
    let keys = [3.0, 1.0, 0.0, 1.0, 2.0];
    let weights = [0.1, 0.2, 0.3, 0.2, 0.2];
    let kept = |target: f64| -> Vec<usize> {
        let mut w = weights;
        keep_smallest_mass(&keys, &mut w, target);
        (0..5).filter(|&i| w[i] > 0.0).collect()
    };
    assert_eq!(kept(0.0), vec![2]);
    assert_eq!(kept(0.3), vec![2]);
    assert_eq!(kept(0.4), vec![1, 2]);
    assert_eq!(kept(0.6), vec![1, 2, 3]);
    assert_eq!(kept(0.75), vec![1, 2, 3, 4]);
    assert_eq!(kept(2.0), vec![0, 1, 2, 3, 4]);
}

#[test]
fn fast_exp_matches_libm() {
    let mut x = 0.0f32;
    while x > -100.0 {
        let want = (x as f64).exp();
        let got = exp_nonpositive(x) as f64;
        if x >= -87.0 {
            assert!(
                (got - want).abs() <= 3e-7 * want,
                "exp({x}) = {got}, want {want}"
            );
        } else {
            assert_eq!(got, 0.0);
        }
        x -= 0.013;
    }
    assert_eq!(exp_nonpositive(0.0), 1.0);
    assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_nonpositive(f32::NAN), 0.0);
}

#[test]
fn vocabulary_passes_give_the_same_bits_at_every_level() {
    use super::lanes::{exp_shifted_at, exp_sum_at, first_index_of_at, max_of_at, sum_f64_at};
    use wick_kernels::Level;
    for n in [1, 15, 16, 17, 100, 49_153] {
        let mut logits = random_logits(n, n as u64);
        for l in logits.iter_mut() {
            *l *= 20.0;
        }
        if n > 2 {
            logits[n / 2] = f32::NEG_INFINITY;
            logits[1] = f32::NAN;
        }
        let max = max_of_at(Level::Scalar, &logits);
        let first = first_index_of_at(Level::Scalar, &logits, max);
        let mut want = vec![0f32; n];
        exp_shifted_at(Level::Scalar, &logits, max, &mut want);
        let sum = sum_f64_at(Level::Scalar, &want);
        assert_eq!(
            exp_sum_at(Level::Scalar, &logits, max).to_bits(),
            sum.to_bits(),
            "exp_sum is the sum of exp_shifted, n {n}"
        );
        assert!(max.is_finite() && logits[first as usize] == max);
        for level in Level::supported() {
            assert_eq!(
                max_of_at(level, &logits).to_bits(),
                max.to_bits(),
                "{level}"
            );
            assert_eq!(first_index_of_at(level, &logits, max), first, "{level}");
            let mut got = vec![0f32; n];
            exp_shifted_at(level, &logits, max, &mut got);
            let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{level}, n {n}");
            assert_eq!(sum_f64_at(level, &want).to_bits(), sum.to_bits(), "{level}");
            assert_eq!(
                exp_sum_at(level, &logits, max).to_bits(),
                sum.to_bits(),
                "{level}"
            );
        }
    }
}

#[test]
fn logit_bias_is_added_before_choosing() {
    let logits = random_logits(50, 3);
    let argmax = first_index_of(&logits, max_of(&logits));
    let target = (argmax + 7) % 50;
    let mut forced = Sampler::new(
        SamplingParams {
            logit_bias: vec![(target, 100.0), (argmax, -100.0), (1000, 5.0)],
            ..greedy()
        },
        &[],
    );
    let s = forced.next(&logits, 0);
    assert_eq!(s.id, target);
    // Logprobs are those of the biased distribution.
    let mut biased = logits.clone();
    biased[target as usize] += 100.0;
    biased[argmax as usize] -= 100.0;
    assert!((s.logprob - log_softmax(&biased)[target as usize]).abs() < 1e-4);
}
