//! A model thread that serves compatible requests together: one forward pass for several
//! jobs' steps.
//!
//! Requests wait in a bounded queue (full = RESOURCE_EXHAUSTED with a retry hint). The model
//! thread takes the oldest request, adds every queued request with the same batch key until
//! `max_rows` rows, optionally waits up to `max_wait` for more, and runs them as one batch.
//! With `max_wait` 0 it never delays a request: batches form from what queued up while the
//! previous batch ran. Requests whose caller went away are dropped unrun.

use crate::{Error, Result};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// What the batcher needs to know of a request.
pub trait Batchable {
    /// Requests batch together only when their keys are equal (e.g. same latent shape).
    type Key: PartialEq;
    fn batch_key(&self) -> Self::Key;
    /// Rows this request adds to the forward pass.
    fn rows(&self) -> usize;
}

#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    /// Requests waiting beyond which new ones are refused.
    pub queue_capacity: usize,
    /// Most rows in one forward pass (a request larger than this runs alone).
    pub max_rows: usize,
    /// How long the oldest request may wait for others to join it.
    pub max_wait: Duration,
}

struct Job<I, O> {
    input: I,
    span: tracing::Span,
    reply: oneshot::Sender<Result<O>>,
}

pub struct BatchWorker<I, O> {
    name: &'static str,
    queue: mpsc::SyncSender<Job<I, O>>,
    batches: Arc<AtomicU64>,
    /// Microseconds the last batch took (for the retry hint).
    last_batch_us: Arc<AtomicU64>,
    capacity: usize,
    max_rows: usize,
}

impl<I, O> Clone for BatchWorker<I, O> {
    fn clone(&self) -> Self {
        Self {
            name: self.name,
            queue: self.queue.clone(),
            batches: self.batches.clone(),
            last_batch_us: self.last_batch_us.clone(),
            capacity: self.capacity,
            max_rows: self.max_rows,
        }
    }
}

impl<I: Batchable + Send + 'static, O: Send + 'static> BatchWorker<I, O> {
    /// Starts the model thread. `run` gets a batch and returns one output per input, in
    /// order; an error or a panic fails every request of that batch, and the thread goes on.
    pub fn spawn<F>(name: &'static str, opts: BatchOptions, mut run: F) -> Self
    where
        F: FnMut(Vec<I>) -> Result<Vec<O>> + Send + 'static,
    {
        let (queue, rx) = mpsc::sync_channel::<Job<I, O>>(opts.queue_capacity.max(1));
        let batches = Arc::new(AtomicU64::new(0));
        let counter = batches.clone();
        let last_batch_us = Arc::new(AtomicU64::new(0));
        let last_batch = last_batch_us.clone();
        std::thread::Builder::new()
            .name(format!("{name}-model"))
            .spawn(move || {
                let mut batcher = Batcher { rx, pending: VecDeque::new(), opts, name };
                while let Some(batch) = batcher.next_batch() {
                    counter.fetch_add(1, Ordering::Relaxed);
                    let rows: usize = batch.iter().map(|j| j.input.rows()).sum();
                    metrics::histogram!("sdmesh_batch_rows", "worker" => name).record(rows as f64);
                    metrics::histogram!("sdmesh_batch_requests", "worker" => name).record(batch.len() as f64);
                    let span = tracing::info_span!(parent: &batch[0].span, "model", worker = name, requests = batch.len(), rows);
                    for job in &batch[1..] {
                        span.follows_from(&job.span);
                    }
                    let _entered = span.enter();
                    let (inputs, replies): (Vec<I>, Vec<_>) = batch.into_iter().map(|j| (j.input, j.reply)).unzip();
                    let started = Instant::now();
                    let outputs = catch_panic(name, || run(inputs));
                    metrics::histogram!("sdmesh_model_seconds", "worker" => name).record(started.elapsed().as_secs_f64());
                    last_batch.store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                    match outputs {
                        Ok(outputs) if outputs.len() == replies.len() => {
                            for (reply, out) in replies.into_iter().zip(outputs) {
                                let _ = reply.send(Ok(out));
                            }
                        }
                        Ok(outputs) => {
                            let e = format!("{name}: {} outputs for {} inputs", outputs.len(), replies.len());
                            for reply in replies {
                                let _ = reply.send(Err(Error::internal(e.clone())));
                            }
                        }
                        Err(e) => {
                            let status = tonic::Status::from(e);
                            for reply in replies {
                                let _ = reply.send(Err(Error::Remote(status.clone())));
                            }
                        }
                    }
                }
            })
            .expect("spawning a thread only fails when the OS is out of resources");
        Self {
            name,
            queue,
            batches,
            last_batch_us,
            capacity: opts.queue_capacity.max(1),
            max_rows: opts.max_rows.max(1),
        }
    }

    /// About how long the queue takes to drain: batches it holds x the last batch's time.
    fn retry_hint(&self) -> Duration {
        let batches = self.capacity.div_ceil(self.max_rows) as u64;
        let per_batch = self.last_batch_us.load(Ordering::Relaxed).max(1_000);
        Duration::from_micros((batches * per_batch).clamp(10_000, 30_000_000))
    }

    /// Batches run so far (forward passes).
    pub fn batches_run(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Queues one request; RESOURCE_EXHAUSTED (with a retry hint) when the queue is full.
    pub async fn call(&self, input: I) -> Result<O> {
        let (reply, rx) = oneshot::channel();
        let job = Job { input, span: tracing::Span::current(), reply };
        let depth = metrics::gauge!("sdmesh_queue_depth", "worker" => self.name);
        depth.increment(1.0);
        self.queue.try_send(job).inspect_err(|_| depth.decrement(1.0)).map_err(|e| match e {
            TrySendError::Full(_) => Error::ResourceExhausted {
                message: format!("{} queue is full ({} waiting), retry later", self.name, self.capacity),
                retry_after: self.retry_hint(),
            },
            TrySendError::Disconnected(_) => Error::Unavailable(format!("{} model thread stopped", self.name)),
        })?;
        rx.await.map_err(|_| Error::Unavailable(format!("{} model thread stopped", self.name)))?
    }
}

struct Batcher<I, O> {
    rx: mpsc::Receiver<Job<I, O>>,
    /// Taken off the queue but not yet run (another key than the batch being formed).
    pending: VecDeque<Job<I, O>>,
    opts: BatchOptions,
    name: &'static str,
}

impl<I: Batchable, O> Batcher<I, O> {
    fn taken(&self, job: Job<I, O>) -> Option<Job<I, O>> {
        metrics::gauge!("sdmesh_queue_depth", "worker" => self.name).decrement(1.0);
        // The caller went away (cancelled job): don't spend the model on it.
        (!job.reply.is_closed()).then_some(job)
    }

    /// The next batch; None when every sender is gone.
    fn next_batch(&mut self) -> Option<Vec<Job<I, O>>> {
        // The oldest request whose caller is still waiting (pending ones may have gone away
        // while they waited).
        let first = loop {
            let job = match self.pending.pop_front() {
                Some(job) => Some(job).filter(|j| !j.reply.is_closed()),
                None => self.taken(self.rx.recv().ok()?),
            };
            if let Some(job) = job {
                break job;
            }
        };
        let key = first.input.batch_key();
        let mut rows = first.input.rows();
        let mut batch = vec![first];
        // Queued earlier, another key then: join now if they fit.
        let mut i = 0;
        while i < self.pending.len() && rows < self.opts.max_rows {
            let job = &self.pending[i];
            if job.input.batch_key() == key && rows + job.input.rows() <= self.opts.max_rows {
                let job = self.pending.remove(i).expect("index checked");
                rows += job.input.rows();
                batch.push(job);
            } else {
                i += 1;
            }
        }
        let deadline = Instant::now() + self.opts.max_wait;
        // Bounded look-ahead, so the queue's capacity stays the bound on waiting requests.
        while rows < self.opts.max_rows && self.pending.len() < self.opts.queue_capacity {
            let received = match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => self.rx.recv_timeout(left).map_err(|e| e == RecvTimeoutError::Timeout),
                _ => self.rx.try_recv().map_err(|e| e == TryRecvError::Empty),
            };
            let job = match received {
                Ok(job) => job,
                Err(_) => break, // nothing more in time, or every sender gone
            };
            let Some(job) = self.taken(job) else { continue };
            if job.input.batch_key() == key && rows + job.input.rows() <= self.opts.max_rows {
                rows += job.input.rows();
                batch.push(job);
            } else {
                self.pending.push_back(job);
            }
        }
        Some(batch)
    }
}

/// Runs `f`; a panic becomes an INTERNAL error naming the worker (the thread goes on).
fn catch_panic<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
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
    use std::sync::Mutex;

    #[derive(Debug)]
    struct Req {
        key: u8,
        rows: usize,
        value: i32,
    }

    impl Batchable for Req {
        type Key = u8;
        fn batch_key(&self) -> u8 {
            self.key
        }
        fn rows(&self) -> usize {
            self.rows
        }
    }

    /// Every batch's values, in the order the batches ran.
    type Batches = Arc<Mutex<Vec<Vec<i32>>>>;

    /// A worker whose first batch blocks until released, recording every batch's values.
    fn gated(max_rows: usize) -> (BatchWorker<Req, i32>, std::sync::mpsc::Sender<()>, Batches) {
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = batches.clone();
        let opts = BatchOptions { queue_capacity: 16, max_rows, max_wait: Duration::ZERO };
        let worker = BatchWorker::spawn("test", opts, move |inputs: Vec<Req>| {
            gate_rx.recv().ok();
            seen.lock().unwrap().push(inputs.iter().map(|r| r.value).collect());
            if inputs.iter().any(|r| r.value < 0) {
                return Err(Error::invalid("negative"));
            }
            Ok(inputs.iter().map(|r| r.value * 10).collect())
        });
        (worker, gate_tx, batches)
    }

    #[tokio::test]
    async fn queued_requests_with_one_key_run_together_within_max_rows() {
        let (worker, gate, batches) = gated(4);
        let call = |key, rows, value| {
            let w = worker.clone();
            tokio::spawn(async move { w.call(Req { key, rows, value }).await })
        };
        let first = call(0, 1, 1);
        tokio::time::sleep(Duration::from_millis(50)).await; // the first batch is running
        let rest = vec![call(0, 2, 2), call(1, 1, 3), call(0, 1, 4), call(0, 1, 5), call(1, 2, 6)];
        tokio::time::sleep(Duration::from_millis(50)).await;
        for _ in 0..10 {
            let _ = gate.send(());
        }
        assert_eq!(first.await.unwrap().unwrap(), 10);
        let outs: Vec<i32> = futures::future::join_all(rest).await.into_iter().map(|r| r.unwrap().unwrap()).collect();
        assert_eq!(outs, vec![20, 30, 40, 50, 60], "each caller gets its own output");
        // [1] alone; then key 0 up to 4 rows (2+1+1), key 1 (1+2); nothing lost or repeated.
        assert_eq!(*batches.lock().unwrap(), vec![vec![1], vec![2, 4, 5], vec![3, 6]]);
    }

    #[tokio::test]
    async fn an_error_fails_its_batch_only() {
        let (worker, gate, _) = gated(8);
        for _ in 0..10 {
            let _ = gate.send(());
        }
        let err = worker.call(Req { key: 0, rows: 1, value: -1 }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(worker.call(Req { key: 0, rows: 1, value: 7 }).await.unwrap(), 70);
    }

    #[tokio::test]
    async fn a_full_queue_is_resource_exhausted_with_a_retry_hint() {
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let gate = Mutex::new(gate_rx);
        let opts = BatchOptions { queue_capacity: 1, max_rows: 1, max_wait: Duration::ZERO };
        let worker = BatchWorker::spawn("full", opts, move |inputs: Vec<Req>| {
            gate.lock().unwrap().recv().ok();
            Ok(inputs.iter().map(|r| r.value).collect())
        });
        let spawn = |value| {
            let w = worker.clone();
            tokio::spawn(async move { w.call(Req { key: 0, rows: 1, value }).await })
        };
        let running = spawn(1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let queued = spawn(2);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let err = worker.call(Req { key: 0, rows: 1, value: 3 }).await.unwrap_err();
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        let hint = crate::retry_after(&status).expect("a RetryInfo detail");
        assert!(hint >= Duration::from_millis(10), "{hint:?}");
        gate_tx.send(()).unwrap();
        gate_tx.send(()).unwrap();
        assert_eq!((running.await.unwrap().unwrap(), queued.await.unwrap().unwrap()), (1, 2));
    }

    #[tokio::test]
    async fn waits_up_to_max_wait_for_company() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = batches.clone();
        let opts = BatchOptions { queue_capacity: 16, max_rows: 8, max_wait: Duration::from_millis(300) };
        let worker = BatchWorker::spawn("wait", opts, move |inputs: Vec<Req>| {
            seen.lock().unwrap().push(inputs.len());
            Ok(inputs.iter().map(|r| r.value).collect())
        });
        let a = {
            let w = worker.clone();
            tokio::spawn(async move { w.call(Req { key: 0, rows: 1, value: 1 }).await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        let b = worker.call(Req { key: 0, rows: 1, value: 2 }).await.unwrap();
        assert_eq!((a.await.unwrap().unwrap(), b), (1, 2));
        assert_eq!(*batches.lock().unwrap(), vec![2], "the second request joined the first");
    }
}
