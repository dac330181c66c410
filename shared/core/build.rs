//! With the `cuda` feature: compiles kernels/*.cu to PTX (nvcc, the toolchain the feature needs
//! anyway for candle's own kernels), which the library embeds and loads on first use.
//! Without it, nothing.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let arch = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into()).replace('.', "");
    // A new kernel adds its name here (kernels/dtypes.cuh is their shared header).
    let kernels = ["group_norm", "geglu"];
    for kernel in kernels {
        let output = std::process::Command::new("nvcc")
            .args(["--ptx", "-O3", "--use_fast_math", "-std=c++17"])
            .arg(format!("-arch=sm_{arch}"))
            .arg(format!("kernels/{kernel}.cu"))
            .arg("-o")
            .arg(out.join(format!("{kernel}.ptx")))
            .output()
            .expect("nvcc not found: source ../shared/cuda/setup-cuda13.sh (README, GPU)");
        assert!(output.status.success(), "nvcc failed on {kernel}.cu:\n{}", String::from_utf8_lossy(&output.stderr));
    }
}
