//! Structured output on a tiny random model, whose raw output is noise: whatever it would say,
//! a request with a grammar produces text that matches the grammar (so the constraint, not the
//! model, is under test), greedy or sampled, alone or batched with unconstrained requests, and
//! its tokens do not depend on the batch.

mod engine_support;

use std::collections::HashMap;

use engine_support::*;
use serde_json::{json, Value};
use wick_backend_candle::engine::{EngineError, Generation, NewRequest};
use wick_backend_candle::sampling::SamplingParams;
use wick_backend_candle::stopping::FinishReason;
use wick_grammar::Grammar;

fn constrained(id: u64, grammar: Grammar, sampling: SamplingParams, max: u32) -> NewRequest {
    NewRequest {
        grammar: Some(grammar),
        ..request(id, prompt(5 + id as usize % 7, id as u32), max, sampling)
    }
}

fn person_schema() -> Grammar {
    Grammar::JsonSchema(json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 5},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "pet": {"enum": ["cat", "dog", null]},
            "scores": {
                "type": "array",
                "items": {"type": "number", "minimum": -10, "maximum": 1000},
                "maxItems": 2
            }
        },
        "required": ["name", "age", "pet", "scores"],
        "additionalProperties": false
    }))
}

fn check_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    let o = v.as_object().unwrap_or_else(|| panic!("{text:?}"));
    assert_eq!(o.len(), 4, "{text:?}");
    assert!(o["name"].as_str().unwrap().chars().count() <= 5, "{text:?}");
    assert!((0..=120).contains(&o["age"].as_i64().unwrap()), "{text:?}");
    assert!(
        ["cat", "dog"].contains(&o["pet"].as_str().unwrap_or("cat")),
        "{text:?}"
    );
    let scores = o["scores"].as_array().unwrap();
    assert!(scores.len() <= 2, "{text:?}");
    for s in scores {
        assert!((-10.0..=1000.0).contains(&s.as_f64().unwrap()), "{text:?}");
    }
}

/// The finished text of a request run alone.
fn finished(generations: &[Generation]) -> (String, FinishReason) {
    let last = generations.last().unwrap();
    let f = last.finished.as_ref().expect("the request finished");
    (f.text.clone(), f.reason)
}

#[test]
fn json_schema_output_validates_greedy_and_sampled() {
    let mut engine = engine();
    for (i, sampling) in [greedy(), seeded(7), seeded(8), seeded(9)]
        .into_iter()
        .enumerate()
    {
        let r = constrained(i as u64, person_schema(), sampling, 120);
        let (text, reason) = finished(&run_alone(&mut engine, r));
        assert_eq!(reason, FinishReason::EosToken, "{text:?}");
        check_person(&text);
    }
    assert_no_leak(&engine);
}

#[test]
fn regex_and_lark_outputs_match() {
    let mut engine = engine();
    let date = Grammar::Regex(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]".into());
    let list = Grammar::Lark(
        r#"start: "[" item ("," item)* "]"
item: /[a-z]{1,4}/
"#
        .into(),
    );
    for (i, sampling) in [greedy(), seeded(3)].into_iter().enumerate() {
        let r = constrained(10 + i as u64, date.clone(), sampling.clone(), 40);
        let (text, reason) = finished(&run_alone(&mut engine, r));
        assert_eq!(reason, FinishReason::EosToken, "{text:?}");
        let parts: Vec<&str> = text.split('-').collect();
        assert_eq!(parts.len(), 3, "{text:?}");
        assert!(
            parts[0].len() == 4 && parts[0].starts_with("20"),
            "{text:?}"
        );
        let month: u32 = parts[1].parse().unwrap();
        assert!((1..=12).contains(&month), "{text:?}");

        let r = constrained(12 + i as u64, list.clone(), sampling, 60);
        let (text, reason) = finished(&run_alone(&mut engine, r));
        // The model may keep adding items; what it made by then is still the grammar's prefix.
        assert!(text.starts_with('['), "{text:?}");
        if reason == FinishReason::EosToken {
            let inner = text.strip_prefix('[').unwrap().strip_suffix(']').unwrap();
            assert!(
                inner.split(',').all(
                    |w| (1..=4).contains(&w.len()) && w.bytes().all(|b| b.is_ascii_lowercase())
                ),
                "{text:?}"
            );
        } else {
            assert_eq!(reason, FinishReason::Length);
        }
    }
    assert_no_leak(&engine);
}

#[test]
fn max_new_tokens_cuts_a_grammar_short() {
    let mut engine = engine();
    let r = constrained(1, Grammar::Regex("[a-z]{50}".into()), greedy(), 4);
    let generations = run_alone(&mut engine, r);
    assert_eq!(generations.len(), 4);
    let (text, reason) = finished(&generations);
    assert_eq!(reason, FinishReason::Length);
    assert!(text.bytes().all(|b| b.is_ascii_lowercase()), "{text:?}");
}

#[test]
fn constrained_and_free_requests_batch_without_changing_tokens() {
    let mut requests = Vec::new();
    for id in 0..6u64 {
        let sampling = if id % 2 == 0 { greedy() } else { seeded(id) };
        requests.push(match id % 3 {
            0 => request(id, prompt(4 + id as usize, id as u32), 12, sampling),
            1 => constrained(id, person_schema(), sampling, 120),
            _ => constrained(id, Grammar::Regex("(ab|cd)+x".into()), sampling, 20),
        });
    }
    let mut engine = engine();
    let alone: HashMap<u64, Vec<u32>> = requests
        .iter()
        .map(|r| {
            let ids = run_alone(&mut engine, r.clone())
                .iter()
                .map(|g| g.token.id)
                .collect();
            (r.id, ids)
        })
        .collect();

    let mut tokens: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut texts = HashMap::new();
    let mut out = engine.prefill(1, requests[..3].to_vec(), None).unwrap();
    let mut joined = false;
    loop {
        for g in &out.generations {
            tokens.entry(g.request_id).or_default().push(g.token.id);
            if let Some(f) = &g.finished {
                texts.insert(g.request_id, f.text.clone());
            }
        }
        let Some(batch) = out.batch else { break };
        out = if joined {
            engine.decode(&[batch.id]).unwrap()
        } else {
            joined = true;
            engine
                .prefill(2, requests[3..].to_vec(), Some(batch.id))
                .unwrap()
        };
    }
    for r in &requests {
        assert_eq!(
            tokens[&r.id], alone[&r.id],
            "request {}: batched differs",
            r.id
        );
    }
    check_person(&texts[&1]);
    check_person(&texts[&4]);
    assert_no_leak(&engine);
}

#[test]
fn a_bad_grammar_is_refused_without_disturbing_the_batch() {
    let mut engine = engine();
    let out = engine
        .prefill(1, vec![request(0, prompt(6, 0), 5, greedy())], None)
        .unwrap();
    let running = out.batch.unwrap().id;
    let bad = constrained(1, Grammar::Regex("(unclosed".into()), greedy(), 5);
    match engine.prefill(2, vec![bad], Some(running)) {
        Err(EngineError::InvalidRequest(msg)) => assert!(msg.contains("grammar"), "{msg}"),
        other => panic!("{:?}", other.map(|o| o.generations.len())),
    }
    // The running batch is still there and finishes.
    let mut batch = Some(running);
    let mut steps = 1;
    while let Some(id) = batch {
        batch = engine.decode(&[id]).unwrap().batch.map(|b| b.id);
        steps += 1;
    }
    assert_eq!(steps, 5);
    assert_no_leak(&engine);
}
