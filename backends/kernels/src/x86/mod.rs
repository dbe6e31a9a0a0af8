//! x86-64 kernels, each compiled for its instruction set and called only after run-time
//! detection (see [`crate::Level`]).

pub(crate) mod activation;
pub(crate) mod attention;
pub(crate) mod avx2;
pub(crate) mod avx512;
pub(crate) mod convert;
pub(crate) mod dense;
pub(crate) mod elementwise;
pub(crate) mod prefill;

/// Formats as const parameters, so each tile is compiled once per format with its branches
/// folded away.
pub(crate) const Q8_0: u8 = 0;
pub(crate) const Q4_0: u8 = 1;
pub(crate) const Q4_1: u8 = 2;
pub(crate) const Q4K: u8 = 3;
pub(crate) const Q6K: u8 = 4;
pub(crate) const Q5_0: u8 = 5;
pub(crate) const Q5_1: u8 = 6;
pub(crate) const Q5K: u8 = 7;

/// The format a const parameter stands for.
pub(crate) const fn format_of(f: u8) -> crate::Format {
    match f {
        Q8_0 => crate::Format::Q8_0,
        Q4_1 => crate::Format::Q4_1,
        Q4K => crate::Format::Q4K,
        Q6K => crate::Format::Q6K,
        Q5_0 => crate::Format::Q5_0,
        Q5_1 => crate::Format::Q5_1,
        Q5K => crate::Format::Q5K,
        _ => crate::Format::Q4_0,
    }
}

/// A row tile's inputs: its first row; for each of its rows, the row's quants, block scales,
/// block sums and half-block sums (its first pass); and whether any of its rows has refined
/// blocks (whose second pass follows the first, row by row).
pub(crate) struct Rows<const R: usize> {
    pub first: usize,
    pub qs: [*const i8; R],
    pub scales: [*const f32; R],
    pub sums: [*const i32; R],
    pub half_sums: [*const i32; R],
    pub refined: bool,
}

impl<const R: usize> Rows<R> {
    /// Rows `first..first + R` of `x`. Plain pointer arithmetic: this runs for every tile of
    /// every panel, and slicing each field of each row cost a decode row several percent of a
    /// matrix product.
    #[inline(always)]
    pub fn new(x: &crate::QuantizedRows, first: usize) -> Self {
        let (blocks, k) = (x.main(), x.k());
        let nb = k / crate::BLOCK;
        assert!(
            (first + R) * nb <= blocks.scales.len(),
            "rows past the activation"
        );
        let at = |i: usize| (first + i) * nb;
        Self {
            first,
            qs: std::array::from_fn(|i| blocks.qs.as_ptr().wrapping_add((first + i) * k)),
            scales: std::array::from_fn(|i| blocks.scales.as_ptr().wrapping_add(at(i))),
            sums: std::array::from_fn(|i| blocks.sums.as_ptr().wrapping_add(at(i))),
            half_sums: std::array::from_fn(|i| blocks.half_sums.as_ptr().wrapping_add(at(i))),
            refined: x.any_refined(first..first + R),
        }
    }

    /// Row `r`'s scale, sum and half sum of block `b`.
    #[inline(always)]
    pub unsafe fn sums(&self, r: usize, b: usize) -> (f32, i32, i32) {
        (
            *self.scales[r].add(b),
            *self.sums[r].add(b),
            *self.half_sums[r].add(b),
        )
    }
}

/// Calls `$tile::<R, F>(…)` for `rows` in tiles of `$max` rows and one tail tile.
macro_rules! for_row_tiles {
    ($tile:ident, $max:literal, $f:expr, $x:expr, $rows:expr, $out:expr, $($arg:expr),*) => {{
        let rows: std::ops::Range<usize> = $rows;
        let out: &mut [[f32; crate::PANEL]] = $out;
        let mut r = rows.start;
        while r < rows.end {
            let o = &mut out[r - rows.start..];
            let left = rows.end - r;
            macro_rules! call {
                ($n:literal) => {
                    match $f {
                        crate::Format::Q8_0 => $tile::<$n, { crate::x86::Q8_0 }>(&crate::x86::Rows::<$n>::new($x, r), o, $($arg),*),
                        crate::Format::Q4_0 => $tile::<$n, { crate::x86::Q4_0 }>(&crate::x86::Rows::<$n>::new($x, r), o, $($arg),*),
                        crate::Format::Q4_1 => $tile::<$n, { crate::x86::Q4_1 }>(&crate::x86::Rows::<$n>::new($x, r), o, $($arg),*),
                        crate::Format::Q4K => $tile::<$n, { crate::x86::Q4K }>(&crate::x86::Rows::<$n>::new($x, r), o, $($arg),*),
                        crate::Format::Q6K => $tile::<$n, { crate::x86::Q6K }>(&crate::x86::Rows::<$n>::new($x, r), o, $($arg),*),
                        crate::Format::Q5_0 => $tile::<$n, { crate::x86::Q5_0 }>(&crate::x86::Rows::<$n>::new($x, r), o, $($arg),*),
                        crate::Format::Q5_1 => $tile::<$n, { crate::x86::Q5_1 }>(&crate::x86::Rows::<$n>::new($x, r), o, $($arg),*),
                        crate::Format::Q5K => $tile::<$n, { crate::x86::Q5K }>(&crate::x86::Rows::<$n>::new($x, r), o, $($arg),*),
                    }
                };
            }
            let step = if left >= $max { $max } else { left };
            match step {
                1 => call!(1),
                2 => call!(2),
                3 => call!(3),
                4 => call!(4),
                5 => call!(5),
                6 => call!(6),
                7 => call!(7),
                _ => call!($max),
            }
            r += step;
        }
    }};
}
pub(crate) use for_row_tiles;
