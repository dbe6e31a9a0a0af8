//! The OpenAPI document served at `/api-doc/openapi.json` (Swagger UI at `/docs`).

use utoipa::OpenApi;

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
}

/// The document as served: [`ApiDoc`] with this deployment's limits as bounds (so a request
/// the schema accepts is refused only for a limit no schema can state: prompt plus new tokens
/// within `max_total_tokens`), and every `text/event-stream` body described as its events
/// (OpenAPI's reading of a stream: each event an object whose `data` holds JSON of the
/// documented schema, or OpenAI's closing `[DONE]`).
pub(crate) fn document(limits: &Limits) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::RefOr;
    let mut doc = ApiDoc::openapi();
    if let Some(components) = doc.components.as_mut() {
        let v = &limits.validation;
        let new_tokens = v.max_total_tokens.saturating_sub(1) as f64;
        let bounds: [(&str, &str, &str, f64); 11] = [
            (
                "GenerateParameters",
                "best_of",
                "maximum",
                v.max_best_of as f64,
            ),
            (
                "GenerateParameters",
                "top_n_tokens",
                "maximum",
                v.max_top_n_tokens as f64,
            ),
            (
                "GenerateParameters",
                "stop",
                "maxItems",
                v.max_stop_sequences as f64,
            ),
            (
                "GenerateParameters",
                "max_new_tokens",
                "maximum",
                new_tokens,
            ),
            (
                "GenerateParameters",
                "truncate",
                "maximum",
                v.max_input_tokens as f64,
            ),
            (
                "ChatRequest",
                "n",
                "maximum",
                limits.max_client_batch_size as f64,
            ),
            (
                "ChatRequest",
                "top_logprobs",
                "maximum",
                v.max_top_n_tokens as f64,
            ),
            ("ChatRequest", "max_tokens", "maximum", new_tokens),
            (
                "CompletionRequest",
                "n",
                "maximum",
                limits.max_client_batch_size as f64,
            ),
            (
                "CompletionRequest",
                "logprobs",
                "maximum",
                v.max_top_n_tokens as f64,
            ),
            ("CompletionRequest", "max_tokens", "maximum", new_tokens),
        ];
        for (schema, field, keyword, value) in bounds {
            let Some(RefOr::T(utoipa::openapi::Schema::Object(object))) =
                components.schemas.get_mut(schema)
            else {
                continue;
            };
            use utoipa::openapi::Schema;
            match object.properties.get_mut(field) {
                Some(RefOr::T(Schema::Array(array))) if keyword == "maxItems" => {
                    array.max_items = Some(value as usize);
                }
                Some(RefOr::T(Schema::Object(property))) => {
                    // Integer bounds as integers: a float bound makes generators send `1.0`.
                    property.maximum = Some(utoipa::Number::UInt(value as usize));
                    if field == "n" {
                        property.minimum = Some(utoipa::Number::UInt(1));
                    }
                }
                _ => {}
            }
        }
    }
    for item in doc.paths.paths.values_mut() {
        for operation in [&mut item.get, &mut item.post].into_iter().flatten() {
            for response in operation.responses.responses.values_mut() {
                let RefOr::T(response) = response else {
                    continue;
                };
                if let Some(RefOr::T(content)) = response.content.get_mut("text/event-stream") {
                    if let Some(payload) = content.schema.take() {
                        content.schema = Some(sse_event(payload).into());
                    }
                }
            }
        }
    }
    doc
}

/// One server-sent event carrying `payload` as JSON in its `data`.
fn sse_event(payload: utoipa::openapi::RefOr<utoipa::openapi::Schema>) -> utoipa::openapi::Schema {
    use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Type};
    let string = || ObjectBuilder::new().schema_type(Type::String);
    let json = string()
        .content_media_type("application/json")
        .content_schema(Some(payload));
    let done = string().enum_values(Some(["[DONE]"]));
    let data = AnyOfBuilder::new().item(json).item(done);
    ObjectBuilder::new()
        .property("data", data)
        .required("data")
        .property("event", string())
        .property("id", string())
        .property("retry", ObjectBuilder::new().schema_type(Type::Integer))
        .into()
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
        };
        let doc = serde_json::to_value(document(&limits)).unwrap();
        let generate = &doc["components"]["schemas"]["GenerateParameters"]["properties"];
        assert_eq!(generate["best_of"]["maximum"], 2);
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
