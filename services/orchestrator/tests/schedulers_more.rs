//! Parity with diffusers for the schedulers beyond DDIM / DPM-Solver++ (Euler, Euler ancestral,
//! LMS, Heun, PNDM, DDPM): tests/fixtures/reference-schedulers (made by generate_schedulers.py):
//! schedules, init_noise_sigma, model-input scaling and single steps; plus request names.
//!
//! Tolerances: timesteps equal (f32 values, fractional for the sigma-based schedulers), except
//! those from `_sigma_to_t` (Karras schedules, KDPM2's midpoints), 1e-3 absolute (measured
//! 1.2e-4; see `check_timesteps`), and KDPM2 ancestral's (see `KDPM2A_STEP_TOL`);
//! sigmas and init_noise_sigma 1e-6 relative (torch's MKL sqrt/log and numpy's float32 log can
//! be an ulp off ours); each step's output, given diffusers' input, within 1e-5 absolute of
//! diffusers' (per-step scalars can differ by an ulp, and the LMS coefficients come from
//! scipy's numerical integration of a float32 integrand vs an exact Gauss-Legendre rule here),
//! and within 1e-6 relative to the output's largest |value| (>= 1; the sigma-scaled samples
//! reach |x| ~ 50, where an f32 ulp is 3.8e-6);
//! model inputs within 1e-6 relative to their largest |value| (>= 1).

#[path = "common/schedulers.rs"]
mod shared;

use candle_core::Tensor;
use sdmesh_orchestrator::noise::RecordedNoise;
use sdmesh_orchestrator::scheduler::{
    build, resolve, ResolvedScheduler, Scheduler, SchedulerConfig, SchedulerKind, SchedulerRequest, ACCEPTED_NAMES,
};
use sdmesh_testkit::{load_fixture_json, load_fixture_tensors, max_abs_diff};
use serde_json::{json, Value};
use shared::{f64s, model_config, rel_err, req, CountingNoise};
use std::collections::HashMap;

const STEP_TOL: f32 = 1e-5;
const STEP_REL_TOL: f32 = 1e-6;
/// KDPM2 ancestral only. Its down / midpoint sigmas come from sqrt(sigma_next^2 - sigma_up^2),
/// a cancellation (sigma_up is within a few 1e-6 of sigma_next near the end of the schedule)
/// that turns the ulp differences of the training sigmas (torch's MKL sqrt) into ~1e-5
/// relative differences of those sigmas. Measured: 6.9e-5 abs / 2.0e-6 relative per step; its
/// midpoint timesteps up to 1.2e-3 off (0.0096 vs 0 at 2 steps, where the midpoint sigma is
/// below the model's sigma_min and t is ill-conditioned).
const KDPM2A_STEP_TOL: f32 = 1e-4;
const KDPM2A_STEP_REL_TOL: f32 = 1e-5;
const KDPM2A_TIMESTEP_ABS_TOL: f64 = 0.02;
const INPUT_TOL: f32 = 1e-6;
const SIGMA_REL_TOL: f64 = 1e-6;
const TIMESTEP_INTERPOLATED_ABS_TOL: f64 = 1e-3;

fn load_json(rel: &str) -> Value {
    load_fixture_json(&format!("reference-schedulers/{rel}"))
}

fn load_tensors(rel: &str) -> HashMap<String, Tensor> {
    load_fixture_tensors(&format!("reference-schedulers/{rel}"))
}

fn kind_of(class: &str) -> SchedulerKind {
    match class {
        "EulerDiscreteScheduler" => SchedulerKind::Euler,
        "EulerAncestralDiscreteScheduler" => SchedulerKind::EulerAncestral,
        "LMSDiscreteScheduler" => SchedulerKind::Lms,
        "HeunDiscreteScheduler" => SchedulerKind::Heun,
        "PNDMScheduler" => SchedulerKind::Pndm,
        "DDPMScheduler" => SchedulerKind::Ddpm,
        "KDPM2DiscreteScheduler" => SchedulerKind::KDpm2,
        "KDPM2AncestralDiscreteScheduler" => SchedulerKind::KDpm2Ancestral,
        other => panic!("unexpected scheduler class {other}"),
    }
}

fn resolved(kind: SchedulerKind) -> ResolvedScheduler {
    ResolvedScheduler { kind, eta: 0.0, use_karras_sigmas: None }
}

/// Timesteps as diffusers' float32 values (serde_json's float parsing can be an f64 ulp off, which
/// the f32 rounding removes): equal, except Karras schedules' fractional timesteps. Those come
/// from `_sigma_to_t`, which interpolates against numpy's float32 `log` of the training sigmas;
/// numpy's SIMD log is not correctly rounded (it differs from a correctly rounded log in ~20% of
/// SD's 1000 sigmas), and an ulp of log-sigma moves t by an f32 ulp or two (1.2e-4 at t ~ 900).
fn check_timesteps(what: &str, ours: &[f64], expected: &[f64], tol: Option<f64>) {
    assert_eq!(ours.len(), expected.len(), "{what}: number of timesteps ({ours:?} vs {expected:?})");
    for (i, (&a, &e)) in ours.iter().zip(expected).enumerate() {
        let (a32, e32) = (a as f32, e as f32);
        let ok = match tol {
            Some(tol) => a32 == e32 || (a - f64::from(e32)).abs() <= tol,
            None => a32 == e32,
        };
        assert!(ok, "{what}: timestep {i} = {a}, diffusers {e}");
    }
}

/// The timestep tolerance: `None` (equal) unless some come from `_sigma_to_t` (Karras
/// schedules, KDPM2's midpoints).
fn timestep_tol(class: &Value, kwargs: &Value) -> Option<f64> {
    let class = class.as_str().unwrap_or_default();
    if class == "KDPM2AncestralDiscreteScheduler" {
        Some(KDPM2A_TIMESTEP_ABS_TOL)
    } else if class.starts_with("KDPM2") || kwargs.get("use_karras_sigmas").and_then(Value::as_bool).unwrap_or(false) {
        Some(TIMESTEP_INTERPOLATED_ABS_TOL)
    } else {
        None
    }
}

#[test]
fn schedules_match_diffusers() {
    let cases = load_json("schedulers.json");
    let cases = cases.as_array().expect("list");
    assert!(cases.len() >= 200, "{} cases", cases.len());
    let mut worst = 0f64;
    let mut classes = std::collections::BTreeSet::new();
    for case in cases {
        let what = format!("{} {} {} x{}", case["model"], case["scheduler"], case["kwargs"], case["steps"]);
        let config =
            model_config(case["model"].as_str().expect("model")).with_overrides(&case["kwargs"]).expect("kwargs");
        let kind = kind_of(case["scheduler"].as_str().expect("scheduler"));
        classes.insert(case["scheduler"].as_str().unwrap().to_string());
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let scheduler = build(&config, &resolved(kind), steps).unwrap_or_else(|e| panic!("{what}: {e}"));
        check_timesteps(
            &what,
            scheduler.timesteps(),
            &f64s(&case["timesteps"]),
            timestep_tol(&case["scheduler"], &case["kwargs"]),
        );
        let init = case["init_noise_sigma"].as_f64().expect("init_noise_sigma");
        let rel = rel_err(scheduler.init_noise_sigma(), init);
        assert!(rel <= SIGMA_REL_TOL, "{what}: init_noise_sigma {} vs {init}", scheduler.init_noise_sigma());
        worst = worst.max(rel);
        match case.get("sigmas") {
            Some(Value::Array(_)) => {
                let expected = f64s(&case["sigmas"]);
                let ours = scheduler.sigmas().unwrap_or_else(|| panic!("{what}: no sigmas"));
                assert_eq!(ours.len(), expected.len(), "{what}: number of sigmas");
                for (i, (a, e)) in ours.iter().zip(&expected).enumerate() {
                    let rel = if *e == 0.0 { f64::from(*a).abs() } else { rel_err(f64::from(*a), *e) };
                    worst = worst.max(rel);
                    assert!(rel <= SIGMA_REL_TOL, "{what}: sigma {i} = {a}, diffusers {e} (relative error {rel:e})");
                }
            }
            _ => assert!(scheduler.sigmas().is_none(), "{what}: unexpected sigmas"),
        }
    }
    assert_eq!(classes.len(), 8, "{classes:?}");
    println!("sigmas / init_noise_sigma: worst relative error {worst:e}");
}

/// Each step against diffusers' output for diffusers' input (and the model input scaling).
#[test]
fn steps_match_diffusers() {
    let cases = load_json("scheduler_steps.json");
    let cases = cases.as_array().expect("list");
    assert!(cases.len() >= 32, "{} cases", cases.len());
    let mut report = Vec::new();
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let config = SchedulerConfig::from_json(&case["scheduler_config"])
            .and_then(|c| c.with_overrides(&case["kwargs"]))
            .expect("config");
        let kind = kind_of(case["scheduler"].as_str().expect("scheduler"));
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let mut scheduler: Box<dyn Scheduler> =
            build(&config, &resolved(kind), steps).unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected = f64s(&case["timesteps"]);
        check_timesteps(name, scheduler.timesteps(), &expected, timestep_tol(&case["scheduler"], &case["kwargs"]));
        let t = load_tensors(&format!("scheduler_steps/{name}.safetensors"));
        let get = |k: &str| t.get(k).unwrap_or_else(|| panic!("{name}: no {k}")).clone();
        let mut x = get("sample");
        let (mut worst_step, mut worst_rel, mut worst_input) = (0f32, 0f32, 0f32);
        for i in 0..expected.len() {
            let input = scheduler.scale_model_input(&x, i).expect("scale");
            let expected_input = get(&format!("model_input_{i}"));
            let scale = expected_input.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
            let err = max_abs_diff(&input, &expected_input).0 / scale;
            assert!(err <= INPUT_TOL, "{name} step {i}: model input off by {err:e} relative");
            worst_input = worst_input.max(err);
            let draws: Vec<Tensor> = t.get(&format!("noise_{i}")).cloned().into_iter().collect();
            let expected_draws = draws.len();
            let mut noise = CountingNoise { inner: RecordedNoise::new(draws), draws: 0 };
            let prev = scheduler
                .step(&get(&format!("model_output_{i}")), i, &x, &mut noise)
                .unwrap_or_else(|e| panic!("{name} step {i}: {e}"));
            assert_eq!(noise.draws, expected_draws, "{name} step {i}: noise draws");
            let reference = get(&format!("prev_{i}"));
            assert_eq!(prev.dims(), reference.dims(), "{name} step {i}: shape");
            let (err, _) = max_abs_diff(&prev, &reference);
            let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
            let (abs_tol, rel_tol) = if kind == SchedulerKind::KDpm2Ancestral {
                (KDPM2A_STEP_TOL, KDPM2A_STEP_REL_TOL)
            } else {
                (STEP_TOL, STEP_REL_TOL)
            };
            assert!(
                err <= abs_tol && err / scale <= rel_tol,
                "{name} step {i}: max abs error {err:e} (> {abs_tol:e}?), {:e} of max |value| {scale} (> {rel_tol:e}?)",
                err / scale
            );
            worst_step = worst_step.max(err);
            worst_rel = worst_rel.max(err / scale);
            x = reference;
        }
        report.push(format!(
            "{name}: step max abs {worst_step:e} ({worst_rel:e} relative), model input relative {worst_input:e}"
        ));
    }
    println!("{}", report.join("\n"));
}

#[test]
fn new_scheduler_names() {
    let table: &[(&[&str], SchedulerKind, Option<bool>, &str)] = &[
        (
            &["euler", "Euler", "EulerDiscrete", "EulerDiscreteScheduler", " eulerdiscretescheduler "],
            SchedulerKind::Euler,
            None,
            "EulerDiscreteScheduler",
        ),
        (
            &["euler-karras", "euler_karras", "EulerDiscreteScheduler (karras)"],
            SchedulerKind::Euler,
            Some(true),
            "EulerDiscreteScheduler (karras)",
        ),
        (
            &[
                "euler_a",
                "euler-a",
                "euler-ancestral",
                "Euler_Ancestral",
                "EulerAncestralDiscrete",
                "EulerAncestralDiscreteScheduler",
            ],
            SchedulerKind::EulerAncestral,
            None,
            "EulerAncestralDiscreteScheduler",
        ),
        (&["lms", "LMS", "LMSDiscrete", "LMSDiscreteScheduler"], SchedulerKind::Lms, None, "LMSDiscreteScheduler"),
        (
            &["lms-karras", "lms_karras", "LMSDiscreteScheduler (karras)"],
            SchedulerKind::Lms,
            Some(true),
            "LMSDiscreteScheduler (karras)",
        ),
        (
            &["heun", "Heun", "HeunDiscrete", "HeunDiscreteScheduler"],
            SchedulerKind::Heun,
            None,
            "HeunDiscreteScheduler",
        ),
        (
            &["heun-karras", "heun_karras", "HeunDiscreteScheduler (karras)"],
            SchedulerKind::Heun,
            Some(true),
            "HeunDiscreteScheduler (karras)",
        ),
        (&["pndm", "plms", "PNDM", "PNDMScheduler", "pndmscheduler"], SchedulerKind::Pndm, None, "PNDMScheduler"),
        (&["ddpm", "DDPM", "DDPMScheduler"], SchedulerKind::Ddpm, None, "DDPMScheduler"),
        (
            &["kdpm2", "dpm2", "KDPM2Discrete", "KDPM2DiscreteScheduler"],
            SchedulerKind::KDpm2,
            None,
            "KDPM2DiscreteScheduler",
        ),
        (
            &["kdpm2-karras", "kdpm2_karras", "dpm2-karras", "KDPM2DiscreteScheduler (karras)"],
            SchedulerKind::KDpm2,
            Some(true),
            "KDPM2DiscreteScheduler (karras)",
        ),
        (
            &[
                "kdpm2_a",
                "kdpm2-a",
                "kdpm2-ancestral",
                "dpm2_a",
                "KDPM2AncestralDiscrete",
                "KDPM2AncestralDiscreteScheduler",
            ],
            SchedulerKind::KDpm2Ancestral,
            None,
            "KDPM2AncestralDiscreteScheduler",
        ),
        (
            &["kdpm2_a-karras", "kdpm2_a_karras", "dpm2_a_karras", "KDPM2AncestralDiscreteScheduler (karras)"],
            SchedulerKind::KDpm2Ancestral,
            Some(true),
            "KDPM2AncestralDiscreteScheduler (karras)",
        ),
    ];
    for (names, kind, karras, canonical) in table {
        for name in *names {
            let r = resolve(&req(name)).unwrap_or_else(|e| panic!("{name:?}: {e}"));
            assert_eq!((r.kind, r.use_karras_sigmas, r.eta), (*kind, *karras, 0.0), "{name:?}");
            assert_eq!(r.canonical_name(), *canonical, "{name:?}");
            assert_eq!(resolve(&req(&r.canonical_name())).expect("canonical"), r);
            assert!(ACCEPTED_NAMES.contains(canonical.trim_end_matches(" (karras)")), "{canonical} not listed");
        }
    }
    // use_karras_sigmas on the plain names of classes that have it.
    for name in ["euler", "lms", "heun", "kdpm2", "kdpm2_a"] {
        let r = resolve(&SchedulerRequest { name: name.into(), use_karras_sigmas: Some(true), ..Default::default() })
            .expect(name);
        assert_eq!(r.use_karras_sigmas, Some(true));
        assert!(r.canonical_name().ends_with("(karras)"));
        assert_eq!(resolve(&req(&r.canonical_name())).expect("canonical"), r);
    }
    // eta 0 (an unset proto field) is fine everywhere.
    assert!(resolve(&SchedulerRequest { name: "euler_a".into(), eta: Some(0.0), ..Default::default() }).is_ok());
}

#[test]
fn bad_new_scheduler_requests() {
    for name in
        ["euler karras", "euler-a-karras", "euler_a_karras", "k_lms", "heun2", "pndm-karras", "unipc2", "kdpm2 a"]
    {
        let e = resolve(&req(name)).expect_err(name);
        assert!(
            e.contains("unknown scheduler") && e.contains("euler_a") && e.contains("PNDMScheduler"),
            "{name:?}: {e}"
        );
    }
    for name in ["euler", "euler_a", "lms", "heun", "pndm", "ddpm", "kdpm2", "kdpm2_a"] {
        let e = resolve(&SchedulerRequest { name: name.into(), eta: Some(0.5), ..Default::default() }).expect_err(name);
        assert!(e.contains("eta applies to DDIM only"), "{name}: {e}");
    }
    for name in ["euler_a", "pndm", "ddpm"] {
        let e = resolve(&SchedulerRequest { name: name.into(), use_karras_sigmas: Some(true), ..Default::default() })
            .expect_err(name);
        assert!(e.contains("use_karras_sigmas"), "{name}: {e}");
    }
    let e =
        resolve(&SchedulerRequest { name: "heun-karras".into(), use_karras_sigmas: Some(false), ..Default::default() })
            .expect_err("contradiction");
    assert!(e.contains("Karras"), "{e}");
}

#[test]
fn unsupported_config_values_are_errors() {
    let base = model_config("sd21-base-tiny");
    let build_err = |cfg: &SchedulerConfig, kind: SchedulerKind| match build(cfg, &resolved(kind), 10) {
        Ok(_) => panic!("{kind:?} should fail"),
        Err(e) => e,
    };
    let with = |k: &str, v: Value| base.with(k, v).expect("config");
    let e = build_err(&with("skip_prk_steps", json!(false)), SchedulerKind::Pndm);
    assert!(e.contains("skip_prk_steps"), "{e}");
    let e = build_err(&with("interpolation_type", json!("log_linear")), SchedulerKind::Euler);
    assert!(e.contains("interpolation_type"), "{e}");
    let e = build_err(&with("use_exponential_sigmas", json!(true)), SchedulerKind::Lms);
    assert!(e.contains("use_exponential_sigmas"), "{e}");
    let e = build_err(&with("use_beta_sigmas", json!(true)), SchedulerKind::Heun);
    assert!(e.contains("use_beta_sigmas"), "{e}");
    let e = build_err(&with("variance_type", json!("learned_range")), SchedulerKind::Ddpm);
    assert!(e.contains("variance_type"), "{e}");
    let e = build_err(&with("prediction_type", json!("sample")), SchedulerKind::EulerAncestral);
    assert!(e.contains("sample"), "{e}");
    for kind in [SchedulerKind::KDpm2, SchedulerKind::KDpm2Ancestral] {
        let e = build_err(&with("prediction_type", json!("sample")), kind);
        assert!(e.contains("sample"), "{e}");
    }
    let e = build_err(&with("prediction_type", json!("sample")), SchedulerKind::Pndm);
    assert!(e.contains("sample"), "{e}");
    let v = model_config("sd21-tiny").with("timestep_type", json!("continuous")).expect("config");
    let e = build_err(&v, SchedulerKind::Euler);
    assert!(e.contains("timestep_type"), "{e}");
    // Keys a class does not have are ignored, as diffusers does.
    assert!(build(&with("use_karras_sigmas", json!(true)), &resolved(SchedulerKind::EulerAncestral), 10).is_ok());
    // Heun's own beta defaults (0.00085 .. 0.012) apply to an empty config.
    let empty = SchedulerConfig::from_json(&json!({})).expect("empty");
    let h = empty.k_diffusion(sdmesh_orchestrator::scheduler::config::KClass::Heun).expect("heun");
    assert_eq!((h.betas.beta_start, h.betas.beta_end), (0.00085, 0.012));
    // KDPM2: first- and second-order evaluations interleave (2 * steps - 1 timesteps).
    let kdpm2 = build(&base, &resolved(SchedulerKind::KDpm2), 3).expect("kdpm2");
    assert_eq!(kdpm2.timesteps().len(), 5);
    assert_eq!(kdpm2.sigmas().map(<[f32]>::len), Some(8));
    // PNDM: N steps give N + 1 timesteps (the second repeats).
    let pndm = build(&base, &resolved(SchedulerKind::Pndm), 4).expect("pndm");
    assert_eq!(pndm.timesteps(), &[751.0, 501.0, 501.0, 251.0, 1.0]);
    // Heun: every timestep after the first twice.
    let heun = build(&base, &resolved(SchedulerKind::Heun), 3).expect("heun");
    assert_eq!(heun.timesteps(), &[999.0, 499.5, 499.5, 0.0, 0.0]);
}
