//! Compiles `kernels/*.cu` with NVRTC for the GPU found, caching the PTX on disk by source hash
//! and architecture, so a worker restart skips the compile and a new GPU or source recompiles.

use std::path::PathBuf;

use cudarc::nvrtc::{CompileOptions, Ptx};

/// The kernel sources, built into the binary so a worker needs no file beside it.
pub(super) const LLAMA_CU: &str = include_str!("../../../kernels/llama.cu");

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("NVRTC could not compile the kernels for sm_{arch}: {log}")]
    Compile { arch: u32, log: String },
}

/// PTX of `source` for compute capability `major.minor`, from the cache when it is there.
pub(super) fn ptx(source: &str, (major, minor): (i32, i32)) -> Result<Ptx, BuildError> {
    let arch = (major * 10 + minor) as u32;
    let options = vec![format!("--gpu-architecture=sm_{arch}"), "-std=c++17".into()];
    let key = fnv1a(
        source.as_bytes(),
        fnv1a(options.join(" ").as_bytes(), FNV_OFFSET),
    );
    let cached = cache_dir().map(|d| d.join(format!("{key:016x}-sm{arch}.ptx")));
    if let Some(text) = cached
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
    {
        tracing::debug!(path = ?cached, "kernels from the PTX cache");
        return Ok(Ptx::from_src(text));
    }
    let started = std::time::Instant::now();
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(
        source,
        CompileOptions {
            options,
            name: Some("llama.cu".into()),
            ..Default::default()
        },
    )
    .map_err(|e| BuildError::Compile {
        arch,
        log: e.to_string(),
    })?;
    tracing::info!(
        arch,
        seconds = started.elapsed().as_secs_f64(),
        "compiled the kernels"
    );
    if let Some(path) = cached {
        // A cache that cannot be written only costs a compile at the next start.
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, ptx.to_src()));
        if let Err(e) = written {
            tracing::warn!(?path, error = %e, "could not cache the compiled kernels");
        }
    }
    Ok(ptx)
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("ILM_KERNEL_CACHE") {
        return Some(dir.into());
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("infinite-llm").join("kernels"))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a: stable across Rust releases, unlike `DefaultHasher`, so the cache survives upgrades.
fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    bytes.iter().fold(seed, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
