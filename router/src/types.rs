//! Request and response bodies of the HTTP API: TGI's native shapes (`/generate`,
//! `/generate_stream`, `/`, `/tokenize`, `/info`) and OpenAI's (`/v1/*`). Field names, defaults
//! and omissions follow the reference servers so existing clients parse them unchanged.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// TGI's `GenerateParameters`. Every field is optional; see the validation module for the rules.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct GenerateParameters {
    /// Generate `best_of` sequences and return the one with the highest logprob (only 1 is served).
    #[serde(default, deserialize_with = "integers::optional")]
    pub best_of: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    /// OpenAI-style: subtract `frequency_penalty × count` from a generated token's logit.
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    /// OpenAI-style: subtract `presence_penalty` once from every token already generated
    /// (an extension of TGI's parameters, used by the OpenAI routes).
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    /// Keep generating past the model's EOS tokens (an extension, as vLLM's `ignore_eos`;
    /// benchmarks use it to fix the output length).
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default, deserialize_with = "integers::optional")]
    pub top_k: Option<i32>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub typical_p: Option<f64>,
    #[serde(default)]
    pub do_sample: bool,
    /// At least 1; prompt + `max_new_tokens` within the deployment's `max_total_tokens`
    /// (`/info`), else 422.
    #[serde(default, deserialize_with = "integers::optional")]
    pub max_new_tokens: Option<u32>,
    /// Prepend the prompt to the generated text.
    #[serde(default)]
    pub return_full_text: Option<bool>,
    #[serde(default)]
    pub stop: Vec<String>,
    /// Keep only the last `truncate` prompt tokens (at most `max_input_tokens`, else 422).
    #[serde(default, deserialize_with = "integers::optional")]
    pub truncate: Option<usize>,
    /// Accepted for compatibility; watermarking is not implemented.
    #[serde(default)]
    pub watermark: bool,
    #[serde(default)]
    pub details: bool,
    /// Return the prompt tokens with their logprobs.
    #[serde(default)]
    pub decoder_input_details: bool,
    #[serde(default, deserialize_with = "integers::optional")]
    pub seed: Option<u64>,
    #[serde(default, deserialize_with = "integers::optional")]
    pub top_n_tokens: Option<u32>,
    /// Structured output: `{"type": "json" | "json_object", "value": <JSON schema>}`,
    /// `{"type": "json_schema", "value": {"schema"}}`, `{"type": "regex", "value": "..."}`, or
    /// wick's `{"type": "lark", "value": "<Lark grammar>"}`; enforced token by token.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub grammar: Option<serde_json::Value>,
    /// LoRA adapters are not supported: any value but null is rejected.
    #[serde(default)]
    #[schema(value_type = Option<()>)]
    pub adapter_id: Option<String>,
    /// wick: no end token and no stop sequence before this many new tokens (vLLM's
    /// `min_tokens`; more than `max_new_tokens` means none before the last).
    #[serde(default, deserialize_with = "integers::optional")]
    pub min_new_tokens: Option<u32>,
    /// wick: OpenAI's `logit_bias`: token id (a string) → a bias in [-100, 100] added to that
    /// token's logit.
    #[serde(default)]
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
}

/// The parameters TGI applies when a request carries no `parameters` object at all
/// (note: sampling on, unlike `"parameters": {}`).
pub fn default_parameters() -> GenerateParameters {
    GenerateParameters {
        do_sample: true,
        ..Default::default()
    }
}

fn default_true() -> bool {
    true
}

/// Body of `/generate`, `/generate_stream` and `/tokenize`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct GenerateRequest {
    #[schema(example = "My name is Olivier and I", min_length = 1)]
    pub inputs: String,
    #[serde(default = "default_parameters", deserialize_with = "objects::object")]
    pub parameters: GenerateParameters,
    /// Add the tokenizer's special tokens (BOS) to the prompt; chat requests turn it off
    /// because the template supplies them.
    #[serde(default = "default_true")]
    pub add_special_tokens: bool,
}

/// Body of `/tokenize`. TGI's clients send a whole generate request: its other fields are not
/// read.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    pub inputs: String,
    #[serde(default = "default_true")]
    pub add_special_tokens: bool,
}

/// Body of `POST /`: a generate request that may ask for a stream.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompatGenerateRequest {
    #[schema(min_length = 1)]
    pub inputs: String,
    #[serde(default = "default_parameters", deserialize_with = "objects::object")]
    pub parameters: GenerateParameters,
    #[serde(default)]
    pub stream: bool,
}

/// Why generation stopped, as TGI spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Length,
    EosToken,
    StopSequence,
}

impl From<wick_proto::FinishReason> for FinishReason {
    fn from(reason: wick_proto::FinishReason) -> Self {
        match reason {
            wick_proto::FinishReason::Length => FinishReason::Length,
            wick_proto::FinishReason::EosToken => FinishReason::EosToken,
            wick_proto::FinishReason::StopSequence => FinishReason::StopSequence,
        }
    }
}

impl FinishReason {
    /// OpenAI's vocabulary: a stop sequence and EOS are both "stop".
    pub fn openai(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::EosToken | FinishReason::StopSequence => "stop",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Token {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    pub special: bool,
}

impl From<wick_scheduler::request::Token> for Token {
    fn from(t: wick_scheduler::request::Token) -> Self {
        Token {
            id: t.id,
            text: t.text,
            logprob: t.logprob,
            special: t.special,
        }
    }
}

/// A prompt token; the first one has no logprob (`null`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PrefillToken {
    pub id: u32,
    pub text: String,
    pub logprob: Option<f32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Details {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<Token>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Vec<Token>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GenerateResponse {
    pub generated_text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StreamDetails {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub input_length: u32,
}

/// One event of `/generate_stream`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StreamResponse {
    /// Counts from 1.
    pub index: u32,
    pub token: Token,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Token>,
    /// Set on the last event only.
    pub generated_text: Option<String>,
    /// Set on the last event when `details` was asked for.
    pub details: Option<StreamDetails>,
}

/// TGI's error body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorResponse {
    pub error: String,
    pub error_type: String,
}

/// OpenAI's error body: `{"error": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OpenAiErrorResponse {
    pub error: OpenAiError,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OpenAiError {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// `GET /info`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Info {
    pub model_id: String,
    pub model_sha: Option<String>,
    pub model_pipeline_tag: Option<String>,
    pub max_concurrent_requests: usize,
    pub max_best_of: usize,
    pub max_stop_sequences: usize,
    pub max_input_tokens: u32,
    pub max_total_tokens: u32,
    pub validation_workers: usize,
    pub max_client_batch_size: usize,
    pub router: String,
    pub version: String,
    pub sha: Option<String>,
    pub docker_label: Option<String>,
    // Beyond TGI: what the shards reported.
    pub max_batch_total_tokens: u32,
    pub block_size: u32,
    pub dtype: String,
    pub device_type: String,
    pub quantize: String,
    pub world_size: usize,
    /// The CPU rank 0 runs on (`/proc/cpuinfo`'s model name).
    pub cpu_model: String,
    /// The CPU features wick's kernels use that this CPU has (avx2, avx512vnni, ...).
    pub cpu_features: Vec<String>,
    /// Where each weight format of the linear layers computes, e.g. `{"q4_1": "wick avx512"}`.
    pub kernels: std::collections::BTreeMap<String, String>,
    /// The KV cache's element type (`f16`, `bf16` or `f32`).
    pub kv_cache_dtype: String,
    /// Bytes one token's K and V take over all layers, on each rank.
    pub kv_cache_bytes_per_token: u64,
    /// The grammar types `parameters.grammar` takes (structured output; OpenAI's
    /// `response_format` maps onto `json`).
    pub grammar_types: Vec<String>,
}

/// One server-sent event of `/generate_stream` (and of `/` with `stream: true`): a token event,
/// or an error event (the HTTP status is already 200 when a stream fails).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StreamEvent {
    Token(StreamResponse),
    Error(ErrorResponse),
}

/// One prompt token of `/tokenize`, with byte offsets into `inputs`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SimpleToken {
    pub id: u32,
    pub text: String,
    pub start: usize,
    pub stop: usize,
}

// ---------------------------------------------------------------------------------------------
// OpenAI

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

impl StopSpec {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopSpec::One(s) => vec![s],
            StopSpec::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// A part of a multi-part message content.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text {
        text: String,
    },
    ImageUrl {
        #[serde(deserialize_with = "objects::object")]
        image_url: ImageUrl,
    },
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ImageUrl {
    pub url: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    #[serde(deserialize_with = "objects::list_of_objects")]
    Parts(Vec<ContentPart>),
}

impl MessageContent {
    /// Flattens parts to text; images become markdown `![](url)` as TGI does.
    pub fn to_text(&self) -> String {
        match self {
            MessageContent::Text(s) => s.clone(),
            MessageContent::Parts(parts) => parts
                .iter()
                .map(|p| match p {
                    ContentPart::Text { text } => text.clone(),
                    ContentPart::ImageUrl { image_url } => format!("![]({})", image_url.url),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant turn's calls.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "objects::optional_list_of_objects"
    )]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// A `tool` turn: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// `POST /v1/chat/completions`. Unknown fields are ignored.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[schema(min_items = 1)]
    #[serde(deserialize_with = "objects::list_of_objects")]
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    /// Keep generating past EOS (vLLM's extension; used by benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Token id (a string) → a bias in [-100, 100] added to that token's logit.
    #[serde(default)]
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// No end token and no stop sequence before this many tokens (vLLM's extension; more
    /// than `max_tokens` means none before the last).
    #[serde(default, deserialize_with = "integers::optional")]
    pub min_tokens: Option<u32>,
    /// The end user's id: logged at debug level (it changes nothing in the answer, as at OpenAI).
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default, deserialize_with = "integers::optional")]
    pub top_logprobs: Option<u32>,
    #[serde(default, deserialize_with = "integers::optional")]
    pub max_tokens: Option<u32>,
    #[serde(default, deserialize_with = "integers::optional")]
    pub max_completion_tokens: Option<u32>,
    /// Number of choices to generate.
    #[serde(default, deserialize_with = "integers::optional")]
    pub n: Option<usize>,
    #[serde(default)]
    pub stop: Option<StopSpec>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, deserialize_with = "objects::optional_object")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, deserialize_with = "integers::optional")]
    pub seed: Option<u64>,
    /// 0 means greedy decoding.
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Functions the model may call (`{"type": "function", "function": {"name",
    /// "description", "parameters"}}`); calls are enforced by a grammar, so they always parse.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<serde_json::Value>>,
    /// `none`, `auto` (the default with tools), `required`, or `{"type": "function",
    /// "function": {"name"}}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<serde_json::Value>,
    /// Several calls in one answer (default true).
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// `{"type": "text" | "json_object"}` or `{"type": "json_schema", "json_schema":
    /// {"name", "schema", "strict"}}`: the answer is enforced to match (TGI's grammar forms
    /// are accepted too).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatLogprob {
    pub token: String,
    pub logprob: f32,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatLogprob>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AssistantMessage {
    pub role: String,
    /// Null when the answer is tool calls.
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// A call the model made (OpenAI's shape; `arguments` is a JSON string).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(deserialize_with = "objects::object")]
    pub function: ToolFunction,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ToolFunction {
    pub name: String,
    pub arguments: String,
}

/// A streamed piece of a call: `index`, `id`, `type` and `name` first, then argument fragments.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ToolCallDelta {
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub function: ToolFunctionDelta,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ToolFunctionDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: String,
}

/// Non-stream answer of `/v1/chat/completions`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
}

/// One event of a streamed chat completion.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChatChunkChoice>,
    pub usage: Option<Usage>,
}

/// `prompt`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

impl Prompt {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Prompt::One(s) => vec![s],
            Prompt::Many(v) => v,
        }
    }
}

/// `POST /v1/completions`. Unknown fields are ignored.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: Prompt,
    #[serde(default, deserialize_with = "integers::optional")]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, deserialize_with = "objects::optional_object")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, deserialize_with = "integers::optional")]
    pub seed: Option<u64>,
    /// Not supported: any value but null is rejected.
    #[serde(default)]
    #[schema(value_type = Option<()>)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    /// Keep generating past EOS (vLLM's extension; used by benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub stop: Option<StopSpec>,
    /// Number of completions per prompt.
    #[serde(default, deserialize_with = "integers::optional")]
    pub n: Option<usize>,
    /// Number of most likely tokens to report per position (0 = only the chosen token).
    #[serde(default, deserialize_with = "integers::optional")]
    pub logprobs: Option<u32>,
    /// The answer starts with the prompt (and, with `logprobs`, the prompt's tokens).
    #[serde(default)]
    pub echo: bool,
    /// Token id (a string) → a bias in [-100, 100] added to that token's logit.
    #[serde(default)]
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// No end token and no stop sequence before this many tokens (vLLM's extension; more
    /// than `max_tokens` means none before the last).
    #[serde(default, deserialize_with = "integers::optional")]
    pub min_tokens: Option<u32>,
    /// The end user's id: logged at debug level (it changes nothing in the answer, as at OpenAI).
    #[serde(default)]
    pub user: Option<String>,
}

/// OpenAI's legacy logprobs object.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    /// Null for an echoed prompt's first token (nothing predicts it).
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<std::collections::BTreeMap<String, f32>>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length`; null on intermediate stream chunks.
    pub finish_reason: Option<String>,
}

/// Answer of `/v1/completions`, and each event of its stream (`usage` only on the last).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Completion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

/// Integer request fields also read a number with no fractional part (`1.0`): JSON Schema's
/// `integer` includes them, and clients that compute a count in floating point send them.
pub(crate) mod integers {
    use serde::de::{Deserializer, Error, Unexpected};
    use serde::Deserialize;
    use serde_json::Number;

    pub fn optional<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64> + TryFrom<i64>,
    {
        let Some(n) = Option::<Number>::deserialize(d)? else {
            return Ok(None);
        };
        let out_of_range = || D::Error::invalid_value(unexpected(&n), &"an integer within range");
        if let Some(u) = n.as_u64() {
            return T::try_from(u).map(Some).map_err(|_| out_of_range());
        }
        if let Some(i) = n.as_i64() {
            return T::try_from(i).map(Some).map_err(|_| out_of_range());
        }
        match n.as_f64() {
            // 2^64 itself would saturate to u64::MAX.
            Some(f) if f.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&f) => {
                T::try_from(f as u64).map(Some).map_err(|_| out_of_range())
            }
            Some(f) if f.fract() == 0.0 && f >= i64::MIN as f64 && f < 0.0 => {
                T::try_from(f as i64).map(Some).map_err(|_| out_of_range())
            }
            Some(f) => Err(D::Error::invalid_type(Unexpected::Float(f), &"an integer")),
            None => Err(out_of_range()),
        }
    }

    fn unexpected(n: &Number) -> Unexpected<'static> {
        if let Some(u) = n.as_u64() {
            Unexpected::Unsigned(u)
        } else if let Some(i) = n.as_i64() {
            Unexpected::Signed(i)
        } else {
            Unexpected::Float(n.as_f64().unwrap_or(f64::NAN))
        }
    }
}

/// Request fields that take an object refuse an array: serde's derived structs also read a
/// JSON array as their fields in order (`"parameters": [null, null]`), which no client means
/// and the API document does not allow.
pub(crate) mod objects {
    use std::marker::PhantomData;

    use serde::de::value::MapAccessDeserializer;
    use serde::de::{Deserializer, MapAccess, Visitor};
    use serde::Deserialize;

    /// A `T` read from a JSON object only.
    pub(crate) struct Object<T>(pub T);

    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Fields<T>(PhantomData<T>);
            impl<'de, T: Deserialize<'de>> Visitor<'de> for Fields<T> {
                type Value = T;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                    T::deserialize(MapAccessDeserializer::new(map))
                }
            }
            d.deserialize_map(Fields(PhantomData)).map(Object)
        }
    }

    pub fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
        Object::deserialize(d).map(|o| o.0)
    }

    pub fn optional_object<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        Ok(Option::<Object<T>>::deserialize(d)?.map(|o| o.0))
    }

    pub fn list_of_objects<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        let list = Vec::<Object<T>>::deserialize(d)?;
        Ok(list.into_iter().map(|o| o.0).collect())
    }

    pub fn optional_list_of_objects<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        let list = Option::<Vec<Object<T>>>::deserialize(d)?;
        Ok(list.map(|l| l.into_iter().map(|o| o.0).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_parameters_default_to_sampling_but_empty_object_does_not() {
        let r: GenerateRequest = serde_json::from_str(r#"{"inputs":"a"}"#).unwrap();
        assert!(r.parameters.do_sample);
        assert!(r.add_special_tokens);
        let r: GenerateRequest = serde_json::from_str(r#"{"inputs":"a","parameters":{}}"#).unwrap();
        assert!(!r.parameters.do_sample);
    }

    #[test]
    fn optional_fields_are_omitted_as_tgi_does() {
        let r = GenerateResponse {
            generated_text: "x".into(),
            details: None,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"generated_text":"x"}"#
        );
        let s = StreamResponse {
            index: 1,
            token: Token {
                id: 3,
                text: "a".into(),
                logprob: -0.5,
                special: false,
            },
            top_tokens: vec![],
            generated_text: None,
            details: None,
        };
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"index":1,"token":{"id":3,"text":"a","logprob":-0.5,"special":false},"generated_text":null,"details":null}"#
        );
    }

    #[test]
    fn stop_and_prompt_accept_string_or_list() {
        let c: CompletionRequest =
            serde_json::from_str(r#"{"prompt":["a","b"],"stop":"x"}"#).unwrap();
        assert_eq!(c.prompt.into_vec(), vec!["a", "b"]);
        assert_eq!(c.stop.unwrap().into_vec(), vec!["x"]);
        let c: CompletionRequest =
            serde_json::from_str(r#"{"prompt":"a","stop":["x","y"]}"#).unwrap();
        assert_eq!(c.prompt.into_vec(), vec!["a"]);
        assert_eq!(c.stop.unwrap().into_vec(), vec!["x", "y"]);
    }

    #[test]
    fn message_parts_flatten_to_text() {
        let m: ChatMessage = serde_json::from_str(
            r#"{"role":"user","content":[{"type":"text","text":"see "},{"type":"image_url","image_url":{"url":"http://x/y.png"}}]}"#,
        )
        .unwrap();
        assert_eq!(m.content.unwrap().to_text(), "see ![](http://x/y.png)");
    }

    #[test]
    fn integers_read_integral_floats_only() {
        let p = |json: &str| serde_json::from_str::<GenerateParameters>(json);
        assert_eq!(
            p(r#"{"max_new_tokens": 12.0}"#).unwrap().max_new_tokens,
            Some(12)
        );
        assert_eq!(p(r#"{"seed": 1e3}"#).unwrap().seed, Some(1000));
        assert_eq!(
            p(r#"{"seed": 18446744073709551615}"#).unwrap().seed,
            Some(u64::MAX)
        );
        assert_eq!(p(r#"{"top_k": -3.0}"#).unwrap().top_k, Some(-3));
        assert_eq!(p(r#"{"seed": null}"#).unwrap().seed, None);
        for bad in [
            r#"{"max_new_tokens": 1.5}"#,
            r#"{"max_new_tokens": -1}"#,
            r#"{"max_new_tokens": 4294967296}"#,
            r#"{"seed": 1.8446744073709552e19}"#,
            r#"{"seed": "5"}"#,
            r#"{"top_k": 2147483648.0}"#,
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn objects_are_not_read_from_arrays() {
        let generate = [
            r#"{"inputs":"a","parameters":[null]}"#,
            r#"{"inputs":"a","parameters":"x"}"#,
        ];
        for body in generate {
            assert!(
                serde_json::from_str::<GenerateRequest>(body).is_err(),
                "{body}"
            );
            assert!(
                serde_json::from_str::<CompatGenerateRequest>(body).is_err(),
                "{body}"
            );
        }
        let chats = [
            r#"{"messages":[["user","hi"]]}"#,
            r#"{"messages":[{"role":"user","content":[["text","hi"]]}]}"#,
            r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":["u"]}]}]}"#,
            r#"{"messages":[{"role":"user","content":"x"}],"stream_options":[true]}"#,
            r#"{"messages":[{"role":"assistant","tool_calls":[["a","function",{"name":"f","arguments":"{}"}]]}]}"#,
            r#"{"messages":[{"role":"assistant","tool_calls":[{"id":"a","type":"function","function":["f","{}"]}]}]}"#,
        ];
        for body in chats {
            assert!(serde_json::from_str::<ChatRequest>(body).is_err(), "{body}");
        }
        let completion = r#"{"prompt":"a","stream_options":[false]}"#;
        assert!(serde_json::from_str::<CompletionRequest>(completion).is_err());
        // The same values as objects (or null) are read.
        let ok = r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"u"}}]},{"role":"assistant","tool_calls":[{"id":"a","type":"function","function":{"name":"f","arguments":"{}"}}]}],"stream_options":null}"#;
        let chat: ChatRequest = serde_json::from_str(ok).unwrap();
        assert_eq!(chat.messages.len(), 2);
        assert!(chat.stream_options.is_none());
        let r: GenerateRequest =
            serde_json::from_str(r#"{"inputs":"a","parameters":{"top_k":2}}"#).unwrap();
        assert_eq!(r.parameters.top_k, Some(2));
    }

    #[test]
    fn finish_reasons_spell_as_tgi_and_openai() {
        assert_eq!(
            serde_json::to_string(&FinishReason::EosToken).unwrap(),
            r#""eos_token""#
        );
        assert_eq!(FinishReason::StopSequence.openai(), "stop");
        assert_eq!(FinishReason::Length.openai(), "length");
    }
}
