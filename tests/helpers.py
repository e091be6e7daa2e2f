"""Small helpers shared by tests (not part of the library)."""
import os
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from lowmem.decoding import GenerationRequest, generate_tokens
from lowmem.sampling import SamplingParams


def greedy_ids(engine, prompt_ids, n):
    """n greedy tokens after a prompt (EOS does not stop)."""
    req = GenerationRequest(max_new_tokens=n, sampling=SamplingParams(temperature=0.0),
                            stop_at_eos=False)
    return list(generate_tokens(engine, prompt_ids, req))


# The int8-activation kernels' lane of each of a strip's 64 columns (column
# 16c + 8v + 4h + m is lane 16(2v + h) + 4c + m), in column order.
ACT8_LANE = np.array([16 * (2 * v + h) + 4 * c + m for c in range(4) for v in range(2)
                      for h in range(2) for m in range(4)])


# What a CPU without AVX-512 offers (Haswell): numba compiles for it when told so.
AVX2_FEATURES = ",".join("+" + f for f in (
    "64bit,avx,avx2,bmi,bmi2,cmov,cx16,f16c,fma,fxsr,lzcnt,mmx,movbe,popcnt,sse,sse2,"
    "sse3,sse4.1,sse4.2,ssse3,xsave").split(","))


def run_on_avx2_target(script: str, cache_dir) -> None:
    """Run ``script`` in a fresh interpreter whose numba compiles for a Haswell CPU
    (its own cache in ``cache_dir``); the script must print "ok"."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=AVX2_FEATURES,
               NUMBA_CACHE_DIR=str(cache_dir), PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                       text=True, timeout=600, cwd=root)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def memlock_allows(nbytes: int) -> bool:
    """Whether this process may lock nbytes more in RAM: root (CAP_IPC_LOCK), or a
    memlock limit (ulimit -l; 8 MiB by default on current Linux) with room for them."""
    import resource
    if os.geteuid() == 0:
        return True
    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    return soft == resource.RLIM_INFINITY or soft >= 4 * nbytes  # other tests lock too


class InlinePool:
    """An executor that runs each job when it is submitted: an expert cache given one
    (``cache._pool``) has every fetch done before the step goes on, so which
    slots are free at a prefetch no longer depends on the worker threads' timing."""

    def submit(self, fn, *args) -> Future:
        future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as e:      # noqa: BLE001 -- delivered through the future
            future.set_exception(e)
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


class Compiles:
    """Counts XLA compilations (jax's backend-compile event) while in the block."""

    def __enter__(self):
        import jax
        self.count = 0

        def listen(event, duration, **kw):
            if event == "/jax/core/compile/backend_compile_duration":
                self.count += 1
        self._listen = listen
        jax.monitoring.register_event_duration_secs_listener(listen)
        return self

    def __exit__(self, *exc):
        import jax
        jax.monitoring.unregister_event_duration_listener(self._listen)
