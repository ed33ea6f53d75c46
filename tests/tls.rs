//! TLS on every connection: certificates made by `multipos certs`; a cluster over mutual TLS trains
//! exactly as over plaintext; the coordinator and the peer ring refuse plaintext clients, clients of
//! another CA and clients without a certificate; a worker certificate joins only as the worker it
//! names; `certs` re-uses its CA and never overwrites.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use multipos::cluster::peer::{loopback_rings, peer_service};
use multipos::cluster::ring::{connect_with_retry, peer_server_builder};
use multipos::cluster::state::slot;
use multipos::collective::Wire;
use multipos::model::tiny::TinySpec;
use multipos::net::auth::Token;
use multipos::net::tls::{Tls, TlsConfig};
use multipos::pb::HeartbeatRequest;
use multipos::pb::coordinator_client::CoordinatorClient;
use multipos::pb::peer_client::PeerClient;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_multipos"))
}

/// `multipos certs --out DIR --host 127.0.0.1,localhost`, which must succeed.
fn make_certs(dir: &Path, host: &str) -> TlsConfig {
    let out = Command::new(bin())
        .args(["certs", "--out"])
        .arg(dir)
        .args(["--host", host])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stem = host.split(',').next().unwrap();
    TlsConfig {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}-key.pem")),
        client_auth: true,
    }
}

fn tls_sets(tls: &TlsConfig) -> Vec<String> {
    vec![
        format!("cluster.tls.ca=\"{}\"", tls.ca.display()),
        format!("cluster.tls.cert=\"{}\"", tls.cert.display()),
        format!("cluster.tls.key=\"{}\"", tls.key.display()),
    ]
}

fn sets(model: &Path, out: &Path, extra: &[String]) -> Vec<String> {
    let mut v = vec![
        format!("model.path=\"{}\"", model.display()),
        format!("output.dir=\"{}\"", out.display()),
        format!(
            "data.train=\"{}\"",
            repo("deploy/data/bible_paraphrase_tiny/train.jsonl").display()
        ),
        "train.max_steps=6".into(),
        "train.batch_size=8".into(),
        "train.micro_batch=3".into(),
    ];
    v.extend(extra.iter().cloned());
    v
}

fn command(cmd: &str, sets: &[String]) -> Command {
    let mut c = Command::new(bin());
    c.arg(cmd)
        .arg("--config")
        .arg(repo("configs/local-2workers.toml"))
        .env("RUST_LOG", "warn")
        .env_remove("MULTIPOS_CLUSTER_TOKEN");
    for s in sets {
        c.arg("--set").arg(s);
    }
    c
}

#[test]
fn a_cluster_over_mutual_tls_trains_exactly_as_over_plaintext() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let tls = make_certs(&dir.path().join("certs"), "127.0.0.1,localhost");
    let plain = dir.path().join("plain");
    let secure = dir.path().join("tls");
    for (out, extra) in [(&plain, vec![]), (&secure, tls_sets(&tls))] {
        let o = command("launch", &sets(&model, out, &extra))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    common::assert_same_run(&plain, &secure, "mutual TLS", &[]);
}

/// Starts a TLS coordinator (with `extra` settings) and returns it with its address.
fn tls_coordinator(
    model: &Path,
    out: &Path,
    tls: &TlsConfig,
    extra: &[&str],
) -> (std::process::Child, String) {
    let mut all = tls_sets(tls);
    all.extend(extra.iter().map(|s| s.to_string()));
    let mut child = command("coordinator", &sets(model, out, &all))
        .env("MULTIPOS_CLUSTER_TOKEN", "the-right-token-16")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = common::announced_address(&mut child);
    (child, addr)
}

/// A heartbeat with the right token over `channel`: the call's status code, Ok when answered.
async fn heartbeat(channel: tonic::transport::Channel) -> Result<(), tonic::Status> {
    let token = Token::new("the-right-token-16").unwrap();
    CoordinatorClient::with_interceptor(channel, token.attach())
        .heartbeat(HeartbeatRequest { member: 0 })
        .await
        .map(drop)
}

#[test]
fn the_coordinator_refuses_plaintext_other_cas_and_clients_without_a_certificate() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let tls = make_certs(&dir.path().join("certs"), "127.0.0.1");
    let other = make_certs(&dir.path().join("other-ca"), "127.0.0.1");
    let (mut child, addr) = tls_coordinator(&model, &dir.path().join("out"), &tls, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let quick = Duration::from_millis(500);
        // Plaintext: the TLS listener never speaks HTTP/2 to it.
        let plain = connect_with_retry(&addr, quick, None).await;
        if let Ok(channel) = plain {
            assert!(
                heartbeat(channel).await.is_err(),
                "a plaintext call was answered"
            );
        }
        // A client that trusts another CA refuses the coordinator's certificate...
        let theirs = Tls::load(&other).unwrap();
        assert!(
            connect_with_retry(&addr, quick, Some(&theirs))
                .await
                .is_err()
        );
        // ... and one that trusts ours but shows another CA's certificate is refused by it.
        let mixed = Tls::load(&TlsConfig {
            ca: tls.ca.clone(),
            ..other.clone()
        })
        .unwrap();
        let refused = match connect_with_retry(&addr, quick, Some(&mixed)).await {
            Ok(channel) => heartbeat(channel).await.is_err(),
            Err(_) => true,
        };
        assert!(refused, "a client certificate of another CA was accepted");
        // The right CA and certificate: answered.
        let ours = Tls::load(&tls).unwrap();
        let channel = connect_with_retry(&addr, quick * 20, Some(&ours))
            .await
            .unwrap();
        heartbeat(channel).await.unwrap();
    });
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_coordinator_without_client_auth_takes_clients_without_a_certificate_of_its_ca() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let tls = make_certs(&dir.path().join("certs"), "127.0.0.1");
    let other = make_certs(&dir.path().join("other-ca"), "127.0.0.1");
    let (mut child, addr) = tls_coordinator(
        &model,
        &dir.path().join("out"),
        &tls,
        &["cluster.tls.client_auth=false"],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mixed = Tls::load(&TlsConfig {
            ca: tls.ca.clone(),
            ..other.clone()
        })
        .unwrap();
        let channel = connect_with_retry(&addr, Duration::from_secs(10), Some(&mixed))
            .await
            .unwrap();
        heartbeat(channel).await.unwrap();
    });
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_ring_runs_over_tls_and_refuses_other_cas_and_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_certs(&dir.path().join("certs"), "127.0.0.1");
    let other = make_certs(&dir.path().join("other-ca"), "127.0.0.1");
    let tls = Tls::load(&files).unwrap();
    let rings = loopback_rings(
        3,
        ("tls-ring-key", "tls-ring-key"),
        Some(&tls),
        1 << 16,
        Duration::from_secs(10),
    )
    .await;
    let tasks: Vec<_> = rings
        .iter()
        .map(|r| {
            let r = r.clone();
            tokio::spawn(async move {
                let mut buf = vec![r.rank as f32 + 1.0; 100_000];
                r.all_reduce_sum(1, &mut buf, Wire::F32).await.unwrap();
                buf
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap().iter().all(|&v| v == 6.0));
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let pass = multipos::cluster::peer::pass_slot();
    pass.send_replace(Some((1, "generation-key".into())));
    let (svc, _rx) = peer_service(1 << 16, slot(), pass);
    tokio::spawn(
        peer_server_builder(Some(&tls))
            .unwrap()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let quick = Duration::from_secs(2);
    let fetch = |channel| async move {
        let pass = multipos::net::auth::Attach::pass(
            multipos::net::auth::GENERATION_HEADER,
            1,
            "generation-key",
        )
        .unwrap();
        PeerClient::with_interceptor(channel, pass)
            .fetch_state(multipos::pb::FetchStateRequest { generation: 1 })
            .await
            .map(drop)
    };
    // The right CA, certificate and generation key reach the service, which waits for a state.
    let channel = connect_with_retry(&addr, quick, Some(&tls)).await.unwrap();
    assert!(
        tokio::time::timeout(quick, fetch(channel)).await.is_err(),
        "the call with the right certificate did not reach the service"
    );
    // Another CA's certificate, and no TLS at all, never reach it: the transport fails at once.
    let mixed = Tls::load(&TlsConfig {
        ca: files.ca.clone(),
        ..other.clone()
    })
    .unwrap();
    for client in [Some(&mixed), None] {
        if let Ok(channel) = connect_with_retry(&addr, quick, client).await {
            let err = tokio::time::timeout(quick * 5, fetch(channel))
                .await
                .expect("a refused connection answers at once")
                .unwrap_err();
            // The service itself would wait for a state far longer than the timeout above.
            assert_ne!(err.code(), tonic::Code::DeadlineExceeded, "{err}");
        }
    }
}

#[test]
fn certs_reuses_its_ca_keeps_keys_private_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let first = make_certs(&out, "node-a,10.0.0.1");
    let ca = std::fs::read(&first.ca).unwrap();
    let second = make_certs(&out, "node-b");
    assert_eq!(
        std::fs::read(&second.ca).unwrap(),
        ca,
        "the CA was replaced"
    );
    for key in [&first.key, &second.key, &out.join("ca-key.pem")] {
        let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
    }
    // Both hosts' certificates are of one CA: they talk to each other.
    Tls::load(&first).unwrap();
    Tls::load(&second).unwrap();
    let again = Command::new(bin())
        .args(["certs", "--out"])
        .arg(&out)
        .args(["--host", "node-a"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("node-a.pem") && err.contains("exists"),
        "{err}"
    );
    let bad = Command::new(bin())
        .args(["certs", "--out"])
        .arg(dir.path().join("bad"))
        .args(["--host", "not a name"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        !dir.path().join("bad").join("ca.pem").exists(),
        "a refused run left files"
    );
}

#[test]
fn a_worker_certificate_for_one_name_cannot_join_as_another() {
    let (dir, model) = common::tiny_model(&TinySpec::default());
    let certs = dir.path().join("certs");
    let server = make_certs(&certs, "127.0.0.1");
    let node_a = make_certs(&certs, "node-a");
    let (mut child, addr) = tls_coordinator(&model, &dir.path().join("out"), &server, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let tls = Tls::load(&node_a).unwrap();
        let channel = connect_with_retry(&addr, Duration::from_secs(10), Some(&tls))
            .await
            .unwrap();
        let join = |id: &str| {
            let mut request = tonic::Request::new(multipos::pb::JoinRequest {
                worker_id: id.into(),
                rank: -1,
                peer_address: "127.0.0.1:1".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                ..Default::default()
            });
            request.set_timeout(Duration::from_secs(2));
            let token = Token::new("the-right-token-16").unwrap();
            let mut client = CoordinatorClient::with_interceptor(channel.clone(), token.attach());
            async move { client.join(request).await }
        };
        // node-a's certificate, even with the cluster token, cannot join as another worker...
        for other in ["node-b:17", "node-ab", "127.0.0.1:5"] {
            let e = join(other).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{other}: {e}");
            assert!(e.message().contains("node-a"), "{e}");
        }
        // ... and joins as itself: taken as a candidate, it waits for a ring to form.
        let e = join("node-a:17").await.unwrap_err();
        assert!(
            matches!(
                e.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ),
            "{e}"
        );
    });
    child.kill().unwrap();
    child.wait().unwrap();
}
