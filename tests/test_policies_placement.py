import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.placement import (Assignment, Device, GpuTask, ReplicaSpec, TaskDevice, TaskScheduler, UnplacedReason,
                                place_replicas)


def test_exact_best_fit_decreasing_placement():
    devices = [Device("d0", 80), Device("d1", 80), Device("d2", 40), Device("d3", 40)]
    replicas = [ReplicaSpec("small", 30), ReplicaSpec("tiny", 40, tp=4), ReplicaSpec("big", 120, tp=2),
                ReplicaSpec("mid", 50)]
    p = place_replicas(devices, replicas)
    # Order: big (60/device), mid (50), small (30), tiny (10).
    assert p.assignments == {"big": ("d0", "d1"), "small": ("d2",), "tiny": ("d0", "d1", "d2", "d3")}
    assert [(u.replica.name, u.reason) for u in p.unplaced] == [("mid", UnplacedReason.FRAGMENTED)]
    assert p.free == {"d0": 10, "d1": 10, "d2": 0, "d3": 30}


def test_unplaced_reasons():
    devices = [Device(0, 10), Device(1, 10)]
    p = place_replicas(devices, [ReplicaSpec("wide", 4, tp=3), ReplicaSpec("huge", 21, tp=1)])
    assert {u.replica.name: u.reason for u in p.unplaced} == {"wide": UnplacedReason.TOO_FEW_DEVICES,
                                                             "huge": UnplacedReason.OUT_OF_MEMORY}
    assert p.assignments == {}


def test_tp_groups_stay_on_one_host_and_pick_the_tightest_host():
    devices = [Device("a0", 100, "A"), Device("a1", 100, "A"), Device("b0", 60, "B"), Device("b1", 60, "B")]
    p = place_replicas(devices, [ReplicaSpec("r", 100, tp=2)])
    assert p.assignments == {"r": ("b0", "b1")}
    p = place_replicas(devices, [ReplicaSpec("r", 3, tp=3)])
    assert p.unplaced[0].reason is UnplacedReason.TOO_FEW_DEVICES  # 4 devices, but at most 2 per host


def test_validation():
    with pytest.raises(ValueError, match="tp"):
        ReplicaSpec("r", 10, tp=0)
    with pytest.raises(ValueError, match="memory"):
        Device("d", -1)
    with pytest.raises(ValueError, match="unique"):
        place_replicas([Device(0, 1), Device(0, 1)], [])


@settings(max_examples=150, deadline=None)
@given(devs=st.lists(st.tuples(st.integers(0, 100), st.sampled_from("AB")), min_size=1, max_size=8),
       reps=st.lists(st.tuples(st.integers(1, 200), st.integers(1, 4)), max_size=10))
def test_placement_never_overcommits(devs, reps):
    devices = [Device(i, mem, host) for i, (mem, host) in enumerate(devs)]
    replicas = [ReplicaSpec(f"r{i}", mem, tp) for i, (mem, tp) in enumerate(reps)]
    p = place_replicas(devices, replicas)
    spec = {r.name: r for r in replicas}
    load = {d.id: 0 for d in devices}
    for name, group in p.assignments.items():
        assert len(group) == len(set(group)) == spec[name].tp
        assert len({devices[g].host for g in group}) == 1
        for g in group:
            load[g] += spec[name].per_device
    for d in devices:
        assert load[d.id] <= d.memory
        assert p.free[d.id] == d.memory - load[d.id]
    assert sorted([*p.assignments, *(u.replica.name for u in p.unplaced)]) == sorted(spec)
    for u in p.unplaced:  # free memory only shrinks, so what did not fit then does not fit now
        for host in "AB":
            assert sum(p.free[d.id] >= u.replica.per_device for d in devices if d.host == host) < u.replica.tp


def test_task_scheduler_exact():
    s = TaskScheduler([TaskDevice("fast", speed=2.0), TaskDevice("slow", speed=1.0)])
    assert s.submit(GpuTask(1, work=4.0), now=0.0) == Assignment("fast", 0.0, 2.0)
    assert s.submit(GpuTask(2, work=4.0), now=0.0) == ("fast", 2.0, 4.0)  # ties slow (0 -> 4): earlier device
    assert s.submit(GpuTask(3, work=2.0), now=0.0) == ("slow", 0.0, 2.0)
    s.complete(3, now=1.5)  # early
    assert s.free_at("slow") == 1.5
    s.complete(1, now=3.0)  # late by 1 s: task 2 now runs 3 -> 5
    assert s.free_at("fast") == 5.0
    assert s.pending("fast") == [2]
    assert s.submit(GpuTask(4, work=1.0), now=3.0) == ("slow", 3.0, 4.0)
    with pytest.raises(ValueError, match="already"):
        s.submit(GpuTask(4, work=1.0), now=3.0)
    with pytest.raises(KeyError):
        s.complete(99, now=4.0)


@settings(max_examples=100, deadline=None)
@given(speeds=st.lists(st.floats(0.25, 4.0), min_size=1, max_size=5),
       tasks=st.lists(st.tuples(st.floats(0, 5), st.floats(0, 2), st.floats(0.5, 1.5)), max_size=40))
def test_task_goes_to_the_earliest_predicted_finish(speeds, tasks):
    s = TaskScheduler([TaskDevice(i, sp) for i, sp in enumerate(speeds)])
    now = 0.0
    running: list[tuple[float, int]] = []
    for tid, (work, dt, err) in enumerate(tasks):
        now += dt
        for t_done, done in sorted(running):
            if t_done <= now:
                s.complete(done, t_done)
        running = [(t, i) for t, i in running if t > now]
        best = min(max(now, s.free_at(i)) + work / sp for i, sp in enumerate(speeds))
        dev, start, finish = s.submit(GpuTask(tid, work), now)
        assert finish == pytest.approx(best) and start >= now
        running.append((max(now, start + (finish - start) * err), tid))  # actual = predicted * err
