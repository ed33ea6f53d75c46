//! Ring collectives over real gRPC on loopback, in one process: sums and gathers are exact, large
//! buffers (far over tonic's 4 MiB default message limit) work, and a wrong ring key is refused.
use std::sync::Arc;
use std::time::Duration;

use multipos::cluster::peer::loopback_rings;
use multipos::cluster::ring::Ring;
use multipos::collective::Wire;

/// A loopback ring whose servers expect ring keys `expected-R` and whose ranks present `presented-R`.
async fn rings(world: usize, expected: &str, presented: &str) -> Vec<Arc<Ring>> {
    loopback_rings(
        world,
        (expected, presented),
        None,
        1 << 20,
        Duration::from_secs(5),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_reduce_and_all_gather_are_exact_for_large_buffers() {
    for world in [1usize, 2, 3] {
        let rings = rings(world, "k", "k").await;
        // 3M floats = 12 MB per rank; values chosen so every partial sum is exact in f32.
        let len = 3_000_001;
        let tasks: Vec<_> = rings
            .iter()
            .map(|r| {
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf: Vec<f32> = (0..len)
                        .map(|i| ((i % 1000) as f32) * (r.rank as f32 + 1.0))
                        .collect();
                    r.all_reduce_sum(7, &mut buf, Wire::F32).await.unwrap();
                    let block: Vec<u8> = (0..5_000_000u32)
                        .map(|i| (i as u8).wrapping_add(r.rank as u8))
                        .collect();
                    let gathered = r.all_gather(7, block).await.unwrap();
                    (buf, gathered)
                })
            })
            .collect();
        let factor: f32 = (1..=world).map(|r| r as f32).sum();
        for t in tasks {
            let (buf, gathered) = t.await.unwrap();
            for i in [0usize, 1, 999, 1_234_567, len - 1] {
                assert_eq!(
                    buf[i],
                    ((i % 1000) as f32) * factor,
                    "world {world}, index {i}"
                );
            }
            assert_eq!(gathered.len(), world);
            for (r, block) in gathered.iter().enumerate() {
                assert_eq!(block.len(), 5_000_000);
                assert_eq!(block[12_345], (12_345u32 as u8).wrapping_add(r as u8));
            }
        }
    }
}

/// Gradients in bf16 on the wire: half the bytes, every rank ends with the same values, and each is
/// within half a bf16 step (relative 2^-8) of the exact f32 sum, whatever the world size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bf16_all_reduce_agrees_on_every_rank_and_stays_within_a_bf16_step() {
    for world in [2usize, 3, 4] {
        let rings = rings(world, "k", "k").await;
        let len = 100_003;
        let value =
            |rank: usize, i: usize| ((i * 7919 + rank * 104_729) % 20_011) as f32 / 977.0 - 9.5;
        let tasks: Vec<_> = rings
            .iter()
            .map(|r| {
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf: Vec<f32> = (0..len).map(|i| value(r.rank, i)).collect();
                    r.all_reduce_sum(3, &mut buf, Wire::Bf16).await.unwrap();
                    buf
                })
            })
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        for other in &results[1..] {
            assert!(
                other
                    .iter()
                    .zip(&results[0])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "world {world}: ranks disagree"
            );
        }
        let mut worst = 0f64;
        for (i, &got) in results[0].iter().enumerate() {
            let exact: f64 = (0..world).map(|r| value(r, i) as f64).sum();
            // Each hop rounds a partial sum once more: a bound of W half-steps of the largest term.
            let scale = (0..world)
                .map(|r| value(r, i).abs() as f64)
                .sum::<f64>()
                .max(exact.abs());
            let err = (got as f64 - exact).abs() / scale.max(1e-3);
            worst = worst.max(err);
            assert!(
                err <= world as f64 * 2f64.powi(-8),
                "world {world}, index {i}: {got} vs {exact}"
            );
        }
        eprintln!("world {world}: worst relative error of a bf16 all-reduce {worst:.2e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_wrong_ring_key_cannot_feed_the_ring() {
    let gather_all = |rings: Vec<Arc<Ring>>| async move {
        let tasks: Vec<_> = rings
            .into_iter()
            .map(|r| tokio::spawn(async move { r.all_gather(0, vec![1, 2, 3, 4]).await }))
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    };
    // Both ranks take part, so only the key decides: with the right one the gather completes.
    for r in gather_all(rings(2, "right", "right").await).await {
        assert_eq!(r.unwrap().len(), 2);
    }
    let results = gather_all(rings(2, "right", "wrong").await).await;
    for r in results {
        assert!(
            r.is_err(),
            "a peer with the wrong ring key must not feed the ring"
        );
    }
}

/// A caller outside the ring opens streams to rank 0's Peer server: without a ring key, with
/// a wrong one, and with the right one but chunks that claim another sender. Each is refused, and
/// the ring's own all-gather, running meanwhile, is unharmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_bound_to_the_left_neighbour_and_its_key() {
    use multipos::cluster::peer::peer_service;
    use multipos::cluster::ring::{RING_HEADER, RingKeys, peer_server_builder};
    use multipos::cluster::state::slot;
    use multipos::pb::RingChunk;
    use multipos::pb::peer_client::PeerClient;

    let mut peers = Vec::new();
    let mut incomings = Vec::new();
    for _ in 0..2 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        peers.push(listener.local_addr().unwrap().to_string());
        let (svc, rx) = peer_service(1 << 20, slot(), multipos::cluster::peer::pass_slot());
        incomings.push(rx);
        tokio::spawn(
            peer_server_builder(None)
                .unwrap()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
    }
    let keys = ["secret-of-rank-0", "secret-of-rank-1"];
    let mut rings = Vec::new();
    for (rank, rx) in incomings.into_iter().enumerate() {
        let own = RingKeys {
            own: keys[rank].into(),
            left: keys[1 - rank].into(),
        };
        let ring = Ring::connect(
            rank,
            &peers,
            5,
            None,
            &own,
            rx,
            1 << 20,
            Duration::from_secs(10),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        rings.push(Arc::new(ring));
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", peers[0]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let attack = |presented: Option<&str>, claimed_rank: u32| {
        let mut client = PeerClient::new(channel.clone());
        let chunk = RingChunk {
            from_rank: claimed_rank,
            generation: 5,
            data: vec![0u8; 16].into(),
            total: 16,
            ..Default::default()
        };
        let mut req = tonic::Request::new(tokio_stream::iter(vec![chunk]));
        if let Some(p) = presented {
            req.metadata_mut().insert(RING_HEADER, p.parse().unwrap());
        }
        async move { client.ring(req).await.map(|_| ()) }
    };
    assert_eq!(
        attack(None, 1).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        attack(Some("5:guessed-key"), 1).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        attack(Some("4:secret-of-rank-1"), 1)
            .await
            .unwrap_err()
            .code(),
        tonic::Code::PermissionDenied,
        "a stale generation"
    );
    // Even the right key does not let a stream speak for another rank.
    assert_eq!(
        attack(Some("5:secret-of-rank-1"), 0)
            .await
            .unwrap_err()
            .code(),
        tonic::Code::PermissionDenied
    );
    let tasks: Vec<_> = rings
        .iter()
        .cloned()
        .map(|r| tokio::spawn(async move { r.all_gather(0, vec![r.rank as u8; 8]).await }))
        .collect();
    for t in tasks {
        let blocks = t.await.unwrap().unwrap();
        assert_eq!(blocks, vec![vec![0u8; 8], vec![1u8; 8]]);
    }
}
