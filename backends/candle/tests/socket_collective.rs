//! The unix-socket collective on its own: ranks on threads of this process reduce and gather
//! buffers larger than any socket buffer, and a rank that leaves, hangs or falls out of step is
//! named by the others.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use wick_backend_candle::parallel::{Collective, SocketCollective};

/// `world` ranks connected in threads of this process.
fn mesh(world: usize, timeout: Duration) -> (tempfile::TempDir, Vec<Arc<SocketCollective>>) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("tp");
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let base = base.clone();
            std::thread::spawn(move || SocketCollective::connect(&base, rank, world, timeout))
        })
        .collect();
    let ranks = handles
        .into_iter()
        .map(|h| Arc::new(h.join().unwrap().unwrap()))
        .collect();
    (dir, ranks)
}

/// Runs `f` on every rank at once.
fn on_all<T: Send + 'static>(
    ranks: &[Arc<SocketCollective>],
    f: impl Fn(&SocketCollective) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let handles: Vec<_> = ranks
        .iter()
        .map(|c| {
            let (c, f) = (c.clone(), f.clone());
            std::thread::spawn(move || f(&c))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn all_reduce_and_gather_over_three_ranks() {
    let (_dir, ranks) = mesh(3, Duration::from_secs(10));
    // Large enough that no socket buffer holds a whole message.
    let n = 300_000;
    let sums = on_all(&ranks, move |c| {
        let r = c.rank() as f32;
        let x = Tensor::from_vec(
            (0..n).map(|i| i as f32 * 0.5 + r).collect(),
            (n / 3, 3),
            &Device::Cpu,
        )
        .unwrap();
        c.all_reduce_sum(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    });
    for s in &sums {
        assert_eq!(s, &sums[0]);
    }
    for (i, v) in sums[0].iter().enumerate().step_by(997) {
        assert_eq!(*v, 3.0 * (i as f32 * 0.5) + 3.0);
    }
    // Uneven parts: rank r contributes r + 1 columns of value r.
    let gathered = on_all(&ranks, |c| {
        let r = c.rank();
        let x = Tensor::full(r as f32, (2, r + 1), &Device::Cpu).unwrap();
        c.all_gather(&x).unwrap().to_vec2::<f32>().unwrap()
    });
    for g in &gathered {
        assert_eq!(g, &vec![vec![0.0, 1.0, 1.0, 2.0, 2.0, 2.0]; 2]);
    }
    on_all(&ranks, |c| c.barrier().unwrap());
}

#[test]
fn a_rank_that_leaves_is_named_and_the_rest_fail_fast() {
    let (_dir, mut ranks) = mesh(3, Duration::from_secs(30));
    // Rank 2 goes away (its sockets close as a dead process's would).
    drop(ranks.pop());
    let started = Instant::now();
    let errors = on_all(&ranks, |c| {
        let x = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        c.all_reduce_sum(&x).unwrap_err().to_string()
    });
    assert!(started.elapsed() < Duration::from_secs(10));
    for (rank, e) in errors.iter().enumerate() {
        assert!(
            e.contains("rank 2 closed its connection"),
            "rank {rank}: {e}"
        );
        assert!(ranks[rank].failure().is_some());
    }
    // Failed for good: later calls fail at once.
    let again = ranks[0].barrier().unwrap_err().to_string();
    assert!(again.contains("failed earlier"), "{again}");
}

#[test]
fn a_rank_that_hangs_times_out_by_name() {
    let (_dir, ranks) = mesh(2, Duration::from_millis(300));
    // Rank 1 never calls; rank 0 gives up after the timeout.
    let e = ranks[0].barrier().unwrap_err().to_string();
    assert!(e.contains("rank(s) 1 did not answer the barrier"), "{e}");
}

#[test]
fn ranks_out_of_step_are_detected() {
    let (_dir, ranks) = mesh(2, Duration::from_secs(10));
    let errors = on_all(&ranks, |c| {
        let x = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        if c.rank() == 0 {
            c.all_reduce_sum(&x).map(|_| ()).unwrap_err().to_string()
        } else {
            c.all_gather(&x).map(|_| ()).unwrap_err().to_string()
        }
    });
    assert!(errors[0].contains("rank 1 is out of step"), "{}", errors[0]);
}

#[test]
fn rendezvous_names_the_missing_rank() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("tp");
    let e = SocketCollective::connect(&base, 0, 2, Duration::from_millis(200))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("rank(s) 1 did not connect"), "{e}");
    let e = SocketCollective::connect(&base, 1, 2, Duration::from_millis(200))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("rank 0 did not listen"), "{e}");
}
