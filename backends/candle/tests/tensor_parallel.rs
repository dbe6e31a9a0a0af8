//! Tensor parallelism in one process: N ranks on threads, joined by the unix-socket collective,
//! each loading its part of the same tiny model from the same files. Their logits must equal
//! the whole model's within a tolerance set by the weights' compute path at every position of a
//! packed prefill and of the decode steps that follow (fed the whole model's greedy tokens),
//! pick the same top token wherever the whole model's lead exceeds twice that tolerance, and
//! agree among the ranks bit for bit.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use candle_core::quantized::GgmlDType;
use wick_backend_candle::kv_cache::KvCache;
use wick_backend_candle::model::LlamaModel;
use wick_backend_candle::parallel::SocketCollective;
use wick_backend_candle::source;
use wick_backend_candle::step::{SeqSpan, StepInput};
use wick_backend_candle::testing::{
    tiny_vocab_size, write_gguf_model, write_hf_model, TinyModelSpec,
};
use wick_backend_candle::weights::LoadOptions;
use wick_kernels::KvDtype;
use wick_model::config::Architecture;

/// Dense f32 weights: split and whole differ only in the order partial sums are added.
const TOL: f32 = 1e-4;
/// Quantized weights on wick's kernels: the same kernels on every rank and in the whole model,
/// but a float-level difference in a sum can move an 8-bit activation across a rounding
/// boundary (a step of amax/127), which the next layers carry.
const QUANTIZED_TOL: f32 = 0.05;
const BLOCK_SIZE: usize = 4;
const BLOCKS_PER_SEQ: usize = 8;
const DECODE_STEPS: usize = 4;

/// Logits of every step, each `[rows][vocab]`, and the greedy tokens chosen.
#[derive(Debug, Clone, PartialEq)]
struct Run {
    logits: Vec<Vec<Vec<f32>>>,
    tokens: Vec<Vec<u32>>,
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0 as u32
}

/// A packed prefill of `prompts` (logits of every position), then decode steps of all
/// sequences together, each fed its greedy token or, with `forced`, another run's.
fn run(model: &LlamaModel, prompts: &[Vec<u32>], forced: Option<&[Vec<u32>]>) -> Run {
    // f32 values: the split is held to the whole model's arithmetic, which a 16-bit cache's
    // rounding would blur.
    let mut cache = KvCache::with_dtype(
        model.config(),
        model.plan().kv_heads.len(),
        prompts.len() * BLOCKS_PER_SEQ,
        BLOCK_SIZE,
        KvDtype::F32,
    );
    let tables: Vec<Vec<u32>> = (0..prompts.len())
        .map(|s| ((s * BLOCKS_PER_SEQ) as u32..((s + 1) * BLOCKS_PER_SEQ) as u32).collect())
        .collect();
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let mut cached = vec![0usize; prompts.len()];
    let mut out = Run {
        logits: Vec::new(),
        tokens: Vec::new(),
    };
    for step in 0..=DECODE_STEPS {
        let mut input = StepInput {
            tokens: Vec::new(),
            positions: Vec::new(),
            seqs: Vec::new(),
            logit_rows: Vec::new(),
        };
        let mut last_rows = Vec::new();
        for (s, seq) in seqs.iter().enumerate() {
            let start = input.tokens.len();
            let new = &seq[cached[s]..];
            for (i, &t) in new.iter().enumerate() {
                let pos = cached[s] + i;
                input.tokens.push(t);
                input.positions.push(pos as u32);
                // Every position at the prefill, the last one when decoding.
                if step == 0 || i + 1 == new.len() {
                    input.logit_rows.push((start + i) as u32);
                }
            }
            input.seqs.push(SeqSpan {
                start,
                len: new.len(),
                context_len: seq.len(),
                block_table: &tables[s],
                prompt: step == 0,
            });
            last_rows.push(input.logit_rows.len() - 1);
        }
        let logits = model
            .forward(&input, &mut cache)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        drop(input);
        let next: Vec<u32> = last_rows.iter().map(|&r| argmax(&logits[r])).collect();
        let fed = forced.map_or(&next, |f| &f[step]);
        for (s, seq) in seqs.iter_mut().enumerate() {
            cached[s] = seq.len();
            seq.push(fed[s]);
        }
        out.logits.push(logits);
        out.tokens.push(next);
    }
    out
}

/// GGUF weights compute as stored (no f32 copies), so the split quantized kernels run.
fn options(path: &Path) -> LoadOptions {
    let gguf = path.extension().is_some_and(|e| e == "gguf");
    LoadOptions {
        dense_copy_min_rows: if gguf {
            None
        } else {
            LoadOptions::default().dense_copy_min_rows
        },
        ..LoadOptions::default()
    }
}

fn load(path: &Path) -> source::LoadedModel {
    source::load(path.to_str().unwrap(), None, None, true, &options(path)).unwrap()
}

/// Runs the model at `path` split over `world` ranks on threads; returns every rank's run.
fn run_parallel(
    path: &Path,
    world: usize,
    prompts: &[Vec<u32>],
    forced: Option<&[Vec<u32>]>,
) -> Vec<Run> {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("tp");
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (base, path, prompts) = (base.clone(), path.to_path_buf(), prompts.to_vec());
            let forced = forced.map(|f| f.to_vec());
            std::thread::spawn(move || {
                let comm =
                    SocketCollective::connect(&base, rank, world, Duration::from_secs(60)).unwrap();
                let loaded = load(&path);
                let model = LlamaModel::load_parallel(
                    &loaded.config,
                    &loaded.weights,
                    &options(&path),
                    Arc::new(comm),
                )
                .unwrap();
                assert_eq!(model.plan().world_size, world);
                run(&model, &prompts, forced.as_deref())
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn prompts() -> Vec<Vec<u32>> {
    let vocab = tiny_vocab_size() as u32;
    [11usize, 5, 1]
        .iter()
        .enumerate()
        .map(|(s, &len)| {
            (0..len as u32)
                .map(|i| 3 + (i * 37 + s as u32 * 101 + i * i * 13) % (vocab - 3))
                .collect()
        })
        .collect()
}

/// The top entry's lead over the second.
fn margin(row: &[f32]) -> f32 {
    let best = argmax(row) as usize;
    let second = row
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != best)
        .fold(f32::NEG_INFINITY, |m, (_, &v)| m.max(v));
    row[best] - second
}

/// Compares `world`-rank runs of the model at `path` with the whole model, within `tol`.
fn assert_split_matches_whole(path: &Path, worlds: &[usize], tol: f32) {
    let prompts = prompts();
    let loaded = load(path);
    let whole = run(
        &LlamaModel::load(&loaded.config, &loaded.weights, &options(path)).unwrap(),
        &prompts,
        None,
    );
    for &world in worlds {
        let ranks = run_parallel(path, world, &prompts, Some(&whole.tokens));
        for (rank, r) in ranks.iter().enumerate() {
            // The same bits on every rank: they sample the same tokens.
            assert!(r == &ranks[0], "rank {rank} of {world} differs from rank 0");
        }
        let split = &ranks[0];
        let (mut worst, mut compared) = (0f32, 0);
        for (a, b) in split.logits.iter().zip(&whole.logits) {
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                assert_eq!(x.len(), loaded.config.vocab_size);
                for (p, q) in x.iter().zip(y) {
                    worst = worst.max((p - q).abs());
                }
                // Greedy choices must agree where a difference within `tol` cannot flip them.
                if margin(y) > 2.0 * tol {
                    assert_eq!(argmax(x), argmax(y), "top token with {world} ranks");
                    compared += 1;
                }
            }
        }
        assert!(compared > 0, "no row had a clear top token");
        eprintln!(
            "{} with {world} ranks: max |Δlogit| = {worst:.2e}",
            path.display()
        );
        assert!(worst <= tol, "{world} ranks: max |Δlogit| {worst}");
    }
}

/// Heads and KV heads that divide by 2 and 3, an MLP width and a vocabulary that do not.
fn splittable(spec: TinyModelSpec) -> TinyModelSpec {
    TinyModelSpec {
        num_attention_heads: 6,
        num_key_value_heads: 6,
        head_dim: 8,
        hidden_size: 48,
        intermediate_size: 100,
        ..spec
    }
}

#[test]
fn llama_split_over_two_and_three_ranks_matches_whole() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinyModelSpec {
        num_key_value_heads: 3,
        ..splittable(TinyModelSpec::llama())
    };
    write_hf_model(dir.path(), &spec).unwrap();
    assert_split_matches_whole(dir.path(), &[3], TOL);
    let spec = TinyModelSpec {
        num_attention_heads: 12,
        ..splittable(TinyModelSpec::llama())
    };
    write_hf_model(dir.path(), &spec).unwrap();
    assert_split_matches_whole(dir.path(), &[2, 3], TOL);
}

#[test]
fn qwen2_bias_and_tied_embeddings_split_matches_whole() {
    let dir = tempfile::tempdir().unwrap();
    write_hf_model(dir.path(), &splittable(TinyModelSpec::qwen2())).unwrap();
    assert_split_matches_whole(dir.path(), &[2, 3], TOL);
}

#[test]
fn qwen3_qk_norm_split_matches_whole() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinyModelSpec {
        head_dim: 16,
        ..splittable(TinyModelSpec::qwen3())
    };
    assert_eq!(spec.architecture, Architecture::Qwen3);
    write_hf_model(dir.path(), &spec).unwrap();
    assert_split_matches_whole(dir.path(), &[2], TOL);
}

#[test]
fn mistral_sliding_window_split_matches_whole() {
    let dir = tempfile::tempdir().unwrap();
    write_hf_model(dir.path(), &splittable(TinyModelSpec::mistral())).unwrap();
    assert_split_matches_whole(dir.path(), &[2], TOL);
}

/// GGUF weights split as stored: rows of Q8_0 blocks, and columns on block boundaries (64 of
/// o_proj's 128 inputs, 128 of down_proj's 256), so each rank keeps quantized weights.
#[test]
fn quantized_gguf_split_matches_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let spec = TinyModelSpec {
        num_attention_heads: 8,
        num_key_value_heads: 4,
        head_dim: 16,
        hidden_size: 64,
        intermediate_size: 256,
        ..TinyModelSpec::llama()
    };
    write_gguf_model(&path, &spec, GgmlDType::Q8_0).unwrap();
    assert_split_matches_whole(&path, &[2, 4], QUANTIZED_TOL);
}

/// With the `nccl` feature, on a machine with CUDA devices: the model on GPUs, one rank per
/// device joined by NCCL (3 or 2 ranks when there are that many devices, else one GPU alone),
/// gives the CPU model's logits and greedy tokens. cuBLAS sums in another order than the CPU
/// kernels, hence the looser bound.
#[cfg(feature = "nccl")]
#[test]
fn cuda_ranks_over_nccl_match_the_cpu_model() {
    use candle_core::Device;
    use wick_backend_candle::parallel;

    const GPU_TOL: f32 = 1e-3;
    let gpus = candle_core::cuda::cudarc::driver::CudaContext::device_count()
        .expect("CUDA devices can be counted") as usize;
    assert!(gpus > 0, "this test needs a CUDA device");
    let world = [3, 2, 1].into_iter().find(|&w| w <= gpus).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = TinyModelSpec {
        num_attention_heads: 12,
        ..splittable(TinyModelSpec::llama())
    };
    write_hf_model(dir.path(), &spec).unwrap();
    let prompts = prompts();
    let loaded = load(dir.path());
    let cpu = run(
        &LlamaModel::load(&loaded.config, &loaded.weights, &LoadOptions::default()).unwrap(),
        &prompts,
        None,
    );
    let base = dir.path().join("tp");
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (base, path, prompts) = (base.clone(), dir.path().to_path_buf(), prompts.clone());
            std::thread::spawn(move || {
                let device = Device::new_cuda(rank).unwrap();
                let opts = LoadOptions {
                    device: device.clone(),
                    ..LoadOptions::default()
                };
                let loaded = load(&path);
                let model = if world == 1 {
                    LlamaModel::load(&loaded.config, &loaded.weights, &opts).unwrap()
                } else {
                    let comm =
                        parallel::connect(&base, rank, world, Duration::from_secs(60), &device)
                            .unwrap();
                    LlamaModel::load_parallel(&loaded.config, &loaded.weights, &opts, comm).unwrap()
                };
                run(&model, &prompts, None)
            })
        })
        .collect();
    let ranks: Vec<Run> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for r in &ranks {
        assert_eq!(r.tokens, cpu.tokens, "greedy tokens on {world} GPU rank(s)");
    }
    let worst = ranks[0]
        .logits
        .iter()
        .flatten()
        .flatten()
        .zip(cpu.logits.iter().flatten().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("{world} GPU rank(s) vs CPU: max |Δlogit| = {worst:.2e}");
    assert!(worst <= GPU_TOL, "max |Δlogit| {worst}");
}
