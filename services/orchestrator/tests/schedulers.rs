//! Scheduler parity with diffusers (tests/fixtures/reference: schedulers.json,
//! scheduler_steps.json + scheduler_steps/*.safetensors), request parsing and config handling.

#[path = "common/schedulers.rs"]
mod shared;

use candle_core::{Device, Tensor};
use sdmesh_orchestrator::noise::RecordedNoise;
use sdmesh_orchestrator::scheduler::config::TimestepSpacing;
use sdmesh_orchestrator::scheduler::{
    build, resolve, ResolvedScheduler, Scheduler, SchedulerConfig, SchedulerKind, SchedulerRequest,
};
use sdmesh_testkit::{load_json, load_tensors, max_abs_diff};
use serde_json::{json, Value};
use shared::{model_config, req, CountingNoise};

/// Largest accepted max-abs error of one step's output against diffusers, given diffusers'
/// input. Not 0: torch computes the per-step scalars' sqrt/log/exp with MKL VML (HA mode,
/// up to ~0.75 ulp off, deterministic but unpublished), where Rust's are correctly rounded
/// (sqrt) or glibc's, so a coefficient can differ by an ulp; every other operation is
/// reproduced exactly.
const STEP_TOL: f32 = 1e-5;
/// The same for a whole chained trajectory, relative to the largest |value| (>= 1).
const CHAIN_REL_TOL: f32 = 1e-6;
/// Relative tolerance of sigmas (timesteps must be equal). The float32 training sigmas come
/// from torch's MKL sqrt, so one can be an ulp (1.2e-7 relative) away from ours.
const SIGMA_REL_TOL: f64 = 1e-6;

fn kind_of(class: &str) -> SchedulerKind {
    match class {
        "DDIMScheduler" => SchedulerKind::Ddim,
        "DPMSolverMultistepScheduler" => SchedulerKind::DpmSolverMultistep,
        other => panic!("unexpected scheduler class {other}"),
    }
}

fn resolved(kind: SchedulerKind, eta: f64) -> ResolvedScheduler {
    ResolvedScheduler { kind, eta, use_karras_sigmas: None }
}

fn build_ok(config: &SchedulerConfig, kind: SchedulerKind, steps: usize) -> Box<dyn Scheduler> {
    build(config, &resolved(kind, 0.0), steps).unwrap_or_else(|e| panic!("{kind:?} {steps} steps: {e}"))
}

#[test]
fn schedules_match_diffusers() {
    let cases = load_json("schedulers.json");
    let cases = cases.as_array().expect("list");
    assert!(cases.len() >= 60, "{} cases", cases.len());
    let mut worst_sigma_rel = 0f64;
    for case in cases {
        let what = format!("{} {} {} x{}", case["model"], case["scheduler"], case["kwargs"], case["steps"]);
        let config =
            model_config(case["model"].as_str().expect("model")).with_overrides(&case["kwargs"]).expect("kwargs");
        let kind = kind_of(case["scheduler"].as_str().expect("scheduler"));
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let scheduler = build_ok(&config, kind, steps);

        let expected: Vec<f64> =
            case["timesteps"].as_array().expect("timesteps").iter().map(|v| v.as_f64().expect("f64")).collect();
        assert_eq!(scheduler.timesteps(), expected.as_slice(), "{what}: timesteps");

        match case.get("sigmas") {
            Some(Value::Array(sigmas)) => {
                let ours = scheduler.sigmas().unwrap_or_else(|| panic!("{what}: no sigmas"));
                assert_eq!(ours.len(), sigmas.len(), "{what}: number of sigmas");
                for (i, (a, e)) in ours.iter().zip(sigmas).enumerate() {
                    let e = e.as_f64().expect("sigma");
                    let rel = (f64::from(*a) - e).abs() / e.abs().max(f64::MIN_POSITIVE);
                    worst_sigma_rel = worst_sigma_rel.max(rel);
                    assert!(rel <= SIGMA_REL_TOL, "{what}: sigma {i} = {a}, diffusers {e} (relative error {rel:e})");
                }
            }
            _ => assert!(scheduler.sigmas().is_none(), "{what}: DDIM has no sigmas"),
        }
    }
    println!("sigmas: worst relative error {worst_sigma_rel:e}");
}

/// The worst element of one scheduler_steps case: (max abs error, max |reference|, where).
struct Worst {
    err: f32,
    scale: f32,
    at: String,
}

/// Runs one scheduler_steps case. `chained`: each step's input is our previous output (a real
/// loop; errors compound); otherwise it is diffusers' (each step checked on its own).
fn run_steps_case(case: &Value, chained: bool) -> Worst {
    let name = case["name"].as_str().expect("name");
    let config = SchedulerConfig::from_json(&case["scheduler_config"])
        .and_then(|c| c.with_overrides(&case["kwargs"]))
        .expect("config");
    let kind = kind_of(case["scheduler"].as_str().expect("scheduler"));
    let steps = case["steps"].as_u64().expect("steps") as usize;
    let eta = case["eta"].as_f64().unwrap_or(0.0);
    let mut scheduler = build(&config, &resolved(kind, eta), steps).unwrap_or_else(|e| panic!("{name}: {e}"));
    let expected: Vec<f64> =
        case["timesteps"].as_array().expect("timesteps").iter().map(|v| v.as_f64().expect("f64")).collect();
    assert_eq!(scheduler.timesteps(), expected.as_slice(), "{name}: timesteps");

    let tensors = load_tensors(&format!("scheduler_steps/{name}.safetensors"));
    let get = |k: &str| tensors.get(k).unwrap_or_else(|| panic!("{name}: no {k}")).clone();
    let flat = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("flat");
    let mut x = get("sample");
    let mut worst = Worst { err: 0.0, scale: 0.0, at: String::new() };
    for i in 0..steps {
        let draws: Vec<Tensor> = tensors.get(&format!("noise_{i}")).cloned().into_iter().collect();
        let expected_draws = draws.len();
        let mut noise = CountingNoise { inner: RecordedNoise::new(draws), draws: 0 };
        let prev = scheduler
            .step(&get(&format!("model_output_{i}")), i, &x, &mut noise)
            .unwrap_or_else(|e| panic!("{name} step {i}: {e}"));
        assert_eq!(noise.draws, expected_draws, "{name} step {i}: noise draws");
        let reference = get(&format!("prev_{i}"));
        assert_eq!(prev.dims(), reference.dims(), "{name} step {i}: shape");
        let (err, at) = max_abs_diff(&prev, &reference);
        worst.scale = flat(&reference).iter().fold(worst.scale, |m, v| m.max(v.abs()));
        if err >= worst.err {
            worst.err = err;
            worst.at = format!("step {i} element {at}: ours {} diffusers {}", flat(&prev)[at], flat(&reference)[at]);
        }
        x = if chained { prev } else { reference };
    }
    worst
}

/// Each step against diffusers' output for diffusers' input.
#[test]
fn steps_match_diffusers() {
    let cases = load_json("scheduler_steps.json");
    let cases = cases.as_array().expect("list");
    assert!(cases.len() >= 14, "{} cases", cases.len());
    let mut report = Vec::new();
    let mut worst_overall = 0f32;
    for case in cases {
        let w = run_steps_case(case, false);
        report.push(format!("{}: max abs error {:e} (|values| <= {}; {})", case["name"], w.err, w.scale, w.at));
        worst_overall = worst_overall.max(w.err);
    }
    let report = report.join("\n");
    println!("{report}\nworst overall: {worst_overall:e}");
    assert!(worst_overall <= STEP_TOL, "max abs error {worst_overall:e} > {STEP_TOL:e}:\n{report}");
}

/// A whole trajectory fed back into itself, as the denoising loop does: the ulp-level
/// differences compound over the steps, so the bound is relative to the values' magnitude.
#[test]
fn chained_steps_track_diffusers() {
    let cases = load_json("scheduler_steps.json");
    let mut report = Vec::new();
    let mut worst_rel = 0f32;
    for case in cases.as_array().expect("list") {
        let w = run_steps_case(case, true);
        let rel = w.err / w.scale.max(1.0);
        report.push(format!(
            "{}: max abs error {:e} = {rel:e} of max |value| {} ({})",
            case["name"], w.err, w.scale, w.at
        ));
        worst_rel = worst_rel.max(rel);
    }
    let report = report.join("\n");
    println!("{report}\nworst relative: {worst_rel:e}");
    assert!(worst_rel <= CHAIN_REL_TOL, "relative error {worst_rel:e} > {CHAIN_REL_TOL:e}:\n{report}");
}

#[test]
fn scheduler_names() {
    for name in ["", "ddim", "DDIM", "DDIMScheduler", "ddimscheduler", " Ddim "] {
        let r = resolve(&req(name)).unwrap_or_else(|e| panic!("{name:?}: {e}"));
        assert_eq!(r, resolved(SchedulerKind::Ddim, 0.0), "{name:?}");
        assert_eq!(r.canonical_name(), "DDIMScheduler");
    }
    for name in [
        "dpm++2m",
        "DPM++2M",
        "dpmpp_2m",
        "dpm++_2m",
        "DPMSolverMultistepScheduler",
        "dpmsolvermultistepscheduler",
        "DPMSolverMultistep",
        "dpmsolver++",
    ] {
        let r = resolve(&req(name)).unwrap_or_else(|e| panic!("{name:?}: {e}"));
        assert_eq!(r, resolved(SchedulerKind::DpmSolverMultistep, 0.0), "{name:?}");
        assert_eq!(r.canonical_name(), "DPMSolverMultistepScheduler");
    }
    for name in ["dpm++2m-karras", "DPM++2M-Karras", "dpmpp_2m_karras", "dpm++_2m_karras"] {
        let r = resolve(&req(name)).unwrap_or_else(|e| panic!("{name:?}: {e}"));
        assert_eq!(r.kind, SchedulerKind::DpmSolverMultistep, "{name:?}");
        assert_eq!(r.use_karras_sigmas, Some(true), "{name:?}");
        assert_eq!(r.canonical_name(), "DPMSolverMultistepScheduler (karras)");
    }
    // Canonical names resolve back to the same thing.
    for r in [
        resolve(&req("ddim")),
        resolve(&req("dpm++2m")),
        resolve(&req("dpm++2m-karras")),
        resolve(&SchedulerRequest { name: "dpm++2m".into(), use_karras_sigmas: Some(true), ..Default::default() }),
    ] {
        let r = r.expect("resolve");
        assert_eq!(resolve(&req(&r.canonical_name())).expect("canonical"), r);
    }
    // Options.
    let r = resolve(&SchedulerRequest { name: "ddim".into(), eta: Some(0.5), ..Default::default() }).expect("eta");
    assert_eq!((r.kind, r.eta), (SchedulerKind::Ddim, 0.5));
    let r = resolve(&SchedulerRequest { name: "dpm++2m".into(), use_karras_sigmas: Some(false), ..Default::default() })
        .expect("karras");
    assert_eq!(r.use_karras_sigmas, Some(false));
    let r = resolve(&SchedulerRequest { name: "dpm++2m".into(), eta: Some(0.0), ..Default::default() }).expect("eta 0");
    assert_eq!(r.eta, 0.0);
}

#[test]
fn bad_scheduler_requests() {
    let listed = |e: &str| {
        e.contains("ddim")
            && e.contains("DDIMScheduler")
            && e.contains("dpm++2m")
            && e.contains("dpm++2m-karras")
            && e.contains("DPMSolverMultistepScheduler")
    };
    for name in ["euler karras", "unipc2", "dpm++", "dpm++2m karras", "ddim2", "dpm++3m"] {
        let e = resolve(&req(name)).expect_err(name);
        assert!(e.contains("unknown scheduler") && listed(&e), "{name:?}: {e}");
    }
    let bad = [
        SchedulerRequest { name: "dpm++2m".into(), eta: Some(0.5), ..Default::default() },
        SchedulerRequest { name: "dpm++2m-karras".into(), eta: Some(1.0), ..Default::default() },
        SchedulerRequest { name: "ddim".into(), use_karras_sigmas: Some(true), ..Default::default() },
        SchedulerRequest { name: "".into(), use_karras_sigmas: Some(true), ..Default::default() },
    ];
    for r in &bad {
        let e = resolve(r).expect_err("invalid combination");
        assert!(listed(&e), "{r:?}: {e}");
    }
    for eta in [-0.1, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let e =
            resolve(&SchedulerRequest { name: "ddim".into(), eta: Some(eta), ..Default::default() }).expect_err("eta");
        assert!(e.contains("eta"), "{e}");
    }
    let e = resolve(&SchedulerRequest {
        name: "dpm++2m-karras".into(),
        use_karras_sigmas: Some(false),
        ..Default::default()
    })
    .expect_err("contradiction");
    assert!(e.contains("Karras"), "{e}");
}

#[test]
fn class_defaults_apply_to_absent_keys() {
    // The SD 2.1-base file: PNDMScheduler, skip_prk_steps (ignored), no timestep_spacing.
    let base = model_config("sd21-base-tiny");
    assert_eq!(base.class_name(), Some("PNDMScheduler"));
    assert_eq!(base.num_train_timesteps(), 1000);
    assert_eq!(base.prediction_type().as_str(), "epsilon");
    assert_eq!(model_config("sd21-tiny").prediction_type.as_str(), "v_prediction");
    assert_eq!(base.ddim().expect("ddim").timestep_spacing, TimestepSpacing::Leading);
    assert_eq!(base.dpm_solver().expect("dpm").timestep_spacing, TimestepSpacing::Linspace);
    let ddim = build_ok(&base, SchedulerKind::Ddim, 10);
    assert_eq!(ddim.timesteps(), &[901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0]);
    let dpm = build_ok(&base, SchedulerKind::DpmSolverMultistep, 10);
    assert_eq!(dpm.timesteps(), &[999.0, 899.0, 799.0, 699.0, 599.0, 500.0, 400.0, 300.0, 200.0, 100.0]);

    // An empty config is diffusers' defaults: linear 1e-4..0.02, DDIM clip_sample and
    // set_alpha_to_one on, steps_offset 0.
    let empty = SchedulerConfig::from_json(&json!({})).expect("empty");
    let d = empty.ddim().expect("ddim");
    assert!(d.clip_sample && d.set_alpha_to_one && d.steps_offset == 0 && d.thresholding.is_none());
    assert_eq!((d.betas.beta_start, d.betas.beta_end), (0.0001, 0.02));
    assert_eq!(build_ok(&empty, SchedulerKind::Ddim, 4).timesteps(), &[750.0, 500.0, 250.0, 0.0]);
    let p = empty.dpm_solver().expect("dpm");
    assert!(p.lower_order_final && !p.euler_at_final && !p.use_karras_sigmas && p.solver_order == 2);
    assert_eq!(p.lambda_min_clipped, f64::NEG_INFINITY);

    // Keys listed in `_use_default_values` were written from the saving class's defaults, so
    // diffusers drops them; overrides still win.
    let saved = json!({"_class_name": "DPMSolverMultistepScheduler", "timestep_spacing": "linspace", "_use_default_values": ["timestep_spacing"]});
    let c = SchedulerConfig::from_json(&saved).expect("saved");
    assert_eq!(c.ddim().expect("ddim").timestep_spacing, TimestepSpacing::Leading);
    let c = c.with_overrides(&json!({"timestep_spacing": "trailing"})).expect("override");
    assert_eq!(c.ddim().expect("ddim").timestep_spacing, TimestepSpacing::Trailing);

    // A request's karras flag overrides the config's.
    let karras = build(&base, &resolve(&req("dpm++2m-karras")).expect("karras"), 10).expect("build");
    assert_eq!(&karras.timesteps()[..3], &[999.0, 916.0, 815.0]);
    let off = base.with("use_karras_sigmas", json!(true)).expect("with");
    let r = resolve(&SchedulerRequest { name: "dpm++2m".into(), use_karras_sigmas: Some(false), ..Default::default() })
        .expect("r");
    assert_eq!(build(&off, &r, 10).expect("build").timesteps(), dpm.timesteps());
}

#[test]
fn unsupported_config_values_are_errors() {
    let base = model_config("sd21-base-tiny");
    let dpm_cases: &[(&str, Value, &str)] = &[
        ("solver_order", json!(3), "supported: 1, 2"),
        ("algorithm_type", json!("dpmsolver"), "supported: \"dpmsolver++\""),
        ("algorithm_type", json!("sde-dpmsolver"), "supported: \"dpmsolver++\", \"sde-dpmsolver++\""),
        ("use_exponential_sigmas", json!(true), "use_karras_sigmas"),
        ("use_beta_sigmas", json!(true), "use_karras_sigmas"),
        ("use_lu_lambdas", json!(true), "use_karras_sigmas"),
        ("use_flow_sigmas", json!(true), "use_karras_sigmas"),
        ("final_sigmas_type", json!("denoise_to_zero"), "\"zero\", \"sigma_min\""),
        ("solver_type", json!("rk4"), "\"midpoint\", \"heun\""),
        ("variance_type", json!("learned_range"), "supported: null"),
        ("timestep_spacing", json!("karras"), "\"leading\", \"trailing\", \"linspace\""),
        ("beta_schedule", json!("sigmoid"), "\"linear\", \"scaled_linear\", \"squaredcos_cap_v2\""),
        ("lower_order_final", json!("yes"), "true or false"),
        ("steps_offset", json!(0.5), "an integer"),
        ("trained_betas", json!([0.1, 0.2]), "num_train_timesteps"),
    ];
    let dpm = resolve(&req("dpm++2m")).expect("dpm");
    for (key, value, hint) in dpm_cases {
        let config = base.with(key, value.clone()).expect("config");
        let e = build(&config, &dpm, 10).map(|_| ()).expect_err(key);
        assert!(e.contains(key) && e.contains(hint), "{key}={value}: {e}");
    }
    let ddim = resolve(&req("ddim")).expect("ddim");
    for (key, value, hint) in [
        ("timestep_spacing", json!("karras"), "\"leading\", \"trailing\", \"linspace\""),
        ("beta_schedule", json!("sigmoid"), "\"squaredcos_cap_v2\""),
        ("clip_sample", json!(1), "true or false"),
    ] {
        let config = base.with(key, value.clone()).expect("config");
        let e = build(&config, &ddim, 10).map(|_| ()).expect_err(key);
        assert!(e.contains(key) && e.contains(hint), "{key}={value}: {e}");
    }
    // prediction_type is read when the file is parsed.
    let e = base.with("prediction_type", json!("flow_prediction")).expect_err("prediction_type");
    assert!(e.contains("\"epsilon\", \"v_prediction\", \"sample\""), "{e}");
    assert!(SchedulerConfig::from_json(&json!([1, 2])).is_err());

    // Values only the other class reads don't matter.
    let odd = base.with("solver_order", json!(3)).expect("config");
    assert!(build(&odd, &ddim, 10).is_ok());

    // Step counts.
    for r in [&ddim, &dpm] {
        for steps in [0, 1001, 5000] {
            let e = build(&base, r, steps).map(|_| ()).expect_err("steps");
            assert!(e.contains("steps"), "{steps}: {e}");
        }
        if r.kind == SchedulerKind::DpmSolverMultistep {
            assert_eq!(build(&base, r, 1000).expect("1000 steps").timesteps().len(), 1000);
        }
    }
    // diffusers would index past the end (leading spacing + steps_offset 1 at 1000 steps gives
    // timestep 1000) or wrap around (trailing spacing at 61 steps gives timestep -1).
    let e = build(&base, &ddim, 1000).map(|_| ()).expect_err("timestep 1000");
    assert!(e.contains("timestep 1000"), "{e}");
    let trailing = base.with("timestep_spacing", json!("trailing")).expect("config");
    let e = build(&trailing, &ddim, 61).map(|_| ()).expect_err("timestep -1");
    assert!(e.contains("timestep -1"), "{e}");
    // eta large enough to make DDIM's noise weight exceed its budget.
    let e = build(&base, &resolved(SchedulerKind::Ddim, 50.0), 10).map(|_| ()).expect_err("eta");
    assert!(e.contains("eta"), "{e}");
}

#[test]
fn steps_in_order_and_shapes() {
    let base = model_config("sd21-base-tiny");
    let x = Tensor::ones((2, 4, 3, 5), candle_core::DType::F32, &Device::Cpu).expect("x");
    let mut none = RecordedNoise::new(Vec::new());
    let mut dpm = build_ok(&base, SchedulerKind::DpmSolverMultistep, 5);
    let y = dpm.step(&x, 0, &x, &mut none).expect("step 0");
    assert_eq!(y.dims(), &[2, 4, 3, 5]);
    assert!(dpm.step(&x, 2, &y, &mut none).is_err(), "skipping a step");
    assert!(dpm.step(&x, 1, &y, &mut none).is_ok());
    assert!(dpm.step(&x, 5, &y, &mut none).is_err(), "past the end");
    let mut ddim = build_ok(&base, SchedulerKind::Ddim, 5);
    let wrong = Tensor::ones((2, 4, 3, 4), candle_core::DType::F32, &Device::Cpu).expect("wrong");
    assert!(ddim.step(&wrong, 0, &x, &mut none).is_err(), "shape mismatch");
    assert!(ddim.step(&x, 0, &x, &mut none).is_ok(), "eta 0 draws no noise");
    assert_eq!(ddim.init_noise_sigma(), 1.0);
    assert_eq!(dpm.scale_model_input(&x, 0).expect("scale").dims(), x.dims());
}

/// A configuration the committed fixtures don't exercise, with diffusers 0.42.1's result
/// (float32 CPU, torch 2.15) for deterministic inputs: see [`extra_inputs`].
struct Extra {
    name: &'static str,
    kind: SchedulerKind,
    /// JSON overrides on the sd21-base-tiny config; "null" = an empty config (all defaults).
    overrides: &'static str,
    /// Add `trained_betas` = 0.0005 + 0.015 * (i / 999)^2.
    trained_betas: bool,
    steps: usize,
    eta: f64,
    timesteps: &'static [i64],
    sigmas: Option<&'static [f32]>,
    /// The sample after the last step.
    last: &'static [f32],
}

/// The deterministic inputs of [`EXTRA`] (f64 formulas rounded to f32, like the generator's
/// `torch.tensor([...], dtype=float32)`), shape [2, 4, 2, 3]: (sample, model output i, noise i).
fn extra_inputs(kind: u8, i: usize) -> Tensor {
    let data: Vec<f32> = (0..48)
        .map(|k| {
            let k = k as f64;
            let v = match kind {
                0 => 2.0 * (0.37 * k + 0.1).sin(),
                1 => 1.5 * (0.53 * k + 0.71 * i as f64).cos(),
                _ => (1.3 * k + 0.2 * i as f64).sin(),
            };
            v as f32
        })
        .collect();
    Tensor::from_vec(data, (2, 4, 2, 3), &Device::Cpu).expect("tensor")
}

/// Generated by a script running diffusers on [`extra_inputs`] (for DPM-Solver with
/// `set_begin_index(0)`: with Karras sigmas on the cosine schedule the first timesteps repeat,
/// and diffusers' default start lookup would then skip the first sigma and crash at the end).
const EXTRA: &[Extra] = &[
    Extra {
        name: "ddim_threshold",
        kind: SchedulerKind::Ddim,
        overrides: r#"{"thresholding": true, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}"#,
        trained_betas: false,
        steps: 5,
        eta: 0.0,
        timesteps: &[801, 601, 401, 201, 1],
        sigmas: None,
        last: &[
            0.8522047,
            0.956978,
            0.790007,
            0.5693274,
            0.12552784,
            -0.31082657,
            -0.884132,
            -0.95738965,
            -0.77401674,
            -0.5541389,
            -0.093197316,
            0.3604389,
            0.91429,
            0.9578635,
            0.7579326,
            0.4223194,
            0.0614276,
            -0.4090538,
            -0.9426337,
            -0.9504515,
            -0.7417782,
            -0.37399322,
            0.36357173,
            0.86683583,
            0.8918109,
            0.86098933,
            0.6658011,
            0.2966982,
            -0.3878262,
            -0.96448547,
            -0.9561044,
            -0.8481567,
            -0.65085727,
            -0.39082617,
            0.028884111,
            0.5049994,
            0.9559528,
            0.8350392,
            0.6359198,
            0.3585018,
            -0.055567242,
            -0.5453842,
            -0.9541803,
            -0.82165635,
            -0.6210108,
            -0.32629293,
            0.08152414,
            0.584535,
        ],
    },
    Extra {
        name: "ddim_all_defaults_eta",
        kind: SchedulerKind::Ddim,
        overrides: r#"null"#,
        trained_betas: false,
        steps: 4,
        eta: 0.3,
        timesteps: &[750, 500, 250, 0],
        sigmas: None,
        last: &[
            0.91342235,
            1.0,
            1.0,
            0.9956257,
            0.7929463,
            0.621455,
            0.2815292,
            -1.0,
            -1.0,
            -0.99933755,
            -0.8045858,
            0.22697583,
            1.0,
            1.0,
            1.0,
            1.0,
            0.9950505,
            0.35834974,
            -1.0,
            -1.0,
            -0.9997109,
            -0.99559635,
            -0.99463075,
            0.017392477,
            1.0,
            1.0,
            1.0,
            0.99442387,
            -0.45701805,
            -1.0,
            -1.0,
            -1.0,
            -1.0,
            -0.99837244,
            -0.7058681,
            0.91405624,
            1.0,
            1.0,
            1.0,
            0.9983382,
            0.9944111,
            0.2913044,
            -1.0,
            -1.0,
            -0.99842745,
            -0.99362373,
            -0.83124596,
            -0.5770388,
        ],
    },
    Extra {
        name: "ddim_zero_snr_trailing_v",
        kind: SchedulerKind::Ddim,
        overrides: r#"{"rescale_betas_zero_snr": true, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}"#,
        trained_betas: false,
        steps: 7,
        eta: 0.0,
        timesteps: &[999, 856, 713, 570, 428, 285, 142],
        sigmas: None,
        last: &[
            0.9434551,
            1.4174787,
            1.605465,
            1.5221219,
            1.2337089,
            0.8339808,
            0.41648585,
            0.051081046,
            -0.22918683,
            -0.42805117,
            -0.5740879,
            -0.70162106,
            -0.8312371,
            -0.9566125,
            -1.0422919,
            -1.0335592,
            -0.8756739,
            -0.5366258,
            -0.02611247,
            0.5958429,
            1.2245244,
            1.7303345,
            1.9885423,
            1.9116102,
            1.4754688,
            0.7322372,
            -0.1949358,
            -1.1347276,
            -1.9034057,
            -2.345209,
            -2.3676188,
            -1.962864,
            -1.2102679,
            -0.25878185,
            0.706097,
            1.5029948,
            1.993142,
            2.107638,
            1.8574803,
            1.3248034,
            0.63851935,
            -0.058721744,
            -0.64349335,
            -1.0362694,
            -1.2122941,
            -1.1971371,
            -1.04968,
            -0.83855546,
        ],
    },
    Extra {
        name: "ddim_cosine_linspace_sample_clip",
        kind: SchedulerKind::Ddim,
        overrides: r#"{"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample", "timestep_spacing": "linspace", "clip_sample": true, "clip_sample_range": 2.0}"#,
        trained_betas: false,
        steps: 6,
        eta: 0.0,
        timesteps: &[999, 799, 599, 400, 200, 0],
        sigmas: None,
        last: &[
            -1.129701,
            -1.1931993,
            -0.91853136,
            -0.37412494,
            0.29518384,
            0.9072761,
            1.2925138,
            1.3405156,
            1.0310758,
            0.44066137,
            -0.27742743,
            -0.93394333,
            -1.3545643,
            -1.426938,
            -1.1310961,
            -0.5449472,
            0.1766572,
            0.84360325,
            1.2816116,
            1.3788772,
            1.1156125,
            0.568544,
            -0.110749245,
            -0.7376257,
            -1.1448073,
            -1.2276391,
            -0.97184753,
            -0.4563133,
            0.16974998,
            0.72878706,
            1.064402,
            1.0846764,
            0.7873688,
            0.26007903,
            -0.34460235,
            -0.8520335,
            -1.1146219,
            -1.0534523,
            -0.68087053,
            -0.097694874,
            0.53425413,
            1.0368005,
            1.2649479,
            1.1476264,
            0.7083391,
            0.059889317,
            -0.62552446,
            -1.1627828,
        ],
    },
    Extra {
        name: "ddim_trained_betas_alpha_one",
        kind: SchedulerKind::Ddim,
        overrides: r#"{"set_alpha_to_one": true, "steps_offset": 0}"#,
        trained_betas: true,
        steps: 3,
        eta: 1.0,
        timesteps: &[666, 333, 0],
        sigmas: None,
        last: &[
            -3.3771307, -0.1336891, 2.7175376, 4.9460974, 6.9964476, 8.494531, 8.133332, 5.278856, 1.0373131,
            -2.7934134, -5.472091, -7.3998213, -8.646464, -8.279008, -5.6015773, -1.5092708, 2.1187036, 4.2737656,
            5.418583, 6.153041, 6.0343814, 4.3187766, 1.4763383, -0.8801019, -1.7252395, -1.6401799, -1.7351424,
            -2.0792582, -1.8781475, -1.0171448, -0.5646362, -1.375924, -2.7808545, -3.295015, -2.404205, -0.9464995,
            0.32459614, 1.7879078, 4.049977, 6.473358, 7.4306717, 6.0913486, 3.296856, 0.36088052, -2.41965, -5.436589,
            -8.27002, -9.427231,
        ],
    },
    Extra {
        name: "dpm_threshold_heun",
        kind: SchedulerKind::DpmSolverMultistep,
        overrides: r#"{"thresholding": true, "dynamic_thresholding_ratio": 0.8, "sample_max_value": 3.0, "solver_type": "heun"}"#,
        trained_betas: false,
        steps: 6,
        eta: 0.0,
        timesteps: &[999, 832, 666, 500, 333, 166],
        sigmas: Some(&[14.614647, 5.934704, 2.9183085, 1.6182797, 0.9323584, 0.49240968, 0.0]),
        last: &[
            0.6916167,
            1.0,
            1.0,
            0.95345074,
            0.77128774,
            0.5165764,
            0.26613805,
            0.018471695,
            -0.32235533,
            -0.39658415,
            -0.39698455,
            -0.44255683,
            -0.5362711,
            -0.66048753,
            -0.76621765,
            -0.7278185,
            -0.5102614,
            -0.344704,
            -0.018264445,
            0.43140095,
            0.9077269,
            1.0,
            1.0,
            1.0,
            0.86398125,
            0.47577986,
            -0.047330923,
            -0.61321604,
            -1.0,
            -1.0,
            -1.0,
            -0.9862292,
            -0.6725667,
            -0.19169323,
            0.31928885,
            0.81036174,
            1.0,
            1.0,
            0.8689038,
            0.63492304,
            0.3014474,
            -0.035443764,
            -0.36384764,
            -0.65338546,
            -0.660431,
            -0.5766373,
            -0.4727291,
            -0.38905764,
        ],
    },
    Extra {
        name: "dpm_heun",
        kind: SchedulerKind::DpmSolverMultistep,
        overrides: r#"{"solver_type": "heun"}"#,
        trained_betas: false,
        steps: 6,
        eta: 0.0,
        timesteps: &[999, 832, 666, 500, 333, 166],
        sigmas: Some(&[14.614647, 5.934704, 2.9183085, 1.6182797, 0.9323584, 0.49240968, 0.0]),
        last: &[
            -10.021517, 5.8100877, 21.892342, 35.001007, 42.31716, 42.095486, 34.107574, 19.743807, 1.7403264,
            -16.408674, -31.213991, -39.94708, -41.208153, -35.175484, -23.48544, -8.7860985, 5.913638, 17.930984,
            25.462616, 27.877224, 25.694529, 20.282618, 13.378476, 6.57728, 0.9351867, -3.210832, -6.1715136,
            -8.624031, -11.224576, -14.248417, -17.380543, -19.732437, -20.089792, -17.322756, -10.835534, -0.9133155,
            11.153692, 23.230412, 32.76356, 37.379353, 35.502052, 26.828188, 12.520632, -4.9457717, -22.266869,
            -36.014374, -43.39729, -42.894928,
        ],
    },
    Extra {
        name: "dpm_threshold",
        kind: SchedulerKind::DpmSolverMultistep,
        overrides: r#"{"thresholding": true, "dynamic_thresholding_ratio": 0.8, "sample_max_value": 3.0}"#,
        trained_betas: false,
        steps: 6,
        eta: 0.0,
        timesteps: &[999, 832, 666, 500, 333, 166],
        sigmas: Some(&[14.614647, 5.934704, 2.9183085, 1.6182797, 0.9323584, 0.49240968, 0.0]),
        last: &[
            0.6786868,
            1.0,
            1.0,
            0.95345074,
            0.77379787,
            0.5237435,
            0.27601734,
            0.02744801,
            -0.3198196,
            -0.40306073,
            -0.40418833,
            -0.45076895,
            -0.54454887,
            -0.6673696,
            -0.77036744,
            -0.7274846,
            -0.4961281,
            -0.33114746,
            -0.006792199,
            0.43955114,
            0.91153026,
            1.0,
            1.0,
            1.0,
            0.85655916,
            0.4706602,
            -0.049213756,
            -0.61260504,
            -1.0,
            -1.0,
            -1.0,
            -0.9862292,
            -0.67326444,
            -0.1982771,
            0.30883798,
            0.800073,
            1.0,
            1.0,
            0.8689038,
            0.63611275,
            0.3075473,
            -0.026353596,
            -0.35563025,
            -0.64928186,
            -0.6612266,
            -0.5785762,
            -0.47681713,
            -0.3955662,
        ],
    },
    Extra {
        name: "dpm_karras_cosine",
        kind: SchedulerKind::DpmSolverMultistep,
        overrides: r#"{"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": true}"#,
        trained_betas: false,
        steps: 8,
        eta: 0.0,
        timesteps: &[998, 998, 998, 998, 994, 965, 508, 0],
        sigmas: Some(&[20291.303, 7903.917, 2657.724, 730.5367, 149.74289, 19.237999, 1.0423553, 0.006427109, 0.0]),
        last: &[
            -15020.182, 9650.669, 34228.98, 53617.086, 63572.754, 61727.367, 48186.64, 25555.852, -1624.629,
            -27899.447, -48123.953, -58596.43, -57823.664, -46743.875, -28371.047, -6971.415, 13002.26, 27940.318,
            35813.516, 36449.684, 31311.902, 22875.346, 13804.038, 6172.501, 952.75165, -2100.6394, -4156.0923,
            -6712.909, -10910.624, -16967.13, -23933.562, -29858.102, -32327.02, -29233.594, -19549.715, -3861.869,
            15509.416, 34877.82, 49982.246, 57013.402, 53613.684, 39582.13, 17082.775, -9720.632, -35535.33,
            -55112.625, -64439.836, -61657.363,
        ],
    },
    Extra {
        name: "dpm_cosine_lambda_clip_trailing",
        kind: SchedulerKind::DpmSolverMultistep,
        overrides: r#"{"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1, "timestep_spacing": "trailing"}"#,
        trained_betas: false,
        steps: 10,
        eta: 0.0,
        timesteps: &[995, 895, 795, 695, 595, 495, 395, 295, 195, 95],
        sigmas: Some(&[
            160.41367, 6.1157103, 3.0387018, 1.9503807, 1.3726166, 0.99984485, 0.7282859, 0.51247865, 0.32879758,
            0.16301154, 0.0,
        ]),
        last: &[
            -201.6911,
            -53.926228,
            128.83794,
            309.46857,
            446.9221,
            506.3535,
            468.2887,
            334.3958,
            128.21693,
            -109.50722,
            -329.87204,
            -487.0189,
            -548.7411,
            -503.8444,
            -364.44046,
            -162.65286,
            57.368572,
            250.04362,
            378.86597,
            424.20618,
            386.5701,
            284.70776,
            149.32878,
            14.302413,
            -92.19205,
            -154.19705,
            -170.55989,
            -153.10258,
            -121.170166,
            -94.352936,
            -85.645386,
            -97.11795,
            -119.39211,
            -135.05682,
            -124.9754,
            -75.544525,
            15.357639,
            135.6663,
            260.6976,
            358.79428,
            399.6539,
            363.10117,
            245.83691,
            64.147964,
            -148.41187,
            -348.02225,
            -490.65707,
            -542.7103,
        ],
    },
    Extra {
        name: "dpm_cosine_lambda_clip_linspace",
        kind: SchedulerKind::DpmSolverMultistep,
        overrides: r#"{"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}"#,
        trained_betas: false,
        steps: 10,
        eta: 0.0,
        timesteps: &[995, 896, 796, 696, 597, 498, 398, 298, 199, 100],
        sigmas: Some(&[
            160.41367, 6.1761336, 3.0547264, 1.9578906, 1.3816451, 1.0092388, 0.73546666, 0.51839787, 0.33572447,
            0.17104375, 0.0,
        ]),
        last: &[
            -201.65164,
            -53.860703,
            128.91154,
            309.53006,
            446.95456,
            506.34827,
            468.24673,
            334.32907,
            128.1435,
            -109.56713,
            -329.902,
            -487.01074,
            -548.6971,
            -503.7765,
            -364.36734,
            -162.59462,
            57.39591,
            250.03253,
            378.81958,
            424.13718,
            386.4973,
            284.65125,
            149.30406,
            14.316207,
            -92.143555,
            -154.12709,
            -170.48776,
            -153.04803,
            -121.1481,
            -94.36951,
            -85.69597,
            -97.18875,
            -119.463615,
            -135.10945,
            -124.99467,
            -75.5252,
            15.410278,
            135.7378,
            260.7683,
            358.8449,
            399.67056,
            363.0791,
            245.7823,
            64.07581,
            -148.48177,
            -348.07086,
            -490.6707,
            -542.6856,
        ],
    },
    Extra {
        name: "dpm_order1_deis",
        kind: SchedulerKind::DpmSolverMultistep,
        overrides: r#"{"solver_order": 1, "algorithm_type": "deis", "solver_type": "bh2", "final_sigmas_type": "sigma_min"}"#,
        trained_betas: false,
        steps: 5,
        eta: 0.0,
        timesteps: &[999, 799, 599, 400, 200],
        sigmas: Some(&[14.614647, 5.087765, 2.276464, 1.1643916, 0.57166636, 0.029167535]),
        last: &[
            -13.5595455,
            1.7663836,
            18.451717,
            33.10622,
            42.486507,
            44.280758,
            37.707558,
            23.769455,
            5.0862904,
            -14.660615,
            -31.542988,
            -42.26179,
            -44.871983,
            -39.181423,
            -26.732603,
            -10.382058,
            6.407815,
            20.380156,
            29.194578,
            31.86719,
            28.846407,
            21.729948,
            12.722406,
            3.996219,
            -2.8639183,
            -7.1863065,
            -9.232673,
            -9.930432,
            -10.416693,
            -11.54643,
            -13.524132,
            -15.778046,
            -17.121008,
            -16.153141,
            -11.785585,
            -3.722544,
            7.2552934,
            19.311192,
            29.897285,
            36.35075,
            36.591743,
            29.73594,
            16.447853,
            -1.0767658,
            -19.517164,
            -35.13738,
            -44.63213,
            -45.901093,
        ],
    },
    Extra {
        name: "dpm_euler_at_final_v_sigma_min",
        kind: SchedulerKind::DpmSolverMultistep,
        overrides: r#"{"euler_at_final": true, "lower_order_final": false, "final_sigmas_type": "sigma_min", "prediction_type": "v_prediction"}"#,
        trained_betas: false,
        steps: 20,
        eta: 0.0,
        timesteps: &[999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 500, 450, 400, 350, 300, 250, 200, 150, 100, 50],
        sigmas: Some(&[
            14.614647,
            10.90424,
            8.302806,
            6.4429574,
            5.087765,
            4.081731,
            3.3210845,
            2.7354703,
            2.276464,
            1.9102516,
            1.6182797,
            1.3716687,
            1.1643916,
            0.98710895,
            0.8327532,
            0.69579947,
            0.57166636,
            0.4560753,
            0.34393182,
            0.22558255,
            0.029167535,
        ]),
        last: &[
            -0.21081138,
            0.6212878,
            1.4070754,
            2.0109293,
            2.319516,
            2.265802,
            1.8450637,
            1.1188105,
            0.20521243,
            -0.7423492,
            -1.5641971,
            -2.1245952,
            -2.3368416,
            -2.1779828,
            -1.6903359,
            -0.9700479,
            -0.14581442,
            0.6471053,
            1.2916963,
            1.707688,
            1.860504,
            1.7599803,
            1.4506634,
            0.99728537,
            0.4697336,
            -0.06874866,
            -0.567886,
            -0.9909691,
            -1.3113624,
            -1.507702,
            -1.560755,
            -1.454005,
            -1.1784506,
            -0.740258,
            -0.16846637,
            0.48063466,
            1.1253375,
            1.667886,
            2.010588,
            2.0756972,
            1.8245354,
            1.270929,
            0.48486495,
            -0.4156209,
            -1.2836177,
            -1.970091,
            -2.352714,
            -2.3604918,
        ],
    },
    Extra {
        name: "dpm_zero_snr_trailing_v",
        kind: SchedulerKind::DpmSolverMultistep,
        overrides: r#"{"rescale_betas_zero_snr": true, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}"#,
        trained_betas: false,
        steps: 5,
        eta: 0.0,
        timesteps: &[999, 799, 599, 399, 199],
        sigmas: Some(&[4096.0, 7.4107075, 2.6048563, 1.2413754, 0.5947518, 0.0]),
        last: &[
            0.94521314,
            2.0184977,
            2.6397643,
            2.704148,
            2.2369208,
            1.3807515,
            0.3545966,
            -0.6042151,
            -1.299116,
            -1.6192324,
            -1.5590063,
            -1.2085854,
            -0.71912116,
            -0.25385416,
            0.06059611,
            0.16883221,
            0.09769797,
            -0.05873871,
            -0.17508703,
            -0.1402005,
            0.101604134,
            0.5264363,
            1.0316391,
            1.4620757,
            1.6549318,
            1.4904399,
            0.9337902,
            0.05550194,
            -0.97679794,
            -1.9344409,
            -2.5830715,
            -2.7431087,
            -2.3392353,
            -1.4253156,
            -0.17732391,
            1.1448171,
            2.257389,
            2.9200253,
            2.99288,
            2.469319,
            1.4759309,
            0.24010539,
            -0.9662451,
            -1.8922021,
            -2.3658493,
            -2.3303263,
            -1.8495346,
            -1.0832753,
        ],
    },
    Extra {
        name: "dpm_sample_karras_sigma_min",
        kind: SchedulerKind::DpmSolverMultistep,
        overrides: r#"{"prediction_type": "sample", "use_karras_sigmas": true, "final_sigmas_type": "sigma_min", "lower_order_final": false}"#,
        trained_betas: false,
        steps: 5,
        eta: 0.0,
        timesteps: &[999, 786, 427, 59, 0],
        sigmas: Some(&[14.614647, 4.796544, 1.2741053, 0.24795172, 0.029167535, 0.029167535]),
        last: &[
            -1.2951978,
            -1.7005439,
            -1.6356041,
            -1.1158267,
            -0.28227872,
            0.6368485,
            1.3887827,
            1.7656051,
            1.6615165,
            1.1021938,
            0.23813343,
            -0.69623977,
            -1.4465346,
            -1.807927,
            -1.681218,
            -1.1000587,
            -0.22186732,
            0.71508706,
            1.4566982,
            1.8023413,
            1.6595358,
            1.0689996,
            0.19327065,
            -0.72796077,
            -1.4435374,
            -1.7595313,
            -1.5921274,
            -0.9902309,
            -0.121644914,
            0.7733302,
            1.4480991,
            1.717573,
            1.5089469,
            0.88152325,
            0.010161489,
            -0.86306703,
            -1.4957035,
            -1.7118152,
            -1.4505875,
            -0.7832148,
            0.106568396,
            0.97298527,
            1.5758752,
            1.7469189,
            1.4362156,
            0.7263757,
            -0.18978813,
            -1.0619011,
        ],
    },
    Extra {
        name: "dpm_leading_offset",
        kind: SchedulerKind::DpmSolverMultistep,
        overrides: r#"{"timestep_spacing": "leading", "steps_offset": 1}"#,
        trained_betas: false,
        steps: 12,
        eta: 0.0,
        timesteps: &[913, 837, 761, 685, 609, 533, 457, 381, 305, 229, 153, 77],
        sigmas: Some(&[
            8.943602, 6.078628, 4.2975497, 3.1418834, 2.359926, 1.8085403, 1.4035782, 1.0939152, 0.8473238, 0.6423471,
            0.46285346, 0.29128456, 0.0,
        ]),
        last: &[
            -2.3478043, 7.0928955, 15.720772, 21.898602, 24.409174, 22.724665, 17.129578, 8.66683, -1.0818679,
            -10.329754, -17.455093, -21.322199, -21.482174, -18.21319, -12.400605, -5.2955914, 1.7816666, 7.7190037,
            11.805161, 13.80069, 13.884342, 12.505725, 10.197934, 7.4103656, 4.4102855, 1.2768222, -2.0200198,
            -5.4907207, -8.999502, -12.191072, -14.505905, -15.29096, -13.981281, -10.302363, -4.431187, 2.9395933,
            10.667462, 17.354425, 21.632826, 22.477371, 19.46637, 12.923111, 3.8952568, -6.0314536, -15.047635,
            -21.493002, -24.201767, -22.740984,
        ],
    },
];

#[test]
fn extra_configurations_match_diffusers() {
    let base = model_config("sd21-base-tiny");
    let mut report = Vec::new();
    let mut worst_rel = 0f32;
    for case in EXTRA {
        let name = case.name;
        let mut config = if case.overrides == "null" {
            SchedulerConfig::from_json(&json!({})).expect("empty")
        } else {
            base.with_overrides(&serde_json::from_str(case.overrides).expect("overrides")).expect("config")
        };
        if case.trained_betas {
            let betas: Vec<f64> = (0..1000)
                .map(|i| {
                    let r = f64::from(i) / 999.0;
                    0.0005 + 0.015 * (r * r)
                })
                .collect();
            config = config.with("trained_betas", json!(betas)).expect("trained_betas");
        }
        let mut scheduler =
            build(&config, &resolved(case.kind, case.eta), case.steps).unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected: Vec<f64> = case.timesteps.iter().map(|&t| t as f64).collect();
        assert_eq!(scheduler.timesteps(), expected.as_slice(), "{name}: timesteps");
        match (case.sigmas, scheduler.sigmas()) {
            (None, None) => {}
            (Some(expected), Some(ours)) => {
                assert_eq!(ours.len(), expected.len(), "{name}: number of sigmas");
                for (i, (a, e)) in ours.iter().zip(expected).enumerate() {
                    let rel = (a - e).abs() / e.abs().max(f32::MIN_POSITIVE);
                    assert!(f64::from(rel) <= SIGMA_REL_TOL, "{name}: sigma {i} = {a}, diffusers {e}");
                }
            }
            (e, o) => panic!("{name}: sigmas {e:?} vs {o:?}"),
        }
        let mut x = extra_inputs(0, 0);
        for i in 0..scheduler.timesteps().len() {
            let mut noise = RecordedNoise::new((case.eta > 0.0).then(|| extra_inputs(2, i)));
            x = scheduler
                .step(&extra_inputs(1, i), i, &x, &mut noise)
                .unwrap_or_else(|e| panic!("{name} step {i}: {e}"));
        }
        let reference = Tensor::from_slice(case.last, (2, 4, 2, 3), &Device::Cpu).expect("reference");
        let (err, at) = max_abs_diff(&x, &reference);
        let scale = case.last.iter().fold(1f32, |m, v| m.max(v.abs()));
        let rel = err / scale;
        report.push(format!("{name}: max abs error {err:e} at {at} (max |value| {scale})"));
        worst_rel = worst_rel.max(rel);
    }
    let report = report.join("\n");
    println!("{report}\nworst relative: {worst_rel:e}");
    assert!(worst_rel <= CHAIN_REL_TOL, "relative error {worst_rel:e} > {CHAIN_REL_TOL:e}:\n{report}");
}
