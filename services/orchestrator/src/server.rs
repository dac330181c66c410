//! The public gRPC API: Generate (unary) and GenerateStream (progress events, then the result).

use crate::admission::{JobLimits, Priority, Running, Ticket};
use crate::fleet_quota::{FleetQuota, QuotaLease};
use crate::image_out::Encoding;
use crate::models::{Models, Served};
use crate::noise::SeededNoise;
use crate::pipeline::{Job, JobOutput, Pipeline, StepProgress};
use sdmesh_core::serve::Health;
use sdmesh_core::Result;
use sdmesh_proto::v1;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, OnceCell};
use tokio_stream::Stream;
use tracing::Instrument;

/// The public API over the [`Models`]' pipelines; UNAVAILABLE until they are set (the model
/// services have answered).
#[derive(Clone)]
pub struct OrchestratorService {
    models: Arc<OnceCell<Models>>,
    /// The server's health, when served: jobs still running when the shutdown grace period
    /// ends fail with UNAVAILABLE.
    health: Option<Health>,
    /// Each tenant's bound across the orchestrators sharing a Redis, when set.
    fleet_quota: Option<FleetQuota>,
    /// The keys calls must carry, when set.
    api_keys: Option<Arc<crate::api_keys::ApiKeys>>,
}

/// A job taken in: validated, its lease and its place held (given back when dropped).
struct Admitted {
    tenant: String,
    /// The caller's deadline (`grpc-timeout`).
    deadline: Option<Duration>,
    job: Job,
    encoding: Encoding,
    return_array: bool,
    lease: Option<QuotaLease>,
    ticket: Ticket,
    span: tracing::Span,
}

impl OrchestratorService {
    /// A service over `pipeline` alone, with the default job limits.
    pub fn new(pipeline: Pipeline) -> Self {
        let service = Self { models: Arc::default(), health: None, fleet_quota: None, api_keys: None };
        service.set_models(Models::one(Served::new(pipeline, JobLimits::default())));
        service
    }

    /// A service whose jobs end with UNAVAILABLE when `health`'s shutdown grace period is over;
    /// UNAVAILABLE to calls until [`Self::set_models`]; with `api_keys`, only to calls with a
    /// key.
    pub fn served(
        health: Health,
        fleet_quota: Option<FleetQuota>,
        api_keys: Option<Arc<crate::api_keys::ApiKeys>>,
    ) -> Self {
        Self { models: Arc::default(), health: Some(health), fleet_quota, api_keys }
    }

    /// Whose a call is: its `x-sdmesh-tenant`, or with API keys, its key's tenant and bound
    /// (UNAUTHENTICATED without a key the file lists).
    fn caller(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> std::result::Result<crate::api_keys::Caller, tonic::Status> {
        let claimed = tenant(metadata);
        match &self.api_keys {
            Some(keys) => keys.caller(metadata, claimed),
            None => Ok(crate::api_keys::Caller { tenant: claimed, ..Default::default() }),
        }
    }

    /// A place for a job of `caller`'s tenant on `model`, within its key's bounds: its lease in the fleet-wide quota
    /// (RESOURCE_EXHAUSTED when the tenant is at its cap), then its place among the model's
    /// jobs, now or in the line (RESOURCE_EXHAUSTED when the line is full). Both are held until
    /// the job ends.
    async fn enter(
        &self,
        model: &Served,
        caller: &crate::api_keys::Caller,
        priority: Priority,
    ) -> Result<(Option<QuotaLease>, Ticket)> {
        let tenant = caller.tenant.as_deref().unwrap_or("");
        let lease = match &self.fleet_quota {
            Some(quota) => quota.take_capped(tenant, caller.fleet_max_jobs, model.admission.retry_hint()).await?,
            None => None,
        };
        Ok((lease, model.admission.enter_capped(tenant, priority, caller.max_jobs)?))
    }

    /// `job`, cut short with UNAVAILABLE when the shutdown grace period ends.
    async fn until_grace_over<T>(&self, job: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        match &self.health {
            Some(health) => sdmesh_core::serve::unless_grace_over(health, job).await,
            None => job.await,
        }
    }

    /// Whether it takes jobs now: its models are known and (when served) its health says
    /// SERVING, which it stops saying when it drains.
    pub fn ready(&self) -> bool {
        self.models.get().is_some() && self.health.as_ref().is_none_or(Health::is_serving)
    }

    pub fn set_models(&self, models: Models) {
        let _ = self.models.set(models);
    }

    fn models(&self) -> std::result::Result<&Models, tonic::Status> {
        self.models.get().ok_or_else(|| tonic::Status::unavailable("waiting for the model services; retry shortly"))
    }

    /// The model `name` (`""`: the default).
    fn model(&self, name: &str) -> std::result::Result<&Served, tonic::Status> {
        Ok(self.models()?.get(name)?)
    }

    /// Takes a request in: the model it names, its job validated, its lease in the fleet-wide
    /// quota and its place among the model's jobs.
    async fn admit(
        &self,
        request: tonic::Request<v1::GenerateRequest>,
    ) -> std::result::Result<(&Served, Admitted), tonic::Status> {
        let caller = self.caller(request.metadata())?;
        let priority = priority(request.metadata())?;
        let deadline = grpc_timeout(request.metadata());
        let request = request.into_inner();
        let model = self.model(&request.model)?;
        let job = model.pipeline.validate(&request)?;
        let encoding = Encoding::of(&request)?;
        let (lease, ticket) = self.enter(model, &caller, priority).await?;
        let span = job_span(&model.pipeline, &job, caller.tenant.as_deref(), priority);
        let tenant = caller.tenant.unwrap_or_default();
        let admitted =
            Admitted { tenant, deadline, job, encoding, return_array: request.return_array, lease, ticket, span };
        Ok((model, admitted))
    }

    /// Runs an admitted job on `pipeline` (see [`observe_job`]): waits for its turn (CANCELLED
    /// once `gone` resolves, as when its caller went away), runs, and answers.
    async fn run(
        &self,
        pipeline: &Pipeline,
        admitted: Admitted,
        gone: impl std::future::Future<Output = ()>,
        progress: &mut (dyn FnMut(StepProgress) -> bool + Send),
    ) -> Result<v1::GenerateResponse> {
        let Admitted { tenant, deadline, job, encoding, return_array, lease, ticket, span } = admitted;
        // Both places are given back when the job ends (or its caller goes away).
        let _lease = lease;
        let job_run = async {
            let mut running = turn(ticket, self.health.as_ref(), gone).await?;
            let out = pipeline.run(&job, &mut SeededNoise::new(job.seed), progress).await?;
            running.finished();
            Self::response(pipeline, &job, out, encoding, return_array)
        };
        observe_job(&tenant, &pipeline.model_name, deadline, self.until_grace_over(job_run.instrument(span))).await
    }

    fn response(
        pipeline: &Pipeline,
        job: &Job,
        out: JobOutput,
        encoding: Encoding,
        return_array: bool,
    ) -> Result<v1::GenerateResponse> {
        let parameters = pipeline.parameters(job);
        let encoded = encoding.encode(&out.images, &parameters)?;
        Ok(v1::GenerateResponse {
            images: encoded
                .into_iter()
                .enumerate()
                .map(|(i, bytes)| {
                    let (png, jpeg) = match encoding {
                        Encoding::Png => (bytes, Vec::new()),
                        Encoding::Jpeg(_) => (Vec::new(), bytes),
                    };
                    v1::GeneratedImage {
                        png,
                        jpeg,
                        width: job.width as u32,
                        height: job.height as u32,
                        flagged: out.safety.flagged.get(i).copied().unwrap_or(false),
                        checked: out.safety.checked,
                    }
                })
                .collect(),
            seed: job.seed,
            scheduler: job.scheduler.canonical_name(),
            array: if return_array { Some(v1::Tensor::from_candle(&out.images)?) } else { None },
            warnings: out.warnings,
            parameters,
        })
    }
}

/// How much earlier than its caller's deadline a unary job ends (at most; 5% of short ones).
const DEADLINE_MARGIN: Duration = Duration::from_millis(50);

/// Metadata naming the tenant a job runs for, recorded on its trace (platforms set it).
pub const TENANT_METADATA: &str = "x-sdmesh-tenant";

fn tenant(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata.get(TENANT_METADATA).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// Metadata saying how soon a job runs next to others waiting: high, normal (unset) or low.
pub const PRIORITY_METADATA: &str = "x-sdmesh-priority";

fn priority(metadata: &tonic::metadata::MetadataMap) -> Result<Priority> {
    match metadata.get(PRIORITY_METADATA) {
        None => Ok(Priority::Normal),
        Some(value) => Priority::parse(value.to_str().unwrap_or("(not ASCII)")),
    }
}

/// The span of one job; the step, encode and decode spans (and the model services' RPC
/// spans) are its children.
fn job_span(pipeline: &Pipeline, job: &Job, tenant: Option<&str>, priority: Priority) -> tracing::Span {
    let span = tracing::info_span!(
        "generate",
        model = %pipeline.model_name,
        scheduler = %job.scheduler.canonical_name(),
        steps = job.steps,
        seed = job.seed,
        width = job.width,
        height = job.height,
        batch = job.num_images,
        guidance_scale = job.guidance_scale,
        priority = priority.as_str(),
        tenant = tracing::field::Empty,
    );
    if let Some(tenant) = tenant {
        span.record("tenant", tenant);
    }
    span.in_scope(|| tracing::info!("generate"));
    span
}

/// Waits for the job's turn (its trace shows the wait); CANCELLED if `gone` resolves first (the
/// caller went away), UNAVAILABLE if the server starts shutting down first (the job has not
/// started: another replica can run it now rather than after the drain).
async fn turn(ticket: Ticket, health: Option<&Health>, gone: impl std::future::Future<Output = ()>) -> Result<Running> {
    if !ticket.waits() {
        return ticket.wait().await;
    }
    let draining = async {
        match health {
            Some(health) => health.draining().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        running = ticket.wait().instrument(tracing::info_span!("wait_for_turn")) => running,
        () = gone => Err(tonic::Status::cancelled("the caller went away while the job waited for its turn").into()),
        () = draining => Err(sdmesh_core::Error::Unavailable(
            "this orchestrator is shutting down and the job had not started: retry on another replica".into(),
        )),
    }
}

/// The caller's deadline, from its `grpc-timeout` metadata (up to 8 digits and a unit, as
/// gRPC over HTTP/2 writes it).
pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Runs a job of `tenant` on `model` within `deadline` (DEADLINE_EXCEEDED past it; the job's
/// calls to the model services are dropped, and so cancelled there), counting it by outcome in
/// `sdmesh_jobs_total{model,code}` and the tenant's usage (`Cancelled` when its caller went away
/// and dropped it), and timing it.
async fn observe_job(
    tenant: &str,
    model: &str,
    deadline: Option<Duration>,
    job: impl std::future::Future<Output = Result<v1::GenerateResponse>>,
) -> Result<v1::GenerateResponse> {
    let counted = |code: tonic::Code| {
        metrics::counter!("sdmesh_jobs_total", "model" => model.to_string(), "code" => format!("{code:?}"))
            .increment(1);
        crate::usage::job_ended(tenant, code);
    };
    /// Counts the job as cancelled unless it finished.
    struct Unfinished<F: Fn(tonic::Code)>(Option<F>);
    impl<F: Fn(tonic::Code)> Drop for Unfinished<F> {
        fn drop(&mut self) {
            if let Some(counted) = &self.0 {
                counted(tonic::Code::Cancelled);
            }
        }
    }
    let mut unfinished = Unfinished(Some(&counted));
    let started = std::time::Instant::now();
    let result = match deadline {
        Some(deadline) => tokio::time::timeout(deadline, job).await.unwrap_or_else(|_| {
            Err(tonic::Status::deadline_exceeded(format!(
                "the job did not finish within the caller's deadline ({:.3} s)",
                deadline.as_secs_f64()
            ))
            .into())
        }),
        None => job.await,
    };
    unfinished.0 = None;
    let code = match &result {
        Ok(response) => {
            crate::usage::images_delivered(tenant, response.images.len());
            tonic::Code::Ok
        }
        Err(e) => e.code(),
    };
    counted(code);
    metrics::histogram!("sdmesh_job_duration_seconds", "model" => model.to_string())
        .record(started.elapsed().as_secs_f64());
    result
}

type EventStream = Pin<Box<dyn Stream<Item = std::result::Result<v1::GenerateEvent, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl v1::orchestrator_server::Orchestrator for OrchestratorService {
    async fn generate(
        &self,
        request: tonic::Request<v1::GenerateRequest>,
    ) -> std::result::Result<tonic::Response<v1::GenerateResponse>, tonic::Status> {
        let (model, mut admitted) = self.admit(request).await?;
        // tonic ends a call past its deadline with CANCELLED: end the job a little earlier, so
        // that the caller gets DEADLINE_EXCEEDED.
        admitted.deadline = admitted.deadline.map(|t| t.saturating_sub((t / 20).min(DEADLINE_MARGIN)));
        // A caller that goes away drops this future, and the job leaves the line.
        let response = self.run(&model.pipeline, admitted, std::future::pending(), &mut |_| true).await?;
        Ok(tonic::Response::new(response))
    }

    type GenerateStreamStream = EventStream;

    async fn generate_stream(
        &self,
        request: tonic::Request<v1::GenerateRequest>,
    ) -> std::result::Result<tonic::Response<Self::GenerateStreamStream>, tonic::Status> {
        // tonic does not hold a stream to its deadline: the job does.
        let (model, admitted) = self.admit(request).await?;
        let pipeline = model.pipeline.clone();
        // Room for every event, so the job never waits on a slow reader.
        let (tx, rx) = mpsc::channel(admitted.job.steps + 3);
        if let Some((ahead, running)) = admitted.ticket.line() {
            let waiting = v1::Waiting { jobs_ahead: ahead as u32, jobs_running: running as u32 };
            let _ = tx.try_send(Ok(v1::GenerateEvent { event: Some(v1::generate_event::Event::Waiting(waiting)) }));
        }
        let service = self.clone();
        tokio::spawn(async move {
            let progress_tx = tx.clone();
            let mut progress = move |p: StepProgress| {
                // A preview that cannot be encoded is left out: it must not fail the job.
                let preview = p.preview.as_ref().and_then(|rgb| crate::image_out::preview_jpeg(rgb).ok());
                let event = v1::GenerateEvent {
                    event: Some(v1::generate_event::Event::Progress(v1::Progress {
                        step: p.step as u32,
                        total_steps: p.total as u32,
                        timestep: p.timestep,
                        restarts: p.restarts as u32,
                        preview: preview.unwrap_or_default(),
                    })),
                };
                // A closed stream means the client went away: stop the job.
                progress_tx.try_send(Ok(event)).is_ok() || !progress_tx.is_closed()
            };
            let result = service.run(&pipeline, admitted, tx.closed(), &mut progress).await;
            let event = match result {
                Ok(r) => Ok(v1::GenerateEvent { event: Some(v1::generate_event::Event::Result(r)) }),
                Err(e) => Err(tonic::Status::from(e)),
            };
            let _ = tx.send(event).await;
        });
        Ok(tonic::Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn list_models(
        &self,
        request: tonic::Request<v1::ListModelsRequest>,
    ) -> std::result::Result<tonic::Response<v1::ListModelsResponse>, tonic::Status> {
        self.caller(request.metadata())?;
        Ok(tonic::Response::new(self.models()?.list()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_junk_is_none() {
        let parse = |v: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse("5n"), Some(Duration::from_nanos(5)));
        for junk in ["", "S", "123456789S", "10s", "1.5S", "-1S", "10"] {
            assert_eq!(parse(junk), None, "{junk:?}");
        }
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
    }

    #[tokio::test]
    async fn a_job_past_its_deadline_ends_with_deadline_exceeded() {
        let slow = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(v1::GenerateResponse::default())
        };
        let e = observe_job("", "m", Some(Duration::from_millis(20)), slow).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::DeadlineExceeded);
        assert!(e.to_string().contains("deadline"), "{e}");
        let quick = async { Ok(v1::GenerateResponse::default()) };
        assert!(observe_job("", "m", Some(Duration::from_secs(5)), quick).await.is_ok());
    }
}
