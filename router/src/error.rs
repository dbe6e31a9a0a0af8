//! The HTTP layer's errors and their one mapping to responses: TGI's `{"error","error_type"}`
//! on the native routes, OpenAI's `{"error":{"message","type","param","code"}}` on `/v1/*`.
//! Body rejections (malformed JSON, wrong content type, oversized bodies) go through the same
//! mapping via [`ApiJson`], never axum's plain-text defaults.

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::{DeserializeOwned, IgnoredAny};

use crate::chat_template::TemplateError;
use crate::types::objects::Object;
use crate::types::{ErrorResponse, OpenAiError, OpenAiErrorResponse};
use crate::validation::ValidationError;
use wick_scheduler::metrics;
use wick_scheduler::request::InferError;

/// Which API family answers: decides the error body's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Native,
    OpenAi,
}

impl Api {
    /// `/v1/*` is OpenAI's; everything else is TGI's.
    pub fn from_path(path: &str) -> Api {
        if path.starts_with("/v1/") {
            Api::OpenAi
        } else {
            Api::Native
        }
    }
}

/// Everything a route can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Input validation error: {0}")]
    Validation(#[from] ValidationError),
    #[error("{0}")]
    Infer(#[from] InferError),
    #[error("Template error: {0}")]
    Template(#[from] TemplateError),
    #[error("unhealthy")]
    Unhealthy,
    #[error("Unauthorized")]
    Unauthorized,
    #[error("Number of prompts exceeds the maximum allowed batch size of {0}")]
    BatchSizeExceeded(usize),
    #[error("`n` must be >= 1 and <= {0}. Given: {1}")]
    N(usize, usize),
    #[error("Suffix is not supported and can be achieved by preprocessing the prompt.")]
    SuffixNotSupported,
    #[error("Tool error: {0}")]
    Tool(String),
    /// A request body axum could not accept (syntax, shape, content type, size).
    #[error("{message}")]
    Body { status: StatusCode, message: String },
    /// Stream ended without its final event.
    #[error("Incomplete generation stream")]
    IncompleteStream,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Validation(_)
            | ApiError::Template(_)
            | ApiError::BatchSizeExceeded(_)
            | ApiError::N(..)
            | ApiError::SuffixNotSupported
            | ApiError::Tool(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Infer(e) => match e {
                InferError::Overloaded => StatusCode::TOO_MANY_REQUESTS,
                InferError::GenerationError(_) => StatusCode::FAILED_DEPENDENCY,
                InferError::IncompleteGeneration | InferError::IncompleteGenerationStream => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                InferError::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            },
            ApiError::Unhealthy => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Body { status, .. } => *status,
            ApiError::IncompleteStream => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// TGI's `error_type`.
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::Validation(_) | ApiError::N(..) => "validation",
            ApiError::Infer(e) => e.error_type(),
            ApiError::Template(_) => "template_error",
            ApiError::Unhealthy => "healthcheck",
            ApiError::Unauthorized => "unauthorized",
            ApiError::BatchSizeExceeded(_) => "batch size exceeded",
            ApiError::SuffixNotSupported => "suffix not supported",
            ApiError::Tool(_) => "tool_error",
            ApiError::Body { status, .. } => match *status {
                StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
                StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
                StatusCode::UNPROCESSABLE_ENTITY => "validation",
                _ => "bad_request",
            },
            ApiError::IncompleteStream => "incomplete_generation_stream",
        }
    }

    /// The `err` label of `tgi_request_failure`, when the failure counts as a request failure.
    fn failure_label(&self) -> Option<&'static str> {
        match self {
            ApiError::Validation(_)
            | ApiError::N(..)
            | ApiError::BatchSizeExceeded(_)
            | ApiError::SuffixNotSupported
            | ApiError::Tool(_) => Some("validation"),
            ApiError::Template(_) => Some("template"),
            ApiError::Infer(e) => Some(match e {
                InferError::Overloaded => "overloaded",
                InferError::GenerationError(_) => "generation",
                InferError::IncompleteGeneration | InferError::IncompleteGenerationStream => {
                    "incomplete"
                }
                InferError::DeadlineExceeded(_) => "deadline",
            }),
            ApiError::IncompleteStream => Some("incomplete"),
            ApiError::Unhealthy | ApiError::Unauthorized | ApiError::Body { .. } => None,
        }
    }

    /// Counts this error in `tgi_request_failure`.
    pub fn record(&self) {
        if let Some(label) = self.failure_label() {
            ::metrics::counter!(metrics::REQUEST_FAILURE, "err" => label).increment(1);
        }
    }

    /// TGI's body.
    pub fn native_body(&self) -> ErrorResponse {
        ErrorResponse {
            error: self.to_string(),
            error_type: self.error_type().to_string(),
        }
    }

    /// OpenAI's body.
    pub fn openai_body(&self) -> OpenAiErrorResponse {
        let status = self.status();
        let kind = match status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() || s == StatusCode::FAILED_DEPENDENCY => "server_error",
            _ => "invalid_request_error",
        };
        OpenAiErrorResponse {
            error: OpenAiError {
                message: self.to_string(),
                kind: kind.to_string(),
                param: None,
                code: Some(self.error_type().to_string()),
            },
        }
    }

    pub fn with_api(self, api: Api) -> HttpError {
        HttpError { api, error: self }
    }
}

/// An [`ApiError`] bound to the API family that answers it: the one `IntoResponse` mapping.
#[derive(Debug)]
pub struct HttpError {
    pub api: Api,
    pub error: ApiError,
}

impl HttpError {
    pub fn native(error: impl Into<ApiError>) -> Self {
        error.into().with_api(Api::Native)
    }

    pub fn openai(error: impl Into<ApiError>) -> Self {
        error.into().with_api(Api::OpenAi)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        self.error.record();
        let status = self.error.status();
        let mut response = match self.api {
            Api::Native => (status, Json(self.error.native_body())).into_response(),
            Api::OpenAi => (status, Json(self.error.openai_body())).into_response(),
        };
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// `axum::Json` whose rejections answer in the route's JSON error shape, and whose body must be
/// an object (derived structs would also read an array as their fields).
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let api = Api::from_path(req.uri().path());
        if !json_content_type(req.headers()) {
            return Err(ApiError::Body {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                message: "Expected request with `Content-Type: application/json`".into(),
            }
            .with_api(api));
        }
        let bytes = match Bytes::from_request(req, state).await {
            Ok(bytes) => bytes,
            Err(rejection) => {
                let status = rejection.status();
                let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "Request body is larger than the payload limit".to_string()
                } else {
                    rejection.body_text()
                };
                return Err(ApiError::Body { status, message }.with_api(api));
            }
        };
        match Json::<Object<T>>::from_bytes(&bytes) {
            Ok(Json(Object(value))) => Ok(ApiJson(value)),
            // `[` is refused as an array (a data error) before its end is read: a body that is
            // not JSON at all is a syntax error (400), whatever its first character.
            Err(JsonRejection::JsonDataError(_))
                if serde_json::from_slice::<IgnoredAny>(&bytes).is_err() =>
            {
                let rejection =
                    Json::<IgnoredAny>::from_bytes(&bytes).expect_err("the body is not JSON");
                Err(body_rejection(rejection).with_api(api))
            }
            Err(rejection) => Err(body_rejection(rejection).with_api(api)),
        }
    }
}

/// `application/json` or `application/*+json`, as `axum::Json` asks.
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json")
            || subtype.len() > 5 && subtype[subtype.len() - 5..].eq_ignore_ascii_case("+json"))
}

fn body_rejection(rejection: JsonRejection) -> ApiError {
    let status = rejection.status();
    let message = match &rejection {
        JsonRejection::MissingJsonContentType(_) => {
            "Expected request with `Content-Type: application/json`".to_string()
        }
        _ if status == StatusCode::PAYLOAD_TOO_LARGE => {
            "Request body is larger than the payload limit".to_string()
        }
        _ => rejection.body_text(),
    };
    ApiError::Body { status, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{to_bytes, Body};
    use axum::routing::post;
    use axum::Router;
    use tower::ServiceExt;

    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Payload {
        inputs: String,
    }

    async fn echo(ApiJson(p): ApiJson<Payload>) -> String {
        p.inputs
    }

    fn app() -> Router {
        Router::new()
            .route("/generate", post(echo))
            .route("/v1/completions", post(echo))
            .layer(axum::extract::DefaultBodyLimit::max(64))
    }

    async fn call(
        path: &str,
        content_type: Option<&str>,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = Request::post(path);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = app()
            .oneshot(req.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    #[tokio::test]
    async fn rejections_are_json_in_the_route_shape() {
        let json = Some("application/json");
        let (s, b) = call("/generate", json, "{").await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(b["error_type"], "bad_request");
        assert!(b["error"].as_str().unwrap().len() > 5);

        let (s, b) = call("/generate", json, r#"{"inputs":1}"#).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(b["error_type"], "validation");

        let (s, b) = call("/generate", None, r#"{"inputs":"a"}"#).await;
        assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(b["error_type"], "unsupported_media_type");

        let big = format!(r#"{{"inputs":"{}"}}"#, "a".repeat(100));
        let (s, b) = call("/generate", json, &big).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(b["error_type"], "payload_too_large");

        let (s, b) = call("/v1/completions", json, "{").await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["code"], "bad_request");
        assert!(b["error"]["param"].is_null());

        let (s, _) = call("/generate", json, r#"{"inputs":"ok"}"#).await;
        assert_eq!(s, StatusCode::OK);
    }

    #[test]
    fn statuses_and_types_follow_tgi() {
        let v = ApiError::from(ValidationError::EmptyInput);
        assert_eq!(v.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            v.to_string(),
            "Input validation error: `inputs` cannot be empty"
        );
        assert_eq!(v.error_type(), "validation");
        let o = ApiError::from(InferError::Overloaded);
        assert_eq!(o.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(o.error_type(), "overloaded");
        assert_eq!(o.to_string(), "Model is overloaded");
        let g = ApiError::from(InferError::GenerationError("boom".into()));
        assert_eq!(g.status(), StatusCode::FAILED_DEPENDENCY);
        assert_eq!(
            g.to_string(),
            "Request failed during generation: Server error: boom"
        );
        assert_eq!(
            ApiError::Unhealthy.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let b = ApiError::BatchSizeExceeded(4);
        assert_eq!(b.native_body().error_type, "batch size exceeded");
        assert_eq!(
            b.to_string(),
            "Number of prompts exceeds the maximum allowed batch size of 4"
        );
        let body = serde_json::to_value(o.openai_body()).unwrap();
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert_eq!(body["error"]["message"], "Model is overloaded");
    }
}
