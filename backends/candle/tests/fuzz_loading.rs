//! Corrupted and truncated model files: thousands of deterministic mutations of a tiny GGUF
//! file and of a tiny Hugging Face folder (safetensors, config.json), each loaded as the shard
//! loads a model. Every case must end in a model or a clear error: never a panic, and never an
//! allocation sized by a header field nobody checked (that would abort the test process).
//!
//! `WICK_FUZZ_CASES` raises the number of cases per target (default 1500).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use candle_core::quantized::GgmlDType;
use wick_backend_candle::model::LlamaModel;
use wick_backend_candle::source::load;
use wick_backend_candle::testing::{self, TinyModelSpec};
use wick_backend_candle::weights::LoadOptions;

fn cases() -> usize {
    std::env::var("WICK_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

/// SplitMix64: deterministic cases from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values a corrupt length or count field likes to hold.
const NASTY: [u64; 9] = [
    0,
    1,
    u64::MAX,
    u64::MAX / 2,
    1 << 32,
    1 << 40,
    1 << 62,
    u32::MAX as u64,
    0x7fff_ffff,
];

/// One mutation of `bytes`, mostly within its first `hot` bytes (a header); returns what it did.
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>, hot: usize) -> String {
    let len = bytes.len();
    let at = |rng: &mut Rng| {
        if rng.below(5) < 4 {
            rng.below(hot.min(len))
        } else {
            rng.below(len)
        }
    };
    match rng.below(6) {
        0 => {
            let n = rng.below(len);
            bytes.truncate(n);
            format!("truncated to {n}")
        }
        1 => {
            let mut flips = Vec::new();
            for _ in 0..1 + rng.below(8) {
                let i = at(rng);
                let bit = rng.below(8);
                bytes[i] ^= 1 << bit;
                flips.push((i, bit));
            }
            format!("bits flipped {flips:?}")
        }
        2 | 3 => {
            let i = at(rng).min(len.saturating_sub(8));
            let value = NASTY[rng.below(NASTY.len())];
            bytes[i..i + 8].copy_from_slice(&value.to_le_bytes());
            format!("u64 {value:#x} at {i}")
        }
        4 => {
            let i = at(rng).min(len.saturating_sub(4));
            let value = rng.next() as u32;
            bytes[i..i + 4].copy_from_slice(&value.to_le_bytes());
            format!("u32 {value:#x} at {i}")
        }
        _ => {
            let i = at(rng);
            let n = 1 + rng.below(64);
            let end = (i + n).min(len);
            bytes.drain(i..end);
            format!("bytes {i}..{end} removed")
        }
    }
}

/// Loads the model at `path` the way the shard does; a panic is the failure this file hunts.
fn load_model(path: &Path) -> Result<(), String> {
    let opts = LoadOptions::default();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let loaded =
            load(path.to_str().unwrap(), None, None, true, &opts).map_err(|e| format!("{e:#}"))?;
        LlamaModel::load(&loaded.config, &loaded.weights, &opts)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }));
    match result {
        Ok(r) => r,
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("loading panicked: {text}")
        }
    }
}

/// Runs `cases()` mutations of `original` written to `target`, loading `load_path` each time;
/// returns how many loaded and how many failed cleanly.
fn fuzz(original: &[u8], hot: usize, target: &Path, load_path: &Path, seed: u64) -> (usize, usize) {
    let mut rng = Rng(seed);
    let (mut loaded, mut refused) = (0, 0);
    for case in 0..cases() {
        let mut bytes = original.to_vec();
        let mut what = Vec::new();
        for _ in 0..1 + rng.below(3) {
            if bytes.len() > 16 {
                what.push(mutate(&mut rng, &mut bytes, hot));
            }
        }
        std::fs::write(target, &bytes).unwrap();
        if std::env::var_os("WICK_FUZZ_VERBOSE").is_some() {
            eprintln!("case {case}: {what:?}");
        }
        let result = catch_unwind(AssertUnwindSafe(|| load_model(load_path)));
        match result {
            Ok(Ok(())) => loaded += 1,
            Ok(Err(e)) => {
                assert!(!e.is_empty(), "case {case} ({what:?}): an empty error");
                refused += 1;
            }
            Err(_) => panic!("case {case} ({what:?}) panicked (see above)"),
        }
    }
    (loaded, refused)
}

#[test]
fn corrupted_gguf_files_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinyModelSpec::llama();
    let good = dir.path().join("good.gguf");
    let mut original = Vec::new();
    for (i, dtype) in [GgmlDType::Q8_0, GgmlDType::F32].into_iter().enumerate() {
        testing::write_gguf_model(&good, &spec, dtype).unwrap();
        original = std::fs::read(&good).unwrap();
        // The header (metadata with the tokenizer, then the tensor table) is where the lengths
        // and counts live; most mutations land there.
        let hot = original.len() / 2;
        let target = dir.path().join(format!("case-{i}.gguf"));
        let (loaded, refused) = fuzz(&original, hot, &target, &target, 0x6775_6766 + i as u64);
        eprintln!(
            "GGUF {dtype:?}: {} cases, {loaded} loaded, {refused} refused",
            cases()
        );
        assert!(
            refused > cases() / 2,
            "the mutations hardly touched anything"
        );
    }
    assert!(!original.is_empty());
}

#[test]
fn corrupted_safetensors_and_configs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinyModelSpec::llama();
    let model = dir.path().join("model");
    testing::write_hf_model(&model, &spec).unwrap();
    for (i, file) in ["model.safetensors", "config.json"].into_iter().enumerate() {
        let path = model.join(file);
        let original = std::fs::read(&path).unwrap();
        // safetensors: an 8-byte header length, then the JSON header.
        let hot = if i == 0 {
            8 + u64::from_le_bytes(original[..8].try_into().unwrap()) as usize
        } else {
            original.len()
        };
        let (loaded, refused) = fuzz(&original, hot, &path, &model, 0x7361_6665 + i as u64);
        eprintln!(
            "{file}: {} cases, {loaded} loaded, {refused} refused",
            cases()
        );
        assert!(refused > 0, "{file}: no mutation was refused");
        std::fs::write(&path, &original).unwrap();
    }
}
