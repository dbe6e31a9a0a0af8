//! The OpenAPI document served at `/api-doc/openapi.json` (Swagger UI at `/docs`).

use serde_json::{json, Map, Value};
use utoipa::OpenApi;

use crate::validation::{rules, Range};

use crate::types::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta,
    ChatLogprob, ChatLogprobs, ChatMessage, ChatRequest, CompatGenerateRequest, Completion,
    CompletionChoice, CompletionLogprobs, CompletionRequest, ContentPart, Details, ErrorResponse,
    FinishReason, GenerateParameters, GenerateRequest, GenerateResponse, ImageUrl, Info,
    MessageContent, ModelCard, ModelList, OpenAiError, OpenAiErrorResponse, PrefillToken, Prompt,
    SimpleToken, StopSpec, StreamDetails, StreamEvent, StreamOptions, StreamResponse, Token,
    TokenizeRequest, ToolCall, ToolCallDelta, ToolFunction, ToolFunctionDelta, TopLogprob, Usage,
};

/// wick-router's API.
#[derive(OpenApi)]
#[openapi(
    paths(
        super::native::compat_generate,
        super::native::generate,
        super::native::generate_stream,
        super::native::tokenize,
        super::openai::chat_completions,
        super::openai::completions,
        super::openai::models,
        super::info::health,
        super::info::root_health,
        super::info::info,
        super::info::metrics,
    ),
    components(schemas(
        GenerateRequest, GenerateParameters, CompatGenerateRequest, GenerateResponse, Details,
        PrefillToken, Token, FinishReason, StreamResponse, StreamDetails, ErrorResponse,
        OpenAiErrorResponse, OpenAiError, Info, SimpleToken, ChatRequest, ChatMessage,
        MessageContent, ContentPart, ImageUrl, StopSpec, StreamOptions, ChatCompletion,
        ChatChoice, AssistantMessage, ChatLogprobs, ChatLogprob, TopLogprob,
        ChatCompletionChunk, ChatChunkChoice, ChatDelta, CompletionRequest, Prompt,
        Completion, CompletionChoice, CompletionLogprobs, Usage, ModelList, ModelCard, ToolCall,
        ToolFunction, ToolCallDelta, ToolFunctionDelta, StreamEvent, TokenizeRequest,
    )),
    tags(
        (name = "Text Generation Inference", description = "TGI's native API"),
        (name = "OpenAI", description = "OpenAI-compatible API"),
    ),
    info(title = "wick-router", description = "wick's HTTP API: TGI native routes and OpenAI-compatible routes")
)]
pub struct ApiDoc;

/// This deployment's limits, which the document states as bounds.
pub(crate) struct Limits {
    pub validation: crate::validation::ValidationConfig,
    pub max_client_batch_size: usize,
    /// Generation routes need an API key.
    pub api_key: bool,
}

/// The document as served: [`ApiDoc`] with this deployment's limits as bounds (so a request
/// the schema accepts is refused only for a limit no schema can state: prompt plus new tokens
/// within `max_total_tokens`), and every `text/event-stream` body described as its events
/// (OpenAPI's reading of a stream: each event an object whose `data` holds JSON of the
/// documented schema, or OpenAI's closing `[DONE]`).
pub(crate) fn document(limits: &Limits) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the document serializes");
    describe_streams(&mut doc);
    state_bounds(&mut doc, limits);
    state_errors(&mut doc, limits);
    doc
}

/// Calls `f` with each operation's path, method and responses.
fn each_operation(doc: &mut Value, mut f: impl FnMut(&str, &str, &mut Map<String, Value>)) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(operations) = item.as_object_mut() else {
            continue;
        };
        for (method, operation) in operations.iter_mut() {
            if let Some(responses) = operation["responses"].as_object_mut() {
                f(path, method, responses);
            }
        }
    }
}

/// Calls `f` with each property of each component schema, by name.
fn each_property(schemas: &mut Value, mut f: impl FnMut(&str, &mut Value)) {
    let Some(schemas) = schemas.as_object_mut() else {
        return;
    };
    for schema in schemas.values_mut() {
        if let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) {
            for (name, property) in properties.iter_mut() {
                f(name, property);
            }
        }
    }
}

/// Every `text/event-stream` body as its events; an OpenAI stream that fails sends OpenAI's
/// error body as an event.
fn describe_streams(doc: &mut Value) {
    each_operation(doc, |path, _, responses| {
        for response in responses.values_mut() {
            let Some(schema) = response.pointer_mut("/content/text~1event-stream/schema") else {
                continue;
            };
            let mut payload = schema.take();
            if path.starts_with("/v1/") {
                let error = json!({"$ref": "#/components/schemas/OpenAiErrorResponse"});
                payload = json!({"anyOf": [payload, error]});
            }
            *schema = sse_event(payload);
        }
    });
}

/// What a 422 means beyond the request schema: the rules no schema can state.
const UNPROCESSABLE: &str = "Input validation error: a value outside the bounds above, or a \
    rule the schema cannot state: the prompt's tokens over `max_input_tokens` or prompt plus new \
    tokens over `max_total_tokens` (`/info`), a grammar, regular expression or JSON schema that \
    does not compile, a `logit_bias` token id outside the vocabulary, a `tool_choice` naming a \
    function not in `tools` (or any but `auto`/`none` without `tools`), both `tools` and a \
    `response_format`, `n` times the prompts over `max_client_batch_size`, `echo` with \
    `logprobs` in a stream, `decoder_input_details` in a stream, a chat template that refuses \
    the messages.";

/// The errors every generation route can answer besides its own: 401 when an API key is set,
/// 422 as [`UNPROCESSABLE`], 500 when generation stops without its end, 504 past
/// `--request-deadline`.
fn state_errors(doc: &mut Value, limits: &Limits) {
    each_operation(doc, |path, method, responses| {
        if method != "post" {
            return;
        }
        let body = if path.starts_with("/v1/") {
            "OpenAiErrorResponse"
        } else {
            "ErrorResponse"
        };
        let error = |description: &str| {
            json!({"description": description, "content": {"application/json": {
                "schema": {"$ref": format!("#/components/schemas/{body}")}}}})
        };
        responses.insert("422".into(), error(UNPROCESSABLE));
        if limits.api_key {
            responses.insert(
                "401".into(),
                error("No `Authorization: Bearer <key>` with this deployment's API key"),
            );
        }
        if path != "/tokenize" {
            responses.insert(
                "500".into(),
                error("Generation stopped without its end (a shard failed)"),
            );
            responses.insert(
                "504".into(),
                error("The request ran past this deployment's `--request-deadline`"),
            );
        }
    });
}

/// The validator's value rules, by schema and field, as the document states them.
const RULES: &[(&str, &str, Range)] = {
    use crate::validation::rules::*;
    &[
        ("GenerateParameters", "best_of", BEST_OF),
        ("GenerateParameters", "temperature", POSITIVE),
        ("GenerateParameters", "repetition_penalty", POSITIVE),
        ("GenerateParameters", "frequency_penalty", PENALTY),
        ("GenerateParameters", "presence_penalty", PENALTY),
        ("GenerateParameters", "top_k", AT_LEAST_ONE),
        ("GenerateParameters", "top_p", PROBABILITY),
        ("GenerateParameters", "typical_p", PROBABILITY),
        ("GenerateParameters", "max_new_tokens", AT_LEAST_ONE),
        ("GenerateParameters", "truncate", AT_LEAST_ONE),
        ("ChatRequest", "temperature", OPENAI_TEMPERATURE),
        ("ChatRequest", "top_p", OPENAI_TOP_P),
        ("ChatRequest", "frequency_penalty", PENALTY),
        ("ChatRequest", "presence_penalty", PENALTY),
        ("ChatRequest", "n", AT_LEAST_ONE),
        ("ChatRequest", "max_tokens", AT_LEAST_ONE),
        ("ChatRequest", "max_completion_tokens", AT_LEAST_ONE),
        ("CompletionRequest", "temperature", OPENAI_TEMPERATURE),
        ("CompletionRequest", "top_p", OPENAI_TOP_P),
        ("CompletionRequest", "repetition_penalty", POSITIVE),
        ("CompletionRequest", "frequency_penalty", PENALTY),
        ("CompletionRequest", "presence_penalty", PENALTY),
        ("CompletionRequest", "n", AT_LEAST_ONE),
        ("CompletionRequest", "max_tokens", AT_LEAST_ONE),
    ]
};

/// Writes [`RULES`] and this deployment's limits into the document's request schemas
/// (integer bounds as integers: a float bound makes generators send `1.0`).
fn state_bounds(doc: &mut Value, limits: &Limits) {
    let v = &limits.validation;
    let new_tokens = v.max_total_tokens.saturating_sub(1) as f64;
    let batch = limits.max_client_batch_size as f64;
    let top_n = v.max_top_n_tokens as f64;
    let maxima: [(&str, &str, f64); 10] = [
        ("GenerateParameters", "top_n_tokens", top_n),
        ("GenerateParameters", "max_new_tokens", new_tokens),
        ("GenerateParameters", "truncate", v.max_input_tokens as f64),
        ("ChatRequest", "n", batch),
        ("ChatRequest", "top_logprobs", top_n),
        ("ChatRequest", "max_tokens", new_tokens),
        ("ChatRequest", "max_completion_tokens", new_tokens),
        ("CompletionRequest", "n", batch),
        ("CompletionRequest", "logprobs", top_n),
        ("CompletionRequest", "max_tokens", new_tokens),
    ];
    let schemas = &mut doc["components"]["schemas"];
    unsigned_ranges(schemas);
    nullable_logprobs(schemas);
    // The named property, when the document has it (indexing would insert a null).
    fn property<'a>(schemas: &'a mut Value, schema: &str, field: &str) -> &'a mut Value {
        schemas
            .get_mut(schema)
            .and_then(|s| s.get_mut("properties"))
            .and_then(|p| p.get_mut(field))
            .unwrap_or_else(|| panic!("the document has no {schema}.{field}"))
    }
    for (schema, field, range) in RULES {
        put_range(property(schemas, schema, field), range);
    }
    for (schema, field, max) in maxima {
        let property = property(schemas, schema, field);
        let max = match property["minimum"].as_f64() {
            Some(min) if min > max => min,
            _ => max,
        };
        put_bound(property, "maximum", max);
    }
    for schema in ["GenerateParameters", "ChatRequest", "CompletionRequest"] {
        let bias = property(schemas, schema, "logit_bias");
        if let Some(value) = bias.get_mut("additionalProperties") {
            put_range(value, &rules::LOGIT_BIAS);
        }
        bias["propertyNames"] = json!({"pattern": crate::validation::TOKEN_ID});
    }
    property(schemas, "GenerateParameters", "stop")["maxItems"] = v.max_stop_sequences.into();
    if let Some(list) = schemas["StopSpec"]["oneOf"]
        .as_array_mut()
        .and_then(|branches| branches.iter_mut().find(|b| b["type"] == "array"))
    {
        list["maxItems"] = v.max_stop_sequences.into();
    }
    // Fields kept for compatibility whose only accepted value is null.
    for (schema, field, what) in [
        (
            "GenerateParameters",
            "adapter_id",
            "LoRA adapters are not supported",
        ),
        ("CompletionRequest", "suffix", "`suffix` is not supported"),
    ] {
        *property(schemas, schema, field) =
            json!({"type": "null", "description": format!("{what}: null only")});
    }
    let text = json!({"type": "string", "minLength": 1});
    *property(schemas, "CompletionRequest", "prompt") = json!({"anyOf": [
        text,
        {"type": "array", "items": text, "minItems": 1, "maxItems": limits.max_client_batch_size},
    ]});
    let grammar = grammar_schema();
    *property(schemas, "GenerateParameters", "grammar") = nullable(grammar.clone());
    *property(schemas, "ChatRequest", "response_format") = nullable(json!({"anyOf": [
        {"type": "object", "required": ["type"], "properties": {
            "type": {"type": "string", "enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type", "json_schema"], "properties": {
            "type": {"type": "string", "enum": ["json_schema"]},
            "json_schema": {"type": "object", "properties": {
                "name": {"description": "Not read"},
                "schema": {
                    "type": "object",
                    "description": "Without it, any JSON object"},
                "strict": {"description": "Not read: the schema is always enforced"}}}}},
        grammar,
    ]}));
    *property(schemas, "ChatRequest", "tools") = nullable(json!({
        "type": "array",
        "items": {"type": "object", "required": ["function"], "properties": {
            "type": {"enum": ["function", null]},
            "function": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string", "minLength": 1},
                "description": {"type": ["string", "null"]},
                "parameters": {
                    "type": ["object", "null"],
                    "description": "A JSON schema of the arguments"}}}}},
    }));
    *property(schemas, "ChatRequest", "tool_choice") = nullable(json!({"anyOf": [
        {"type": "string", "enum": ["none", "auto", "required"]},
        {"type": "object", "required": ["function"], "properties": {
            "type": {"enum": ["function", null]},
            "function": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string", "minLength": 1}}}}},
    ]}));
}

/// `parameters.grammar` (and OpenAI's `response_format` in TGI's form): the forms
/// [`wick_grammar::Grammar::from_tgi`] reads.
fn grammar_schema() -> Value {
    json!({"anyOf": [
        {"type": "object", "required": ["type", "value"], "properties": {
            "type": {"type": "string", "enum": ["json", "json_object"]},
            "value": {
                "description": "A JSON schema, as an object or as JSON text",
                "anyOf": [{"type": "object"}, {"type": "string"}]}}},
        {"type": "object", "required": ["type", "value"], "properties": {
            "type": {"type": "string", "enum": ["json_schema"]},
            "value": {"type": "object", "required": ["schema"], "properties": {
                "schema": {"type": "object"}}}}},
        {"type": "object", "required": ["type", "value"], "properties": {
            "type": {"type": "string", "enum": ["regex", "lark"]},
            "value": {"type": "string", "description": "A regular expression or a Lark grammar"}}},
    ]})
}

/// `schema`, or null.
fn nullable(schema: Value) -> Value {
    json!({"anyOf": [schema, {"type": "null"}]})
}

/// Unsigned integers as their range: utoipa writes a u32 as `format: int32` and a u64 as
/// `int64`, which are signed (2^31 would be out of range for a client, but wick takes it).
fn unsigned_ranges(schemas: &mut Value) {
    each_property(schemas, |_, property| {
        let Some(object) = property.as_object_mut() else {
            return;
        };
        if object.get("minimum").and_then(Value::as_f64) != Some(0.0) {
            return;
        }
        let max = match object.get("format").and_then(Value::as_str) {
            Some("int32") => Value::from(u32::MAX),
            Some("int64") => Value::from(u64::MAX),
            _ => return,
        };
        object.remove("format");
        object.entry("maximum").or_insert(max);
    });
}

/// A logprob is null in JSON when it is -inf (a token its distribution did not allow: JSON has
/// no infinity).
fn nullable_logprobs(schemas: &mut Value) {
    each_property(schemas, |name, property| {
        if name == "logprob" && property["type"] == "number" {
            property["type"] = json!(["number", "null"]);
            property["description"] = json!("null for a token of probability 0 (-inf)");
        }
        // OpenAI's legacy `top_logprobs`: token → logprob maps.
        let map_values = property.pointer_mut("/items/additionalProperties");
        if let Some(values) = map_values.filter(|v| name == "top_logprobs" && v["type"] == "number")
        {
            values["type"] = json!(["number", "null"]);
        }
    });
}

fn put_range(property: &mut Value, range: &Range) {
    if let Some(min) = range.min {
        let key = if range.min_exclusive {
            "exclusiveMinimum"
        } else {
            "minimum"
        };
        put_bound(property, key, min);
    }
    if let Some(max) = range.max {
        let key = if range.max_exclusive {
            "exclusiveMaximum"
        } else {
            "maximum"
        };
        put_bound(property, key, max);
    }
}

fn put_bound(property: &mut Value, key: &str, bound: f64) {
    let integer = match &property["type"] {
        Value::String(t) => t == "integer",
        Value::Array(types) => types.iter().any(|t| t == "integer"),
        _ => false,
    };
    property[key] = if integer {
        (bound as i64).into()
    } else {
        bound.into()
    };
}

/// One server-sent event carrying `payload` as JSON in its `data` (or OpenAI's `[DONE]`).
fn sse_event(payload: Value) -> Value {
    json!({"type": "object", "required": ["data"], "properties": {
        "data": {"anyOf": [
            {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
            {"type": "string", "enum": ["[DONE]"]},
        ]},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    }})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_post_route_documents_its_errors_and_both_bodies() {
        let limits = Limits {
            validation: crate::validation::ValidationConfig {
                max_best_of: 2,
                max_stop_sequences: 4,
                max_top_n_tokens: 5,
                max_input_tokens: 10,
                max_total_tokens: 16,
                workers: 1,
            },
            max_client_batch_size: 4,
            api_key: false,
        };
        let doc = document(&limits);
        let generate = &doc["components"]["schemas"]["GenerateParameters"]["properties"];
        assert_eq!(generate["best_of"]["maximum"], 1);
        assert_eq!(generate["stop"]["maxItems"], 4);
        assert_eq!(generate["max_new_tokens"]["maximum"], 15);
        let paths = doc["paths"].as_object().unwrap();
        for (path, item) in paths {
            let Some(post) = item.get("post") else {
                continue;
            };
            let responses = post["responses"].as_object().unwrap();
            for status in ["200", "400", "413", "415", "422"] {
                assert!(responses.contains_key(status), "POST {path}: no {status}");
            }
            for (status, response) in responses {
                let Some(sse) = response["content"].get("text/event-stream") else {
                    continue;
                };
                // Each event: `data` holds JSON of the payload's schema (or `[DONE]`).
                let data = &sse["schema"]["properties"]["data"]["anyOf"];
                assert_eq!(
                    data[0]["contentMediaType"], "application/json",
                    "{path} {status}"
                );
                assert!(data[0]["contentSchema"].is_object(), "{path} {status}");
            }
        }
        for path in ["/", "/v1/chat/completions", "/v1/completions"] {
            let content = &paths[path]["post"]["responses"]["200"]["content"];
            assert!(content.get("application/json").is_some(), "{path}");
            assert!(content.get("text/event-stream").is_some(), "{path}");
        }
    }
}
