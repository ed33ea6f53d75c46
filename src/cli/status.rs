//! `multipos status`: how a running cluster goes, for people (text) and tools (`--json`).
use std::time::Duration;

use serde_json::{Value, json};

use super::cluster::ConnectArgs;
use crate::cluster::status::StatusClient;
use crate::pb::StatusResponse;
use crate::progress::format_duration;

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// How long to keep trying to reach the coordinator, in seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout_s: u64,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let address = args.connect.address()?;
    let token = args.connect.token()?;
    let tls = args.connect.tls()?;
    let timeout = Duration::from_secs(args.timeout_s);
    let status = super::cluster::runtime()?.block_on(async {
        let mut client = StatusClient::connect(&address, &token, tls.as_ref(), timeout).await?;
        client.get().await
    })?;
    if args.json {
        println!("{}", to_json(&status));
    } else {
        print!("{}", to_text(&status));
    }
    Ok(())
}

/// A number that is unknown when negative or not finite.
fn known(x: f64) -> Option<f64> {
    (x.is_finite() && x >= 0.0).then_some(x)
}

fn to_json(s: &StatusResponse) -> Value {
    json!({
        "phase": s.phase,
        "generation": s.generation,
        "step": s.step,
        "total_steps": s.total_steps,
        "workers_wanted": s.workers_wanted,
        "waiting": s.waiting,
        "loss": s.loss.is_finite().then_some(s.loss),
        "steps_per_s": s.steps_per_s,
        "pairs_per_s": s.pairs_per_s,
        "elapsed_s": s.elapsed_s,
        "eta_s": known(s.eta_s),
        "checkpoint_step": s.checkpoint_step,
        "checkpoint_age_s": known(s.checkpoint_age_s),
        "aborted": (!s.aborted.is_empty()).then_some(&s.aborted),
        "members": s.members.iter().map(|m| json!({
            "rank": m.rank,
            "member": m.member,
            "worker_id": m.worker_id,
            "peer_address": m.peer_address,
            "state_step": m.state_step,
            "seconds_since_heard": m.seconds_since_heard,
        })).collect::<Vec<_>>(),
    })
}

fn to_text(s: &StatusResponse) -> String {
    let secs =
        |x: f64| known(x).map_or("?".into(), |x| format_duration(Duration::from_secs_f64(x)));
    let percent = 100.0 * s.step as f64 / (s.total_steps.max(1)) as f64;
    let mut out = format!(
        "run: {}  generation {}  step {}/{} ({percent:.1}%)\n",
        s.phase, s.generation, s.step, s.total_steps
    );
    if !s.aborted.is_empty() {
        out += &format!("aborted: {}\n", s.aborted);
    }
    let loss = if s.loss.is_finite() {
        format!("{:.4}", s.loss)
    } else {
        "-".into()
    };
    out += &format!(
        "loss {loss}  {:.2} steps/s  {:.1} pairs/s  elapsed {}  ETA {}\n",
        s.steps_per_s,
        s.pairs_per_s,
        secs(s.elapsed_s),
        secs(s.eta_s)
    );
    out += &match known(s.checkpoint_age_s) {
        Some(age) => format!(
            "checkpoint: step {}, {} ago\n",
            s.checkpoint_step,
            secs(age)
        ),
        None => "checkpoint: none yet\n".into(),
    };
    out += &format!(
        "workers: {} of {} in the ring, {} waiting\n",
        s.members.len(),
        s.workers_wanted,
        s.waiting
    );
    for m in &s.members {
        out += &format!(
            "  rank {}  member {}  {}  peer {}  heard {:.1}s ago\n",
            m.rank, m.member, m.worker_id, m.peer_address, m.seconds_since_heard
        );
    }
    out
}
