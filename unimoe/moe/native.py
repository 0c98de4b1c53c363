"""Compiled CPU kernels: a C file built with the system's C compiler on first use and loaded with ``ctypes``.

Only :class:`~unimoe.moe.experts.LoRAExperts` uses them (``csrc/lora_swiglu.c``: each routed slot's SwiGLU chain in one
pass over its row, see the file's header for why). The build takes about a second and is cached per source, compiler
and CPU under ``$UNIMOE_CACHE`` (default ``~/.cache/unimoe``), written to a temporary name and renamed, so concurrent
processes never load a half-written library. Without a working compiler, or with ``UNIMOE_NATIVE=0``, the layer runs
the same arithmetic through torch ops (one warning says why); results agree to float rounding either way.

Why ``ctypes`` and not ``torch.utils.cpp_extension``: the kernels are plain C over raw pointers, so they need neither
torch's headers nor pybind11, and build in ~1 s instead of ~1 min. They parallelize with OpenMP and link
``libgomp.so.1`` by its soname, which the dynamic loader resolves to the copy torch has already loaded: one thread
pool for both.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "lora_swiglu.c"
FLAGS = ("-O3", "-fopenmp", "-fPIC", "-shared")
ENV_SWITCH = "UNIMOE_NATIVE"


def cache_dir() -> Path:
    root = os.environ.get("UNIMOE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unimoe"
    return Path(root) / "native"


def _cpu_signature() -> str:
    """What the build depends on besides source and compiler: ``-march=native`` code runs only on like CPUs."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {flags}"


def _compile(compiler: str, out: Path) -> None:
    """Build the library at ``out`` (atomically: temporary file, then rename). Tries ``-march=native`` first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for arch in (("-march=native",), ()):
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            proc = subprocess.run([compiler, *FLAGS, *arch, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                                  timeout=300)  # fmt: skip
            if proc.returncode == 0:
                os.replace(tmp, out)
                return
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        errors.append(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    raise RuntimeError(f"{compiler} failed: {errors[-1]}")


class LoRAKernels:
    """The two entry points of ``csrc/lora_swiglu.c`` with torch tensors in, pointers out. Every tensor must be a
    contiguous CPU tensor (float32; the token index int64) of the shapes the C file documents."""

    def __init__(self, lib: ctypes.CDLL):
        i64, f32, ptr, c_int = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
        self._forward = lib.unimoe_lora_forward
        self._forward.argtypes = [i64, i64, i64] + [ptr] * 13 + [c_int]
        self._forward.restype = None
        self._backward = lib.unimoe_lora_backward
        self._backward.argtypes = [i64, i64, i64, f32] + [ptr] * 18 + [c_int]
        self._backward.restype = None
        self.lanes = int(lib.unimoe_lanes())  # column slice width of the packed factors

    def supports(self, inter: int) -> bool:
        return inter % self.lanes == 0

    def pack(self, rows: torch.Tensor) -> torch.Tensor:
        """``(E, r, I)`` factor rows (any strides) as ``(E, I / lanes, r, lanes)`` column slices, contiguous."""
        return rows.unflatten(2, (rows.shape[2] // self.lanes, self.lanes)).permute(0, 2, 1, 3).contiguous()

    def pack_factors(self, b_gate, b_up, a_down) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three factors the kernels read, ``B_gate, B_up (E, I, r)`` and ``A_down (E, r, I)``, in column
        slices."""
        return self.pack(b_gate.transpose(1, 2)), self.pack(b_up.transpose(1, 2)), self.pack(a_down)

    @staticmethod
    def _ptrs(*tensors: torch.Tensor) -> list[int]:
        for t in tensors:
            assert t.is_contiguous() and t.device.type == "cpu", "native kernels take contiguous CPU tensors"
            assert t.dtype in (torch.float32, torch.int64, torch.uint8), f"native kernels got {t.dtype}"
        return [t.data_ptr() for t in tensors]

    def forward(self, g0, u0, index, a, bg_packed, bu_packed, ad_packed, w, g, u, t0, mixed, written) -> None:
        """``g, u, t0`` (written) and ``mixed`` (added to, or set where ``written`` (T,) uint8 is 0, which it then
        sets) for one expert's ``n = index.numel()`` slots."""
        n, inter = index.numel(), g0.shape[1]
        r = a.shape[1] // 2
        ptrs = self._ptrs(g0, u0, index, a, bg_packed, bu_packed, ad_packed, w, g, u, t0, mixed, written)
        self._forward(n, inter, r, *ptrs, torch.get_num_threads())

    def backward(
        self, s, g, u, grad_mixed, index, grad_t0, a, bg_packed, bu_packed, ad_packed, w, grad_g0, grad_u0, written
    ):
        """One expert's backward: adds to ``grad_g0, grad_u0`` (or sets them, as ``forward`` does ``mixed``) and
        returns ``dot (n,)`` (the rows' ``gm . h``), ``grad_a (n, 2r)`` and the factor gradients
        ``grad_b_gate (I, r)``, ``grad_b_up (I, r)``, ``grad_a_down (r, I)``."""
        n, inter, r = index.numel(), g.shape[1], grad_t0.shape[1]
        threads = torch.get_num_threads()
        dot, grad_a = g.new_empty(n), g.new_empty(n, 2 * r)
        copies = g.new_zeros(3, threads, inter // self.lanes, r, self.lanes)  # per-thread sums, in column slices
        ptrs = self._ptrs(g, u, grad_mixed, index, grad_t0, a, bg_packed, bu_packed, ad_packed, w, grad_g0, grad_u0,
                          dot, grad_a, copies[0], copies[1], copies[2], written)  # fmt: skip
        self._backward(n, inter, r, float(s), *ptrs, threads)
        sums = copies.sum(1)  # (3, I / lanes, r, lanes)
        as_columns = sums[:2].transpose(2, 3).reshape(2, inter, r)  # (I, r) each
        return dot, grad_a, as_columns[0], as_columns[1], sums[2].transpose(0, 1).reshape(r, inter)


@functools.cache
def lora_kernels() -> LoRAKernels | None:
    """The compiled LoRA kernels, built on first use; ``None`` (and one warning) where they cannot be had."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in {"0", "false", "no", "off"}:
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        warnings.warn("no C compiler (cc or $CC) found: LoRA experts run through torch ops, about 10% slower on a CPU",
                      stacklevel=2)  # fmt: skip
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
        version = version.splitlines()[:1]
        key = hashlib.sha256(
            "\n".join([SOURCE.read_text(), " ".join(FLAGS), *version, _cpu_signature()]).encode()
        ).hexdigest()[:16]
        lib_path = cache_dir() / f"lora_swiglu-{key}.so"
        if not lib_path.exists():
            _compile(compiler, lib_path)
        return LoRAKernels(ctypes.CDLL(str(lib_path)))
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as err:
        warnings.warn(f"could not build the native LoRA kernels ({err}): LoRA experts run through torch ops",
                      stacklevel=2)  # fmt: skip
        return None
