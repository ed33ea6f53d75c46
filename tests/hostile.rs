//! A hostile peer holding the cluster token attacks a running 2-worker run over every coordinator
//! RPC: it speaks for ranks it does not hold (forged commits with a NaN loss, steps, validation
//! pages, heartbeats that would keep a dead member alive), uploads a forged checkpoint and model,
//! fetches the run's state, and sends oversized and truncated messages. It also storms the
//! coordinator with wrong tokens from the workers' own address, joins under a live member's id
//! with another worker's credential (and with the bare token), and calls the workers' peer servers
//! (state fetches and ring streams) without their generation's keys. Each attack is refused with a
//! clear status and logged once a window (wrong tokens past the free ones answered late, the right
//! one at once), and the run under attack ends bit-identical to an
//! undisturbed one. Forged ring traffic between workers is also refused in `tests/collective.rs`.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use bytes::{Buf, BufMut};
use multipos::cluster::ring::RING_HEADER;
use multipos::model::tiny::TinySpec;
use multipos::net::auth::{GENERATION_HEADER, MEMBER_HEADER, Secret, Token};
use multipos::pb::coordinator_client::CoordinatorClient;
use multipos::pb::peer_client::PeerClient;
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
        multipos::net::auth::Attach,
    >,
>;

/// A request presenting `value` under `header`, when given.
fn presenting<T>(msg: T, header: &'static str, value: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(v) = value {
        r.metadata_mut().insert(header, v.parse().unwrap());
    }
    r
}

/// A request claiming membership `claim` ("ID:KEY"), when given.
fn claimed<T>(msg: T, claim: Option<&str>) -> tonic::Request<T> {
    presenting(msg, MEMBER_HEADER, claim)
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
    let members = c
        .status(StatusRequest {})
        .await
        .map(|r| r.into_inner().members)
        .unwrap_or_default();
    for m in &members {
        // Joining under a live member's id: with another worker's credential, and with the bare
        // token (which proves no worker). Either would end the ring if it were taken.
        let join = JoinRequest {
            worker_id: m.worker_id.clone(),
            rank: -1,
            peer_address: "127.0.0.1:1".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        };
        let mallory = Secret::Worker(Token::new(TOKEN).unwrap().credential("mallory").unwrap());
        for (who, attach) in [
            ("another worker's credential", mallory.attach()),
            ("the bare token", Token::new(TOKEN).unwrap().attach()),
        ] {
            let mut j = CoordinatorClient::with_interceptor(channel.clone(), attach);
            match j.join(join.clone()).await {
                Ok(_) => panic!("a join under live member {}'s id was taken", m.worker_id),
                Err(s) => seen.push((
                    format!("join under a live member's id with {who}"),
                    s.code(),
                )),
            }
        }
        // The member's peer server: a state fetch and a ring stream without its generation's keys.
        let Ok(peer) =
            tonic::transport::Endpoint::from_shared(format!("http://{}", m.peer_address))
                .unwrap()
                .connect()
                .await
        else {
            continue;
        };
        let fetch = FetchStateRequest { generation };
        for pass in [None, Some(format!("{generation}:guessed-generation-key"))] {
            let request = presenting(fetch, GENERATION_HEADER, pass.as_deref());
            match PeerClient::new(peer.clone()).fetch_state(request).await {
                Ok(_) => panic!("a worker's state was served to a non-member"),
                Err(s) => seen.push((
                    format!("fetch a worker's state (pass {})", pass.is_some()),
                    s.code(),
                )),
            }
        }
        let token_only =
            PeerClient::with_interceptor(peer.clone(), Token::new(TOKEN).unwrap().attach())
                .fetch_state(fetch)
                .await;
        match token_only {
            Ok(_) => panic!("a worker's state was served for the cluster token"),
            Err(s) => seen.push(("fetch a worker's state with the token".into(), s.code())),
        }
        for presented in [None, Some(format!("{generation}:guessed-ring-key"))] {
            let chunk = RingChunk {
                from_rank: 0,
                generation,
                data: vec![0u8; 16].into(),
                total: 16,
                ..Default::default()
            };
            let request = presenting(
                tokio_stream::iter(vec![chunk]),
                RING_HEADER,
                presented.as_deref(),
            );
            match PeerClient::new(peer.clone()).ring(request).await {
                Ok(_) => panic!("a ring stream of a non-member was taken"),
                Err(s) => seen.push((
                    format!("a ring stream into a worker (key {})", presented.is_some()),
                    s.code(),
                )),
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

/// A storm of wrong tokens from the workers' own address, all at once, and the right token from
/// the same address in the middle of it. Returns (attack, code) for each wrong token answered.
async fn storm(client: Client, addr: String) -> Vec<(String, Code)> {
    const GUESSES: usize = 50;
    // The guesser's own connection, as another process behind the workers' address would have.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // One call first: until the server's settings have arrived, a client may open more streams
    // than it allows, and the excess is refused unseen (Unavailable).
    let mut first =
        CoordinatorClient::with_interceptor(channel.clone(), Token::new(TOKEN).unwrap().attach());
    first
        .heartbeat(HeartbeatRequest { member: u64::MAX })
        .await
        .unwrap();
    let mut wrong = tokio::task::JoinSet::new();
    for guess in 0..GUESSES {
        let token = Token::new(&format!("a-wrong-guess-{guess:04}")).unwrap();
        let mut w = CoordinatorClient::with_interceptor(channel.clone(), token.attach());
        wrong.spawn(async move {
            let t = std::time::Instant::now();
            let answer = w.heartbeat(HeartbeatRequest { member: 0 }).await;
            (answer.map(drop), t.elapsed())
        });
    }
    let t = std::time::Instant::now();
    let right = client
        .clone()
        .heartbeat(HeartbeatRequest { member: u64::MAX })
        .await;
    let right_took = t.elapsed();
    let mut held = Vec::new();
    while let Some(done) = wrong.join_next().await {
        match done.unwrap() {
            (Ok(()), _) => panic!("a wrong token was answered"),
            (Err(s), took) if s.code() == Code::Unauthenticated => held.push(took),
            // The run ended while the answer was held: the coordinator is gone.
            (Err(_), _) => {}
        }
    }
    assert!(
        held.len() >= GUESSES / 2,
        "the coordinator went away in the storm"
    );
    let right_took = right
        .map(|_| right_took)
        .expect("the right token was refused in a storm");
    let late = held
        .iter()
        .filter(|&&t| t >= multipos::net::auth::throttle::FIRST_DELAY)
        .count();
    assert!(
        late + multipos::net::auth::throttle::FREE_FAILURES as usize >= held.len(),
        "only {late} of {} wrong tokens were held back",
        held.len()
    );
    let slowest = held.iter().max().copied().unwrap_or_default();
    assert!(
        right_took < slowest,
        "the right token ({right_took:?}) waited like the wrong ones (slowest {slowest:?})"
    );
    held.iter()
        .map(|_| {
            (
                "a wrong token (storm from the workers' address)".to_string(),
                Code::Unauthenticated,
            )
        })
        .collect()
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
    let mut stormed = None;
    while coordinator.try_wait().unwrap().is_none() {
        let steps = if hit.join("metrics.jsonl").exists() {
            common::step_losses(&hit.join("metrics.jsonl")).len()
        } else {
            0
        };
        if steps >= 1 && stormed.is_none() {
            stormed = Some(rt.spawn(storm(client.clone(), addr.clone())));
        }
        let round = rt.block_on(attack(&client, channel.clone(), &forged, steps as u64));
        // A round that ran into the end of the run met workers shutting down (Cancelled).
        let live_after = steps == 0 || common::step_losses(&hit.join("metrics.jsonl")).len() < 40;
        if (1..40).contains(&steps) && live_after {
            during.extend(round);
            rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let stormed = rt
        .block_on(stormed.expect("the run ended before the storm"))
        .unwrap();
    during.extend(stormed);
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
        // A worker asked for a generation it has not joined yet (the ring is forming) can only
        // say so: it knows no key to check, and serves nothing.
        let not_joined_yet =
            what.starts_with("fetch a worker's state (pass true)") && *code == Code::Unavailable;
        assert!(
            not_joined_yet
                || matches!(
                    code,
                    Code::PermissionDenied
                        | Code::Unauthenticated
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
    assert!(
        table
            .get("fetch a worker's state (pass true)")
            .is_some_and(|codes| codes.contains("PermissionDenied")),
        "a wrong generation key was never checked by a worker in that generation"
    );
    for must in [
        "join under a live member's id with another worker's credential",
        "join under a live member's id with the bare token",
        "fetch a worker's state (pass true)",
        "fetch a worker's state with the token",
        "a ring stream into a worker (key true)",
    ] {
        assert!(
            table.contains_key(must),
            "never tried while the ring was live: {must}"
        );
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("refused a call"),
        "attacks are logged: {text}"
    );
    // Logged once a window per cause and address, not once per refusal.
    let storm = before
        .iter()
        .chain(&during)
        .filter(|(w, _)| w.starts_with("a wrong token"))
        .count();
    let lines = text
        .lines()
        .filter(|l| l.contains("refused a call") && l.contains("wrong cluster token"))
        .count();
    assert!(
        storm >= 25 && (1..=3).contains(&lines),
        "{storm} wrong tokens, {lines} log lines"
    );
    assert!(
        !hit.join("checkpoints")
            .join(multipos::train::checkpoint::name(1000))
            .exists()
    );
    common::assert_same_run(&clean, &hit, "under attack", &[]);
}

/// A heartbeat from `source` (a loopback address of its own) to `addr` with `token`.
async fn channel_from(source: &str, addr: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .local_address(Some(source.parse().unwrap()))
        .connect()
        .await
        .unwrap()
}

async fn heartbeat_on(
    channel: tonic::transport::Channel,
    token: &str,
) -> Result<std::time::Duration, tonic::Status> {
    let t = std::time::Instant::now();
    CoordinatorClient::with_interceptor(channel, Token::new(token).unwrap().attach())
        .heartbeat(HeartbeatRequest { member: 0 })
        .await
        .map(|_| t.elapsed())
}

#[test]
fn wrong_guesses_never_lock_out_the_right_token_and_are_logged_once_a_window() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let mut child = common::Reaped::new(
        command("coordinator", &model, &dir.path().join("run"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let addr = common::announced_address(child.child());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let guesser = "127.0.0.2";
        let storm_channel = channel_from(guesser, &addr).await;
        // One call first: until the server's settings have arrived, a client may open more streams
        // than it allows, and the excess is refused unseen (Unavailable).
        heartbeat_on(storm_channel.clone(), TOKEN).await.unwrap();
        let mut storm = tokio::task::JoinSet::new();
        for guess in 0..60 {
            let channel = storm_channel.clone();
            storm.spawn(async move {
                let t = std::time::Instant::now();
                let e = heartbeat_on(channel, &format!("guess-{guess:011}"))
                    .await
                    .unwrap_err();
                assert_eq!(e.code(), Code::Unauthenticated);
                assert_eq!(e.message(), "wrong cluster token", "guess {guess}");
                t.elapsed()
            });
        }
        // The right token from the very same address is answered while the guesses are held.
        let right = heartbeat_on(channel_from(guesser, &addr).await, TOKEN)
            .await
            .unwrap();
        heartbeat_on(channel_from("127.0.0.1", &addr).await, TOKEN)
            .await
            .unwrap();
        let held: Vec<_> = storm.join_all().await;
        let slowest = held.iter().max().copied().unwrap();
        assert!(
            held.iter()
                .filter(|&&t| t >= multipos::net::auth::throttle::FIRST_DELAY)
                .count()
                >= 60 - multipos::net::auth::throttle::FREE_FAILURES as usize,
            "wrong guesses past the free ones were not held: {held:?}"
        );
        assert!(
            right < slowest,
            "the right token ({right:?}) was held like a wrong one (slowest {slowest:?})"
        );
    });
    let mut child = child.into_inner();
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refused a call") && l.contains("wrong cluster token"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("127.0.0.2"), "{log}");
}
