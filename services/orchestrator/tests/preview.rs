//! Live previews inside a job: one every `preview_every` steps, and each is the model's
//! prediction of the final image. At the last step that prediction is what the job ends with
//! (exactly for schedulers whose last step lands on sigma 0; DDIM keeps a last bit of noise,
//! sqrt(1 - alpha_bar_0)), for epsilon (sd21-base) and v-prediction (sd21) models.

mod common;

use common::Pipelines;
use sdmesh_orchestrator::noise::SeededNoise;
use sdmesh_orchestrator::pipeline::StepProgress;
use sdmesh_proto::v1;

#[tokio::test]
async fn previews_come_every_n_steps_and_the_last_one_is_the_final_latents() {
    let mut pipelines = Pipelines::default();
    for (model, scheduler, tolerance) in [
        ("sd21-base-tiny", "euler", 1e-5),
        ("sd21-tiny", "euler", 1e-5),
        ("sd21-tiny", "dpm++2m", 1e-5),
        ("sd21-base-tiny", "ddim", 0.05),
        ("sd21-tiny", "ddim", 0.05),
    ] {
        let pipeline = pipelines.get(model).await.clone();
        let request = v1::GenerateRequest {
            prompt: "a lighthouse".into(),
            steps: Some(6),
            seed: Some(1),
            height: Some(32),
            width: Some(32),
            num_images: Some(2),
            preview_every: 3,
            scheduler: Some(v1::SchedulerOptions { name: scheduler.into(), ..Default::default() }),
            ..Default::default()
        };
        let job = pipeline.validate(&request).unwrap();
        let mut seen = Vec::new();
        let mut record = |p: StepProgress| {
            seen.push((p.step, p.preview, p.latents));
            true
        };
        let with = pipeline.run(&job, &mut SeededNoise::new(1), &mut record).await.unwrap();
        let steps_with_preview: Vec<_> = seen.iter().filter(|(_, p, _)| p.is_some()).map(|(s, _, _)| *s).collect();
        assert_eq!(steps_with_preview, [3, 6], "{model} {scheduler}");
        let (_, last_preview, final_latents) = seen.last().unwrap();
        let last_preview = last_preview.as_ref().unwrap();
        assert_eq!(last_preview.dims(), [4, 4, 3], "the first image, at the latents' size");
        let expected = sdmesh_orchestrator::preview::latent_rgb(final_latents).unwrap().unwrap();
        let diff: f32 = (last_preview - &expected)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff <= tolerance, "{model} {scheduler}: the last preview is {diff} from the final latents' colours");
        // Previews change nothing.
        let plain = v1::GenerateRequest { preview_every: 0, ..request };
        let without = pipeline.run(&pipeline.validate(&plain).unwrap(), &mut SeededNoise::new(1), &mut |_| true).await;
        let (a, b) = (with.images.flatten_all().unwrap(), without.unwrap().images.flatten_all().unwrap());
        assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap(), "{model} {scheduler}");
    }
}

fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

/// Runs `request` and gives each step's preview (None where none came) and the job's images.
async fn previews_of(
    pipeline: &sdmesh_orchestrator::pipeline::Pipeline,
    request: &v1::GenerateRequest,
) -> sdmesh_core::Result<(Vec<Option<candle_core::Tensor>>, candle_core::Tensor)> {
    let job = pipeline.validate(request)?;
    let mut previews = Vec::new();
    let out = pipeline
        .run(&job, &mut SeededNoise::new(1), &mut |p: StepProgress| {
            previews.push(p.preview);
            true
        })
        .await?;
    Ok((previews, out.images))
}

fn decoded_request(scheduler: &str) -> v1::GenerateRequest {
    v1::GenerateRequest {
        prompt: "a lighthouse".into(),
        steps: Some(4),
        seed: Some(1),
        height: Some(32),
        width: Some(24),
        num_images: Some(2),
        preview_every: 2,
        preview_kind: v1::PreviewKind::Decoded.into(),
        scheduler: Some(v1::SchedulerOptions { name: scheduler.into(), ..Default::default() }),
        ..Default::default()
    }
}

#[tokio::test]
async fn decoded_previews_are_the_image_the_job_would_end_with() {
    let mut pipelines = Pipelines::default();
    for (model, scheduler) in [("sd21-base-tiny", "euler"), ("sd21-tiny", "dpm++2m")] {
        let pipeline = pipelines.get(model).await.clone();
        let request = decoded_request(scheduler);
        let (previews, images) = previews_of(&pipeline, &request).await.unwrap();
        let steps: Vec<usize> = previews.iter().enumerate().filter(|(_, p)| p.is_some()).map(|(i, _)| i + 1).collect();
        assert_eq!(steps, [2, 4], "{model} {scheduler}");
        let last = previews[3].as_ref().unwrap();
        assert_eq!(last.dims(), [32, 24, 3], "the image's size");
        // The last step lands on sigma 0: its prediction is the final latents, decoded alike.
        let diff = max_diff(last, &images.get(0).unwrap());
        assert!(diff <= 1e-5, "{model} {scheduler}: the last decoded preview is {diff} from the first image");
        // The earlier one is the prediction of a noisier step: another image.
        assert!(max_diff(previews[1].as_ref().unwrap(), &images.get(0).unwrap()) > 1e-3);
        let plain = v1::GenerateRequest { preview_every: 0, preview_kind: 0, ..request };
        let (_, without) = previews_of(&pipeline, &plain).await.unwrap();
        assert_eq!(max_diff(&images, &without), 0.0, "previews change nothing");
    }
    // Asking for decoded previews without preview_every, or an unknown kind: INVALID_ARGUMENT.
    let pipeline = pipelines.get("sd21-base-tiny").await;
    for (every, kind, needle) in [(0, 2, "needs preview_every"), (2, 9, "unknown value 9")] {
        let request = v1::GenerateRequest { preview_every: every, preview_kind: kind, ..decoded_request("euler") };
        let err = tonic::Status::from(pipeline.validate(&request).unwrap_err());
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains(needle), "{}", err.message());
    }
}

/// A safety checker that flags every image, or cannot answer.
struct Checker {
    answers: bool,
}

#[async_trait::async_trait]
impl sdmesh_core::SafetyChecker for Checker {
    async fn check(&self, images: candle_core::Tensor) -> sdmesh_core::Result<Vec<sdmesh_core::SafetyVerdict>> {
        if !self.answers {
            return Err(sdmesh_core::Error::Unavailable("the checker is away".into()));
        }
        let verdict = sdmesh_core::SafetyVerdict { flagged: true, concept_scores: vec![0.1], special_scores: vec![] };
        Ok(vec![verdict; images.dim(0).unwrap()])
    }
}

#[tokio::test]
async fn a_decoded_preview_never_shows_what_the_safety_policy_would_hide() {
    let mut pipeline = common::local_pipeline("sd21-base-tiny").await;
    let shown = |previews: &[Option<candle_core::Tensor>]| previews.iter().filter(|p| p.is_some()).count();
    let with = |policy: v1::SafetyPolicy| v1::GenerateRequest { safety: policy.into(), ..decoded_request("euler") };

    pipeline.safety = Some(std::sync::Arc::new(Checker { answers: true }));
    // Replace: the images come back black, and no preview of them was sent.
    let (previews, images) = previews_of(&pipeline, &with(v1::SafetyPolicy::Replace)).await.unwrap();
    assert_eq!(shown(&previews), 0, "a flagged preview was sent under replace");
    assert_eq!(images.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0);
    // Flag (the images are kept) and off: the previews come.
    assert_eq!(shown(&previews_of(&pipeline, &with(v1::SafetyPolicy::Flag)).await.unwrap().0), 2);
    assert_eq!(shown(&previews_of(&pipeline, &with(v1::SafetyPolicy::Off)).await.unwrap().0), 2);

    // A checker that cannot answer: no unchecked preview leaves (here the images do, unchecked,
    // as --safety-on-unavailable flag-only says).
    pipeline.safety = Some(std::sync::Arc::new(Checker { answers: false }));
    pipeline.safety_settings.on_unavailable = sdmesh_orchestrator::safety::OnUnavailable::FlagOnly;
    let (previews, _) = previews_of(&pipeline, &with(v1::SafetyPolicy::Flag)).await.unwrap();
    assert_eq!(shown(&previews), 0, "an unchecked preview was sent");
}

/// The job's calls to the unet and its final decodes: how many are running, and how many ran.
#[derive(Default)]
struct Calls {
    running: tokio::sync::watch::Sender<usize>,
    made: std::sync::atomic::AtomicUsize,
}

impl Calls {
    async fn counted<T>(&self, call: impl std::future::Future<Output = T>) -> T {
        self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.running.send_modify(|n| *n += 1);
        let out = call.await;
        self.running.send_modify(|n| *n -= 1);
        out
    }
}

struct CountingDenoiser {
    inner: std::sync::Arc<dyn sdmesh_core::Denoiser>,
    calls: std::sync::Arc<Calls>,
}

#[async_trait::async_trait]
impl sdmesh_core::Denoiser for CountingDenoiser {
    async fn denoise(&self, input: sdmesh_core::DenoiseInput) -> sdmesh_core::Result<candle_core::Tensor> {
        self.calls.counted(self.inner.denoise(input)).await
    }
    async fn info(&self) -> sdmesh_core::Result<sdmesh_proto::v1::UnetInfo> {
        self.inner.info().await
    }
}

/// A vae that decodes a preview (one image; the jobs here make two) only while another call of
/// the job runs: the job must not wait for its preview to go on.
struct PreviewWaitsVae {
    inner: std::sync::Arc<dyn sdmesh_core::Vae>,
    calls: std::sync::Arc<Calls>,
}

#[async_trait::async_trait]
impl sdmesh_core::Vae for PreviewWaitsVae {
    async fn decode(&self, latents: candle_core::Tensor) -> sdmesh_core::Result<candle_core::Tensor> {
        if latents.dim(0)? > 1 {
            return self.calls.counted(self.inner.decode(latents)).await;
        }
        let mut running = self.calls.running.subscribe();
        let another_call = tokio::time::timeout(std::time::Duration::from_secs(10), running.wait_for(|n| *n > 0));
        if another_call.await.is_err() {
            return Err(sdmesh_core::Error::Unavailable("the job waited for its preview".into()));
        }
        self.inner.decode(latents).await
    }
    async fn encode(
        &self,
        images: candle_core::Tensor,
        noise: Option<candle_core::Tensor>,
    ) -> sdmesh_core::Result<sdmesh_core::EncodedImages> {
        self.inner.encode(images, noise).await
    }
    async fn info(&self) -> sdmesh_core::Result<sdmesh_proto::v1::VaeInfo> {
        self.inner.info().await
    }
}

/// A decoded preview is made while the job's next call runs (step 2's with step 3's unet call,
/// step 4's with the final decode), and each step's progress still comes in order.
#[tokio::test]
async fn a_decoded_preview_is_made_while_the_job_goes_on() {
    let mut pipeline = common::local_pipeline("sd21-base-tiny").await;
    let calls = std::sync::Arc::new(Calls::default());
    pipeline.denoiser =
        std::sync::Arc::new(CountingDenoiser { inner: pipeline.denoiser.clone(), calls: calls.clone() });
    pipeline.vae = std::sync::Arc::new(PreviewWaitsVae { inner: pipeline.vae.clone(), calls: calls.clone() });
    let request = decoded_request("euler");
    let job = pipeline.validate(&request).unwrap();
    let mut seen = Vec::new();
    let out = pipeline
        .run(&job, &mut SeededNoise::new(1), &mut |p: StepProgress| {
            seen.push((p.step, p.preview));
            true
        })
        .await
        .unwrap();
    let steps: Vec<_> = seen.iter().map(|(step, preview)| (*step, preview.is_some())).collect();
    assert_eq!(steps, [(1, false), (2, true), (3, false), (4, true)], "in order, the previews made");
    assert!(max_diff(seen[3].1.as_ref().unwrap(), &out.images.get(0).unwrap()) <= 1e-5);
    assert_eq!(calls.made.load(std::sync::atomic::Ordering::Relaxed), 5, "four steps and the final decode");
}
