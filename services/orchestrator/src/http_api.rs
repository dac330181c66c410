//! The public API over HTTP/JSON, for clients without gRPC (a web backend, curl).
//!
//! Each route calls the gRPC service's own method, so a job sent here is the same job: the same
//! validation, admission, tenant quota, deadline and bytes. Bodies are the protobuf JSON mapping
//! of the gRPC messages (what grpcurl speaks: camelCase or proto field names, 64-bit integers
//! and bytes as strings, bytes in base64):
//!
//! - `POST /v1/generate`: a GenerateRequest; answers a GenerateResponse, or with `Accept:
//!   image/png` or `image/jpeg` the one image itself (its seed in `x-sdmesh-seed`), so
//!   `curl -o out.png` just works.
//! - `POST /v1/generate/stream`: a GenerateRequest; answers Server-Sent Events, one
//!   GenerateEvent each (waiting, progress, then the result), or an `error` event.
//! - `GET /v1/models`: the ListModelsResponse; 503 until the model services have answered.
//! - `GET /v1/openapi.json`: the OpenAPI 3.1 document of these routes (`openapi`).
//!
//! Request headers are the gRPC metadata: `x-sdmesh-tenant`, `x-sdmesh-priority`,
//! `grpc-timeout` (e.g. `30S`) and `traceparent`. An error is `{"error": {"code": HTTP,
//! "status": "RESOURCE_EXHAUSTED", "message": ...}}` with the HTTP status of its gRPC code (400
//! for the caller's mistakes, 429 with `Retry-After` for backpressure, 503 for a retryable
//! outage, 504 past the deadline).

use crate::server::OrchestratorService;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sdmesh_proto::v1;
use sdmesh_proto::v1::orchestrator_server::Orchestrator;
use tokio_stream::StreamExt;

/// The routes over `service`; bodies up to `max_body_bytes` (the JSON of the largest request
/// the gRPC API takes: base64 is 4/3 of the bytes).
pub fn router(service: OrchestratorService, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/generate", post(generate))
        .route("/v1/generate/stream", post(generate_stream))
        .route("/v1/models", get(list_models))
        .route("/v1/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(service)
}

/// The body as a GenerateRequest, with the headers as its metadata.
fn request(headers: HeaderMap, body: &[u8]) -> Result<tonic::Request<v1::GenerateRequest>, tonic::Status> {
    let message: v1::GenerateRequest = serde_json::from_slice(body).map_err(|e| {
        tonic::Status::invalid_argument(format!("the body is not a GenerateRequest in JSON (proto3 mapping): {e}"))
    })?;
    let mut request = tonic::Request::new(message);
    *request.metadata_mut() = tonic::metadata::MetadataMap::from_headers(headers);
    Ok(request)
}

/// The image format an `Accept` header asks for, when it asks for an image.
fn accepts_image(headers: &HeaderMap) -> Option<v1::ImageFormat> {
    let accept = headers.get(axum::http::header::ACCEPT)?.to_str().ok()?;
    if accept.contains("image/png") {
        Some(v1::ImageFormat::Png)
    } else if accept.contains("image/jpeg") {
        Some(v1::ImageFormat::Jpeg)
    } else {
        None
    }
}

async fn generate(State(service): State<OrchestratorService>, headers: HeaderMap, body: Bytes) -> Response {
    let raw = accepts_image(&headers);
    let mut request = match request(headers, &body) {
        Ok(r) => r,
        Err(status) => return error(&status),
    };
    if let Some(format) = raw {
        let message = request.get_mut();
        if message.num_images.unwrap_or(1) != 1 {
            return error(&tonic::Status::invalid_argument(
                "num_images: an Accept of image/png or image/jpeg returns one image; ask for JSON for several",
            ));
        }
        message.image_format = format.into();
    }
    let response = match service.generate(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return error(&status),
    };
    let Some(format) = raw else { return Json(response).into_response() };
    let seed = response.seed;
    let Some(image) = response.images.into_iter().next() else {
        return error(&tonic::Status::internal("the job returned no image"));
    };
    let (content_type, bytes) = match format {
        v1::ImageFormat::Jpeg => ("image/jpeg", image.jpeg),
        _ => ("image/png", image.png),
    };
    let mut headers = HeaderMap::new();
    headers.insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert("x-sdmesh-seed", HeaderValue::from(seed));
    headers.insert("x-sdmesh-flagged", HeaderValue::from_static(if image.flagged { "true" } else { "false" }));
    (headers, bytes).into_response()
}

async fn generate_stream(State(service): State<OrchestratorService>, headers: HeaderMap, body: Bytes) -> Response {
    let request = match request(headers, &body) {
        Ok(r) => r,
        Err(status) => return error(&status),
    };
    let events = match service.generate_stream(request).await {
        Ok(events) => events.into_inner(),
        Err(status) => return error(&status),
    };
    // Dropping the response (the client went away) drops the gRPC stream, which stops the job.
    let events = events.map(|event| {
        Ok::<_, std::convert::Infallible>(match event {
            Ok(event) => Event::default()
                .json_data(&event)
                .unwrap_or_else(|e| error_event(&tonic::Status::internal(e.to_string()))),
            Err(status) => error_event(&status),
        })
    });
    Sse::new(events).into_response()
}

async fn list_models(State(service): State<OrchestratorService>, headers: HeaderMap) -> Response {
    let mut request = tonic::Request::new(v1::ListModelsRequest {});
    *request.metadata_mut() = tonic::metadata::MetadataMap::from_headers(headers);
    match service.list_models(request).await {
        Ok(response) => Json(response.into_inner()).into_response(),
        Err(status) => error(&status),
    }
}

/// For load balancers that cannot ask gRPC health: 200 while the orchestrator takes jobs, 503
/// while it waits for its model services or drains.
async fn healthz(State(service): State<OrchestratorService>) -> Response {
    match service.ready() {
        true => (StatusCode::OK, Json(serde_json::json!({"status": "SERVING"}))).into_response(),
        false => (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"status": "NOT_SERVING"}))).into_response(),
    }
}

async fn openapi() -> Json<&'static serde_json::Value> {
    Json(crate::openapi::document())
}

/// The HTTP status of a gRPC code (as Google's HTTP APIs map them).
pub fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code;
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        // nginx's "client closed request": the caller went away.
        Code::Cancelled => StatusCode::from_u16(499).expect("a valid status"),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// `ResourceExhausted` -> `RESOURCE_EXHAUSTED`, as gRPC names the codes.
pub(crate) fn status_name(code: tonic::Code) -> String {
    let mut name = String::new();
    for (i, ch) in format!("{code:?}").chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(ch.to_ascii_uppercase());
    }
    name
}

pub(crate) fn error_body(status: &tonic::Status) -> serde_json::Value {
    serde_json::json!({"error": {
        "code": http_status(status.code()).as_u16(),
        "status": status_name(status.code()),
        "message": status.message(),
    }})
}

/// An error response; backpressure says when to retry (`Retry-After`, whole seconds), and a
/// call without a good API key what to send (`WWW-Authenticate`).
fn error(status: &tonic::Status) -> Response {
    let mut response = (http_status(status.code()), Json(error_body(status))).into_response();
    if status.code() == tonic::Code::Unauthenticated {
        response.headers_mut().insert("www-authenticate", HeaderValue::from_static("Bearer"));
    }
    if let Some(after) = sdmesh_core::retry_after(status) {
        let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        response.headers_mut().insert("retry-after", HeaderValue::from(seconds.max(1)));
    }
    response
}

fn error_event(status: &tonic::Status) -> Event {
    Event::default().event("error").data(error_body(status).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_http_statuses_and_names() {
        assert_eq!(http_status(tonic::Code::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(tonic::Code::ResourceExhausted), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(http_status(tonic::Code::Unavailable), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(http_status(tonic::Code::DeadlineExceeded), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(http_status(tonic::Code::Cancelled).as_u16(), 499);
        assert_eq!(status_name(tonic::Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(status_name(tonic::Code::Ok), "OK");
        assert_eq!(status_name(tonic::Code::DataLoss), "DATA_LOSS");
    }

    #[test]
    fn backpressure_says_when_to_retry() {
        let status: tonic::Status = sdmesh_core::Error::ResourceExhausted {
            message: "busy".into(),
            retry_after: std::time::Duration::from_millis(1500),
        }
        .into();
        let response = error(&status);
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["retry-after"], "2");
        let body = error_body(&status);
        assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED");
        assert_eq!(body["error"]["message"], "busy");
    }
}
