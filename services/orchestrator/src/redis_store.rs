//! Prompt embeddings in Redis, shared by every orchestrator that points at it.
//!
//! Redis is an optimisation, never a dependency: every operation is bounded by a short
//! timeout, and a failure (down, slow, refused) makes the caller compute the embedding as if
//! it were a miss. The first failure of an outage logs one warning and the recovery one info
//! line; each failure counts in `sdmesh_embedding_cache_errors_total`. While Redis is down,
//! reconnection is tried at most once per `retry_interval`, so an outage costs jobs no
//! timeouts beyond the first.

use crate::embedding_cache::EmbeddingStore;
use redis::aio::MultiplexedConnection;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://[user:password@]host:port/db` (or `rediss://`).
    pub url: String,
    /// Bound on each connect, GET and SET.
    pub timeout: Duration,
    /// Expiry of each entry; None keeps entries until Redis evicts them (maxmemory policy).
    pub ttl: Option<Duration>,
    /// Least time between two connection attempts while Redis is unreachable.
    pub retry_interval: Duration,
}

pub struct RedisStore {
    client: redis::Client,
    opts: RedisOptions,
    /// The url without its password, for logs.
    redacted_url: String,
    live: Mutex<Option<MultiplexedConnection>>,
    /// Held while connecting; holds the instant before which no new attempt is made (set
    /// after a failure).
    connecting: tokio::sync::Mutex<Option<Instant>>,
    /// True from the first failure of an outage to the next success.
    down: AtomicBool,
    errors: AtomicU64,
}

impl RedisStore {
    /// Checks the URL only: Redis need not be up yet (the store connects on first use).
    pub fn new(opts: RedisOptions) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(opts.url.as_str())?;
        let redacted_url = sdmesh_core::redact_url(&opts.url);
        Ok(Self {
            client,
            opts,
            redacted_url,
            live: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(None),
            down: AtomicBool::new(false),
            errors: AtomicU64::new(0),
        })
    }

    /// Failed operations since start.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn live(&self) -> Option<MultiplexedConnection> {
        self.live.lock().ok()?.clone()
    }

    /// The live connection, connecting when allowed; None while Redis is known to be down.
    async fn connection(&self) -> Option<MultiplexedConnection> {
        if let Some(live) = self.live() {
            return Some(live);
        }
        // One connection attempt at a time; others skip Redis meanwhile instead of queueing.
        let mut not_before = self.connecting.try_lock().ok()?;
        if let Some(live) = self.live() {
            return Some(live);
        }
        if not_before.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.opts.timeout))
            .set_response_timeout(Some(self.opts.timeout));
        let connecting = self.client.get_multiplexed_async_connection_with_config(&config);
        let error = match tokio::time::timeout(self.opts.timeout, connecting).await {
            Ok(Ok(connection)) => {
                *not_before = None;
                if let Ok(mut live) = self.live.lock() {
                    *live = Some(connection.clone());
                }
                return Some(connection);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("timed out after {:?}", self.opts.timeout),
        };
        *not_before = Some(Instant::now() + self.opts.retry_interval);
        drop(not_before);
        self.failed("connect", &error);
        None
    }

    /// Runs one command with the timeout; a failure drops the connection (the next use
    /// reconnects, after `retry_interval`).
    async fn query<T: redis::FromRedisValue>(&self, what: &'static str, cmd: redis::Cmd) -> Option<T> {
        let mut connection = self.connection().await?;
        let error = match tokio::time::timeout(self.opts.timeout, cmd.query_async::<T>(&mut connection)).await {
            Ok(Ok(value)) => {
                if self.down.swap(false, Ordering::SeqCst) {
                    tracing::info!(url = %self.redacted_url, "redis is reachable again: embedding cache back in use");
                }
                return Some(value);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("timed out after {:?}", self.opts.timeout),
        };
        if let Ok(mut live) = self.live.lock() {
            *live = None;
        }
        if let Ok(mut not_before) = self.connecting.try_lock() {
            *not_before = Some(Instant::now() + self.opts.retry_interval);
        }
        self.failed(what, &error);
        None
    }

    fn failed(&self, operation: &'static str, error: &str) {
        metrics::counter!("sdmesh_embedding_cache_errors_total", "store" => "redis", "operation" => operation)
            .increment(1);
        self.errors.fetch_add(1, Ordering::Relaxed);
        if !self.down.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                url = %self.redacted_url,
                "redis {operation} failed ({error}); computing prompt embeddings without the cache until it is back"
            );
        } else {
            tracing::debug!(url = %self.redacted_url, "redis {operation} failed: {error}");
        }
    }
}

#[async_trait::async_trait]
impl EmbeddingStore for RedisStore {
    async fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.query::<Option<Vec<u8>>>("get", redis::Cmd::get(key)).await.flatten()
    }

    async fn put(&self, key: &str, value: Vec<u8>) {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value);
        if let Some(ttl) = self.opts.ttl {
            cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
        }
        self.query::<()>("set", cmd).await;
    }
}
