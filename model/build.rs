//! Compiles `src/kernels/cuda/*.cu` to PTX with nvcc when the `cuda` feature is on (the PTX is
//! embedded with `include_str!` by `src/kernels/cuda.rs`). Without the feature this does nothing,
//! so CPU builds and CI need no CUDA toolchain.
//!
//! Target: `sm_90` by default (H100/H200); `VJEPA_CUDA_ARCH` (e.g. `sm_80`) overrides it. Use an
//! nvcc no newer than the driver's CUDA version: the driver JIT-compiles the PTX at load time and
//! refuses a newer PTX ISA (nvcc 13.0 → ISA 9.0, loads on driver 580).

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: [&str; 4] = ["attention", "norm", "elementwise", "optim"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=VJEPA_CUDA_ARCH");
    let src_dir = Path::new("src/kernels/cuda");
    println!(
        "cargo:rerun-if-changed={}",
        src_dir.join("common.cuh").display()
    );
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = nvcc_path();
    let arch = std::env::var("VJEPA_CUDA_ARCH").unwrap_or_else(|_| "sm_90".to_string());
    // The four modules are independent: compile them in parallel (attention.cu dominates).
    let jobs: Vec<_> = SOURCES
        .iter()
        .map(|name| {
            let src = src_dir.join(format!("{name}.cu"));
            println!("cargo:rerun-if-changed={}", src.display());
            let out = out_dir.join(format!("{name}.ptx"));
            let child = Command::new(&nvcc)
                .args(["-ptx", "-O3", "-std=c++17"])
                .arg(format!("-arch={arch}"))
                .arg("-I")
                .arg(src_dir)
                .arg(&src)
                .arg("-o")
                .arg(&out)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run {}: {e} (is the CUDA toolchain on PATH?)",
                        nvcc.display()
                    )
                });
            (src, child)
        })
        .collect();
    for (src, child) in jobs {
        let out = child.wait_with_output().expect("nvcc did not run");
        if !out.status.success() {
            panic!("nvcc failed on {} ({})", src.display(), out.status);
        }
    }
}

/// `$NVCC`, else `$CUDA_HOME/bin/nvcc` when it exists, else `nvcc` from `PATH`.
fn nvcc_path() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let p = Path::new(&home).join("bin").join("nvcc");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("nvcc")
}
