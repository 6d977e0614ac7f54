"""The accuracy-beside-peers benchmark at toy size, on the bundled sample: it runs every row, scores every
implementation on the same held-out digits, and writes a well-formed JSON and markdown table. scikit-learn and torch
are no gpunn dependencies, so their rows are checked only where they are installed (and skipped, with the reason,
where not)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import accuracy_peers  # noqa: E402

SEEDS = (0, 1)
TEST_SIZE = 500
# tiny epochs: enough to see each row train, few enough that the whole run takes seconds
EPOCHS = {"gd-784-10-10": 3, "adam-784-10-10": 2, "adam-784-100-10": 1, "adam-784-100-10-cosine": 2}
OPTIONAL = {"sklearn": "scikit-learn", "torch": "torch"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Any]:
    """One toy run of the script in a fresh interpreter, as a user runs it; its JSON, markdown and output."""
    out = tmp_path_factory.mktemp("accuracy")
    command = [sys.executable, str(BENCHMARKS / "accuracy_peers.py"), "--seeds", ",".join(map(str, SEEDS)),
               "--test-size", str(TEST_SIZE), "--out-dir", str(out), "--name", "toy",
               *[arg for row, n in EPOCHS.items() for arg in ("--epochs", f"{row}={n}")]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return {"data": json.loads((out / "toy.json").read_text()), "table": (out / "toy.md").read_text(),
            "stdout": result.stdout, "out": out}


def implementations(data: dict[str, Any], name: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(row, impl) for row in data["rows"] for impl in row["implementations"] if impl["name"] == name]


def check_runs(impl: dict[str, Any], row: dict[str, Any], test_size: int) -> None:
    assert impl["status"] == "ok", impl["status"]
    assert [run["seed"] for run in impl["runs"]] == row["seeds"]
    accuracies = [run["test_accuracy"] for run in impl["runs"]]
    for run in impl["runs"]:
        # a fraction of the held-out digits: a whole number of them
        assert 0 <= run["test_accuracy"] <= 1 and run["wall_s"] > 0 and run["cpu_s"] >= 0
        assert run["test_accuracy"] * test_size == pytest.approx(round(run["test_accuracy"] * test_size))
    assert impl["mean"] == pytest.approx(sum(accuracies) / len(accuracies))
    assert impl["min"] == min(accuracies) and impl["max"] == max(accuracies)
    assert impl["sd"] >= 0 if len(accuracies) > 1 else impl["sd"] is None
    assert impl["settings"], "every setting of every implementation is recorded"


def test_rows_and_data_are_recorded(toy):
    data = toy["data"]
    assert data["name"] == "toy" and data["command"].startswith("python ") and "--seeds 0,1" in data["command"]
    assert data["seeds"] == list(SEEDS)
    # the sample has no test part: digits are held out of it first, then gpunn's usual split of the rest
    assert data["data"]["test"] == TEST_SIZE and data["data"]["val"] == accuracy_peers.VAL_SIZE
    assert data["data"]["train"] == 5000 - TEST_SIZE - accuracy_peers.VAL_SIZE
    assert [row["id"] for row in data["rows"]] == list(accuracy_peers.ROW_IDS)
    for row in data["rows"]:
        assert row["settings"]["epochs"] == EPOCHS[row["id"]]
        # the costly full-batch row runs the first seed only, and says why; the others every seed
        cap = row["settings"]["max_seeds"]
        assert row["seeds"] == list(SEEDS[:cap] if cap else SEEDS)
        assert bool(row["seeds_note"]) == (row["seeds"] != list(SEEDS))
        assert [impl["name"] for impl in row["implementations"]] == ["gpunn", *row["settings"]["peers"]]
        assert f"--rows {row['id']}" in row["command"] and "--name" not in row["command"]
    env = data["machine"]
    assert env["cpu"] and env["usable_cores"] >= 1 and data["wall_s"] > 0
    assert len(data["load_average"]["start"]) == len(data["load_average"]["end"]) == 3


def test_gpunn_and_the_notebook_program(toy):
    data = toy["data"]
    for row, impl in implementations(data, "gpunn"):
        check_runs(impl, row, TEST_SIZE)
        assert impl["settings"]["epochs"] == EPOCHS[row["id"]] and impl["settings"]["l2"] == row["settings"]["l2"]
        # gpunn's own evaluate agrees with the script's scorer on the same weights
        for run in impl["runs"]:
            assert run["own_test_accuracy"] == pytest.approx(run["test_accuracy"], abs=2 / TEST_SIZE)
    (row, naive), = implementations(data, "numpy-naive")
    check_runs(naive, row, TEST_SIZE)
    # the same full-batch step from the same initial weights: the same digits right, to float rounding
    gpunn_runs = next(impl for impl in row["implementations"] if impl["name"] == "gpunn")["runs"]
    for ours, theirs in zip(gpunn_runs, naive["runs"]):
        assert theirs["test_accuracy"] == pytest.approx(ours["test_accuracy"], abs=2 / TEST_SIZE)


@pytest.mark.parametrize("peer", sorted(OPTIONAL))
def test_optional_peers(toy, peer):
    rows = implementations(toy["data"], peer)
    assert rows, f"no row has {peer}"
    if importlib.util.find_spec(peer) is None:
        for _, impl in rows:  # the script says why instead of failing
            assert impl["status"].startswith("unavailable") and OPTIONAL[peer].split("-")[0] in impl["status"]
        pytest.skip(f"{OPTIONAL[peer]} is not installed (not a gpunn dependency): its rows say so, unmeasured")
    for row, impl in rows:
        check_runs(impl, row, TEST_SIZE)
        if peer == "sklearn":
            params = impl["settings"]["get_params"]
            # gpunn's lambda is scikit-learn's alpha, and it runs exactly the row's epochs, never stopping early
            assert params["alpha"] == row["settings"]["l2"] and params["max_iter"] == row["settings"]["epochs"]
            assert params["n_iter_no_change"] >= params["max_iter"] and params["early_stopping"] is False
            assert params["batch_size"] == row["settings"]["batch_size"]
            assert all(run["details"]["epochs_run"] == row["settings"]["epochs"] for run in impl["runs"])
            # the mapping measured: scikit-learn's loss is gpunn's cost with lambda = alpha, on the same weights
            check = toy["data"]["l2_check"]
            assert check["relative_difference"] < 1e-9 and check["gpunn_l2_term"] > 1e-3
        else:
            assert impl["settings"]["epochs"] == row["settings"]["epochs"]


def test_table(toy):
    table, data = toy["table"], toy["data"]
    assert table in toy["stdout"]  # printed as written
    lines = table.splitlines()
    head = lines.index("| network | settings | gpunn | peers (same network, same settings) | command |")
    body = lines[head + 2: head + 2 + len(data["rows"])]
    assert len(body) == len(data["rows"])
    for line, row in zip(body, data["rows"]):
        cells = line.strip("|").split(" | ")
        assert len(cells) == 5 and cells[0].strip() == row["network"]
        gpunn = row["implementations"][0]
        if gpunn["sd"] is None:
            assert cells[2] == f"{100 * gpunn['mean']:.2f} % (seed {row['seeds'][0]} only)"
        else:
            assert cells[2] == f"{100 * gpunn['mean']:.2f} ± {100 * gpunn['sd']:.2f} %"
        assert row["command"] in cells[4]
    assert "alpha = λ exactly" in table and "load average" in table


def test_writes_nothing_without_a_name(tmp_path):
    """Without --name or --out-dir the script prints the table and writes no file."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "accuracy_peers.py"), "--rows", "gd-784-10-10", "--seeds", "0",
         "--epochs", "gd-784-10-10=1", "--test-size", "100"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "| 784-10-10 |" in result.stdout and "wrote" not in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_refuses_unknown_rows():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "accuracy_peers.py"), "--rows", "nope"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown row 'nope'" in result.stderr
