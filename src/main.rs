use clap::Parser;
use multipos::cli::Cli;
use multipos::logging::{self, LogFormat};

fn main() -> std::process::ExitCode {
    // Before anything asks libtorch about CUDA: it answers once and keeps the answer.
    multipos::device::load_cuda();
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let format = cli.log_format;
    match multipos::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            match format {
                LogFormat::Json => tracing::error!(error = format!("{err:#}"), "failed"),
                LogFormat::Text => eprintln!("error: {err:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}
