//! Prompt embeddings in Redis, shared by every orchestrator that points at it.
//!
//! Redis is an optimisation, never a dependency: a failed or slow operation (see
//! [`RedisLink`]) makes the caller compute the embedding as if it were a miss. Each failure
//! counts in `sdmesh_embedding_cache_errors_total`.

use crate::embedding_cache::EmbeddingStore;
pub use crate::redis_link::RedisOptions;
use crate::redis_link::{RedisLink, Use};

pub struct RedisStore {
    link: RedisLink,
}

impl RedisStore {
    /// Checks the URL only: Redis need not be up yet (the store connects on first use).
    pub fn new(opts: RedisOptions) -> Result<Self, redis::RedisError> {
        let purpose = Use {
            meanwhile: "computing prompt embeddings without the cache",
            name: "embedding cache",
            count_failure: |operation| {
                metrics::counter!("sdmesh_embedding_cache_errors_total", "store" => "redis", "operation" => operation)
                    .increment(1)
            },
        };
        Ok(Self { link: RedisLink::new(opts, purpose)? })
    }

    /// Failed operations since start.
    pub fn errors(&self) -> u64 {
        self.link.errors()
    }
}

#[async_trait::async_trait]
impl EmbeddingStore for RedisStore {
    async fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.link.query::<Option<Vec<u8>>>("get", redis::Cmd::get(key)).await.flatten()
    }

    async fn put(&self, key: &str, value: Vec<u8>) {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value);
        if let Some(ttl) = self.link.options().ttl {
            cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
        }
        self.link.query::<()>("set", cmd).await;
    }
}
