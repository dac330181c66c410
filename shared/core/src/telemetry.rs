//! Logs, traces and metrics for every binary.
//!
//! - Logs go to stderr, filtered by RUST_LOG (default `info`): text lines (coloured only on a
//!   terminal), or with `--log-format json` one JSON object per line for a log collector; when
//!   traces are exported, a JSON line written inside a traced span carries its `trace_id` and
//!   `span_id`, so the collector can join the logs of one generation to its trace.
//! - Traces are exported over OTLP/gRPC when an endpoint is set. W3C trace context travels in
//!   the gRPC metadata: [`traced`] injects it into outgoing calls and [`server_span`] (installed
//!   by [`crate::serve::serve`]) extracts it, so one generation is one trace across the mesh.
//! - Metrics are kept by the `metrics` facade and served as Prometheus text on
//!   `--metrics-listen`; [`RpcMetricsLayer`] counts and times every RPC by method and status.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer as _;

/// Telemetry flags every binary takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TelemetryArgs {
    /// OTLP/gRPC endpoint to export traces to (e.g. http://otel-collector:4317); none = no traces.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Address to serve Prometheus metrics on at /metrics (port 0 picks one, printed as
    /// `metrics on ADDR`); none = no metrics endpoint.
    #[arg(long, env = "SDMESH_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Log lines on stderr: text (coloured on a terminal) or json (one object per line:
    /// timestamp, level, target, fields, the spans it is in and, when traces are exported,
    /// trace_id and span_id).
    #[arg(long, env = "SDMESH_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// What [`init`] set up; [`Telemetry::shutdown`] flushes the spans still buffered.
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
}

/// Crates whose spans are exported (the RPC, job and step spans are all ours).
const TRACED_CRATES: &[&str] =
    &["sdmesh_core", "sdmesh_orchestrator", "sdmesh_text_encoder", "sdmesh_unet", "sdmesh_vae", "sdmesh", "sdctl"];

/// Sets up logging, tracing (when `--otlp-endpoint` is set) and the metrics endpoint (when
/// `--metrics-listen` is set). Call once, inside the Tokio runtime, before serving.
pub async fn init(service_name: &'static str, args: &TelemetryArgs) -> anyhow::Result<Telemetry> {
    let dispatch = Arc::new(OnceLock::new());
    let log_filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = match args.log_format {
        LogFormat::Text => {
            use std::io::IsTerminal;
            let ansi = std::io::stderr().is_terminal();
            tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).boxed()
        }
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(JsonWithTraceIds {
                json: tracing_subscriber::fmt::format().json(),
                dispatch: dispatch.clone(),
            })
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(log_filter);
    let tracer_provider = match &args.otlp_endpoint {
        Some(endpoint) => Some(tracer_provider(service_name, endpoint)?),
        None => None,
    };
    let otel = tracer_provider.as_ref().map(|provider| {
        let targets = tracing_subscriber::filter::Targets::new()
            .with_targets(TRACED_CRATES.iter().map(|c| (*c, tracing::Level::INFO)));
        tracing_opentelemetry::layer().with_tracer(provider.tracer(service_name)).with_filter(targets)
    });
    let _ = tracing_subscriber::registry().with(fmt).with(otel).with(RememberDispatch(dispatch)).try_init();
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    if let Some(endpoint) = &args.otlp_endpoint {
        tracing::info!(endpoint = %crate::redact_url(endpoint), "exporting traces over OTLP");
    }
    if let Some(addr) = &args.metrics_listen {
        serve_metrics(addr).await?;
    }
    Ok(Telemetry { tracer_provider })
}

/// The JSON log line, plus the OpenTelemetry `trace_id` and `span_id` (hex, as in
/// `traceparent`) of the innermost traced span the event was written in.
struct JsonWithTraceIds {
    json: tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Json>,
    /// The subscriber: a formatter cannot reach it otherwise (inside an event's dispatch the
    /// thread's default dispatcher reads as none), and the span contexts are kept there.
    dispatch: Arc<OnceLock<tracing::dispatcher::WeakDispatch>>,
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JsonWithTraceIds
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.json.format_event(ctx, tracing_subscriber::fmt::format::Writer::new(&mut line), event)?;
        let dispatch = self.dispatch.get().and_then(|d| d.upgrade());
        let ids = dispatch.and_then(|dispatch| {
            // Spans of crates that are not traced have no context: the nearest traced one counts.
            ctx.parent_span()?.scope().find_map(|span| {
                use opentelemetry::trace::TraceContextExt;
                let context = tracing_opentelemetry::get_otel_context(&span.id(), &dispatch)?;
                let span_context = context.span().span_context().clone();
                span_context.is_valid().then_some(span_context)
            })
        });
        // The JSON formatter writes one object and a newline; the ids go in before its brace.
        match (ids, line.strip_suffix("}\n")) {
            (Some(ids), Some(object)) => {
                writeln!(writer, "{object},\"trace_id\":\"{}\",\"span_id\":\"{}\"}}", ids.trace_id(), ids.span_id())
            }
            _ => writer.write_str(&line),
        }
    }
}

/// Keeps the subscriber it is registered with, for [`JsonWithTraceIds`].
struct RememberDispatch(Arc<OnceLock<tracing::dispatcher::WeakDispatch>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RememberDispatch {
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        let _ = self.0.set(subscriber.downgrade());
    }
}

fn tracer_provider(service_name: &'static str, endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()?;
    // The batch processor that runs on Tokio: the default one exports from a plain thread,
    // where the tonic exporter has no reactor.
    let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
        exporter,
        opentelemetry_sdk::runtime::Tokio,
    )
    .build();
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service_name).build();
    Ok(SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build())
}

impl Telemetry {
    /// Exports the spans still buffered. Call after serving has ended.
    pub async fn shutdown(self) {
        if let Some(provider) = self.tracer_provider {
            // shutdown() blocks until the exporter task (on this runtime) has flushed.
            let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(e)) = flushed {
                eprintln!("flushing traces failed: {e}");
            }
        }
    }
}

/// Installs the Prometheus recorder and serves its text on `addr` at any path (conventionally
/// /metrics); prints `metrics on ADDR`.
async fn serve_metrics(addr: &str) -> anyhow::Result<()> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    const SECONDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)?
        .install_recorder()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    println!("metrics on {local}");
    tracing::info!(%local, "serving Prometheus metrics at /metrics");
    describe_metrics();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let body = http_body_util::Full::new(hyper::body::Bytes::from(handle.render()));
                    let response = http::Response::builder()
                        .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                        .body(body)
                        .expect("static headers are valid");
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    Ok(())
}

fn describe_metrics() {
    metrics::describe_counter!("sdmesh_rpc_requests_total", "gRPC requests served, by method and status code");
    metrics::describe_histogram!("sdmesh_rpc_duration_seconds", "gRPC request latency to the last byte, by method");
    metrics::describe_gauge!("sdmesh_queue_depth", "requests waiting for a model thread");
    metrics::describe_histogram!("sdmesh_model_seconds", "time a model thread spent on one request or batch");
    metrics::describe_histogram!("sdmesh_batch_rows", "rows (images, doubled under guidance) per UNet forward pass");
    metrics::describe_histogram!("sdmesh_batch_requests", "requests (jobs' steps) per UNet forward pass");
    metrics::describe_counter!(
        "sdmesh_conditioning_cache_requests_total",
        "conditioning named by digest on the unet service: stored, hit or miss"
    );
    metrics::describe_counter!(
        "sdmesh_replica_failures_total",
        "calls to another service's replica that got no answer or UNAVAILABLE, by replica"
    );
    metrics::describe_counter!("sdmesh_embedding_cache_requests_total", "prompt-embedding cache look-ups, by result");
    metrics::describe_counter!("sdmesh_embedding_cache_errors_total", "failed prompt-embedding store operations");
    metrics::describe_counter!("sdmesh_jobs_total", "generation jobs, by model and outcome (status code)");
    metrics::describe_histogram!("sdmesh_job_duration_seconds", "generation job latency, by model");
    metrics::describe_counter!("sdmesh_steps_total", "denoising steps run by the orchestrator");
    metrics::describe_counter!(
        "sdmesh_previews_left_out_total",
        "decoded previews not sent: the VAE or safety checker failed, or the checker flagged one under replace"
    );
    metrics::describe_counter!(
        "sdmesh_jobs_restarted_total",
        "jobs run again from their start because a pool no longer serves the model they began on"
    );
    metrics::describe_gauge!("sdmesh_jobs_running", "jobs holding a place to run");
    metrics::describe_gauge!("sdmesh_jobs_waiting", "jobs waiting for a place to run");
    metrics::describe_histogram!("sdmesh_job_wait_seconds", "how long a job that waited for a place waited");
    metrics::describe_counter!(
        "sdmesh_jobs_refused_total",
        "jobs refused before they ran (full line, place taken, outranked, tenant quota), by reason"
    );
    metrics::describe_counter!("sdmesh_tenant_jobs_total", "generation jobs by tenant and outcome (status code)");
    metrics::describe_counter!("sdmesh_tenant_images_total", "images delivered, by tenant");
    metrics::describe_histogram!("sdmesh_tenant_run_seconds", "time each job held a place to run, by tenant");
    metrics::describe_counter!(
        "sdmesh_tenant_quota_errors_total",
        "failed Redis operations of the fleet-wide tenant quota, by operation"
    );
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) =
            (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), tonic::metadata::MetadataValue::try_from(&value))
        {
            self.0.insert(key, value);
        }
    }
}

/// A request carrying the current span's trace context (W3C `traceparent`), so the server's
/// span becomes its child.
pub fn traced<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    inject_current(request.metadata_mut());
    request
}

/// Puts the current span's trace context (W3C `traceparent`) into `metadata`.
pub fn inject_current(metadata: &mut tonic::metadata::MetadataMap) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut MetadataInjector(metadata)));
}

/// Health checks and reflection: neither traced nor counted.
fn is_infrastructure(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.")
}

/// The span of one incoming RPC, child of the caller's trace context when it sent one.
/// Health checks and reflection get none (probes would flood the traces).
pub fn server_span(request: &http::Request<()>) -> tracing::Span {
    let path = request.uri().path();
    if is_infrastructure(path) {
        return tracing::Span::none();
    }
    let span = tracing::info_span!("rpc", otel.name = %path.trim_start_matches('/'), otel.kind = "server", rpc.system = "grpc");
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(request.headers())));
    let _ = span.set_parent(parent);
    span
}

/// Counts and times every RPC but health checks and reflection: `sdmesh_rpc_requests_total{method,code}` and
/// `sdmesh_rpc_duration_seconds{method}`, measured to the end of the response (trailers), so
/// streaming calls and their final status are counted right.
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcMetricsLayer;

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics { inner }
    }
}

#[derive(Clone, Debug)]
pub struct RpcMetrics<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let mut observation =
            RpcObservation { method: request.uri().path().to_string(), start: Instant::now(), done: false };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            // Errors are "trailers-only": the status is in the headers.
            if let Some(code) = grpc_status(response.headers()) {
                observation.finish(code);
            }
            let (parts, body) = response.into_parts();
            Ok(http::Response::from_parts(parts, ObservedBody { inner: body, observation }))
        })
    }
}

/// The gRPC status in `headers` (trailers, or the headers of a trailers-only error response).
pub(crate) fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(tonic::Code::from_i32(value))
}

struct RpcObservation {
    method: String,
    start: Instant,
    done: bool,
}

impl RpcObservation {
    fn finish(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let code = format!("{code:?}");
        metrics::counter!("sdmesh_rpc_requests_total", "method" => self.method.clone(), "code" => code).increment(1);
        metrics::histogram!("sdmesh_rpc_duration_seconds", "method" => self.method.clone())
            .record(self.start.elapsed().as_secs_f64());
    }
}

impl Drop for RpcObservation {
    /// A response dropped before its trailers: the client went away.
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

/// A response body that records the RPC when its trailers (carrying grpc-status) go out.
pub struct ObservedBody<B> {
    inner: B,
    observation: RpcObservation,
}

impl<B: http_body::Body + Unpin> http_body::Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.observation.finish(grpc_status(trailers).unwrap_or(tonic::Code::Ok));
                }
            }
            Poll::Ready(Some(Err(_))) => this.observation.finish(tonic::Code::Internal),
            Poll::Ready(None) => this.observation.finish(tonic::Code::Ok),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
