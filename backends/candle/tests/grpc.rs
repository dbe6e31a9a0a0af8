//! The real `wick-shard` binary on a tiny Hugging Face model, driven over its unix socket the
//! way the router drives it.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{batch, connect, decode_to_end, request, start_shard};
use tonic::Code;
use wick_backend_candle::testing::{tiny_vocab_size, write_hf_model, TinyModelSpec, IM_END_ID};
use wick_proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_serves_the_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let spec = TinyModelSpec::llama();
    write_hf_model(&model, &spec).unwrap();
    let uds_base = dir.path().join("shard");
    let socket = PathBuf::from(format!("{}-0", uds_base.display()));
    // A stale socket file from a dead shard must not stop a new one.
    std::fs::write(&socket, b"").unwrap();
    let mut shard = start_shard(&model, &uds_base, dir.path().join("shard.log"), &[]);
    let mut client = connect(&mut shard, &socket).await;

    // Info carries everything the router needs.
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.block_size, 16);
    assert!(info.support_chunking && info.use_prefix_caching && !info.requires_padding);
    assert_eq!(info.device_type, "cpu");
    assert_eq!(info.dtype, "float32");
    assert_eq!(info.quantize, "f32");
    // The KV cache is f16 by default: 2 layers × 2 KV heads × 16 dims × (K, V) × 2 bytes.
    assert_eq!(info.kv_cache_dtype, "f16");
    assert_eq!(info.kv_cache_bytes_per_token, 256);
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.vocab_size as usize, tiny_vocab_size());
    assert_eq!(
        info.max_position_embeddings as usize,
        spec.max_position_embeddings
    );
    assert!(info.eos_token_ids.contains(&IM_END_ID));
    assert_eq!((info.rank, info.world_size), (0, 1));
    assert_eq!(info.model_id, model.display().to_string());
    let tokenizer: tokenizers::Tokenizer = info.tokenizer_json.parse().expect("tokenizer json");
    assert_eq!(tokenizer.get_vocab_size(true), tiny_vocab_size());

    let urls = client
        .service_discovery(pb::ServiceDiscoveryRequest {})
        .await
        .unwrap()
        .into_inner()
        .urls;
    assert_eq!(urls, vec![format!("unix://{}", socket.display())]);

    client
        .clear_cache(pb::ClearCacheRequest { id: None })
        .await
        .unwrap();

    // Warmup as the router sends it: prompts of one token, blocks for each prompt.
    let warm = |id: u64, len: usize| pb::Request {
        prefill_logprobs: true,
        top_n_tokens: 20,
        ..request(id, vec![5; len], 100)
    };
    let warmup = client
        .warmup(pb::WarmupRequest {
            batch: Some(batch(0, vec![warm(0, 64), warm(1, 32)])),
            max_input_tokens: None,
            max_prefill_tokens: 96,
            max_total_tokens: None,
        })
        .await
        .unwrap()
        .into_inner();
    // 1 MiB over 256 bytes per slot; a request is capped by the model's 2048 positions.
    assert_eq!(warmup.max_supported_total_tokens, Some(4096));
    assert_eq!(warmup.max_total_tokens, 2048);
    assert_eq!(warmup.max_input_tokens, 2047);

    // Prefill and decode to the end: one token per request per step.
    // The router tokenizes; the shard only ever sees ids.
    let text_ids = tokenizer
        .encode("The capital of France is", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let text_request = request(2, text_ids, 4);
    let mut with_details = request(1, vec![5, 6, 7, 8, 9, 10], 6);
    with_details.prefill_logprobs = true;
    with_details.top_n_tokens = 3;
    let resp = client
        .prefill(pb::PrefillRequest {
            batch: Some(batch(1, vec![with_details, text_request])),
            cached_batch: None,
            // The shard computes the next step while this answer travels: the decodes below
            // take it.
            run_ahead: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.generations.len(), 2);
    let first = &resp.generations[0];
    assert_eq!(first.request_id, 1);
    assert_eq!(first.tokens.as_ref().unwrap().ids.len(), 1);
    let prefill = first.prefill_tokens.as_ref().unwrap();
    assert_eq!(prefill.ids, vec![5, 6, 7, 8, 9, 10]);
    assert!(prefill.logprobs[0].is_nan());
    assert_eq!(first.top_tokens.len(), 1);
    assert_eq!(first.top_tokens[0].ids.len(), 3);
    assert!(resp.generations[1].top_tokens.is_empty());
    let cached = resp.batch.unwrap();
    assert_eq!(cached.id, 1);
    assert_eq!(cached.request_ids, vec![1, 2]);
    assert_eq!(cached.current_tokens, 2);
    let rest = decode_to_end(&mut client, Some(cached)).await;
    let done: Vec<_> = rest
        .iter()
        .filter_map(|g| g.generated_text.clone().map(|t| (g.request_id, t)))
        .collect();
    assert_eq!(done.len(), 2);
    for (id, text) in done {
        assert_eq!(text.generated_tokens, if id == 1 { 6 } else { 4 });
        assert_eq!(text.finish_reason, pb::FinishReason::Length as i32);
        assert_eq!(text.seed, None);
    }

    // A new request joins a running batch; then the running one is filtered out.
    let resp = client
        .prefill(pb::PrefillRequest {
            batch: Some(batch(2, vec![request(3, vec![11, 12, 13], 10)])),
            cached_batch: None,
            // The join below comes while this batch's next step runs ahead: the new request
            // steps on its own and the answer joins the two, as if the step had waited.
            run_ahead: true,
        })
        .await
        .unwrap()
        .into_inner();
    let running = resp.batch.unwrap();
    let mut joining = request(4, (20..60).collect(), 5);
    // Router-placed KV: blocks 100..103 (43 positions), prompt in chunks of 16.
    joining.blocks = vec![100, 101, 102];
    joining.chunk_len = Some(16);
    let resp = client
        .prefill(pb::PrefillRequest {
            batch: Some(batch(3, vec![joining])),
            cached_batch: Some(running.clone()),
            // And the filter below comes while the next step runs ahead.
            run_ahead: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.generations
            .iter()
            .map(|g| g.request_id)
            .collect::<Vec<_>>(),
        vec![3]
    );
    let merged = resp.batch.unwrap();
    assert_eq!(merged.id, running.id);
    assert_eq!(merged.request_ids, vec![3, 4]);
    assert_eq!(merged.current_tokens, 1 + 16);
    assert!(resp.concat_ns.is_some());
    let filtered = client
        .filter_batch(pb::FilterBatchRequest {
            batch_id: merged.id,
            request_ids: vec![4],
        })
        .await
        .unwrap()
        .into_inner()
        .batch
        .unwrap();
    assert_eq!(filtered.request_ids, vec![4]);
    let rest = decode_to_end(&mut client, Some(filtered)).await;
    assert!(rest.iter().all(|g| g.request_id == 4));
    assert_eq!(rest.len(), 5);
    assert_eq!(
        rest.last()
            .unwrap()
            .generated_text
            .as_ref()
            .unwrap()
            .generated_tokens,
        5
    );

    // Bad requests get a clear status and the shard keeps serving.
    let mut bad = request(5, vec![1, 2, 3], 4);
    bad.blocks = vec![1_000_000];
    let err = client
        .prefill(pb::PrefillRequest {
            batch: Some(batch(4, vec![bad])),
            cached_batch: None,
            run_ahead: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("block 1000000"), "{}", err.message());
    // The shard neither tokenizes nor allocates: no ids, or no blocks, is a bad request.
    let mut no_blocks = request(5, vec![1, 2, 3], 4);
    no_blocks.blocks.clear();
    for (bad, says) in [
        (request(5, Vec::new(), 4), "empty prompt"),
        (no_blocks, "no KV blocks"),
    ] {
        let err = client
            .prefill(pb::PrefillRequest {
                batch: Some(batch(4, vec![bad])),
                cached_batch: None,
                run_ahead: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(says), "{}", err.message());
    }
    let err = client
        .decode(pb::DecodeRequest {
            batches: vec![pb::CachedBatch {
                id: 77,
                ..Default::default()
            }],
            run_ahead: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let resp = client
        .prefill(pb::PrefillRequest {
            batch: Some(batch(5, vec![request(6, vec![1, 2, 3], 3)])),
            cached_batch: None,
            run_ahead: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.generations.len(), 1);
    client
        .clear_cache(pb::ClearCacheRequest { id: Some(5) })
        .await
        .unwrap();
    let err = client
        .decode(pb::DecodeRequest {
            batches: vec![resp.batch.unwrap()],
            run_ahead: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    client.health(pb::HealthRequest {}).await.unwrap();

    // SIGTERM: a graceful exit that removes the socket.
    drop(client);
    let pid = shard.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut exited = None;
    for _ in 0..100 {
        if let Some(status) = shard.child.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(exited.expect("the shard exits on SIGTERM").success());
    assert!(!socket.exists(), "the socket file is removed on shutdown");
}
