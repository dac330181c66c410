//! sdmesh-bench: the benchmarks behind `make bench`. Each prints JSON lines on stdout (one
//! per measurement) and a readable line per measurement on stderr.
//!
//! - `overhead`: the same jobs through the mesh (gRPC over loopback) and in process.
//! - `throughput`: images/s through the mesh at several numbers of concurrent jobs, with the
//!   unet service's batching on and off.
//! - `components`: candle's text encoder, UNet step and VAE decode alone (diffusers' side is
//!   benchmarks/diffusers_components.py).
//! - `agreement`: a device and dtype (a GPU in f16, say) against the f32 CPU reference, per
//!   component and for whole seeded jobs; exits non-zero past the tolerances.
//! - `invariance`: step-level batching's promise on a device: a job's UNet step alone and in
//!   one forward pass with other jobs' steps.

use clap::{Parser, Subcommand};
use sdmesh::mesh::{serve_mesh, MeshOptions};
use sdmesh_core::serve::Shutdown;
use sdmesh_core::{DenoiseInput, Denoiser, TextEncoder, Vae};
use sdmesh_orchestrator::pipeline::Limits;
use sdmesh_orchestrator::server::OrchestratorService;
use sdmesh_proto::v1;
use sdmesh_proto::v1::orchestrator_server::Orchestrator;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "sdmesh benchmarks (make bench runs them)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the models run.
#[derive(clap::Args, Debug, Clone)]
struct Placement {
    /// cpu, or cuda / cuda:N in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The models' float type: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = sdmesh_core::parse_dtype)]
    dtype: candle_core::DType,
}

impl Placement {
    fn device(&self) -> anyhow::Result<candle_core::Device> {
        sdmesh_core::parse_device(&self.device).map_err(anyhow::Error::msg)
    }

    fn mesh(&self, model: PathBuf) -> anyhow::Result<MeshOptions> {
        Ok(MeshOptions { dtype: self.dtype, ..MeshOptions::new(model, self.device()?) })
    }

    fn describe(&self) -> serde_json::Value {
        let cudnn = self.device().is_ok_and(|d| sdmesh_core::cudnn::active(&d, self.dtype));
        json!({"device": self.device, "dtype": format!("{:?}", self.dtype).to_lowercase(),
               "flash_attention": sdmesh_core::attention::flash_attention_enabled(),
               "cuda_group_norm": self.device != "cpu" && sdmesh_core::norm::cuda_kernel_enabled(),
               "cuda_geglu": self.device != "cpu" && sdmesh_core::activation::cuda_geglu_enabled(),
               "cudnn_conv": cudnn, "cudnn_version": sdmesh_core::cudnn::version(),
               "cudnn_fallbacks": sdmesh_core::cudnn::fallbacks()})
    }
}

#[derive(clap::Args, Debug, Clone)]
struct JobShape {
    /// Diffusers-layout model folder.
    #[arg(long)]
    model: PathBuf,
    /// Image height and width in pixels.
    #[arg(long, default_value_t = 256)]
    size: u32,
    /// Denoising steps per job.
    #[arg(long, default_value_t = 10)]
    steps: u32,
    #[command(flatten)]
    placement: Placement,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// --device/--dtype against the f32 CPU reference on the same inputs: text encoder, guided
    /// UNet step, VAE decode, then a whole seeded job. Prints each max abs error (and any
    /// non-finite value) and exits non-zero if one is past its tolerance.
    Agreement {
        #[command(flatten)]
        job: JobShape,
        /// UNet rows in the component comparison (the guided step doubles them).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Compare several dtypes against one reference (e.g. f16,bf16) instead of --dtype.
        #[arg(long, value_delimiter = ',', value_parser = sdmesh_core::parse_dtype)]
        dtypes: Vec<candle_core::DType>,
        /// Largest error allowed, relative to the reference's largest magnitude (text encoder,
        /// UNet), or absolute on [0, 1] pixels (VAE decode; 2.5 times it for the job's images).
        /// Default: 2e-2 for f16 and f32, 8e-2 for bf16.
        #[arg(long)]
        tolerance: Option<f64>,
    },
    /// A job's UNet step alone and in one forward pass with other jobs' steps (other
    /// timesteps, guidance on and off, 9 rows in all), on --device/--dtype: per step, the
    /// largest difference and whether the bits are the same. Measures; asserts nothing.
    Invariance {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 256)]
        size: usize,
        #[command(flatten)]
        placement: Placement,
    },
    /// Mesh (loopback gRPC) vs in-process on the same jobs: ms of overhead per step.
    Overhead {
        #[command(flatten)]
        job: JobShape,
        /// Jobs measured on each side (after one warm-up job each).
        #[arg(long, default_value_t = 5)]
        jobs: usize,
    },
    /// Images/s through the mesh with 1, 2, 4, ... concurrent jobs, batching on and off.
    Throughput {
        #[command(flatten)]
        job: JobShape,
        /// Concurrent jobs to measure at.
        #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 4, 8, 16])]
        concurrency: Vec<usize>,
        /// Most UNet rows per forward pass with batching on.
        #[arg(long, default_value_t = 32)]
        max_batch_rows: usize,
    },
    /// candle's components alone: text encoder (77 tokens), UNet step, VAE decode.
    Components {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 256)]
        size: usize,
        /// UNet batch: images, one row each (two with --guided).
        #[arg(long, default_value_t = 2)]
        batch: usize,
        /// Guided UNet steps (guidance 7.5: an unconditional and a conditional row per image),
        /// as jobs send them; by default one row per image.
        #[arg(long)]
        guided: bool,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        #[command(flatten)]
        placement: Placement,
        /// Also print where the UNet step's and the VAE decode's time goes: self time per span
        /// (conv2d, linear, attention, ...), measured with tracing; on a GPU, waiting for the
        /// device at each span boundary.
        #[arg(long)]
        profile: bool,
    },
}

/// Self time per span name (time inside a span minus time inside its child spans), for the
/// `components --profile` breakdown. Spans must be enabled when the model is built: candle
/// creates its TRACE spans at construction.
mod profile {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    use tracing::span::Id;
    use tracing_subscriber::layer::Context;
    use tracing_subscriber::registry::LookupSpan;

    pub static TOTALS: Mutex<Option<HashMap<&'static str, (Duration, u64)>>> = Mutex::new(None);
    /// A GPU to wait for at every span boundary, so that a span's time is its kernels' time
    /// rather than the time to queue them (the waits slow the step down; the shares hold).
    pub static SYNC: std::sync::OnceLock<candle_core::Device> = std::sync::OnceLock::new();

    fn sync() {
        if let Some(device) = SYNC.get() {
            let _ = device.synchronize();
        }
    }

    thread_local! {
        /// Per open span on this thread: when it was entered and its children's time.
        static STACK: RefCell<Vec<(Instant, Duration)>> = const { RefCell::new(Vec::new()) };
    }

    pub struct SelfTime;

    impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for SelfTime {
        fn on_enter(&self, _id: &Id, _ctx: Context<'_, S>) {
            sync();
            STACK.with(|s| s.borrow_mut().push((Instant::now(), Duration::ZERO)));
        }

        fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
            sync();
            let Some((start, children)) = STACK.with(|s| s.borrow_mut().pop()) else { return };
            let total = start.elapsed();
            STACK.with(|s| {
                if let Some(parent) = s.borrow_mut().last_mut() {
                    parent.1 += total;
                }
            });
            let name = ctx.span(id).map(|s| s.name()).unwrap_or("?");
            if let Ok(mut totals) = TOTALS.lock() {
                let entry = totals.get_or_insert_with(HashMap::new).entry(name).or_default();
                entry.0 += total.saturating_sub(children);
                entry.1 += 1;
            }
        }
    }

    pub fn reset() {
        if let Ok(mut t) = TOTALS.lock() {
            *t = Some(HashMap::new());
        }
    }

    /// (name, self time, calls), largest first.
    pub fn take() -> Vec<(&'static str, Duration, u64)> {
        let mut rows: Vec<_> = TOTALS
            .lock()
            .ok()
            .and_then(|mut t| t.take())
            .unwrap_or_default()
            .into_iter()
            .map(|(k, (d, n))| (k, d, n))
            .collect();
        rows.sort_by_key(|row| std::cmp::Reverse(row.1));
        rows
    }

    /// Runs `f` once with the spans counted, and prints the 12 largest self times.
    pub fn report(component: &str, model: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
        reset();
        f()?;
        sync();
        let rows = take();
        let total: f64 = rows.iter().map(|r| r.1.as_secs_f64()).sum();
        for (span, time, calls) in rows.iter().take(12) {
            let share = time.as_secs_f64() / total;
            super::emit(
                serde_json::json!({"bench": "profile", "component": component, "model": model, "span": span,
                       "self_ms": time.as_secs_f64() * 1e3, "calls": calls, "share": share}),
                format!(
                    "profile    {component} {span:<22} {:>9.1} ms self {:>5.1}% ({calls} calls)",
                    time.as_secs_f64() * 1e3,
                    share * 100.0
                ),
            );
        }
        Ok(())
    }
}

fn model_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Adds `extra`'s fields to the JSON object `line`.
fn extend(line: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(l), serde_json::Value::Object(e)) = (line.as_object_mut(), extra) {
        l.extend(e);
    }
}

fn emit(line: serde_json::Value, human: String) {
    println!("{line}");
    eprintln!("{human}");
}

fn request(job: &JobShape, seed: u64) -> v1::GenerateRequest {
    v1::GenerateRequest {
        prompt: format!("a benchmark photograph, variation {}", seed % 4),
        negative_prompt: "blurry".into(),
        steps: Some(job.steps),
        seed: Some(seed),
        height: Some(job.size),
        width: Some(job.size),
        ..Default::default()
    }
}

/// A mesh in this process on a loopback port; stops when the returned sender is dropped.
async fn start_mesh(
    opts: MeshOptions,
) -> anyhow::Result<(
    v1::orchestrator_client::OrchestratorClient<sdmesh_core::client::ReplicaSet>,
    tokio::sync::oneshot::Sender<()>,
)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = Shutdown::new(
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(5),
    );
    tokio::spawn(async move {
        if let Err(e) = serve_mesh(opts, listener, None, shutdown).await {
            eprintln!("mesh: {e:#}");
        }
    });
    let client = v1::orchestrator_client::OrchestratorClient::new(sdmesh_core::client::lazy_channel(&url)?)
        .max_decoding_message_size(Limits::default().max_response_bytes());
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut probe = client.clone();
    loop {
        match probe.generate(v1::GenerateRequest { prompt: "warm".into(), steps: Some(1), ..Default::default() }).await
        {
            Ok(_) => break,
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(s) => anyhow::bail!("mesh did not come up: {s}"),
        }
    }
    Ok((client, stop))
}

async fn overhead(job: JobShape, jobs: usize) -> anyhow::Result<()> {
    let device = job.placement.device()?;
    let (mut mesh, _stop) = start_mesh(job.placement.mesh(job.model.clone())?).await?;
    let pipeline =
        sdmesh_orchestrator::local_pipeline(&job.model, &device, job.placement.dtype, 64, Limits::default()).await?;
    let pipeline = sdmesh_orchestrator::with_embedding_cache(
        pipeline,
        std::sync::Arc::new(sdmesh_orchestrator::embedding_cache::LruStore::new(256 << 20)),
    );
    let local = OrchestratorService::new(pipeline);
    let (mut mesh_s, mut local_s) = (Vec::new(), Vec::new());
    // Warm-up, then interleaved so that drift in the machine's speed hits both sides alike.
    for i in 0..=jobs {
        let started = Instant::now();
        let a = mesh.generate(request(&job, i as u64)).await?.into_inner();
        let mesh_time = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let b = local.generate(tonic::Request::new(request(&job, i as u64))).await?.into_inner();
        let local_time = started.elapsed().as_secs_f64();
        anyhow::ensure!(a.images == b.images, "mesh and in-process images differ");
        if i > 0 {
            mesh_s.push(mesh_time);
            local_s.push(local_time);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (m, l) = (mean(&mesh_s), mean(&local_s));
    // The overhead is the median of the paired differences: one slow job on either side (this
    // VM's neighbours) moves the mean difference by more than the wire costs.
    let mut pairs: Vec<f64> = mesh_s.iter().zip(&local_s).map(|(a, b)| a - b).collect();
    pairs.sort_by(f64::total_cmp);
    let median = |v: &[f64]| (v[(v.len() - 1) / 2] + v[v.len() / 2]) / 2.0;
    let per_step_ms = median(&pairs) / job.steps as f64 * 1e3;
    let mean_per_step_ms = (m - l) / job.steps as f64 * 1e3;
    let mut line = json!({"bench": "overhead", "model": model_name(&job.model), "size": job.size, "steps": job.steps,
               "jobs": jobs, "mesh_s_per_job": m, "in_process_s_per_job": l,
               "overhead_ms_per_step": per_step_ms, "mean_overhead_ms_per_step": mean_per_step_ms,
               "ratio": m / l});
    extend(&mut line, job.placement.describe());
    emit(
        line,
        format!(
            "overhead  {:<16} {}px {} steps: mesh {:.3} s/job, in-process {:.3} s/job, {:+.2} ms/step (median pair; mean {:+.2}), ratio {:.3}",
            model_name(&job.model),
            job.size,
            job.steps,
            m,
            l,
            per_step_ms,
            mean_per_step_ms,
            m / l
        ),
    );
    Ok(())
}

async fn throughput(job: JobShape, levels: Vec<usize>, max_batch_rows: usize) -> anyhow::Result<()> {
    for (batching, rows) in [("on", max_batch_rows), ("off", 1)] {
        let unet_batching = sdmesh_unet::BatchingArgs { max_batch_rows: rows, ..Default::default() };
        let opts = MeshOptions { batching: unet_batching, ..job.placement.mesh(job.model.clone())? };
        let (client, stop) = start_mesh(opts).await?;
        for &c in &levels {
            let total = c.max(4);
            let started = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for w in 0..c {
                let mut client = client.clone();
                let job = job.clone();
                tasks.spawn(async move {
                    // Workers share the jobs: worker w runs jobs w, w + c, ...
                    for j in (w..total).step_by(c) {
                        client.generate(request(&job, j as u64)).await?;
                    }
                    anyhow::Ok(())
                });
            }
            while let Some(done) = tasks.join_next().await {
                done??;
            }
            let wall = started.elapsed().as_secs_f64();
            let ips = total as f64 / wall;
            let mut line = json!({"bench": "throughput", "model": model_name(&job.model), "size": job.size,
                       "steps": job.steps, "batching": batching, "concurrency": c, "jobs": total,
                       "seconds": wall, "images_per_s": ips});
            extend(&mut line, job.placement.describe());
            emit(
                line,
                format!(
                    "throughput {:<16} batching {batching:<3} {c:>2} concurrent: {total} jobs in {wall:.2} s = {ips:.3} images/s",
                    model_name(&job.model)
                ),
            );
        }
        drop(stop);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

fn timed<T>(reps: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<(f64, f64)> {
    f()?;
    let mut times = Vec::new();
    for _ in 0..reps {
        let started = Instant::now();
        f()?;
        times.push(started.elapsed().as_secs_f64());
    }
    let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
    Ok((best, times.iter().sum::<f64>() / times.len() as f64))
}

async fn components(
    model: PathBuf,
    size: usize,
    (batch, guided): (usize, bool),
    reps: usize,
    placement: Placement,
    profile: bool,
) -> anyhow::Result<()> {
    let device = placement.device()?;
    let dtype = placement.dtype;
    let cpu = candle_core::Device::Cpu;
    let threads = candle_core::utils::get_num_threads();
    let rt = tokio::runtime::Handle::current();
    let name = model_name(&model);
    let report = |component: &str, (best, mean): (f64, f64), extra: serde_json::Value| {
        let mut line = json!({"bench": "components", "impl": "candle", "component": component, "model": name,
                              "threads": threads, "best_ms": best * 1e3, "mean_ms": mean * 1e3});
        extend(&mut line, extra);
        extend(&mut line, placement.describe());
        emit(
            line,
            format!(
                "components {name:<16} candle {component:<12} best {:.1} ms, mean {:.1} ms",
                best * 1e3,
                mean * 1e3
            ),
        );
    };

    let te = sdmesh_text_encoder::LocalTextEncoder::load(&sdmesh_text_encoder::TextEncoderOptions {
        dtype,
        queue_capacity: 4,
        ..sdmesh_text_encoder::TextEncoderOptions::new(model.clone(), device.clone())
    })?;
    let texts: Vec<String> = (0..batch).map(|i| format!("a benchmark prompt number {i}")).collect();
    let t = tokio::task::block_in_place(|| timed(reps, || Ok(rt.block_on(te.encode(texts.clone()))?)))?;
    report("text_encoder", t, json!({"batch": batch, "tokens": 77}));
    let hidden = te.info().await?.hidden_size as usize;
    drop(te);

    let unet = sdmesh_unet::LocalUnet::load(&sdmesh_unet::UnetOptions {
        dtype,
        ..sdmesh_unet::UnetOptions::new(model.clone(), device.clone())
    })?;
    let latents = candle_core::Tensor::randn(0f32, 1., (batch, 4, size / 8, size / 8), &cpu)?;
    let cond = candle_core::Tensor::randn(0f32, 1., (batch, 77, hidden), &cpu)?;
    let uncond = guided.then(|| candle_core::Tensor::randn(0f32, 1., (batch, 77, hidden), &cpu)).transpose()?;
    let step = || DenoiseInput {
        latents: latents.clone(),
        timestep: 500.0,
        cond: cond.clone(),
        uncond: uncond.clone(),
        guidance_scale: if guided { 7.5 } else { 1.0 },
        guidance_rescale: 0.0,
        class_label: None,
        extra: None,
    };
    let t = tokio::task::block_in_place(|| timed(reps, || Ok(rt.block_on(unet.denoise(step()))?)))?;
    let rows = step().rows();
    report("unet_step", t, json!({"batch": rows, "images": batch, "guided": guided, "height": size, "width": size}));
    if profile {
        profile::report("unet_step", &name, || {
            tokio::task::block_in_place(|| rt.block_on(unet.denoise(step())))?;
            Ok(())
        })?;
    }
    drop(unet);

    let vae = sdmesh_vae::LocalVae::load(&sdmesh_vae::VaeOptions {
        dtype,
        queue_capacity: 4,
        ..sdmesh_vae::VaeOptions::new(model, device.clone())
    })?;
    let z = candle_core::Tensor::randn(0f32, 1., (1, 4, size / 8, size / 8), &cpu)?;
    let t = tokio::task::block_in_place(|| timed(reps, || Ok(rt.block_on(vae.decode(z.clone()))?)))?;
    report("vae_decode", t, json!({"batch": 1, "height": size, "width": size}));
    if profile {
        profile::report("vae_decode", &name, || {
            tokio::task::block_in_place(|| rt.block_on(vae.decode(z.clone())))?;
            Ok(())
        })?;
    }
    Ok(())
}

/// The largest |a - b|, the reference's largest |b|, and how many of `a` are not finite.
fn compare(a: &candle_core::Tensor, b: &candle_core::Tensor) -> anyhow::Result<(f64, f64, usize)> {
    let flat = |t: &candle_core::Tensor| -> anyhow::Result<Vec<f32>> {
        Ok(t.to_device(&candle_core::Device::Cpu)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?)
    };
    let (a, b) = (flat(a)?, flat(b)?);
    anyhow::ensure!(a.len() == b.len(), "compared tensors differ in size: {} vs {}", a.len(), b.len());
    let nonfinite = a.iter().filter(|x| !x.is_finite()).count();
    let err = a.iter().zip(&b).map(|(x, y)| f64::from((x - y).abs())).fold(0.0, f64::max);
    let scale = b.iter().map(|y| f64::from(y.abs())).fold(0.0, f64::max);
    Ok((err, scale, nonfinite))
}

async fn agreement(
    job: JobShape,
    batch: usize,
    dtypes: Vec<candle_core::DType>,
    tolerance: Option<f64>,
) -> anyhow::Result<()> {
    use candle_core::{DType, Module};
    let device = job.placement.device()?;
    let dtypes = if dtypes.is_empty() { vec![job.placement.dtype] } else { dtypes };
    let (cpu, f32) = (candle_core::Device::Cpu, DType::F32);
    let name = model_name(&job.model);
    let size = job.size as usize;
    let mut failed = Vec::new();
    // Components: relative to the reference's magnitude. A job's [0, 1] pixels: absolute, and
    // looser, since a step's error moves every later step's input.
    let mut report = |component: &str, dtype: DType, (err, scale, nonfinite): (f64, f64, usize), relative: bool| {
        let tol = tolerance.unwrap_or(if dtype == DType::BF16 { 8e-2 } else { 2e-2 });
        let bound = if relative {
            tol * scale.max(1e-6)
        } else if component.starts_with("job") {
            2.5 * tol
        } else {
            tol
        };
        let ok = nonfinite == 0 && err <= bound;
        if !ok {
            failed.push(format!("{component} {dtype:?}"));
        }
        let placement = Placement { device: job.placement.device.clone(), dtype };
        let mut line = json!({"bench": "agreement", "model": name, "component": component, "size": size,
                              "batch": batch, "max_abs_error": err, "reference_max_abs": scale,
                              "nonfinite": nonfinite, "bound": bound, "ok": ok});
        extend(&mut line, placement.describe());
        emit(
            line,
            format!(
                "agreement {name:<16} {component:<12} {} {dtype:?}: max abs error {err:.3e} (reference up to {scale:.3}, bound {bound:.3e}){}{}",
                placement.device,
                if nonfinite > 0 { format!(", {nonfinite} non-finite") } else { String::new() },
                if ok { "" } else { "  FAILED" }
            ),
        );
    };

    // The attention kernel on its own (flash attention where the build has it, unless
    // SDMESH_FLASH_ATTENTION=0): the UNet's self- and cross-attention at this size, the VAE's
    // one 512-wide head, and lengths that are no multiple of the kernel's tiles.
    let tokens = (size / 8) * (size / 8);
    for (label, b, q_len, kv_len, heads, head_dim) in [
        ("attn_self_d64", 2, tokens, tokens, 5, 64),
        ("attn_cross_d64", 2, tokens, 77, 5, 64),
        ("attn_vae_d512", 1, tokens, tokens, 1, 512),
        ("attn_odd_d128", 3, 1000, 333, 2, 128),
    ] {
        let draw = |seed: u64, len: usize| -> anyhow::Result<candle_core::Tensor> {
            Ok(sdmesh_core::torch_rng::randn_tensor(seed, &[b, len, heads * head_dim], &cpu)?)
        };
        let (q, k, v) = (draw(11, q_len)?, draw(12, kv_len)?, draw(13, kv_len)?);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let expected = sdmesh_core::attention::multi_head_attention(&q, &k, &v, heads, scale, true)?;
        for &dtype in &dtypes {
            let placed = |t: &candle_core::Tensor| t.to_device(&device)?.to_dtype(dtype);
            let actual = sdmesh_core::attention::multi_head_attention(
                &placed(&q)?,
                &placed(&k)?,
                &placed(&v)?,
                heads,
                scale,
                true,
            )?;
            report(label, dtype, compare(&actual, &expected)?, true);
        }
    }

    // Convolutions alone (cuDNN in f16/bf16 on CUDA unless SDMESH_CUDNN_CONV=0): 3x3 at the
    // UNet's first level and at the VAE's last, a stride-2 downsampling, a 1x1 shortcut.
    for (label, shape, c_out, kernel, stride) in [
        ("conv_unet", [2, 320, size / 8, size / 8], 320, 3, 1),
        ("conv_vae", [1, 128, size, size], 128, 3, 1),
        ("conv_down", [2, 320, size / 8, size / 8], 320, 3, 2),
        ("conv_1x1", [2, 512, size / 4, size / 4], 256, 1, 1),
    ] {
        let c_in = shape[1];
        let x = sdmesh_core::torch_rng::randn_tensor(31, &shape, &cpu)?;
        let tensors = std::collections::HashMap::from([
            (
                "weight".to_string(),
                sdmesh_core::torch_rng::randn_tensor(32, &[c_out, c_in, kernel, kernel], &cpu)?
                    .affine(1.0 / ((c_in * kernel * kernel) as f64).sqrt(), 0.0)?,
            ),
            ("bias".to_string(), sdmesh_core::torch_rng::randn_tensor(33, &[c_out], &cpu)?),
        ]);
        let config = candle_nn::Conv2dConfig { padding: kernel / 2, stride, ..Default::default() };
        let conv = |dtype, device: &candle_core::Device| {
            let vs = candle_nn::VarBuilder::from_tensors(tensors.clone(), dtype, device);
            sdmesh_core::blocks::Conv2d::new(c_in, c_out, kernel, config, vs)
        };
        let expected = conv(f32, &cpu)?.forward(&x)?;
        for &dtype in &dtypes {
            let actual = conv(dtype, &device)?.forward(&x.to_device(&device)?.to_dtype(dtype)?)?;
            report(label, dtype, compare(&actual, &expected)?, true);
        }
    }

    // GEGLU alone (the CUDA kernel unless SDMESH_CUDA_GEGLU=0): the UNet's first level's
    // feed-forward projection (320 channels, 4 x 320 wide, doubled), at activation scale.
    let projected = sdmesh_core::torch_rng::randn_tensor(41, &[2, tokens, 2 * 1280], &cpu)?.affine(2.0, 0.0)?;
    let expected = sdmesh_core::activation::geglu(&projected)?;
    for &dtype in &dtypes {
        let actual = sdmesh_core::activation::geglu(&projected.to_device(&device)?.to_dtype(dtype)?)?;
        report("geglu_unet", dtype, compare(&actual, &expected)?, true);
    }

    // GroupNorm + SiLU alone (the CUDA kernel unless SDMESH_CUDA_GROUP_NORM=0): the UNet's first
    // blocks and the VAE's last at this size, on activations with an offset mean.
    for (label, shape) in [("groupnorm_unet", [2, 320, size / 8, size / 8]), ("groupnorm_vae", [1, 128, size, size])] {
        let channels = shape[1];
        let x = sdmesh_core::torch_rng::randn_tensor(21, &shape, &cpu)?.affine(3.0, 5.0)?;
        let affine = |dtype, device: &candle_core::Device| -> anyhow::Result<sdmesh_core::norm::GroupNorm> {
            let tensors = std::collections::HashMap::from([
                ("weight".to_string(), sdmesh_core::torch_rng::randn_tensor(22, &[channels], &cpu)?.affine(0.3, 1.0)?),
                ("bias".to_string(), sdmesh_core::torch_rng::randn_tensor(23, &[channels], &cpu)?.affine(0.3, 0.0)?),
            ]);
            let vs = candle_nn::VarBuilder::from_tensors(tensors, dtype, device);
            Ok(sdmesh_core::norm::GroupNorm::new(32, channels, 1e-6, vs)?)
        };
        let expected = affine(f32, &cpu)?.forward_silu(&x)?;
        for &dtype in &dtypes {
            let actual = affine(dtype, &device)?.forward_silu(&x.to_device(&device)?.to_dtype(dtype)?)?;
            report(label, dtype, compare(&actual, &expected)?, true);
        }
    }

    let texts: Vec<String> = (0..batch).map(|i| format!("an agreement prompt number {i}")).collect();
    let text_encoder = |device: &candle_core::Device, dtype| {
        sdmesh_text_encoder::LocalTextEncoder::load(&sdmesh_text_encoder::TextEncoderOptions {
            dtype,
            ..sdmesh_text_encoder::TextEncoderOptions::new(job.model.clone(), device.clone())
        })
    };
    let reference_te = text_encoder(&cpu, f32)?;
    let cond = reference_te.encode(texts.clone()).await?.embeddings;
    let uncond = reference_te.encode(vec![String::new(); batch]).await?.embeddings;
    drop(reference_te);
    for &dtype in &dtypes {
        let placed = text_encoder(&device, dtype)?.encode(texts.clone()).await?.embeddings;
        report("text_encoder", dtype, compare(&placed, &cond)?, true);
    }

    let unet = |device: &candle_core::Device, dtype| {
        sdmesh_unet::LocalUnet::load(&sdmesh_unet::UnetOptions {
            dtype,
            ..sdmesh_unet::UnetOptions::new(job.model.clone(), device.clone())
        })
    };
    // Seeded (PyTorch's generator), so runs compare on the same inputs.
    let randn = |seed: u64, shape: (usize, usize, usize, usize)| -> anyhow::Result<candle_core::Tensor> {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        Ok(candle_core::Tensor::from_vec(sdmesh_core::torch_rng::TorchGenerator::new(seed).randn(n), shape, &cpu)?)
    };
    let latents = randn(1, (batch, 4, size / 8, size / 8))?;
    let step = || DenoiseInput {
        latents: latents.clone(),
        timestep: 500.0,
        cond: cond.clone(),
        uncond: Some(uncond.clone()),
        guidance_scale: 7.5,
        guidance_rescale: 0.0,
        class_label: None,
        extra: None,
    };
    let expected = unet(&cpu, f32)?.denoise(step()).await?;
    for &dtype in &dtypes {
        let actual = unet(&device, dtype)?.denoise(step()).await?;
        report("unet_step", dtype, compare(&actual, &expected)?, true);
    }

    let vae = |device: &candle_core::Device, dtype| {
        sdmesh_vae::LocalVae::load(&sdmesh_vae::VaeOptions {
            dtype,
            ..sdmesh_vae::VaeOptions::new(job.model.clone(), device.clone())
        })
    };
    let z = randn(2, (1, 4, size / 8, size / 8))?;
    let expected = vae(&cpu, f32)?.decode(z.clone()).await?;
    for &dtype in &dtypes {
        let actual = vae(&device, dtype)?.decode(z.clone()).await?;
        report("vae_decode", dtype, compare(&actual, &expected)?, false);
    }

    if job.steps > 0 {
        let request = request(&job, 7);
        let run = |device: candle_core::Device, dtype| {
            let (model, request) = (job.model.clone(), request.clone());
            async move {
                let p = sdmesh_orchestrator::local_pipeline(&model, &device, dtype, 8, Limits::default()).await?;
                let j = p.validate(&request)?;
                let out = p.run(&j, &mut sdmesh_orchestrator::noise::SeededNoise::new(7), &mut |_| true).await?;
                anyhow::Ok(out.images)
            }
        };
        let expected = run(cpu.clone(), f32).await?;
        for &dtype in &dtypes {
            let actual = run(device.clone(), dtype).await?;
            report(&format!("job_{}_steps", job.steps), dtype, compare(&actual, &expected)?, false);
        }
    }
    anyhow::ensure!(failed.is_empty(), "past the tolerance: {}", failed.join(", "));
    Ok(())
}

async fn invariance(model: PathBuf, size: usize, placement: Placement) -> anyhow::Result<()> {
    let unet = sdmesh_unet::LocalUnet::load(&sdmesh_unet::UnetOptions {
        dtype: placement.dtype,
        max_batch_rows: 64,
        batch_max_wait: Duration::from_secs(1),
        ..sdmesh_unet::UnetOptions::new(model.clone(), placement.device()?)
    })?;
    let hidden = unet.info().await?.cross_attention_dim as usize;
    let cpu = candle_core::Device::Cpu;
    let randn = |seed: u64, shape: &[usize]| sdmesh_core::torch_rng::randn_tensor(seed, shape, &cpu);
    let side = size / 8;
    // (images, timestep, guidance scale, guidance rescale): guided and not, several images.
    let shapes = [(1, 999.0, 7.5, 0.0), (2, 500.0, 4.0, 0.7), (1, 21.0, 1.0, 0.0), (1, 1.5, 9.0, 0.0)];
    let mut steps = Vec::new();
    for (i, &(n, timestep, guidance_scale, guidance_rescale)) in shapes.iter().enumerate() {
        let seed = 10 * i as u64;
        let mut step = DenoiseInput {
            latents: randn(seed + 1, &[n, 4, side, side])?,
            timestep,
            cond: randn(seed + 2, &[1, 77, hidden])?,
            uncond: None,
            guidance_scale,
            guidance_rescale,
            class_label: None,
            extra: None,
        };
        if step.uses_guidance() {
            step.uncond = Some(randn(seed + 3, &[1, 77, hidden])?);
        }
        steps.push(step);
    }
    let rows: usize = steps.iter().map(DenoiseInput::rows).sum();
    let name = model_name(&model);
    for (i, c) in unet.alone_vs_batched(&steps).await?.into_iter().enumerate() {
        let relative = f64::from(c.max_abs_diff) / f64::from(c.max_abs).max(1e-12);
        let mut line = json!({"bench": "invariance", "model": name, "size": size, "step": i, "batch_rows": rows,
                              "max_abs_diff": c.max_abs_diff, "max_abs": c.max_abs, "relative": relative,
                              "nonfinite": c.nonfinite, "same_bits": c.same_bits});
        extend(&mut line, placement.describe());
        emit(
            line,
            format!(
                "invariance {name:<16} step {i} alone vs in {rows} rows, {} {:?}: {}",
                placement.device,
                placement.dtype,
                if c.same_bits {
                    "same bits".to_string()
                } else {
                    format!("max abs diff {:.3e} ({relative:.2e} of its scale)", c.max_abs_diff)
                }
            ),
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    let cli = Cli::parse();
    if matches!(cli.command, Command::Components { profile: true, .. }) {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::Layer;
        let spans = tracing_subscriber::filter::Targets::new()
            .with_target("candle_transformers", tracing::Level::TRACE)
            .with_target("sdmesh_unet", tracing::Level::TRACE)
            .with_target("sdmesh_vae", tracing::Level::TRACE)
            .with_target("sdmesh_core", tracing::Level::TRACE);
        if let Command::Components { placement, .. } = &cli.command {
            if let Ok(device) = placement.device() {
                if device.is_cuda() {
                    let _ = profile::SYNC.set(device);
                }
            }
        }
        tracing::subscriber::set_global_default(
            tracing_subscriber::registry().with(profile::SelfTime.with_filter(spans)),
        )?;
    } else {
        sdmesh_core::telemetry::init("sdmesh-bench", &Default::default()).await?;
    }
    match cli.command {
        Command::Overhead { job, jobs } => overhead(job, jobs).await,
        Command::Invariance { model, size, placement } => invariance(model, size, placement).await,
        Command::Agreement { job, batch, dtypes, tolerance } => agreement(job, batch, dtypes, tolerance).await,
        Command::Throughput { job, concurrency, max_batch_rows } => throughput(job, concurrency, max_batch_rows).await,
        Command::Components { model, size, batch, guided, reps, placement, profile } => {
            components(model, size, (batch, guided), reps, placement, profile).await
        }
    }
}
