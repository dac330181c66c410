//! Serving a component: health (grpc.health.v1), reflection, graceful shutdown.

use http::HeaderValue;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_health::server::HealthReporter;
pub use tonic_health::ServingStatus;

/// Health of one process. Starts NOT_SERVING; the service flips it once its model is ready.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    names: Vec<String>,
    /// Health and reflection, to which a service adds its own.
    routes: Routes,
    /// Set when the shutdown grace period is over: calls still running should end now, with
    /// UNAVAILABLE (retryable) rather than be cut.
    grace_over: tokio::sync::watch::Sender<bool>,
    /// Set when the drain starts (shutdown signalled).
    draining: tokio::sync::watch::Sender<bool>,
    /// The fingerprint of the model this process serves, once loaded (see [`ModelCheckLayer`]).
    model: Arc<OnceLock<HeaderValue>>,
    /// What [`Self::set`] said last, for those who ask without gRPC.
    serving: tokio::sync::watch::Sender<bool>,
}

impl Health {
    /// `names` are the fully-qualified gRPC service names this process serves
    /// (the overall status "" is kept in step with them).
    pub async fn new(names: &[&str]) -> Self {
        let (reporter, service) = tonic_health::server::health_reporter();
        let names: Vec<String> = std::iter::once(String::new()).chain(names.iter().map(|s| s.to_string())).collect();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(sdmesh_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("the embedded descriptor sets are valid");
        let routes = Routes::new(service).add_service(reflection);
        let (grace_over, draining) = (tokio::sync::watch::Sender::new(false), tokio::sync::watch::Sender::new(false));
        let serving = tokio::sync::watch::Sender::new(false);
        let health = Self { reporter, names, routes, grace_over, draining, model: Arc::default(), serving };
        health.set(ServingStatus::NotServing).await;
        health
    }

    /// Health and reflection; add the service's own with `.add_service(..)`.
    pub fn routes(&self) -> Routes {
        self.routes.clone()
    }

    pub async fn set(&self, status: ServingStatus) {
        self.serving.send_replace(status == ServingStatus::Serving);
        for name in &self.names {
            self.reporter.set_service_status(name, status).await;
        }
    }

    /// NOT_SERVING, then ends the Watch streams (watchers see NOT_SERVING first): an open
    /// Watch would otherwise hold the drain for the whole grace period.
    async fn drain(&self) {
        self.draining.send_replace(true);
        self.set(ServingStatus::NotServing).await;
        let mut reporter = self.reporter.clone();
        for name in &self.names {
            reporter.clear_service_status(name).await;
        }
    }

    /// Says which model this process serves (its fingerprint): responses carry it, and calls
    /// that expect another are refused (see [`ModelCheckLayer`]).
    pub fn set_model(&self, fingerprint: &str) {
        match HeaderValue::from_str(fingerprint) {
            Ok(v) => {
                let _ = self.model.set(v);
            }
            Err(e) => tracing::warn!("model fingerprint {fingerprint:?} cannot travel as metadata: {e}"),
        }
    }

    /// Whether it reports SERVING now.
    pub fn is_serving(&self) -> bool {
        *self.serving.borrow()
    }

    /// Resolves when the drain starts: the process is shutting down, and work that has not
    /// started yet should go to another replica.
    pub async fn draining(&self) {
        let mut rx = self.draining.subscribe();
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// Resolves when the shutdown grace period is over.
    pub async fn grace_over(&self) {
        let mut rx = self.grace_over.subscribe();
        let _ = rx.wait_for(|over| *over).await;
    }
}

/// Runs `call` unless the shutdown grace period ends first; then UNAVAILABLE, so the client
/// retries elsewhere instead of seeing a cut connection.
pub async fn unless_grace_over<T>(health: &Health, call: impl Future<Output = crate::Result<T>>) -> crate::Result<T> {
    tokio::select! {
        result = call => result,
        _ = health.grace_over() => Err(crate::Error::Unavailable(
            "the server is shutting down and its grace period is over; retry on another replica".into(),
        )),
    }
}

/// Serves `routes` (built from [`Health::routes`]) on `listener` until `shutdown.signal` resolves,
/// then reports NOT_SERVING, refuses new calls and lets the calls in flight finish, for at most
/// `shutdown.grace`. Every RPC gets a trace span (child of the caller's) and is counted in the metrics.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    health: Health,
    shutdown: Shutdown,
) -> Result<(), tonic::transport::Error> {
    let Shutdown { signal: shutdown, grace } = shutdown;
    // No Nagle: a response held back for the peer's delayed ACK costs ~40 ms a call.
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |s| {
        s.and_then(|s| s.set_nodelay(true).map(|()| s))
    });
    let draining = health.clone();
    let (drain_started, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .trace_fn(crate::telemetry::server_span)
        .layer(crate::telemetry::RpcMetricsLayer)
        .layer(ModelCheckLayer { model: health.model.clone() })
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            draining.drain().await;
            tracing::info!(grace_seconds = grace.as_secs_f64(), "shutting down: draining in-flight calls");
            let _ = drain_started.send(());
        });
    let grace_over = async move {
        if drain_rx.await.is_err() {
            // The server ended without a shutdown.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        _ = grace_over => {}
    }
    tracing::warn!("grace period over: ending the calls still in flight with UNAVAILABLE");
    health.grace_over.send_replace(true);
    // A moment for those calls to send their status; then stop regardless.
    match tokio::time::timeout(Duration::from_secs(1), server).await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}

/// A loaded model that can say what it is.
pub trait ModelIdentity {
    /// [`crate::model_dir::fingerprint`] of what it serves.
    fn fingerprint(&self) -> &str;
}

/// Serves a model service's `routes` on `listener` at once, NOT_SERVING while `load` runs on a
/// blocking thread; then hands the model to `ready`, says which model it serves, and reports
/// SERVING, until `shutdown`. A model that fails to load ends the service with that error.
pub async fn serve_while_loading<M, E>(
    name: &str,
    listener: TcpListener,
    health: Health,
    routes: Routes,
    shutdown: Shutdown,
    load: impl FnOnce() -> Result<M, E> + Send + 'static,
    ready: impl FnOnce(M),
) -> anyhow::Result<()>
where
    M: ModelIdentity + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    let server = tokio::spawn(serve(listener, routes, health.clone(), shutdown));
    let model = tokio::task::spawn_blocking(load).await??;
    health.set_model(model.fingerprint());
    tracing::info!(fingerprint = model.fingerprint(), "{name} model loaded");
    ready(model);
    health.set(ServingStatus::Serving).await;
    tracing::info!("{name} ready");
    server.await??;
    Ok(())
}

/// Metadata naming a model by its fingerprint: on every response of a model service, the model
/// it serves; on a request, the model the caller's job began on (`crate::replicas::one_job`
/// learns it from the job's first answer and sends it with the job's later calls).
pub const MODEL_HEADER: &str = "sdmesh-model";

/// Keeps a job on one model: a call that expects another model than this process serves (a
/// pool that mixes checkpoints, dtypes or device kinds, e.g. in the middle of a rollout) is
/// refused with UNAVAILABLE before it runs, so the caller retries on another replica instead
/// of mixing models within a job; every other response says which model answered.
#[derive(Clone)]
pub struct ModelCheckLayer {
    model: Arc<OnceLock<HeaderValue>>,
}

impl<S> tower::Layer<S> for ModelCheckLayer {
    type Service = ModelCheck<S>;
    fn layer(&self, inner: S) -> ModelCheck<S> {
        ModelCheck { inner, model: self.model.clone() }
    }
}

#[derive(Clone)]
pub struct ModelCheck<S> {
    inner: S,
    model: Arc<OnceLock<HeaderValue>>,
}

impl<S, B> tower::Service<http::Request<B>> for ModelCheck<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(own) = self.model.get().cloned() else {
            return Box::pin(self.inner.call(request));
        };
        if let Some(expected) = request.headers().get(MODEL_HEADER).filter(|e| **e != own) {
            let short = |v: &HeaderValue| v.to_str().unwrap_or("?").chars().take(12).collect::<String>();
            let status = tonic::Status::unavailable(format!(
                "this replica serves model {}, the caller expects {} (a pool mixing checkpoints, dtypes or \
                 device kinds, e.g. mid-rollout; the job began on the other): retry on a replica of the job's model",
                short(&own),
                short(expected)
            ));
            let mut response = status.into_http::<tonic::body::Body>();
            response.headers_mut().insert(MODEL_HEADER, own);
            return Box::pin(std::future::ready(Ok(response)));
        }
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            response.headers_mut().insert(MODEL_HEADER, own);
            Ok(response)
        })
    }
}

/// When a server stops: `signal` starts the drain, `grace` bounds it.
pub struct Shutdown {
    pub signal: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    pub grace: Duration,
}

impl Shutdown {
    pub fn new(signal: impl Future<Output = ()> + Send + 'static, grace: Duration) -> Self {
        Self { signal: Box::pin(signal), grace }
    }

    /// On SIGINT or SIGTERM.
    pub fn on_signal(grace: Duration) -> Self {
        Self::new(shutdown_signal(), grace)
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Binds `addr` and prints `listening on ADDR` (the real port when 0 was asked) on stdout, so
/// launchers and tests can find a service started on an ephemeral port.
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    println!("listening on {local}");
    tracing::info!(%local, "listening");
    Ok(listener)
}

/// Flags every model service takes.
#[derive(clap::Args, Debug, Clone)]
pub struct ServiceArgs {
    /// Diffusers-layout model folder (e.g. a local copy of stabilityai/stable-diffusion-2-1).
    #[arg(long, env = "SDMESH_MODEL")]
    pub model: std::path::PathBuf,
    /// Address to listen on; port 0 picks a free port (printed as `listening on ADDR`).
    #[arg(long, env = "SDMESH_LISTEN")]
    pub listen: Option<String>,
    /// Device to run on: cpu, or cuda / cuda:N in a build with the `cuda` feature.
    #[arg(long, env = "SDMESH_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Float type of the model's weights and activations: f32, f16 or bf16 (tensors on the
    /// wire stay f32).
    #[arg(long, env = "SDMESH_DTYPE", default_value = "f32", value_parser = crate::parse_dtype)]
    pub dtype: candle_core::DType,
    /// Requests waiting for the model beyond which new ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "SDMESH_QUEUE_CAPACITY", default_value_t = 64)]
    pub queue_capacity: usize,
    #[command(flatten)]
    pub shutdown: ShutdownArgs,
    #[command(flatten)]
    pub telemetry: crate::telemetry::TelemetryArgs,
}

/// How a process stops.
#[derive(clap::Args, Debug, Clone)]
pub struct ShutdownArgs {
    /// Seconds to let in-flight calls finish after SIGTERM/SIGINT before exiting anyway.
    #[arg(long = "shutdown-grace", env = "SDMESH_SHUTDOWN_GRACE", default_value_t = 30)]
    pub grace_seconds: u64,
}

impl ShutdownArgs {
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.grace_seconds)
    }
}

impl ServiceArgs {
    pub fn device(&self) -> Result<candle_core::Device, String> {
        crate::parse_device(&self.device)
    }

    /// Binds `--listen`, or `default` when it was not given.
    pub async fn bind(&self, default: &str) -> std::io::Result<TcpListener> {
        bind(self.listen.as_deref().unwrap_or(default)).await
    }
}

/// The whole `main` of a model service binary: telemetry, bind, serve until SIGTERM, flush.
pub async fn model_service_main<O, F, Fut>(
    service_name: &'static str,
    default_listen: &str,
    args: ServiceArgs,
    options: impl FnOnce(std::path::PathBuf, candle_core::Device, candle_core::DType, usize) -> O,
    run: F,
) -> anyhow::Result<()>
where
    F: FnOnce(O, TcpListener, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let telemetry = crate::telemetry::init(service_name, &args.telemetry).await?;
    let device = args.device().map_err(anyhow::Error::msg)?;
    let listener = args.bind(default_listen).await?;
    tracing::info!(model = %args.model.display(), device = %args.device, dtype = ?args.dtype, "loading the model");
    let opts = options(args.model, device, args.dtype, args.queue_capacity);
    let result = run(opts, listener, Shutdown::on_signal(args.shutdown.grace())).await;
    telemetry.shutdown().await;
    result
}
