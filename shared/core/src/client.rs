//! Channels to other services.

use crate::{Error, Result};
use tonic::transport::{Channel, Endpoint};

/// A lazily-connecting channel: the first call connects, and a peer that is not up yet
/// (or went away) fails that call with UNAVAILABLE instead of failing start-up.
pub fn lazy_channel(url: &str) -> Result<Channel> {
    let url = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| Error::invalid(format!("invalid endpoint {url:?}: {e}")))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true);
    Ok(endpoint.connect_lazy())
}

/// Longest a call keeps retrying a peer that answers RESOURCE_EXHAUSTED.
pub const BACKPRESSURE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs `call`, and again after the suggested delay (google.rpc.RetryInfo, else 100 ms) while
/// the peer answers RESOURCE_EXHAUSTED, for at most `patience`: a full queue on a model
/// service slows a job down instead of failing it.
pub async fn retry_when_overloaded<T, F, Fut>(patience: std::time::Duration, mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match call().await {
            Err(Error::Remote(status)) if status.code() == tonic::Code::ResourceExhausted => {
                let wait = crate::retry_after(&status)
                    .unwrap_or(std::time::Duration::from_millis(100))
                    .min(std::time::Duration::from_secs(5));
                if tokio::time::Instant::now() + wait > deadline {
                    return Err(Error::Remote(status));
                }
                tracing::debug!(?wait, "peer overloaded: retrying");
                tokio::time::sleep(wait).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn overloaded() -> Error {
        let e = Error::ResourceExhausted { message: "full".into(), retry_after: Duration::from_millis(5) };
        Error::Remote(tonic::Status::from(e))
    }

    #[tokio::test]
    async fn overloaded_peers_are_retried_after_their_hint_within_patience() {
        let mut calls = 0;
        let r = retry_when_overloaded(Duration::from_secs(5), || {
            calls += 1;
            let out = if calls < 3 { Err(overloaded()) } else { Ok(calls) };
            async move { out }
        })
        .await;
        assert_eq!(r.unwrap(), 3);

        let started = std::time::Instant::now();
        let r: Result<()> = retry_when_overloaded(Duration::from_millis(50), || async { Err(overloaded()) }).await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::ResourceExhausted, "gives up after its patience");
        assert!(started.elapsed() < Duration::from_secs(1));

        let mut calls = 0;
        let r: Result<()> = retry_when_overloaded(Duration::from_secs(5), || {
            calls += 1;
            async { Err(Error::invalid("bad")) }
        })
        .await;
        assert_eq!((r.unwrap_err().code(), calls), (tonic::Code::InvalidArgument, 1), "other errors are not retried");
    }
}
