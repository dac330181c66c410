//! Keeps model compute off the async runtime: one OS thread owns the model and serves
//! requests from a bounded queue; callers await a oneshot reply.

use crate::{Error, Result};
use tokio::sync::{mpsc, oneshot};

struct Job<I, O> {
    input: I,
    span: tracing::Span,
    reply: oneshot::Sender<Result<O>>,
}

pub struct ModelWorker<I, O> {
    name: &'static str,
    queue: mpsc::Sender<Job<I, O>>,
}

impl<I, O> Clone for ModelWorker<I, O> {
    fn clone(&self) -> Self {
        Self { name: self.name, queue: self.queue.clone() }
    }
}

impl<I: Send + 'static, O: Send + 'static> ModelWorker<I, O> {
    /// Starts the model thread. `run` is called once per request, in arrival order; a panic
    /// inside it fails that request with INTERNAL and the thread goes on serving.
    pub fn spawn<F>(name: &'static str, queue_capacity: usize, mut run: F) -> Self
    where
        F: FnMut(I) -> Result<O> + Send + 'static,
    {
        let (queue, mut rx) = mpsc::channel::<Job<I, O>>(queue_capacity.max(1));
        std::thread::Builder::new()
            .name(format!("{name}-model"))
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    metrics::gauge!("sdmesh_queue_depth", "worker" => name).decrement(1.0);
                    let _entered = tracing::info_span!(parent: &job.span, "model", worker = name).entered();
                    let started = std::time::Instant::now();
                    let out = catch_panic(name, || run(job.input));
                    metrics::histogram!("sdmesh_model_seconds", "worker" => name)
                        .record(started.elapsed().as_secs_f64());
                    // The caller may have gone away (cancelled); nothing to do then.
                    let _ = job.reply.send(out);
                }
            })
            .expect("spawning a thread only fails when the OS is out of resources");
        Self { name, queue }
    }

    /// Queues one request; RESOURCE_EXHAUSTED when the queue is full.
    pub async fn call(&self, input: I) -> Result<O> {
        let (reply, rx) = oneshot::channel();
        let job = Job { input, span: tracing::Span::current(), reply };
        // Counted before it is queued: the model thread may take it at once.
        let depth = metrics::gauge!("sdmesh_queue_depth", "worker" => self.name);
        depth.increment(1.0);
        self.queue.try_send(job).inspect_err(|_| depth.decrement(1.0)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::ResourceExhausted {
                message: format!("{} queue is full, retry later", self.name),
                retry_after: std::time::Duration::from_millis(100),
            },
            mpsc::error::TrySendError::Closed(_) => Error::Unavailable(format!("{} model thread stopped", self.name)),
        })?;
        rx.await.map_err(|_| Error::Unavailable(format!("{} model thread stopped", self.name)))?
    }
}

/// Runs `f`; a panic becomes an INTERNAL error naming the worker (the thread goes on).
pub(crate) fn catch_panic<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        tracing::error!(worker = name, "model panicked: {msg}");
        Err(Error::internal(format!("{name} model panicked: {msg}")))
    })
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
