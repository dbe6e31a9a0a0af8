//! The OpenAPI document served at `/api-doc/openapi.json` (Swagger UI at `/docs`).

use utoipa::OpenApi;

use crate::types::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta,
    ChatLogprob, ChatLogprobs, ChatMessage, ChatRequest, CompatGenerateRequest, Completion,
    CompletionChoice, CompletionLogprobs, CompletionRequest, ContentPart, Details, ErrorResponse,
    FinishReason, GenerateParameters, GenerateRequest, GenerateResponse, ImageUrl, Info,
    MessageContent, ModelCard, ModelList, OpenAiError, OpenAiErrorResponse, PrefillToken, Prompt,
    SimpleToken, StopSpec, StreamDetails, StreamOptions, StreamResponse, Token, ToolCall,
    ToolCallDelta, ToolFunction, ToolFunctionDelta, TopLogprob, Usage,
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
        ToolFunction, ToolCallDelta, ToolFunctionDelta,
    )),
    tags(
        (name = "Text Generation Inference", description = "TGI's native API"),
        (name = "OpenAI", description = "OpenAI-compatible API"),
    ),
    info(title = "wick-router", description = "wick's HTTP API: TGI native routes and OpenAI-compatible routes")
)]
pub struct ApiDoc;
