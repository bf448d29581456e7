"""MLA's absorbed attention read straight out of the engine's paged latent store (CPU, fp32).

The reference (`nanoseek.model.latent_attention`) attends over a context the cache has gathered into one
[B, T, rank+rope] tensor: the gather writes a copy of every row's latents, and the two matmuls read it
again, all of it streaming through memory at batch sizes where it outgrows the caches. The C++ kernel in
paged_attention.cpp reads each row's latents where they are stored, once from memory, for one query a row
(a decode step without drafts). It is built with the C++ compiler torch.compile also needs, once per
source and torch version, into ~/.cache/nanoseek (or $NANOSEEK_CACHE); where it cannot be built the
reference runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils import cpp_extension

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("paged_attention.cpp")


class PagedContext(NamedTuple):
    """One query a row's context, left in the paged store: row b's positions 0 .. lens[b] - 2 are the
    latents data[slots[b, t]], its last one is new[b] (this step's latent, not stored yet)."""

    data: Tensor  # [N, rank+rope]: one layer's store
    slots: Tensor  # [B, T] int64
    lens: Tensor  # [B] int64
    new: Tensor  # [B, rank+rope]


def paged_latent_attention(
    q: Tensor, context: Tensor | PagedContext, bias: Tensor | None, rank: int, *, reference: Callable
) -> Tensor:
    """`reference` (nanoseek.model.latent_attention), computed in place when the context is a
    PagedContext: q [B, H, rank+rope] -> [B, H, rank]. (A PagedContext's lengths are its mask.)"""
    if isinstance(context, PagedContext):
        data, slots, lens, new = context
        return torch.ops.nanoseek.paged_latent_attention(q, data, slots, lens, new, rank)
    return reference(q, context, bias, rank)


def _cache_dir() -> Path:
    return Path(os.environ.get("NANOSEEK_CACHE") or Path.home() / ".cache" / "nanoseek") / "kernels"


def _build(out: Path) -> None:
    """Compile paged_attention.cpp into the shared library `out`, atomically (concurrent builders each
    write their own file; the last rename wins with identical content)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++ or g++, or $CXX) on PATH")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [
        cxx, str(SOURCE), "-o", tmp, "-shared", "-fPIC", "-std=c++17", "-O3", "-march=native", "-fopenmp",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{p}" for p in cpp_extension.include_paths()),
        *(f"-L{p}" for p in cpp_extension.library_paths()),
        "-lc10", "-ltorch_cpu",
    ]  # fmt: skip
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, out)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed:\n{e.stderr[-2000:]}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


@cache
def paged_attention_available() -> bool:
    """Whether the kernel is loaded (built first if this source and torch have no build yet); once a
    process. A build that fails is logged, and the reference runs."""
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    lib = _cache_dir() / f"paged_attention-{key}.so"
    try:
        if not lib.exists():
            log.warning("building the paged attention kernel into %s (once)", lib.parent)
            _build(lib)
        torch.ops.load_library(str(lib))
    except (OSError, RuntimeError) as e:
        log.warning("paged attention kernel unavailable, decoding gathers the context instead: %s", e)
        return False
    torch.library.register_fake("nanoseek::paged_latent_attention")(_shape)
    return True


def _shape(q: Tensor, data: Tensor, slots: Tensor, lens: Tensor, new: Tensor, rank: int) -> Tensor:
    return q.new_empty(q.shape[0], q.shape[1], rank)
