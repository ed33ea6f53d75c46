//! Ring collectives over real gRPC on loopback, in one process: sums and gathers are exact, large
//! buffers (far over tonic's 4 MiB default message limit) work, and a wrong token is refused.
use std::sync::Arc;
use std::time::Duration;

use multipos::auth::Token;
use multipos::cluster::peer::loopback_rings;
use multipos::collective::Ring;

async fn rings(world: usize, server_token: &Token, client_token: &Token) -> Vec<Arc<Ring>> {
    loopback_rings(
        world,
        server_token,
        client_token,
        1 << 20,
        Duration::from_secs(5),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_reduce_and_all_gather_are_exact_for_large_buffers() {
    let token = Token::new("collective-test").unwrap();
    for world in [1usize, 2, 3] {
        let rings = rings(world, &token, &token).await;
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
                    r.all_reduce_sum(7, &mut buf).await.unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_wrong_token_cannot_feed_the_ring() {
    let right = Token::new("the-right-one").unwrap();
    let wrong = Token::new("not-the-right-one").unwrap();
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
    // Both ranks take part, so only the token decides: with the right one the gather completes.
    for r in gather_all(rings(2, &right, &right).await).await {
        assert_eq!(r.unwrap().len(), 2);
    }
    let results = gather_all(rings(2, &right, &wrong).await).await;
    for r in results {
        assert!(
            r.is_err(),
            "a peer with the wrong token must not feed the ring"
        );
    }
}
