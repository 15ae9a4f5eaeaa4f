"""Request planning: fewest requests, limits respected, every point covered once."""

from __future__ import annotations

from edge.drivers.planner import plan_requests
from protocol.profile import Point, builtin_profile


def p(name: str, address: int, type_: str = "uint16", table: str = "holding") -> Point:
    return Point(name=name, address=address, type=type_, table=table)  # type: ignore[arg-type]


def spans(reqs: list) -> list[tuple[str, int, int]]:  # type: ignore[type-arg]
    return [(r.table, r.address, r.count) for r in reqs]


def test_adjacent_and_near_points_merge() -> None:
    reqs = plan_requests([p("a", 0), p("b", 1, "uint32"), p("c", 10)], max_gap=8)
    assert spans(reqs) == [("holding", 0, 11)]
    assert [q.name for q in reqs[0].points] == ["a", "b", "c"]


def test_gap_larger_than_allowed_splits() -> None:
    assert spans(plan_requests([p("a", 0), p("b", 10)], max_gap=8)) == [("holding", 0, 1), ("holding", 10, 1)]
    assert spans(plan_requests([p("a", 0), p("b", 2)], max_gap=0)) == [("holding", 0, 1), ("holding", 2, 1)]


def test_request_size_limit_splits() -> None:
    pts = [p(f"r{i}", i * 2, "uint32") for i in range(100)]  # 200 registers, contiguous
    reqs = plan_requests(pts, max_registers=125)
    assert spans(reqs) == [("holding", 0, 124), ("holding", 124, 76)]
    assert sum(len(r.points) for r in reqs) == 100
    small = plan_requests(pts[:10], max_registers=8)
    assert all(r.count <= 8 for r in small) and sum(len(r.points) for r in small) == 10


def test_tables_never_mix_and_slices_are_right() -> None:
    reqs = plan_requests([p("h", 0), p("i", 0, table="input"), p("i2", 3, "int32", table="input")])
    assert spans(reqs) == [("holding", 0, 1), ("input", 0, 5)]
    inp = reqs[1]
    assert inp.slice_for(inp.points[1], [10, 11, 12, 13, 14]) == [13, 14]


def test_shipped_profiles_need_one_request_per_table() -> None:
    boiler = builtin_profile("sim-boiler")
    assert spans(plan_requests(boiler.points)) == [("holding", 0, 1), ("input", 0, 13)]
    meter = builtin_profile("sim-meter")
    assert spans(plan_requests(meter.points)) == [("input", 0, 8)]
