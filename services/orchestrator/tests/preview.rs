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
