//! All-reduce bus bandwidth on loopback, W = 2 and 4, at the gradient sizes of all-MiniLM-L6-v2
//! (22.7 M parameters, 91 MB of f32) and of a 110 M-parameter model (bert-base, 440 MB), side by
//! side in one run: the gRPC ring (`cluster.collective = "grpc"`), c10d's Gloo
//! (`cluster.collective = "gloo"`, as a worker drives it: through the `Collective` trait, the
//! host staging copy included), and a raw TCP ring of W sockets all sending at once (the traffic
//! pattern of a ring all-reduce with nothing on top). busbw = algbw · 2(W−1)/W, as nccl-tests
//! report it, is the per-link rate, comparable to the raw ring's. Every rank lives in this
//! process, as W workers share the machine's cores. The gRPC ring over mutual TLS
//! (`cluster.tls`) gives TLS's cost as a ratio to plaintext.
//!
//!     cargo bench --bench collective
use std::sync::Arc;
use std::time::Instant;

use multipos::cluster::c10d::{GlooGroup, Rendezvous, StoreServer};
use multipos::cluster::peer::loopback_rings;
use multipos::cluster::ring::{Ring, steps};
use multipos::collective::{Collective, Wire};
use multipos::net::tls::{Tls, TlsConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn raw_tcp_bytes_per_s(bytes: usize) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0;
        while got < bytes {
            got += s.read(&mut buf).await.unwrap();
        }
    });
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let chunk = vec![7u8; 1 << 16];
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&chunk).await.unwrap();
        sent += chunk.len();
    }
    reader.await.unwrap();
    bytes as f64 / start.elapsed().as_secs_f64()
}

/// Per-link throughput of W raw TCP connections in a ring, each sending `bytes` while receiving.
async fn raw_ring_bytes_per_s(world: usize, bytes: usize) -> f64 {
    let mut listeners = Vec::new();
    for _ in 0..world {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (rank, listener) in listeners.into_iter().enumerate() {
        let right = addrs[(rank + 1) % world];
        tasks.push(tokio::spawn(async move {
            let (accepted, connected) = tokio::join!(listener.accept(), TcpStream::connect(right));
            let (mut inbound, _) = accepted.unwrap();
            let mut outbound = connected.unwrap();
            outbound.set_nodelay(true).unwrap();
            let send = async {
                let chunk = vec![7u8; 1 << 16];
                let mut sent = 0;
                while sent < bytes {
                    outbound.write_all(&chunk).await.unwrap();
                    sent += chunk.len();
                }
            };
            let recv = async {
                let mut buf = vec![0u8; 1 << 16];
                let mut got = 0;
                while got < bytes {
                    got += inbound.read(&mut buf).await.unwrap();
                }
            };
            tokio::join!(send, recv);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    bytes as f64 / start.elapsed().as_secs_f64()
}

async fn rings(world: usize, tls: Option<&Tls>, chunk: usize) -> Vec<Arc<Ring>> {
    loopback_rings(
        world,
        ("benchmark-key", "benchmark-key"),
        tls,
        chunk,
        std::time::Duration::from_secs(60),
    )
    .await
}

/// The fastest of three all-reduces of `len` floats over `rings`, in seconds.
async fn best_all_reduce(rings: &[Arc<Ring>], len: usize) -> f64 {
    let mut best = f64::INFINITY;
    for rep in 0..3u64 {
        let bufs: Vec<Vec<f32>> = (0..rings.len()).map(|_| vec![1.0f32; len]).collect();
        let start = Instant::now();
        let tasks: Vec<_> = rings
            .iter()
            .zip(bufs)
            .map(|(r, mut buf)| {
                let r = r.clone();
                tokio::spawn(async move {
                    r.all_reduce_sum(rep, &mut buf, Wire::F32).await.unwrap();
                    assert_eq!(buf[len / 2], r.world as f32);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    best
}

/// A Gloo group of `world` ranks on loopback, met through a store served as the coordinator does.
fn gloo_groups(store: &StoreServer, world: usize) -> Vec<GlooGroup> {
    let at = Rendezvous {
        store_host: "127.0.0.1".into(),
        store_port: store.port(),
        prefix: format!("bench-{world}/"),
        device_host: "127.0.0.1".into(),
        interface: None,
    };
    std::thread::scope(|s| {
        let joins: Vec<_> = (0..world)
            .map(|rank| {
                let at = &at;
                s.spawn(move || {
                    GlooGroup::join(at, rank, world, std::time::Duration::from_secs(60)).unwrap()
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

/// The fastest of three Gloo all-reduces of `len` floats, in seconds (from a common start to the
/// last rank's end).
fn best_gloo_all_reduce(groups: &[GlooGroup], len: usize) -> f64 {
    let mut best = f64::INFINITY;
    for rep in 0..3u64 {
        let start = std::sync::Barrier::new(groups.len());
        let took = std::thread::scope(|s| {
            let runs: Vec<_> = groups
                .iter()
                .map(|g| {
                    let start = &start;
                    s.spawn(move || {
                        let (_never, abort) = tokio::sync::watch::channel(None);
                        let mut coll = g.collective(abort);
                        let grads = tch::Tensor::ones([len as i64], tch::kind::FLOAT_CPU);
                        start.wait();
                        let t = Instant::now();
                        coll.all_reduce_sum(rep, &grads, Wire::F32, 0).unwrap();
                        let took = t.elapsed().as_secs_f64();
                        assert_eq!(grads.double_value(&[len as i64 / 2]), groups.len() as f64);
                        took
                    })
                })
                .collect();
            runs.into_iter()
                .map(|r| r.join().unwrap())
                .fold(0.0, f64::max)
        });
        best = best.min(took);
    }
    best
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let certs = tempfile::tempdir().unwrap();
    let issued = multipos::net::certs::issue(certs.path(), &["127.0.0.1".into()], 1).unwrap();
    let (cert, key) = issued.hosts[0].clone();
    let tls = Tls::load(&TlsConfig {
        ca: certs.path().join(multipos::net::certs::CA_CERT),
        cert,
        key,
        client_auth: true,
    })
    .unwrap();
    rt.block_on(async {
        let raw = raw_tcp_bytes_per_s(1 << 30).await;
        println!("raw TCP loopback, one stream: {:.0} MB/s", raw / 1e6);
        println!(
            "{:>3} {:>5} {:>13} {:>11} {:>11} {:>9} {:>9} {:>11} {:>9}",
            "W",
            "MB",
            "raw ring MB/s",
            "grpc busbw",
            "gloo busbw",
            "grpc/raw",
            "gloo/raw",
            "grpc+TLS",
            "TLS/plain"
        );
        let store = StoreServer::serve("127.0.0.1:0").unwrap();
        for world in [2usize, 4] {
            let raw_ring = raw_ring_bytes_per_s(world, 400 << 20).await;
            let plain = rings(world, None, 4 << 20).await;
            let secure = rings(world, Some(&tls), 4 << 20).await;
            let groups = tokio::task::block_in_place(|| gloo_groups(&store, world));
            // all-MiniLM-L6-v2's 22,713,216 parameters; bert-base's 109,482,240.
            for params in [22_713_216usize, 109_482_240] {
                let best = best_all_reduce(&plain, params).await;
                let best_tls = best_all_reduce(&secure, params).await;
                let best_gloo = tokio::task::block_in_place(|| best_gloo_all_reduce(&groups, params));
                let per_rank = steps::all_reduce_bytes_per_rank(params * 4, world);
                let (grpc, tls, gloo) = (per_rank / best, per_rank / best_tls, per_rank / best_gloo);
                println!(
                    "{world:>3} {:>5.0} {:>13.0} {:>11.0} {:>11.0} {:>8.0}% {:>8.0}% {:>11.0} {:>8.0}%",
                    (params * 4) as f64 / 1e6,
                    raw_ring / 1e6,
                    grpc / 1e6,
                    gloo / 1e6,
                    100.0 * grpc / raw_ring,
                    100.0 * gloo / raw_ring,
                    tls / 1e6,
                    100.0 * tls / grpc,
                );
            }
        }
    });
}
