//! Prompt-embedding cache in front of the text encoder.
//!
//! Each text's embedding is stored under a key that covers everything the embedding depends
//! on: the text encoder's fingerprint (weights, config, tokenizer files), the context length
//! and the exact text. Values are compact and self-checking (magic, shape, f32 bytes, BLAKE3
//! checksum): a truncated, corrupted or foreign value is ignored and recomputed, never used.
//! The store is a trait: an in-process LRU bounded in bytes is the embedded default.

use candle_core::{Device, Tensor};
use sdmesh_core::{Result, TextEmbeddings, TextEncoder};
use sdmesh_proto::v1;
use std::sync::Arc;

/// Where cached values live.
#[async_trait::async_trait]
pub trait EmbeddingStore: Send + Sync {
    async fn get(&self, key: &str) -> Option<Vec<u8>>;
    async fn put(&self, key: &str, value: Vec<u8>);
}

/// In-process LRU bounded by the total bytes of its values.
pub struct LruStore {
    entries: sdmesh_core::byte_lru::ByteLru<String, Vec<u8>>,
}

impl LruStore {
    pub fn new(max_bytes: usize) -> Self {
        Self { entries: sdmesh_core::byte_lru::ByteLru::new(max_bytes) }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.entries.bytes()
    }
}

#[async_trait::async_trait]
impl EmbeddingStore for LruStore {
    async fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.entries.get(key)
    }

    async fn put(&self, key: &str, value: Vec<u8>) {
        let size = value.len();
        self.entries.put(key.to_string(), value, size);
    }
}

const MAGIC: &[u8; 4] = b"SDE1";

/// `MAGIC | truncated u32 | rank u8 | dims u32... | f32 data | blake3(all before)`, LE.
fn encode_value(embedding: &Tensor, truncated: u32) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(embedding.elem_count() * 4 + 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&truncated.to_le_bytes());
    out.push(embedding.rank() as u8);
    for &d in embedding.dims() {
        out.extend_from_slice(&(d as u32).to_le_bytes());
    }
    for v in embedding.flatten_all()?.to_vec1::<f32>()? {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let checksum = blake3::hash(&out);
    out.extend_from_slice(checksum.as_bytes());
    Ok(out)
}

/// The embedding and truncation count, or None for anything that is not a whole, intact
/// value of the expected shape.
fn decode_value(bytes: &[u8], expected_dims: &[usize]) -> Option<(Tensor, u32)> {
    let (body, checksum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
    if blake3::hash(body).as_bytes() != checksum || body.get(..4)? != MAGIC {
        return None;
    }
    let truncated = u32::from_le_bytes(body.get(4..8)?.try_into().ok()?);
    let rank = *body.get(8)? as usize;
    let mut dims = Vec::with_capacity(rank);
    for i in 0..rank {
        let at = 9 + 4 * i;
        dims.push(u32::from_le_bytes(body.get(at..at + 4)?.try_into().ok()?) as usize);
    }
    let data = body.get(9 + 4 * rank..)?;
    if dims != expected_dims || data.len() != dims.iter().product::<usize>() * 4 {
        return None;
    }
    let values: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Some((Tensor::from_vec(values, dims, &Device::Cpu).ok()?, truncated))
}

/// A [`TextEncoder`] that answers from the cache and encodes only the misses (in one call).
pub struct CachedTextEncoder {
    inner: Arc<dyn TextEncoder>,
    store: Arc<dyn EmbeddingStore>,
}

impl CachedTextEncoder {
    pub fn new(inner: Arc<dyn TextEncoder>, store: Arc<dyn EmbeddingStore>) -> Self {
        Self { inner, store }
    }

    fn key(info: &v1::TextEncoderInfo, text: &str) -> String {
        let mut h = blake3::Hasher::new();
        h.update(info.fingerprint.as_bytes()).update(&[0]);
        h.update(&info.context_length.to_le_bytes()).update(&info.hidden_size.to_le_bytes());
        h.update(text.as_bytes());
        format!("sdmesh:emb:v1:{}", h.finalize().to_hex())
    }
}

#[async_trait::async_trait]
impl TextEncoder for CachedTextEncoder {
    async fn encode(&self, texts: Vec<String>) -> Result<TextEmbeddings> {
        // Asked for each job: the encoders may have changed model (a rollout) since the last,
        // and within a job the encode that follows goes to the model that answered this.
        let info = self.inner.info().await?;
        let dims = [1, info.context_length as usize, info.hidden_size as usize];
        let keys: Vec<String> = texts.iter().map(|t| Self::key(&info, t)).collect();
        let mut found: Vec<Option<(Tensor, u32)>> = Vec::with_capacity(texts.len());
        for key in &keys {
            found.push(self.store.get(key).await.and_then(|v| decode_value(&v, &dims)));
        }
        let misses: Vec<usize> = (0..texts.len()).filter(|&i| found[i].is_none()).collect();
        let hits = texts.len() - misses.len();
        metrics::counter!("sdmesh_embedding_cache_requests_total", "result" => "hit").increment(hits as u64);
        metrics::counter!("sdmesh_embedding_cache_requests_total", "result" => "miss").increment(misses.len() as u64);
        let span = tracing::Span::current();
        span.record("cache_hits", hits);
        span.record("cache_misses", misses.len());
        if !misses.is_empty() {
            let computed = self.inner.encode(misses.iter().map(|&i| texts[i].clone()).collect()).await?;
            for (j, &i) in misses.iter().enumerate() {
                let embedding = computed.embeddings.narrow(0, j, 1)?;
                let truncated = computed.truncated_tokens.get(j).copied().unwrap_or(0);
                self.store.put(&keys[i], encode_value(&embedding, truncated)?).await;
                found[i] = Some((embedding, truncated));
            }
        }
        let (embeddings, truncated_tokens): (Vec<Tensor>, Vec<u32>) = found.into_iter().flatten().unzip();
        Ok(TextEmbeddings { embeddings: Tensor::cat(&embeddings, 0)?, truncated_tokens })
    }

    async fn info(&self) -> Result<v1::TextEncoderInfo> {
        self.inner.info().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Embeds each text as a constant: its length, plus an offset that stands for the model
    /// (named by its fingerprint; a test switches both, as a rollout would).
    struct Counting {
        calls: AtomicUsize,
        texts: AtomicUsize,
        model: std::sync::Mutex<(&'static str, f32)>,
    }

    impl Counting {
        fn serve(&self, fingerprint: &'static str, offset: f32) {
            *self.model.lock().unwrap() = (fingerprint, offset);
        }
    }

    #[async_trait::async_trait]
    impl TextEncoder for Counting {
        async fn encode(&self, texts: Vec<String>) -> Result<TextEmbeddings> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.texts.fetch_add(texts.len(), Ordering::SeqCst);
            let rows: Vec<Tensor> = texts
                .iter()
                .map(|t| Tensor::full(t.len() as f32 + self.model.lock().unwrap().1, (1, 4, 3), &Device::Cpu))
                .collect::<candle_core::Result<_>>()?;
            Ok(TextEmbeddings { embeddings: Tensor::cat(&rows, 0)?, truncated_tokens: vec![7; texts.len()] })
        }
        async fn info(&self) -> Result<v1::TextEncoderInfo> {
            let fingerprint = self.model.lock().unwrap().0.into();
            Ok(v1::TextEncoderInfo { context_length: 4, hidden_size: 3, fingerprint })
        }
    }

    fn counting() -> Arc<Counting> {
        let model = std::sync::Mutex::new(("fp-a", 0.0));
        Arc::new(Counting { calls: AtomicUsize::new(0), texts: AtomicUsize::new(0), model })
    }

    fn value_of(e: &TextEmbeddings, row: usize) -> f32 {
        e.embeddings.get(row).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]
    }

    #[tokio::test]
    async fn repeated_texts_do_not_reach_the_encoder() {
        let inner = counting();
        let store = Arc::new(LruStore::new(1 << 20));
        let cached = CachedTextEncoder::new(inner.clone(), store);
        let a = cached.encode(vec!["".into(), "a cat".into()]).await.unwrap();
        let b = cached.encode(vec!["a cat".into(), "".into(), "a dog!".into()]).await.unwrap();
        assert_eq!(inner.calls.load(Ordering::SeqCst), 2);
        assert_eq!(inner.texts.load(Ordering::SeqCst), 3, "only 'a dog!' was encoded the second time");
        assert_eq!((value_of(&a, 0), value_of(&a, 1)), (0.0, 5.0));
        assert_eq!((value_of(&b, 0), value_of(&b, 1), value_of(&b, 2)), (5.0, 0.0, 6.0));
        assert_eq!(b.truncated_tokens, vec![7, 7, 7], "truncation counts survive the cache");
        cached.encode(vec!["a cat".into()]).await.unwrap();
        assert_eq!(inner.calls.load(Ordering::SeqCst), 2);
    }

    /// The encoder's model is asked for every encode: after a rollout to another model, the
    /// first model's embeddings are not used, and they are used again if it comes back.
    #[tokio::test]
    async fn another_model_never_hits() {
        let inner = counting();
        let cached = CachedTextEncoder::new(inner.clone(), Arc::new(LruStore::new(1 << 20)));
        assert_eq!(value_of(&cached.encode(vec!["x".into()]).await.unwrap(), 0), 1.0);
        inner.serve("fp-b", 100.0);
        assert_eq!(value_of(&cached.encode(vec!["x".into()]).await.unwrap(), 0), 101.0);
        assert_eq!(inner.calls.load(Ordering::SeqCst), 2);
        inner.serve("fp-a", 0.0);
        assert_eq!(value_of(&cached.encode(vec!["x".into()]).await.unwrap(), 0), 1.0);
        assert_eq!(inner.calls.load(Ordering::SeqCst), 2, "fp-a's entry was still there");
    }

    #[tokio::test]
    async fn corrupted_truncated_or_foreign_values_are_recomputed() {
        let inner = counting();
        let store = Arc::new(LruStore::new(1 << 20));
        let cached = CachedTextEncoder::new(inner.clone(), store.clone());
        cached.encode(vec!["abc".into()]).await.unwrap();
        let key = CachedTextEncoder::key(&inner.info().await.unwrap(), "abc");
        let good = store.get(&key).await.unwrap();
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        let wrong_shape =
            encode_value(&Tensor::zeros((1, 2, 3), candle_core::DType::F32, &Device::Cpu).unwrap(), 0).unwrap();
        for (i, bad) in
            [flipped, good[..good.len() - 5].to_vec(), b"garbage".to_vec(), vec![], wrong_shape].into_iter().enumerate()
        {
            store.put(&key, bad).await;
            let got = cached.encode(vec!["abc".into()]).await.unwrap();
            assert_eq!(value_of(&got, 0), 3.0);
            assert_eq!(inner.calls.load(Ordering::SeqCst), 2 + i, "bad value {i} was used");
        }
        // Recomputing rewrote a good value.
        cached.encode(vec!["abc".into()]).await.unwrap();
        assert_eq!(inner.calls.load(Ordering::SeqCst), 6);
    }

    #[tokio::test]
    async fn lru_stays_within_its_byte_bound() {
        let one = encode_value(&Tensor::zeros((1, 4, 3), candle_core::DType::F32, &Device::Cpu).unwrap(), 0).unwrap();
        let store = LruStore::new(one.len() * 2);
        store.put("a", one.clone()).await;
        store.put("b", one.clone()).await;
        store.get("a").await;
        store.put("c", one.clone()).await;
        assert!(store.bytes() <= one.len() * 2);
        assert!(store.get("b").await.is_none(), "least recently used goes first");
        assert!(store.get("a").await.is_some() && store.get("c").await.is_some());
        store.put("huge", vec![0; one.len() * 3]).await;
        assert!(store.get("huge").await.is_none());
    }
}
