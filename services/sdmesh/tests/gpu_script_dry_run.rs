//! The GPU benchmark script (`benchmarks/gpu/run.sh`) end to end on the CPU with the tiny
//! fixtures. A GPU session gets one 10-minute run of it (no session so far has had a GPU), so
//! a stage that breaks must show up here first: every stage of this project's binary must
//! finish with status 0 and leave the measurements it exists for. The diffusers stages are
//! skipped (CI has no PyTorch); `benchmarks/README.md` has the command that runs them too.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Runs the script as the GPU session would, on the CPU, with `env` added; its output folder.
fn run_script(env: &[(&str, &str)]) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let fixtures = root.join("tests/fixtures/models");
    let out = std::env::temp_dir().join(format!("sdmesh-gpu-dry-run-{}-{}", std::process::id(), env.len()));
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new("bash")
        .arg("benchmarks/gpu/run.sh")
        .current_dir(&root)
        .env("OUT", &out)
        .env("GPU_DEVICE", "cpu")
        .env("GPU_BENCH", env!("CARGO_BIN_EXE_sdmesh-bench"))
        .env("GPU_SIZES", "64")
        .env("GPU_BIG", fixtures.join("sd21-tiny"))
        .env("GPU_MEDIUM", fixtures.join("sd21-base-tiny"))
        .env("GPU_DTYPE", "f32")
        .env("GPU_AGREEMENT_DTYPES", "f16")
        .env("GPU_DIFFUSERS", "0")
        .env("PYTHON", "python3")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("bash runs");
    assert!(status.success(), "run.sh exited with {status}");
    out
}

#[test]
fn the_gpu_benchmark_script_runs_every_stage_on_the_cpu() {
    // As the GPU session runs it: under a whole-run deadline (here one that is never reached).
    let out = run_script(&[("GPU_DEADLINE", "3000")]);
    let log = std::fs::read_to_string(out.join("gpu.log")).expect("gpu.log");
    let finished: Vec<&str> = log.lines().filter(|l| l.starts_with("== ") && l.contains(": rc ")).collect();
    for stage in [
        "agreement-64",
        "agreement-job",
        "invariance",
        "components-64",
        "components-64-candle-conv",
        "components-64-candle-ops",
        "profile-64",
        "job-mesh",
        "throughput",
        "batch8",
        "batch32",
    ] {
        let line = finished.iter().find(|l| l.starts_with(&format!("== {stage}: rc ")));
        let line = line.unwrap_or_else(|| panic!("stage {stage} did not run:\n{log}"));
        assert!(line.starts_with(&format!("== {stage}: rc 0 ")), "{line}\n{log}");
    }

    let results = std::fs::read_to_string(out.join("gpu.jsonl")).expect("gpu.jsonl");
    let lines: Vec<serde_json::Value> =
        results.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    let of = |bench: &str| lines.iter().filter(|l| l["bench"] == bench).collect::<Vec<_>>();
    let agreement = of("agreement");
    for component in
        ["attn_self_d64", "conv_vae", "geglu_unet", "groupnorm_vae", "unet_step", "vae_decode", "job_10_steps"]
    {
        assert!(agreement.iter().any(|l| l["component"] == component), "no agreement line for {component}");
    }
    assert!(agreement.iter().all(|l| l["ok"] == true), "an agreement check failed:\n{results}");
    let invariance = of("invariance");
    assert_eq!(invariance.len(), 4, "one invariance line per step");
    assert!(invariance.iter().all(|l| l["same_bits"] == true), "the CPU keeps a step's bits in a batch");
    let components = of("components");
    assert!(components.iter().any(|l| l["component"] == "unet_step" && l["batch"] == 32 && l["guided"] == true));
    assert!(!of("overhead").is_empty() && of("throughput").len() == 4, "job and throughput lines:\n{results}");
    // The tables the reply's output ends with.
    let table = std::fs::read_to_string(out.join("table.md")).expect("table.md");
    assert!(table.contains("## Agreement with the f32 CPU reference"), "{table}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn past_the_deadline_the_script_skips_stages_and_still_ends_with_its_table() {
    let out = run_script(&[("GPU_DEADLINE", "15"), ("GPU_STAGES", "agreement components job")]);
    let log = std::fs::read_to_string(out.join("gpu.log")).expect("gpu.log");
    let stages: Vec<&str> = log.lines().filter(|l| l.starts_with("== ") && !l.starts_with("== agreement:")).collect();
    assert!(stages.len() >= 8, "{log}");
    assert!(stages.iter().all(|l| l.contains(": skipped (")), "a stage ran with under 20 s left:\n{log}");
    assert!(out.join("table.md").exists(), "{log}");
    let _ = std::fs::remove_dir_all(&out);
}
