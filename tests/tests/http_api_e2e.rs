//! The orchestrator's HTTP/JSON API across real processes (`--http-listen`): the same job as
//! over gRPC gives the same bytes, unary and as Server-Sent Events; the models list; bad input
//! is 400, backpressure 429 with Retry-After, a missed deadline 504; the tenant header counts;
//! every JSON answer conforms to the OpenAPI document the orchestrator serves. With
//! `--api-keys-file`, each call needs a key, over HTTP and gRPC (sdctl), and runs for the key's
//! tenant.

use sdmesh_proto::v1;
use sdmesh_testkit::process::{http_request, metric, Mesh, MeshOptions, Service};
use std::time::Duration;

fn http(orchestrator: &Service) -> &str {
    orchestrator.http.as_deref().expect("started with --http-listen")
}

/// Checks `value` against the schema `name` of the OpenAPI document `doc`.
fn conforms(doc: &serde_json::Value, name: &str, value: &serde_json::Value) {
    let root = serde_json::json!({"$ref": format!("#/components/schemas/{name}"), "components": doc["components"]});
    let validator = jsonschema::draft202012::new(&root).expect("the document's schemas compile");
    let errors: Vec<String> = validator.iter_errors(value).map(|e| format!("{e} at {}", e.instance_path())).collect();
    assert!(errors.is_empty(), "{name}: {errors:?}\n{value}");
}

const JOB: &str = r#"{"prompt": "a quiet street", "steps": 4, "seed": "7", "height": 32, "width": 32}"#;

#[tokio::test]
async fn the_http_api_runs_the_same_jobs_as_grpc() {
    let opts = MeshOptions {
        common_args: vec!["--metrics-listen", "127.0.0.1:0"],
        orchestrator_args: vec!["--http-listen", "127.0.0.1:0", "--max-jobs", "1", "--max-waiting-jobs", "0"],
        ..Default::default()
    };
    let mesh = Mesh::start_with("sd21-base-tiny", &opts).await;
    let orchestrator = &mesh.orchestrator;
    let addr = http(orchestrator).to_string();
    let mut grpc = v1::orchestrator_client::OrchestratorClient::connect(orchestrator.addr.clone()).await.unwrap();
    let request: v1::GenerateRequest = serde_json::from_str(JOB).unwrap();
    let expected = grpc.generate(request.clone()).await.unwrap().into_inner();

    // Unary: the GenerateResponse in JSON, with the same PNG (base64), for tenant h.
    let json = [("content-type", "application/json"), ("x-sdmesh-tenant", "h")];
    let response = http_request(&addr, "POST", "/v1/generate", &json, JOB.as_bytes());
    assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
    assert_eq!(response.header("content-type"), Some("application/json"));
    let got: v1::GenerateResponse = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(got.images, expected.images);
    assert_eq!(response.json()["seed"], "7", "64-bit integers are strings, as the JSON mapping says");

    // Ready for load balancers that cannot ask gRPC health.
    let healthz = http_request(&addr, "GET", "/healthz", &[], b"");
    assert_eq!((healthz.status, healthz.json()["status"].as_str()), (200, Some("SERVING")));

    // The OpenAPI document, which every JSON answer below conforms to.
    let openapi = http_request(&addr, "GET", "/v1/openapi.json", &[], b"");
    assert_eq!((openapi.status, openapi.header("content-type")), (200, Some("application/json")));
    let doc = openapi.json();
    assert_eq!(doc["openapi"], "3.1.1");
    assert!(doc["paths"]["/v1/generate"]["post"].is_object(), "{doc}");
    conforms(&doc, "GenerateResponse", &response.json());

    // Accept: image/png or image/jpeg: the image itself, its seed in a header.
    let accept_png = [("accept", "image/png")];
    let response = http_request(&addr, "POST", "/v1/generate", &accept_png, JOB.as_bytes());
    assert_eq!((response.status, response.header("content-type")), (200, Some("image/png")));
    assert_eq!(response.body, expected.images[0].png);
    assert_eq!(response.header("x-sdmesh-seed"), Some("7"));
    let accept_jpeg = [("accept", "image/jpeg")];
    let response = http_request(&addr, "POST", "/v1/generate", &accept_jpeg, JOB.as_bytes());
    assert_eq!((response.status, response.header("content-type")), (200, Some("image/jpeg")));
    assert_eq!(&response.body[..2], b"\xFF\xD8");
    let two = br#"{"prompt": "x", "steps": 2, "numImages": 2, "height": 32, "width": 32}"#;
    let response = http_request(&addr, "POST", "/v1/generate", &accept_png, two);
    assert_eq!(response.status, 400);
    assert!(response.json()["error"]["message"].as_str().unwrap().contains("num_images"));

    // Streamed: progress events, then the result, as Server-Sent Events.
    let response = http_request(&addr, "POST", "/v1/generate/stream", &json, JOB.as_bytes());
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    let events: Vec<v1::GenerateEvent> = String::from_utf8(response.body)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|data| {
            conforms(&doc, "GenerateEvent", &serde_json::from_str(data).unwrap());
            serde_json::from_str(data).unwrap()
        })
        .collect();
    assert_eq!(events.len(), 5, "{events:?}");
    let steps: Vec<u32> = events[..4]
        .iter()
        .map(|e| match &e.event {
            Some(v1::generate_event::Event::Progress(p)) => p.step,
            other => panic!("a progress event: {other:?}"),
        })
        .collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    let Some(v1::generate_event::Event::Result(result)) = &events[4].event else { panic!("the result last") };
    assert_eq!(result.images, expected.images);

    // The models.
    let models = http_request(&addr, "GET", "/v1/models", &[], b"").json();
    assert_eq!(models["models"][0]["name"], "sd21-base-tiny");
    assert_eq!(models["models"][0]["isDefault"], true);
    conforms(&doc, "ListModelsResponse", &models);

    // The caller's mistakes: 400, with the gRPC status and the message.
    let response = http_request(&addr, "POST", "/v1/generate", &json, b"{\"prompt\": ");
    assert_eq!(response.status, 400);
    assert_eq!(response.json()["error"]["status"], "INVALID_ARGUMENT");
    conforms(&doc, "Error", &response.json());
    let response = http_request(&addr, "POST", "/v1/generate", &json, br#"{"prompt": "x", "steps": 0}"#);
    assert_eq!(response.status, 400);
    assert!(response.json()["error"]["message"].as_str().unwrap().contains("steps"), "{}", response.json());

    // Backpressure: with one long job running and no line, 429 and when to retry.
    let mut long_request = request.clone();
    long_request.steps = Some(900);
    long_request.height = Some(128);
    long_request.width = Some(128);
    let mut long = grpc.generate_stream(long_request.clone()).await.unwrap().into_inner();
    long.message().await.unwrap().expect("a progress event");
    let response = http_request(&addr, "POST", "/v1/generate", &json, JOB.as_bytes());
    assert_eq!(response.status, 429, "{}", String::from_utf8_lossy(&response.body));
    assert_eq!(response.json()["error"]["status"], "RESOURCE_EXHAUSTED");
    conforms(&doc, "Error", &response.json());
    assert!(response.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    drop(long);

    // A deadline (grpc-timeout) the job cannot meet: 504, counted as DeadlineExceeded.
    let body = serde_json::to_vec(&long_request).unwrap();
    let deadline = [("content-type", "application/json"), ("grpc-timeout", "300m")];
    let started = std::time::Instant::now();
    let response = loop {
        // The long job's place frees as soon as its cancellation lands.
        let response = http_request(&addr, "POST", "/v1/generate", &deadline, &body);
        if response.status != 429 {
            break response;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the long job's place was never given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(response.status, 504, "{}", String::from_utf8_lossy(&response.body));
    assert_eq!(response.json()["error"]["status"], "DEADLINE_EXCEEDED");

    let text = orchestrator.scrape();
    assert_eq!(metric(&text, "sdmesh_tenant_jobs_total", &[("tenant", "h"), ("code", "Ok")]), 2.0);
    assert_eq!(metric(&text, "sdmesh_jobs_total", &[("code", "Ok")]), 5.0);
    assert_eq!(metric(&text, "sdmesh_jobs_total", &[("code", "DeadlineExceeded")]), 1.0);
}

/// SHA-256 of `key`, in hex, as `sha256sum` prints it (what the keys file holds).
fn sha256_hex(key: &str) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(key.as_bytes())?;
            child.wait_with_output()
        })
        .expect("sha256sum runs");
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

#[tokio::test]
async fn with_api_keys_each_call_needs_one_and_runs_for_its_tenant() {
    let keys = std::env::temp_dir().join(format!("sdmesh-api-keys-{}.toml", std::process::id()));
    // acme's entry written by hand with sha256sum; the gateway's made by `sdctl api-key`.
    let made = std::process::Command::new(sdmesh_testkit::process::bin("sdctl"))
        .args(["api-key", "--any-tenant"])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let gateway_key = String::from_utf8(made.stderr).unwrap().trim().rsplit(' ').next().unwrap().to_string();
    let text = format!("[[keys]]\ntenant = \"acme\"\nmax_jobs = 1\nsha256 = \"{}\"\n\n", sha256_hex("acme-secret"))
        + &format!("[[keys]]\ntenant = \"beta\"\nfleet_max_jobs = 1\nsha256 = \"{}\"\n\n", sha256_hex("beta-secret"))
        + &String::from_utf8(made.stdout).unwrap();
    std::fs::write(&keys, text).unwrap();
    // The fleet-wide quota (4 jobs a tenant), for beta's key's own bound.
    let redis = sdmesh_testkit::process::RedisServer::start();
    let url = redis.url();
    let opts = MeshOptions {
        common_args: vec!["--metrics-listen", "127.0.0.1:0"],
        orchestrator_args: vec![
            "--http-listen",
            "127.0.0.1:0",
            "--api-keys-file",
            keys.to_str().unwrap(),
            "--redis-url",
            &url,
            "--fleet-max-jobs-per-tenant",
            "4",
        ],
        ..Default::default()
    };
    let mesh = Mesh::start_with("sd21-base-tiny", &opts).await;
    let addr = http(&mesh.orchestrator).to_string();
    let doc = http_request(&addr, "GET", "/v1/openapi.json", &[], b"").json();

    // HTTP: none or a wrong key is 401, saying what to send; acme's key naming another tenant 403.
    for headers in [vec![], vec![("authorization", "Bearer wrong")]] {
        let response = http_request(&addr, "POST", "/v1/generate", &headers, JOB.as_bytes());
        assert_eq!((response.status, response.header("www-authenticate")), (401, Some("Bearer")));
        assert_eq!(response.json()["error"]["status"], "UNAUTHENTICATED");
        conforms(&doc, "Error", &response.json());
        assert_eq!(http_request(&addr, "GET", "/v1/models", &headers, b"").status, 401);
    }
    let acme = ("authorization", "Bearer acme-secret");
    let response = http_request(&addr, "POST", "/v1/generate", &[acme, ("x-sdmesh-tenant", "zeta")], JOB.as_bytes());
    assert_eq!(response.status, 403, "{}", String::from_utf8_lossy(&response.body));
    let response = http_request(&addr, "POST", "/v1/generate", &[acme], JOB.as_bytes());
    assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
    assert_eq!(http_request(&addr, "GET", "/v1/models", &[acme], b"").status, 200);
    // The gateway's key runs calls for the tenant they name.
    let gateway_auth = format!("Bearer {gateway_key}");
    let gateway = [("authorization", gateway_auth.as_str()), ("x-sdmesh-tenant", "zeta")];
    assert_eq!(http_request(&addr, "POST", "/v1/generate", &gateway, JOB.as_bytes()).status, 200);

    // gRPC, through sdctl: --api-key (or SDMESH_API_KEY) is the key.
    let sdctl = |args: &[&str], key: Option<&str>| {
        let mut command = std::process::Command::new(sdmesh_testkit::process::bin("sdctl"));
        command.args(args).args(["--endpoint", &mesh.orchestrator.addr]).env_remove("SDMESH_API_KEY");
        if let Some(key) = key {
            command.env("SDMESH_API_KEY", key);
        }
        command.output().unwrap()
    };
    let out_png = std::env::temp_dir().join(format!("sdmesh-api-keys-{}.png", std::process::id()));
    let job = ["generate", "--quiet", "--prompt", "a quiet street", "--steps", "2", "--height", "32", "--width", "32"];
    let job: Vec<&str> = job.into_iter().chain(["--out", out_png.to_str().unwrap()]).collect();
    let refused = sdctl(&job, None);
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"));
    let models = sdctl(&["models"], None);
    assert!(!models.status.success() && String::from_utf8_lossy(&models.stderr).contains("Unauthenticated"));
    let ran = sdctl(&job, Some("acme-secret"));
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
    assert!(sdctl(&["models"], Some("acme-secret")).status.success());

    // Each job counted for its key's tenant.
    let text = mesh.orchestrator.scrape();
    assert_eq!(metric(&text, "sdmesh_tenant_jobs_total", &[("tenant", "acme"), ("code", "Ok")]), 2.0);
    assert_eq!(metric(&text, "sdmesh_tenant_jobs_total", &[("tenant", "zeta"), ("code", "Ok")]), 1.0);

    // acme's key holds it to one job at a time (max_jobs = 1): its second waits, while the
    // gateway's tenant runs at once.
    let stream = |key: &str, tenant: Option<&str>| {
        let mut request = tonic::Request::new(v1::GenerateRequest {
            prompt: "a long walk".into(),
            steps: Some(500),
            height: Some(32),
            width: Some(32),
            ..Default::default()
        });
        request.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
        if let Some(tenant) = tenant {
            request.metadata_mut().insert("x-sdmesh-tenant", tenant.parse().unwrap());
        }
        let addr = mesh.orchestrator.addr.clone();
        async move {
            let mut client = v1::orchestrator_client::OrchestratorClient::connect(addr).await.unwrap();
            let mut events = client.generate_stream(request).await.unwrap().into_inner();
            let first = events.message().await.unwrap().unwrap().event.unwrap();
            (first, events)
        }
    };
    let (first, _running) = stream("acme-secret", None).await;
    assert!(matches!(first, v1::generate_event::Event::Progress(_)), "{first:?}");
    let (second, _waiting) = stream("acme-secret", None).await;
    assert!(matches!(second, v1::generate_event::Event::Waiting(_)), "acme's second job waits: {second:?}");
    let (other, _other) = stream(&gateway_key, Some("zeta")).await;
    assert!(matches!(other, v1::generate_event::Event::Progress(_)), "another tenant's runs: {other:?}");

    // beta's key holds it to one job across the orchestrators sharing Redis (fleet_max_jobs =
    // 1, below the flag's 4): its second is refused at once, naming the key's bound.
    let (first, _beta) = stream("beta-secret", None).await;
    assert!(matches!(first, v1::generate_event::Event::Progress(_)), "{first:?}");
    let mut request = tonic::Request::new(v1::GenerateRequest { prompt: "again".into(), ..Default::default() });
    request.metadata_mut().insert("authorization", "Bearer beta-secret".parse().unwrap());
    let mut client =
        v1::orchestrator_client::OrchestratorClient::connect(mesh.orchestrator.addr.clone()).await.unwrap();
    let Err(refused) = client.generate(request).await else { panic!("beta's second job ran") };
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("fleet_max_jobs = 1"), "{}", refused.message());
    assert_eq!(redis.command(&["ZCARD", "sdmesh:tenant-jobs:{beta}"]).unwrap(), ":1");
    std::fs::remove_file(keys).unwrap();
    std::fs::remove_file(out_png).unwrap();
}

/// `GET /healthz` is 503 while the orchestrator waits for its model services (here, none is
/// up), as its gRPC health says NOT_SERVING.
#[tokio::test]
async fn healthz_is_503_until_the_model_services_answer() {
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let nowhere = format!("http://{nowhere}");
    let sd = sdmesh_testkit::model("sd21-base-tiny");
    let orchestrator = sdmesh_testkit::process::start(
        "sdmesh-orchestrator",
        &["--model", sd.to_str().unwrap(), "--http-listen", "127.0.0.1:0"],
        &[("SDMESH_TEXT_ENCODER_URL", &nowhere), ("SDMESH_UNET_URL", &nowhere), ("SDMESH_VAE_URL", &nowhere)],
    );
    let healthz = http_request(http(&orchestrator), "GET", "/healthz", &[], b"");
    assert_eq!((healthz.status, healthz.json()["status"].as_str()), (503, Some("NOT_SERVING")));
    assert_eq!(sdmesh_testkit::process::health(&orchestrator.addr).await, Some(2), "gRPC health: NOT_SERVING");
}
