"""The Python API as the README shows it: its example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import gpunn

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)


def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    blocks = python_blocks("Use from Python")
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert re.fullmatch(r"epoch 20: validation accuracy \d+\.\d%\n", capsys.readouterr().out)
    assert (tmp_path / "model.npz").exists()


def test_the_api_lists_what_it_exports():
    assert set(gpunn.__all__) <= set(dir(gpunn))
    for name in ("fit", "TrainConfig", "get_backend", "load_model", "save_model", "evaluate", "predict_proba",
                 "split", "forward", "backward"):
        assert name in gpunn.__all__
