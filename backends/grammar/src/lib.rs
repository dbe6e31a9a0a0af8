//! Structured output: a request's grammar (a JSON schema, a regular expression or a Lark
//! grammar) compiled by llguidance against the model's own vocabulary into a [`Constraint`],
//! which says before each token which tokens keep the output inside the grammar.
//!
//! The router compiles a request's grammar once to refuse a bad one before it is queued; the
//! shard compiles it again for the request it runs (a compiled parser does not cross the wire:
//! the grammar travels as text, [`Grammar::wire`]).
//!
//! JSON schemas are generated without free whitespace (`{"a": 1, "b": [2, 3]}`, the layout of
//! Python's `json.dumps`): a model that may add whitespace anywhere can also add it forever, and
//! a fixed layout costs a well-behaved model nothing. A schema's own `x-guidance` options win.

use std::collections::HashSet;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use tokenizers::Tokenizer;

#[cfg(test)]
mod tests;

/// Why a grammar cannot be used. The messages are TGI's where TGI has one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GrammarError {
    /// A grammar of a type this server does not know, or a value of the wrong JSON type.
    #[error("grammar is not supported")]
    NotSupported,
    /// The grammar does not compile (a bad schema, regex or Lark text, or over the limits).
    #[error("grammar is not valid: {0}")]
    Invalid(String),
    /// The model's tokenizer cannot be turned into the byte strings the masks are built from.
    #[error("grammar is not supported for this tokenizer: {0}")]
    Tokenizer(String),
}

/// The kind of a grammar on the wire (the values of the protocol's `GrammarType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrammarKind {
    Json = 1,
    Regex = 2,
    Lark = 3,
}

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// A JSON value valid under this JSON schema (`{"type": "object"}`: any object).
    JsonSchema(Value),
    /// The whole output matches this regular expression.
    Regex(String),
    /// The whole output is a sentence of this Lark grammar (llguidance's dialect: `start:` rule,
    /// `/regex/` terminals, `%json {...}` for an embedded schema).
    Lark(String),
}

impl Grammar {
    /// TGI's `parameters.grammar`: `{"type": "json" | "json_object", "value": <schema, or a
    /// string holding one>}`, `{"type": "json_schema", "value": {"name"?, "schema"}}`,
    /// `{"type": "regex", "value": "<regex>"}`; and wick's `{"type": "lark", "value": "<grammar>"}`.
    pub fn from_tgi(value: &Value) -> Result<Self, GrammarError> {
        let kind = value.get("type").and_then(Value::as_str);
        let inner = value.get("value");
        match (kind, inner) {
            (Some("json" | "json_object"), Some(Value::Object(_))) => {
                Ok(Grammar::JsonSchema(inner.cloned().unwrap_or_default()))
            }
            (Some("json" | "json_object"), Some(Value::String(text))) => {
                match serde_json::from_str::<Value>(text) {
                    Ok(schema @ Value::Object(_)) => Ok(Grammar::JsonSchema(schema)),
                    Ok(_) => Err(GrammarError::Invalid("schema is not a JSON object".into())),
                    Err(e) => Err(GrammarError::Invalid(format!("schema is not JSON: {e}"))),
                }
            }
            (Some("json_schema"), Some(Value::Object(spec))) => match spec.get("schema") {
                Some(schema @ Value::Object(_)) => Ok(Grammar::JsonSchema(schema.clone())),
                _ => Err(GrammarError::Invalid(
                    "`json_schema` needs a `schema` object".into(),
                )),
            },
            (Some("regex"), Some(Value::String(rx))) => Ok(Grammar::Regex(rx.clone())),
            (Some("lark"), Some(Value::String(lark))) => Ok(Grammar::Lark(lark.clone())),
            _ => Err(GrammarError::NotSupported),
        }
    }

    /// The grammar as it travels to the shards.
    pub fn wire(&self) -> (GrammarKind, String) {
        match self {
            Grammar::JsonSchema(schema) => (GrammarKind::Json, schema.to_string()),
            Grammar::Regex(rx) => (GrammarKind::Regex, rx.clone()),
            Grammar::Lark(lark) => (GrammarKind::Lark, lark.clone()),
        }
    }

    /// The grammar [`Grammar::wire`] sent.
    pub fn from_wire(kind: GrammarKind, text: &str) -> Result<Self, GrammarError> {
        Ok(match kind {
            GrammarKind::Json => Grammar::JsonSchema(
                serde_json::from_str(text)
                    .map_err(|e| GrammarError::Invalid(format!("schema is not JSON: {e}")))?,
            ),
            GrammarKind::Regex => Grammar::Regex(text.to_string()),
            GrammarKind::Lark => Grammar::Lark(text.to_string()),
        })
    }

    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Value::Object(map) = &mut schema {
                    map.entry("x-guidance").or_insert_with(|| {
                        serde_json::json!({
                            "whitespace_flexible": false,
                            "item_separator": ", ",
                            "key_separator": ": ",
                        })
                    });
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Grammar::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        }
    }
}

/// Compiles grammars against one model's vocabulary. Building it walks the whole vocabulary
/// (tens of milliseconds for 50k tokens); it is built once and shared.
#[derive(Clone)]
pub struct Compiler {
    factory: Arc<ParserFactory>,
    /// Every id that ends a generation; the first is the grammar's own end token.
    eos: Arc<[u32]>,
}

impl Compiler {
    /// `vocab_size`: rows of the model's logits (at least the tokenizer's size; ids without a
    /// token are never allowed). `eos`: the ids that end a generation (at least one).
    pub fn new(
        tokenizer: &Tokenizer,
        vocab_size: usize,
        eos: &[u32],
    ) -> Result<Self, GrammarError> {
        let &first_eos = eos
            .first()
            .ok_or_else(|| GrammarError::Tokenizer("the model has no end-of-sequence id".into()))?;
        let json = tokenizer
            .to_string(false)
            .map_err(|e| GrammarError::Tokenizer(e.to_string()))?;
        let json: Value =
            serde_json::from_str(&json).map_err(|e| GrammarError::Tokenizer(e.to_string()))?;
        // llguidance asserts on vocabularies it does not expect; a panic there must not take
        // the process down.
        let words = std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
            .map_err(|_| GrammarError::Tokenizer("unexpected vocabulary".into()))?
            .map_err(|e| GrammarError::Tokenizer(e.to_string()))?;
        let mut words = words;
        words.resize(words.len().max(vocab_size), Vec::new());
        let info = TokRxInfo::new(words.len() as u32, first_eos);
        let trie = TokTrie::from(&info, &words);
        let env: Arc<dyn TokenizerEnv + Sync> = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GrammarError::Tokenizer(e.to_string()))?;
        factory.quiet();
        // Errors name the problem, not the whole grammar and parser state.
        factory.limits_mut().verbose_errors = false;
        Ok(Self {
            factory: Arc::new(factory),
            eos: eos
                .iter()
                .copied()
                .collect::<HashSet<_>>()
                .into_iter()
                .collect(),
        })
    }

    /// A fresh constraint for one request.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, GrammarError> {
        let parser = self
            .factory
            .create_parser(grammar.top_level())
            .map_err(|e| GrammarError::Invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Invalid(e));
        }
        Ok(Constraint {
            matcher,
            eos: self.eos.clone(),
            grammar_eos: self.factory.tok_env().tok_trie().eos_token(),
        })
    }
}

/// One request's position in its grammar.
pub struct Constraint {
    matcher: Matcher,
    eos: Arc<[u32]>,
    /// The end token the grammar knows; the model's other end ids stand for it.
    grammar_eos: u32,
}

/// The tokens a grammar allows next, computed ahead of the logits it applies to.
pub struct Mask(SimpleVob);

impl Constraint {
    /// Sets every logit the grammar does not allow next to -inf; the model's end ids count
    /// as allowed wherever the grammar may end. False when the grammar allows nothing (it
    /// ended or failed): the request has to stop.
    pub fn mask_logits(&mut self, logits: &mut [f32]) -> bool {
        match self.compute_mask() {
            Some(mask) => mask.apply(logits),
            None => false,
        }
    }

    /// What [`Constraint::mask_logits`] would apply, computed now (it depends only on the
    /// tokens accepted so far, so it can run while the model computes the logits). `None`
    /// when the grammar allows nothing.
    pub fn compute_mask(&mut self) -> Option<Mask> {
        let mut mask = self.matcher.compute_mask().ok()?;
        if mask.is_allowed(self.grammar_eos) {
            for &id in self.eos.iter() {
                if (id as usize) < mask.len() {
                    mask.allow_token(id);
                }
            }
        }
        Some(Mask(mask))
    }
}

impl Mask {
    /// Sets every logit the mask does not allow to -inf; false when it allows none.
    pub fn apply(&self, logits: &mut [f32]) -> bool {
        let mask = &self.0;
        let mut any = false;
        let words = mask.as_slice();
        for (chunk, &bits) in logits.chunks_mut(32).zip(words) {
            if bits == u32::MAX {
                any = true;
                continue;
            }
            for (i, l) in chunk.iter_mut().enumerate() {
                if bits & (1 << i) == 0 {
                    *l = f32::NEG_INFINITY;
                } else {
                    any = true;
                }
            }
        }
        // Rows past the mask (a vocabulary padded beyond the tokenizer) never match.
        let covered = words.len() * 32;
        if logits.len() > covered {
            logits[covered..].fill(f32::NEG_INFINITY);
        }
        any
    }
}

impl Constraint {
    /// Moves past `token`, which the last mask allowed. An end id ends the grammar.
    pub fn accept(&mut self, token: u32) -> Result<(), GrammarError> {
        let token = if self.eos.contains(&token) {
            self.grammar_eos
        } else {
            token
        };
        self.matcher
            .consume_token(token)
            .map_err(|e| GrammarError::Invalid(e.to_string()))
    }

    /// The grammar allows no further token: the output is complete (or the matcher failed).
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Whether the output so far is a complete sentence of the grammar.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}
