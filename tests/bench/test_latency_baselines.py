"""`engine bench latency --baseline ...` and the host-load check of every CPU benchmark.
(The HF baseline's run: tests/bench/test_roofline.py, on the latency run already there.)"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from engine.bench import hostload
from engine.bench.hostload import HostLoad
from engine.bench.latency_baselines import LLAMA_CPP_MISSING
from engine.cli import main


def test_llama_cpp_baseline_without_the_package_says_how_to_get_it(tmp_path: Path,
                                                                   monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(SystemExit) as e:
        main(["bench", "latency", "--backend", "cpu", "--model", str(tmp_path / "m.gguf"),
              "--batch-size", "1", "--baseline", "llama.cpp"])
    assert str(e.value) == LLAMA_CPP_MISSING and "pip install '.[bench]'" in str(e.value)


def test_llama_cpp_baseline_needs_batch_one(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--batch-size 1"):
        main(["bench", "latency", "--backend", "cpu", "--model", str(tmp_path / "m.gguf"),
              "--batch-size", "8", "--baseline", "llama.cpp"])


def test_an_unknown_baseline_is_refused_by_the_parser(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "latency", "--baseline", "vllm"])
    assert e.value.code == 2 and "invalid choice: 'vllm'" in capsys.readouterr().err


def test_a_busy_host_is_flagged_on_cpu_only(monkeypatch, caplog, capsys) -> None:
    loads = iter([(1.7, 1.0, 1.0), (0.2, 0.5, 0.5), (1.7, 1.0, 1.0)])
    monkeypatch.setattr(hostload.os, "getloadavg", lambda: next(loads))
    with caplog.at_level(logging.WARNING, logger="engine.bench.hostload"):
        busy = HostLoad.start(cpu=True).finish()
    assert (busy.load_before, busy.load_after, busy.busy_host) == (1.7, 0.2, True)
    assert len(caplog.records) == 1 and "1.70" in caplog.records[0].getMessage()
    assert "busy host" in capsys.readouterr().out
    assert not HostLoad.start(cpu=False).busy_host  # an accelerator run: reported, not flagged
