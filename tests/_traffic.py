"""Count the memory traffic of Triton kernels under the interpreter.

A copy of the project's shared tool (shared/tools/triton_traffic.py), kept in tests/ so CI can
run the traffic tests from a bare clone. Under TRITON_INTERPRET=1 every tl.load / tl.store
goes through the interpreter; this counts the bytes of each unmasked element, re-reads
included, and the number of kernel launches.
"""
from __future__ import annotations

import os
import runpy
import sys

import numpy as np
import triton.runtime.interpreter as _interp

# Importing this module must not switch the interpreter on: on a GPU machine pytest collects it
# next to the CUDA tests (tests/conftest.py sets TRITON_INTERPRET=1 only where there is no GPU).


class TrafficMeter:
    def __init__(self) -> None:
        self.bytes_loaded = 0
        self.bytes_stored = 0
        self.launches = 0
        self._saved = None

    @property
    def bytes_total(self) -> int:
        return self.bytes_loaded + self.bytes_stored

    def ratio(self, minimal_bytes: int) -> float:
        return self.bytes_total / minimal_bytes

    def __enter__(self) -> TrafficMeter:
        builder, grid = _interp.InterpreterBuilder, _interp.GridExecutor
        self._saved = (builder.create_masked_load, builder.create_masked_store, grid.__call__)
        load, store, call = self._saved
        meter = self

        def counted_load(b, ptrs, mask, other, *rest):
            itemsize = np.dtype(_interp._get_np_dtype(ptrs.get_element_ty())).itemsize
            meter.bytes_loaded += int(np.count_nonzero(mask.data)) * itemsize
            return load(b, ptrs, mask, other, *rest)

        def counted_store(b, ptrs, value, mask, *rest):
            meter.bytes_stored += int(np.count_nonzero(mask.data)) * value.data.dtype.itemsize
            return store(b, ptrs, value, mask, *rest)

        def counted_call(g, *args, **kwargs):
            meter.launches += 1
            return call(g, *args, **kwargs)

        builder.create_masked_load = counted_load
        builder.create_masked_store = counted_store
        grid.__call__ = counted_call
        return self

    def __exit__(self, *exc) -> None:
        builder, grid = _interp.InterpreterBuilder, _interp.GridExecutor
        builder.create_masked_load, builder.create_masked_store, grid.__call__ = self._saved

    def __str__(self) -> str:
        return (f"{self.launches} launches, {self.bytes_loaded:,} B loaded, "
                f"{self.bytes_stored:,} B stored")


if __name__ == "__main__":  # python tests/_traffic.py script.py [args]
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    script, sys.argv = sys.argv[1], sys.argv[1:]
    with TrafficMeter() as meter:
        runpy.run_path(script, run_name="__main__")
    print(f"triton traffic: {meter}", file=sys.stderr)
