//! The orchestrator's admission across real processes (`--max-jobs 1 --max-waiting-jobs 1`): a
//! job beyond the running bound waits for its turn, one beyond the line is refused at once with
//! RESOURCE_EXHAUSTED and a retry hint, and a waiting job whose caller goes away leaves the line.
//! `sdctl --wait` retries a refused job after the hint. A job past its caller's deadline ends
//! with DEADLINE_EXCEEDED, unary or streamed, and a job whose caller goes away counts as
//! cancelled. On SIGTERM, jobs still waiting are refused with UNAVAILABLE at once, and the
//! running job finishes. Orchestrators that share a Redis hold each tenant to
//! `--fleet-max-jobs-per-tenant` between them, and a dead orchestrator's jobs stop counting once
//! their leases expire.

use sdmesh_proto::v1;
use sdmesh_testkit::process::{bin, metric, Mesh, MeshOptions, RedisServer, Service};
use std::time::{Duration, Instant};

fn request(steps: u32, side: u32) -> v1::GenerateRequest {
    v1::GenerateRequest {
        prompt: "a quiet street".into(),
        steps: Some(steps),
        seed: Some(7),
        height: Some(side),
        width: Some(side),
        ..Default::default()
    }
}

/// `message` with the metadata `key: value`.
fn with_metadata<T>(message: T, key: &'static str, value: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(key, value.parse().unwrap());
    request
}

fn tenant<T>(message: T, name: &str) -> tonic::Request<T> {
    with_metadata(message, "x-sdmesh-tenant", name)
}

async fn client(orchestrator: &Service) -> v1::orchestrator_client::OrchestratorClient<tonic::transport::Channel> {
    v1::orchestrator_client::OrchestratorClient::connect(orchestrator.addr.clone()).await.unwrap()
}

/// Waits until the orchestrator's metrics say `running` and `waiting` jobs.
async fn wait_for_counts(orchestrator: &Service, running: f64, waiting: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = orchestrator.scrape();
        let now = (metric(&text, "sdmesh_jobs_running", &[]), metric(&text, "sdmesh_jobs_waiting", &[]));
        if now == (running, waiting) {
            return;
        }
        assert!(Instant::now() < deadline, "jobs (running, waiting): {now:?}, expected ({running}, {waiting})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn jobs_wait_for_their_turn_and_a_full_line_refuses_at_once() {
    let opts = MeshOptions {
        common_args: vec!["--metrics-listen", "127.0.0.1:0"],
        orchestrator_args: vec!["--max-jobs", "1", "--max-waiting-jobs", "1"],
        ..Default::default()
    };
    let mesh = Mesh::start_with("sd21-base-tiny", &opts).await;
    let orchestrator = &mesh.orchestrator;
    let expected = client(orchestrator).await.generate(request(4, 32)).await.unwrap().into_inner().images;

    // A long job (seconds) runs (its first step is done) ...
    let mut long =
        client(orchestrator).await.generate_stream(tenant(request(900, 128), "a")).await.unwrap().into_inner();
    long.message().await.unwrap().expect("a progress event");
    // ... so the next waits ...
    let mut waiting_client = client(orchestrator).await;
    let waiting = tokio::spawn(async move { waiting_client.generate(tenant(request(4, 32), "a")).await });
    wait_for_counts(orchestrator, 1.0, 1.0).await;
    // ... and one more finds the line full: refused at once, with a hint of when to retry.
    let started = Instant::now();
    let status = client(orchestrator).await.generate(tenant(request(4, 32), "a")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("--max-waiting-jobs"), "{}", status.message());
    assert!(sdmesh_core::retry_after(&status).is_some(), "a RetryInfo detail");
    assert!(started.elapsed() < Duration::from_secs(5), "refused at once, not after waiting");

    // The waiting job's caller goes away: it leaves the line.
    waiting.abort();
    wait_for_counts(orchestrator, 1.0, 0.0).await;
    // Another tenant's job waits, and runs once the long job's caller goes away.
    let mut next_client = client(orchestrator).await;
    let next = tokio::spawn(async move { next_client.generate(tenant(request(4, 32), "b")).await });
    wait_for_counts(orchestrator, 1.0, 1.0).await;
    assert!(!next.is_finished());
    drop(long);
    let images = next.await.unwrap().expect("the waiting job ran").into_inner().images;
    assert_eq!(images, expected, "a job that waited gives the same bytes");
    wait_for_counts(orchestrator, 0.0, 0.0).await;
    let text = orchestrator.scrape();
    assert_eq!(metric(&text, "sdmesh_jobs_refused_total", &[("reason", "line_full")]), 1.0);
    assert!(metric(&text, "sdmesh_job_wait_seconds_count", &[]) >= 1.0);
    // Usage per tenant: b's one job, its image and its time running; a's aborted one.
    assert_eq!(metric(&text, "sdmesh_tenant_jobs_total", &[("tenant", "b"), ("code", "Ok")]), 1.0);
    assert_eq!(metric(&text, "sdmesh_tenant_images_total", &[("tenant", "b")]), 1.0);
    assert_eq!(metric(&text, "sdmesh_tenant_run_seconds_count", &[("tenant", "b")]), 1.0);
    assert!(metric(&text, "sdmesh_tenant_run_seconds_sum", &[("tenant", "b")]) > 0.0);
    assert!(metric(&text, "sdmesh_tenant_jobs_total", &[("tenant", "a"), ("code", "Cancelled")]) >= 1.0);

    // sdctl, with the line full: without --wait it fails at once, saying why; with --wait it
    // retries after the hint until the job is taken, and writes the image.
    let mut long = client(orchestrator).await.generate_stream(request(900, 128)).await.unwrap().into_inner();
    long.message().await.unwrap().expect("a progress event");
    let mut waiting_client = client(orchestrator).await;
    let waiting = tokio::spawn(async move { waiting_client.generate(request(4, 32)).await });
    wait_for_counts(orchestrator, 1.0, 1.0).await;
    let out = std::env::temp_dir().join(format!("sdmesh-admission-{}.png", std::process::id()));
    let sdctl = |wait: &str| {
        let mut command = tokio::process::Command::new(bin("sdctl"));
        command.args(["generate", "--endpoint", &orchestrator.addr, "--quiet", "--wait", wait]);
        command.args(["--prompt", "a quiet street", "--steps", "4", "--height", "32", "--width", "32", "--seed", "7"]);
        command.arg("--out").arg(&out);
        command.output()
    };
    let refused = sdctl("0").await.unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--max-waiting-jobs"), "{stderr}");
    let patient = tokio::spawn(sdctl("60"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!patient.is_finished(), "sdctl waits while the line is full");
    drop(long);
    waiting.await.unwrap().expect("the waiting job ran");
    let patient = patient.await.unwrap().unwrap();
    assert!(patient.status.success(), "sdctl --wait: {}", String::from_utf8_lossy(&patient.stderr));
    let png = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    assert_eq!(png, expected[0].png, "the same image as the job that never waited");
}

#[tokio::test]
async fn a_job_past_its_deadline_ends_with_deadline_exceeded() {
    let opts = MeshOptions { common_args: vec!["--metrics-listen", "127.0.0.1:0"], ..Default::default() };
    let mesh = Mesh::start_with("sd21-base-tiny", &opts).await;
    let orchestrator = &mesh.orchestrator;
    let exceeded = || metric(&orchestrator.scrape(), "sdmesh_jobs_total", &[("code", "DeadlineExceeded")]);

    // Unary: the caller sees DEADLINE_EXCEEDED (tonic alone would answer CANCELLED).
    let mut long = tonic::Request::new(request(900, 128));
    long.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let status = client(orchestrator).await.generate(long).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "stopped at the deadline, not at the job's end");
    assert_eq!(exceeded(), 1.0);

    // Streamed, through sdctl --timeout: the job stops at the deadline too.
    let out = std::env::temp_dir().join(format!("sdmesh-deadline-{}.png", std::process::id()));
    let sdctl = tokio::process::Command::new(bin("sdctl"))
        .args(["generate", "--endpoint", &orchestrator.addr, "--quiet", "--timeout", "0.3"])
        .args(["--prompt", "a quiet street", "--steps", "900", "--height", "128", "--width", "128"])
        .arg("--out")
        .arg(&out)
        .output()
        .await
        .unwrap();
    assert!(!sdctl.status.success());
    let stderr = String::from_utf8_lossy(&sdctl.stderr);
    assert!(stderr.contains("deadline"), "{stderr}");
    assert!(!out.exists());
    assert_eq!(exceeded(), 2.0);

    // A caller that goes away: the job is cancelled, and counted so.
    let mut caller = client(orchestrator).await;
    let gone = tokio::spawn(async move { caller.generate(request(900, 128)).await });
    wait_for_counts(orchestrator, 1.0, 0.0).await;
    gone.abort();
    wait_for_counts(orchestrator, 0.0, 0.0).await;
    assert_eq!(metric(&orchestrator.scrape(), "sdmesh_jobs_total", &[("code", "Cancelled")]), 1.0);
}

#[tokio::test]
async fn on_sigterm_waiting_jobs_go_elsewhere_at_once_and_the_running_one_finishes() {
    let opts = MeshOptions {
        common_args: vec!["--metrics-listen", "127.0.0.1:0"],
        orchestrator_args: vec!["--max-jobs", "1", "--max-waiting-jobs", "4", "--shutdown-grace", "60"],
        ..Default::default()
    };
    let mut mesh = Mesh::start_with("sd21-base-tiny", &opts).await;
    let expected = client(&mesh.orchestrator).await.generate(request(300, 32)).await.unwrap().into_inner().images;
    let mut running = client(&mesh.orchestrator).await.generate_stream(request(300, 32)).await.unwrap().into_inner();
    running.message().await.unwrap().expect("a progress event");
    // A stream that waits says so first.
    let mut waiting = client(&mesh.orchestrator).await.generate_stream(request(4, 32)).await.unwrap().into_inner();
    let first = waiting.message().await.unwrap().unwrap().event.unwrap();
    assert_eq!(
        first,
        v1::generate_event::Event::Waiting(v1::Waiting { jobs_ahead: 0, jobs_running: 1 }),
        "no job ahead of it, one running"
    );
    wait_for_counts(&mesh.orchestrator, 1.0, 1.0).await;

    mesh.orchestrator.terminate();
    let started = Instant::now();
    let status = waiting.message().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{}", status.message());
    assert!(started.elapsed() < Duration::from_secs(10), "refused at once, not at the end of the grace period");
    let result = loop {
        match running.message().await.unwrap().expect("the stream ends with the result").event.unwrap() {
            v1::generate_event::Event::Progress(_) => continue,
            v1::generate_event::Event::Result(r) => break r,
            v1::generate_event::Event::Waiting(w) => panic!("the first job did not wait: {w:?}"),
        }
    };
    assert_eq!(result.images, expected, "the running job finished during the drain");
    assert!(mesh.orchestrator.wait_exit(Duration::from_secs(30)).success());
}

#[tokio::test]
async fn a_tenant_is_bounded_across_orchestrators_that_share_redis() {
    let redis = RedisServer::start();
    let url = redis.url();
    let opts = MeshOptions {
        common_args: vec!["--metrics-listen", "127.0.0.1:0"],
        orchestrator_args: vec!["--redis-url", &url, "--fleet-max-jobs-per-tenant", "1", "--fleet-quota-lease", "1"],
        ..Default::default()
    };
    // The quota lives in Redis: without one, the flag is refused.
    let model = sdmesh_testkit::model("sd21-base-tiny");
    let alone = std::process::Command::new(bin("sdmesh-orchestrator"))
        .arg("--model")
        .arg(&model)
        .args(["--listen", "127.0.0.1:0", "--fleet-max-jobs-per-tenant", "1"])
        .output()
        .unwrap();
    assert!(!alone.status.success());
    assert!(
        String::from_utf8_lossy(&alone.stderr).contains("--redis-url"),
        "{}",
        String::from_utf8_lossy(&alone.stderr)
    );

    let mut mesh = Mesh::start_with("sd21-base-tiny", &opts).await;
    let second = mesh.another_orchestrator("sd21-base-tiny", &opts).await;
    let expected = client(&second).await.generate(request(4, 32)).await.unwrap().into_inner().images;

    // Tenant a's long job runs on the first orchestrator ...
    let mut long =
        client(&mesh.orchestrator).await.generate_stream(tenant(request(900, 128), "a")).await.unwrap().into_inner();
    long.message().await.unwrap().expect("a progress event");
    // ... past one lease's life (its orchestrator renews it) ...
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // ... so a's next job, on the second, is refused at once, with a hint.
    let started = Instant::now();
    let status = client(&second).await.generate(tenant(request(4, 32), "a")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("--fleet-max-jobs-per-tenant 1"), "{}", status.message());
    assert!(sdmesh_core::retry_after(&status).is_some(), "a RetryInfo detail");
    assert!(started.elapsed() < Duration::from_secs(5), "refused at once");
    // Tenant b's job runs on the second meanwhile.
    let images = client(&second).await.generate(tenant(request(4, 32), "b")).await.unwrap().into_inner().images;
    assert_eq!(images, expected);

    // The first orchestrator dies with a's job (SIGKILL: it gives nothing back). Its lease
    // expires within a second, and then a's job runs on the second.
    mesh.orchestrator.child.kill().unwrap();
    let killed = Instant::now();
    let images = loop {
        match client(&second).await.generate(tenant(request(4, 32), "a")).await {
            Ok(response) => break response.into_inner().images,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                assert!(killed.elapsed() < Duration::from_secs(10), "the dead orchestrator's lease never expired");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(images, expected, "the same bytes");
    let text = second.scrape();
    assert!(metric(&text, "sdmesh_jobs_refused_total", &[("reason", "tenant_quota")]) >= 1.0);
    assert_eq!(metric(&text, "sdmesh_tenant_jobs_total", &[("tenant", "a"), ("code", "Ok")]), 1.0);
    // Every job ended: no lease is left (given back a moment after the response).
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.command(&["ZCARD", "sdmesh:tenant-jobs:{a}"]).unwrap() != ":0" {
        assert!(Instant::now() < deadline, "a lease was not given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_high_priority_job_runs_before_a_low_one_that_came_first() {
    let opts = MeshOptions {
        common_args: vec!["--metrics-listen", "127.0.0.1:0"],
        orchestrator_args: vec!["--max-jobs", "1", "--max-waiting-jobs", "2"],
        ..Default::default()
    };
    let mesh = Mesh::start_with("sd21-base-tiny", &opts).await;
    let orchestrator = &mesh.orchestrator;
    let with_priority = |priority: &str| with_metadata(request(4, 32), "x-sdmesh-priority", priority);
    // Junk is the caller's mistake.
    let status = client(orchestrator).await.generate(with_priority("urgent")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("x-sdmesh-priority"), "{}", status.message());

    let mut long = client(orchestrator).await.generate_stream(request(900, 128)).await.unwrap().into_inner();
    long.message().await.unwrap().expect("a progress event");
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    let mut jobs = Vec::new();
    for priority in ["low", "high"] {
        let mut c = client(orchestrator).await;
        let (request, done_tx) = (with_priority(priority), done_tx.clone());
        jobs.push(tokio::spawn(async move {
            c.generate(request).await.expect("the job ran");
            done_tx.send(priority).unwrap();
        }));
        wait_for_counts(orchestrator, 1.0, jobs.len() as f64).await;
    }
    // The running job's caller goes: the high job, which came second, runs first.
    drop(long);
    assert_eq!(done.recv().await, Some("high"));
    assert_eq!(done.recv().await, Some("low"));

    // sdctl sends it.
    let out = std::env::temp_dir().join(format!("sdmesh-priority-{}.png", std::process::id()));
    let sdctl = tokio::process::Command::new(bin("sdctl"))
        .args(["generate", "--endpoint", &orchestrator.addr, "--quiet", "--priority", "high"])
        .args(["--prompt", "a quiet street", "--steps", "4", "--height", "32", "--width", "32", "--seed", "7"])
        .arg("--out")
        .arg(&out)
        .output()
        .await
        .unwrap();
    assert!(sdctl.status.success(), "{}", String::from_utf8_lossy(&sdctl.stderr));
    std::fs::remove_file(&out).unwrap();
}
