//! Request validation: TGI's rules, messages and order (parameters first, then tokenization
//! on a pool of blocking workers, then the token limits). The output is a [`ValidRequest`] the
//! scheduler can queue as is.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokenizers::{Encoding, Tokenizer};
use tokio::sync::{mpsc, oneshot};
use wick_grammar::{Compiler, Grammar, GrammarError, GrammarKind};
use wick_proto::v1::GrammarType;

use crate::types::GenerateParameters;
use wick_scheduler::request::{
    ValidGrammar, ValidParameters, ValidRequest, ValidStoppingParameters,
};

/// A numeric rule on a request field: the validator checks it and the OpenAPI document states
/// it (`minimum`, `exclusiveMinimum`, ...), from this one definition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    pub min: Option<f64>,
    pub min_exclusive: bool,
    pub max: Option<f64>,
    pub max_exclusive: bool,
}

impl Range {
    const fn new(
        min: Option<f64>,
        min_exclusive: bool,
        max: Option<f64>,
        max_exclusive: bool,
    ) -> Self {
        Range {
            min,
            min_exclusive,
            max,
            max_exclusive,
        }
    }

    /// Whether `v` obeys the rule (NaN never does).
    pub fn contains(&self, v: f64) -> bool {
        let above = match self.min {
            Some(m) if self.min_exclusive => v > m,
            Some(m) => v >= m,
            None => !v.is_nan(),
        };
        let below = match self.max {
            Some(m) if self.max_exclusive => v < m,
            Some(m) => v <= m,
            None => !v.is_nan(),
        };
        above && below
    }

    /// `v` (which obeys the rule) as the f32 the engine computes with, still obeying it: plain
    /// rounding would take a positive 1e-50 to 0, 0.999999999 to 1, and 1e300 to infinity.
    pub fn narrow(&self, v: f64) -> f32 {
        let mut x = (v as f32).clamp(f32::MIN, f32::MAX);
        if let Some(m) = self.min {
            let m = m as f32;
            if x < m || (self.min_exclusive && x <= m) {
                x = if self.min_exclusive { m.next_up() } else { m };
            }
        }
        if let Some(m) = self.max {
            let m = m as f32;
            if x > m || (self.max_exclusive && x >= m) {
                x = if self.max_exclusive { m.next_down() } else { m };
            }
        }
        x
    }
}

/// A `logit_bias` key: a token id in decimal (the vocabulary bounds it further).
pub const TOKEN_ID: &str = "^[0-9]+$";

/// The value rules of request fields that do not depend on the deployment (those that do, the
/// token limits, come from [`ValidationConfig`]).
pub mod rules {
    use super::Range;

    /// `temperature`, `repetition_penalty`: strictly positive.
    pub const POSITIVE: Range = Range::new(Some(0.0), true, None, false);
    /// `frequency_penalty`, `presence_penalty`: within [-2, 2].
    pub const PENALTY: Range = Range::new(Some(-2.0), false, Some(2.0), false);
    /// TGI's `top_p` and `typical_p`: within (0, 1).
    pub const PROBABILITY: Range = Range::new(Some(0.0), true, Some(1.0), true);
    /// Counts that must be at least 1: `best_of`, `top_k`, `max_new_tokens`, `truncate`, `n`.
    pub const AT_LEAST_ONE: Range = Range::new(Some(1.0), false, None, false);
    /// `best_of`: TGI's rules are checked, but only 1 is served.
    pub const BEST_OF: Range = Range::new(Some(1.0), false, Some(1.0), false);
    /// A `logit_bias` value: within [-100, 100].
    pub const LOGIT_BIAS: Range = Range::new(Some(-100.0), false, Some(100.0), false);
    /// OpenAI's `temperature`: 0 (greedy) or more.
    pub const OPENAI_TEMPERATURE: Range = Range::new(Some(0.0), false, None, false);
    /// OpenAI's `top_p`: within (0, 1], 1 meaning off.
    pub const OPENAI_TOP_P: Range = Range::new(Some(0.0), true, Some(1.0), false);
}

/// Validation limits fixed at startup.
#[derive(Debug, Clone)]
pub struct ValidationConfig {
    pub max_best_of: usize,
    pub max_stop_sequences: usize,
    pub max_top_n_tokens: u32,
    /// Longest prompt after truncation (from the shards' warmup).
    pub max_input_tokens: u32,
    /// Longest prompt + generation (from the shards' warmup).
    pub max_total_tokens: u32,
    /// Blocking tokenizer threads.
    pub workers: usize,
}

/// TGI's validation errors; `Display` is the exact message (the HTTP layer prefixes
/// "Input validation error: ").
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("`best_of` must be > 0 and <= {0}. Given: {1}")]
    BestOf(usize, usize),
    #[error("`best_of` != 1 is not allowed for this endpoint")]
    BestOfDisabled,
    #[error("you must use sampling when `best_of` is > 1")]
    BestOfSampling,
    #[error("`seed` must not be set when `best_of` > 1")]
    BestOfSeed,
    #[error("`best_of` != 1 is not supported when streaming tokens")]
    BestOfStream,
    /// TGI would run `best_of` sequences; this server does not (use `n` on `/v1/completions`).
    #[error("`best_of` > 1 is not supported by this server")]
    BestOfUnsupported,
    #[error("`top_n_tokens` must be >= 0 and <= {0}. Given: {1}")]
    TopNTokens(u32, u32),
    #[error("`decoder_input_details` == true is not supported when streaming tokens")]
    PrefillDetailsStream,
    #[error("`temperature` must be strictly positive")]
    Temperature,
    #[error("`repetition_penalty` must be strictly positive")]
    RepetitionPenalty,
    #[error("`frequency_penalty` must be >= -2.0 and <= 2.0")]
    FrequencyPenalty,
    #[error("`presence_penalty` must be >= -2.0 and <= 2.0")]
    PresencePenalty,
    #[error("`top_p` must be > 0.0 and < 1.0")]
    TopP,
    #[error("`top_k` must be strictly positive")]
    TopK,
    #[error("`typical_p` must be > 0.0 and < 1.0")]
    TypicalP,
    #[error("`truncate` must be strictly positive and less than {0}. Given: {1}")]
    Truncate(u32, usize),
    #[error("`max_new_tokens` must be strictly positive")]
    NegativeMaxNewTokens,
    #[error("`inputs` tokens + `max_new_tokens` must be <= {0}. Given: {1} `inputs` tokens and {2} `max_new_tokens`")]
    MaxTotalTokens(u32, u32, u32),
    #[error("`inputs` must have less than {0} tokens. Given: {1}")]
    InputLength(u32, usize),
    #[error("`inputs` cannot be empty")]
    EmptyInput,
    #[error("`stop` supports up to {0} stop sequences. Given: {1}")]
    StopSequence(usize, usize),
    #[error("tokenizer error {0}")]
    Tokenizer(String),
    #[error("grammar is not supported")]
    Grammar,
    #[error("grammar is not valid: {0}")]
    InvalidGrammar(String),
    #[error("`logit_bias`: {0}")]
    LogitBias(String),
    #[error("adapters are not supported")]
    Adapter,
    /// The tokenizer pool is gone (shutdown).
    #[error("tokenizer error the tokenizer workers stopped")]
    WorkersGone,
}

/// A validated request plus what the HTTP layer needs to shape its answer.
#[derive(Debug, Clone)]
pub struct ValidGenerateRequest {
    pub request: ValidRequest,
    /// Prompt tokens after truncation.
    pub input_length: u32,
    /// The `best_of` asked for (always 1 here; kept for the response's sake).
    pub best_of: usize,
}

struct TokenizeJob {
    inputs: String,
    add_special_tokens: bool,
    reply: oneshot::Sender<Result<Encoding, String>>,
}

/// Validates requests; cheap to clone (the tokenizer workers are shared).
#[derive(Clone)]
pub struct Validation {
    config: Arc<ValidationConfig>,
    workers: Arc<Vec<mpsc::Sender<TokenizeJob>>>,
    next_worker: Arc<AtomicUsize>,
    grammars: Arc<Grammars>,
}

/// The grammar compiler, built from the tokenizer when the first request with a grammar comes
/// (it walks the whole vocabulary; a server nobody asks for structured output never pays).
struct Grammars {
    tokenizer: Tokenizer,
    compiler: OnceLock<Option<Compiler>>,
}

impl Grammars {
    /// `None` when this tokenizer's vocabulary cannot be read as bytes (then grammars are
    /// not supported).
    fn compiler(&self) -> Option<&Compiler> {
        self.compiler
            .get_or_init(|| {
                // The end id only matters to the shards; any id serves for validation.
                let vocab = self.tokenizer.get_vocab_size(true);
                match Compiler::new(&self.tokenizer, vocab, &[0]) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "structured output is not available");
                        None
                    }
                }
            })
            .as_ref()
    }
}

/// Pending jobs per worker before `validate` waits (back-pressure on tokenization).
const WORKER_QUEUE: usize = 64;

impl Validation {
    /// Starts `config.workers` tokenizer threads, each with its own tokenizer clone. They stop
    /// when the last `Validation` clone is dropped.
    pub fn new(config: ValidationConfig, tokenizer: Tokenizer) -> std::io::Result<Self> {
        let n = config.workers.max(1);
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, mut rx) = mpsc::channel::<TokenizeJob>(WORKER_QUEUE);
            let tokenizer = tokenizer.clone();
            std::thread::Builder::new()
                .name(format!("wick-tokenizer-{i}"))
                .spawn(move || {
                    while let Some(job) = rx.blocking_recv() {
                        let result = tokenizer
                            .encode(job.inputs.as_str(), job.add_special_tokens)
                            .map_err(|e| e.to_string());
                        // The requester may have gone away; nothing to do then.
                        let _ = job.reply.send(result);
                    }
                })?;
            workers.push(tx);
        }
        Ok(Validation {
            config: Arc::new(config),
            workers: Arc::new(workers),
            next_worker: Arc::new(AtomicUsize::new(0)),
            grammars: Arc::new(Grammars {
                tokenizer,
                compiler: OnceLock::new(),
            }),
        })
    }

    pub fn config(&self) -> &ValidationConfig {
        &self.config
    }

    /// Tokenizes on a worker thread (round-robin).
    pub async fn tokenize(
        &self,
        inputs: String,
        add_special_tokens: bool,
    ) -> Result<Encoding, ValidationError> {
        let i = self.next_worker.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        let (reply, rx) = oneshot::channel();
        self.workers[i]
            .send(TokenizeJob {
                inputs,
                add_special_tokens,
                reply,
            })
            .await
            .map_err(|_| ValidationError::WorkersGone)?;
        rx.await
            .map_err(|_| ValidationError::WorkersGone)?
            .map_err(ValidationError::Tokenizer)
    }

    /// TGI's `validate`, in TGI's order. `stream` enables the streaming-only rules.
    pub async fn validate(
        &self,
        inputs: &str,
        add_special_tokens: bool,
        parameters: &GenerateParameters,
        stream: bool,
    ) -> Result<ValidGenerateRequest, ValidationError> {
        let checked = check_parameters(&self.config, inputs, parameters, stream)?;
        let encoding = self
            .tokenize(inputs.to_string(), add_special_tokens)
            .await?;
        let mut input_ids = encoding.get_ids().to_vec();
        if let Some(truncate) = parameters.truncate {
            // Keep the last `truncate` tokens (left truncation).
            if input_ids.len() > truncate {
                input_ids.drain(..input_ids.len() - truncate);
            }
        }
        let max_new_tokens =
            check_lengths(&self.config, input_ids.len(), parameters.max_new_tokens)?;
        // More than can be generated means "no end before the last token" (what else could
        // it mean?), not an error.
        let min_new_tokens = parameters.min_new_tokens.unwrap_or(0).min(max_new_tokens);
        let logit_bias = match &parameters.logit_bias {
            Some(bias) => {
                check_logit_bias(bias, self.grammars.tokenizer.get_vocab_size(true) as u32)?
            }
            None => Vec::new(),
        };
        let grammar = match &parameters.grammar {
            Some(value) => Some(self.compile_grammar(value).await?),
            None => None,
        };
        if parameters.adapter_id.is_some() {
            return Err(ValidationError::Adapter);
        }
        if !rules::BEST_OF.contains(checked.best_of as f64) {
            return Err(ValidationError::BestOfUnsupported);
        }
        let input_length = input_ids.len() as u32;
        Ok(ValidGenerateRequest {
            request: ValidRequest {
                input_ids,
                parameters: ValidParameters {
                    grammar,
                    logit_bias,
                    ..checked.parameters
                },
                stopping: ValidStoppingParameters {
                    max_new_tokens,
                    stop_sequences: parameters.stop.clone(),
                    ignore_eos_token: parameters.ignore_eos,
                    min_new_tokens,
                },
                top_n_tokens: checked.top_n_tokens,
                decoder_input_details: parameters.decoder_input_details,
            },
            input_length,
            best_of: checked.best_of,
        })
    }
}

impl Validation {
    /// TGI's `parameters.grammar`, compiled against the vocabulary on a blocking thread (a
    /// large schema takes milliseconds), so a bad one is refused before it is queued.
    async fn compile_grammar(
        &self,
        value: &serde_json::Value,
    ) -> Result<ValidGrammar, ValidationError> {
        let grammar = Grammar::from_tgi(value).map_err(grammar_error)?;
        let grammars = self.grammars.clone();
        let compiled = grammar.clone();
        tokio::task::spawn_blocking(move || {
            let compiler = grammars.compiler().ok_or(ValidationError::Grammar)?;
            compiler.compile(&compiled).map_err(grammar_error)?;
            Ok::<_, ValidationError>(())
        })
        .await
        .map_err(|_| ValidationError::Grammar)??;
        let (kind, text) = grammar.wire();
        let kind = match kind {
            GrammarKind::Json => GrammarType::Json,
            GrammarKind::Regex => GrammarType::Regex,
            GrammarKind::Lark => GrammarType::Lark,
        };
        Ok(ValidGrammar { kind, text })
    }
}

/// OpenAI's rules: keys are token ids of the vocabulary (decimal digits, [`TOKEN_ID`]), biases
/// within [-100, 100].
fn check_logit_bias(
    bias: &std::collections::BTreeMap<String, f64>,
    vocab: u32,
) -> Result<Vec<(u32, f32)>, ValidationError> {
    bias.iter()
        .map(|(key, &b)| {
            if key.is_empty() || !key.bytes().all(|c| c.is_ascii_digit()) {
                return Err(ValidationError::LogitBias(format!(
                    "{key:?} is not a token id"
                )));
            }
            let id = key
                .parse::<u32>()
                .ok()
                .filter(|&id| id < vocab)
                .ok_or_else(|| {
                    ValidationError::LogitBias(format!(
                        "token id {key} is not in the vocabulary ({vocab} tokens)"
                    ))
                })?;
            if !rules::LOGIT_BIAS.contains(b) {
                return Err(ValidationError::LogitBias(format!(
                    "the bias of token {id} must be >= -100 and <= 100. Given: {b}"
                )));
            }
            Ok((id, rules::LOGIT_BIAS.narrow(b)))
        })
        .collect()
}

fn grammar_error(e: GrammarError) -> ValidationError {
    match e {
        GrammarError::Invalid(msg) => ValidationError::InvalidGrammar(msg),
        GrammarError::NotSupported | GrammarError::Tokenizer(_) => ValidationError::Grammar,
    }
}

struct CheckedParameters {
    parameters: ValidParameters,
    top_n_tokens: u32,
    best_of: usize,
}

/// Every rule that does not need the tokens, in TGI's order.
fn check_parameters(
    config: &ValidationConfig,
    inputs: &str,
    p: &GenerateParameters,
    stream: bool,
) -> Result<CheckedParameters, ValidationError> {
    let best_of = p.best_of.unwrap_or(1);
    if config.max_best_of == 1 && best_of != 1 {
        return Err(ValidationError::BestOfDisabled);
    }
    if best_of == 0 || best_of > config.max_best_of {
        return Err(ValidationError::BestOf(config.max_best_of, best_of));
    }
    if stream && best_of > 1 {
        return Err(ValidationError::BestOfStream);
    }
    let sampling = p.do_sample
        || p.temperature.is_some()
        || p.top_k.is_some()
        || p.top_p.is_some()
        || p.typical_p.is_some();
    if best_of > 1 && !sampling {
        return Err(ValidationError::BestOfSampling);
    }

    use rules::{AT_LEAST_ONE, PENALTY, POSITIVE, PROBABILITY};
    let temperature = p.temperature.unwrap_or(1.0);
    if !POSITIVE.contains(temperature) {
        return Err(ValidationError::Temperature);
    }
    let repetition_penalty = p.repetition_penalty.unwrap_or(1.0);
    if !POSITIVE.contains(repetition_penalty) {
        return Err(ValidationError::RepetitionPenalty);
    }
    let frequency_penalty = p.frequency_penalty.unwrap_or(0.0);
    if !PENALTY.contains(frequency_penalty) {
        return Err(ValidationError::FrequencyPenalty);
    }
    let presence_penalty = p.presence_penalty.unwrap_or(0.0);
    if !PENALTY.contains(presence_penalty) {
        return Err(ValidationError::PresencePenalty);
    }
    let top_p = match p.top_p {
        Some(v) if !PROBABILITY.contains(v) => return Err(ValidationError::TopP),
        Some(v) => PROBABILITY.narrow(v),
        None => 1.0,
    };
    let typical_p = match p.typical_p {
        Some(v) if !PROBABILITY.contains(v) => return Err(ValidationError::TypicalP),
        Some(v) => PROBABILITY.narrow(v),
        None => 1.0,
    };
    let top_k = match p.top_k {
        Some(v) if !AT_LEAST_ONE.contains(v as f64) => return Err(ValidationError::TopK),
        Some(v) => v as u32,
        None => 0,
    };
    let temperature = POSITIVE.narrow(temperature);
    let repetition_penalty = POSITIVE.narrow(repetition_penalty);
    let frequency_penalty = PENALTY.narrow(frequency_penalty);
    let presence_penalty = PENALTY.narrow(presence_penalty);
    if p.max_new_tokens == Some(0) {
        return Err(ValidationError::NegativeMaxNewTokens);
    }
    if p.stop.len() > config.max_stop_sequences {
        return Err(ValidationError::StopSequence(
            config.max_stop_sequences,
            p.stop.len(),
        ));
    }

    // As TGI's sampler: any active warper turns sampling on.
    let do_sample =
        p.do_sample || temperature != 1.0 || top_k != 0 || top_p < 1.0 || typical_p < 1.0;
    let seed = match p.seed {
        Some(_) if best_of > 1 => return Err(ValidationError::BestOfSeed),
        Some(seed) => seed,
        None if do_sample => random_seed(),
        None => 0,
    };
    let top_n_tokens = p.top_n_tokens.unwrap_or(0);
    if top_n_tokens > config.max_top_n_tokens {
        return Err(ValidationError::TopNTokens(
            config.max_top_n_tokens,
            top_n_tokens,
        ));
    }
    if stream && p.decoder_input_details {
        return Err(ValidationError::PrefillDetailsStream);
    }
    if inputs.is_empty() {
        return Err(ValidationError::EmptyInput);
    }
    if let Some(truncate) = p.truncate {
        if truncate == 0 || truncate > config.max_input_tokens as usize {
            return Err(ValidationError::Truncate(config.max_input_tokens, truncate));
        }
    }
    Ok(CheckedParameters {
        parameters: ValidParameters {
            temperature,
            top_k,
            top_p,
            typical_p,
            do_sample,
            seed,
            repetition_penalty,
            frequency_penalty,
            presence_penalty,
            grammar: None,
            logit_bias: Vec::new(),
        },
        top_n_tokens,
        best_of,
    })
}

/// The token limits; returns the `max_new_tokens` to schedule (the remaining budget when none
/// was asked for).
fn check_lengths(
    config: &ValidationConfig,
    input_length: usize,
    max_new_tokens: Option<u32>,
) -> Result<u32, ValidationError> {
    let input_u32 = u32::try_from(input_length).unwrap_or(u32::MAX);
    let max_new_tokens = match max_new_tokens {
        Some(n) => n,
        None => config.max_total_tokens.saturating_sub(input_u32),
    };
    if input_u32.saturating_add(max_new_tokens) > config.max_total_tokens {
        return Err(ValidationError::MaxTotalTokens(
            config.max_total_tokens,
            input_u32,
            max_new_tokens,
        ));
    }
    if input_length > config.max_input_tokens as usize {
        return Err(ValidationError::InputLength(
            config.max_input_tokens,
            input_length,
        ));
    }
    // A prompt that fills the whole budget leaves nothing to generate.
    if max_new_tokens == 0 {
        return Err(ValidationError::MaxTotalTokens(
            config.max_total_tokens,
            input_u32,
            max_new_tokens,
        ));
    }
    Ok(max_new_tokens)
}

/// A random u64 without a dependency: std's per-process random SipHash keys, mixed with a
/// counter and the clock so consecutive calls differ.
pub fn random_seed() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_usize(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ValidationConfig {
        ValidationConfig {
            max_best_of: 2,
            max_stop_sequences: 2,
            max_top_n_tokens: 5,
            max_input_tokens: 10,
            max_total_tokens: 16,
            workers: 2,
        }
    }

    fn check(p: GenerateParameters) -> Result<CheckedParameters, ValidationError> {
        check_parameters(&config(), "hello", &p, false)
    }

    /// The bounds the OpenAPI document states for `GenerateParameters` are the validator's: a
    /// value just outside is refused, one just inside accepted, and the document agrees.
    #[test]
    fn documented_bounds_are_the_validators() {
        let limits = crate::routes::docs::Limits {
            validation: config(),
            max_client_batch_size: 4,
            api_key: false,
        };
        let doc = crate::routes::docs::document(&limits);
        let props = &doc["components"]["schemas"]["GenerateParameters"]["properties"];
        let within = |schema: &serde_json::Value, v: f64| {
            let bound = |k: &str| schema[k].as_f64();
            bound("minimum").is_none_or(|b| v >= b)
                && bound("maximum").is_none_or(|b| v <= b)
                && bound("exclusiveMinimum").is_none_or(|b| v > b)
                && bound("exclusiveMaximum").is_none_or(|b| v < b)
        };
        let cases = [
            ("temperature", 0.0, 0.01),
            ("repetition_penalty", 0.0, 0.01),
            ("top_p", 1.0, 0.99),
            ("top_p", 0.0, 0.01),
            ("typical_p", 1.0, 0.99),
            ("typical_p", 0.0, 0.01),
            ("frequency_penalty", 2.01, 2.0),
            ("frequency_penalty", -2.01, -2.0),
            ("presence_penalty", 2.01, 2.0),
            ("presence_penalty", -2.01, -2.0),
            ("top_k", 0.0, 1.0),
            ("max_new_tokens", 0.0, 1.0),
            ("best_of", 2.0, 1.0),
            ("best_of", 0.0, 1.0),
            ("truncate", 0.0, 1.0),
            ("truncate", 11.0, 10.0),
            ("top_n_tokens", 6.0, 5.0),
            // Values f32 rounds onto a bound are still inside it.
            ("temperature", 0.0, 1e-50),
            ("top_p", 1.0, 0.999_999_999_9),
            ("typical_p", 0.0, 5e-324),
        ];
        for (field, bad, good) in cases {
            let schema = &props[field];
            assert!(
                !within(schema, bad),
                "{field}: {bad} is documented as valid: {schema}"
            );
            assert!(
                within(schema, good),
                "{field}: {good} is documented as invalid: {schema}"
            );
            let p = |v: f64| {
                let integer = [
                    "top_k",
                    "max_new_tokens",
                    "best_of",
                    "truncate",
                    "top_n_tokens",
                ];
                let v = if integer.contains(&field) {
                    serde_json::json!(v as i64)
                } else {
                    serde_json::json!(v)
                };
                serde_json::from_value::<GenerateParameters>(serde_json::json!({ field: v }))
                    .unwrap()
            };
            assert!(
                check(p(bad)).is_err(),
                "{field}: {bad} passes the validator"
            );
            assert!(
                check(p(good)).is_ok(),
                "{field}: {good} fails the validator"
            );
        }
    }

    #[test]
    fn narrowing_to_f32_stays_within_the_rule() {
        use rules::*;
        let cases = [
            (POSITIVE, 5e-324),
            (POSITIVE, 1e300),
            (PROBABILITY, 0.999_999_999_9),
            (PROBABILITY, 1e-60),
            (PENALTY, 2.0),
            (PENALTY, -2.0),
            (LOGIT_BIAS, 99.999_999_999),
            (OPENAI_TOP_P, 1.0),
        ];
        for (range, v) in cases {
            assert!(range.contains(v), "{v}");
            let x = range.narrow(v);
            assert!(range.contains(x as f64), "{v} narrowed to {x}");
            assert!(x.is_finite());
        }
        assert_eq!(PENALTY.narrow(1.5), 1.5);
        assert!(!POSITIVE.contains(f64::NAN));
        assert!(!PROBABILITY.contains(1.0));
    }

    fn err(p: GenerateParameters) -> String {
        match check(p) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn best_of_rules() {
        let p = |b, sample| GenerateParameters {
            best_of: Some(b),
            do_sample: sample,
            ..Default::default()
        };
        assert_eq!(err(p(3, true)), "`best_of` must be > 0 and <= 2. Given: 3");
        assert_eq!(err(p(0, true)), "`best_of` must be > 0 and <= 2. Given: 0");
        assert_eq!(
            err(p(2, false)),
            "you must use sampling when `best_of` is > 1"
        );
        let mut seeded = p(2, true);
        seeded.seed = Some(1);
        assert_eq!(err(seeded), "`seed` must not be set when `best_of` > 1");
        assert_eq!(
            check_parameters(&config(), "x", &p(2, true), true)
                .err()
                .unwrap()
                .to_string(),
            "`best_of` != 1 is not supported when streaming tokens"
        );
        let mut one = config();
        one.max_best_of = 1;
        assert_eq!(
            check_parameters(&one, "x", &p(2, true), false)
                .err()
                .unwrap()
                .to_string(),
            "`best_of` != 1 is not allowed for this endpoint"
        );
        assert_eq!(check(p(2, true)).unwrap().best_of, 2);
    }

    #[test]
    fn sampling_parameter_ranges() {
        let cases: Vec<(GenerateParameters, &str)> = vec![
            (
                GenerateParameters {
                    temperature: Some(0.0),
                    ..Default::default()
                },
                "`temperature` must be strictly positive",
            ),
            (
                GenerateParameters {
                    repetition_penalty: Some(-1.0),
                    ..Default::default()
                },
                "`repetition_penalty` must be strictly positive",
            ),
            (
                GenerateParameters {
                    frequency_penalty: Some(2.5),
                    ..Default::default()
                },
                "`frequency_penalty` must be >= -2.0 and <= 2.0",
            ),
            (
                GenerateParameters {
                    presence_penalty: Some(-3.0),
                    ..Default::default()
                },
                "`presence_penalty` must be >= -2.0 and <= 2.0",
            ),
            (
                GenerateParameters {
                    top_p: Some(1.0),
                    ..Default::default()
                },
                "`top_p` must be > 0.0 and < 1.0",
            ),
            (
                GenerateParameters {
                    typical_p: Some(0.0),
                    ..Default::default()
                },
                "`typical_p` must be > 0.0 and < 1.0",
            ),
            (
                GenerateParameters {
                    top_k: Some(0),
                    ..Default::default()
                },
                "`top_k` must be strictly positive",
            ),
            (
                GenerateParameters {
                    max_new_tokens: Some(0),
                    ..Default::default()
                },
                "`max_new_tokens` must be strictly positive",
            ),
            (
                GenerateParameters {
                    stop: vec!["a".into(), "b".into(), "c".into()],
                    ..Default::default()
                },
                "`stop` supports up to 2 stop sequences. Given: 3",
            ),
            (
                GenerateParameters {
                    top_n_tokens: Some(6),
                    ..Default::default()
                },
                "`top_n_tokens` must be >= 0 and <= 5. Given: 6",
            ),
            (
                GenerateParameters {
                    truncate: Some(0),
                    ..Default::default()
                },
                "`truncate` must be strictly positive and less than 10. Given: 0",
            ),
            (
                GenerateParameters {
                    truncate: Some(11),
                    ..Default::default()
                },
                "`truncate` must be strictly positive and less than 10. Given: 11",
            ),
        ];
        for (p, msg) in cases {
            assert_eq!(err(p), msg);
        }
    }

    #[test]
    fn order_follows_tgi() {
        // temperature is checked before top_p, top_p before top_k, both before the stop count.
        let p = GenerateParameters {
            temperature: Some(-1.0),
            top_p: Some(2.0),
            top_k: Some(-1),
            stop: vec!["a".into(); 5],
            ..Default::default()
        };
        assert_eq!(err(p.clone()), "`temperature` must be strictly positive");
        let p = GenerateParameters {
            temperature: None,
            ..p
        };
        assert_eq!(err(p.clone()), "`top_p` must be > 0.0 and < 1.0");
        let p = GenerateParameters { top_p: None, ..p };
        assert_eq!(err(p), "`top_k` must be strictly positive");
    }

    #[test]
    fn empty_inputs_and_streaming_prefill_details() {
        assert_eq!(
            check_parameters(&config(), "", &GenerateParameters::default(), false)
                .err()
                .unwrap()
                .to_string(),
            "`inputs` cannot be empty"
        );
        let p = GenerateParameters {
            decoder_input_details: true,
            ..Default::default()
        };
        assert_eq!(
            check_parameters(&config(), "x", &p, true)
                .err()
                .unwrap()
                .to_string(),
            "`decoder_input_details` == true is not supported when streaming tokens"
        );
        assert!(check_parameters(&config(), "x", &p, false).is_ok());
    }

    #[test]
    fn sampling_and_seed() {
        let greedy = check(GenerateParameters::default()).unwrap();
        assert!(!greedy.parameters.do_sample);
        assert_eq!(greedy.parameters.seed, 0);
        let warped = check(GenerateParameters {
            top_k: Some(5),
            seed: Some(42),
            ..Default::default()
        })
        .unwrap();
        assert!(warped.parameters.do_sample);
        assert_eq!(warped.parameters.seed, 42);
        assert_eq!(warped.parameters.top_k, 5);
        // Random seeds differ between requests.
        let a = check(GenerateParameters {
            do_sample: true,
            ..Default::default()
        })
        .unwrap();
        let b = check(GenerateParameters {
            do_sample: true,
            ..Default::default()
        })
        .unwrap();
        assert_ne!(a.parameters.seed, b.parameters.seed);
    }

    #[test]
    fn token_limits() {
        let c = config();
        assert_eq!(check_lengths(&c, 4, None).unwrap(), 12);
        assert_eq!(check_lengths(&c, 4, Some(3)).unwrap(), 3);
        assert_eq!(
            check_lengths(&c, 4, Some(13)).unwrap_err().to_string(),
            "`inputs` tokens + `max_new_tokens` must be <= 16. Given: 4 `inputs` tokens and 13 `max_new_tokens`"
        );
        assert_eq!(
            check_lengths(&c, 11, Some(1)).unwrap_err().to_string(),
            "`inputs` must have less than 10 tokens. Given: 11"
        );
    }

    fn tokenizer() -> Tokenizer {
        use tokenizers::models::wordlevel::WordLevel;
        use tokenizers::pre_tokenizers::whitespace::Whitespace;
        let vocab = [("[UNK]", 0u32), ("a", 1), ("b", 2), ("c", 3)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .build()
            .unwrap();
        let mut t = Tokenizer::new(model);
        t.with_pre_tokenizer(Some(Whitespace {}));
        t
    }

    #[test]
    fn logit_bias_keys_and_values_are_checked() {
        let bias = |pairs: &[(&str, f64)]| {
            let map = pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            check_logit_bias(&map, 10)
        };
        assert_eq!(
            bias(&[("3", -100.0), ("9", 2.5)]),
            Ok(vec![(3, -100.0), (9, 2.5)])
        );
        assert_eq!(
            bias(&[("x", 1.0)]).unwrap_err().to_string(),
            "`logit_bias`: \"x\" is not a token id"
        );
        for key in ["", " 3", "+3", "-3", "3.0"] {
            assert!(bias(&[(key, 1.0)]).is_err(), "{key:?}");
        }
        assert_eq!(
            bias(&[("99999999999", 1.0)]).unwrap_err().to_string(),
            "`logit_bias`: token id 99999999999 is not in the vocabulary (10 tokens)"
        );
        assert_eq!(
            bias(&[("10", 1.0)]).unwrap_err().to_string(),
            "`logit_bias`: token id 10 is not in the vocabulary (10 tokens)"
        );
        assert_eq!(
            bias(&[("1", 101.0)]).unwrap_err().to_string(),
            "`logit_bias`: the bias of token 1 must be >= -100 and <= 100. Given: 101"
        );
    }

    #[tokio::test]
    async fn validate_tokenizes_truncates_and_rejects_unsupported() {
        let v = Validation::new(config(), tokenizer()).unwrap();
        let p = GenerateParameters {
            truncate: Some(2),
            max_new_tokens: Some(4),
            ..Default::default()
        };
        let r = v.validate("a b c a", true, &p, false).await.unwrap();
        assert_eq!(r.request.input_ids, vec![3, 1]);
        assert_eq!(r.input_length, 2);
        assert_eq!(r.request.stopping.max_new_tokens, 4);

        let long = "a ".repeat(11);
        let e = v
            .validate(&long, true, &GenerateParameters::default(), false)
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "`inputs` must have less than 10 tokens. Given: 11"
        );

        // A word-level vocabulary has no byte strings to build token masks from.
        let grammar = GenerateParameters {
            grammar: Some(serde_json::json!({"type": "regex", "value": "a+"})),
            ..Default::default()
        };
        assert_eq!(
            v.validate("a", true, &grammar, false).await.unwrap_err(),
            ValidationError::Grammar
        );
        let best_of = GenerateParameters {
            best_of: Some(2),
            do_sample: true,
            ..Default::default()
        };
        assert_eq!(
            v.validate("a", true, &best_of, false).await.unwrap_err(),
            ValidationError::BestOfUnsupported
        );
    }
}
