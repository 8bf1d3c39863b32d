"""Finished work survives a failure or Ctrl-C at any point of a run into a directory, and ``--resume`` picks up
where the run stopped: per input, the old complete file or the new complete one, never a partial file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from penguin_vl import PenguinEncoder
from penguin_vl.cli import main
from penguin_vl.encode import files, sinks


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert main(["init-checkpoint", str(path), "--tiny", "--dtype", "float32", "--seed", "7"]) == 0
    return path


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    Path("data").mkdir()
    for i, (w, h) in enumerate([(45, 31), (20, 70), (64, 40), (30, 30), (50, 22)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(f"data/img{i}.png")
    return Path("data")


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def _merge(path: Path) -> int:
    return json.loads(_read(path)[1]["settings"])["merge_size"]


def _fail_on(monkeypatch, obj, name: str, call: int, error: type[BaseException], partial: str | None = None) -> list:
    """Make ``obj.name`` raise ``error`` on its ``call``-th call, after writing a partial file first when
    ``partial`` names the argument that holds its path."""
    calls: list[int] = []
    original = getattr(obj, name)

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            if partial is not None:
                Path(kwargs.get(partial) or args[1]).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
            raise error("simulated")
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapped)
    return calls


def _inject(monkeypatch, point: str, error: type[BaseException]) -> None:
    if point == "forward":
        _fail_on(monkeypatch, PenguinEncoder, "forward", 3, error)
    elif point == "save":  # safetensors has written part of the third file
        _fail_on(monkeypatch, sinks, "save_file", 3, error, partial="filename")
    elif point == "rename":  # the third file is written whole under its temporary name
        _fail_on(monkeypatch, files.os, "replace", 3, error)
    else:  # the index is half written

        def partial_index(text):
            def write(tmp):
                Path(tmp).write_text(text[: len(text) // 2])
                raise error("simulated")

            return write

        monkeypatch.setattr(sinks, "write_text", partial_index)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError], ids=["ctrl-c", "crash"])
@pytest.mark.parametrize("point", ["forward", "save", "rename", "index"])
def test_interrupted_overwrite_keeps_every_file_whole_and_resume_finishes(data, ckpt, monkeypatch, point, error):
    args = ["encode", "data", "--model", str(ckpt), "--out-dir", "od"]
    assert main(args) == 0  # a finished run at merge size 1
    old_index = Path("od/index.json").read_bytes()
    names = json.loads(old_index)["inputs"]

    with monkeypatch.context() as m:
        _inject(m, point, error)
        if error is KeyboardInterrupt:
            assert main([*args, "--overwrite", "--merge-size", "2"]) == 130
        else:
            with pytest.raises(RuntimeError, match="simulated"):
                main([*args, "--overwrite", "--merge-size", "2"])
    assert Path("od/index.json").read_bytes() == old_index
    assert sorted(p.name for p in Path("od").iterdir()) == sorted([*names.values(), "index.json"])  # no .tmp
    merges = {name: _merge(Path("od") / file) for name, file in names.items()}  # each file loads whole
    assert set(merges.values()) <= {1, 2}
    redone = [n for n, merge in merges.items() if merge == 2]
    assert len(redone) == (len(names) if point == "index" else 2)

    with monkeypatch.context() as m:
        calls = _fail_on(m, PenguinEncoder, "forward", -1, RuntimeError)  # counts the forwards
        assert main([*args, "--overwrite", "--merge-size", "2", "--resume"]) == 0
    assert len(calls) == len(names) - len(redone)
    index = json.loads(Path("od/index.json").read_text())
    assert index["inputs"] == names and json.loads(index["metadata"]["settings"])["merge_size"] == 2

    assert main(["encode", "data", "--model", str(ckpt), "--out-dir", "fresh", "--merge-size", "2"]) == 0
    for name, file in names.items():
        resumed, fresh = _read(Path("od") / file)[0], _read(Path("fresh") / file)[0]
        for key in ("features", "grid", "merge"):
            assert torch.equal(resumed[key], fresh[key]), (name, key)


def test_resume_keeps_only_outputs_of_the_same_inputs_model_and_settings(data, ckpt, monkeypatch, capsys):
    args = ["encode", "data", "--model", str(ckpt), "--out-dir", "od"]
    assert main(args) == 0
    calls = _fail_on(monkeypatch, PenguinEncoder, "forward", -1, RuntimeError)
    assert main([*args, "--resume"]) == 0 and calls == []  # everything there: nothing encoded, index rewritten
    assert "kept    5 complete outputs" in capsys.readouterr().err

    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save("data/img1.png")  # an input changes
    os.utime("data/img1.png", ns=(0, 10**18))
    assert main([*args, "--resume"]) == 2  # its old output is in the way
    err = capsys.readouterr().err
    assert "data__img1.png.safetensors" in err and "--overwrite" in err
    assert main([*args, "--resume", "--overwrite"]) == 0 and len(calls) == 1

    assert main([*args, "--resume", "--dtype", "float16"]) == 2  # other settings: everything is in the way
    assert main(["encode", "data", "--model", str(ckpt), "--out", "o.safetensors", "--resume"]) == 2
    assert "--resume needs --out-dir" in capsys.readouterr().err


def test_resume_replaces_a_damaged_file(data, ckpt, monkeypatch):
    args = ["encode", "data", "--model", str(ckpt), "--out-dir", "od"]
    assert main(args) == 0
    damaged = Path("od/data__img3.png.safetensors")
    damaged.write_bytes(damaged.read_bytes()[:-7])  # cut by something else than this command
    calls = _fail_on(monkeypatch, PenguinEncoder, "forward", -1, RuntimeError)
    assert main([*args, "--resume", "--overwrite"]) == 0 and len(calls) == 1
    assert _read(damaged)[1]["name"] == "data/img3.png"
