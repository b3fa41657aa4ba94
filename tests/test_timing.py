"""StageTimer: exact totals over every call, quantiles over a bounded window, drain for metrics, thread safety."""

import threading

from leo_rt import timing
from leo_rt.timing import StageTimer


def test_an_endless_stream_keeps_a_bounded_window_and_exact_totals():
    timer = StageTimer("cpu")
    n = timing.WINDOW + 1000
    for i in range(n):  # the first 1000 calls are slow (10 ms a frame), the window holds only fast ones (1 ms)
        timer._add("render", (0.02 if i < 1000 else 0.002), 2)
    assert len(timer.records["render"]) == timing.WINDOW
    s = timer.summary()["render"]
    assert s["calls"] == n and s["frames"] == 2 * n
    assert abs(s["total_s"] - (1000 * 0.02 + timing.WINDOW * 0.002)) < 1e-9
    assert abs(s["p95_ms"] - 1.0) < 1e-9  # the slow calls have left the window
    assert abs(s["ms_per_frame"] - 1e3 * s["total_s"] / (2 * n)) < 1e-9  # but still count in the mean


def test_drain_hands_out_each_call_once_and_keeps_the_totals():
    timer = StageTimer("cpu")
    with timer.stage("render", 4):
        pass
    with timer.stage("write", 4, host=True):
        pass
    first = timer.drain()
    assert sorted(name for name, _, _ in first) == ["render", "write"]
    assert all(t >= 0 and f == 4 for _, t, f in first)
    assert timer.drain() == []
    with timer.stage("render", 1):
        pass
    assert [(name, f) for name, _, f in timer.drain()] == [("render", 1)]
    assert timer.summary()["render"]["calls"] == 2 and timer.summary()["render"]["frames"] == 5


def test_stages_timed_from_several_threads_are_all_counted():
    timer = StageTimer("cpu")
    barrier = threading.Barrier(4)

    def work(name):
        barrier.wait()
        for i in range(3000):
            with timer.stage(name, 1):
                pass
            if name == "a" and i % 100 == 0:
                timer.summary()  # a reader interleaved with the writers

    threads = [threading.Thread(target=work, args=(n,)) for n in ("a", "b", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = timer.summary()
    assert (s["a"]["calls"], s["b"]["calls"], s["c"]["calls"]) == (3000, 6000, 3000)
    timer.reset()
    assert timer.summary() == {} and timer.drain() == []
