"""The pipeline model against what the bottleneck and the queues must give."""

import pytest

from decoupled.scaling import estimate_speedup, simulate_pipeline


def test_equal_stages_and_free_transfers_run_at_one_stage_per_batch():
    run = simulate_pipeline([0.5, 0.5, 0.5], [0.0, 0.0], capacity=2, batches=100)
    assert run.throughput == pytest.approx(2.0)
    assert run.busy == pytest.approx([1.0, 1.0, 1.0])
    assert run.makespan == pytest.approx((100 + 2) * 0.5)  # fill the pipe, then one batch per stage time


def test_the_slowest_stage_bounds_throughput_and_is_always_busy():
    run = simulate_pipeline([1.0, 2.0, 1.0], [0.0, 0.0], capacity=3, batches=100)
    assert run.throughput == pytest.approx(0.5)
    assert run.busy == pytest.approx([0.5, 1.0, 0.5])


def test_a_slow_consumer_holds_its_producer_back_through_the_queue():
    # the producer is fast, but may run at most `capacity` batches ahead of the consumer
    run = simulate_pipeline([0.1, 1.0], [0.0], capacity=1, batches=100)
    assert run.throughput == pytest.approx(1.0) and run.busy == pytest.approx([0.1, 1.0])


def test_one_queue_slot_puts_the_transfer_on_the_critical_path():
    # with one slot, stage 0 waits for each batch to reach stage 1 before it starts the next
    slow = simulate_pipeline([1.0, 1.0], [0.5], capacity=1, batches=100)
    assert slow.throughput == pytest.approx(1 / 1.5)
    # with room to send ahead, the transfer overlaps the compute and only delays the start
    overlapped = simulate_pipeline([1.0, 1.0], [0.5], capacity=4, batches=100)
    assert overlapped.throughput == pytest.approx(1.0)
    assert overlapped.makespan == pytest.approx(100 + 1 + 0.5)


def test_a_link_slower_than_the_stages_is_the_bottleneck():
    run = simulate_pipeline([1.0, 1.0], [3.0], capacity=8, batches=200)
    assert run.throughput == pytest.approx(1 / 3.0)
    assert run.busy == pytest.approx([1 / 3, 1 / 3])


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="transfer"):
        simulate_pipeline([1.0, 1.0], [], capacity=1, batches=10)
    with pytest.raises(ValueError, match="capacity"):
        simulate_pipeline([1.0], [], capacity=0, batches=10)


def test_speedup_of_even_stages_is_K_times_the_work_without_aux_heads():
    layer, head, n = 0.01, 0.002, 6
    estimates = estimate_speedup([layer] * n, [head] * n, [1000] * n, Ks=[1, 2, 3, 6], bandwidth_bytes_per_s=float("inf"), latency_s=0.0, batch_size=64)
    for est in estimates:
        assert est.counts == [n // est.K] * est.K and est.ideal == est.K
        assert est.images_per_s == pytest.approx(64 / (n // est.K * layer + head))
        assert est.speedup == pytest.approx(est.K * (n * layer + head) / (n * layer + est.K * head))
    assert estimates[0].speedup == pytest.approx(1.0)  # one module is backprop's worker


def test_transfers_cost_throughput_when_they_are_slowest():
    # 4 layers of 10 ms, no heads; 1 MB per image at 1 GB/s and batch 10 = 10 ms + 5 ms latency per boundary
    (est,) = estimate_speedup([0.01] * 4, [0.0] * 4, [10**6] * 4, Ks=[4], bandwidth_bytes_per_s=1e9, latency_s=0.005, batch_size=10)
    assert est.images_per_s == pytest.approx(10 / 0.015)
    assert est.speedup == pytest.approx(0.04 / 0.015)
