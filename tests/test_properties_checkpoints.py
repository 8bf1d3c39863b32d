"""Properties of checkpoint loading over damaged checkpoints: weights cut at any offset, header bytes
flipped, tensors stored in other dtypes or shapes, tensors missing or extra, configs cut or holding wrong
values, indexes that are not JSON. Each either loads the same weights or raises a documented error that
names the file or the tensor at fault; on the command line it exits 2 and leaves earlier output as it was."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from penguin_vl import PenguinEncoder
from penguin_vl.cli import main

# what loading a bad checkpoint may raise (CheckpointError is a ValueError)
DOCUMENTED = (ValueError, TypeError, FileNotFoundError)
DAMAGE = (
    "truncated", "header-byte", "int-dtype", "bool-dtype", "float64-dtype", "shape", "missing", "extra",
    "config-truncated", "config-not-an-object", "config-value", "index-garbage", "no-weights",
)  # fmt: skip
PIXELS = torch.randn(8 * 8 + 4 * 4, 3 * 14 * 14, generator=torch.Generator().manual_seed(0))
GRID, MERGE = torch.tensor([[1, 8, 8], [1, 4, 4]]), torch.tensor([1, 2])


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert main(["init-checkpoint", str(path), "--tiny", "--dtype", "float32", "--seed", "2"]) == 0
    features = PenguinEncoder.from_pretrained(path, backend="torch")(PIXELS, GRID, MERGE)
    return path, features


@pytest.fixture(scope="module")
def earlier_output(tmp_path_factory, original) -> Path:
    """An --out-dir an earlier run wrote, to be left as it is by a run that cannot load its model."""
    root = tmp_path_factory.mktemp("out")
    image = root / "img.npy"
    np.save(image, np.random.default_rng(0).integers(0, 256, (1, 30, 40, 3), dtype=np.uint8))
    assert main(["encode", str(image), "--model", str(original[0]), "--out-dir", str(root / "od"), "-q"]) == 0
    return root


def _damage(draw, ckpt: Path) -> tuple[str, list[str]]:
    """Damage the checkpoint in ``ckpt``; returns the damage and the words an error may name it by."""
    damage = draw(st.sampled_from(DAMAGE))
    weights, config = ckpt / "model.safetensors", ckpt / "config.json"
    tensors = load_file(weights)
    name = draw(st.sampled_from(sorted(tensors)))
    if damage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: draw(st.integers(0, len(data) - 1))])
        return damage, [str(weights)]
    if damage == "header-byte":
        data = bytearray(weights.read_bytes())
        header = 8 + struct.unpack("<Q", data[:8])[0]
        at = draw(st.integers(0, header - 1))
        data[at] ^= draw(st.integers(1, 255))
        weights.write_bytes(bytes(data))
        return damage, [str(weights), *tensors]  # a flip inside a name leaves a file with another tensor
    if damage in ("int-dtype", "bool-dtype", "float64-dtype", "shape", "missing", "extra"):
        if damage == "int-dtype":
            tensors[name] = (tensors[name] * 100).to(draw(st.sampled_from([torch.int32, torch.int8, torch.int64])))
        elif damage == "bool-dtype":
            tensors[name] = tensors[name] > 0
        elif damage == "float64-dtype":
            tensors[name] = tensors[name].double()
        elif damage == "shape":
            tensors[name] = torch.cat([tensors[name], tensors[name][:1]])
        elif damage == "missing":
            del tensors[name]
        else:
            name = "encoder.layers.0.mlp.extra_proj.weight"
            tensors[name] = torch.zeros(2, 2)
        save_file(tensors, weights)
        return damage, [name]
    if damage == "index-garbage":
        (ckpt / "model.safetensors.index.json").write_text('{"weight_map": ')
        return damage, [str(ckpt / "model.safetensors.index.json")]
    if damage == "no-weights":
        weights.unlink()
        return damage, [str(ckpt)]
    text = config.read_text()
    if damage == "config-truncated":
        config.write_text(text[: draw(st.integers(0, len(text) - 1))])
    elif damage == "config-not-an-object":
        config.write_text("[]")
    else:
        values = json.loads(text)
        key = draw(st.sampled_from(["hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size"]))
        values[key] = draw(st.sampled_from([None, -4, "64", 2.5, 0]))
        config.write_text(json.dumps(values))
    return damage, [str(config)]


@given(data=st.data())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_damaged_checkpoints(tmp_path, original, earlier_output, capsys, data):
    ckpt = Path(tempfile.mkdtemp(dir=tmp_path)) / "ckpt"
    shutil.copytree(original[0], ckpt)
    damage, culprits = _damage(data.draw, ckpt)
    try:
        model = PenguinEncoder.from_pretrained(ckpt, dtype=torch.float32, backend="torch")
    except DOCUMENTED as e:
        assert any(c in str(e) for c in culprits), f"{damage}: the error names none of {culprits}: {e}"
    else:
        # loaded: only where nothing that matters changed (a float64 copy, a flip in the metadata)
        assert torch.equal(model(PIXELS, GRID, MERGE), original[1]), f"{damage}: other weights loaded"
        return
    out = earlier_output / "od"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    image = str(earlier_output / "img.npy")
    assert main(["encode", image, "--model", str(ckpt), "--out-dir", str(out), "--overwrite", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("penguin-vl: error: ") and "Traceback" not in err
    assert any(c in err for c in culprits), err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
