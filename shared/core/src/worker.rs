//! Keeps model compute off the async runtime: one OS thread owns the model and serves
//! requests from a bounded queue, one at a time; callers await the reply. (A
//! [`crate::batch::BatchWorker`] that never batches.)

use crate::batch::{BatchOptions, BatchWorker, Batchable};
use crate::Result;
use std::time::Duration;

/// One request, never batched with another.
struct Alone<I>(I);

impl<I> Batchable for Alone<I> {
    type Key = ();
    fn batch_key(&self) {}
    fn rows(&self) -> usize {
        1
    }
}

pub struct ModelWorker<I, O> {
    inner: BatchWorker<Alone<I>, O>,
}

impl<I, O> Clone for ModelWorker<I, O> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<I: Send + 'static, O: Send + 'static> ModelWorker<I, O> {
    /// Starts the model thread. `run` is called once per request, in arrival order; a panic
    /// inside it fails that request with INTERNAL and the thread goes on serving.
    pub fn spawn<F>(name: &'static str, queue_capacity: usize, mut run: F) -> Self
    where
        F: FnMut(I) -> Result<O> + Send + 'static,
    {
        let opts = BatchOptions { queue_capacity, max_rows: 1, max_wait: Duration::ZERO };
        let inner = BatchWorker::spawn(name, opts, move |batch: Vec<Alone<I>>| {
            batch.into_iter().map(|Alone(input)| run(input)).collect::<Result<Vec<O>>>()
        });
        Self { inner }
    }

    /// Queues one request; RESOURCE_EXHAUSTED (with a retry hint) when the queue is full.
    pub async fn call(&self, input: I) -> Result<O> {
        self.inner.call(Alone(input)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_requests_and_survives_panics() {
        let w = ModelWorker::spawn("test", 4, |x: i32| {
            if x < 0 {
                panic!("negative {x}");
            }
            Ok(x * 2)
        });
        assert_eq!(w.call(21).await.unwrap(), 42);
        let err = w.call(-1).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
        assert!(err.to_string().contains("negative -1"), "{err}");
        assert_eq!(w.call(1).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn full_queue_is_resource_exhausted() {
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let gate = std::sync::Mutex::new(gate_rx);
        let w = ModelWorker::spawn("slow", 1, move |x: i32| {
            gate.lock().unwrap().recv().ok();
            Ok(x)
        });
        let a = tokio::spawn({
            let w = w.clone();
            async move { w.call(1).await }
        });
        // Wait until the first job is taken off the queue by the (blocked) model thread.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let b = tokio::spawn({
            let w = w.clone();
            async move { w.call(2).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let err = w.call(3).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        gate_tx.send(()).unwrap();
        gate_tx.send(()).unwrap();
        assert_eq!(a.await.unwrap().unwrap(), 1);
        assert_eq!(b.await.unwrap().unwrap(), 2);
    }
}
