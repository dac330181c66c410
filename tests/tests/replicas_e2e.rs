//! Several replicas of a model service behind one orchestrator (`--unet-url A,B`), as real
//! processes: a job's steps spread over them, and a replica killed in the middle of a job costs
//! retries, not the job, which ends with the same bytes as on one replica. A unet of another
//! kind of model than the orchestrator was set up for is refused.

use sdmesh_proto::v1;
use sdmesh_testkit::process::{metric, start, start_listening, wait_serving, Mesh, MeshOptions, Service};
use std::time::{Duration, Instant};

fn denoise_calls(unet: &Service) -> f64 {
    metric(&unet.scrape(), "sdmesh_rpc_requests_total", &[("method", "/sd.v1.Unet/Denoise"), ("code", "Ok")])
}

#[tokio::test]
async fn steps_spread_over_unet_replicas_and_a_killed_replica_costs_no_job() {
    let opts = MeshOptions { common_args: vec!["--metrics-listen", "127.0.0.1:0"], ..Default::default() };
    let mesh = Mesh::start_with("sd21-base-tiny", &opts).await;
    let model = sdmesh_testkit::model("sd21-base-tiny");
    let model = model.to_str().unwrap();
    let mut second = start("sdmesh-unet", &["--model", model, "--metrics-listen", "127.0.0.1:0"], &[]);
    wait_serving(&second.addr).await;
    let both = format!("{},{}", mesh.unet.addr, second.addr);
    let spread = mesh.orchestrator_over_unet("sd21-base-tiny", &both, &MeshOptions::default()).await;

    let request = |steps: u32| v1::GenerateRequest {
        prompt: "a lighthouse in fog".into(),
        negative_prompt: "blurry".into(),
        steps: Some(steps),
        seed: Some(11),
        height: Some(32),
        width: Some(32),
        ..Default::default()
    };
    let generate = |addr: String, r: v1::GenerateRequest| async move {
        let mut client = v1::orchestrator_client::OrchestratorClient::connect(addr).await.unwrap();
        client.generate(r).await.map(|r| r.into_inner().images)
    };

    // One replica (the mesh's own orchestrator) against two: the same bytes, and both served.
    let alone = generate(mesh.orchestrator.addr.clone(), request(10)).await.unwrap();
    let (a0, b0) = (denoise_calls(&mesh.unet), denoise_calls(&second));
    let spread_out = generate(spread.addr.clone(), request(10)).await.unwrap();
    assert_eq!(spread_out, alone, "same job, same bytes, on one replica or two");
    let (a1, b1) = (denoise_calls(&mesh.unet) - a0, denoise_calls(&second) - b0);
    assert!(a1 >= 4.0 && b1 >= 4.0, "10 steps spread over both replicas: {a1} and {b1}");

    // A long job; the second replica is killed (SIGKILL: no goodbye) once it has served some
    // of its steps.
    let long = request(300);
    let expected = generate(mesh.orchestrator.addr.clone(), long.clone()).await.unwrap();
    let before = denoise_calls(&second);
    let job = tokio::spawn(generate(spread.addr.clone(), long));
    let deadline = Instant::now() + Duration::from_secs(60);
    while denoise_calls(&second) < before + 20.0 {
        assert!(Instant::now() < deadline, "the second replica served no steps");
        assert!(!job.is_finished(), "the job ended before the replica could be killed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!job.is_finished(), "the job ended before the replica could be killed: make it longer");
    second.child.kill().unwrap();
    let images = job.await.unwrap().expect("the job survives a replica killed under it");
    assert_eq!(images, expected, "and ends with the bytes it has on one replica");
}

/// A rollout of the unet pool to another model (here the same checkpoint in f16, as
/// `--dtype f16` on the new replicas would be): while the pool mixes both, each job runs on
/// one model throughout; once the old replicas are gone, the same orchestrator serves the next
/// job on the new model, without a restart.
#[tokio::test]
async fn a_unet_rollout_to_another_model_needs_no_orchestrator_restart() {
    let mesh = Mesh::start("sd21-base-tiny").await;
    let model = sdmesh_testkit::model("sd21-base-tiny");
    let model = model.to_str().unwrap();
    let new = start("sdmesh-unet", &["--model", model, "--dtype", "f16"], &[]);
    wait_serving(&new.addr).await;
    let none = MeshOptions::default();
    let request = v1::GenerateRequest {
        prompt: "a harbour at dawn".into(),
        steps: Some(8),
        seed: Some(5),
        height: Some(32),
        width: Some(32),
        return_array: true,
        ..Default::default()
    };
    let generate = |addr: String| {
        let request = request.clone();
        async move {
            let mut client = v1::orchestrator_client::OrchestratorClient::connect(addr).await.unwrap();
            client.generate(request).await.map(|r| r.into_inner().array.unwrap().data)
        }
    };
    let old_only = generate(mesh.orchestrator.addr.clone()).await.unwrap();
    let new_only =
        generate(mesh.orchestrator_over_unet("sd21-base-tiny", &new.addr, &none).await.addr.clone()).await.unwrap();
    assert_ne!(old_only, new_only, "f16 and f32 give other numbers");

    // The old replica is listed first: the orchestrator starts against it.
    let both = mesh.orchestrator_over_unet("sd21-base-tiny", &format!("{},{}", mesh.unet.addr, new.addr), &none).await;
    let jobs: Vec<_> = (0..4).map(|_| tokio::spawn(generate(both.addr.clone()))).collect();
    for job in jobs {
        let out = job.await.unwrap().expect("a job in a mixed pool");
        assert!(out == old_only || out == new_only, "a job mixed the two models");
    }

    // The rollout ends: the old replica goes.
    let mut old = mesh.unet;
    old.child.kill().unwrap();
    old.child.wait().unwrap();
    for _ in 0..2 {
        let out = generate(both.addr.clone()).await.expect("a job after the rollout");
        assert!(out == new_only, "the job ran on the new model, bit for bit");
    }
}

/// A job whose model goes away in the middle of it (the last replica of the old model, f16, is
/// killed once a replica of the new one, f32, is up): the orchestrator runs it again from its
/// start on the new model, and the caller gets what a job sent now would give.
#[tokio::test]
async fn a_job_whose_model_goes_away_runs_again_on_the_new_one() {
    let mesh = Mesh::start("sd21-base-tiny").await;
    let model = sdmesh_testkit::model("sd21-base-tiny");
    let model = model.to_str().unwrap();
    // The old model in f16, slow on a CPU: the job is still running when it goes.
    let mut old = start("sdmesh-unet", &["--model", model, "--dtype", "f16"], &[]);
    wait_serving(&old.addr).await;
    // The new replica's address is listed before it is up (as a DNS name would list it later).
    let new_listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let unet = format!("{},http://{new_listen}", old.addr);
    let with_metrics = MeshOptions { common_args: vec!["--metrics-listen", "127.0.0.1:0"], ..Default::default() };
    let orchestrator = mesh.orchestrator_over_unet("sd21-base-tiny", &unet, &with_metrics).await;
    let request = v1::GenerateRequest {
        prompt: "a harbour at dawn".into(),
        steps: Some(400),
        seed: Some(5),
        height: Some(32),
        width: Some(32),
        return_array: true,
        ..Default::default()
    };
    let mut client = v1::orchestrator_client::OrchestratorClient::connect(orchestrator.addr.clone()).await.unwrap();
    let mut events = client.generate_stream(request.clone()).await.unwrap().into_inner();
    let mut steps_seen = Vec::new();
    let mut next_step = async || match events.message().await.unwrap().unwrap().event.unwrap() {
        v1::generate_event::Event::Progress(p) => Ok((p.step, p.restarts)),
        v1::generate_event::Event::Result(r) => Err(r),
        v1::generate_event::Event::Waiting(w) => panic!("no job waits for a place here: {w:?}"),
    };
    // The job runs on the old model (the only one up) ...
    for _ in 0..10 {
        steps_seen.push(next_step().await.expect("progress"));
    }
    // ... the new model comes up, and the old one goes.
    let new = start_listening("sdmesh-unet", &["--model", model], &[], &new_listen);
    wait_serving(&new.addr).await;
    old.child.kill().unwrap();
    old.child.wait().unwrap();
    let result = loop {
        match next_step().await {
            Ok(step) => steps_seen.push(step),
            Err(result) => break result,
        }
    };
    let firsts: Vec<_> = steps_seen.iter().filter(|(step, _)| *step == 1).collect();
    assert_eq!(firsts, [&(1, 0), &(1, 1)], "the job ran again from step 1, and its progress says so");
    assert_eq!(*steps_seen.last().unwrap(), (400, 1));
    assert_eq!(metric(&orchestrator.scrape(), "sdmesh_jobs_restarted_total", &[]), 1.0);
    // The mesh's own orchestrator runs the new model (f32) alone.
    let mut client =
        v1::orchestrator_client::OrchestratorClient::connect(mesh.orchestrator.addr.clone()).await.unwrap();
    let expected = client.generate(request).await.unwrap().into_inner();
    assert_eq!(result.array.unwrap().data, expected.array.unwrap().data, "the new model's result, bit for bit");
}

/// A unet of another kind of model than the orchestrator's folder describes (here sd21-tiny,
/// v-prediction, under sd21-base-tiny's epsilon config) would make every image wrong and fail
/// nothing: the orchestrator refuses to start over one, and a pool rolled over to one later
/// fails each job with FAILED_PRECONDITION saying what differs.
#[tokio::test]
async fn a_unet_of_another_kind_of_model_is_refused_at_start_and_later() {
    let mesh = Mesh::start("sd21-base-tiny").await;
    let (base, v) = (sdmesh_testkit::model("sd21-base-tiny"), sdmesh_testkit::model("sd21-tiny"));
    let (base, v) = (base.to_str().unwrap(), v.to_str().unwrap());
    let other = start("sdmesh-unet", &["--model", v], &[]);
    wait_serving(&other.addr).await;
    let refused = std::process::Command::new(sdmesh_testkit::process::bin("sdmesh-orchestrator"))
        .args(["--model", base, "--listen", "127.0.0.1:0", "--startup-timeout", "30"])
        .args(["--text-encoder-url", &mesh.text_encoder.addr, "--unet-url", &other.addr, "--vae-url", &mesh.vae.addr])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("prediction_type \"v_prediction\""), "{stderr}");

    // Later: the address the orchestrator knows starts serving the other model.
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let mut unet = start_listening("sdmesh-unet", &["--model", base], &[], &listen);
    wait_serving(&unet.addr).await;
    let orchestrator = mesh.orchestrator_over_unet("sd21-base-tiny", &unet.addr, &MeshOptions::default()).await;
    let mut client = v1::orchestrator_client::OrchestratorClient::connect(orchestrator.addr.clone()).await.unwrap();
    let request = v1::GenerateRequest {
        prompt: "a harbour".into(),
        steps: Some(2),
        height: Some(32),
        width: Some(32),
        ..Default::default()
    };
    client.generate(request.clone()).await.expect("the unet fits");
    unet.child.kill().unwrap();
    unet.child.wait().unwrap();
    let swapped = start_listening("sdmesh-unet", &["--model", v], &[], &listen);
    wait_serving(&swapped.addr).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = client.generate(request.clone()).await.unwrap_err();
        // A call or two may still find the old process gone (retried, then UNAVAILABLE).
        if status.code() != tonic::Code::Unavailable || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("prediction_type \"v_prediction\""), "{}", status.message());
}
