//! The safety policy of a job: off / flag / replace per request and as the default, what a
//! safety service that cannot answer does (fail closed with UNAVAILABLE, or deliver unchecked
//! with a warning), and the real tiny checker giving the same verdicts inside a job as alone.

mod common;

use candle_core::Tensor;
use common::Pipelines;
use sdmesh_core::{Result, SafetyChecker, SafetyVerdict};
use sdmesh_orchestrator::noise::SeededNoise;
use sdmesh_orchestrator::safety::{OnUnavailable, SafetySettings};
use sdmesh_proto::v1;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Flags the first image of every call; or fails like a service that is down.
struct FlagFirst {
    calls: AtomicUsize,
    down: bool,
}

#[async_trait::async_trait]
impl SafetyChecker for FlagFirst {
    async fn check(&self, images: Tensor) -> Result<Vec<SafetyVerdict>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down {
            return Err(tonic::Status::unavailable("connection refused").into());
        }
        Ok((0..images.dim(0)?)
            .map(|i| SafetyVerdict {
                flagged: i == 0,
                concept_scores: vec![if i == 0 { 0.1 } else { -0.1 }],
                special_scores: vec![],
            })
            .collect())
    }
}

fn request(safety: v1::SafetyPolicy) -> v1::GenerateRequest {
    v1::GenerateRequest {
        prompt: "a cat".into(),
        steps: Some(2),
        num_images: Some(2),
        seed: Some(3),
        safety: safety.into(),
        ..Default::default()
    }
}

async fn run(
    p: &sdmesh_orchestrator::pipeline::Pipeline,
    r: v1::GenerateRequest,
) -> Result<sdmesh_orchestrator::pipeline::JobOutput> {
    let job = p.validate(&r)?;
    p.run(&job, &mut SeededNoise::new(3), &mut |_| true).await
}

#[tokio::test]
async fn policies_flag_replace_and_off() {
    let mut pipelines = Pipelines::default();
    let mut p = pipelines.get("sd21-tiny").await.clone();
    let plain = run(&p, request(v1::SafetyPolicy::Unspecified)).await.unwrap();
    assert!(!plain.safety.checked, "no checker, default off");
    // Asking for a check without a checker.
    let err = p.validate(&request(v1::SafetyPolicy::Replace)).unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");

    let checker = Arc::new(FlagFirst { calls: AtomicUsize::new(0), down: false });
    p.safety = Some(checker.clone());
    p.safety_settings = SafetySettings { default_policy: None, on_unavailable: OnUnavailable::Fail };
    let replaced = run(&p, request(v1::SafetyPolicy::Unspecified)).await.unwrap();
    assert_eq!(replaced.safety.flagged, [true, false]);
    assert!(replaced.safety.checked);
    let zero = replaced.images.narrow(0, 0, 1).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(zero, 0.0, "flagged image is black");
    assert_eq!(
        sdmesh_testkit::max_abs_diff(&replaced.images.narrow(0, 1, 1).unwrap(), &plain.images.narrow(0, 1, 1).unwrap())
            .0,
        0.0
    );
    assert!(replaced.warnings.iter().any(|w| w.contains("replaced with black")), "{:?}", replaced.warnings);

    let flagged = run(&p, request(v1::SafetyPolicy::Flag)).await.unwrap();
    assert_eq!(flagged.safety.flagged, [true, false]);
    assert_eq!(sdmesh_testkit::max_abs_diff(&flagged.images, &plain.images).0, 0.0, "flag keeps the images");

    let calls = checker.calls.load(Ordering::SeqCst);
    let off = run(&p, request(v1::SafetyPolicy::Off)).await.unwrap();
    assert!(!off.safety.checked);
    assert_eq!(checker.calls.load(Ordering::SeqCst), calls, "off does not call the checker");
}

#[tokio::test]
async fn a_safety_service_that_is_down_fails_closed_or_warns() {
    let mut pipelines = Pipelines::default();
    let mut p = pipelines.get("sd21-tiny").await.clone();
    p.safety = Some(Arc::new(FlagFirst { calls: AtomicUsize::new(0), down: true }));
    p.safety_settings = SafetySettings { default_policy: None, on_unavailable: OnUnavailable::Fail };
    let err = run(&p, request(v1::SafetyPolicy::Unspecified)).await.err().unwrap();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.to_string().contains("safety checker"), "{err}");

    p.safety_settings.on_unavailable = OnUnavailable::FlagOnly;
    let out = run(&p, request(v1::SafetyPolicy::Unspecified)).await.unwrap();
    assert!(!out.safety.checked);
    assert!(out.warnings.iter().any(|w| w.contains("not checked")), "{:?}", out.warnings);
}

/// The real (tiny) checker inside a job agrees with itself called on the job's images.
#[tokio::test]
async fn the_real_checker_in_a_job() {
    let mut pipelines = Pipelines::default();
    let mut p = pipelines.get("sd21-tiny").await.clone();
    let checker = Arc::new(
        sdmesh_safety::LocalSafety::load(&sdmesh_safety::SafetyOptions {
            queue_capacity: 4,
            ..sdmesh_safety::SafetyOptions::new(sdmesh_testkit::model("safety-checker-tiny"), candle_core::Device::Cpu)
        })
        .unwrap(),
    );
    p.safety = Some(checker.clone());
    let flagged = run(&p, request(v1::SafetyPolicy::Flag)).await.unwrap();
    let direct = checker.check(flagged.images.clone()).await.unwrap();
    assert!(flagged.safety.checked);
    assert_eq!(flagged.safety.flagged, direct.iter().map(|v| v.flagged).collect::<Vec<_>>());
}
