//! Parity with diffusers for the second batch of schedulers (DPM-Solver++ 2M SDE:
//! `DPMSolverMultistepScheduler` with `algorithm_type` "sde-dpmsolver++"; `UniPCMultistepScheduler`;
//! `DEISMultistepScheduler`; `DPMSolverSinglestepScheduler`):
//! tests/fixtures/reference-schedulers2 (made by generate_schedulers2.py): schedules,
//! init_noise_sigma and single steps with diffusers' recorded noise; plus request names.
//!
//! Tolerances as tests/schedulers_more.rs: timesteps equal (Karras ones 1e-3 absolute, from
//! `_sigma_to_t` against numpy's float32 log), sigmas 1e-6 relative, each step's output (given
//! diffusers' input, model output and noise) within 1e-6 relative to the output's largest
//! |value| (>= 1) and 1e-5 absolute where that is <= 10 (epsilon models' x0 predictions from
//! random model outputs reach |x| ~ 50, where an f32 ulp is 3.8e-6; measured: 1.5e-5 absolute,
//! 4.3e-7 relative at worst), DEIS 5e-6 relative (see `DEIS_STEP_REL_TOL`).

#[path = "common/schedulers.rs"]
mod shared;

use candle_core::{Device, Tensor};
use sdmesh_orchestrator::noise::RecordedNoise;
use sdmesh_orchestrator::scheduler::{
    build, resolve, ResolvedScheduler, Scheduler, SchedulerConfig, SchedulerKind, SchedulerRequest, UniPcSolverType,
    ACCEPTED_NAMES,
};
use sdmesh_testkit::{load_fixture_json, load_fixture_tensors, max_abs_diff};
use serde_json::{json, Value};
use shared::{f64s, model_config, rel_err, req, CountingNoise};
use std::collections::HashMap;

const STEP_TOL: f32 = 1e-5;
const STEP_REL_TOL: f32 = 1e-6;
/// DEIS only, relative to the output's largest |value|: its second-order coefficients are
/// differences of nearly equal `ind_fn` terms computed with numpy's float32 `log` (not correctly
/// rounded: an ulp off ours in ~20% of values), so they carry a few float32 ulps of relative
/// error amplified by the cancellation. Measured: 1.3e-6 (sd21, 16 steps).
const DEIS_STEP_REL_TOL: f32 = 5e-6;
const SIGMA_REL_TOL: f64 = 1e-6;
const TIMESTEP_INTERPOLATED_ABS_TOL: f64 = 1e-3;

fn load_json(rel: &str) -> Value {
    load_fixture_json(&format!("reference-schedulers2/{rel}"))
}

fn load_tensors(rel: &str) -> HashMap<String, Tensor> {
    load_fixture_tensors(&format!("reference-schedulers2/{rel}"))
}

/// The kind a fixture's class and kwargs mean.
fn kind_of(class: &str, kwargs: &Value) -> SchedulerKind {
    match (class, kwargs.get("algorithm_type").and_then(Value::as_str)) {
        ("DPMSolverMultistepScheduler", Some("sde-dpmsolver++")) => SchedulerKind::DpmSolverSde,
        ("DPMSolverMultistepScheduler", _) => SchedulerKind::DpmSolverMultistep,
        // The solver type comes from the config (kwargs), as a plain "unipc" request does.
        ("UniPCMultistepScheduler", _) => SchedulerKind::UniPc(None),
        ("DEISMultistepScheduler", _) => SchedulerKind::Deis,
        ("DPMSolverSinglestepScheduler", _) => SchedulerKind::DpmSolverSinglestep,
        (other, _) => panic!("unexpected scheduler class {other}"),
    }
}

fn resolved(kind: SchedulerKind) -> ResolvedScheduler {
    ResolvedScheduler { kind, eta: 0.0, use_karras_sigmas: None }
}

fn timestep_tol(kwargs: &Value) -> Option<f64> {
    kwargs.get("use_karras_sigmas").and_then(Value::as_bool).unwrap_or(false).then_some(TIMESTEP_INTERPOLATED_ABS_TOL)
}

fn check_timesteps(what: &str, ours: &[f64], expected: &[f64], tol: Option<f64>) {
    assert_eq!(ours.len(), expected.len(), "{what}: number of timesteps ({ours:?} vs {expected:?})");
    for (i, (&a, &e)) in ours.iter().zip(expected).enumerate() {
        let (a32, e32) = (a as f32, e as f32);
        let ok = a32 == e32 || tol.is_some_and(|tol| (a - f64::from(e32)).abs() <= tol);
        assert!(ok, "{what}: timestep {i} = {a}, diffusers {e}");
    }
}

#[test]
fn schedules_match_diffusers() {
    let cases = load_json("schedulers.json");
    let cases = cases.as_array().expect("list");
    assert!(cases.len() >= 20, "{} cases", cases.len());
    let mut worst = 0f64;
    let mut kinds = std::collections::BTreeSet::new();
    for case in cases {
        let what = format!("{} {} {} x{}", case["model"], case["scheduler"], case["kwargs"], case["steps"]);
        let config =
            model_config(case["model"].as_str().expect("model")).with_overrides(&case["kwargs"]).expect("kwargs");
        let kind = kind_of(case["scheduler"].as_str().expect("scheduler"), &case["kwargs"]);
        kinds.insert(format!("{kind:?}"));
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let scheduler = build(&config, &resolved(kind), steps).unwrap_or_else(|e| panic!("{what}: {e}"));
        check_timesteps(&what, scheduler.timesteps(), &f64s(&case["timesteps"]), timestep_tol(&case["kwargs"]));
        let init = case["init_noise_sigma"].as_f64().expect("init_noise_sigma");
        assert!(rel_err(scheduler.init_noise_sigma(), init) <= SIGMA_REL_TOL, "{what}: init_noise_sigma");
        let expected = f64s(&case["sigmas"]);
        let ours = scheduler.sigmas().unwrap_or_else(|| panic!("{what}: no sigmas"));
        assert_eq!(ours.len(), expected.len(), "{what}: number of sigmas");
        for (i, (a, e)) in ours.iter().zip(&expected).enumerate() {
            let rel = if *e == 0.0 { f64::from(*a).abs() } else { rel_err(f64::from(*a), *e) };
            worst = worst.max(rel);
            assert!(rel <= SIGMA_REL_TOL, "{what}: sigma {i} = {a}, diffusers {e} (relative error {rel:e})");
        }
    }
    assert!(
        kinds.contains("DpmSolverSde")
            && kinds.contains("UniPc(None)")
            && kinds.contains("Deis")
            && kinds.contains("DpmSolverSinglestep"),
        "{kinds:?}"
    );
    println!("sigmas: worst relative error {worst:e}");
}

/// Each step against diffusers' output for diffusers' input and recorded noise.
#[test]
fn steps_match_diffusers() {
    let cases = load_json("scheduler_steps.json");
    let cases = cases.as_array().expect("list");
    assert!(cases.len() >= 6, "{} cases", cases.len());
    let mut report = Vec::new();
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let config = SchedulerConfig::from_json(&case["scheduler_config"])
            .and_then(|c| c.with_overrides(&case["kwargs"]))
            .expect("config");
        let kind = kind_of(case["scheduler"].as_str().expect("scheduler"), &case["kwargs"]);
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let mut scheduler: Box<dyn Scheduler> =
            build(&config, &resolved(kind), steps).unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected = f64s(&case["timesteps"]);
        check_timesteps(name, scheduler.timesteps(), &expected, timestep_tol(&case["kwargs"]));
        let t = load_tensors(&format!("scheduler_steps/{name}.safetensors"));
        let get = |k: &str| t.get(k).unwrap_or_else(|| panic!("{name}: no {k}")).clone();
        let mut x = get("sample");
        let (mut worst_step, mut worst_rel) = (0f32, 0f32);
        for i in 0..expected.len() {
            let input = scheduler.scale_model_input(&x, i).expect("scale");
            let expected_input = get(&format!("model_input_{i}"));
            assert!(max_abs_diff(&input, &expected_input).0 <= 1e-6, "{name} step {i}: model input");
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
            // DEIS: see DEIS_STEP_REL_TOL.
            let rel_tol = if kind == SchedulerKind::Deis { DEIS_STEP_REL_TOL } else { STEP_REL_TOL };
            assert!(
                err <= STEP_TOL.max(rel_tol * scale) && err / scale <= rel_tol,
                "{name} step {i}: max abs error {err:e}, {:e} of max |value| {scale}",
                err / scale
            );
            worst_step = worst_step.max(err);
            worst_rel = worst_rel.max(err / scale);
            x = reference;
        }
        report.push(format!("{name}: step max abs {worst_step:e} ({worst_rel:e} relative)"));
    }
    println!("{}", report.join("\n"));
}

#[test]
fn second_batch_scheduler_names() {
    let table: &[(&[&str], SchedulerKind, Option<bool>, &str)] = &[
        (
            &[
                "dpm++2m-sde",
                "dpmpp_2m_sde",
                "DPM++_2M_SDE",
                "sde-dpmsolver++",
                "DPMSolverMultistepScheduler (sde-dpmsolver++)",
            ],
            SchedulerKind::DpmSolverSde,
            None,
            "DPMSolverMultistepScheduler (sde-dpmsolver++)",
        ),
        (
            &[
                "dpm++2m-sde-karras",
                "dpmpp_2m_sde_karras",
                " DPM++_2M_SDE_Karras ",
                "DPMSolverMultistepScheduler (sde-dpmsolver++, karras)",
            ],
            SchedulerKind::DpmSolverSde,
            Some(true),
            "DPMSolverMultistepScheduler (sde-dpmsolver++, karras)",
        ),
    ];
    for (names, kind, karras, canonical) in table {
        for name in *names {
            let r = resolve(&req(name)).unwrap_or_else(|e| panic!("{name:?}: {e}"));
            assert_eq!((r.kind, r.use_karras_sigmas, r.eta), (*kind, *karras, 0.0), "{name:?}");
            assert_eq!(r.canonical_name(), *canonical, "{name:?}");
            assert_eq!(resolve(&req(&r.canonical_name())).expect("canonical"), r);
            assert!(ACCEPTED_NAMES.contains(canonical), "{canonical} not listed");
        }
    }
    let r =
        resolve(&SchedulerRequest { name: "dpm++2m-sde".into(), use_karras_sigmas: Some(true), ..Default::default() })
            .expect("karras option");
    assert_eq!(r.canonical_name(), "DPMSolverMultistepScheduler (sde-dpmsolver++, karras)");
    assert_eq!(resolve(&req(&r.canonical_name())).expect("canonical"), r);
    let e = resolve(&SchedulerRequest { name: "dpm++2m-sde".into(), eta: Some(0.5), ..Default::default() })
        .expect_err("eta");
    assert!(e.contains("eta applies to DDIM only"), "{e}");
    let e = resolve(&SchedulerRequest {
        name: "dpm++2m-sde-karras".into(),
        use_karras_sigmas: Some(false),
        ..Default::default()
    })
    .expect_err("contradiction");
    assert!(e.contains("Karras"), "{e}");
    let bh1 = Some(UniPcSolverType::Bh1);
    let bh2 = Some(UniPcSolverType::Bh2);
    let unipc: &[(&[&str], SchedulerKind, Option<bool>, &str)] = &[
        (
            &["unipc", "UniPC", "UniPCMultistep", "UniPCMultistepScheduler"],
            SchedulerKind::UniPc(None),
            None,
            "UniPCMultistepScheduler",
        ),
        (
            &["unipc-karras", "unipc_karras", "UniPCMultistepScheduler (karras)"],
            SchedulerKind::UniPc(None),
            Some(true),
            "UniPCMultistepScheduler (karras)",
        ),
        (
            &["unipc-bh1", "UNIPC_BH1", "UniPCMultistepScheduler (bh1)"],
            SchedulerKind::UniPc(bh1),
            None,
            "UniPCMultistepScheduler (bh1)",
        ),
        (
            &["unipc-bh2", "unipc_bh2", "UniPCMultistepScheduler (bh2)"],
            SchedulerKind::UniPc(bh2),
            None,
            "UniPCMultistepScheduler (bh2)",
        ),
        (
            &["unipc-bh1-karras", "unipc_bh1_karras", "UniPCMultistepScheduler (bh1, karras)"],
            SchedulerKind::UniPc(bh1),
            Some(true),
            "UniPCMultistepScheduler (bh1, karras)",
        ),
        (
            &["unipc-bh2-karras", "UniPCMultistepScheduler (bh2, karras)"],
            SchedulerKind::UniPc(bh2),
            Some(true),
            "UniPCMultistepScheduler (bh2, karras)",
        ),
    ];
    for (names, kind, karras, canonical) in unipc {
        for name in *names {
            let r = resolve(&req(name)).unwrap_or_else(|e| panic!("{name:?}: {e}"));
            assert_eq!((r.kind, r.use_karras_sigmas), (*kind, *karras), "{name:?}");
            assert_eq!(r.canonical_name(), *canonical, "{name:?}");
            assert_eq!(resolve(&req(&r.canonical_name())).expect("canonical"), r);
            assert!(ACCEPTED_NAMES.contains(canonical), "{canonical} not listed");
        }
    }
    let r =
        resolve(&SchedulerRequest { name: "unipc-bh1".into(), use_karras_sigmas: Some(true), ..Default::default() })
            .expect("karras option");
    assert_eq!(resolve(&req(&r.canonical_name())).expect("canonical"), r);
    for bad in ["unipc-bh3", "unipc bh1", "unipc-karras-bh1", "unipc3"] {
        assert!(resolve(&req(bad)).expect_err(bad).contains("unknown scheduler"), "{bad}");
    }
    for (names, karras, canonical) in [
        (&["deis", "DEIS", "DEISMultistep", "DEISMultistepScheduler"][..], None, "DEISMultistepScheduler"),
        (
            &["deis-karras", "deis_karras", "DEISMultistepScheduler (karras)"][..],
            Some(true),
            "DEISMultistepScheduler (karras)",
        ),
    ] {
        for name in names {
            let r = resolve(&req(name)).unwrap_or_else(|e| panic!("{name:?}: {e}"));
            assert_eq!((r.kind, r.use_karras_sigmas), (SchedulerKind::Deis, karras), "{name:?}");
            assert_eq!(r.canonical_name(), canonical, "{name:?}");
            assert_eq!(resolve(&req(&r.canonical_name())).expect("canonical"), r);
            assert!(ACCEPTED_NAMES.contains(canonical), "{canonical} not listed");
        }
    }
    for (names, karras, canonical) in [
        (
            &[
                "dpm++2s",
                "dpmpp_2s",
                "DPM++_2S",
                "dpmsolver_singlestep",
                "DPMSolverSinglestep",
                "DPMSolverSinglestepScheduler",
            ][..],
            None,
            "DPMSolverSinglestepScheduler",
        ),
        (
            &["dpm++2s-karras", "dpmpp_2s_karras", "DPMSolverSinglestepScheduler (karras)"][..],
            Some(true),
            "DPMSolverSinglestepScheduler (karras)",
        ),
    ] {
        for name in names {
            let r = resolve(&req(name)).unwrap_or_else(|e| panic!("{name:?}: {e}"));
            assert_eq!((r.kind, r.use_karras_sigmas), (SchedulerKind::DpmSolverSinglestep, karras), "{name:?}");
            assert_eq!(r.canonical_name(), canonical, "{name:?}");
            assert_eq!(resolve(&req(&r.canonical_name())).expect("canonical"), r);
            assert!(ACCEPTED_NAMES.contains(canonical), "{canonical} not listed");
        }
    }
    // The plain DPM-Solver++ names still mean the ODE solver.
    assert_eq!(resolve(&req("dpm++2m")).unwrap().kind, SchedulerKind::DpmSolverMultistep);
}

#[test]
fn algorithm_type_from_config_and_name() {
    let base = model_config("sd21-base-tiny");
    // A config saying sde-dpmsolver++ loads; the request's name picks the algorithm.
    let sde_cfg = base.with("algorithm_type", json!("sde-dpmsolver++")).expect("config");
    assert!(sde_cfg.dpm_solver().expect("dpm").sde);
    assert!(!base.dpm_solver().expect("dpm").sde);
    let mut s = build(&sde_cfg, &resolved(SchedulerKind::DpmSolverMultistep), 3).expect("ode");
    let x = Tensor::ones((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut none = RecordedNoise::new(Vec::new());
    s.step(&x, 0, &x, &mut none).expect("the ODE solver draws no noise");
    let mut s = build(&base, &resolved(SchedulerKind::DpmSolverSde), 3).expect("sde");
    assert!(s.step(&x, 0, &x, &mut RecordedNoise::new(Vec::new())).is_err(), "the SDE solver draws noise");
    for bad in ["dpmsolver", "sde-dpmsolver", "nope"] {
        let cfg = base.with("algorithm_type", json!(bad)).expect("config");
        let e = match build(&cfg, &resolved(SchedulerKind::DpmSolverSde), 5) {
            Ok(_) => panic!("{bad} should fail"),
            Err(e) => e,
        };
        assert!(e.contains("algorithm_type") && e.contains("sde-dpmsolver++"), "{bad}: {e}");
    }
}

#[test]
fn unipc_solver_type_and_unsupported_values() {
    let base = model_config("sd21-base-tiny");
    let x = Tensor::arange(0f32, 16.0, &Device::Cpu).unwrap().reshape((1, 4, 2, 2)).unwrap();
    let eps = (x.ones_like().unwrap() * 0.25).unwrap();
    let run = |cfg: &SchedulerConfig, kind: SchedulerKind| {
        let mut s = build(cfg, &resolved(kind), 4).expect("unipc");
        let mut cur = x.clone();
        for i in 0..s.timesteps().len() {
            cur = s.step(&eps, i, &cur, &mut RecordedNoise::new(Vec::new())).expect("step");
        }
        cur.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    // The name's solver type overrides the config's; "unipc" keeps the config's.
    let bh1_cfg = base.with("solver_type", json!("bh1")).expect("config");
    let by_name = run(&base, SchedulerKind::UniPc(Some(UniPcSolverType::Bh1)));
    assert_eq!(by_name, run(&bh1_cfg, SchedulerKind::UniPc(None)));
    assert_ne!(by_name, run(&base, SchedulerKind::UniPc(None)));
    assert_eq!(run(&bh1_cfg, SchedulerKind::UniPc(Some(UniPcSolverType::Bh2))), run(&base, SchedulerKind::UniPc(None)));
    // bh1 into the zero final sigma: diffusers 0.42.1 returns NaN (B_h = -inf times 0); here
    // the last step gives the data prediction, finite.
    assert!(by_name.iter().all(|v| v.is_finite()), "{by_name:?}");
    // DPM-Solver's solver types are read as bh2, as diffusers does.
    let midpoint = base.with("solver_type", json!("midpoint")).expect("config");
    assert_eq!(run(&midpoint, SchedulerKind::UniPc(None)), run(&base, SchedulerKind::UniPc(None)));
    for (key, value, hint) in [
        ("solver_order", json!(3), "supported: 1, 2"),
        ("predict_x0", json!(false), "predict_x0"),
        ("solver_type", json!("bh3"), "\"bh1\", \"bh2\""),
        ("solver_p", json!({"_class_name": "DDIMScheduler"}), "solver_p"),
        ("use_exponential_sigmas", json!(true), "use_karras_sigmas"),
        ("use_flow_sigmas", json!(true), "use_karras_sigmas"),
        ("sigma_min", json!(0.1), "sigma_min"),
        ("disable_corrector", json!("all"), "a list of integers"),
        ("final_sigmas_type", json!("denoise_to_zero"), "\"zero\", \"sigma_min\""),
    ] {
        let cfg = base.with(key, value.clone()).expect("config");
        let e = match build(&cfg, &resolved(SchedulerKind::UniPc(None)), 5) {
            Ok(_) => panic!("{key}={value} should fail"),
            Err(e) => e,
        };
        assert!(e.contains("UniPCMultistepScheduler") && e.contains(hint), "{key}={value}: {e}");
    }
    // Keys of other classes are ignored (the checkpoint's PNDM config has skip_prk_steps).
    assert!(
        build(&base.with("lambda_min_clipped", json!(-5.1)).unwrap(), &resolved(SchedulerKind::UniPc(None)), 5).is_ok()
    );
}

#[test]
fn deis_config_values() {
    let base = model_config("sd21-base-tiny");
    let deis = resolved(SchedulerKind::Deis);
    // The last sigma is the smallest training sigma, never 0.
    let s = build(&base, &deis, 4).expect("deis");
    let sigmas = s.sigmas().expect("sigmas");
    assert_eq!(sigmas.len(), 5);
    assert!(sigmas[4] > 0.0 && sigmas[4] < 0.1, "{sigmas:?}");
    // DPM-Solver / UniPC names for algorithm_type and solver_type are read as deis / logrho.
    for (k, v) in
        [("algorithm_type", json!("dpmsolver++")), ("solver_type", json!("bh2")), ("solver_type", json!("midpoint"))]
    {
        assert!(build(&base.with(k, v.clone()).unwrap(), &deis, 4).is_ok(), "{k}={v}");
    }
    for (key, value, hint) in [
        ("solver_order", json!(3), "supported: 1, 2"),
        ("algorithm_type", json!("sde-dpmsolver++"), "\"deis\""),
        ("solver_type", json!("rk4"), "\"logrho\""),
        ("use_beta_sigmas", json!(true), "use_karras_sigmas"),
    ] {
        let cfg = base.with(key, value.clone()).expect("config");
        let e = match build(&cfg, &deis, 5) {
            Ok(_) => panic!("{key}={value} should fail"),
            Err(e) => e,
        };
        assert!(e.contains("DEISMultistepScheduler") && e.contains(hint), "{key}={value}: {e}");
    }
}

#[test]
fn dpm_singlestep_orders_and_config_values() {
    use sdmesh_orchestrator::scheduler::dpm_singlestep::order_list;
    // diffusers' get_order_list after set_timesteps forced lower_order_final on.
    assert_eq!(order_list(8, 2, false, true), [1, 2, 1, 2, 1, 2, 1, 1]);
    assert_eq!(order_list(7, 2, false, true), [1, 2, 1, 2, 1, 2, 1]);
    assert_eq!(order_list(8, 2, false, false), [1, 2, 1, 2, 1, 2, 1, 2]);
    assert_eq!(order_list(7, 2, false, false), [1, 2, 1, 2, 1, 2, 1]);
    assert_eq!(order_list(2, 2, false, true), [1, 1]);
    assert_eq!(order_list(1, 2, false, true), [1]);
    assert_eq!(order_list(3, 1, false, true), [1, 1, 1]);
    let base = model_config("sd21-base-tiny");
    let single = resolved(SchedulerKind::DpmSolverSinglestep);
    // No timestep_spacing / steps_offset in this class: always linspace.
    let a = build(&base, &single, 10).expect("single");
    let b = build(&base.with("timestep_spacing", json!("leading")).unwrap(), &single, 10).expect("single");
    assert_eq!(a.timesteps(), b.timesteps());
    assert_eq!(a.timesteps()[0], 999.0);
    for (key, value, hint) in [
        ("solver_order", json!(3), "supported: 1, 2"),
        ("algorithm_type", json!("sde-dpmsolver++"), "\"dpmsolver++\""),
        ("algorithm_type", json!("dpmsolver"), "\"dpmsolver++\""),
        ("solver_type", json!("rk4"), "\"midpoint\", \"heun\""),
        ("use_exponential_sigmas", json!(true), "use_karras_sigmas"),
        ("variance_type", json!("learned"), "variance_type"),
    ] {
        let cfg = base.with(key, value.clone()).expect("config");
        let e = match build(&cfg, &single, 6) {
            Ok(_) => panic!("{key}={value} should fail"),
            Err(e) => e,
        };
        assert!(e.contains("DPMSolverSinglestepScheduler") && e.contains(hint), "{key}={value}: {e}");
    }
}
