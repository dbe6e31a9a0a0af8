//! The engine on a tiny random model: batched equals alone (invariant 1), chunked prefill,
//! stop rules, prompt logprobs and top-n, router-given KV placement, invalid requests, warmup.

use std::collections::HashMap;

mod engine_support;

use engine_support::*;
use wick_backend_candle::engine::{EngineError, Generation, NewRequest, StepOutput, WarmupLimits};
use wick_backend_candle::stopping::FinishReason;

/// The 8 requests of the invariant tests: mixed prompt lengths (one spans several blocks, one
/// is chunked), mixed lengths of output, greedy and seeded.
fn mixed_requests() -> Vec<NewRequest> {
    let lens = [3, 17, 5, 40, 1, 9, 24, 12];
    let new_tokens = [6, 12, 3, 8, 10, 4, 7, 9];
    (0..8)
        .map(|i| {
            let sampling = if i % 2 == 0 {
                greedy()
            } else {
                seeded(100 + i as u64)
            };
            let mut r = request(i as u64, prompt(lens[i], i as u32), new_tokens[i], sampling);
            if i == 3 {
                r.chunk_len = Some(16);
            }
            r
        })
        .collect()
}

/// Appends every generated token to its request's list.
fn collect(
    out: &StepOutput,
    tokens: &mut HashMap<u64, Vec<u32>>,
    finished: &mut HashMap<u64, Generation>,
) {
    for g in &out.generations {
        tokens.entry(g.request_id).or_default().push(g.token.id);
        if g.finished.is_some() {
            assert!(
                finished.insert(g.request_id, g.clone()).is_none(),
                "request {} finished twice",
                g.request_id
            );
        }
    }
    if let Some(b) = &out.batch {
        for id in finished.keys() {
            assert!(
                !b.request_ids.contains(id),
                "finished request {id} still in the batch"
            );
        }
        assert_eq!(b.size as usize, b.request_ids.len());
    }
}

/// Hands out `requests` by id, each once.
fn taker(requests: Vec<NewRequest>) -> impl FnMut(&[u64]) -> Vec<NewRequest> {
    let mut by_id: HashMap<u64, NewRequest> = requests.into_iter().map(|r| (r.id, r)).collect();
    move |ids| ids.iter().map(|id| by_id.remove(id).unwrap()).collect()
}

fn alone_tokens(requests: &[NewRequest]) -> HashMap<u64, Vec<u32>> {
    let mut engine = engine();
    requests
        .iter()
        .map(|r| {
            let ids = run_alone(&mut engine, r.clone())
                .iter()
                .map(|g| g.token.id)
                .collect();
            (r.id, ids)
        })
        .collect()
}

#[test]
fn requests_alone_run_to_max_new_tokens() {
    let requests = mixed_requests();
    let mut engine = engine();
    for r in &requests {
        let generations = run_alone(&mut engine, r.clone());
        assert_eq!(
            generations.len(),
            r.stopping.max_new_tokens as usize,
            "request {}",
            r.id
        );
        let last = generations
            .last()
            .unwrap()
            .finished
            .clone()
            .expect("finished");
        assert_eq!(last.reason, FinishReason::Length);
        assert_eq!(last.generated_tokens, r.stopping.max_new_tokens);
        assert_eq!(last.seed, r.sampling.do_sample.then_some(r.sampling.seed));
        assert!(generations[..generations.len() - 1]
            .iter()
            .all(|g| g.finished.is_none()));
    }
    assert_no_leak(&engine);
}

#[test]
fn batched_tokens_equal_alone_tokens() {
    let requests = mixed_requests();
    let alone = alone_tokens(&requests);
    // The same requests never share a forward pass twice in the same way: they join at
    // different steps (prefill alone, prefill with a cached batch, a second batch merged by
    // decode) and leave on their own at different steps.
    let mut engine = engine();
    let mut tokens = HashMap::new();
    let mut finished = HashMap::new();
    let mut take = taker(requests);

    let out = engine.prefill(1, take(&[0, 1, 2]), None).unwrap();
    collect(&out, &mut tokens, &mut finished);
    let out = engine.decode(&[1]).unwrap();
    collect(&out, &mut tokens, &mut finished);
    // Joins the running batch (mixed prefill + decode in one forward; request 3 is chunked).
    let out = engine.prefill(2, take(&[3, 4]), Some(1)).unwrap();
    assert_eq!(
        out.batch.as_ref().unwrap().id,
        1,
        "the merged batch keeps the cached id"
    );
    collect(&out, &mut tokens, &mut finished);
    let out = engine.decode(&[1]).unwrap();
    collect(&out, &mut tokens, &mut finished);
    // A separate batch, merged by decode.
    let out = engine.prefill(3, take(&[5, 6]), None).unwrap();
    collect(&out, &mut tokens, &mut finished);
    let out = engine.decode(&[1, 3]).unwrap();
    assert!(out.concat_ns.is_some());
    let mut batch = out.batch.clone();
    collect(&out, &mut tokens, &mut finished);
    let out = engine
        .prefill(4, take(&[7]), Some(batch.unwrap().id))
        .unwrap();
    batch = out.batch.clone();
    collect(&out, &mut tokens, &mut finished);
    while let Some(b) = batch {
        let out = engine.decode(&[b.id]).unwrap();
        batch = out.batch.clone();
        collect(&out, &mut tokens, &mut finished);
    }
    assert_eq!(finished.len(), 8);
    for (id, expected) in &alone {
        assert_eq!(
            &tokens[id], expected,
            "request {id}: batched differs from alone"
        );
    }
    assert_no_leak(&engine);
}

#[test]
fn filtered_requests_leave_and_the_rest_are_unchanged() {
    let requests = mixed_requests();
    let alone = alone_tokens(&requests);
    let mut engine = engine();
    let mut tokens = HashMap::new();
    let mut finished = HashMap::new();
    let out = engine.prefill(7, requests, None).unwrap();
    collect(&out, &mut tokens, &mut finished);
    let out = engine.decode(&[7]).unwrap();
    collect(&out, &mut tokens, &mut finished);
    // Requests 1 and 6 are cancelled by the router.
    let keep: Vec<u64> = out
        .batch
        .as_ref()
        .unwrap()
        .request_ids
        .iter()
        .copied()
        .filter(|id| *id != 1 && *id != 6)
        .collect();
    let filtered = engine.filter(7, &keep).unwrap().unwrap();
    assert_eq!(filtered.request_ids, keep);
    let mut batch = Some(filtered);
    let mut step = 0;
    while let Some(b) = batch {
        step += 1;
        // Later, request 7 is cancelled too.
        let b = if step == 3 {
            let keep: Vec<u64> = b
                .request_ids
                .iter()
                .copied()
                .filter(|id| *id != 7)
                .collect();
            engine.filter(b.id, &keep).unwrap().unwrap()
        } else {
            b
        };
        let out = engine.decode(&[b.id]).unwrap();
        batch = out.batch.clone();
        collect(&out, &mut tokens, &mut finished);
    }
    for (id, expected) in &alone {
        let got = &tokens[id];
        if [1, 6, 7].contains(id) {
            assert!(!finished.contains_key(id), "request {id} was filtered out");
            assert!(
                got.len() < expected.len() && expected.starts_with(got),
                "request {id}"
            );
        } else {
            assert_eq!(got, expected, "request {id}: batched differs from alone");
        }
    }
    assert_no_leak(&engine);
}

/// Invariant 1 with steps computed ahead (the router's `run_ahead`): a step computed before it
/// is asked for gives the tokens of the step run in turn, and a filter, a merge with new or
/// other running requests, or a clear that comes first is answered as if it had not run.
#[test]
fn steps_run_ahead_give_the_tokens_of_steps_run_in_turn() {
    let requests = mixed_requests();
    let alone = alone_tokens(&requests);
    let mut engine = engine();
    let mut tokens = HashMap::new();
    let mut finished = HashMap::new();
    let mut take = taker(requests);

    let out = engine.prefill(1, take(&[0, 1, 2]), None).unwrap();
    collect(&out, &mut tokens, &mut finished);
    // The decode takes the step computed ahead.
    engine.run_ahead(1);
    let out = engine.decode(&[1]).unwrap();
    assert_eq!(out.generations.len(), 3);
    collect(&out, &mut tokens, &mut finished);
    // Request 0 is cancelled while the next step runs ahead: the filter answers with the batch
    // as it was before that step, and the step's results lose request 0.
    engine.run_ahead(1);
    let filtered = engine.filter(1, &[1, 2]).unwrap().unwrap();
    assert_eq!(filtered.request_ids, vec![1, 2]);
    assert_eq!(filtered.current_tokens, 2);
    // Request 1: 17 + 12 - 1 positions, two blocks; request 2: 5 + 3 - 1, one.
    assert_eq!(filtered.max_tokens as usize, 3 * BLOCK_SIZE);
    let out = engine.decode(&[1]).unwrap();
    // Request 2 ends in the step that ran ahead (its third token).
    assert_eq!(out.generations.len(), 2);
    assert!(out.generations.iter().all(|g| g.request_id != 0));
    assert!(!out.batch.as_ref().unwrap().request_ids.contains(&0));
    collect(&out, &mut tokens, &mut finished);
    // New requests join the batch whose step ran ahead (request 3 chunked): they step on
    // their own and the answer joins both under the cached id.
    engine.run_ahead(1);
    let out = engine.prefill(2, take(&[3, 4]), Some(1)).unwrap();
    assert_eq!(out.batch.as_ref().unwrap().id, 1);
    collect(&out, &mut tokens, &mut finished);
    // A separate batch, merged by a decode that lists the batch that ran ahead second.
    engine.run_ahead(1);
    let out = engine.prefill(3, take(&[5, 6]), None).unwrap();
    collect(&out, &mut tokens, &mut finished);
    let out = engine.decode(&[3, 1]).unwrap();
    let mut batch = out.batch.clone();
    assert_eq!(batch.as_ref().unwrap().id, 3);
    collect(&out, &mut tokens, &mut finished);
    engine.run_ahead(3);
    let out = engine.prefill(4, take(&[7]), Some(3)).unwrap();
    batch = out.batch.clone();
    collect(&out, &mut tokens, &mut finished);
    // To the end, every step computed ahead.
    while let Some(b) = batch {
        engine.run_ahead(b.id);
        let out = engine.decode(&[b.id]).unwrap();
        batch = out.batch.clone();
        collect(&out, &mut tokens, &mut finished);
    }
    assert_eq!(finished.len(), 7);
    for (id, expected) in &alone {
        let got = &tokens[id];
        if *id == 0 {
            assert!(!finished.contains_key(id), "request 0 was filtered out");
            assert!(expected.starts_with(got), "request 0");
        } else {
            assert_eq!(got, expected, "request {id}: ahead differs from alone");
        }
    }
    assert_no_leak(&engine);

    // A clear drops a step computed ahead with its batch.
    engine
        .prefill(5, vec![request(8, prompt(5, 8), 4, greedy())], None)
        .unwrap();
    engine.run_ahead(5);
    engine.clear(Some(5));
    assert_no_leak(&engine);
    assert!(matches!(
        engine.decode(&[5]),
        Err(EngineError::BatchNotFound(5))
    ));
}

#[test]
fn chunked_prefill_equals_one_prefill() {
    let mut engine = engine();
    let whole = request(1, prompt(40, 9), 6, greedy());
    let expected: Vec<u32> = run_alone(&mut engine, whole.clone())
        .iter()
        .map(|g| g.token.id)
        .collect();

    let mut chunked = whole;
    chunked.id = 2;
    chunked.chunk_len = Some(14);
    // 40 prompt tokens in chunks of 14, 14 and 12: no token until the last chunk.
    let out = engine.prefill(2, vec![chunked], None).unwrap();
    assert!(out.generations.is_empty());
    assert_eq!(out.batch.as_ref().unwrap().current_tokens, 14);
    let out = engine.decode(&[2]).unwrap();
    assert!(out.generations.is_empty());
    assert_eq!(out.batch.as_ref().unwrap().current_tokens, 12);
    let mut out = engine.decode(&[2]).unwrap();
    assert_eq!(out.generations.len(), 1);
    assert_eq!(out.batch.as_ref().unwrap().current_tokens, 1);
    let mut got = Vec::new();
    loop {
        got.extend(out.generations.iter().map(|g| g.token.id));
        let Some(b) = out.batch else { break };
        out = engine.decode(&[b.id]).unwrap();
    }
    assert_eq!(got, expected);
    assert_no_leak(&engine);
}

#[test]
fn cached_batch_reports_tokens_and_slots() {
    let mut engine = engine();
    // 17 prompt tokens + 12 new → 28 positions → 2 blocks.
    let out = engine
        .prefill(
            1,
            vec![
                request(1, prompt(17, 1), 12, greedy()),
                request(2, prompt(5, 2), 3, greedy()),
            ],
            None,
        )
        .unwrap();
    let b = out.batch.unwrap();
    assert_eq!(b.request_ids, vec![1, 2]);
    assert_eq!(b.size, 2);
    assert_eq!(b.max_tokens as usize, (2 + 1) * BLOCK_SIZE);
    assert_eq!(b.current_tokens, 2);
    engine.clear(None);
    assert_no_leak(&engine);
}

#[test]
fn max_new_tokens_and_stop_sequences_end_requests() {
    let mut engine = engine();
    let generations = run_alone(&mut engine, request(1, prompt(6, 3), 10, greedy()));
    assert_eq!(generations.len(), 10);
    let texts: Vec<&str> = generations.iter().map(|g| g.token.text.as_str()).collect();
    // Stop on the text generated up to the first step (k ≥ 2) that adds text: it can only match
    // once all of it is there.
    let k = (2..10)
        .find(|&k| !texts[k].is_empty())
        .expect("some token has text");
    let stop: String = texts[..=k].concat();
    let mut r = request(2, prompt(6, 3), 10, greedy());
    r.stopping.stop_sequences = vec![stop.clone()];
    let stopped = run_alone(&mut engine, r);
    assert_eq!(stopped.len(), k + 1);
    let fin = stopped.last().unwrap().finished.clone().unwrap();
    assert_eq!(fin.reason, FinishReason::StopSequence);
    assert_eq!(fin.generated_tokens as usize, k + 1);
    assert!(
        fin.text.contains(stop.trim()),
        "{:?} lacks {stop:?}",
        fin.text
    );
    assert_eq!(fin.seed, None);
    assert_no_leak(&engine);
}

#[test]
fn prompt_logprobs_and_top_n_have_the_right_shapes() {
    let mut engine = engine();
    let input = prompt(20, 4);
    let mut r = request(1, input.clone(), 3, greedy());
    r.prefill_logprobs = true;
    r.top_n_tokens = 5;
    let generations = run_alone(&mut engine, r.clone());
    let prefill = generations[0].prefill.clone().expect("prompt logprobs");
    assert_eq!(prefill.iter().map(|t| t.id).collect::<Vec<_>>(), input);
    assert!(prefill[0].logprob.is_nan());
    assert!(prefill[1..]
        .iter()
        .all(|t| t.logprob.is_finite() && t.logprob <= 0.0));
    assert!(generations[1..].iter().all(|g| g.prefill.is_none()));
    for g in &generations {
        assert_eq!(g.top_tokens.len(), 5);
        assert!(g
            .top_tokens
            .windows(2)
            .all(|w| w[0].logprob >= w[1].logprob));
        // Greedy picks the most likely token.
        assert_eq!(g.top_tokens[0].id, g.token.id);
        assert!((g.top_tokens[0].logprob - g.token.logprob).abs() < 1e-5);
    }

    // The same logprobs when the prompt is computed in chunks.
    r.id = 2;
    r.chunk_len = Some(7);
    let chunked = run_alone(&mut engine, r);
    let chunked_prefill = chunked[0].prefill.clone().unwrap();
    for (a, b) in prefill[1..].iter().zip(&chunked_prefill[1..]) {
        assert!(
            (a.logprob - b.logprob).abs() < 1e-4,
            "{} vs {}",
            a.logprob,
            b.logprob
        );
    }
    assert_eq!(
        chunked.iter().map(|g| g.token.id).collect::<Vec<_>>(),
        generations.iter().map(|g| g.token.id).collect::<Vec<_>>()
    );

    // No alternatives asked, none given.
    let plain = run_alone(&mut engine, request(3, input, 2, greedy()));
    assert!(plain
        .iter()
        .all(|g| g.top_tokens.is_empty() && g.prefill.is_none()));
    assert_no_leak(&engine);
}

#[test]
fn scattered_blocks_give_the_same_tokens() {
    let requests: Vec<NewRequest> = vec![
        request(1, prompt(21, 5), 14, greedy()),
        request(2, prompt(7, 6), 9, seeded(7)),
    ];
    let alone = alone_tokens(&requests);

    let mut engine = engine();
    let mut placed = requests.clone();
    // 21 + 14 - 1 = 34 positions → 3 blocks, scattered and out of order.
    placed[0].blocks = vec![250, 7, 133];
    placed[1].blocks = vec![12];
    let mut tokens = HashMap::new();
    let mut finished = HashMap::new();
    let mut out = engine.prefill(1, placed, None).unwrap();
    loop {
        collect(&out, &mut tokens, &mut finished);
        let Some(b) = out.batch else { break };
        out = engine.decode(&[b.id]).unwrap();
    }
    assert_eq!(tokens, alone);
    assert_no_leak(&engine);
}

#[test]
fn invalid_requests_are_refused_without_disturbing_the_batch() {
    let mut engine = engine();
    let out = engine
        .prefill(1, vec![request(1, prompt(5, 1), 20, greedy())], None)
        .unwrap();
    let running = out.batch.unwrap();

    let bad = |f: &dyn Fn(&mut NewRequest)| {
        let mut r = request(9, prompt(10, 2), 4, greedy());
        f(&mut r);
        r
    };
    let cases: Vec<NewRequest> = vec![
        bad(&|r| r.blocks = vec![NUM_BLOCKS as u32]),
        bad(&|r| r.blocks = vec![3]), // 13 positions fit, but…
        bad(&|r| {
            r.blocks = vec![3];
            r.stopping.max_new_tokens = 40; // …49 positions do not fit one block
        }),
        bad(&|r| r.blocks.clear()),
        bad(&|r| r.input_ids.clear()),
        bad(&|r| r.input_ids[0] = 1_000_000),
        bad(&|r| r.stopping.max_new_tokens = 0),
        bad(&|r| r.stopping.max_new_tokens = 1_000_000),
        bad(&|r| {
            r.blocks = vec![3];
            r.cache_len = 10;
        }),
    ];
    for (i, r) in cases.into_iter().enumerate() {
        let valid = i == 1;
        let result = engine.prefill(2, vec![r], Some(1));
        if valid {
            // The control case: a valid request joins; take it out again.
            let b = result.unwrap().batch.unwrap();
            engine.filter(b.id, &[1]).unwrap();
            continue;
        }
        assert!(
            matches!(result, Err(EngineError::InvalidRequest(_))),
            "case {i}: {result:?}"
        );
    }
    assert!(matches!(
        engine.decode(&[42]),
        Err(EngineError::BatchNotFound(42))
    ));
    assert!(matches!(
        engine.prefill(3, vec![request(3, prompt(4, 3), 2, greedy())], Some(42)),
        Err(EngineError::BatchNotFound(42))
    ));
    assert!(matches!(
        engine.filter(1, &[1, 77]),
        Err(EngineError::InvalidRequest(_))
    ));
    // A request id twice.
    assert!(matches!(
        engine.prefill(4, vec![request(1, prompt(4, 3), 2, greedy())], Some(1)),
        Err(EngineError::InvalidRequest(_))
    ));

    // The running request goes on untouched.
    let out = engine.decode(&[running.id]).unwrap();
    assert_eq!(out.batch.unwrap().request_ids, vec![1]);
    engine.clear(Some(1));
    assert_no_leak(&engine);
}

#[test]
fn warmup_reports_limits_and_leaves_nothing_behind() {
    let mut engine = engine();
    let requests = vec![
        request(1, prompt(100, 1), 50, seeded(3)),
        request(2, prompt(60, 2), 1, greedy()),
    ];
    let info = engine
        .warmup(
            1,
            requests.clone(),
            WarmupLimits {
                max_input_tokens: None,
                max_prefill_tokens: 160,
                max_total_tokens: None,
            },
        )
        .unwrap();
    let slots = (NUM_BLOCKS * BLOCK_SIZE) as u32;
    assert_eq!(info.max_supported_total_tokens, slots);
    assert_eq!(info.max_total_tokens, slots.min(2048));
    assert_eq!(info.max_input_tokens, info.max_total_tokens - 1);
    assert_no_leak(&engine);

    let info = engine
        .warmup(
            2,
            requests,
            WarmupLimits {
                max_input_tokens: Some(300),
                max_prefill_tokens: 160,
                max_total_tokens: Some(400),
            },
        )
        .unwrap();
    assert_eq!((info.max_input_tokens, info.max_total_tokens), (300, 400));

    // Blocks past the cache are refused (the router sizes warmup to the cache it was told).
    let mut outside = request(3, prompt(20, 3), 1, greedy());
    outside.blocks = vec![0, NUM_BLOCKS as u32];
    assert!(matches!(
        engine.warmup(3, vec![outside], WarmupLimits::default()),
        Err(EngineError::InvalidRequest(_))
    ));
    assert_no_leak(&engine);
}

/// The router's prefix cache hands a new request blocks whose first `cache_len` positions are
/// computed already. Its tokens and logprobs must be those of the whole prompt computed at
/// once, bit for bit, however much was cached (here 16, 32 and 36 of 37 prompt tokens), with
/// dense and with quantized weights (8-bit activations turn any difference into a visible one).
#[test]
fn a_cached_prefix_gives_the_bits_of_the_whole_prompt() {
    use wick_backend_candle::weights::{LoadOptions, Quantize};
    let bits = |gens: &[Generation]| -> Vec<(u32, u32)> {
        gens.iter()
            .map(|g| (g.token.id, g.token.logprob.to_bits()))
            .collect()
    };
    for quantize in [None, Some(Quantize::Q8_0), Some(Quantize::Q4_0)] {
        let mut engine = engine_with(&LoadOptions {
            quantize,
            ..LoadOptions::default()
        });
        let p = prompt(37, 5);
        let whole = bits(&run_alone(&mut engine, request(1, p.clone(), 6, greedy())));
        for cached in [16, 32, 36] {
            let mut r = request(2, p.clone(), 6, greedy());
            // Request 1's blocks: its prompt's K/V are there.
            r.blocks = blocks_of(1, p.len() + 5);
            r.cache_len = cached;
            let got = bits(&run_alone(&mut engine, r));
            assert_eq!(got, whole, "{quantize:?}, {cached} prompt tokens cached");
        }
        assert_no_leak(&engine);
    }
}
