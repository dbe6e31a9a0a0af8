//! Which instruction set a kernel runs with, chosen at run time.
//!
//! Every level computes the same integers and performs the same float operations in the same
//! order, so all levels give bit-identical results: a level is a speed, never an answer.

use std::fmt;
use std::str::FromStr;

/// A dispatch level, from the portable scalar code up. Ordered: a cap of `Avx2` allows
/// `Scalar` and `Avx2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Portable Rust; the twin every SIMD path is tested against.
    Scalar,
    /// AVX2 with FMA and F16C (`vpmaddubsw` for the 8-bit dot products).
    Avx2,
    /// AVX-512 F/BW/VL with VNNI (`vpdpbusd`).
    Avx512,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Level; 3] = [Level::Scalar, Level::Avx2, Level::Avx512];

    /// The best level this CPU runs.
    pub fn detected() -> Level {
        use std::sync::OnceLock;
        static DETECTED: OnceLock<Level> = OnceLock::new();
        *DETECTED.get_or_init(detect)
    }

    /// The levels this CPU runs, lowest first (what a test suite should cover here).
    pub fn supported() -> Vec<Level> {
        let best = Level::detected();
        Level::ALL.into_iter().filter(|l| *l <= best).collect()
    }

    /// `self`, lowered to what this CPU runs.
    pub fn capped(self) -> Level {
        self.min(Level::detected())
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Level {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "scalar" => Ok(Level::Scalar),
            "avx2" => Ok(Level::Avx2),
            "avx512" => Ok(Level::Avx512),
            other => Err(format!(
                "unknown CPU kernel level {other:?} (expected avx512, avx2 or scalar)"
            )),
        }
    }
}

/// Defines a function that runs the lane-wise `$body` compiled for the level it is given: the
/// same code built for AVX-512 and AVX2 as well as for the baseline, chosen at run time, so a
/// long pass runs 16 or 8 floats to an instruction where the CPU can. Rust never fuses or
/// reorders float operations, and a body that fixes the order of its sums gives the baseline's
/// bits at every level (its scalar twin is itself).
///
/// `leveled!(vis fn name(args) -> ret = body)` defines `name(level, args)`;
/// `leveled!(vis fn name, name_at(args) -> ret = body)` defines `name_at(level, args)` and
/// `name(args)` at the best level this CPU runs.
#[macro_export]
macro_rules! leveled {
    ($(#[$doc:meta])* $vis:vis fn $name:ident, $at:ident ($($arg:ident: $ty:ty),*) -> $ret:ty = $body:path) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            $at($crate::Level::detected(), $($arg),*)
        }

        $crate::leveled!(
            /// As the function without `_at`, at `level` (lowered to what the CPU has).
            $vis fn $at($($arg: $ty),*) -> $ret = $body
        );
    };
    ($(#[$doc:meta])* $vis:vis fn $at:ident ($($arg:ident: $ty:ty),*) -> $ret:ty = $body:path) => {
        $(#[$doc])*
        $vis fn $at(level: $crate::Level, $($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                // The features `Level::detected` checks for each level, no more.
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,f16c,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                match level.capped() {
                    // SAFETY: `capped` only yields levels the CPU runs.
                    $crate::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::Level::Scalar => {}
                }
            }
            let _ = level;
            $body($($arg),*)
        }
    };
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Level {
    use std::arch::is_x86_feature_detected as has;
    // Every CPU with AVX-512 BW has VL; the attention's 16-bit loads use it.
    if has!("avx512f")
        && has!("avx512bw")
        && has!("avx512vl")
        && has!("avx512vnni")
        && has!("f16c")
        && has!("fma")
    {
        Level::Avx512
    } else if has!("avx2") && has!("fma") && has!("f16c") {
        Level::Avx2
    } else {
        Level::Scalar
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Level {
    Level::Scalar
}

/// The CPU features wick's kernels look for, each with whether this CPU has it: for logs,
/// `/info` and benchmark reports.
pub fn cpu_features() -> Vec<(&'static str, bool)> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        vec![
            ("avx2", has!("avx2")),
            ("fma", has!("fma")),
            ("f16c", has!("f16c")),
            ("avxvnni", has!("avxvnni")),
            ("avx512f", has!("avx512f")),
            ("avx512bw", has!("avx512bw")),
            ("avx512vl", has!("avx512vl")),
            ("avx512vnni", has!("avx512vnni")),
            ("avx512bf16", has!("avx512bf16")),
        ]
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

/// The names of the features in [`cpu_features`] that this CPU has.
pub fn present_cpu_features() -> Vec<&'static str> {
    cpu_features()
        .into_iter()
        .filter(|(_, has)| *has)
        .map(|(name, _)| name)
        .collect()
}

/// The CPU's model name (`/proc/cpuinfo`'s "model name"), or the architecture when unknown.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_order_and_cap() {
        for l in Level::ALL {
            assert_eq!(l.name().parse::<Level>().unwrap(), l);
        }
        assert!("AVX512".parse::<Level>().is_ok());
        assert!("sse"
            .parse::<Level>()
            .unwrap_err()
            .contains("avx512, avx2 or scalar"));
        assert!(Level::Scalar < Level::Avx2 && Level::Avx2 < Level::Avx512);
        assert_eq!(Level::Scalar.capped(), Level::Scalar);
        assert!(Level::Avx512.capped() <= Level::detected());
        assert_eq!(Level::supported()[0], Level::Scalar);
        assert_eq!(*Level::supported().last().unwrap(), Level::detected());
    }
}
