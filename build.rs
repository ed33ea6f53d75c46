//! Compiles `proto/multipos.proto` (and TensorBoard's event records, `proto/tensorboard.proto`)
//! with the pure-Rust `protox` (no system `protoc`), compiles the
//! C++ shim against libtorch (what `tch` does not bind: `src/shim/`), and makes the binaries and
//! tests find libtorch at run time without the user exporting any variable.
use std::env;
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/multipos.proto");
    println!("cargo:rerun-if-changed=proto/tensorboard.proto");
    let fds = protox::compile(
        ["proto/multipos.proto", "proto/tensorboard.proto"],
        ["proto"],
    )?;
    // Raw tensor and file bytes as `Bytes`: chunks are sliced, not copied.
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;

    // torch-sys announces its lib dir only to crates that depend on it directly (`links = "tch"`).
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = env::var("DEP_TCH_LIBTORCH_LIB")
        .map_err(|_| "torch-sys did not announce libtorch's lib directory")?;
    shim(Path::new(&lib))?;
    versions(Path::new(&lib));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // tch's own link arguments do not reach dependent crates; without an explicit, non-dropped
    // -ltorch a CUDA libtorch links without libtorch_cuda and silently runs on CPU only.
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-L{lib}");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
    Ok(())
}

/// The versions a saved model's card and `config_sentence_transformers.json` record: libtorch's
/// (the wheel's `torch/version.py`, or the archive's `build-version`) and the tokenizers crate's.
fn versions(lib: &Path) {
    let root = lib.parent().unwrap_or(lib);
    let from_wheel = std::fs::read_to_string(root.join("version.py"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("__version__ = "))
                .map(|v| v.trim().trim_matches(['\'', '"']).to_string())
        });
    let from_archive = std::fs::read_to_string(root.join("build-version"))
        .ok()
        .map(|v| v.trim().to_string());
    let torch = from_wheel
        .or(from_archive)
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=MULTIPOS_LIBTORCH_VERSION={torch}");
    println!("cargo:rerun-if-changed=Cargo.lock");
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
    let tokenizers = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"tokenizers\"\n"))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = ")))
        .map_or("unknown".to_string(), |v| v.trim_matches('"').to_string());
    println!("cargo:rustc-env=MULTIPOS_TOKENIZERS_VERSION={tokenizers}");
}

/// Compiles `src/shim/*.cpp` against the headers of the libtorch in `lib` (its `include/` beside
/// it, in the layout of the PyTorch wheel and of the libtorch archive), as torch-sys compiles its
/// own wrapper: C++17, the C++11 ABI unless `LIBTORCH_CXX11_ABI` says otherwise. The wheel lacks
/// gloo's headers; `src/shim/gloo_names/` declares the names c10d's Gloo header needs.
fn shim(lib: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = lib
        .parent()
        .ok_or("libtorch's lib directory has no parent")?;
    let include = root.join("include");
    println!("cargo:rerun-if-changed=src/shim");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let abi = env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .file("src/shim/fused_adamw.cpp")
        .file("src/shim/c10d.cpp")
        .include(&include)
        .include("src/shim/gloo_names")
        .include(include.join("torch/csrc/api/include"))
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .try_compile("multipos_shim")?;
    Ok(())
}
