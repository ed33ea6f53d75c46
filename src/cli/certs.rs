//! `multipos certs`.
use std::path::PathBuf;

use crate::net::certs::{CA_CERT, CA_KEY, issue};

#[derive(clap::Args, Debug)]
pub struct CertsArgs {
    /// Directory for the CA (`ca.pem`, `ca-key.pem`; re-used when present) and the host files.
    #[arg(long)]
    pub out: PathBuf,
    /// One host's names, comma-separated DNS names or IP addresses, the first naming its files
    /// (`NAME.pem`, `NAME-key.pem`); repeatable. Include every address others dial it by.
    #[arg(long = "host", required = true, value_name = "NAMES")]
    pub hosts: Vec<String>,
    /// Days the certificates stay valid.
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    let issued = issue(&args.out, &args.hosts, args.days)?;
    let ca = args.out.join(CA_CERT);
    if issued.new_ca {
        println!(
            "made a CA: {} (its key {} signs new hosts: keep it off the cluster)",
            ca.display(),
            args.out.join(CA_KEY).display()
        );
    } else {
        println!("signed with the existing CA {}", ca.display());
    }
    for (cert, key) in &issued.hosts {
        println!(
            "cluster.tls = {{ ca = {:?}, cert = {:?}, key = {:?} }}",
            ca.display().to_string(),
            cert.display().to_string(),
            key.display().to_string()
        );
    }
    Ok(())
}
