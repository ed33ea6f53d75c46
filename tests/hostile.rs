//! A hostile peer holding the cluster token attacks a running 2-worker run over every coordinator
//! RPC: it speaks for ranks it does not hold (forged commits with a NaN loss, steps, validation
//! pages, heartbeats that would keep a dead member alive), uploads a forged checkpoint and model,
//! fetches the run's state, and sends oversized and truncated messages. Each attack is refused with
//! a clear status and logged, and the run under attack ends bit-identical to an undisturbed one.
//! Forged ring traffic between workers is refused in `tests/collective.rs`.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use bytes::{Buf, BufMut};
use multipos::auth::{MEMBER_HEADER, Token};
use multipos::model::tiny::TinySpec;
use multipos::pb::coordinator_client::CoordinatorClient;
use multipos::pb::*;
use prost::Message;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

const TOKEN: &str = "hostile-test-token";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_multipos"))
}

fn sets(model: &Path, out: &Path) -> Vec<String> {
    vec![
        format!("model.path=\"{}\"", model.display()),
        format!("output.dir=\"{}\"", out.display()),
        format!(
            "data.train=\"{}\"",
            repo("deploy/data/bible_paraphrase_tiny/train.jsonl").display()
        ),
        "train.max_steps=40".into(),
        "train.batch_size=6".into(),
        "output.checkpoint_every_steps=5".into(),
    ]
}

fn command(cmd: &str, model: &Path, out: &Path) -> Command {
    let mut c = Command::new(bin());
    c.arg(cmd)
        .arg("--config")
        .arg(repo("configs/local-2workers.toml"))
        .env("MULTIPOS_CLUSTER_TOKEN", TOKEN)
        .env("RUST_LOG", "warn");
    for s in sets(model, out) {
        c.arg("--set").arg(s);
    }
    c
}

/// Bytes as they are: a message cut short, or anything else a well-behaved client never sends.
#[derive(Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Self::Error> {
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

type Client = CoordinatorClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        multipos::auth::Attach,
    >,
>;

/// A request claiming membership `claim` ("ID:KEY"), when given.
fn claimed<T>(msg: T, claim: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(c) = claim {
        r.metadata_mut().insert(MEMBER_HEADER, c.parse().unwrap());
    }
    r
}

/// One round of every attack; returns (attack, status code) for each, panicking on any success
/// that would have changed the run.
async fn attack(
    client: &Client,
    channel: tonic::transport::Channel,
    forged: &Path,
    step: u64,
) -> Vec<(String, Code)> {
    let mut seen = Vec::new();
    let mut c = client.clone();
    // What the attacker can learn: the live generation (heartbeats answer anyone with the token).
    let generation = c
        .heartbeat(HeartbeatRequest { member: u64::MAX })
        .await
        .map(|r| r.into_inner().generation)
        .unwrap_or(1);
    for member in 0..4u64 {
        for claim in [None, Some(format!("{member}:guessed-ring-key"))] {
            let claim = claim.as_deref();
            let label = |what: &str| format!("{what} (claim {})", claim.unwrap_or("none"));
            let hb = c
                .heartbeat(claimed(HeartbeatRequest { member }, claim))
                .await;
            match hb {
                Ok(r) => assert!(
                    r.into_inner().rejoin,
                    "a forged heartbeat kept member {member} alive"
                ),
                Err(s) => seen.push((label("heartbeat for another member"), s.code())),
            }
            for rank in 0..2u32 {
                {
                    let commit = CommitRequest {
                        rank,
                        step,
                        loss: f64::NAN,
                        grad_norm: f64::NAN,
                        generation,
                        ..Default::default()
                    };
                    match c.commit(claimed(commit, claim)).await {
                        Ok(r) => assert!(!r.into_inner().apply, "a forged commit was applied"),
                        Err(s) => {
                            seen.push((label("commit with a NaN loss for another rank"), s.code()))
                        }
                    }
                }
                let next = NextStepRequest {
                    rank,
                    step,
                    generation,
                };
                if let Err(s) = c.next_step(claimed(next, claim)).await {
                    seen.push((label("next step for another rank"), s.code()));
                }
                let page = EvalReport {
                    generation,
                    rank,
                    step,
                    offset: 0,
                    count: 1,
                    dim: 1,
                    embeddings: 1f32.to_le_bytes().to_vec().into(),
                    mine: false,
                };
                if let Err(s) = c.report_eval(claimed(page, claim)).await {
                    seen.push((label("validation page for another rank"), s.code()));
                }
            }
            let chunks = multipos::cluster::files::upload_stream(forged).unwrap();
            match c.upload_checkpoint(claimed(chunks, claim)).await {
                Ok(_) => panic!("a forged checkpoint was accepted"),
                Err(s) => seen.push((label("upload a forged checkpoint"), s.code())),
            }
            let chunks = multipos::cluster::files::upload_stream(&forged.join("model")).unwrap();
            match c.upload_model(claimed(chunks, claim)).await {
                Ok(_) => panic!("a forged model was accepted"),
                Err(s) => seen.push((label("upload a forged final model"), s.code())),
            }
            match c.fetch_model(claimed(FetchModelRequest {}, claim)).await {
                Ok(_) => panic!("the model was served to a non-member"),
                Err(s) => seen.push((label("fetch the model"), s.code())),
            }
            let fetch = FetchCheckpointRequest { step: 5 };
            match c.fetch_checkpoint(claimed(fetch, claim)).await {
                Ok(_) => panic!("a checkpoint was served to a non-member"),
                Err(s) => seen.push((label("fetch a checkpoint"), s.code())),
            }
        }
    }
    // Oversized: a validation page of 9 MiB, over the 8 MiB the coordinator decodes.
    let huge = EvalReport {
        generation,
        embeddings: vec![0u8; 9 << 20].into(),
        ..Default::default()
    };
    match c.report_eval(huge).await {
        Ok(_) => panic!("an oversized message was taken"),
        Err(s) => seen.push(("an oversized message (9 MiB)".into(), s.code())),
    }
    // Truncated: a commit whose last field is cut in the middle.
    let mut bytes = CommitRequest {
        rank: 1,
        step: 3,
        loss: f64::NAN,
        generation,
        ..Default::default()
    }
    .encode_to_vec();
    bytes.truncate(bytes.len() - 3);
    let mut raw = tonic::client::Grpc::new(channel);
    raw.ready().await.unwrap();
    let mut request = tonic::Request::new(bytes);
    let token = format!("Bearer {TOKEN}");
    request
        .metadata_mut()
        .insert("authorization", token.parse().unwrap());
    let path = "/multipos.Coordinator/Commit".parse().unwrap();
    match raw.unary::<_, Vec<u8>, _>(request, path, RawCodec).await {
        Ok(_) => panic!("a truncated message was taken"),
        Err(s) => seen.push(("a truncated message".into(), s.code())),
    }
    seen
}

#[test]
fn every_attack_of_a_token_holder_is_refused_and_the_run_ends_as_if_none_happened() {
    let (dir, model) = common::tiny_model(&TinySpec {
        dropout: 0.1,
        ..TinySpec::default()
    });
    let clean = dir.path().join("clean");
    let o = command("launch", &model, &clean).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The attacker holds a real checkpoint of this run, edited to claim step 1000.
    let (newest, _) = multipos::train::checkpoint::latest_valid(&clean.join("checkpoints"))
        .unwrap()
        .unwrap();
    let forged = dir.path().join("forged");
    common::copy_dir(&newest, &forged);
    let state = multipos::train::checkpoint::verify(&forged).unwrap();
    multipos::train::checkpoint::annotate(&forged, state, |s| s.step = 1000, &[]).unwrap();

    let hit = dir.path().join("attacked");
    let log = dir.path().join("coordinator.log");
    let mut coordinator = command("coordinator", &model, &hit)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let addr = common::announced_address(&mut coordinator);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let channel = rt.block_on(async {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap()
    });
    let client =
        CoordinatorClient::with_interceptor(channel.clone(), Token::new(TOKEN).unwrap().attach());
    // Before any ring: every attack is refused already.
    let before = rt.block_on(attack(&client, channel.clone(), &forged, 0));
    let workers: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(bin())
                .args([
                    "worker",
                    "--coordinator",
                    &addr,
                    "--device",
                    "cpu",
                    "--threads",
                    "1",
                ])
                .args(["--rank", &rank.to_string(), "--model"])
                .arg(&model)
                .env("MULTIPOS_CLUSTER_TOKEN", TOKEN)
                .env("RUST_LOG", "warn")
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // While the run goes on, attack round after round.
    let mut during = Vec::new();
    let rounds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while coordinator.try_wait().unwrap().is_none() {
        let steps = if hit.join("metrics.jsonl").exists() {
            common::step_losses(&hit.join("metrics.jsonl")).len()
        } else {
            0
        };
        let round = rt.block_on(attack(&client, channel.clone(), &forged, steps as u64));
        if (1..40).contains(&steps) {
            during.extend(round);
            rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    for w in workers {
        let o = w.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(
        coordinator.wait().unwrap().success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(
        rounds.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no attack landed while the ring was live"
    );
    let mut table = std::collections::BTreeMap::<String, std::collections::BTreeSet<String>>::new();
    for (what, code) in before.iter().chain(&during) {
        assert!(
            matches!(
                code,
                Code::PermissionDenied
                    | Code::OutOfRange
                    | Code::ResourceExhausted
                    | Code::Internal
                    | Code::InvalidArgument
            ),
            "{what}: {code:?}"
        );
        table
            .entry(what.clone())
            .or_default()
            .insert(format!("{code:?}"));
    }
    for (what, codes) in &table {
        println!("{what}: refused with {codes:?}");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("refused a call"),
        "attacks are logged: {text}"
    );
    assert!(
        !hit.join("checkpoints")
            .join(multipos::train::checkpoint::name(1000))
            .exists()
    );
    common::assert_same_run(&clean, &hit, "under attack", &[]);
}

/// A heartbeat from `source` (a loopback address of its own) to `addr` with `token`.
async fn heartbeat_from(source: &str, addr: &str, token: &str) -> Result<(), tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .local_address(Some(source.parse().unwrap()))
        .connect()
        .await
        .unwrap();
    CoordinatorClient::with_interceptor(channel, Token::new(token).unwrap().attach())
        .heartbeat(HeartbeatRequest { member: 0 })
        .await
        .map(drop)
}

#[test]
fn an_address_that_guesses_the_token_too_often_is_refused_and_the_others_are_not() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let mut child = command("coordinator", &model, &dir.path().join("run"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = common::announced_address(&mut child);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let guesser = "127.0.0.2";
        for guess in 0..multipos::auth::MAX_FAILURES {
            let e = heartbeat_from(guesser, &addr, &format!("guess-{guess:011}"))
                .await
                .unwrap_err();
            assert_eq!(e.message(), "wrong cluster token", "guess {guess}");
        }
        // Locked out: even the right token is refused from that address now...
        let e = heartbeat_from(guesser, &addr, TOKEN).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(
            e.message().contains("too many failed token attempts"),
            "{e:?}"
        );
        // ... while the cluster's own addresses are answered.
        heartbeat_from("127.0.0.1", &addr, TOKEN).await.unwrap();
    });
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("too many failed token attempts") && log.contains("127.0.0.2"),
        "{log}"
    );
}
