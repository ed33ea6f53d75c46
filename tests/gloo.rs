//! c10d's Gloo behind the `Collective` trait, over real loopback sockets in one process: a store
//! served as the coordinator serves it, one group per rank on a thread of its own. Sums and
//! gathers are exact, bf16 sums agree on every rank, ranks at different steps fail instead of
//! mixing values, and a collective whose generation ended is given up at once.
use std::time::{Duration, Instant};

use multipos::cluster::c10d::{GlooGroup, Rendezvous, StoreServer};
use multipos::collective::{Collective, CollectiveError, Wire};
use tch::{Kind, Tensor};
use tokio::sync::watch;

fn rendezvous(store: &StoreServer, prefix: &str) -> Rendezvous {
    Rendezvous {
        store_host: "127.0.0.1".into(),
        store_port: store.port(),
        prefix: prefix.into(),
        device_host: "127.0.0.1".into(),
        interface: None,
    }
}

/// Runs `f` on every rank of a `world`-rank Gloo group, each rank on a thread of its own.
fn on_gloo<T: Send>(world: usize, prefix: &str, f: impl Fn(&GlooGroup) -> T + Sync) -> Vec<T> {
    let store = StoreServer::serve("127.0.0.1:0").unwrap();
    let at = rendezvous(&store, prefix);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (at, f) = (&at, &f);
                s.spawn(move || {
                    let group = GlooGroup::join(at, rank, world, Duration::from_secs(30)).unwrap();
                    f(&group)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn never() -> watch::Receiver<Option<String>> {
    let (tx, rx) = watch::channel(None);
    std::mem::forget(tx);
    rx
}

#[test]
fn sums_and_gathers_are_exact_at_every_world_size() {
    for world in [1usize, 2, 4] {
        let len = 3_000_001i64;
        let out = on_gloo(world, &format!("exact-{world}"), |group| {
            let rank = group.collective(never()).rank();
            let mut coll = group.collective(never());
            // Every partial sum exact in f32.
            let grads = (Tensor::arange(len, (Kind::Float, tch::Device::Cpu)).fmod(1000.0))
                * (rank as f64 + 1.0);
            let moved = coll.all_reduce_sum(7, &grads, Wire::F32, 1 << 20).unwrap();
            let local = Tensor::full([2, 3, 4], rank as f64, (Kind::Float, tch::Device::Cpu));
            let gathered = coll.all_gather(7, &local).unwrap();
            (moved, grads, gathered)
        });
        let factor: f64 = (1..=world).map(|r| r as f64).sum();
        let want = Tensor::arange(len, (Kind::Float, tch::Device::Cpu)).fmod(1000.0) * factor;
        for (moved, grads, gathered) in out {
            assert_eq!(moved, 0, "CPU gradients never cross to a host");
            assert!(grads.equal(&want), "world {world}");
            assert_eq!(gathered.size(), [2 * world as i64, 3, 4]);
            for r in 0..world as i64 {
                let block = gathered.narrow(0, 2 * r, 2);
                assert!(
                    block.eq(r as f64).all().int64_value(&[]) == 1,
                    "world {world}, block {r}"
                );
            }
        }
    }
}

#[test]
fn a_bf16_sum_agrees_on_every_rank_and_stays_near_the_f32_sum() {
    let world = 4;
    let len = 100_003i64;
    let make = |rank: usize| {
        Tensor::arange(len, (Kind::Float, tch::Device::Cpu)).sin() * (rank as f64 + 0.5)
    };
    let out = on_gloo(world, "bf16", |group| {
        let mut coll = group.collective(never());
        let grads = make(coll.rank());
        coll.all_reduce_sum(3, &grads, Wire::Bf16, 1 << 20).unwrap();
        grads
    });
    let exact = (0..world).map(make).fold(
        Tensor::zeros([len], (Kind::Float, tch::Device::Cpu)),
        |a, b| a + b,
    );
    for g in &out {
        assert!(g.equal(&out[0]), "every rank ends with the same values");
    }
    // Each hop of Gloo's ring rounds to bf16: W roundings of at most half a step (2^-9) each.
    let tolerance = exact.abs().max().double_value(&[]) * world as f64 * 2f64.powi(-8);
    let err = (&out[0] - &exact).abs().max().double_value(&[]);
    assert!(err <= tolerance, "error {err} over {tolerance}");
}

#[test]
fn ranks_at_different_steps_fail_instead_of_mixing_values() {
    let out = on_gloo(2, "steps", |group| {
        let mut coll = group.collective(never());
        let step = coll.rank() as u64 + 10;
        let local = Tensor::ones([1, 2], (Kind::Float, tch::Device::Cpu));
        coll.all_gather(step, &local).map(drop)
    });
    for (rank, r) in out.into_iter().enumerate() {
        match r {
            Err(CollectiveError::Protocol { reason, .. }) => {
                assert!(reason.contains("step"), "rank {rank}: {reason}")
            }
            other => panic!("rank {rank}: expected a protocol error, got {other:?}"),
        }
    }
}

#[test]
fn a_collective_whose_generation_ended_is_given_up_at_once_though_gloo_may_still_finish_it() {
    // Rank 1 stalls for a second; rank 0's generation ends after 300 ms.
    let out = on_gloo(2, "abort", |group| {
        let grads = Tensor::ones([1000], (Kind::Float, tch::Device::Cpu));
        if group.collective(never()).rank() == 1 {
            std::thread::sleep(Duration::from_secs(1));
            let r = group
                .collective(never())
                .all_reduce_sum(1, &grads, Wire::F32, 1 << 20);
            return (r, Duration::ZERO, grads);
        }
        let (tx, rx) = watch::channel(None);
        let ender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            tx.send_replace(Some("the generation ended".to_string()));
        });
        let start = Instant::now();
        let r = group
            .collective(rx)
            .all_reduce_sum(1, &grads, Wire::F32, 1 << 20);
        let took = start.elapsed();
        ender.join().unwrap();
        (r, took, grads)
    });
    let (r, took, given_up) = &out[0];
    assert!(
        matches!(r, Err(CollectiveError::Aborted(w)) if w == "the generation ended"),
        "{r:?}"
    );
    assert!(*took < Duration::from_millis(900), "gave up after {took:?}");
    // The stalled rank wakes and finishes the sum with what Gloo still runs for rank 0, which
    // writes into the buffer rank 0 gave up: why a worker leaving its generation renews its
    // gradient buffer (`FlatParams::renew_grads`).
    assert!(out[1].0.is_ok(), "{:?}", out[1].0);
    assert!(out[1].2.eq(2.0).all().int64_value(&[]) == 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while given_up.eq(2.0).all().int64_value(&[]) != 1 {
        assert!(
            Instant::now() < deadline,
            "the sum given up on never landed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn many_groups_starting_collectives_at_once_do_not_crash_the_process() {
    // c10d's flight recorder wrote a process-wide map unlocked on each group's first collective:
    // groups starting at once on several threads crashed the process. multipos switches it off.
    assert_eq!(
        std::env::var("TORCH_FR_BUFFER_SIZE").as_deref(),
        Ok("0"),
        "the flight recorder is off before any group exists"
    );
    let store = StoreServer::serve("127.0.0.1:0").unwrap();
    std::thread::scope(|s| {
        for t in 0..8 {
            let store = &store;
            s.spawn(move || {
                for g in 0..25 {
                    let at = rendezvous(store, &format!("many-{t}-{g}"));
                    let group = GlooGroup::join(&at, 0, 1, Duration::from_secs(30)).unwrap();
                    let mut coll = group.collective(never());
                    let x = Tensor::from_slice(&[t as f32, g as f32]);
                    let all = coll.all_gather(1, &x).unwrap();
                    assert_eq!(Vec::<f32>::try_from(&all).unwrap(), [t as f32, g as f32]);
                }
            });
        }
    });
}
