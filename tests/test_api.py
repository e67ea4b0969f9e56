"""The public surface: torch's signatures, the package layout, backend selection."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fused_losses as fl

# name in fused_losses -> torch's counterpart; extras beyond torch must be keyword-only
FUNCTIONS = {
    "cross_entropy": F.cross_entropy,
    "binary_cross_entropy_with_logits": F.binary_cross_entropy_with_logits,
    "huber_loss": F.huber_loss,
}
MODULES = {
    "CrossEntropyLoss": torch.nn.CrossEntropyLoss,
    "BCEWithLogitsLoss": torch.nn.BCEWithLogitsLoss,
    "HuberLoss": torch.nn.HuberLoss,
}
if hasattr(F, "linear_cross_entropy"):  # torch >= 2.13
    FUNCTIONS["linear_cross_entropy"] = F.linear_cross_entropy
    MODULES["LinearCrossEntropyLoss"] = torch.nn.LinearCrossEntropyLoss


def _compare(ours, theirs):
    """torch's parameters first, with their names, kinds and defaults; then extras, all
    keyword-only."""
    mine = list(inspect.signature(ours).parameters.values())
    torch_params = list(inspect.signature(theirs).parameters.values())
    assert [(p.name, p.kind, p.default) for p in mine[:len(torch_params)]] == [
        (p.name, p.kind, p.default) for p in torch_params
    ]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in mine[len(torch_params):])


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_function_signatures_match_torch(name):
    _compare(getattr(fl, name), FUNCTIONS[name])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_constructors_match_torch(name):
    _compare(getattr(fl, name).__init__, MODULES[name].__init__)
    assert issubclass(getattr(fl, name), MODULES[name])


def test_cross_entropy_has_the_documented_extra():
    param = inspect.signature(fl.cross_entropy).parameters["inplace_backward"]
    assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is False


def test_all_exports():
    for name in fl.__all__:
        assert hasattr(fl, name)
    assert set(FUNCTIONS) | set(MODULES) <= set(fl.__all__)
    assert {"linear_cross_entropy", "LinearCrossEntropyLoss"} <= set(fl.__all__)


def test_kernels_install_inside_the_package():
    # kernels/ ships as fused_losses.kernels, never as a top-level module named "kernels":
    # that name may belong to another installed package (Hugging Face's, which transformers
    # imports), but never to our folder. pytest is run as plain `pytest`, so the checkout is
    # not on sys.path here.
    ours = Path(importlib.util.find_spec("fused_losses.kernels").origin).parent
    spec = importlib.util.find_spec("kernels")
    assert spec is None or Path(spec.origin).parent != ours


ROOT = Path(__file__).resolve().parent.parent


def _from_root(code: str) -> subprocess.CompletedProcess:
    """`python -c code` run from the checkout's root (where the README's commands run), which
    puts the root, and so our top-level kernels/ folder, first on sys.path."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_import_kernels_from_the_root_is_not_ours():
    # From the root, `import kernels` gives the installed package of that name, or fails as
    # usual where there is none; fused_losses.kernels is unaffected.
    code = (
        "import importlib.util, os, sys\n"
        "installed = importlib.util.find_spec('kernels', None)\n"
        "root = os.path.abspath('kernels')\n"
        "try:\n"
        "    import kernels\n"
        "    where = getattr(kernels, '__file__', None)\n"
        "    ours = where is not None and os.path.dirname(os.path.abspath(where)) == root\n"
        "    print('imported', ours)\n"
        "except ModuleNotFoundError as e:\n"
        "    print('missing', e.name)\n"
        "import fused_losses.kernels.eager\n"
    )
    result = _from_root(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() in (["imported", "False"], ["missing", "kernels"])
    # where no other `kernels` is installed: what a folder without __init__.py would give, an
    # empty namespace package (transformers reads "no __file__, no version" as not installed)
    hidden = (
        "import sys\n"
        "sys.path = [p for p in sys.path if not p.endswith(('site-packages', 'dist-packages'))]\n"
        "import kernels\n"
        "print(getattr(kernels, '__file__', None), getattr(kernels, '__version__', None))\n"
        "try:\n"
        "    from kernels import eager\n"
        "except ImportError:\n"
        "    print('nothing inside')\n"
    )
    result = _from_root(hidden)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "None", "nothing", "inside"]


def test_transformers_builds_a_model_from_the_root():
    pytest.importorskip("transformers")
    code = (
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,"
        " num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,"
        " vocab_size=100))\n"
        "print('ok')\n"
    )
    result = _from_root(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def _run(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_importing_does_not_import_triton():
    result = _run("import sys, fused_losses; print('triton' in sys.modules)",
                  FUSED_LOSSES_BACKEND="auto")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_works_without_triton():
    # The package imports and runs its eager path where triton is not installed.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fused_losses as fl, torch.nn.functional as F\n"
        "x = torch.randn(3, 7, requires_grad=True); t = torch.tensor([1, 2, 3])\n"
        "loss = fl.cross_entropy(x, t); loss.backward()\n"
        "assert torch.allclose(loss, F.cross_entropy(x, t))\n"
        "print('ok')\n"
    )
    result = _run(code, FUSED_LOSSES_BACKEND="auto")
    assert result.stdout.strip() == "ok", result.stderr
    result = _run(code, FUSED_LOSSES_BACKEND="triton")
    assert "triton is not installed" in result.stderr


@pytest.mark.parametrize(
    "imports",
    [
        "",  # the README's case: the variable alone
        # anything that imports triton before the first loss call: an optimizer (torch.optim
        # imports torch._dynamo), torch._dynamo, triton itself, transformers
        "torch.optim.SGD([torch.zeros(1, requires_grad=True)])",
        "import torch._dynamo",
        "import triton",
        "import transformers",
    ],
)
def test_triton_backend_in_a_fresh_process(imports):
    # FUSED_LOSSES_BACKEND=triton and CPU tensors: the kernels run under the interpreter
    # after any import order, match torch, and no interpreter warning reaches the user.
    if "transformers" in imports:
        pytest.importorskip("transformers")
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "import torch\n"
        f"{imports}\n"
        "import fused_losses as fl, torch.nn.functional as F\n"
        "x = torch.randn(4, 10, requires_grad=True); t = torch.tensor([1, 2, 3, -100])\n"
        "x.data[0, 3] = float('-inf')\n"
        "loss = fl.cross_entropy(x, t, label_smoothing=0.1, reduction='sum')\n"
        "loss.backward()\n"
        "ref = F.cross_entropy(x, t, label_smoothing=0.1, reduction='sum')\n"
        "assert loss.grad_fn.name() == 'CrossEntropyFunctionBackward', loss.grad_fn\n"
        "torch.testing.assert_close(loss, ref)\n"
        "print('ok')\n"
    )
    result = _run(code, FUSED_LOSSES_BACKEND="triton", TRITON_INTERPRET="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok"], result.stdout + result.stderr
    assert "Warning" not in result.stderr, result.stderr


@pytest.mark.parametrize("setting", ["torch", "auto"])
def test_cpu_tensors_run_eagerly(monkeypatch, setting):
    monkeypatch.setenv("FUSED_LOSSES_BACKEND", setting)
    from fused_losses import _dispatch

    assert not _dispatch.use_kernels(torch.randn(2, 3))


def test_dispatch_policy(monkeypatch):
    monkeypatch.setenv("FUSED_LOSSES_BACKEND", "triton")
    from fused_losses import _dispatch

    x = torch.randn(2, 3, dtype=torch.bfloat16)
    assert _dispatch.use_kernels(x)
    assert not _dispatch.use_kernels(torch.randn(2, 3, dtype=torch.float64))  # float64 math
    assert not _dispatch.use_kernels(x, torch.randn(3, dtype=torch.float64))
    assert not _dispatch.use_kernels(x, torch.empty(3, device="meta"))  # another device
    assert not _dispatch.use_kernels(x, torch.zeros(2, dtype=torch.int64))
    assert _dispatch.use_kernels(x, torch.zeros(2, dtype=torch.int64),
                                 other_dtypes=(torch.int64,))
    assert not _dispatch.use_kernels(torch.randn(0, 3))
    assert not _dispatch.use_kernels(x, supported=False)


def test_dispatch_does_not_look_for_triton_per_call(monkeypatch):
    # torch.compile traces the dispatch, and Dynamo refuses to trace importlib.util.find_spec
    # on some torch versions (2.11: "Attempted to call function marked as skipped", every
    # compiled kernel call with fullgraph=True failed): the dispatch asks for no module search
    from types import SimpleNamespace

    monkeypatch.setenv("FUSED_LOSSES_BACKEND", "triton")
    from fused_losses import _dispatch

    def find_spec(*args, **kwargs):
        raise AssertionError(f"the dispatch looked for a module: find_spec{args}")

    # (the dispatch's importlib only: torch.compile itself looks for modules)
    monkeypatch.setattr(_dispatch, "importlib", SimpleNamespace(
        util=SimpleNamespace(find_spec=find_spec)))
    x = torch.randn(2, 3)
    assert _dispatch.use_kernels(x)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda x: (x * 2, _dispatch.use_kernels(x)), backend="eager",
                                 fullgraph=True)
        assert compiled(x)[1] is True
    finally:
        torch._dynamo.reset()


def test_ci_runs_the_readme_test_command():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    ci = (root / ".ci" / "run").read_text()
    command = 'pip install -e ".[test]" && pytest'
    assert f"\n{command}\n" in readme
    assert f"\n{command}\n" in ci


def test_the_torch_floor_is_what_ci_runs():
    """pyproject's torch floor is no newer than the torch CI runs the whole suite on (.ci/run's
    main pin; an older floor needs a green run of the whole suite on that torch elsewhere),
    the README says the same floor, and CI's extra run is on a newer torch than its main one."""
    import re

    root = Path(__file__).resolve().parent.parent
    pyproject = (root / "pyproject.toml").read_text()
    ci = (root / ".ci" / "run").read_text()
    readme = (root / "README.md").read_text()

    def version(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in text.split("."))

    (floor,) = re.findall(r'"torch>=([0-9.]+)"', pyproject)
    (main_pin,) = re.findall(r"pip install --quiet torch==([0-9.]+)\n", ci)
    (newest,) = re.findall(r"NEWEST_TORCH=([0-9.]+)\n", ci)
    assert version(floor) <= version(main_pin), (floor, main_pin)
    assert version(newest) > version(main_pin), (newest, main_pin)
    assert f"torch >= {floor};" in readme
