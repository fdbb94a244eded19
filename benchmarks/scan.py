"""Selective-scan backends on the CPU: forward + backward time and peak memory.

    PYTHONPATH=. python benchmarks/scan.py [--lengths 512 2048 4096] [--repeats 3] [--threads 2]

Prints a markdown table: backend, L, fwd+bwd seconds, speedup over `ref` and over
mambapy's parallel scan (pscan), peak memory. Shapes are those of a Vim block:
batch 2, d_inner 384, d_state 16, fp32, every input requiring grad.

How it is measured, so that the numbers are honest:
* every (backend, L) runs in a fresh subprocess (no allocator or cache state
  carried over from another backend);
* in it: imports, inputs, and a tiny call that triggers any JIT compilation
  (numba loads or compiles the kernel there); then the baseline RSS is taken
  and the kernel's high-water mark reset (/proc/self/clear_refs); then one
  full-size warm-up call and `repeats` timed calls (median reported);
  peak memory = VmHWM - baseline, i.e. the most memory the calls held at once
  above the inputs (activations saved for backward, gradients, temporaries).
  Without clear_refs it falls back to ru_maxrss, which JIT memory can mask;
* torch and numba both get --threads threads (OMP/MKL/NUMBA_NUM_THREADS too).

Rows: `ref` (the sequential loop, cmvim.ssm.ref), `torch` (chunked pure-torch
scan), `cpu` (the numba kernel), `mambapy-pscan` (mambapy's Blelloch scan in its
own (B, L, D, N) layout with exp(delta*A) and delta*B*u formed as mambapy's
`selective_scan` does; only when mambapy, the `bench` extra, is installed).
`ref` is slow at long L (a Python loop of L small steps, each a handful of
tiny torch ops; it suffers most when other processes share the CPUs, as every
op then waits for descheduled OpenMP threads): it gets no full-size warm-up, is
timed with --ref-repeats calls (default 1) and can be left out above a length
with --skip-ref-above.
"""
from __future__ import annotations

import sys
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("benchmarks")]   # benchmarks/ssl.py must not shadow the ssl module
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

BATCH, D_INNER, D_STATE = 2, 384, 16
BACKENDS = ("ref", "torch", "cpu", "mambapy-pscan")


# ---------------------------------------------------------------- worker (one backend, one L)

def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _make_inputs(torch, backend, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (BATCH, length, D_INNER) if backend == "mambapy-pscan" else (BATCH, D_INNER, length)
    bc_shape = (BATCH, length, D_STATE) if backend == "mambapy-pscan" else (BATCH, D_STATE, length)
    x = dict(u=torch.randn(*shape, generator=g),
             delta=torch.rand(*shape, generator=g) * 0.1 + 1e-3,     # positive, as after softplus
             A=-torch.rand(D_INNER, D_STATE, generator=g) * 4 - 0.1,
             B=torch.randn(*bc_shape, generator=g), C=torch.randn(*bc_shape, generator=g),
             D=torch.randn(D_INNER, generator=g))
    for v in x.values():
        v.requires_grad_()
    return x, torch.randn(*shape, generator=g)


def _step_fn(torch, backend):
    """One forward + backward, returning nothing."""
    if backend == "mambapy-pscan":
        from mambapy.pscan import pscan

        def step(x, gy):
            # mambapy.mamba.MambaBlock.selective_scan, verbatim but for `self`
            u, delta, A, B, C, D = (x[k] for k in ("u", "delta", "A", "B", "C", "D"))
            deltaA = torch.exp(delta.unsqueeze(-1) * A)                   # (B, L, ED, N)
            deltaB = delta.unsqueeze(-1) * B.unsqueeze(2)                 # (B, L, ED, N)
            BX = deltaB * (u.unsqueeze(-1))                               # (B, L, ED, N)
            hs = pscan(deltaA, BX)
            y = (hs @ C.unsqueeze(-1)).squeeze(3)                         # (B, L, ED)
            y = y + D * u
            y.backward(gy)
        return step

    from cmvim.ssm import selective_scan

    def step(x, gy):
        selective_scan(**x, backend=backend).backward(gy)
    return step


def worker(backend, length, repeats, threads):
    import torch
    torch.set_num_threads(threads)
    step = _step_fn(torch, backend)
    x, gy = _make_inputs(torch, backend, length)
    tiny, tiny_gy = _make_inputs(torch, backend, 8)
    step(tiny, tiny_gy)                    # JIT / lazy initialisation, excluded from time and memory
    for v in list(x.values()) + list(tiny.values()):
        v.grad = None
    del tiny, tiny_gy
    baseline_kib = _status_kib("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exact = _reset_peak()
    if backend != "ref":
        step(x, gy)                        # warm-up at full size (ref: nothing to warm, and slow)
    times = []
    for _ in range(repeats):
        for v in x.values():
            v.grad = None
        t0 = time.perf_counter()
        step(x, gy)
        times.append(time.perf_counter() - t0)
    if exact:
        peak_kib = _status_kib("VmHWM") - baseline_kib
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - max(maxrss_before, baseline_kib)
    extra = {}
    if backend == "cpu":
        import numba
        extra = dict(numba_threads=numba.get_num_threads(), threading_layer=numba.threading_layer())
    print(json.dumps(dict(backend=backend, length=length, seconds=statistics.median(times),
                          all_seconds=times, peak_mib=peak_kib / 1024, exact_peak=exact, **extra)))


# ---------------------------------------------------------------- driver

def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions():
    out = {}
    for name in ("torch", "numba", "mambapy"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", None)
            if out[name] is None:
                from importlib.metadata import version
                out[name] = version(name)
        except Exception:  # noqa: BLE001 - a package that fails to import, however it fails, is recorded as absent
            out[name] = None
    return out


class _OtherCpu:
    """CPU time that processes other than this benchmark and its workers used since creation
    (busy time from /proc/stat minus our own and our children's), to show contention."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)   # minus idle, iowait
        own = sum(getattr(resource.getrusage(who), k) for who in (resource.RUSAGE_SELF,
                  resource.RUSAGE_CHILDREN) for k in ("ru_utime", "ru_stime"))
        return busy / os.sysconf("SC_CLK_TCK"), own, time.monotonic()

    def read(self):
        end = self._sample()
        if self.start is None or end is None:
            return "unknown"
        other = max(0.0, (end[0] - self.start[0]) - (end[1] - self.start[1]))
        wall = end[2] - self.start[2]
        return f"{other:.1f} CPU-s in {wall:.0f} s ({100 * other / (wall * (os.cpu_count() or 1)):.0f}% of the machine)"


def _run_worker(backend, length, repeats, threads, timeout):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               NUMBA_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", backend, str(length),
           "--repeats", str(repeats), "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(backend=backend, length=length, error=f"timed out after {timeout} s")
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        return dict(backend=backend, length=length, error=f"{why}" + (f": {tail[0]}" if tail else ""))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up (median)")
    p.add_argument("--ref-repeats", type=int, default=1, help="timed calls for the slow `ref` loop")
    p.add_argument("--skip-ref-above", type=int, default=None, metavar="L",
                   help="leave `ref` out for lengths above L")
    p.add_argument("--threads", type=int, default=2, help="torch and numba threads")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per (backend, L) subprocess")
    p.add_argument("--json", metavar="FILE", help="also write the raw results here")
    p.add_argument("--worker", nargs=2, metavar=("BACKEND", "L"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.repeats, args.threads)
        return

    versions = _versions()
    backends = list(args.backends)
    notes = []
    if "mambapy-pscan" in backends and versions["mambapy"] is None:
        backends.remove("mambapy-pscan")
        notes.append("mambapy is not installed (`pip install .[bench]`): no pscan row or column.")
    if "cpu" in backends:
        from cmvim.ssm import available_backends
        if "cpu" not in available_backends():
            backends.remove("cpu")
            notes.append("the `cpu` backend (numba) is not available here.")
    if "cpu" in backends:
        # compile (or load) the kernels once, so that no measured subprocess compiles
        _run_worker("cpu", 16, 1, args.threads, args.timeout)

    results = {}
    # the fast backends first, all lengths in one short window; the slow ref loop last
    fast = [(b, n) for b in backends if b != "ref" for n in args.lengths]
    slow = [("ref", n) for n in args.lengths if "ref" in backends
            and (args.skip_ref_above is None or n <= args.skip_ref_above)]
    contention = []
    for window, runs in (("the other backends", fast), ("ref", slow)):
        if not runs:
            continue
        meter = _OtherCpu()
        for backend, length in runs:
            repeats = args.ref_repeats if backend == "ref" else args.repeats
            r = _run_worker(backend, length, repeats, args.threads, args.timeout)
            results[backend, length] = r
            print(f"  {backend:>14} L={length:<6} " + (f"{r['seconds']:.4f} s, {r['peak_mib']:.0f} MiB"
                  if "error" not in r else r["error"]), file=sys.stderr, flush=True)
        contention.append(f"{meter.read()} while measuring {window}")

    print(f"Machine: {_cpu_model()}, {os.cpu_count()} logical CPUs; Python {platform.python_version()}, "
          f"torch {versions['torch']}, numba {versions['numba']}"
          + (f", mambapy {versions['mambapy']}" if versions["mambapy"] else "") + ".")
    cpu_runs = [r for (b, _), r in results.items() if b == "cpu" and "error" not in r]
    layer = f", numba threading layer {cpu_runs[0]['threading_layer']}" if cpu_runs else ""
    print(f"Shapes: batch {BATCH}, d_inner {D_INNER}, d_state {D_STATE}, fp32; {args.threads} threads "
          f"(torch and numba{layer}); median of {args.repeats} timed calls after a warm-up "
          f"(ref: {args.ref_repeats}, no warm-up).")
    if contention:
        print("CPU time used by other processes (not this benchmark): " + "; ".join(contention) + ".")
    for note in notes:
        print(f"Note: {note}")
    print()
    has_pscan = "mambapy-pscan" in backends
    header = ["backend", "L", "fwd+bwd (s)", "speedup vs ref"] + (["speedup vs pscan"] if has_pscan else []) \
        + ["peak memory (MiB)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
    for length in args.lengths:
        ref = results.get(("ref", length), {})
        pscan = results.get(("mambapy-pscan", length), {})
        for backend in backends:
            r = results.get((backend, length))
            if r is None:
                row = [backend, str(length), "skipped", "", *([""] if has_pscan else []), ""]
            elif "error" in r:
                row = [backend, str(length), f"failed: {r['error']}", "", *([""] if has_pscan else []), ""]
            else:
                def ratio(other):
                    return f"{other['seconds'] / r['seconds']:.1f}x" if "seconds" in other else "n/a"
                row = [backend, str(length), f"{r['seconds']:.3f}", ratio(ref),
                       *([ratio(pscan)] if has_pscan else []),
                       f"{r['peak_mib']:.0f}" + ("" if r.get("exact_peak", True) else " (ru_maxrss)")]
            print("| " + " | ".join(row) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(r) for r in results.values()], f, indent=1)


if __name__ == "__main__":
    main()
