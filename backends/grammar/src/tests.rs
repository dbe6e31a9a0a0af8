//! Grammars walked to their end by a "model" of seeded random logits: whatever the logits, the
//! output must match the grammar.

use serde_json::{json, Value};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use super::*;

const EOS: u32 = 0;

/// A byte-level BPE tokenizer: `<|endoftext|>` (0), the 256 byte stand-ins, and a few merged
/// tokens so that tokens span several bytes (and several JSON lexemes).
fn tokenizer() -> Tokenizer {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let mut vocab: Vec<(String, u32)> = vec![("<|endoftext|>".into(), EOS)];
    for c in alphabet {
        vocab.push((c.to_string(), vocab.len() as u32));
    }
    let merges: Vec<(String, String)> = [("\"", "a"), ("1", "2"), ("\"a", "\""), ("Ġ", "t")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    for (a, b) in &merges {
        vocab.push((format!("{a}{b}"), vocab.len() as u32));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(
            vocab
                .into_iter()
                .collect::<tokenizers::models::bpe::Vocab>(),
            merges,
        )
        .build()
        .expect("a valid BPE");
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, false)));
    tokenizer.with_decoder(Some(ByteLevel::new(false, true, false)));
    tokenizer
        .add_special_tokens([AddedToken::from("<|endoftext|>", true)])
        .expect("a special token");
    tokenizer
}

/// The id of a printable ASCII byte's token.
fn id_of(tokenizer: &Tokenizer, byte: u8) -> u32 {
    tokenizer
        .token_to_id(&(byte as char).to_string())
        .expect("a byte token")
}

fn compiler(vocab_size: usize) -> (Compiler, Tokenizer) {
    let tokenizer = tokenizer();
    (
        Compiler::new(&tokenizer, vocab_size, &[EOS]).expect("compiler"),
        tokenizer,
    )
}

/// Greedy decoding over random logits under `grammar`: the text made before the grammar ended
/// (or `max` tokens), and whether it ended.
fn walk(grammar: &Grammar, seed: u64, max: usize) -> (String, bool) {
    let vocab = 300; // padded past the tokenizer's 261 tokens
    let (compiler, tokenizer) = compiler(vocab);
    let mut constraint = compiler.compile(grammar).expect("compiles");
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut ids = Vec::new();
    for _ in 0..max {
        let mut logits: Vec<f32> = (0..vocab)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect();
        assert!(
            constraint.mask_logits(&mut logits),
            "a live grammar allows a token"
        );
        assert!(logits[261..].iter().all(|l| *l == f32::NEG_INFINITY));
        let id = (0..vocab)
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap() as u32;
        assert!(logits[id as usize].is_finite());
        if id == EOS {
            constraint.accept(id).expect("eos accepted");
            assert!(constraint.is_finished());
            return (tokenizer.decode(&ids, false).unwrap(), true);
        }
        constraint.accept(id).expect("an allowed token is accepted");
        ids.push(id);
        if constraint.is_finished() {
            return (tokenizer.decode(&ids, false).unwrap(), true);
        }
    }
    (tokenizer.decode(&ids, false).unwrap(), false)
}

#[test]
fn regex_outputs_match() {
    let grammar = Grammar::Regex(r"[0-9]{3}-(yes|no)".into());
    for seed in 0..20 {
        let (text, ended) = walk(&grammar, seed, 50);
        assert!(ended, "{text:?}");
        let (digits, word) = text.split_once('-').expect("a dash");
        assert_eq!(digits.len(), 3, "{text:?}");
        assert!(digits.chars().all(|c| c.is_ascii_digit()), "{text:?}");
        assert!(word == "yes" || word == "no", "{text:?}");
    }
}

#[test]
fn json_schema_outputs_validate() {
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "pet": {"enum": ["cat", "dog"]},
            "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}
        },
        "required": ["name", "age", "pet", "tags"],
        "additionalProperties": false
    });
    let grammar = Grammar::JsonSchema(schema);
    for seed in 0..20 {
        let (text, ended) = walk(&grammar, seed, 200);
        assert!(ended, "{text:?}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(v["name"].as_str().unwrap().chars().count() <= 6, "{text:?}");
        let age = v["age"].as_i64().unwrap();
        assert!((0..=120).contains(&age), "{text:?}");
        assert!(v["pet"] == "cat" || v["pet"] == "dog", "{text:?}");
        let tags = v["tags"].as_array().unwrap();
        assert!(
            tags.len() <= 3 && tags.iter().all(Value::is_boolean),
            "{text:?}"
        );
        assert_eq!(v.as_object().unwrap().len(), 4, "{text:?}");
    }
}

#[test]
fn lark_outputs_are_sentences() {
    let grammar = Grammar::Lark(
        r#"start: "(" expr ")"
expr: NUM | NUM "+" expr
NUM: /[1-9]/
"#
        .into(),
    );
    for seed in 0..20 {
        let (text, ended) = walk(&grammar, seed, 100);
        if !ended {
            // A random walk may keep adding terms; what it made is still a prefix.
            assert!(text.starts_with('('), "{text:?}");
            continue;
        }
        let inner = text.strip_prefix('(').and_then(|t| t.strip_suffix(')'));
        let inner = inner.unwrap_or_else(|| panic!("{text:?}"));
        assert!(
            inner
                .split('+')
                .all(|n| n.len() == 1 && ('1'..='9').contains(&n.chars().next().unwrap())),
            "{text:?}"
        );
    }
}

#[test]
fn tgi_forms_parse() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let expect = Ok(Grammar::JsonSchema(schema.clone()));
    assert_eq!(
        Grammar::from_tgi(&json!({"type": "json", "value": schema})),
        expect
    );
    assert_eq!(
        Grammar::from_tgi(&json!({"type": "json_object", "value": schema.to_string()})),
        expect
    );
    assert_eq!(
        Grammar::from_tgi(
            &json!({"type": "json_schema", "value": {"name": "x", "schema": schema}})
        ),
        expect
    );
    assert_eq!(
        Grammar::from_tgi(&json!({"type": "regex", "value": "a+"})),
        Ok(Grammar::Regex("a+".into()))
    );
    assert_eq!(
        Grammar::from_tgi(&json!({"type": "json", "value": 3})),
        Err(GrammarError::NotSupported)
    );
    assert_eq!(
        Grammar::from_tgi(&json!({"type": "ebnf", "value": "x"})),
        Err(GrammarError::NotSupported)
    );
    assert!(matches!(
        Grammar::from_tgi(&json!({"type": "json", "value": "{not json"})),
        Err(GrammarError::Invalid(_))
    ));
    let (kind, text) = Grammar::Regex("a+".into()).wire();
    assert_eq!(
        Grammar::from_wire(kind, &text),
        Ok(Grammar::Regex("a+".into()))
    );
}

#[test]
fn bad_grammars_are_refused() {
    let (compiler, _) = compiler(261);
    for bad in [
        Grammar::Regex("(unclosed".into()),
        Grammar::Lark("start: undefined_rule".into()),
        Grammar::JsonSchema(json!({"type": "no-such-type"})),
        Grammar::JsonSchema(json!({"type": "integer", "minimum": 5, "maximum": 1})),
    ] {
        match compiler.compile(&bad) {
            Err(GrammarError::Invalid(_)) => {}
            Err(e) => panic!("{bad:?}: {e}"),
            Ok(_) => panic!("{bad:?} compiled"),
        }
    }
}

#[test]
fn other_end_ids_stand_for_the_grammar_end() {
    let tokenizer = tokenizer();
    // Byte 'x' plays a second end id.
    let second = id_of(&tokenizer, b'x');
    let a = id_of(&tokenizer, b'a');
    let compiler = Compiler::new(&tokenizer, 261, &[EOS, second]).unwrap();
    let mut c = compiler.compile(&Grammar::Regex("a+".into())).unwrap();
    let mut logits = vec![0.0; 261];
    assert!(c.mask_logits(&mut logits));
    assert!(
        logits[second as usize].is_infinite(),
        "not yet: the grammar needs its 'a'"
    );
    c.accept(a).unwrap();
    let mut logits = vec![0.0; 261];
    assert!(c.mask_logits(&mut logits));
    assert!(logits[second as usize] == 0.0 && logits[EOS as usize] == 0.0);
    c.accept(second).unwrap();
    assert!(c.is_finished());
    // A grammar that cannot go on ends without an end token.
    let mut c = compiler.compile(&Grammar::Regex("ab".into())).unwrap();
    c.accept(a).unwrap();
    assert!(!c.is_finished());
    c.accept(id_of(&tokenizer, b'b')).unwrap();
    assert!(c.is_finished());
    assert!(!c.mask_logits(&mut logits));
}

#[test]
fn an_oversized_grammar_is_refused() {
    // llguidance's limits bound the work a grammar may cost before its first token.
    let (compiler, _) = compiler(261);
    let values: Vec<String> = (0..200_000).map(|i| format!("v{i}")).collect();
    match compiler.compile(&Grammar::JsonSchema(json!({"enum": values}))) {
        Err(GrammarError::Invalid(msg)) => assert!(msg.contains("too big"), "{msg}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("compiled"),
    }
}
