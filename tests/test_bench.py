"""The benchmark (relay.tools.bench) end to end on a tiny scenario, run from a directory that is
not the checkout: the fake upstream, the relay and the load tester come from the installed
package."""

from __future__ import annotations

import shutil
from pathlib import Path

import relay
from relay.tools import bench


def test_a_tiny_scenario_runs_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = bench.Scenario("t", "4 streams of 5 tokens", 4, 5, 10, 1.0, 0.2, targets=("relay",))
    monkeypatch.setitem(bench.SCENARIOS, "t", tiny)
    results = bench.bench(["t"], 1, tmp_path)
    row = results["t"]["relay"]
    assert row["errors"] == 0 and row["completed"] >= 4, row
    exact, checked = row["exact"].split("/")  # a 10% sample of the streams
    assert exact == checked and int(checked) >= 1, row
    assert row["cpu_us_per_event"] > 0 and row["health_max_ms"] is not None
    assert "### t) 4 streams of 5 tokens" in bench.markdown(results)


def test_baseline_runs_the_relay_from_another_source_tree(tmp_path, monkeypatch):
    # A copy of the package that leaves a mark when it starts: the baseline is that tree.
    source = tmp_path / "before"
    shutil.copytree(Path(relay.__file__).parent, source / "relay")
    main = source / "relay" / "__main__.py"
    mark = tmp_path / "baseline-started"
    main.write_text(f"open({str(mark)!r}, 'w').close()\n" + main.read_text())
    monkeypatch.chdir(tmp_path)
    tiny = bench.Scenario("t", "4 streams of 5 tokens", 4, 5, 10, 1.0, 0.2, targets=("relay",))
    monkeypatch.setitem(bench.SCENARIOS, "t", tiny)
    results = bench.bench(["t"], 1, tmp_path, baseline=source)
    assert list(results["t"]) == ["relay", "baseline"]
    assert mark.exists()
    assert results["t"]["baseline"]["errors"] == 0
    assert "x the baseline's." in bench.markdown(results)


def test_the_floors_relay_answers_exact_plain_and_through_the_relays_codec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = bench.Scenario("t", "4 streams of 5 tokens", 4, 5, 10, 1.0, 0.2, targets=("relay",))
    monkeypatch.setitem(bench.SCENARIOS, "t", tiny)
    results = bench.bench(["t"], 1, tmp_path, only=("floor", "floor-codec"), floor=True)
    assert list(results["t"]) == ["floor", "floor-codec"]
    for row in results["t"].values():
        assert row["errors"] == 0 and row["completed"] >= 4, row
        exact, checked = row["exact"].split("/")
        assert exact == checked and int(checked) >= 1, row
        assert row["cpu_us_per_event"] > 0, row
