//! Observability and operability across real processes: OTLP traces that follow one generation
//! through all four services, JSON log lines that name their trace, Prometheus metrics,
//! graceful shutdown on SIGTERM, and `--help`.
//! Needs the workspace binaries built (`cargo build --bins`; `make test` does it first).

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use sdmesh_proto::v1;
use sdmesh_testkit::process::{bin, health, metric, Mesh, MeshOptions, Service};
use std::collections::{BTreeSet, HashMap};
use std::process::{Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic_health::pb::health_check_response::ServingStatus;

const MODEL: &str = "sd21-base-tiny";

/// A small job: 64x48, DDIM, guidance on (so the prompt and the negative prompt are encoded).
fn request(prompt: &str, steps: u32) -> v1::GenerateRequest {
    v1::GenerateRequest {
        prompt: prompt.into(),
        negative_prompt: "blurry".into(),
        steps: Some(steps),
        guidance_scale: Some(7.5),
        seed: Some(42),
        height: Some(64),
        width: Some(48),
        scheduler: Some(v1::SchedulerOptions { name: "ddim".into(), ..Default::default() }),
        ..Default::default()
    }
}

async fn client(addr: &str) -> v1::orchestrator_client::OrchestratorClient<tonic::transport::Channel> {
    v1::orchestrator_client::OrchestratorClient::connect(addr.to_string())
        .await
        .unwrap()
        .max_decoding_message_size(100 << 20)
}

/// Waits (without blocking the runtime) for the process to exit on its own.
async fn wait_exit(service: &mut Service, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = service.child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "process {} did not exit within {timeout:?}", service.child.id());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` until it returns Ok, for at most `timeout`; panics with its last error.
async fn eventually(timeout: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => panic!("{e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Traces

/// One span as an OTLP receiver sees it.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    name: String,
    /// service.name of the exporting process' resource.
    service: String,
    attributes: HashMap<String, String>,
}

fn value_text(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// An in-process OTLP/gRPC trace receiver that keeps every span exported to it.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| value_text(kv.value.as_ref()))
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                received.push(ReceivedSpan {
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                    name: span.name,
                    service: service.clone(),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), value_text(kv.value.as_ref())))
                        .collect(),
                });
            }
        }
        self.spans.lock().unwrap().extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Receiver {
    /// Serves on a free loopback port; `http://ADDR`.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }
}

fn describe(spans: &[ReceivedSpan]) -> String {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    spans
        .iter()
        .map(|s| {
            format!(
                "  {:<20} {:<30} trace {} span {} parent {}",
                s.service,
                s.name,
                &hex(&s.trace_id)[..8.min(2 * s.trace_id.len())],
                hex(&s.span_id),
                hex(&s.parent_span_id)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One Generate call through the four processes, exported over OTLP by each, is one trace:
/// the orchestrator's RPC span is the only root; the job span carries the request's
/// parameters and tenant; each denoising step is a child of the job and the unet's Denoise
/// RPC span is a child of its step; the text-encoder's Encode and the vae's Decode RPC spans
/// are children of the encode_prompts and decode spans; every parent link resolves.
/// Exiting on SIGTERM flushes the spans still buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_generation_is_one_trace_across_processes() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let opts = MeshOptions {
        common_args: vec!["--otlp-endpoint", &endpoint],
        envs: vec![("OTEL_BSP_SCHEDULE_DELAY", "100")],
        ..Default::default()
    };
    let mut mesh = Mesh::start_with(MODEL, &opts).await;
    let steps = 3;
    let mut call = tonic::Request::new(request("a lighthouse at dusk", steps));
    call.metadata_mut().insert("x-sdmesh-tenant", "acme-co".parse().unwrap());
    let response = client(&mesh.orchestrator.addr).await.generate(call).await.unwrap().into_inner();
    assert_eq!(response.images.len(), 1);

    // SIGTERM flushes: every process exits 0 after exporting what it still buffered.
    for s in [&mesh.orchestrator, &mesh.text_encoder, &mesh.unet, &mesh.vae] {
        s.terminate();
    }
    for s in [&mut mesh.orchestrator, &mut mesh.text_encoder, &mut mesh.unet, &mut mesh.vae] {
        let status = wait_exit(s, Duration::from_secs(60)).await;
        assert!(status.success(), "exit status after SIGTERM: {status:?}");
    }

    let all = receiver.spans();
    let generate: Vec<&ReceivedSpan> = all.iter().filter(|s| s.name == "generate").collect();
    assert_eq!(generate.len(), 1, "one generate span:\n{}", describe(&all));
    let generate = generate[0].clone();
    let trace: Vec<ReceivedSpan> = all.iter().filter(|s| s.trace_id == generate.trace_id).cloned().collect();
    let dump = describe(&trace);

    // The job span: the orchestrator's, with the request's parameters and the tenant.
    assert_eq!(generate.service, "sdmesh-orchestrator");
    for (key, value) in [
        ("tenant", "acme-co"),
        ("steps", "3"),
        ("seed", "42"),
        ("width", "48"),
        ("height", "64"),
        ("batch", "1"),
        ("guidance_scale", "7.5"),
        ("model", MODEL),
    ] {
        assert_eq!(generate.attributes.get(key).map(String::as_str), Some(value), "generate.{key}: {generate:?}");
    }
    assert!(generate.attributes.get("scheduler").is_some_and(|s| s.contains("DDIM")), "{generate:?}");

    // Span ids are unique and every parent link resolves to a span of this trace, but one root.
    let ids: BTreeSet<&[u8]> = trace.iter().map(|s| s.span_id.as_slice()).collect();
    assert_eq!(ids.len(), trace.len(), "duplicate span ids:\n{dump}");
    let roots: Vec<&ReceivedSpan> = trace.iter().filter(|s| s.parent_span_id.is_empty()).collect();
    assert_eq!(roots.len(), 1, "one root:\n{dump}");
    assert_eq!(
        (roots[0].service.as_str(), roots[0].name.as_str()),
        ("sdmesh-orchestrator", "sd.v1.Orchestrator/Generate"),
        "the root is the Generate RPC's server span:\n{dump}"
    );
    for s in &trace {
        assert!(
            s.parent_span_id.is_empty() || ids.contains(s.parent_span_id.as_slice()),
            "{} {}: parent not in the trace:\n{dump}",
            s.service,
            s.name
        );
    }
    assert_eq!(generate.parent_span_id, roots[0].span_id, "generate is a child of the Generate RPC:\n{dump}");

    let named = |service: &str, name: &str| -> Vec<&ReceivedSpan> {
        trace.iter().filter(|s| s.service == service && s.name == name).collect()
    };
    let one = |service: &str, name: &str| -> &ReceivedSpan {
        let found = named(service, name);
        assert_eq!(found.len(), 1, "one {service} {name} span:\n{dump}");
        found[0]
    };

    // One step span per denoising step, children of the job; one Denoise RPC under each.
    let step_spans = named("sdmesh-orchestrator", "step");
    assert_eq!(step_spans.len(), steps as usize, "step spans:\n{dump}");
    for s in &step_spans {
        assert_eq!(s.parent_span_id, generate.span_id, "step's parent is generate:\n{dump}");
    }
    let step_numbers: BTreeSet<String> = step_spans.iter().map(|s| s.attributes["step"].clone()).collect();
    assert_eq!(step_numbers, ["0", "1", "2"].map(String::from).into(), "{dump}");
    let denoise = named("sdmesh-unet", "sd.v1.Unet/Denoise");
    assert_eq!(denoise.len(), steps as usize, "Denoise RPC spans:\n{dump}");
    let denoise_parents: BTreeSet<&[u8]> = denoise.iter().map(|s| s.parent_span_id.as_slice()).collect();
    let step_ids: BTreeSet<&[u8]> = step_spans.iter().map(|s| s.span_id.as_slice()).collect();
    assert_eq!(denoise_parents, step_ids, "each Denoise RPC is the child of its own step span:\n{dump}");

    // Prompt encoding: both texts missed the (empty) cache and went to the text-encoder.
    let encode_prompts = one("sdmesh-orchestrator", "encode_prompts");
    assert_eq!(encode_prompts.parent_span_id, generate.span_id, "{dump}");
    assert_eq!(encode_prompts.attributes.get("cache_misses").map(String::as_str), Some("2"), "{encode_prompts:?}");
    assert_eq!(encode_prompts.attributes.get("cache_hits").map(String::as_str), Some("0"), "{encode_prompts:?}");
    let encode = one("sdmesh-text-encoder", "sd.v1.TextEncoder/Encode");
    assert_eq!(encode.parent_span_id, encode_prompts.span_id, "Encode RPC under encode_prompts:\n{dump}");

    let decode = one("sdmesh-orchestrator", "decode");
    assert_eq!(decode.parent_span_id, generate.span_id, "{dump}");
    let vae_decode = one("sdmesh-vae", "sd.v1.Vae/Decode");
    assert_eq!(vae_decode.parent_span_id, decode.span_id, "Decode RPC under decode:\n{dump}");

    // The model threads' spans hang under the RPC that queued the work.
    for rpc in denoise.iter().copied().chain([encode, vae_decode]) {
        let model: Vec<&ReceivedSpan> =
            trace.iter().filter(|s| s.name == "model" && s.parent_span_id == rpc.span_id).collect();
        assert_eq!(model.len(), 1, "one model span under {} {}:\n{dump}", rpc.service, rpc.name);
        assert_eq!(model[0].service, rpc.service, "{dump}");
    }

    let services: BTreeSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        ["sdmesh-orchestrator", "sdmesh-text-encoder", "sdmesh-unet", "sdmesh-vae"].into(),
        "every process contributed to the trace"
    );
    // Health checks make no spans at all (the start-up probes hit every process).
    assert!(!all.iter().any(|s| s.name.contains("grpc.health")), "health check spans:\n{}", describe(&all));
}

/// A client that traces (sdctl with --otlp-endpoint) roots the generation's trace: the
/// orchestrator's GenerateStream span is the child of sdctl's span, in the same trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdctl_roots_the_trace_when_it_exports_one() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let opts = MeshOptions {
        common_args: vec!["--otlp-endpoint", &endpoint],
        envs: vec![("OTEL_BSP_SCHEDULE_DELAY", "100")],
        ..Default::default()
    };
    let mut mesh = Mesh::start_with(MODEL, &opts).await;
    let out = std::env::temp_dir().join(format!("sdmesh-trace-{}.png", std::process::id()));
    let status = Command::new(bin("sdctl"))
        .args(["generate", "--endpoint", &mesh.orchestrator.addr, "--otlp-endpoint", &endpoint, "--quiet"])
        .args(["--prompt", "a traced lighthouse", "--steps", "2", "--height", "64", "--width", "48"])
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let _ = std::fs::remove_file(&out);
    for s in [&mesh.orchestrator, &mesh.text_encoder, &mesh.unet, &mesh.vae] {
        s.terminate();
    }
    for s in [&mut mesh.orchestrator, &mut mesh.text_encoder, &mut mesh.unet, &mut mesh.vae] {
        assert!(wait_exit(s, Duration::from_secs(60)).await.success());
    }
    let all = receiver.spans();
    let root = all.iter().find(|s| s.service == "sdctl" && s.name == "sdctl generate");
    let root = root.unwrap_or_else(|| panic!("no sdctl span:\n{}", describe(&all)));
    assert!(root.parent_span_id.is_empty(), "sdctl's span is the root");
    let trace: Vec<&ReceivedSpan> = all.iter().filter(|s| s.trace_id == root.trace_id).collect();
    let rpc = trace
        .iter()
        .find(|s| s.name == "sd.v1.Orchestrator/GenerateStream")
        .unwrap_or_else(|| panic!("no GenerateStream span in sdctl's trace:\n{}", describe(&all)));
    assert_eq!(rpc.parent_span_id, root.span_id, "the orchestrator's span is sdctl's child");
    assert!(trace.iter().any(|s| s.service == "sdmesh-unet"), "the unet's spans joined the trace");
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// Every process serves Prometheus metrics: RPCs counted by method and status code and timed,
/// model-thread time and queue depth, and the orchestrator's jobs, steps and prompt-embedding
/// cache (the second job with the same prompts is answered from the cache, so the text-encoder
/// serves one Encode for two jobs). A request rejected by validation is counted under its code.
/// `--log-format json` with traces exported: a log line written inside a traced span names
/// that span's trace and span ids (the job's "generate" line: those of the exported generate
/// span), so a log collector can join the logs of one generation to its trace; a line outside
/// any span has neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_carry_the_trace_they_were_written_in() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let model = sdmesh_testkit::model(MODEL);
    let (mut serve, log) = sdmesh_testkit::process::start_with_json_log(
        "sdmesh",
        &["serve", "--model", model.to_str().unwrap(), "--otlp-endpoint", &endpoint],
        "warn,sdmesh_orchestrator=info",
    );
    sdmesh_testkit::process::wait_serving(&serve.addr).await;
    client(&serve.addr).await.generate(request("a logged lighthouse", 2)).await.unwrap();
    let mut lines = Vec::new();
    let generate_line = loop {
        let line = log.recv_timeout(Duration::from_secs(30)).expect("the job's generate log line");
        if line["fields"]["message"] == "generate" {
            break line;
        }
        lines.push(line);
    };
    let ready = lines.iter().find(|l| l["fields"]["message"] == "orchestrator ready");
    let ready = ready.unwrap_or_else(|| panic!("no ready line before the job's: {lines:?}"));
    assert!(ready.get("trace_id").is_none() && ready.get("span_id").is_none(), "{ready}");

    serve.terminate();
    assert!(wait_exit(&mut serve, Duration::from_secs(60)).await.success());
    let all = receiver.spans();
    let span = all.iter().find(|s| s.name == "generate");
    let span = span.unwrap_or_else(|| panic!("no generate span:\n{}", describe(&all)));
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert_eq!(generate_line["trace_id"].as_str(), Some(hex(&span.trace_id).as_str()), "{generate_line}");
    assert_eq!(generate_line["span_id"].as_str(), Some(hex(&span.span_id).as_str()), "{generate_line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_expose_prometheus_metrics() {
    let opts = MeshOptions { common_args: vec!["--metrics-listen", "127.0.0.1:0"], ..Default::default() };
    let mesh = Mesh::start_with(MODEL, &opts).await;
    let steps = 3;
    let mut client = client(&mesh.orchestrator.addr).await;
    for _ in 0..2 {
        let r = client.generate(request("a red bicycle", steps)).await.unwrap().into_inner();
        assert_eq!(r.images.len(), 1);
    }
    let err =
        client.generate(v1::GenerateRequest { height: Some(60), ..request("a red bicycle", steps) }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    let denoise = 2.0 * steps as f64;
    // (service, its name, [(metric, labels, the least value)])
    type Expected<'a> = Vec<(&'a str, &'a [(&'a str, &'a str)], f64)>;
    let checks: Vec<(&Service, &str, Expected)> = vec![
        (
            &mesh.unet,
            "unet",
            vec![
                ("sdmesh_rpc_requests_total", &[("method", "/sd.v1.Unet/Denoise"), ("code", "Ok")], denoise),
                ("sdmesh_rpc_requests_total", &[("method", "/sd.v1.Unet/Denoise")], denoise),
                ("sdmesh_rpc_duration_seconds_count", &[("method", "/sd.v1.Unet/Denoise")], denoise),
                ("sdmesh_model_seconds_count", &[("worker", "unet")], denoise),
                ("sdmesh_queue_depth", &[("worker", "unet")], 0.0),
            ],
        ),
        (
            &mesh.text_encoder,
            "text-encoder",
            vec![
                ("sdmesh_rpc_requests_total", &[("method", "/sd.v1.TextEncoder/Encode"), ("code", "Ok")], 1.0),
                ("sdmesh_rpc_requests_total", &[("method", "/sd.v1.TextEncoder/Encode")], 1.0),
                ("sdmesh_rpc_duration_seconds_count", &[("method", "/sd.v1.TextEncoder/Encode")], 1.0),
                ("sdmesh_model_seconds_count", &[("worker", "text-encoder")], 1.0),
                ("sdmesh_queue_depth", &[("worker", "text-encoder")], 0.0),
            ],
        ),
        (
            &mesh.vae,
            "vae",
            vec![
                ("sdmesh_rpc_requests_total", &[("method", "/sd.v1.Vae/Decode"), ("code", "Ok")], 2.0),
                ("sdmesh_rpc_duration_seconds_count", &[("method", "/sd.v1.Vae/Decode")], 2.0),
                ("sdmesh_model_seconds_count", &[("worker", "vae")], 2.0),
                ("sdmesh_queue_depth", &[("worker", "vae")], 0.0),
            ],
        ),
        (
            &mesh.orchestrator,
            "orchestrator",
            vec![
                ("sdmesh_rpc_requests_total", &[("method", "/sd.v1.Orchestrator/Generate"), ("code", "Ok")], 2.0),
                (
                    "sdmesh_rpc_requests_total",
                    &[("method", "/sd.v1.Orchestrator/Generate"), ("code", "InvalidArgument")],
                    1.0,
                ),
                ("sdmesh_rpc_duration_seconds_count", &[("method", "/sd.v1.Orchestrator/Generate")], 3.0),
                ("sdmesh_jobs_total", &[("code", "Ok")], 2.0),
                ("sdmesh_jobs_total", &[], 2.0),
                ("sdmesh_job_duration_seconds_count", &[], 2.0),
                ("sdmesh_steps_total", &[], denoise),
                ("sdmesh_embedding_cache_requests_total", &[("result", "hit")], 2.0),
                ("sdmesh_embedding_cache_requests_total", &[("result", "miss")], 2.0),
                ("sdmesh_embedding_cache_errors_total", &[], 0.0),
            ],
        ),
    ];
    for (service, what, expected) in &checks {
        // Counted as the last byte goes out, so poll briefly rather than race the response.
        eventually(Duration::from_secs(10), || {
            let text = service.scrape();
            for (name, labels, value) in expected {
                let got = metric(&text, name, labels);
                if got != *value {
                    return Err(format!("{what}: {name}{labels:?} = {got}, expected {value}\n{text}"));
                }
            }
            Ok(())
        })
        .await;
    }
    // The histograms are real Prometheus histograms: cumulative buckets ending in +Inf.
    let text = mesh.unet.scrape();
    assert_eq!(
        metric(&text, "sdmesh_rpc_duration_seconds_bucket", &[("method", "/sd.v1.Unet/Denoise"), ("le", "+Inf")]),
        denoise,
        "{text}"
    );
    assert!(metric(&text, "sdmesh_rpc_duration_seconds_sum", &[("method", "/sd.v1.Unet/Denoise")]) > 0.0, "{text}");
    assert!(text.contains("# TYPE sdmesh_rpc_requests_total counter"), "{text}");
    assert!(text.contains("# HELP sdmesh_rpc_requests_total"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown

/// Seconds one denoising step of [`request`] takes end to end through this mesh (a short
/// unary job, less its fixed cost estimated from a 1-step job).
async fn seconds_per_step(addr: &str) -> f64 {
    let client = client(addr).await;
    let time = |steps: u32| {
        let mut client = client.clone();
        async move {
            let started = Instant::now();
            client.generate(request("timing", steps)).await.unwrap();
            started.elapsed().as_secs_f64()
        }
    };
    time(1).await; // warm-up (fills the embedding cache too)
    let one = time(1).await;
    let many = time(21).await;
    ((many - one) / 20.0).max(1e-4)
}

/// Reads the stream to its end: (progress events, the result if any, the error if any).
async fn drain(
    stream: &mut tonic::Streaming<v1::GenerateEvent>,
    timeout: Duration,
) -> (usize, Option<v1::GenerateResponse>, Option<tonic::Status>) {
    let deadline = Instant::now() + timeout;
    let (mut progress, mut result) = (0, None);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.message()).await {
            Err(_) => panic!("the stream did not end within {timeout:?} ({progress} progress events)"),
            Ok(Ok(None)) => return (progress, result, None),
            Ok(Err(status)) => return (progress, result, Some(status)),
            Ok(Ok(Some(event))) => match event.event {
                Some(v1::generate_event::Event::Progress(_)) => progress += 1,
                Some(v1::generate_event::Event::Result(r)) => result = Some(r),
                Some(v1::generate_event::Event::Waiting(w)) => panic!("no job waits for a place here: {w:?}"),
                None => panic!("an empty event"),
            },
        }
    }
}

/// Starts a GenerateStream and returns it once its first progress event has arrived.
async fn stream_started(
    channel: tonic::transport::Channel,
    request: v1::GenerateRequest,
) -> tonic::Streaming<v1::GenerateEvent> {
    let mut client = v1::orchestrator_client::OrchestratorClient::new(channel).max_decoding_message_size(100 << 20);
    let mut stream = client.generate_stream(request).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(60), stream.message()).await.expect("first event").unwrap();
    assert!(
        matches!(first, Some(v1::GenerateEvent { event: Some(v1::generate_event::Event::Progress(_)) })),
        "first event: {first:?}"
    );
    stream
}

/// SIGTERM to the orchestrator in the middle of a streamed generation: health turns
/// NOT_SERVING (seen on an open Watch), new connections and calls are refused, yet the job in
/// flight runs to the end and its stream delivers every progress event and the image; the
/// Watch ends after NOT_SERVING; then the process exits 0, well before the (default, 30 s)
/// grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_generation_lets_it_finish() {
    let mut mesh = Mesh::start(MODEL).await;
    let addr = mesh.orchestrator.addr.clone();
    // Long enough (about 5 s) that it is surely still running when the checks below are done.
    let per_step = seconds_per_step(&addr).await;
    let steps = ((5.0 / per_step).ceil() as u32).clamp(30, 1000);
    eprintln!("{:.1} ms per step: {steps} steps", per_step * 1e3);

    let channel = tonic::transport::Endpoint::from_shared(addr.clone()).unwrap().connect().await.unwrap();
    let mut health_client = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let mut watch = health_client
        .watch(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    let status = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(status.status, ServingStatus::Serving as i32);

    let started = Instant::now();
    let mut stream = stream_started(channel.clone(), request("a slow lighthouse", steps)).await;
    mesh.orchestrator.terminate();
    let terminated = Instant::now();

    // Health turns NOT_SERVING on the open Watch.
    loop {
        let left = Duration::from_secs(10).saturating_sub(terminated.elapsed());
        let message = tokio::time::timeout(left, watch.message()).await.expect("NOT_SERVING within 10 s");
        let status = message.unwrap().expect("the watch ended before reporting NOT_SERVING");
        if status.status == ServingStatus::NotServing as i32 {
            break;
        }
    }
    let not_serving_after = terminated.elapsed();
    // Then the Watch ends by itself: an open Watch must not hold the drain.
    let end = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.expect("the Watch did not end");
    assert!(matches!(end, Ok(None)), "the Watch ended with {end:?}");

    // The listener closes: new connections are refused (health unreachable), so a new
    // Generate fails, on a connection of its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&addr).await.is_some() {
        assert!(Instant::now() < deadline, "still accepting connections 10 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = match v1::orchestrator_client::OrchestratorClient::connect(addr.clone()).await {
        Err(e) => format!("connect: {e}"),
        Ok(mut c) => {
            let r = tokio::time::timeout(Duration::from_secs(10), c.generate(request("too late", 1))).await;
            format!("{:?}", r.expect("a new call after SIGTERM hung").expect_err("a new call after SIGTERM was served"))
        }
    };
    eprintln!("new call after SIGTERM: {refused}");

    // The job in flight still finishes, with every step and the image.
    let (progress, result, error) = drain(&mut stream, Duration::from_secs(120)).await;
    assert!(error.is_none(), "the in-flight stream failed: {error:?}");
    let result = result.expect("the in-flight job's result");
    assert_eq!(progress + 1, steps as usize, "every progress event (the first was read before SIGTERM)");
    assert_eq!(result.images.len(), 1);
    assert!(result.images[0].png.starts_with(b"\x89PNG"), "a PNG");
    let finished_after = terminated.elapsed();
    eprintln!(
        "job of {steps} steps: {:.2} s; SIGTERM after {:.2} s; NOT_SERVING {:.0} ms after it; finished {:.2} s after it",
        started.elapsed().as_secs_f64(),
        (terminated - started).as_secs_f64(),
        not_serving_after.as_secs_f64() * 1e3,
        finished_after.as_secs_f64()
    );

    drop(stream);
    drop(channel);
    let status = wait_exit(&mut mesh.orchestrator, Duration::from_secs(15)).await;
    assert!(status.success(), "orchestrator exit status: {status:?}");
    assert!(
        terminated.elapsed() < Duration::from_secs(25),
        "exited {:?} after SIGTERM: it waited for the grace period rather than the drain",
        terminated.elapsed()
    );
}

/// With `--shutdown-grace 1`, a job that needs far longer than the grace does not hold the
/// process: it exits about a second after SIGTERM and the job's stream ends with UNAVAILABLE
/// (retryable) without a result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_grace_period_stops_the_job() {
    let opts = MeshOptions { orchestrator_args: vec!["--shutdown-grace", "1"], ..Default::default() };
    let mut mesh = Mesh::start_with(MODEL, &opts).await;
    let addr = mesh.orchestrator.addr.clone();
    // 999 steps (the most DDIM allows with this config): tens of seconds, far beyond the grace.
    let job = request("an endless lighthouse", 999);
    let channel = tonic::transport::Endpoint::from_shared(addr.clone()).unwrap().connect().await.unwrap();
    let mut stream = stream_started(channel.clone(), job).await;
    mesh.orchestrator.terminate();
    let terminated = Instant::now();
    let status = wait_exit(&mut mesh.orchestrator, Duration::from_secs(20)).await;
    let exited_after = terminated.elapsed();
    eprintln!("exited {:.2} s after SIGTERM with {status:?}", exited_after.as_secs_f64());
    assert!(status.success(), "orchestrator exit status: {status:?}");
    assert!(exited_after >= Duration::from_millis(900), "exited {exited_after:?} after SIGTERM, before the grace");
    assert!(exited_after < Duration::from_secs(8), "exited {exited_after:?} after SIGTERM; the grace is 1 s");
    let (progress, result, error) = drain(&mut stream, Duration::from_secs(30)).await;
    assert!(result.is_none(), "the job finished ({progress} progress events): make it longer");
    assert!(progress + 1 < 999);
    let error = error.expect("the stream of a job cut short ended without an error");
    eprintln!("stream ended after {} steps with {error:?}", progress + 1);
    assert_eq!(error.code(), tonic::Code::Unavailable, "a job cut by shutdown should be retryable: {error:?}");
}

// ---------------------------------------------------------------------------------------------
// Command-line help

/// `--help` of a binary: its long flags, each with the text that follows it.
fn flags(help: &str) -> Vec<(String, String)> {
    let mut flags: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if indent > 0 && trimmed.starts_with('-') && indent < 10 {
            // "-h, --help" or "--model <MODEL>  text..."
            let spec = trimmed.split("  ").next().unwrap();
            let rest = trimmed[spec.len()..].trim();
            let long = spec.split([',', ' ']).find(|w| w.starts_with("--")).unwrap_or(spec).to_string();
            flags.push((long, rest.to_string()));
        } else if let Some((_, text)) = flags.last_mut() {
            if line.trim().is_empty() {
                continue;
            }
            text.push(' ');
            text.push_str(line.trim());
        }
    }
    flags
}

/// Strips the `[env: ..]`, `[default: ..]` and `[possible values: ..]` notes from help text.
fn description(text: &str) -> String {
    let mut out = text.to_string();
    for note in ["[env: ", "[default: ", "[possible values: ", "[aliases: "] {
        while let Some(start) = out.find(note) {
            let end = out[start..].find(']').map_or(out.len(), |e| start + e + 1);
            out.replace_range(start..end, "");
        }
    }
    out.trim().to_string()
}

/// Every binary's `--help` exits 0 and explains every flag; the services' flags each name the
/// environment variable that sets them; and a secret set through the environment (the Redis
/// password) is never echoed by `--help`.
#[test]
fn every_binary_has_readable_help() {
    let cases: &[(&str, &[&str], bool)] = &[
        ("sdmesh-text-encoder", &[], true),
        ("sdmesh-unet", &[], true),
        ("sdmesh-vae", &[], true),
        ("sdmesh-depth", &[], true),
        ("sdmesh-safety", &[], true),
        ("sdmesh-orchestrator", &[], true),
        ("sdmesh", &["serve"], true),
        ("sdctl", &["generate"], false),
        ("sdctl", &["img2img"], false),
        ("sdctl", &["inpaint"], false),
        ("sdctl", &["depth"], false),
        ("sdctl", &["upscale"], false),
        ("sdctl", &["check"], false),
    ];
    // The parser itself: a flag with no text, or with only notes, is caught.
    let sample = "Options:\n      --a <A>\n          \n      --b <B>\n          [env: B=] [default: 1]\n      --c <C>\n          Cee [env: C=]\n  -h, --help\n          Print help\n";
    let parsed: Vec<(String, String)> = flags(sample).into_iter().map(|(f, t)| (f, description(&t))).collect();
    assert_eq!(
        parsed,
        [("--a", ""), ("--b", ""), ("--c", "Cee"), ("--help", "Print help")]
            .map(|(f, t)| (f.to_string(), t.to_string()))
    );
    let mut problems = Vec::new();
    for (name, args, service) in cases {
        let out = Command::new(bin(name))
            .args(*args)
            .arg("--help")
            .env("SDMESH_REDIS_URL", "redis://:hunter2@localhost:6379")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        let what = format!("{name} {}", args.join(" "));
        assert!(out.status.success(), "{what} --help: {:?}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
        assert!(!help.contains("hunter2"), "{what} --help shows the Redis password:\n{help}");
        let flags = flags(&help);
        assert!(flags.iter().any(|(f, _)| f == "--help"), "{what}: no flags found in\n{help}");
        for (flag, text) in &flags {
            if flag == "--help" || flag == "--version" {
                continue;
            }
            if description(text).is_empty() {
                problems.push(format!("{what}: {flag} has no help text"));
            }
            if *service && !text.contains("[env: ") {
                problems.push(format!("{what}: {flag} names no environment variable"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
