//! Compiles `proto/multipos.proto` with the pure-Rust `protox` (no system `protoc`), and makes the
//! binaries and tests find libtorch at run time without the user exporting any variable.
use std::env;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/multipos.proto");
    let fds = protox::compile(["proto/multipos.proto"], ["proto"])?;
    // Raw tensor and file bytes as `Bytes`: chunks are sliced, not copied.
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;

    // torch-sys announces its lib dir only to crates that depend on it directly (`links = "tch"`).
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        // tch's own link arguments do not reach dependent crates; without an explicit, non-dropped
        // -ltorch a CUDA libtorch links without libtorch_cuda and silently runs on CPU only.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{lib}");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    Ok(())
}
