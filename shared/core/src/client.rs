//! Channels to other services.

use crate::{Error, Result};
use std::time::Duration;

pub use crate::replicas::ReplicaSet;

/// A channel to a service's replicas (`target`: one address or several, comma-separated;
/// `dns:///host:port` for every address a name resolves to: see [`crate::replicas`]). It
/// connects lazily: a peer that is not up yet (or went away) fails that call with UNAVAILABLE
/// instead of failing start-up.
pub fn lazy_channel(target: &str) -> Result<ReplicaSet> {
    ReplicaSet::new(target)
}

/// Longest a call keeps retrying a peer that answers RESOURCE_EXHAUSTED.
pub const BACKPRESSURE_PATIENCE: Duration = Duration::from_secs(60);

/// How many times a call that failed with UNAVAILABLE is sent again: at once (to another
/// replica when there is one: the failed one rests), then after 100, 200, 400 and 800 ms.
pub const UNAVAILABLE_RETRIES: u32 = 5;

/// Runs `call`, and again:
/// - while the peer answers RESOURCE_EXHAUSTED, after the suggested delay (google.rpc.RetryInfo,
///   else 100 ms), for at most `patience`: a full queue on a model service slows a job down
///   instead of failing it;
/// - when it fails with UNAVAILABLE (a replica gone, loading or draining), up to
///   [`UNAVAILABLE_RETRIES`] times: every call to a model service is idempotent, so a replica
///   that dies costs a retry, not a job.
pub async fn call_with_retries<T, F, Fut>(patience: Duration, mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    let mut unavailable = 0;
    loop {
        match call().await {
            Err(Error::Remote(status)) if status.code() == tonic::Code::ResourceExhausted => {
                let wait =
                    crate::retry_after(&status).unwrap_or(Duration::from_millis(100)).min(Duration::from_secs(5));
                if tokio::time::Instant::now() + wait > deadline {
                    return Err(Error::Remote(status));
                }
                tracing::debug!(?wait, "peer overloaded: retrying");
                tokio::time::sleep(wait).await;
            }
            Err(Error::Remote(status))
                if status.code() == tonic::Code::Unavailable && unavailable < UNAVAILABLE_RETRIES =>
            {
                unavailable += 1;
                let wait =
                    if unavailable == 1 { Duration::ZERO } else { Duration::from_millis(100 << (unavailable - 2)) };
                tracing::info!(?wait, attempt = unavailable, "peer unavailable, retrying: {}", status.message());
                tokio::time::sleep(wait).await;
            }
            other => return other,
        }
    }
}

/// One unary call to a model service: sent on a clone of `client` with the current trace
/// context, and sent again as [`call_with_retries`] says (patience [`BACKPRESSURE_PATIENCE`]);
/// the response's message. `call` names the method: `|mut c, r| async move { c.info(r).await }`.
pub async fn unary<C, Req, Resp, Fut>(
    client: &C,
    request: &Req,
    call: impl Fn(C, tonic::Request<Req>) -> Fut,
) -> Result<Resp>
where
    C: Clone,
    Req: Clone,
    Fut: std::future::Future<Output = std::result::Result<tonic::Response<Resp>, tonic::Status>>,
{
    call_with_retries(BACKPRESSURE_PATIENCE, || {
        let response = call(client.clone(), crate::telemetry::traced(request.clone()));
        async move { Ok(response.await?.into_inner()) }
    })
    .await
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
        let r = call_with_retries(Duration::from_secs(5), || {
            calls += 1;
            let out = if calls < 3 { Err(overloaded()) } else { Ok(calls) };
            async move { out }
        })
        .await;
        assert_eq!(r.unwrap(), 3);

        let started = std::time::Instant::now();
        let r: Result<()> = call_with_retries(Duration::from_millis(50), || async { Err(overloaded()) }).await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::ResourceExhausted, "gives up after its patience");
        assert!(started.elapsed() < Duration::from_secs(1));

        let mut calls = 0;
        let r: Result<()> = call_with_retries(Duration::from_secs(5), || {
            calls += 1;
            async { Err(Error::invalid("bad")) }
        })
        .await;
        assert_eq!((r.unwrap_err().code(), calls), (tonic::Code::InvalidArgument, 1), "other errors are not retried");
    }

    #[tokio::test]
    async fn unavailable_is_retried_a_few_times_only() {
        let mut calls = 0;
        let r: Result<()> = call_with_retries(Duration::from_secs(5), || {
            calls += 1;
            async { Err(Error::Remote(tonic::Status::unavailable("gone"))) }
        })
        .await;
        assert_eq!((r.unwrap_err().code(), calls), (tonic::Code::Unavailable, 1 + UNAVAILABLE_RETRIES));
    }

    /// A gRPC server (grpc.health.v1) on a free loopback port that counts the calls it serves.
    async fn counting_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_, health) = tonic_health::server::health_reporter();
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = calls.clone();
        let svc = tonic::service::interceptor::InterceptedService::new(health, move |r: tonic::Request<()>| {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(r)
        });
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming));
        (format!("http://{addr}"), calls)
    }

    /// A loopback address nothing listens on.
    fn dead_address() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }

    async fn check(channel: &ReplicaSet) -> Result<i32> {
        call_with_retries(BACKPRESSURE_PATIENCE, || {
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel.clone());
            async move {
                let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
                Ok(client.check(request).await?.into_inner().status)
            }
        })
        .await
    }

    #[tokio::test]
    async fn calls_spread_over_replicas_and_a_dead_one_costs_a_retry() {
        let (a, on_a) = counting_server().await;
        let (b, on_b) = counting_server().await;
        let dead = dead_address();
        let channel = lazy_channel(&format!("{a}, {dead},{b}")).unwrap();
        assert_eq!(channel.replicas(), [a.clone(), dead.clone(), b.clone()]);
        for _ in 0..20 {
            assert_eq!(check(&channel).await.unwrap(), 1, "SERVING");
        }
        let (on_a, on_b) =
            (on_a.load(std::sync::atomic::Ordering::Relaxed), on_b.load(std::sync::atomic::Ordering::Relaxed));
        assert_eq!(on_a + on_b, 20, "every call answered once");
        assert!(on_a >= 8 && on_b >= 8, "spread over both live replicas: {on_a} and {on_b}");

        // Every replica gone: the call fails with UNAVAILABLE naming one, after its retries.
        let err = check(&lazy_channel(&dead).unwrap()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        assert!(err.to_string().contains(&dead), "{err}");
    }

    #[tokio::test]
    async fn dns_targets_are_every_address_of_the_name() {
        let (a, on_a) = counting_server().await;
        let port = a.rsplit_once(':').unwrap().1;
        let channel = lazy_channel(&format!("dns:///localhost:{port}")).unwrap();
        for _ in 0..4 {
            assert_eq!(check(&channel).await.unwrap(), 1);
        }
        assert_eq!(on_a.load(std::sync::atomic::Ordering::Relaxed), 4);
        // localhost is 127.0.0.1, and ::1 where the machine has IPv6 (nothing listens there:
        // that replica rests after its first failure).
        assert!(channel.replicas().contains(&a), "{:?}", channel.replicas());

        let err = check(&lazy_channel("dns:///no-such-host.invalid:1").unwrap()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    }
}
