//! Choosing where tensors live and how many CPU threads libtorch uses; finding libtorch's CUDA half;
//! moving step inputs to the device without making the host wait.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tch::{Device, Tensor};

use crate::error::{Error, Result};

/// What [`load_cuda`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaLibrary {
    /// `libtorch_cuda.so` was part of the process already (a CUDA build, or a preload).
    Linked,
    /// Loaded at start from beside `libtorch_cpu.so`.
    Loaded(PathBuf),
    /// The libtorch in use has no CUDA half beside it (the lean CPU build).
    Absent(PathBuf),
    /// It is there but did not load (missing CUDA runtime libraries, say).
    Failed(PathBuf, String),
    /// No `libtorch_cpu.so` among the process's mappings (not expected on Linux).
    Unknown,
}

impl std::fmt::Display for CudaLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CudaLibrary::Linked => write!(f, "libtorch_cuda.so is linked in"),
            CudaLibrary::Loaded(p) => write!(f, "loaded {}", p.display()),
            CudaLibrary::Absent(dir) => {
                write!(
                    f,
                    "no libtorch_cuda.so beside libtorch_cpu.so in {} (a CPU libtorch)",
                    dir.display()
                )
            }
            CudaLibrary::Failed(p, why) => write!(f, "{} did not load: {why}", p.display()),
            CudaLibrary::Unknown => {
                write!(f, "libtorch_cpu.so not found among the process's libraries")
            }
        }
    }
}

/// The library whose path is `name` among the mappings of `/proc/self/maps` text `maps`.
fn mapped(maps: &str, name: &str) -> Option<PathBuf> {
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| Path::new(p).file_name().is_some_and(|f| f == name))
        .map(PathBuf::from)
}

/// Makes libtorch's CUDA half part of the process when it sits beside the `libtorch_cpu.so` in use,
/// so one binary, built against the lean CPU libtorch, runs on GPUs wherever the library path leads
/// to a CUDA libtorch. Must run before anything asks libtorch about CUDA (it caches the first
/// answer); every device choice goes through it, once per process.
pub fn load_cuda() -> &'static CudaLibrary {
    static FOUND: OnceLock<CudaLibrary> = OnceLock::new();
    FOUND.get_or_init(|| {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        if mapped(&maps, "libtorch_cuda.so").is_some() {
            return CudaLibrary::Linked;
        }
        let Some(dir) =
            mapped(&maps, "libtorch_cpu.so").and_then(|p| p.parent().map(Path::to_path_buf))
        else {
            return CudaLibrary::Unknown;
        };
        let path = dir.join("libtorch_cuda.so");
        if !path.is_file() {
            return CudaLibrary::Absent(dir);
        }
        let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
            return CudaLibrary::Failed(path, "the path holds a NUL byte".into());
        };
        // SAFETY: dlopen with a NUL-terminated path; the handle is kept for the process's life
        // (libtorch registers its CUDA hooks from the library's static constructors).
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            // SAFETY: dlerror returns a NUL-terminated string owned by the loader, or null.
            let why = unsafe {
                let e = libc::dlerror();
                if e.is_null() {
                    "unknown error".to_string()
                } else {
                    std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
                }
            };
            return CudaLibrary::Failed(path, why);
        }
        CudaLibrary::Loaded(path)
    })
}

/// How many GPUs libtorch sees, its CUDA half loaded first if it can be.
pub(crate) fn cuda_devices() -> usize {
    load_cuda();
    tch::Cuda::device_count().max(0) as usize
}

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`; `auto` picks the first GPU when one is usable and
/// logs which device it chose and why.
pub(crate) fn parse_device(spec: &str) -> Result<Device> {
    let library = load_cuda();
    let device = match spec {
        "auto" => {
            let count = cuda_devices();
            if count > 0 {
                tracing::info!(device = "cuda:0", gpus = count, %library, "device auto: a GPU is usable");
                Device::Cuda(0)
            } else {
                let why = match library {
                    CudaLibrary::Linked | CudaLibrary::Loaded(_) => {
                        format!(
                            "libtorch has CUDA ({library}) but sees no GPU (no device or driver)"
                        )
                    }
                    other => other.to_string(),
                };
                tracing::info!(device = "cpu", reason = %why, "device auto: no GPU");
                Device::Cpu
            }
        }
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::Cuda(n),
            _ => {
                return Err(Error::Usage(format!(
                    "unknown device '{spec}' (expected auto, cpu, cuda or cuda:N)"
                )));
            }
        },
    };
    if let Device::Cuda(n) = device {
        let count = cuda_devices();
        if n >= count {
            return Err(Error::Usage(format!(
                "device '{spec}' requested but libtorch sees {count} CUDA device(s){}",
                if count == 0 {
                    format!(" ({library})")
                } else {
                    String::new()
                }
            )));
        }
    }
    Ok(device)
}

/// `t` on `device`, without making the host wait for the device: a CPU tensor bound for CUDA is
/// pinned and copied asynchronously, in stream order before whatever is queued after it.
pub(crate) fn upload(t: &Tensor, device: Device) -> Tensor {
    match (t.device(), device) {
        (from, to) if from == to => t.shallow_clone(),
        (Device::Cpu, Device::Cuda(_)) => {
            t.internal_pin_memory(device)
                .to_device_(device, t.kind(), true, false)
        }
        (_, to) => t.to_device(to),
    }
}

/// Sets libtorch's intra-op thread count; 0 keeps libtorch's default (one per core).
pub(crate) fn set_threads(threads: usize) -> Result<()> {
    if threads > MAX_THREADS {
        return Err(Error::Usage(format!(
            "--threads {threads} is more than {MAX_THREADS}; this machine has {} cores",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        )));
    }
    if threads > 0 {
        tch::set_num_threads(threads as i32);
    }
    Ok(())
}

/// How many inference streams to run on the CPU (docs/design.md §10): one per
/// libtorch thread, but no more than there are batches, nor than half of `available` memory holds
/// at `per_stream` bytes each — many cores and a large model at full length would otherwise
/// hold one batch's activations per core at once. At least one.
pub(crate) fn inference_streams(
    threads: usize,
    batches: usize,
    per_stream: u64,
    available: Option<u64>,
) -> usize {
    let fit = match available {
        Some(bytes) => usize::try_from(bytes / 2 / per_stream.max(1)).unwrap_or(usize::MAX),
        None => usize::MAX,
    };
    threads.min(batches).min(fit).max(1)
}

/// The most CPU threads a process may ask libtorch for (each is an OS thread with its own stack).
pub(crate) const MAX_THREADS: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inference_streams_follow_threads_batches_and_memory() {
        let gib = 1 << 30;
        assert_eq!(inference_streams(16, 100, gib, Some(64 * gib)), 16);
        assert_eq!(inference_streams(16, 3, gib, Some(64 * gib)), 3);
        // 3 GiB per stream in half of 20 GiB: three streams fit.
        assert_eq!(inference_streams(16, 100, 3 * gib, Some(20 * gib)), 3);
        assert_eq!(inference_streams(16, 100, 3 * gib, Some(gib)), 1);
        assert_eq!(inference_streams(16, 100, 3 * gib, None), 16);
        assert_eq!(inference_streams(4, 0, gib, None), 1);
    }

    #[test]
    fn libraries_are_found_among_the_mappings() {
        let maps = "7f00-7f10 r-xp 00000000 08:01 42  /opt/torch/lib/libtorch_cpu.so\n\
                    7f20-7f30 r--p 00000000 08:01 43  /opt/torch/lib/libc10.so\n\
                    7f40-7f50 rw-p 00000000 00:00 0 \n";
        assert_eq!(
            mapped(maps, "libtorch_cpu.so"),
            Some(PathBuf::from("/opt/torch/lib/libtorch_cpu.so"))
        );
        assert_eq!(mapped(maps, "libtorch_cuda.so"), None);
        assert_eq!(mapped(maps, "libc10"), None);
        // This test process runs on a libtorch whose CPU half is mapped.
        assert_ne!(load_cuda(), &CudaLibrary::Unknown);
    }

    #[test]
    fn parses_device_names() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("'tpu'"), "{err}");
        if cuda_devices() == 0 {
            assert!(parse_device("cuda:0").is_err());
        }
    }
}
