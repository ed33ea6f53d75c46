//! Choosing where tensors live and how many CPU threads libtorch uses.
use tch::Device;

use crate::error::{Error, Result};

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`; `auto` picks the first GPU when one is usable.
pub fn parse_device(spec: &str) -> Result<Device> {
    let device = match spec {
        "auto" => Device::cuda_if_available(),
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
        let count = tch::Cuda::device_count() as usize;
        if n >= count {
            return Err(Error::Usage(format!(
                "device '{spec}' requested but libtorch sees {count} CUDA device(s){}",
                if count == 0 {
                    " (CPU-only libtorch, or no GPU/driver)"
                } else {
                    ""
                }
            )));
        }
    }
    Ok(device)
}

/// Sets libtorch's intra-op thread count; 0 keeps libtorch's default (one per core).
pub fn set_threads(threads: usize) -> Result<()> {
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
pub fn inference_streams(
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
pub const MAX_THREADS: usize = 1024;

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
    fn parses_device_names() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("'tpu'"), "{err}");
        if tch::Cuda::device_count() == 0 {
            assert!(parse_device("cuda:0").is_err());
        }
    }
}
