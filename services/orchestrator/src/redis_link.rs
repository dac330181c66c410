//! One connection to Redis for one use (the prompt-embedding cache, the fleet-wide tenant
//! quota), kept so that an outage costs jobs as little as possible.
//!
//! Every operation is bounded by a short timeout, and a failure (down, slow, refused) is
//! `None` to the caller, which goes on without Redis in its own way. The first failure of an
//! outage logs one warning and the recovery one info line; each failure is counted by the
//! use's metric. While Redis is down, reconnection is tried at most once per `retry_interval`,
//! so an outage costs jobs no timeouts beyond the first.

use redis::aio::MultiplexedConnection;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://[user:password@]host:port/db` (or `rediss://`).
    pub url: String,
    /// Bound on each connect and command.
    pub timeout: Duration,
    /// Expiry of each cached embedding; None keeps entries until Redis evicts them (maxmemory
    /// policy). Unused by the tenant quota.
    pub ttl: Option<Duration>,
    /// Least time between two connection attempts while Redis is unreachable.
    pub retry_interval: Duration,
}

/// What a link is for: how its failures are logged and counted.
pub struct Use {
    /// What goes on without Redis, for the outage's warning: "computing prompt embeddings
    /// without the cache".
    pub meanwhile: &'static str,
    /// What is back in use, for the recovery's log line: "embedding cache".
    pub name: &'static str,
    /// Counts one failed operation ("connect", "get", ...).
    pub count_failure: fn(&'static str),
}

pub struct RedisLink {
    client: redis::Client,
    opts: RedisOptions,
    purpose: Use,
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

impl RedisLink {
    /// Checks the URL only: Redis need not be up yet (the link connects on first use).
    pub fn new(opts: RedisOptions, purpose: Use) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(opts.url.as_str())?;
        let redacted_url = sdmesh_core::redact_url(&opts.url);
        Ok(Self {
            client,
            opts,
            purpose,
            redacted_url,
            live: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(None),
            down: AtomicBool::new(false),
            errors: AtomicU64::new(0),
        })
    }

    pub fn options(&self) -> &RedisOptions {
        &self.opts
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

    /// Runs one command with the timeout; None when it failed. A failure drops the connection
    /// (the next use reconnects, after `retry_interval`).
    pub async fn query<T: redis::FromRedisValue>(&self, what: &'static str, cmd: redis::Cmd) -> Option<T> {
        let mut connection = self.connection().await?;
        let error = match tokio::time::timeout(self.opts.timeout, cmd.query_async::<T>(&mut connection)).await {
            Ok(Ok(value)) => {
                if self.down.swap(false, Ordering::SeqCst) {
                    tracing::info!(url = %self.redacted_url, "redis is reachable again: {} back in use", self.purpose.name);
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
        (self.purpose.count_failure)(operation);
        self.errors.fetch_add(1, Ordering::Relaxed);
        if !self.down.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                url = %self.redacted_url,
                "redis {operation} failed ({error}); {} until it is back", self.purpose.meanwhile
            );
        } else {
            tracing::debug!(url = %self.redacted_url, "redis {operation} failed: {error}");
        }
    }
}
