"""The serving benchmark's arithmetic (`benchmarks/vllm_throughput.py`): percentiles, spreads over passes, the
verdict on when merging stops paying, the alternating load order and the distinct images. Needs no vLLM; the
benchmark itself runs against real servers in tests/test_vllm_throughput.py."""

from __future__ import annotations

import statistics

import pytest

from pitome_mllm.testing.scripts import load_benchmark_script


@pytest.fixture(scope="module")
def bench():
    return load_benchmark_script("vllm_throughput")


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], [0.1 * i * i for i in range(23)]])
def test_percentiles_match_the_inclusive_definition(bench, values):
    ordered = sorted(values)
    assert bench.percentile(ordered, 50) == pytest.approx(statistics.median(values))
    assert bench.percentile(ordered, 0) == ordered[0]
    assert bench.percentile(ordered, 100) == ordered[-1]
    if len(values) > 1:
        inclusive = statistics.quantiles(values, n=20, method="inclusive")
        assert bench.percentile(ordered, 95) == pytest.approx(inclusive[-1])


def test_percentile_of_nothing_is_an_error(bench):
    with pytest.raises(ValueError, match="no values"):
        bench.percentile([], 50)


def load(requests_per_s: float, ttft: float = 0.5) -> dict:
    return {
        "requests_per_s": requests_per_s,
        "ttft_p50_s": ttft,
        "ttft_p95_s": 2 * ttft,
        "server_cpu_s_per_request": 1 / requests_per_s,
        "prompt_tokens": [80],
    }


def test_summary_gives_median_and_range_over_passes(bench):
    cell = bench.summary([load(2.0), load(5.0), load(3.0)])
    assert cell["passes"] == 3
    assert cell["requests_per_s"] == {"median": 3.0, "min": 2.0, "max": 5.0, "all": [2.0, 5.0, 3.0]}
    assert cell["ttft_p95_s"]["median"] == 1.0


def test_overlapping_ranges_are_not_a_difference(bench):
    base = bench.summary([load(1.0), load(1.2), load(1.1)])
    assert bench.separated(bench.summary([load(1.3), load(1.5), load(1.4)]), base)
    assert bench.separated(bench.summary([load(0.5), load(0.9), load(0.7)]), base)
    assert not bench.separated(bench.summary([load(1.15), load(1.9), load(1.6)]), base)


def rows_for(speeds: dict[str, dict[int, list[float]]]) -> list[dict]:
    return [
        {"label": label, "cells": {str(clients): bench_summary(passes) for clients, passes in cells.items()}}
        for label, cells in speeds.items()
    ]


def bench_summary(passes: list[float]) -> dict:
    values = {"median": statistics.median(passes), "min": min(passes), "max": max(passes), "all": passes}
    return {"requests_per_s": values}


def test_the_verdict_names_the_first_concurrency_without_a_gain(bench):
    rows = rows_for(
        {
            "unpatched": {1: [1.0, 1.1, 1.2], 4: [2.0, 2.1, 2.2], 16: [3.0, 3.5, 4.0]},
            "128": {1: [2.0, 2.1, 2.2], 4: [3.0, 3.1, 3.2], 16: [3.9, 4.5, 5.0]},
            "64": {1: [2.5, 2.6, 2.7], 4: [1.9, 2.0, 2.1], 16: [6.0, 6.1, 6.2]},
            "32": {1: [3.0, 3.1, 3.2], 4: [4.0, 4.1, 4.2], 16: [6.0, 6.1, 6.2]},
        }
    )
    assert bench.stops_paying(rows, [1, 4, 16]) == [
        "128 tokens: no gain beyond the spread at 16 clients",
        "64 tokens: no gain beyond the spread at 4 clients",
        "32 tokens: faster than unpatched beyond the spread at every concurrency",
    ]


def test_every_server_is_first_as_often_as_last(bench):
    orders = [bench.load_order(4, p, level) for p in range(3) for level in range(4)]
    assert all(sorted(order) == [0, 1, 2, 3] for order in orders)
    firsts = [order[0] for order in orders]
    assert firsts.count(0) == firsts.count(3) == len(orders) // 2


def test_requests_get_distinct_images_of_one_size(bench):
    from pitome_mllm.assets import load_image

    photos = [load_image(name) for name in bench.PHOTOS]
    images = [bench.distinct_image(photos, index, 56) for index in range(12)]
    assert {image.size for image in images} == {(56, 56)}
    assert len({image.tobytes() for image in images}) == 12
    with pytest.raises(ValueError, match="distinct images"):
        bench.distinct_image(photos, 17 * 17 * len(photos), 56)
