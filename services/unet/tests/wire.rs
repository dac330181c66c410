//! The wire between orchestrator and unet service: a job's conditioning crosses it once and
//! is named by digest afterwards; a service that lacks it (evicted, another replica) asks
//! for it and the step still runs; digests are checked.

use candle_core::{DType, Device, Tensor};
use sdmesh_core::{DenoiseInput, Denoiser};
use sdmesh_proto::v1;
use sdmesh_testkit::model;
use sdmesh_unet::{is_conditioning_miss, LocalUnet, UnetClient, UnetOptions, UnetService};
use std::sync::{Arc, Mutex};

/// Forwards to a real UnetService and records, per Denoise call, whether cond came as a tensor.
#[derive(Clone)]
struct Recording {
    inner: UnetService,
    cond_sent: Arc<Mutex<Vec<bool>>>,
    extra_sent: Arc<Mutex<Vec<bool>>>,
}

#[tonic::async_trait]
impl v1::unet_server::Unet for Recording {
    async fn denoise(
        &self,
        request: tonic::Request<v1::DenoiseRequest>,
    ) -> Result<tonic::Response<v1::DenoiseResponse>, tonic::Status> {
        self.cond_sent.lock().unwrap().push(request.get_ref().cond.is_some());
        self.extra_sent.lock().unwrap().push(request.get_ref().extra.is_some());
        self.inner.denoise(request).await
    }
    async fn info(&self, r: tonic::Request<v1::InfoRequest>) -> Result<tonic::Response<v1::UnetInfo>, tonic::Status> {
        self.inner.info(r).await
    }
}

/// A unet replica on a loopback port; its conditioning cache holds `cache_bytes`.
async fn replica(cache_bytes: usize) -> (String, Recording) {
    replica_of("sd21-base-tiny", cache_bytes).await
}

async fn replica_of(name: &str, cache_bytes: usize) -> (String, Recording) {
    replica_until(name, cache_bytes, std::future::pending()).await
}

/// A replica that shuts down (gracefully: in-flight calls finish, then it is gone) when `stop`
/// resolves.
async fn replica_until(
    name: &str,
    cache_bytes: usize,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> (String, Recording) {
    let service = UnetService::new(cache_bytes);
    service.set_model(LocalUnet::load(&UnetOptions::new(model(name), Device::Cpu)).unwrap());
    let recording = Recording { inner: service, cond_sent: Arc::default(), extra_sent: Arc::default() };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = v1::unet_server::UnetServer::new(recording.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), stop),
    );
    (url, recording)
}

fn job(seed: f32) -> (Tensor, Tensor, Tensor) {
    let d = &Device::Cpu;
    let latents =
        (Tensor::arange(0f32, 192., d).unwrap().reshape((1, 4, 8, 6)).unwrap() * (0.01 * seed as f64)).unwrap();
    let cond = Tensor::full(0.1 * seed, (1, 77, 32), d).unwrap();
    let uncond = Tensor::full(-0.2 * seed, (1, 77, 32), d).unwrap();
    (latents, cond, uncond)
}

fn step(latents: &Tensor, cond: &Tensor, uncond: &Tensor, timestep: f64) -> DenoiseInput {
    DenoiseInput {
        latents: latents.clone(),
        timestep,
        cond: cond.clone(),
        uncond: Some(uncond.clone()),
        guidance_scale: 5.0,
        guidance_rescale: 0.0,
        class_label: None,
        extra: None,
    }
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.flatten_all().unwrap().to_vec1::<f32>().unwrap() == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[tokio::test]
async fn conditioning_crosses_the_wire_once_per_job() {
    let local = LocalUnet::load(&UnetOptions::new(model("sd21-base-tiny"), Device::Cpu)).unwrap();
    let (url, recording) = replica(1 << 20).await;
    let client = UnetClient::new(&url).unwrap();
    let (latents, cond, uncond) = job(1.0);
    for t in [900.0, 500.0, 100.0] {
        let remote = client.denoise(step(&latents, &cond, &uncond, t)).await.unwrap();
        let direct = local.denoise(step(&latents, &cond, &uncond, t)).await.unwrap();
        assert!(same(&remote, &direct), "t={t}: the remote step differs");
    }
    assert_eq!(*recording.cond_sent.lock().unwrap(), vec![true, false, false], "sent with the first step only");
    assert_eq!(recording.inner.conditioning().len(), 2, "cond and uncond kept");

    // A second job with other embeddings sends its own once.
    let (latents2, cond2, uncond2) = job(2.0);
    for t in [900.0, 500.0] {
        client.denoise(step(&latents2, &cond2, &uncond2, t)).await.unwrap();
    }
    assert_eq!(recording.cond_sent.lock().unwrap()[3..], [true, false]);
}

/// An inpainting job's extra channels (mask and masked-image latents) are constant: they cross
/// once too, and the step equals the local one with them concatenated to the latents.
#[tokio::test]
async fn extra_channels_cross_the_wire_once_per_job() {
    let local = LocalUnet::load(&UnetOptions::new(model("sd2-inpaint-tiny"), Device::Cpu)).unwrap();
    let (url, recording) = replica_of("sd2-inpaint-tiny", 1 << 20).await;
    let client = UnetClient::new(&url).unwrap();
    let (latents, cond, uncond) = job(1.0);
    let extra = (Tensor::arange(0f32, 240., &Device::Cpu).unwrap().reshape((1, 5, 8, 6)).unwrap() * 0.003).unwrap();
    for t in [900.0, 500.0, 100.0] {
        let with_extra = DenoiseInput { extra: Some(extra.clone()), ..step(&latents, &cond, &uncond, t) };
        let remote = client.denoise(with_extra).await.unwrap();
        let joined = Tensor::cat(&[&latents, &extra], 1).unwrap();
        let direct = local.denoise(step(&joined, &cond, &uncond, t)).await.unwrap();
        assert!(same(&remote, &direct), "t={t}: the remote step differs");
    }
    assert_eq!(*recording.extra_sent.lock().unwrap(), vec![true, false, false], "sent with the first step only");
    // Channels that do not add up to the UNet's input are refused.
    let wrong = DenoiseInput { extra: Some(extra.narrow(1, 0, 4).unwrap()), ..step(&latents, &cond, &uncond, 1.0) };
    let err = client.denoise(wrong).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.to_string().contains("extra"), "{err}");
}

#[tokio::test]
async fn a_service_without_the_conditioning_asks_for_it_and_the_step_runs() {
    let local = LocalUnet::load(&UnetOptions::new(model("sd21-base-tiny"), Device::Cpu)).unwrap();
    let (latents, cond, uncond) = job(3.0);
    // A replica whose cache keeps nothing (as if it evicted everything at once).
    let (url, recording) = replica(0).await;
    let client = UnetClient::new(&url).unwrap();
    for t in [800.0, 400.0, 1.0] {
        let remote = client.denoise(step(&latents, &cond, &uncond, t)).await.unwrap();
        assert!(same(&remote, &local.denoise(step(&latents, &cond, &uncond, t)).await.unwrap()));
    }
    // Step 1 sends; steps 2 and 3 try the digest, are asked for the tensors, send them.
    assert_eq!(*recording.cond_sent.lock().unwrap(), vec![true, false, true, false, true]);
    // A replica that never saw the job: a_job_spread_over_replicas_survives_one_going_away.
}

/// One client over two replicas (`--unet-url A,B`): a job's steps alternate between them, each
/// asks for the conditioning once, and when one goes away the job's next steps run on the
/// other; every step equals the local one.
#[tokio::test]
async fn a_job_spread_over_replicas_survives_one_going_away() {
    let local = LocalUnet::load(&UnetOptions::new(model("sd21-base-tiny"), Device::Cpu)).unwrap();
    let (latents, cond, uncond) = job(4.0);
    let (stop_a, stopped_a) = tokio::sync::oneshot::channel::<()>();
    let (url_a, a) = replica_until("sd21-base-tiny", 1 << 20, async move {
        let _ = stopped_a.await;
    })
    .await;
    let (url_b, b) = replica(1 << 20).await;
    let client = UnetClient::new(&format!("{url_a},{url_b}")).unwrap();
    let run_step = |i: usize| {
        let t = 999.0 - 37.0 * i as f64;
        let (client, local, latents, cond, uncond) = (&client, &local, &latents, &cond, &uncond);
        async move {
            let remote = client.denoise(step(latents, cond, uncond, t)).await.unwrap();
            assert!(same(&remote, &local.denoise(step(latents, cond, uncond, t)).await.unwrap()), "t={t}");
        }
    };
    for i in 0..4 {
        run_step(i).await;
    }
    assert_eq!(*a.cond_sent.lock().unwrap(), vec![true, false], "A: sent with the first step, then digests");
    assert_eq!(*b.cond_sent.lock().unwrap(), vec![false, true, false], "B: digest, asked, sent; then digest");

    stop_a.send(()).unwrap();
    let addr_a = url_a.trim_start_matches("http://").to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tokio::net::TcpStream::connect(&addr_a).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "replica A still listens");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for i in 4..8 {
        run_step(i).await;
    }
    assert_eq!(a.cond_sent.lock().unwrap().len(), 2, "A is gone");
    assert_eq!(b.cond_sent.lock().unwrap().len(), 7, "B ran the rest");
}

#[tokio::test]
async fn digests_are_checked() {
    let (url, _) = replica(1 << 20).await;
    let mut raw = v1::unet_client::UnetClient::connect(url).await.unwrap();
    let (latents, cond, _) = job(1.0);
    let cond_wire = v1::Tensor::from_candle(&cond).unwrap();
    let base = v1::DenoiseRequest {
        latents: Some(v1::Tensor::from_candle(&latents).unwrap()),
        timestep: 10.0,
        guidance_scale: 1.0,
        ..Default::default()
    };
    // Named by a digest the service never saw.
    let unknown = v1::DenoiseRequest { cond_digest: cond_wire.digest(), ..base.clone() };
    let status = raw.denoise(unknown.clone()).await.unwrap_err();
    assert!(is_conditioning_miss(&status), "{status:?}");
    assert!(status.message().contains("cond"), "{}", status.message());
    // A tensor that does not match its digest.
    let other = v1::Tensor::from_candle(&Tensor::zeros((1, 77, 32), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let lying = v1::DenoiseRequest { cond: Some(other), cond_digest: cond_wire.digest(), ..base.clone() };
    let status = raw.denoise(lying).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("cond_digest"), "{}", status.message());
    // Sent with its digest: kept, and then the digest alone works.
    raw.denoise(v1::DenoiseRequest { cond: Some(cond_wire.clone()), cond_digest: cond_wire.digest(), ..base.clone() })
        .await
        .unwrap();
    raw.denoise(unknown).await.unwrap();
    // Neither tensor nor digest.
    let status = raw.denoise(base).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

/// A real unet service (`run`: health, metrics, the model check) on a loopback port, until
/// `stop` resolves.
async fn served(opts: UnetOptions, stop: impl std::future::Future<Output = ()> + Send + 'static) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = sdmesh_core::serve::Shutdown::new(stop, std::time::Duration::from_secs(1));
    tokio::spawn(sdmesh_unet::run(opts, listener, shutdown));
    sdmesh_testkit::process::wait_serving(&url).await;
    url
}

/// Runs `n` steps of `job(5.0)` through `client`; true if each is bit-identical to `reference`'s.
async fn steps_match(client: &UnetClient, reference: &LocalUnet, n: usize) -> bool {
    let (latents, cond, uncond) = job(5.0);
    for i in 0..n {
        let t = 950.0 - 150.0 * i as f64;
        let remote = client.denoise(step(&latents, &cond, &uncond, t)).await.unwrap();
        if !same(&remote, &reference.denoise(step(&latents, &cond, &uncond, t)).await.unwrap()) {
            return false;
        }
    }
    true
}

/// A pool that mixes models (here the same checkpoint in f32 and f16, as a dtype rollout
/// would). Within a job, the first answer names the model and every later call asks for it:
/// the replica serving the other refuses with UNAVAILABLE, and the job's steps all run on the
/// model it began with, bit for bit. The refusing replica does not rest (it serves the jobs of
/// its own model). Once the pool has moved on, a job that began on the old model fails with
/// UNAVAILABLE, and the next job runs on the new one.
#[tokio::test]
async fn a_job_stays_on_one_model_in_a_pool_that_mixes_them() {
    use sdmesh_core::replicas::one_job;
    let opts = |dtype| UnetOptions { dtype, ..UnetOptions::new(model("sd21-base-tiny"), Device::Cpu) };
    let (local_f32, local_f16) =
        (LocalUnet::load(&opts(DType::F32)).unwrap(), LocalUnet::load(&opts(DType::F16)).unwrap());
    let (stop_f32, stopped) = tokio::sync::oneshot::channel::<()>();
    let url_f32 = served(opts(DType::F32), async { stopped.await.unwrap_or(()) }).await;
    let url_f16 = served(opts(DType::F16), std::future::pending()).await;
    let f32_fingerprint = local_f32.info().await.unwrap().fingerprint;
    let f16_fingerprint = local_f16.info().await.unwrap().fingerprint;
    assert_ne!(f32_fingerprint, f16_fingerprint, "the dtype is part of what a replica serves");

    // Every response says which model answered.
    let mut raw = v1::unet_client::UnetClient::connect(url_f16.clone()).await.unwrap();
    let answer = raw.info(v1::InfoRequest {}).await.unwrap();
    assert_eq!(answer.metadata().get(sdmesh_core::serve::MODEL_HEADER).unwrap(), f16_fingerprint.as_str());
    assert_eq!(answer.get_ref().fingerprint, f16_fingerprint);
    // A call that expects another model is refused before it runs, and says why.
    let mut wrong = tonic::Request::new(v1::InfoRequest {});
    wrong.metadata_mut().insert(sdmesh_core::serve::MODEL_HEADER, f32_fingerprint.parse().unwrap());
    let status = raw.info(wrong).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(&f32_fingerprint[..12]) && status.message().contains("the job began on the other")
    );

    // One client over both. Its first job starts on the f32 replica (listed first, all idle);
    // its second call goes, in turn, to the f16 replica, which refuses and is asked no more.
    let channel = sdmesh_core::client::lazy_channel(&format!("{url_f32},{url_f16}")).unwrap();
    let client = UnetClient::from_channel(channel.clone());
    one_job(async {
        assert_eq!(client.info().await.unwrap().fingerprint, f32_fingerprint);
        assert!(steps_match(&client, &local_f32, 6).await);
    })
    .await;
    assert!(channel.resting().is_empty(), "a refusal for another model is no failure: {:?}", channel.resting());
    let known = [(url_f32.clone(), Some(f32_fingerprint.clone())), (url_f16.clone(), Some(f16_fingerprint.clone()))];
    assert_eq!(channel.models(), known);
    // Later jobs know where each model is: the next one's steps all go to the f32 replica.
    one_job(async {
        assert_eq!(client.info().await.unwrap().fingerprint, f32_fingerprint);
        assert!(steps_match(&client, &local_f32, 3).await);

        // The rollout ends: the f32 replica goes. This job cannot go on without mixing models.
        stop_f32.send(()).unwrap();
        while sdmesh_testkit::process::health(&url_f32).await.is_some() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let (latents, cond, uncond) = job(5.0);
        let e = client.denoise(step(&latents, &cond, &uncond, 500.0)).await.unwrap_err();
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unavailable);
    })
    .await;
    // The next job runs on the model the pool serves now.
    one_job(async {
        assert_eq!(client.info().await.unwrap().fingerprint, f16_fingerprint);
        assert!(steps_match(&client, &local_f16, 6).await);
    })
    .await;
}
