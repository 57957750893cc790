//! Compiles `src/kernels/cuda/*.cu` to PTX with nvcc when the `cuda` feature is on (the PTX is
//! embedded with `include_str!` by `src/kernels/cuda.rs`). Without the feature this does nothing,
//! so CPU builds and CI need no CUDA toolchain.
//!
//! Target: `sm_90` by default (H100/H200); `VJEPA_CUDA_ARCH` (e.g. `sm_80`) overrides it. Use an
//! nvcc no newer than the driver's CUDA version: the driver JIT-compiles the PTX at load time and
//! refuses a newer PTX ISA (nvcc 13.0 → ISA 9.0, loads on driver 580).
//!
//! With the `cudnn` feature it also compiles `src/kernels/cudnn/sdpa.cpp` (cuDNN fused attention
//! through the header-only cuDNN frontend) into a static library. Headers only: libcudnn is
//! opened at run time, so nothing links against it. `ops/cudnn-headers.sh` fetches the headers
//! and prints the two variables this reads, `CUDNN_INCLUDE` (cudnn.h) and
//! `CUDNN_FRONTEND_INCLUDE` (cudnn_frontend.h).

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
    let cudnn = (std::env::var_os("CARGO_FEATURE_CUDNN").is_some())
        .then(|| compile_cudnn_shim(&out_dir).unwrap_or_else(|e| panic!("{e}")));
    for (src, child) in jobs {
        let out = child.wait_with_output().expect("nvcc did not run");
        if !out.status.success() {
            panic!("nvcc failed on {} ({})", src.display(), out.status);
        }
    }
    if let Some(lib) = cudnn {
        println!("cargo:rustc-link-search=native={}", out_dir.display());
        println!("cargo:rustc-link-lib=static={lib}");
        println!("cargo:rustc-link-lib=dylib=stdc++");
        println!("cargo:rustc-link-lib=dylib=dl");
    }
}

/// Compiles the cuDNN SDPA shim into `OUT_DIR/lib<name>.a` and returns `<name>`.
fn compile_cudnn_shim(out_dir: &Path) -> Result<&'static str, String> {
    const LIB: &str = "vjepa_cudnn_sdpa";
    for var in ["CUDNN_INCLUDE", "CUDNN_FRONTEND_INCLUDE", "CXX"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let src = Path::new("src/kernels/cudnn/sdpa.cpp");
    println!("cargo:rerun-if-changed={}", src.display());
    let include = |var: &str, header: &str| -> Result<PathBuf, String> {
        let dir = std::env::var_os(var).map(PathBuf::from).ok_or_else(|| {
            format!(
                "the cudnn feature needs {var} (the folder holding {header}); \
                 `eval \"$(ops/cudnn-headers.sh)\"` fetches the headers and sets it"
            )
        })?;
        if !dir.join(header).is_file() {
            return Err(format!("{var}={} has no {header}", dir.display()));
        }
        Ok(dir)
    };
    let cudnn = include("CUDNN_INCLUDE", "cudnn.h")?;
    let frontend = include("CUDNN_FRONTEND_INCLUDE", "cudnn_frontend.h")?;
    let cuda = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("include"))
        .ok_or("the cudnn feature needs CUDA_HOME (cuda.h, cuda_runtime_api.h)")?;
    let cxx = std::env::var_os("CXX").unwrap_or_else(|| "c++".into());
    let obj = out_dir.join("sdpa.o");
    let status = Command::new(&cxx)
        .args(["-std=c++17", "-O2", "-fPIC", "-c"])
        .arg("-DNV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING")
        .args(["-I".as_ref(), frontend.as_os_str()])
        .args(["-I".as_ref(), cudnn.as_os_str()])
        .args(["-I".as_ref(), cuda.as_os_str()])
        .arg(src)
        .arg("-o")
        .arg(&obj)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", Path::new(&cxx).display()))?;
    if !status.success() {
        return Err(format!(
            "{} failed on {} ({status})",
            Path::new(&cxx).display(),
            src.display()
        ));
    }
    let lib = out_dir.join(format!("lib{LIB}.a"));
    let _ = std::fs::remove_file(&lib);
    let status = Command::new("ar")
        .arg("crs")
        .arg(&lib)
        .arg(&obj)
        .status()
        .map_err(|e| format!("cannot run ar: {e}"))?;
    if !status.success() {
        return Err(format!("ar failed on {} ({status})", obj.display()));
    }
    Ok(LIB)
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
