"""Shared helpers for the benchmark scripts: timing, saved-activation bytes, memory, output.

Every benchmark here compares implementations *in one process, interleaved*:
each round runs every implementation once (in a rotated order), so slow drift of
the machine (frequency, other load) hits all of them alike. Ratios are taken
between medians of the same run, never across runs.
"""
from __future__ import annotations

import ctypes
import datetime
import functools
import io
import json
import os
import platform
import statistics
import sys
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from lora_layers import fileio

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def set_threads(n: int) -> None:
    """Pin torch's intra-op thread count (the CPU figures use 2).

    Raises:
        ValueError: ``n`` is not a positive integer.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    torch.set_num_threads(n)


def parse_dtype(name: str) -> torch.dtype:
    """``"fp32"``/``"bf16"``/``"fp16"`` to a torch dtype.

    Raises:
        ValueError: unknown name.
    """
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _sync(device: Optional[torch.device]) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(fns: Dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                      device: Optional[torch.device] = None) -> Dict[str, List[float]]:
    """Wall-clock seconds of each callable, ``reps`` rounds, interleaved.

    Round ``k`` runs the callables starting at index ``k mod n`` so that no
    implementation always runs right after the same neighbour. ``warmup``
    untimed rounds come first (allocator, kernel selection, lazy init).

    Args:
        fns: name -> zero-argument callable (one training step, one forward, ...).
        reps: timed rounds (>= 1).
        warmup: untimed rounds before them.
        device: synchronised around each call when it is a CUDA device.

    Returns:
        name -> list of ``reps`` durations in seconds.

    Raises:
        ValueError: ``reps`` < 1 or ``warmup`` < 0.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    _sync(device)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for k in range(reps):
        order = names[k % len(names):] + names[:k % len(names)]
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    """The median of a non-empty sequence."""
    return float(statistics.median(xs))


def storage_key(t: torch.Tensor):
    """Identity of the memory behind ``t`` (its untyped storage's data pointer)."""
    try:
        return ("ptr", t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # opaque tensors (e.g. mkldnn) have no storage
        return ("id", id(t))


def _storage_nbytes(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> Dict[str, int]:
    """Bytes that autograd saves for backward while ``fn()`` builds its graph.

    Every tensor passed to ``saved_tensors_hooks``' pack hook is counted once per
    untyped storage (views of one buffer are one buffer), at the storage's full
    size. Storages of ``exclude`` (the input and the parameters, which are alive
    anyway) are not counted. The graph ``fn`` returns is dropped afterwards
    without running backward.

    Args:
        fn: builds the graph, e.g. ``lambda: layer(x)``; its return value is kept
            alive until the count is done so no storage address is reused.
        exclude: tensors whose storages are not counted.

    Returns:
        ``{"bytes": counted bytes, "tensors": counted storages, "excluded": skipped storages}``.
    """
    skip = {storage_key(t) for t in exclude}
    seen: Dict[object, int] = {}
    excluded = set()
    keep = []  # hold every packed tensor so its address cannot be recycled mid-count

    def pack(t):
        key = storage_key(t)
        keep.append(t)
        if key in skip:
            excluded.add(key)
        elif key not in seen:
            seen[key] = _storage_nbytes(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    result = {"bytes": sum(seen.values()), "tensors": len(seen), "excluded": len(excluded)}
    del out, keep
    return result


def rss_bytes() -> int:
    """The current resident set size of this process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def trim_heap() -> None:
    """Ask glibc to hand freed heap pages back to the OS (no-op elsewhere), so an
    RSS peak measured next is not hidden by memory an earlier run left cached."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Context manager sampling RSS every ``interval`` s in a thread.

    ``peak`` is the highest RSS seen; ``delta`` the peak minus the RSS at entry
    (after :func:`trim_heap`). Sampling can miss a peak shorter than the interval.
    """

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = self.start = self.delta = 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        trim_heap()
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.delta = self.peak - self.start
        return False


@functools.lru_cache(maxsize=None)
def _code_version() -> Optional[str]:
    """``git describe``-like id of the measured code: HEAD, plus ``+dirty`` when
    ``lora_layers/`` has uncommitted changes (None outside a git checkout). Taken
    once, when this module is imported (the scripts import lora_layers then too),
    so a result written at the end names the code that was loaded, not newer code."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lora_layers"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


_code_version()  # pin it now, before any run starts


def machine_info(device: str = "cpu") -> Dict[str, object]:
    """What a result needs to be reproducible: CPU/GPU model, threads, versions, date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    from importlib import metadata

    for dist in ("peft", "loralib", "transformers"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    info["lora_layers_code"] = _code_version()
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def fmt_bytes(n: Optional[float]) -> str:
    """Human-readable bytes (MiB above 1 MiB, KiB above 1 KiB)."""
    if n is None:
        return "-"
    if abs(n) >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if abs(n) >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{int(n)} B"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table (cells through ``str``)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def atomic_write(path: str, write: Callable[[object], None], binary: bool = False) -> None:
    """Call ``write(file)`` and put the result at ``path`` atomically (``lora_layers.fileio.atomic_write``:
    temp file, fsync, rename, mode from the umask), so a reader never sees a half-written file.
    Creates ``path``'s folder; ``write`` gets a text file unless ``binary``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write_to(f) -> None:
        if binary:
            write(f)
            return
        text = io.TextIOWrapper(f, encoding="utf-8")
        write(text)
        text.flush()
        text.detach()  # the binary file stays open for the fsync

    fileio.atomic_write(path, write_to, "benchmark output")


def write_json(path: str, obj) -> None:
    """Write ``obj`` as JSON atomically."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=1))


def finish(payload: dict, argv: Optional[Sequence[str]], out: Optional[str], machine: dict) -> dict:
    """Prefix ``payload`` with ``machine`` (:func:`machine_info` taken when the run
    started) and the command line; write it to ``out`` (JSON) if given."""
    result = {"machine": machine, "argv": list(sys.argv[1:] if argv is None else argv), **payload}
    if out:
        write_json(out, result)
        print(f"\nwrote {out}")
    return result


def add_common_args(ap, reps: int) -> None:
    """The options every benchmark script shares."""
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--reps", type=int, default=reps, help=f"timed interleaved rounds (default {reps})")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 reps (smoke test)")
    ap.add_argument("--out", default=None, help="write all figures as JSON here")


# ----------------------------------------------------------------------------- model setups shared by
# bench_phi3_step.py and loss_parity.py: a PEFT model and a lora_layers model with
# the same base weights and the same initial adapter values.

PHI3_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


def peft_lora(model: torch.nn.Module, targets: Sequence[str], r: int, lora_alpha: float, lora_dropout: float):
    """``peft.get_peft_model`` on ``model`` with a plain LoRA config (bias none)."""
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                             target_modules=list(targets), bias="none")
    return peft.get_peft_model(model, config)


def peft_adapters(peft_model: torch.nn.Module) -> Dict[str, tuple]:
    """``{module path in the base model: (lora_A weight, lora_B weight, scaling)}`` of PEFT's
    default adapter."""
    out = {}
    for name, mod in peft_model.named_modules():
        lora_a = getattr(mod, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and "default" in lora_a:
            if not name.startswith(PEFT_PREFIX):
                raise ValueError(f"unexpected PEFT module path {name!r} (no {PEFT_PREFIX!r} prefix)")
            out[name[len(PEFT_PREFIX):]] = (lora_a["default"].weight, mod.lora_B["default"].weight,
                                            mod.scaling["default"])
    return out


def copy_peft_init(peft_model: torch.nn.Module, model: torch.nn.Module) -> int:
    """Copy PEFT's adapter values into the same-named lora_layers modules of ``model``.

    Returns:
        The number of modules copied.

    Raises:
        ValueError: a module is missing, or a shape or scaling differs.
    """
    n = 0
    for name, (a, b, scaling) in peft_adapters(peft_model).items():
        mod = model.get_submodule(name)
        if tuple(mod.lora_A.shape) != tuple(a.shape) or tuple(mod.lora_B.shape) != tuple(b.shape):
            raise ValueError(f"{name}: lora_layers A/B {tuple(mod.lora_A.shape)}/{tuple(mod.lora_B.shape)} "
                             f"!= PEFT {tuple(a.shape)}/{tuple(b.shape)}")
        if abs(mod.scaling - scaling) > 1e-12:
            raise ValueError(f"{name}: scaling {mod.scaling} != PEFT's {scaling}")
        with torch.no_grad():
            mod.lora_A.copy_(a)
            mod.lora_B.copy_(b)
        n += 1
    return n


def trainable(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The parameters that require grad, in registration order."""
    return [p for p in model.parameters() if p.requires_grad]


def cuda_peak_growth(fn) -> int:
    """Peak CUDA memory allocated while ``fn()`` runs, beyond what was in use before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
