from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.disciplines import EDFQueue, SJFQueue
from traces.workload import Request


@dataclass(eq=False)
class Item:
    req: Request
    order: int
    t_arrival: float

    def __repr__(self) -> str:
        return f"Item({self.order})"


def item(order: int, inp: int = 10, out: int = 10, arrival: float = 0.0, slo: str = "") -> Item:
    return Item(Request(order, arrival, inp, out, slo_class=slo), order, arrival)


def drain(q, now: float = 0.0) -> list[int]:
    out = []
    while len(q):
        assert q.peek(now) is not None
        out.append(q.pop(now).order)
    assert q.peek(now) is None
    return out


def test_sjf_pops_shortest_first_ties_by_order_preempted_first():
    q = SJFQueue()
    a, b, c, p = item(0, 100, 10), item(1, 10, 5), item(2, 5, 10), item(3, 1000, 1000)
    for s in (a, c, b):
        q.push(s, now=0.0)
    q.push_front(p)
    assert [s.order for s in q] == [3, 1, 2, 0]
    assert drain(q) == [3, 1, 2, 0]


def test_sjf_aging_lets_old_long_jobs_ahead():
    q = SJFQueue(aging=10.0)  # tokens of priority per second waited
    q.push(item(0, 100, 10), now=0.0)  # 110 - 10 * (t - 0)
    q.push(item(1, 10, 5), now=10.0)  # 15 - 10 * (t - 10) = 115 - 10 t: behind item 0
    q.push(item(2, 10, 5), now=9.0)  # 105 - 10 t: ahead of item 0
    assert drain(q, now=10.0) == [2, 0, 1]
    assert q.overtake_window(110.0) == pytest.approx(10.9)


def test_sjf_uses_the_given_predictor():
    q = SJFQueue(predict_output=lambda req: 0)  # by prompt length only
    q.push(item(0, 20, 1), now=0.0)
    q.push(item(1, 10, 500), now=0.0)
    assert drain(q) == [1, 0]


def test_edf_pops_earliest_deadline_first():
    q = EDFQueue({"chat": 1.0, "batch": 60.0}, default_deadline=10.0)
    q.push(item(0, arrival=0.0, slo="batch"), now=5.0)  # 60
    q.push(item(3, arrival=5.0, slo="chat"), now=5.0)  # 6
    q.push(item(2, arrival=0.0, slo="other"), now=5.0)  # 10 (default)
    q.push(item(1, arrival=5.0, slo="chat"), now=5.0)  # 6, lower order
    assert drain(q) == [1, 3, 2, 0]


@pytest.mark.parametrize("make", [SJFQueue, EDFQueue])
def test_remove_len_iter_and_errors(make):
    q = make()
    xs = [item(i, inp=10 + i, arrival=float(i)) for i in range(4)]
    for x in xs[:3]:
        q.push(x, now=3.0)
    q.push_front(xs[3])
    q.remove(xs[1])
    q.remove(xs[3])
    assert len(q) == 2 and [s.order for s in q] == [0, 2]
    with pytest.raises(ValueError):
        q.remove(xs[1])
    with pytest.raises(ValueError, match="already queued"):
        q.push(xs[0], now=3.0)
    q.push(xs[1], now=3.0)  # a removed item can come back
    assert drain(q, now=3.0) == [0, 1, 2]
    with pytest.raises(IndexError):
        q.pop(now=3.0)


def test_validation():
    with pytest.raises(ValueError, match="aging"):
        SJFQueue(aging=-1.0)
    with pytest.raises(ValueError, match="deadlines"):
        EDFQueue({"chat": -1.0})
    with pytest.raises(ValueError, match="default_deadline"):
        EDFQueue(default_deadline=-1.0)


@settings(max_examples=150, deadline=None)
@given(aging=st.floats(0.5, 200.0), pop_interval=st.floats(0.1, 2.0),
       jobs=st.lists(st.tuples(st.floats(0, 3.0), st.integers(1, 500), st.integers(1, 500)), min_size=1, max_size=60))
def test_sjf_with_aging_never_starves(aging, pop_interval, jobs):
    """A server pops every `pop_interval` s; every item is popped within the documented bound."""
    q = SJFQueue(aging=aging)
    pushes, t = [], 0.0
    for i, (gap, inp, out) in enumerate(jobs):
        t += gap
        pushes.append((t, item(i, inp, out)))
    pushed_at: dict[int, float] = {}
    q_len: dict[int, int] = {}
    popped: list[tuple[float, int]] = []
    k, tick = 0, pop_interval
    while k < len(pushes) or len(q):
        if k < len(pushes) and pushes[k][0] <= tick:  # pushes at the same instant as a pop go first
            t_push, x = pushes[k]
            q_len[x.order], pushed_at[x.order] = len(q), t_push
            q.push(x, t_push)
            k += 1
            continue
        if len(q):
            popped.append((tick, q.pop(tick).order))
        tick += pop_interval
    assert sorted(o for _, o in popped) == list(range(len(jobs)))
    pop_index = {o: n for n, (_, o) in enumerate(popped)}
    for x_pos, (t_pop, x) in enumerate(popped):
        size = q.job_size(pushes[x][1].req)
        horizon = pushed_at[x] + q.overtake_window(size, min_job_size=1.0) + 1e-6
        later = [y for y in range(x + 1, len(jobs)) if pushed_at[y] <= horizon]  # the only possible overtakers
        assert all(pop_index[y] > x_pos for y in range(x + 1, len(jobs)) if y not in later)
        pops_waited = sum(1 for t_o, _ in popped if pushed_at[x] <= t_o <= t_pop)
        assert pops_waited <= q_len[x] + len(later) + 1
        assert t_pop - pushed_at[x] <= SJFQueue.wait_bound(q_len[x], len(later), pop_interval) + 1e-6


@settings(max_examples=100, deadline=None)
@given(jobs=st.lists(st.tuples(st.floats(0, 100), st.sampled_from(["a", "b", "zz"])), max_size=40))
def test_edf_pops_in_deadline_order(jobs):
    q = EDFQueue({"a": 1.0, "b": 5.0}, default_deadline=3.0)
    xs = [item(i, arrival=t, slo=c) for i, (t, c) in enumerate(jobs)]
    for x in xs:
        q.push(x, now=100.0)
    order = drain(q, now=100.0)
    keys = [(q.deadline(xs[i]), i) for i in order]
    assert keys == sorted(keys)
