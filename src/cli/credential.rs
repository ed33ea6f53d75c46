//! `multipos credential`.
use std::path::PathBuf;

use super::cluster::ConnectArgs;

#[derive(clap::Args, Debug)]
pub struct CredentialArgs {
    /// Worker names (a host name, or any name of letters, digits, '-', '.', '_'); a worker with the
    /// credential of NAME joins as NAME:PID.
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
    /// File holding the cluster token [default: $MULTIPOS_CLUSTER_TOKEN].
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// Prints `NAME:MAC` per name: give each worker host its own line (as the file its
/// `--credential-file` names) and keep the cluster token on the coordinator's host.
pub fn run(args: CredentialArgs) -> anyhow::Result<()> {
    let token = ConnectArgs::token_from_file(args.token_file)?;
    for name in &args.names {
        let credential = token.credential(name).map_err(anyhow::Error::msg)?;
        println!("{}", credential.expose());
    }
    Ok(())
}
