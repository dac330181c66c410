//! The prompt-embedding cache against a real redis-server (started by the test; `make test`
//! installs it): hits skip the text encoder, orchestrators share entries, bad values are
//! recomputed, other models never hit, and Redis going away (killed, paused) costs no job.

mod common;

use candle_core::Tensor;
use common::local_pipeline;
use sdmesh_core::{Result, TextEmbeddings, TextEncoder};
use sdmesh_orchestrator::embedding_cache::CachedTextEncoder;
use sdmesh_orchestrator::noise::SeededNoise;
use sdmesh_orchestrator::pipeline::Pipeline;
use sdmesh_orchestrator::redis_store::{RedisOptions, RedisStore};
use sdmesh_orchestrator::with_embedding_cache;
use sdmesh_proto::v1;
use sdmesh_testkit::process::RedisServer;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Counts the texts that reach the real text encoder; `renamed` reports another model (as
/// other weights, config or tokenizer would).
struct Counting {
    inner: Arc<dyn TextEncoder>,
    texts: AtomicUsize,
    renamed: bool,
}

#[async_trait::async_trait]
impl TextEncoder for Counting {
    async fn encode(&self, texts: Vec<String>) -> Result<TextEmbeddings> {
        self.texts.fetch_add(texts.len(), Ordering::SeqCst);
        self.inner.encode(texts).await
    }
    async fn info(&self) -> Result<v1::TextEncoderInfo> {
        let info = self.inner.info().await?;
        Ok(match self.renamed {
            true => v1::TextEncoderInfo { fingerprint: format!("{}-retrained", info.fingerprint), ..info },
            false => info,
        })
    }
}

fn options(url: String) -> RedisOptions {
    RedisOptions {
        url,
        timeout: Duration::from_millis(250),
        ttl: Some(Duration::from_secs(3600)),
        retry_interval: Duration::from_millis(100),
    }
}

/// An orchestrator's pipeline: the shared local models, its own counter and Redis connection.
struct Orchestrator {
    pipeline: Pipeline,
    encoder: Arc<Counting>,
    store: Arc<RedisStore>,
}

impl Orchestrator {
    fn new(base: &Pipeline, redis: &RedisServer) -> Self {
        let encoder =
            Arc::new(Counting { inner: base.text_encoder.clone(), texts: AtomicUsize::new(0), renamed: false });
        let store = Arc::new(RedisStore::new(options(redis.url())).unwrap());
        let pipeline = with_embedding_cache(Pipeline { text_encoder: encoder.clone(), ..base.clone() }, store.clone());
        Self { pipeline, encoder, store }
    }

    fn encoded(&self) -> usize {
        self.encoder.texts.load(Ordering::SeqCst)
    }

    async fn generate(&self, prompt: &str) -> Tensor {
        generate(&self.pipeline, prompt).await
    }
}

async fn generate(pipeline: &Pipeline, prompt: &str) -> Tensor {
    let request = v1::GenerateRequest {
        prompt: prompt.into(),
        negative_prompt: "blurry".into(),
        steps: Some(2),
        seed: Some(3),
        height: Some(32),
        width: Some(32),
        ..Default::default()
    };
    let job = pipeline.validate(&request).unwrap();
    pipeline.run(&job, &mut SeededNoise::new(job.seed), &mut |_| true).await.unwrap().images
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.flatten_all().unwrap().to_vec1::<f32>().unwrap() == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

async fn keys(redis: &RedisServer) -> Vec<String> {
    let mut c = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    redis::cmd("KEYS").arg("sdmesh:emb:*").query_async(&mut c).await.unwrap()
}

#[tokio::test]
async fn a_repeated_prompt_skips_the_text_encoder_and_two_orchestrators_share_entries() {
    let redis = RedisServer::start();
    let base = local_pipeline("sd21-base-tiny").await;
    let uncached = generate(&base, "a red cube").await;

    let a = Orchestrator::new(&base, &redis);
    let first = a.generate("a red cube").await;
    assert_eq!(a.encoded(), 2, "prompt and negative prompt encoded once");
    let again = a.generate("a red cube").await;
    assert_eq!(a.encoded(), 2, "the repeat came from Redis");
    assert!(same(&first, &uncached) && same(&again, &uncached), "cached embeddings give the same image, bit for bit");

    // Entries carry the TTL.
    let stored = keys(&redis).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    let mut c = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let pttl: i64 = redis::cmd("PTTL").arg(&stored[0]).query_async(&mut c).await.unwrap();
    assert!(pttl > 3_000_000 && pttl <= 3_600_000, "PTTL {pttl}");

    // Another orchestrator (its own connection) finds them; a new negative prompt only is new.
    let b = Orchestrator::new(&base, &redis);
    let from_b = b.generate("a red cube").await;
    assert_eq!(b.encoded(), 0, "b reused a's embeddings");
    assert!(same(&from_b, &uncached));
    b.generate("a blue cube").await;
    assert_eq!(b.encoded(), 1, "only the new prompt was encoded (the negative prompt was cached)");
    assert_eq!(a.store.errors() + b.store.errors(), 0);
}

#[tokio::test]
async fn garbage_under_a_key_is_recomputed_and_other_models_never_hit() {
    let redis = RedisServer::start();
    let base = local_pipeline("sd21-base-tiny").await;
    let a = Orchestrator::new(&base, &redis);
    let good = a.generate("a cat").await;
    let stored = keys(&redis).await;
    assert_eq!(stored.len(), 2);
    let mut c = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let value: Vec<u8> = redis::cmd("GET").arg(&stored[0]).query_async(&mut c).await.unwrap();
    let mut flipped = value.clone();
    flipped[100] ^= 0x40;
    let bad_values: Vec<Vec<u8>> = vec![b"garbage".to_vec(), value[..value.len() / 2].to_vec(), flipped, vec![]];
    for (i, bad) in bad_values.into_iter().enumerate() {
        let () = redis::cmd("SET").arg(&stored[0]).arg(bad).query_async(&mut c).await.unwrap();
        let image = a.generate("a cat").await;
        assert_eq!(a.encoded(), 2 + i + 1, "bad value {i} was recomputed, not used");
        assert!(same(&image, &good), "bad value {i} changed the image");
    }
    // The recomputed value was written back.
    a.generate("a cat").await;
    assert_eq!(a.encoded(), 6);

    // Same text, another text encoder fingerprint (other weights, config or tokenizer): a miss.
    let counting = Arc::new(Counting { inner: base.text_encoder.clone(), texts: AtomicUsize::new(0), renamed: true });
    let store = Arc::new(RedisStore::new(options(redis.url())).unwrap());
    let other_model = CachedTextEncoder::new(counting.clone(), store);
    other_model.encode(vec!["blurry".into(), "a cat".into()]).await.unwrap();
    assert_eq!(counting.texts.load(Ordering::SeqCst), 2, "another model's entries were used");
    assert_eq!(keys(&redis).await.len(), 4, "each model keeps its own entries");
}

/// Log lines written while the test runs (the test runs on one thread).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn count(&self, needle: &str) -> usize {
        String::from_utf8_lossy(&self.0.lock().unwrap()).matches(needle).count()
    }
}

#[tokio::test]
async fn redis_killed_or_stalled_loses_no_job_and_the_cache_comes_back() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber =
        tracing_subscriber::fmt().with_writer(move || writer.clone()).with_max_level(tracing::Level::INFO).finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut redis = RedisServer::start();
    let base = local_pipeline("sd21-base-tiny").await;
    let a = Orchestrator::new(&base, &redis);
    let expected = a.generate("a tree").await;
    assert_eq!(a.encoded(), 2);

    // Killed while jobs are running: every job finishes with the right image.
    let jobs = futures::future::join_all(["a tree", "a house", "a tree"].map(|p| a.generate(p)));
    let kill = async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        redis.kill();
    };
    let (images, ()) = tokio::join!(jobs, kill);
    // Concurrent jobs share UNet batches: the tiny model's rows are then equal within float
    // rounding, not bit for bit (see services/unet/tests/batching.rs).
    for i in [0, 2] {
        assert!(sdmesh_testkit::max_abs_diff(&images[i], &expected).0 < 1e-4, "job {i} of the three");
    }
    for _ in 0..3 {
        assert!(same(&a.generate("a tree").await, &expected), "a job without Redis");
    }
    assert!(a.store.errors() > 0, "the outage was counted");
    assert_eq!(logs.count("computing prompt embeddings without the cache"), 1, "one warning per outage");

    // Back on the same port: used again after the retry interval.
    redis.restart();
    tokio::time::sleep(Duration::from_millis(150)).await;
    a.generate("a tree").await;
    let before = a.encoded();
    a.generate("a tree").await;
    assert_eq!(a.encoded(), before, "served from Redis again");
    assert_eq!(logs.count("redis is reachable again"), 1);

    // Stalled (every client paused for 3 s): the job goes on after the 250 ms timeout.
    assert_eq!(redis.command(&["CLIENT", "PAUSE", "3000", "ALL"]).as_deref(), Some("+OK"));
    let started = Instant::now();
    let stalled = a.generate("a tree").await;
    let took = started.elapsed();
    assert!(same(&stalled, &expected));
    assert!(took < Duration::from_millis(2500), "the job waited for the stalled Redis ({took:?})");
    assert_eq!(logs.count("computing prompt embeddings without the cache"), 2, "a second outage, a second warning");
}
