"""`engine bench spec`: off and on side by side in one engine; greedy outputs must agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.cli import main
from tests.bench.test_offline_bench import TINY


def test_spec_bench_reports_both_runs(tmp_path: Path, capsys) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "spec.json"
    assert main(["bench", "spec", "--backend", "cpu", "--load-format", "dummy", "--model",
                 str(config), "--speculative-algorithm", "draft", "--speculative-draft-model",
                 str(config), "--batch-size", "1", "--output-len", "12", "--warmup-runs", "0",
                 "--max-total-tokens", "1024", "--output-json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["same_outputs"] and row["batch"] == 1
    # A draft of the target's own weights: (nearly) every draft accepted, so a step yields
    # more than one token; the proposer's time is counted apart.
    assert row["on"]["tokens_per_step"] > 1.5 and row["on"]["acceptance_rate"] > 0.5
    assert row["on"]["propose_ms"] > 0 and row["off"]["tokens_per_step"] == 1.0
    assert row["auto"]["output_tok_s"] > 0 and row["auto_speedup"] > 0
    assert "bound tok/s" in capsys.readouterr().out


def test_latency_bench_refuses_speculation() -> None:
    with pytest.raises(SystemExit, match="bench spec"):
        main(["bench", "latency", "--backend", "cpu", "--load-format", "dummy", "--model",
              "smollm2-135m", "--speculative-algorithm", "ngram"])
