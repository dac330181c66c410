//! With the `cuda` feature: compiles the flash-attention forward kernels sdmesh uses (head dims
//! 64, 128 and 512, f16 and bf16, non-causal) plus csrc/api.cu into a static library, with
//! nvcc, from the sources `fetch-sources.sh` puts in SDMESH_FLASH_ATTN_SOURCES. Dropout, ALiBi,
//! softcap and local windows are compiled out: SD's attention has none of them, and each one
//! doubles the kernel variants (the whole crate's kernels take over an hour to build on 2 cores
//! and hundreds of MB; these take minutes and well under 1 MB compressed).
//! Without the feature it does nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

const HEAD_DIMS: [usize; 3] = [64, 128, 512];
const DTYPES: [&str; 2] = ["fp16", "bf16"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=csrc/api.cu");
    println!("cargo::rerun-if-env-changed=SDMESH_FLASH_ATTN_SOURCES");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let sources = std::env::var_os("SDMESH_FLASH_ATTN_SOURCES")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../../target/flash-attn-sources"));
    if !sources.join(".complete").exists() {
        panic!(
            "the flash-attention sources are not in {}: run shared/flash-attn/fetch-sources.sh \
             (or point SDMESH_FLASH_ATTN_SOURCES at its output)",
            sources.display()
        );
    }
    let kernels = sources.join("kernels");
    let cutlass = sources.join("cutlass");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let arch = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into()).replace('.', "");

    let mut units: Vec<PathBuf> = vec![manifest.join("csrc/api.cu")];
    for d in HEAD_DIMS {
        for t in DTYPES {
            units.push(kernels.join(format!("flash_fwd_hdim{d}_{t}_sm80.cu")));
        }
    }
    // Two nvcc processes at a time: each takes a core and ~1.5 GB.
    let objects: Vec<PathBuf> = units.iter().map(|u| out.join(u.file_name().unwrap()).with_extension("o")).collect();
    let jobs: Vec<(&PathBuf, &PathBuf)> = units.iter().zip(&objects).collect();
    for pair in jobs.chunks(2) {
        std::thread::scope(|s| {
            for (unit, object) in pair {
                s.spawn(|| compile(unit, object, &kernels, &cutlass, &arch));
            }
        });
    }
    let lib = out.join("libsdmesh_flash_attn.a");
    let status = Command::new("nvcc").arg("--lib").arg("-o").arg(&lib).args(&objects).status().expect("nvcc --lib");
    assert!(status.success(), "nvcc --lib failed");
    println!("cargo::rustc-link-search=native={}", out.display());
    println!("cargo::rustc-link-lib=static=sdmesh_flash_attn");
    println!("cargo::rustc-link-lib=dylib=cudart");
    println!("cargo::rustc-link-lib=dylib=stdc++");
}

fn compile(unit: &Path, object: &Path, kernels: &Path, cutlass: &Path, arch: &str) {
    println!("cargo::rerun-if-changed={}", unit.display());
    let output = Command::new("nvcc")
        .args(["-std=c++17", "-O3", "--use_fast_math", "--expt-relaxed-constexpr", "--expt-extended-lambda"])
        .args(["-Xcompiler", "-fPIC", "-w"])
        .arg(format!("--gpu-architecture=sm_{arch}"))
        .args([
            "-DFLASHATTENTION_DISABLE_DROPOUT",
            "-DFLASHATTENTION_DISABLE_ALIBI",
            "-DFLASHATTENTION_DISABLE_SOFTCAP",
            "-DFLASHATTENTION_DISABLE_LOCAL",
            "-U__CUDA_NO_HALF_OPERATORS__",
            "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_HALF2_OPERATORS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        ])
        .arg(format!("-I{}", kernels.display()))
        .arg(format!("-I{}", cutlass.join("include").display()))
        .arg(format!("-I{}", cutlass.join("tools/util/include").display()))
        .arg("-c")
        .arg(unit)
        .arg("-o")
        .arg(object)
        .output()
        .expect("nvcc not found: source ../shared/cuda/setup-cuda13.sh (see README, GPU)");
    assert!(output.status.success(), "nvcc failed on {}:\n{}", unit.display(), String::from_utf8_lossy(&output.stderr));
}
