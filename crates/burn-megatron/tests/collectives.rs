//! `LocalGroup` collectives on 2, 3 and 4 thread ranks against values worked out by hand,
//! and their failure modes: timeouts, a failing rank, mismatched calls, bad shapes.

mod common;

use std::time::{Duration, Instant};

use burn::tensor::{Tensor, TensorData};
use burn_megatron::Error;
use burn_megatron::parallel::{Layout, LocalCluster, ReduceOp};
use common::{TestBackend, tensor_parallel_cluster, values};

type Plain = burn_ndarray::NdArray<f32>;

fn row(values: Vec<f32>) -> Tensor<Plain, 2> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [1, len]), &Default::default())
}

fn data(tensor: Tensor<Plain, 2>) -> Vec<f32> {
    values(&tensor.into_data())
}

/// `127.0.0.1:port` for a port free now, for a TCP hub.
fn free_local_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", listener.local_addr().unwrap().port())
}

#[test]
fn all_reduce_sums_averages_and_takes_the_maximum() {
    for n in [2, 3, 4] {
        let results = tensor_parallel_cluster(n)
            .run(|ctx| {
                let group = ctx.tensor();
                let r = group.rank() as f32;
                // Rank r holds [r + 1, -r, 10 * r].
                let mine = || row(vec![r + 1.0, -r, 10.0 * r]);
                let sum = data(group.all_reduce(mine(), ReduceOp::Sum)?);
                let mean = data(group.all_reduce(mine(), ReduceOp::Mean)?);
                let max = data(group.all_reduce(mine(), ReduceOp::Max)?);
                Ok::<_, Error>((sum, mean, max))
            })
            .unwrap();
        let n_f = n as f32;
        let triangle = n_f * (n_f - 1.0) / 2.0; // 0 + 1 + ... + (n - 1)
        for (sum, mean, max) in results {
            assert_eq!(
                sum,
                vec![triangle + n_f, -triangle, 10.0 * triangle],
                "n={n}"
            );
            let expected_mean = [
                (triangle + n_f) / n_f,
                -triangle / n_f,
                10.0 * triangle / n_f,
            ];
            for (m, e) in mean.iter().zip(expected_mean) {
                assert!((m - e).abs() < 1e-6, "mean {mean:?} n={n}");
            }
            assert_eq!(max, vec![n_f, 0.0, 10.0 * (n_f - 1.0)], "n={n}");
        }
    }
}

#[test]
fn all_gather_concatenates_in_rank_order_along_any_dimension() {
    for n in [2, 3, 4] {
        let results = tensor_parallel_cluster(n)
            .run(|ctx| {
                let group = ctx.tensor();
                let r = group.rank() as f32;
                let along_columns = group.all_gather(row(vec![r, r + 0.5]), 1)?;
                let along_rows = group.all_gather(row(vec![r, r + 0.5]), 0)?;
                Ok::<_, Error>((along_columns.dims(), data(along_columns), along_rows.dims()))
            })
            .unwrap();
        let expected: Vec<f32> = (0..n).flat_map(|r| [r as f32, r as f32 + 0.5]).collect();
        for (dims, gathered, row_dims) in results {
            assert_eq!(dims, [1, 2 * n]);
            assert_eq!(gathered, expected);
            assert_eq!(row_dims, [n, 2]);
        }
    }
}

#[test]
fn reduce_scatter_gives_each_rank_its_chunk_of_the_sum() {
    for n in [2, 3, 4] {
        let results = tensor_parallel_cluster(n)
            .run(|ctx| {
                let group = ctx.tensor();
                let r = group.rank() as f32;
                // Rank r holds 100 r + j for j in 0..2n.
                let mine = row((0..2 * n).map(|j| 100.0 * r + j as f32).collect());
                Ok::<_, Error>(data(group.reduce_scatter(mine, 1, ReduceOp::Sum)?))
            })
            .unwrap();
        let n_f = n as f32;
        for (rank, chunk) in results.into_iter().enumerate() {
            // Sum over ranks of 100 r + j = 100 n (n - 1) / 2 + n j, for j = 2 rank, 2 rank + 1.
            let expected: Vec<f32> = (2 * rank..2 * rank + 2)
                .map(|j| 50.0 * n_f * (n_f - 1.0) + n_f * j as f32)
                .collect();
            assert_eq!(chunk, expected, "n={n} rank={rank}");
        }
    }
}

#[test]
fn broadcast_send_recv_and_barrier() {
    for n in [2, 3, 4] {
        let results = tensor_parallel_cluster(n)
            .run(|ctx| {
                let group = ctx.tensor();
                let r = group.rank();
                let root = n - 1;
                let broadcast = group.broadcast(row(vec![r as f32; 2]), root)?;
                // A ring: send to the next rank, receive from the previous one.
                group.send(row(vec![r as f32, 7.0]), (r + 1) % n)?;
                let received: Tensor<Plain, 2> =
                    group.recv([1, 2], (r + n - 1) % n, &Default::default())?;
                group.barrier()?;
                Ok::<_, Error>((data(broadcast), data(received)))
            })
            .unwrap();
        for (rank, (broadcast, received)) in results.into_iter().enumerate() {
            assert_eq!(broadcast, vec![(n - 1) as f32; 2]);
            assert_eq!(received, vec![((rank + n - 1) % n) as f32, 7.0]);
        }
    }
}

#[test]
fn collectives_on_autodiff_tensors_run_on_the_values() {
    let results = tensor_parallel_cluster(2)
        .run(|ctx| {
            let r = ctx.tensor().rank() as f32;
            let x =
                Tensor::<TestBackend, 1>::from_floats([r, 1.0], &Default::default()).require_grad();
            let sum = ctx.tensor().all_reduce(x, ReduceOp::Sum)?;
            Ok::<_, Error>(values(&sum.into_data()))
        })
        .unwrap();
    assert_eq!(results, vec![vec![1.0, 2.0]; 2]);
}

#[test]
fn groups_of_a_3d_layout_reduce_independently() {
    // tp 2 x dp 2 x pp 2: every group sums its members' global ranks.
    let layout = Layout::new(2, 2, 2).unwrap();
    let results = LocalCluster::new(layout)
        .run(|ctx| {
            let me = || row(vec![ctx.rank() as f32]);
            let tp = data(ctx.tensor().all_reduce(me(), ReduceOp::Sum)?)[0];
            let dp = data(ctx.data().all_reduce(me(), ReduceOp::Sum)?)[0];
            let pp = data(ctx.pipeline().all_reduce(me(), ReduceOp::Sum)?)[0];
            let world = data(ctx.world().all_reduce(me(), ReduceOp::Sum)?)[0];
            Ok::<_, Error>([tp, dp, pp, world])
        })
        .unwrap();
    for (rank, sums) in results.into_iter().enumerate() {
        let members_sum = |members: Vec<usize>| members.iter().sum::<usize>() as f32;
        let expected = [
            members_sum(layout.tensor_group(rank)),
            members_sum(layout.data_group(rank)),
            members_sum(layout.pipeline_group(rank)),
            28.0,
        ];
        assert_eq!(sums, expected, "rank {rank}");
    }
}

#[test]
fn a_missing_rank_times_out_with_the_group_rank_and_operation() {
    let started = Instant::now();
    let outcomes = tensor_parallel_cluster(2)
        .with_timeout(Duration::from_millis(300))
        .run_each(|ctx| {
            if ctx.rank() == 1 {
                return Ok(()); // never joins the all-reduce
            }
            ctx.tensor()
                .all_reduce(row(vec![1.0]), ReduceOp::Sum)
                .map(|_| ())
        });
    let elapsed = started.elapsed();
    let error = outcomes[0].as_ref().unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, Error::RankFailed { rank: 0, .. }),
        "{message}"
    );
    assert!(
        message.contains("all_reduce on group `tp[0, 1]` failed on rank 0: timed out"),
        "{message}"
    );
    assert!(message.contains("waiting for ranks [1]"), "{message}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}

#[test]
fn a_failing_rank_makes_the_others_fail_fast() {
    let started = Instant::now();
    let outcomes = tensor_parallel_cluster(3)
        .with_timeout(Duration::from_secs(120))
        .run_each(|ctx| {
            if ctx.rank() == 1 {
                panic!("out of memory on purpose");
            }
            ctx.tensor()
                .all_reduce(row(vec![1.0]), ReduceOp::Sum)
                .map(|_| ())
        });
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(10),
        "the others waited {elapsed:?} instead of failing fast"
    );
    for rank in [0, 2] {
        let message = outcomes[rank].as_ref().unwrap_err().to_string();
        assert!(
            message.contains(
                "the group was aborted: rank 1 failed: panicked: out of memory on purpose"
            ),
            "rank {rank}: {message}"
        );
    }
    // `run` reports the rank that failed first, not the ones it took down.
    let error = tensor_parallel_cluster(3)
        .run(|ctx| {
            if ctx.rank() == 2 {
                return Err("bad batch");
            }
            ctx.tensor()
                .all_reduce(row(vec![1.0]), ReduceOp::Sum)
                .map(|_| ())
                .map_err(|_| "aborted")
        })
        .unwrap_err();
    assert_eq!(error.to_string(), "rank 2 failed: bad batch");
}

#[test]
fn mismatched_operations_and_shapes_are_errors_not_hangs() {
    let outcomes = tensor_parallel_cluster(2).run_each(|ctx| match ctx.rank() {
        0 => ctx
            .tensor()
            .all_reduce(row(vec![1.0, 2.0]), ReduceOp::Sum)
            .map(|_| ()),
        _ => ctx.tensor().all_gather(row(vec![1.0, 2.0]), 0).map(|_| ()),
    });
    let messages: Vec<String> = outcomes
        .iter()
        .map(|o| o.as_ref().unwrap_err().to_string())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("every rank of a group must call the same collectives")),
        "{messages:?}"
    );

    let outcomes = tensor_parallel_cluster(2).run_each(|ctx| {
        let width = 2 + ctx.rank();
        ctx.tensor()
            .all_reduce(row(vec![1.0; width]), ReduceOp::Sum)
            .map(|_| ())
    });
    let message = outcomes[0].as_ref().unwrap_err().to_string();
    assert!(
        message.contains("rank 1 gave shape [1, 3] but rank 0 gave [1, 2]"),
        "{message}"
    );

    let outcomes = tensor_parallel_cluster(2).run_each(|ctx| {
        ctx.tensor()
            .reduce_scatter(row(vec![1.0; 3]), 1, ReduceOp::Sum)
            .map(|_| ())
    });
    let error = outcomes[0].as_ref().unwrap_err();
    assert!(
        error
            .to_string()
            .contains("which 2 ranks cannot split evenly"),
        "{error}"
    );

    let outcomes = tensor_parallel_cluster(2).run_each(|ctx| {
        if ctx.rank() == 0 {
            ctx.tensor().send(row(vec![1.0; 3]), 1)
        } else {
            ctx.tensor()
                .recv::<Plain, 2>([1, 2], 0, &Default::default())
                .map(|_| ())
        }
    });
    let message = outcomes[1].as_ref().unwrap_err().to_string();
    assert!(
        message.contains("expected shape [1, 2] from rank 0 but it sent [1, 3]"),
        "{message}"
    );
}

#[test]
fn a_panicking_thread_outside_local_cluster_aborts_its_world() {
    use burn_megatron::parallel::{LocalWorld, ParallelContext};
    let layout = Layout::new(2, 1, 1).unwrap();
    let world = LocalWorld::new(2, Duration::from_secs(120));
    let started = Instant::now();
    let outcome = std::thread::scope(|scope| {
        let rank1 = scope.spawn(|| {
            let _ctx = ParallelContext::local(layout, 1, &world);
            panic!("rank 1 dies holding its groups");
        });
        let ctx = ParallelContext::local(layout, 0, &world);
        let outcome = ctx
            .tensor()
            .all_reduce(row(vec![1.0]), ReduceOp::Sum)
            .map(|_| ());
        assert!(rank1.join().is_err(), "rank 1 panicked");
        outcome
    });
    let message = outcome.unwrap_err().to_string();
    assert!(message.contains("rank 1 failed: panicked"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn tcp_groups_run_every_collective_between_processes() {
    use burn_megatron::parallel::TcpWorld;
    let address = free_local_address();
    let n = 3;
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                let address = address.clone();
                scope.spawn(move || {
                    let world =
                        TcpWorld::connect(rank, n, &address, Duration::from_secs(30)).unwrap();
                    let group = world.group("tp", (0..n).collect());
                    let r = rank as f32;
                    let sum = data(
                        group
                            .all_reduce(row(vec![r + 1.0, -r]), ReduceOp::Sum)
                            .unwrap(),
                    );
                    let gathered = data(group.all_gather(row(vec![r]), 1).unwrap());
                    let scattered = data(
                        group
                            .reduce_scatter(
                                row((0..n).map(|j| 10.0 * r + j as f32).collect()),
                                1,
                                ReduceOp::Sum,
                            )
                            .unwrap(),
                    );
                    let broadcast = data(group.broadcast(row(vec![r; 2]), 2).unwrap());
                    group.send(row(vec![r, 7.0]), (rank + 1) % n).unwrap();
                    let received: Tensor<Plain, 2> = group
                        .recv([1, 2], (rank + n - 1) % n, &Default::default())
                        .unwrap();
                    group.barrier().unwrap();
                    world.finish();
                    (sum, gathered, scattered, broadcast, data(received))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, (sum, gathered, scattered, broadcast, received)) in results.into_iter().enumerate() {
        assert_eq!(sum, vec![6.0, -3.0]);
        assert_eq!(gathered, vec![0.0, 1.0, 2.0]);
        // Sum over ranks of 10 r + j at column j = rank: 30 + 3 rank.
        assert_eq!(scattered, vec![30.0 + 3.0 * rank as f32]);
        assert_eq!(broadcast, vec![2.0, 2.0]);
        assert_eq!(received, vec![((rank + n - 1) % n) as f32, 7.0]);
    }
}

/// A message sent to a rank that has not connected yet waits for it at the hub (it was
/// dropped, and the rank waited for it until the timeout: a pipeline job on a loaded
/// machine hung when its first stage sent activations before the last stage's process
/// had connected).
#[test]
fn tcp_messages_to_a_rank_not_connected_yet_wait_for_it() {
    use burn_megatron::parallel::TcpWorld;
    let address = free_local_address();
    let (sent, may_connect) = std::sync::mpsc::channel();
    let received = std::thread::scope(|scope| {
        let address_0 = address.clone();
        let rank0 = scope.spawn(move || {
            let world = TcpWorld::connect(0, 2, &address_0, Duration::from_secs(10)).unwrap();
            let group = world.group("pp", vec![0, 1]);
            group.send(row(vec![3.0, 4.0]), 1).unwrap();
            // Time for the hub to relay the message before rank 1 connects.
            std::thread::sleep(Duration::from_millis(500));
            sent.send(()).unwrap();
            group.barrier().unwrap();
            world.finish();
        });
        let rank1 = scope.spawn(move || {
            may_connect.recv().unwrap();
            let world = TcpWorld::connect(1, 2, &address, Duration::from_secs(10)).unwrap();
            let group = world.group("pp", vec![0, 1]);
            let received: Result<Tensor<Plain, 2>, _> = group.recv([1, 2], 0, &Default::default());
            let received = received.map(data);
            if received.is_ok() {
                group.barrier().unwrap();
            } else {
                world.abort("the message never came");
            }
            world.finish();
            received
        });
        let received = rank1.join().unwrap();
        let _ = rank0.join();
        received
    });
    assert_eq!(received.unwrap(), vec![3.0, 4.0]);
}
