//! Tensor parallelism through real processes: N `wick-shard` ranks of one tiny model, driven
//! over their sockets the way the router drives them (every call to every rank at once). Their
//! tokens, logprobs and top alternatives must equal one shard's (within 1e-4), every rank must
//! answer alike, and a rank that dies or hangs must stop the others with its rank named.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{batch, connect, request, start_shard, Shard};
use futures::future::join_all;
use wick_backend_candle::testing::{tiny_vocab_size, write_hf_model, TinyModelSpec};
use wick_proto::v1 as pb;
use wick_proto::ShardClient;

const TOL: f32 = 1e-4;

/// A tiny model whose 12 heads and 6 KV heads divide by 2 and 3 (its MLP width does not).
fn splittable_model(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    let spec = TinyModelSpec {
        num_attention_heads: 12,
        num_key_value_heads: 6,
        head_dim: 8,
        hidden_size: 48,
        intermediate_size: 100,
        ..TinyModelSpec::llama()
    };
    write_hf_model(&model, &spec).unwrap();
    model
}

/// `world` ranks of `model`, each with a client.
struct Set {
    shards: Vec<Shard>,
    clients: Vec<ShardClient>,
}

async fn start_set(model: &Path, dir: &Path, world: usize, extra: &[&str]) -> Set {
    let base = dir.join(format!("shard-w{world}"));
    let world_arg = world.to_string();
    let mut shards: Vec<Shard> = (0..world)
        .map(|rank| {
            let rank_arg = rank.to_string();
            let mut args = vec!["--rank", &rank_arg, "--world-size", &world_arg];
            args.extend_from_slice(extra);
            start_shard(
                model,
                &base,
                dir.join(format!("w{world}-rank{rank}.log")),
                &args,
            )
        })
        .collect();
    let mut clients = Vec::new();
    for (rank, shard) in shards.iter_mut().enumerate() {
        let socket = PathBuf::from(format!("{}-{rank}", base.display()));
        clients.push(connect(shard, &socket).await);
    }
    Set { shards, clients }
}

impl Set {
    /// Prefills `b` on every rank at once; every rank's answer.
    async fn prefill(&self, b: pb::Batch) -> Vec<Result<pb::PrefillResponse, tonic::Status>> {
        join_all(self.clients.iter().map(|c| {
            let (mut c, b) = (c.clone(), b.clone());
            async move {
                c.prefill(pb::PrefillRequest {
                    batch: Some(b),
                    cached_batch: None,
                    // Every rank computes the next step ahead, in lock-step.
                    run_ahead: true,
                })
                .await
                .map(tonic::Response::into_inner)
            }
        }))
        .await
    }

    async fn decode(&self, b: pb::CachedBatch) -> Vec<pb::DecodeResponse> {
        join_all(self.clients.iter().map(|c| {
            let (mut c, b) = (c.clone(), b.clone());
            async move {
                c.decode(pb::DecodeRequest {
                    batches: vec![b],
                    run_ahead: true,
                })
                .await
                .unwrap()
                .into_inner()
            }
        }))
        .await
    }

    /// Runs `b` to the end; every rank's generations, step by step.
    async fn generate(&self, b: pb::Batch) -> Vec<Vec<pb::Generation>> {
        let first: Vec<pb::PrefillResponse> = self
            .prefill(b)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let mut cached = first[0].batch.clone();
        let mut per_rank: Vec<Vec<pb::Generation>> =
            first.into_iter().map(|r| r.generations).collect();
        while let Some(b) = cached {
            let answers = self.decode(b).await;
            cached = answers[0].batch.clone();
            for (rank, a) in answers.into_iter().enumerate() {
                assert_eq!(
                    a.batch.map(|b| b.request_ids),
                    cached.as_ref().map(|b| b.request_ids.clone()),
                    "rank {rank}'s batch"
                );
                per_rank[rank].extend(a.generations);
            }
        }
        per_rank
    }
}

/// Greedy requests with prompt logprobs and top-5 alternatives, a seeded sampled one and one
/// that finishes early.
fn mixed_batch() -> pb::Batch {
    let vocab = tiny_vocab_size() as u32;
    let prompt = |len: u32, salt: u32| -> Vec<u32> {
        (0..len)
            .map(|i| 3 + (i * 31 + salt * 17 + i * i * 7) % (vocab - 3))
            .collect()
    };
    let detailed = |id: u64, len: u32| pb::Request {
        prefill_logprobs: true,
        top_n_tokens: 5,
        ..request(id, prompt(len, id as u32), 6)
    };
    let mut sampled = request(3, prompt(9, 3), 6);
    sampled.parameters = Some(pb::NextTokenChooserParameters {
        temperature: 0.8,
        top_p: 0.95,
        do_sample: true,
        seed: 7,
        ..Default::default()
    });
    // Finishes before the others: the other ranks learn it from rank 0.
    let short = request(4, prompt(5, 4), 2);
    let mut b = batch(1, vec![detailed(1, 13), detailed(2, 4), sampled, short]);
    b.max_tokens = 0;
    b
}

/// One generation's request id, token ids, logprobs (token and prompt), top ids and top
/// logprobs.
type Tokens = (u64, Vec<u32>, Vec<f32>, Vec<u32>, Vec<f32>);

/// Ids, logprobs and top alternatives of every generation, for comparison.
fn tokens(gens: &[pb::Generation]) -> Vec<Tokens> {
    gens.iter()
        .map(|g| {
            let t = g.tokens.clone().unwrap_or_default();
            let prefill = g.prefill_tokens.clone().unwrap_or_default();
            let top = g.top_tokens.first().cloned().unwrap_or_default();
            let mut logprobs = t.logprobs.clone();
            logprobs.extend(prefill.logprobs.iter().filter(|l| !l.is_nan()));
            (g.request_id, t.ids, logprobs, top.ids, top.logprobs)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_shards_answer_like_one_shard() {
    let dir = tempfile::tempdir().unwrap();
    let model = splittable_model(dir.path());
    let one = start_set(&model, dir.path(), 1, &[]).await;
    let reference = tokens(&one.generate(mixed_batch()).await.remove(0));
    drop(one);
    assert!(reference.len() >= 3 * 6);
    for world in [2, 3] {
        let set = start_set(&model, dir.path(), world, &[]).await;
        let mut info = Vec::new();
        for c in &set.clients {
            info.push(
                c.clone()
                    .info(pb::InfoRequest {})
                    .await
                    .unwrap()
                    .into_inner(),
            );
        }
        assert!(info
            .iter()
            .enumerate()
            .all(|(r, i)| i.rank as usize == r && i.world_size as usize == world));
        let urls = set.clients[0]
            .clone()
            .service_discovery(pb::ServiceDiscoveryRequest {})
            .await
            .unwrap()
            .into_inner()
            .urls;
        assert_eq!(urls.len(), world);

        let per_rank = set.generate(mixed_batch()).await;
        // Only rank 0 samples and answers; the others took its tokens (their batches matched
        // rank 0's at every step, early finishers included: see `Set::generate`).
        for (rank, gens) in per_rank.iter().enumerate().skip(1) {
            assert!(gens.is_empty(), "rank {rank} of {world}: {gens:?}");
        }
        let got = tokens(&per_rank[0]);
        assert_eq!(got.len(), reference.len());
        let mut worst = 0f32;
        for (g, r) in got.iter().zip(&reference) {
            assert_eq!(
                (g.0, &g.1, &g.3),
                (r.0, &r.1, &r.3),
                "{world} ranks: request {}",
                g.0
            );
            for (a, b) in g.2.iter().zip(&r.2).chain(g.4.iter().zip(&r.4)) {
                worst = worst.max((a - b).abs());
            }
        }
        eprintln!("{world} ranks: max |Δlogprob| = {worst:.2e}");
        assert!(worst <= TOL, "{world} ranks: max |Δlogprob| {worst}");
    }
}

/// Waits for `shard` to exit; returns its exit code and log.
fn wait_exit(shard: &mut Shard, within: Duration) -> (Option<i32>, String) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = shard.child.try_wait().unwrap() {
            return (status.code(), std::fs::read_to_string(&shard.log).unwrap());
        }
        assert!(Instant::now() < deadline, "the shard did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_rank_stops_the_others_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let model = splittable_model(dir.path());
    let mut set = start_set(&model, dir.path(), 3, &[]).await;
    set.generate(mixed_batch()).await;
    set.shards[2].child.kill().unwrap();
    set.shards[2].child.wait().unwrap();
    // Ranks 0 and 1 get the next step; the exchange with rank 2 fails at once.
    set.clients.truncate(2);
    let started = Instant::now();
    let answers = set.prefill(mixed_batch()).await;
    for (rank, a) in answers.iter().enumerate() {
        let e = a.as_ref().unwrap_err().message().to_string();
        assert!(e.contains("rank 2"), "rank {rank}: {e}");
    }
    for rank in 0..2 {
        let (code, log) = wait_exit(&mut set.shards[rank], Duration::from_secs(20));
        assert_eq!(code, Some(1), "rank {rank}");
        assert!(
            log.contains("rank 2 closed its connection"),
            "rank {rank}: {log}"
        );
    }
    // Well before the 60 s collective timeout: nothing waited for the dead rank.
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_rank_is_named_once_the_timeout_passes() {
    let dir = tempfile::tempdir().unwrap();
    let model = splittable_model(dir.path());
    let mut set = start_set(&model, dir.path(), 2, &["--collective-timeout", "1.5"]).await;
    let pid = set.shards[1].child.id() as i32;
    // SAFETY: plain signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    set.clients.truncate(1);
    let answers = set.prefill(mixed_batch()).await;
    let e = answers[0].as_ref().unwrap_err().message().to_string();
    assert!(e.contains("rank(s) 1 did not answer"), "{e}");
    let (code, log) = wait_exit(&mut set.shards[0], Duration::from_secs(20));
    assert_eq!(code, Some(1));
    assert!(log.contains("rank(s) 1 did not answer"), "{log}");
    // SAFETY: as above; the stopped rank is killed by the harness on drop.
    unsafe { libc::kill(pid, libc::SIGCONT) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_whose_heads_do_not_divide_fails_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    // 4 heads and 2 KV heads cannot go to 3 ranks.
    write_hf_model(&model, &TinyModelSpec::llama()).unwrap();
    let base = dir.path().join("shard");
    let mut shards: Vec<Shard> = (0..3)
        .map(|rank| {
            let rank = rank.to_string();
            start_shard(
                &model,
                &base,
                dir.path().join(format!("rank{rank}.log")),
                &["--rank", &rank, "--world-size", "3"],
            )
        })
        .collect();
    for shard in &mut shards {
        let (code, log) = wait_exit(shard, Duration::from_secs(60));
        assert_eq!(code, Some(1));
        assert!(
            log.contains("cannot be split over 3 shards: its 4 attention heads and 2 KV heads"),
            "{log}"
        );
    }
}
