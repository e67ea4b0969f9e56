"""The loss kernels of fused_losses, installed as ``fused_losses.kernels``.

One file per loss, top to bottom: its Triton kernels, their launchers and the
autograd.Function that ties them together (``cross_entropy.py``, with the K-dimensional layout
in ``cross_entropy_nd.py`` and the arithmetic in ``_ce_math.py``; ``bce.py``, ``huber.py``,
sharing ``_elementwise.py``). ``eager.py`` is each loss's formula in torch ops (the CPU path
and the double backward); it, and this package, import without Triton. Importing a kernel
file defines its kernels and does nothing else: whether a launch is compiled or interpreted
is decided per launch (``_common.launch``).
"""

if __name__ == "kernels":
    # This folder lives at the top of the checkout, so where the checkout's root is on sys.path
    # (`python -m bench`, `python -c ...` run from there) a plain `import kernels` finds it
    # before Hugging Face's `kernels` package, which transformers imports. It is only ever
    # fused_losses.kernels: step aside, and hand the importer the installed package of that
    # name. Where there is none, leave what Python makes of a folder without __init__.py: an
    # empty namespace package, no __file__ and nothing to import from it (transformers reads
    # that as "not installed"), never this folder's modules.
    import importlib
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _saved_path = sys.path[:]
    del sys.modules["kernels"]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    try:
        _installed = importlib.import_module("kernels")
    except ModuleNotFoundError as e:
        if e.name != "kernels":
            raise
        _installed = importlib.util.module_from_spec(
            importlib.machinery.ModuleSpec("kernels", None, is_package=True))
    finally:
        sys.path[:] = _saved_path
    # the import system returns what sys.modules holds once this body has run
    sys.modules["kernels"] = _installed
