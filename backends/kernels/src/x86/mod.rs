//! x86-64 kernels, each compiled for its instruction set and called only after run-time
//! detection (see [`crate::Level`]).

pub(crate) mod activation;
pub(crate) mod attention;
pub(crate) mod avx2;
pub(crate) mod avx512;
pub(crate) mod dense;
pub(crate) mod elementwise;

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

/// One pass of a row tile's inputs: for each of its rows, the row's quants, block scales,
/// block sums and half-block sums.
pub(crate) struct Blocks<const R: usize> {
    pub qs: [*const i8; R],
    pub scales: [*const f32; R],
    pub sums: [*const i32; R],
    pub half_sums: [*const i32; R],
}

impl<const R: usize> Blocks<R> {
    /// Rows `first..first + R` of `blocks` (`k` values per row). Plain pointer arithmetic:
    /// this runs for every tile of every panel, and slicing each field of each row cost a
    /// decode row several percent of a matrix product.
    #[inline(always)]
    fn of(blocks: &crate::activation::Blocks, first: usize, k: usize) -> Self {
        let nb = k / crate::BLOCK;
        assert!(
            (first + R) * nb <= blocks.scales.len(),
            "rows past the activation"
        );
        let at = |v: usize| (first + v) * nb;
        Self {
            qs: std::array::from_fn(|i| blocks.qs.as_ptr().wrapping_add((first + i) * k)),
            scales: std::array::from_fn(|i| blocks.scales.as_ptr().wrapping_add(at(i))),
            sums: std::array::from_fn(|i| blocks.sums.as_ptr().wrapping_add(at(i))),
            half_sums: std::array::from_fn(|i| blocks.half_sums.as_ptr().wrapping_add(at(i))),
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

/// A row tile's inputs: its first row, the rows' first pass, and whether any of them has
/// refined blocks (whose second pass follows the first, row by row).
pub(crate) struct Rows<const R: usize> {
    pub first: usize,
    pub main: Blocks<R>,
    pub refined: bool,
}

impl<const R: usize> Rows<R> {
    #[inline(always)]
    pub fn new(x: &crate::QuantizedRows, first: usize) -> Self {
        Self {
            first,
            main: Blocks::of(x.main(), first, x.k()),
            refined: x.any_refined(first..first + R),
        }
    }
}

/// `$call` with `$f` bound to `format`'s const parameter.
macro_rules! with_format {
    ($format:expr, $f:ident => $call:expr) => {
        match $format {
            crate::Format::Q8_0 => {
                const $f: u8 = crate::x86::Q8_0;
                $call
            }
            crate::Format::Q4_0 => {
                const $f: u8 = crate::x86::Q4_0;
                $call
            }
            crate::Format::Q4_1 => {
                const $f: u8 = crate::x86::Q4_1;
                $call
            }
            crate::Format::Q4K => {
                const $f: u8 = crate::x86::Q4K;
                $call
            }
            crate::Format::Q6K => {
                const $f: u8 = crate::x86::Q6K;
                $call
            }
            crate::Format::Q5_0 => {
                const $f: u8 = crate::x86::Q5_0;
                $call
            }
            crate::Format::Q5_1 => {
                const $f: u8 = crate::x86::Q5_1;
                $call
            }
            crate::Format::Q5K => {
                const $f: u8 = crate::x86::Q5K;
                $call
            }
        }
    };
}
pub(crate) use with_format;

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
                    crate::x86::with_format!($f, F => $tile::<$n, F>(&crate::x86::Rows::<$n>::new($x, r), o, $($arg),*))
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
