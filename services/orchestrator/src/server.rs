//! The public gRPC API: Generate (unary) and GenerateStream (progress events, then the result).

use crate::noise::SeededNoise;
use crate::pipeline::{Job, JobOutput, Pipeline, StepProgress};
use sdmesh_core::Result;
use sdmesh_proto::v1;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{mpsc, OnceCell};
use tokio_stream::Stream;

/// The public API over a [`Pipeline`]; UNAVAILABLE until the pipeline is set (the model
/// services have answered).
#[derive(Clone, Default)]
pub struct OrchestratorService {
    pipeline: Arc<OnceCell<Pipeline>>,
}

impl OrchestratorService {
    pub fn new(pipeline: Pipeline) -> Self {
        let service = Self::default();
        service.set_pipeline(pipeline);
        service
    }

    pub fn set_pipeline(&self, pipeline: Pipeline) {
        let _ = self.pipeline.set(pipeline);
    }

    fn pipeline(&self) -> std::result::Result<&Pipeline, tonic::Status> {
        self.pipeline.get().ok_or_else(|| tonic::Status::unavailable("waiting for the model services; retry shortly"))
    }

    fn response(pipeline: &Pipeline, job: &Job, out: JobOutput, return_array: bool) -> Result<v1::GenerateResponse> {
        let parameters = pipeline.parameters(job);
        let pngs = crate::png::encode_pngs(&out.images, &parameters)?;
        Ok(v1::GenerateResponse {
            images: pngs
                .into_iter()
                .map(|png| v1::GeneratedImage { png, width: job.width as u32, height: job.height as u32 })
                .collect(),
            seed: job.seed,
            scheduler: job.scheduler.canonical_name(),
            array: if return_array { Some(v1::Tensor::from_candle(&out.images)?) } else { None },
            warnings: out.warnings,
            parameters,
        })
    }
}

type EventStream = Pin<Box<dyn Stream<Item = std::result::Result<v1::GenerateEvent, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl v1::orchestrator_server::Orchestrator for OrchestratorService {
    async fn generate(
        &self,
        request: tonic::Request<v1::GenerateRequest>,
    ) -> std::result::Result<tonic::Response<v1::GenerateResponse>, tonic::Status> {
        let request = request.into_inner();
        let pipeline = self.pipeline()?;
        let job = pipeline.validate(&request)?;
        tracing::info!(seed = job.seed, steps = job.steps, scheduler = %job.scheduler.canonical_name(), "generate");
        let out = pipeline.run(&job, &mut SeededNoise::new(job.seed), &mut |_| true).await?;
        Ok(tonic::Response::new(Self::response(pipeline, &job, out, request.return_array)?))
    }

    type GenerateStreamStream = EventStream;

    async fn generate_stream(
        &self,
        request: tonic::Request<v1::GenerateRequest>,
    ) -> std::result::Result<tonic::Response<Self::GenerateStreamStream>, tonic::Status> {
        let request = request.into_inner();
        let pipeline = self.pipeline()?.clone();
        let job = pipeline.validate(&request)?;
        tracing::info!(seed = job.seed, steps = job.steps, scheduler = %job.scheduler.canonical_name(), "generate (stream)");
        // Room for every progress event, so the job never waits on a slow reader.
        let (tx, rx) = mpsc::channel(job.steps + 2);
        tokio::spawn(async move {
            let progress_tx = tx.clone();
            let mut progress = move |p: StepProgress| {
                let event = v1::GenerateEvent {
                    event: Some(v1::generate_event::Event::Progress(v1::Progress {
                        step: p.step as u32,
                        total_steps: p.total as u32,
                        timestep: p.timestep,
                    })),
                };
                // A closed stream means the client went away: stop the job.
                progress_tx.try_send(Ok(event)).is_ok() || !progress_tx.is_closed()
            };
            let result = pipeline
                .run(&job, &mut SeededNoise::new(job.seed), &mut progress)
                .await
                .and_then(|out| Self::response(&pipeline, &job, out, request.return_array));
            let event = match result {
                Ok(r) => Ok(v1::GenerateEvent { event: Some(v1::generate_event::Event::Result(r)) }),
                Err(e) => Err(tonic::Status::from(e)),
            };
            let _ = tx.send(event).await;
        });
        Ok(tonic::Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}
