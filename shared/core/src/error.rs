//! One error type for every component, mapped exhaustively to gRPC status codes.
//! A status received from a remote service keeps its code, so the orchestrator can tell a
//! caller's mistake from a retryable failure.

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller's mistake: the message says what was wrong and what is allowed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request is fine but this deployment cannot run it (e.g. inpainting on a txt2img
    /// checkpoint, depth2img with no depth service): the message says what is missing.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Backpressure: the queue is full; retry after about `retry_after` (sent to the client as
    /// a google.rpc.RetryInfo detail).
    #[error("{message}")]
    ResourceExhausted { message: String, retry_after: std::time::Duration },
    /// The component is going away or not ready: retry elsewhere.
    #[error("{0}")]
    Unavailable(String),
    /// A status from a remote service, code kept as it came.
    #[error("{}: {}", .0.code(), .0.message())]
    Remote(tonic::Status),
    /// A bug or a broken model: never the caller's fault.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    pub fn failed_precondition(msg: impl Into<String>) -> Self {
        Self::FailedPrecondition(msg.into())
    }

    pub fn internal(msg: impl std::fmt::Display) -> Self {
        Self::Internal(msg.to_string())
    }

    pub fn code(&self) -> tonic::Code {
        match self {
            Error::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::ResourceExhausted { .. } => tonic::Code::ResourceExhausted,
            Error::Unavailable(_) => tonic::Code::Unavailable,
            Error::Remote(s) => s.code(),
            Error::Internal(_) => tonic::Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Remote(s) => s,
            Error::ResourceExhausted { message, retry_after } => {
                use tonic_types::{ErrorDetails, StatusExt};
                tonic::Status::with_error_details(
                    tonic::Code::ResourceExhausted,
                    message,
                    ErrorDetails::with_retry_info(Some(retry_after)),
                )
            }
            other => tonic::Status::new(other.code(), other.to_string()),
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Remote(s)
    }
}

impl From<sdmesh_proto::TensorError> for Error {
    fn from(e: sdmesh_proto::TensorError) -> Self {
        Error::Remote(e.into())
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Internal(e.to_string())
    }
}

/// The retry delay a RESOURCE_EXHAUSTED status suggests, if it carries one.
pub fn retry_after(status: &tonic::Status) -> Option<std::time::Duration> {
    use tonic_types::StatusExt;
    status.get_details_retry_info()?.retry_delay
}
