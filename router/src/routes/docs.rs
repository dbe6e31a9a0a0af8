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

/// The document as served: [`ApiDoc`] with every `text/event-stream` body described as its
/// events (OpenAPI's reading of a stream: each event an object whose `data` holds JSON of the
/// documented schema, or OpenAI's closing `[DONE]`).
pub(crate) fn document() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::RefOr;
    let mut doc = ApiDoc::openapi();
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
        let doc = serde_json::to_value(document()).unwrap();
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
