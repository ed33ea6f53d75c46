//! Ring all-reduce bus bandwidth over gRPC on loopback, W = 2 and 4, 10–100 MB of f32 gradients,
//! against raw TCP loopback measured in the same run: one socket pair, and the same ring of W
//! sockets all sending at once (the traffic pattern of the all-reduce, without gRPC). busbw =
//! algbw · 2(W−1)/W, as nccl-tests report it, is the per-link rate, comparable to the raw ring's.
//! All ranks share this process's two runtime threads, as W workers share the machine's cores.
//! The same rings over mutual TLS (`cluster.tls`) give TLS's cost as a ratio to plaintext.
//!
//!     cargo bench --bench collective
use std::sync::Arc;
use std::time::Instant;

use multipos::cluster::peer::loopback_rings;
use multipos::cluster::ring::{Ring, steps};
use multipos::collective::Wire;
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
            "{:>3} {:>6} {:>10} {:>10} {:>10} {:>10} {:>14} {:>12}",
            "W",
            "MB",
            "algbw MB/s",
            "busbw MB/s",
            "TLS busbw",
            "TLS/plain",
            "raw ring MB/s",
            "vs raw ring"
        );
        for world in [2usize, 4] {
            let raw_ring = raw_ring_bytes_per_s(world, 400 << 20).await;
            let plain = rings(world, None, 4 << 20).await;
            let secure = rings(world, Some(&tls), 4 << 20).await;
            for mb in [10usize, 50, 100] {
                let len = mb * 1_000_000 / 4;
                let best = best_all_reduce(&plain, len).await;
                let best_tls = best_all_reduce(&secure, len).await;
                let bytes = (len * 4) as f64;
                let per_rank = steps::all_reduce_bytes_per_rank(len * 4, world);
                let busbw = per_rank / best;
                let busbw_tls = per_rank / best_tls;
                println!(
                    "{world:>3} {mb:>6} {:>10.0} {:>10.0} {:>10.0} {:>9.0}% {:>14.0} {:>11.0}%",
                    bytes / best / 1e6,
                    busbw / 1e6,
                    busbw_tls / 1e6,
                    100.0 * busbw_tls / busbw,
                    raw_ring / 1e6,
                    100.0 * busbw / raw_ring
                );
            }
        }
    });
}
