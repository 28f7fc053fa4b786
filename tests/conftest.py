"""Test configuration shared by every test file.

* TRITON_INTERPRET=1 is set before anything imports triton when no CUDA GPU
  is present, so kernels run on CPU tensors through Triton's interpreter.
* Hypothesis profiles: `ci` (derandomized, bounded, no deadline: a red CI is
  reproducible) is the default; `dev` draws more, randomly. Choose with
  NSA_DSL_HYPOTHESIS_PROFILE=dev.
* Tests marked `gpu` are skipped when no CUDA device is present.
* OPENBLAS_CORETYPE=Sandybridge (numpy's OpenBLAS, read when numpy first
  loads: set before anything imports it) where not set: the interpreter's
  tl.dot is numpy's matmul, and OpenBLAS's FMA kernels (Haswell, Zen) round
  a product's edge columns apart from its others (no FMA there), so equal
  block scores came out an ulp apart and "the same arithmetic" tests saw
  1-ulp differences on an AMD EPYC (NOTES v23). Sandybridge's kernels (AVX,
  no FMA) round every column alike, as the GPU's MMA does.
* One BLAS/OpenMP thread a process where not set: the interpreter's work is
  many small numpy products, which extra threads slow down (and `-n auto`
  already runs a process a core). One test, alone on 2 cores: 57 s -> 42 s.
* Under the interpreter, two costs of Triton's interpreter and of CPython
  are taken out of each kernel launch (interpreter_speed.py; the spawned
  ranks of test_distributed install it too).
"""
import os
import sys

if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_CORETYPE", "Sandybridge")
for _threads in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_threads, "1")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        return False


HAS_CUDA = _has_cuda()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


import interpreter_speed  # noqa: E402

interpreter_speed.install()

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

# No explain phase: on a failure it re-runs the (slow, interpreted) case many
# times only to annotate the report.
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]

_COMMON = dict(deadline=None, print_blob=True, phases=_PHASES,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, max_examples=25, **_COMMON)
settings.register_profile("dev", max_examples=200, **_COMMON)
# Compiled on a GPU every drawn pattern costs a real compile: fewer draws.
settings.register_profile("gpu", derandomize=True, max_examples=6, **_COMMON)
settings.load_profile(os.environ.get("NSA_DSL_HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (compiled Triton kernels)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
