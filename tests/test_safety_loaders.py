"""Nothing the package loads can run code: no pickle anywhere in its source, and MiniCanvas training refuses a crafted
checkpoint instead of executing it (issue 28, case 1)."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest
import torch

import diffusers_unlearn

PACKAGE = Path(diffusers_unlearn.__file__).parent
SAFE_YAML_LOADERS = ("SafeLoader", "PlanLoader")  # PlanLoader: a SafeLoader subclass (checked below)
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib", "copyreg"}


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str) -> list[str]:
    """What in ``source`` could run code from file data: imports of pickle-like modules, ``eval``/``exec``,
    ``torch.load`` without ``weights_only=True``, ``numpy.load(allow_pickle=True)``, ``yaml.load`` without a safe
    loader, ``marshal.loads``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            keywords = {k.arg: k.value for k in node.keywords}
            if isinstance(func, ast.Name) and name in ("eval", "exec", "__import__"):
                found.append(f"{name}(...) at line {node.lineno}")
            elif name == "load" and owner == "torch" and not _is_true(keywords.get("weights_only")):
                found.append(f"torch.load without weights_only=True at line {node.lineno}")
            elif name == "load" and owner in ("np", "numpy") and "allow_pickle" in keywords:
                found.append(f"numpy.load(allow_pickle=...) at line {node.lineno}")
            elif name in ("load", "load_all") and owner == "yaml" and not any(
                    ast.unparse(v).endswith(SAFE_YAML_LOADERS) for v in [*node.args[1:], *keywords.values()]):
                found.append(f"yaml.{name} without a safe loader at line {node.lineno}")
            elif name in ("loads", "load") and owner in UNSAFE_MODULES:
                found.append(f"{owner}.{name} at line {node.lineno}")
    return found


def test_the_scanner_finds_every_kind_of_unsafe_loader():
    bad = ("import pickle\nfrom dill import loads\nimport torch, yaml, marshal\nx = eval(open('f').read())\n"
           "torch.load('f')\ntorch.load('f', weights_only=False)\nyaml.load(s)\nmarshal.loads(b)\n"
           "import numpy as np\nnp.load('f', allow_pickle=True)\n")
    assert len(unsafe_calls(bad)) == 9
    good = ("import ast, torch, yaml\ntorch.load('f', weights_only=True)\nyaml.safe_load(s)\n"
            "yaml.load(s, Loader=yaml.SafeLoader)\nast.literal_eval('1')\nmodel.eval()\n")
    assert unsafe_calls(good) == []


def test_no_module_of_the_package_can_unpickle_or_eval_file_data():
    import yaml

    from diffusers_unlearn.plan_format import PlanLoader

    assert issubclass(PlanLoader, yaml.SafeLoader)
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        calls = unsafe_calls(path.read_text(encoding="utf-8"))
        if calls:
            found[str(path.relative_to(PACKAGE))] = calls
    assert found == {}


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > PWNED_MARKER",))


@pytest.mark.parametrize("stage", ["vae", "init"])
def test_minicanvas_training_refuses_a_crafted_checkpoint_without_running_it(tmp_path, monkeypatch, stage):
    from diffusers_unlearn.minicanvas import train as mc_train

    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"{'vae' if stage == 'vae' else 'init'}.pt"
    with open(path, "wb") as handle:
        pickle.dump({"config": {}, "x": _Payload()}, handle)
    with pytest.raises(SystemExit, match="loaded safely"):
        if stage == "vae":
            mc_train._load_checkpoint(path, mc_train.QUICK)
        else:
            mc_train._safe_load(path)
    assert not (tmp_path / "PWNED_MARKER").exists()


def test_minicanvas_checkpoints_of_plain_data_still_load(tmp_path):
    from diffusers_unlearn.minicanvas import train as mc_train

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    payload = {"config": mc_train._stage_config(mc_train.QUICK, "vae"), "optimizer": opt.state_dict(),
               "generator": torch.Generator().manual_seed(0).get_state(), "torch_rng": torch.get_rng_state()}
    mc_train._atomic_save(payload, tmp_path / "vae.pt")
    state = mc_train._load_checkpoint(tmp_path / "vae.pt", mc_train.QUICK)
    assert state["config"] == payload["config"] and torch.equal(state["torch_rng"], payload["torch_rng"])
