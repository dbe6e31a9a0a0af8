//! f16, bf16 and Q8_0 slices to and from f32, vectorised: the KV cache's writes and the chunk
//! kernel's reads. Widening is exact; narrowing to f16 rounds to nearest, ties to even, as
//! `half` does; every level gives the scalar twin's bits.

use half::{bf16, f16};

use crate::attention::{Q8Block, Q8_VALUES};
use crate::Level;

/// `dst[i] = src[i]` as f32.
///
/// # Panics
/// If the lengths differ.
pub(crate) fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    f16_to_f32_at(Level::detected(), src, dst);
}

/// [`f16_to_f32`] at `level` (lowered to what the CPU has).
pub(crate) fn f16_to_f32_at(level: Level, src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "f16 to f32 lengths");
    match level.capped() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `capped` only yields levels the CPU runs; the lengths were checked.
        Level::Avx512 => unsafe { crate::x86::convert::f16_to_f32_avx512(src, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { crate::x86::convert::f16_to_f32_avx2(src, dst) },
        _ => f16_to_f32_scalar(src, dst),
    }
}

/// `dst[i] = src[i]` rounded to f16 (nearest, ties to even).
///
/// # Panics
/// If the lengths differ.
pub(crate) fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
    f32_to_f16_at(Level::detected(), src, dst);
}

/// [`f32_to_f16`] at `level` (lowered to what the CPU has).
pub(crate) fn f32_to_f16_at(level: Level, src: &[f32], dst: &mut [f16]) {
    assert_eq!(src.len(), dst.len(), "f32 to f16 lengths");
    match level.capped() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `capped` only yields levels the CPU runs; the lengths were checked.
        Level::Avx512 => unsafe { crate::x86::convert::f32_to_f16_avx512(src, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { crate::x86::convert::f32_to_f16_avx2(src, dst) },
        _ => f32_to_f16_scalar(src, dst),
    }
}

/// `dst[i] = src[i]` as f32.
///
/// # Panics
/// If the lengths differ.
pub(crate) fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    bf16_to_f32_at(Level::detected(), src, dst);
}

/// [`bf16_to_f32`] at `level` (lowered to what the CPU has).
pub(crate) fn bf16_to_f32_at(level: Level, src: &[bf16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "bf16 to f32 lengths");
    match level.capped() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `capped` only yields levels the CPU runs; the lengths were checked.
        Level::Avx512 => unsafe { crate::x86::convert::bf16_to_f32_avx512(src, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { crate::x86::convert::bf16_to_f32_avx2(src, dst) },
        _ => bf16_to_f32_scalar(src, dst),
    }
}

/// `dst` = the values of the Q8_0 blocks `src` (`d · q`, exact in f32).
///
/// # Panics
/// If `dst` is not `32 · src.len()` long.
pub(crate) fn q8_to_f32(src: &[Q8Block], dst: &mut [f32]) {
    q8_to_f32_at(Level::detected(), src, dst);
}

/// [`q8_to_f32`] at `level` (lowered to what the CPU has).
pub(crate) fn q8_to_f32_at(level: Level, src: &[Q8Block], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len() * Q8_VALUES, "q8_0 blocks of 32 values");
    match level.capped() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `capped` only yields levels the CPU runs; the lengths were checked.
        Level::Avx512 => unsafe { crate::x86::convert::q8_to_f32_avx512(src, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { crate::x86::convert::q8_to_f32_avx2(src, dst) },
        _ => q8_to_f32_scalar(src, dst),
    }
}

pub(crate) fn q8_to_f32_scalar(src: &[Q8Block], dst: &mut [f32]) {
    for (x, block) in dst.chunks_exact_mut(Q8_VALUES).zip(src) {
        let d = block.d.to_f32();
        for (x, &q) in x.iter_mut().zip(&block.qs) {
            *x = q as f32 * d;
        }
    }
}

/// The scalar twins (also the SIMD levels' tails).
pub(crate) fn f16_to_f32_scalar(src: &[f16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

pub(crate) fn f32_to_f16_scalar(src: &[f32], dst: &mut [f16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f16::from_f32(*s);
    }
}

pub(crate) fn bf16_to_f32_scalar(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::Rng;

    /// Values of every kind: normal, subnormal in f16, past f16's range, halfway cases,
    /// zeros, infinities (NaN has no single rounding to compare).
    fn values(n: usize) -> Vec<f32> {
        let mut rng = Rng(5);
        (0..n)
            .map(|i| match i % 9 {
                0 => rng.next() * 1e-6,
                1 => rng.next() * 1e5,
                2 => f32::from_bits(0x3f80_1000 + (i as u32 % 4) * 0x2000),
                3 => [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY][i / 9 % 4],
                _ => rng.next() * 4.0,
            })
            .collect()
    }

    #[test]
    fn every_level_and_length_converts_as_half_does() {
        let bits = |v: &[f16]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for level in Level::supported() {
            for n in [0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100] {
                let x = values(n);
                let mut h = vec![f16::ZERO; n];
                f32_to_f16_at(level, &x, &mut h);
                let want: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
                assert_eq!(bits(&h), bits(&want), "f32 to f16, {n} at {level}");
                let mut back = vec![f32::NAN; n];
                f16_to_f32_at(level, &h, &mut back);
                let same = back
                    .iter()
                    .zip(&h)
                    .all(|(a, b)| a.to_bits() == b.to_f32().to_bits());
                assert!(same, "f16 to f32, {n} at {level}");
                let b: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
                let mut back = vec![f32::NAN; n];
                bf16_to_f32_at(level, &b, &mut back);
                let same = back
                    .iter()
                    .zip(&b)
                    .all(|(a, b)| a.to_bits() == b.to_f32().to_bits());
                assert!(same, "bf16 to f32, {n} at {level}");
            }
            for blocks in [0, 1, 3] {
                let x = values(32 * blocks);
                let mut q = vec![Q8Block::default(); blocks];
                crate::KvElement::from_f32_slice(&mut q, &x);
                let (mut got, mut want) = (vec![f32::NAN; x.len()], vec![0f32; x.len()]);
                q8_to_f32_at(level, &q, &mut got);
                q8_to_f32_scalar(&q, &mut want);
                assert!(
                    crate::tests::same_bits(&got, &want),
                    "q8_0, {blocks} at {level}"
                );
            }
        }
    }
}
