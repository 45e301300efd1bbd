"""The scale bench's verdicts (pure): what passes a point and what the curve reports."""

from __future__ import annotations

import re

from bench.scale import Point, capacity, cpu_per_request_ms, judge, markdown


def point(op: str, replicas: int, achieved: float, p99: float, passed: bool, redis: str = "single") -> Point:
    return Point(redis, replicas, op, int(achieved), int(achieved * 2), int(achieved * 2), 0, achieved,
                 p99 / 2, p99, passed, {"l2-gateway": 0.5, "nats": 0.25, "generator": 1.0})


def test_a_point_passes_only_within_the_p99_objective_errors_and_offered_rate():
    assert judge("get", 1000, 2000, 0, 990.0, 9.9)
    assert not judge("get", 1000, 2000, 0, 990.0, 10.1)  # gets: p99 <= 10 ms
    assert judge("append", 1000, 2000, 0, 990.0, 19.9)  # appends: p99 <= 20 ms
    assert not judge("append", 1000, 2000, 3, 990.0, 5.0)  # more than 0.1 % failed
    assert not judge("append", 1000, 2000, 0, 900.0, 5.0)  # carried < 95 % of offered
    assert not judge("get", 1000, 0, 0, 0.0, 1.0)  # nothing sent


def test_capacity_is_the_highest_passing_rate_of_that_configuration_only():
    points = [point("get", 1, 500, 5, True), point("get", 1, 1000, 8, True), point("get", 1, 2000, 40, False),
              point("get", 2, 3000, 5, True), point("get", 1, 4000, 5, True, redis="cluster")]
    assert capacity(points, "single", 1, "get") == 1000
    assert capacity(points, "single", 2, "get") == 3000
    assert capacity(points, "single", 4, "get") == 0.0
    assert capacity(points, "single", 1, "append") == 0.0


def test_cpu_per_request_leaves_out_the_generator():
    assert cpu_per_request_ms(point("get", 1, 750, 5, True)) == 1.0  # 0.75 cores / 750 per s


def test_the_report_says_the_box_was_shared_and_states_the_objectives():
    data = {"started": "now", "quick": True, "seconds_per_point": 2.0, "users": 200, "p99_get_ms": 10.0,
            "p99_append_ms": 20.0, "cores": 2, "points": [vars(point("get", 1, 500, 5, True))]}
    text = markdown(data)
    assert "shared with other sessions" in text and "p99 <= 10 ms" in text and "p99 <= 20 ms" in text
    assert re.search(r"\| redis single\s+\|\s+1 \|\s+500 \|", text)  # its capacity row
