"""The native CPU matrix-vector kernel against a float64 reference, for every ISA it is built
for here, every weight format and the awkward shapes (K not a multiple of the vector width,
N not a multiple of the row block, rows split across threads)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptkit import kernels
from gptkit.quantize import block_rows, quantize_rows, unblock_rows


def _weight(fmt: str, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(w in `fmt`, scale or None, the fp64 matrix they stand for)."""
    w = torch.randn(n, k) * torch.logspace(-2, 0, n)[:, None]  # rows of different size
    if fmt == "int8":
        q, scale = quantize_rows(w)
        return q, scale, q.double() * scale.double()[:, None]
    w = w.to(torch.bfloat16) if fmt == "bf16" else w
    return w, None, w.double()


def test_the_kernel_builds_on_an_x86_machine_with_a_compiler():
    """Guards the silent fallback: where it can be built, it is (CI is such a machine)."""
    if platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None:
        pytest.skip("not an x86-64 machine with g++")
    if not kernels.runnable_isas():
        pytest.skip("CPU has neither AVX2 nor AVX-512")
    assert kernels.gemv_op() is not None


def _fixed_point(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 kernel's view of x (M, K): q = round(x / s), s = max|x| / 32767 per row,
    in the kernel's own fp32 operations."""
    s = x.abs().amax(dim=1) / 32767.0
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    return torch.round(x * inv[:, None]), s


@pytest.mark.parametrize("isa", list(kernels.ISA_FLAGS))
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("threads", [1, 2])
def test_gemv_matches_float64_reference(isa, fmt, threads):
    """Guards the vector loop, its K tail, the partial last row block, the next-block
    prefetch and the thread split: every shape against x @ W^T * scale + bias in fp64.
    int8 takes x in 16-bit fixed point: its integer sums must be exact (against the same
    rounding of x done here), and within the rounding's bound s/2 * sum|w| of fp64."""
    if isa not in kernels.runnable_isas():
        pytest.skip(f"this CPU cannot run the {isa} build")
    op = kernels.gemv_op(isa)
    assert op is not None
    torch.set_num_threads(threads)  # the autouse fixture restores it
    shapes = [(1, 1, 1), (1, 5, 17), (3, 37, 100), (8, 1000, 768), (2, 64, 48), (1, 9, 4200)]
    shapes += [(13, 37, 100)]  # fp32: sgemm past 8 rows; bf16 / int8: 4 + 4 + 4 + 1 rows
    for m, n, k in shapes:  # k = 4200: the int8 loop's integer chunks (4096) and a tail
        w, scale, ref_w = _weight(fmt, n, k)
        x = torch.randn(m, k)
        for bias in (None, torch.randn(n)):
            b = 0.0 if bias is None else bias.double()
            expected = x.double() @ ref_w.T + b
            got = op(x, w, scale, bias)
            assert got.shape == (m, n) and got.dtype == torch.float32
            size = (x.double().abs() @ ref_w.abs().T).max().item()
            where = (m, n, k, bias is None)
            if fmt == "int8":
                q, s = _fixed_point(x)
                exact = (q.double() @ w.double().T) * s.double()[:, None] * scale.double() + b
                tol = 1e-6 * size + 1e-6  # fp32 rounding of the final scaling only
                assert (got.double() - exact).abs().max().item() < tol, where
                bound = s.double()[:, None] / 2 * (ref_w.abs().sum(1)[None, :]) + tol
                assert ((got.double() - expected).abs() <= bound).all(), where
            else:
                tol = 1e-5 * size + 1e-6
                assert (got.double() - expected).abs().max().item() < tol, where


@pytest.mark.parametrize("isa", list(kernels.ISA_FLAGS))
def test_gemv_int8_zero_and_non_finite_rows(isa):
    """Guards the fixed-point rounding's edge cases: a row of zeros gives exactly the bias,
    and an inf or NaN in a row makes that row's outputs NaN (not garbage), as fp32's would."""
    if isa not in kernels.runnable_isas():
        pytest.skip(f"this CPU cannot run the {isa} build")
    op = kernels.gemv_op(isa)
    w, scale, _ = _weight("int8", 6, 40)
    bias = torch.randn(6)
    x = torch.randn(4, 40)
    x[0] = 0.0
    x[1, 33] = float("inf")
    x[2, 3] = float("nan")
    got = op(x, w, scale, bias)
    assert torch.equal(got[0], bias)
    assert got[1].isnan().all() and got[2].isnan().all()
    assert got[3].isfinite().all()


@pytest.mark.parametrize("isa", list(kernels.ISA_FLAGS))
def test_gemv_int8_long_rows_do_not_overflow(isa):
    """Guards the integer chunks: 20,000 products of the largest values (32767 * 127) per
    row overflow int32 lanes unless the sums are moved out every 4096 columns."""
    if isa not in kernels.runnable_isas():
        pytest.skip(f"this CPU cannot run the {isa} build")
    k = 20_000
    w = torch.full((4, k), 127, dtype=torch.int8)
    w[1] = -127
    got = kernels.gemv_op(isa)(torch.ones(1, k), w, torch.full((4,), 1 / 127), None)
    assert torch.allclose(got, torch.tensor([[k, -k, k, k]], dtype=torch.float32), rtol=1e-6)


@pytest.mark.parametrize("isa", list(kernels.ISA_FLAGS))
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
@pytest.mark.parametrize("threads", [1, 2])
def test_gemv_blocked_equals_the_row_major_matrix(isa, fmt, threads):
    """Guards the blocked layout: the same sums as the row-major kernel, in the same order,
    so bit for bit (int8: exact integers), for a padded last group (N % 4 != 0), one chunk
    (K = 32), int8's kChunk boundary (K = 4128) and 1-8 rows of x; and the round trip."""
    if isa not in kernels.runnable_isas():
        pytest.skip(f"this CPU cannot run the {isa} build")
    op = kernels.gemv_op(isa)
    torch.set_num_threads(threads)  # conftest restores it
    for n, k in [(1, 32), (7, 64), (130, 768), (61, 4128)]:
        q, scale, _ = _weight(fmt, n, k)
        scale = torch.rand(n) if scale is None else scale
        blocked = block_rows(q)
        assert blocked.shape == (-(-n // 4), k // 32, 4, 32)
        assert torch.equal(unblock_rows(blocked, n), q)
        bias = torch.randn(n)
        for m in (1, 3, 8):
            x = torch.randn(m, k)
            assert torch.equal(op(x, blocked, scale, bias), op(x, q, scale, bias))


@pytest.mark.parametrize("isa", list(kernels.ISA_FLAGS))
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
@pytest.mark.parametrize("threads", [1, 2])
def test_gemv_many_rows_equal_the_widened_weights_product(isa, fmt, threads):
    """Guards the path for more than 48 rows of x (a prompt): weights widened to fp32 a
    slab of 512 rows at a time and multiplied by sgemm. Against x @ W^T * scale + bias in
    fp64 for row-major and blocked weights, N over one slab and not a whole number of
    groups (a padded last group), and K with a vector tail (row-major only)."""
    if isa not in kernels.runnable_isas():
        pytest.skip(f"this CPU cannot run the {isa} build")
    op = kernels.gemv_op(isa)
    torch.set_num_threads(threads)  # conftest restores it
    for m, n, k, blocked in [(49, 1030, 64, True), (200, 37, 96, True), (64, 515, 33, False)]:
        w, scale, ref_w = _weight(fmt, n, k)
        if blocked:
            scale = torch.ones(n) if scale is None else scale
            w = block_rows(w)
        x, bias = torch.randn(m, k), torch.randn(n)
        got = op(x, w, scale, bias)
        expected = x.double() @ ref_w.T + bias.double()
        size = (x.double().abs() @ ref_w.abs().T).max().item()
        assert got.shape == (m, n)
        # fp32 products of the exact weights (measured <= 8e-8 of the size): x is not rounded
        # to int8's 16-bit fixed point on this path, which alone would be off by ~1e-5
        err = (got.double() - expected).abs().max().item() / size
        assert err < 1e-6, (m, n, k, blocked)


def test_gemv_refuses_bad_arguments_with_a_message():
    op = kernels.gemv_op()
    if op is None:
        pytest.skip("native kernels unavailable here")
    with pytest.raises(RuntimeError, match="matrix"):
        op(torch.randn(1, 8), torch.randn(4, 9), None, None)
    blocked = block_rows(torch.ones(8, 64, dtype=torch.int8))  # (2, 2, 4, 32)
    with pytest.raises(RuntimeError, match="scales"):
        op(torch.randn(1, 64), blocked, None, None)  # blocked needs its row count
    with pytest.raises(RuntimeError, match="groups"):
        op(torch.randn(1, 64), blocked, torch.ones(9), None)  # 9 rows need 3 groups
    with pytest.raises(RuntimeError, match="float32"):
        op(torch.randn(1, 8).double(), torch.randn(4, 8), None, None)
    with pytest.raises(RuntimeError, match="int8"):
        op(torch.randn(1, 8), torch.randn(4, 8).half(), None, None)


def test_disabled_by_environment(monkeypatch):
    """Guards GPTKIT_NATIVE_KERNELS=0: no kernel, so every caller takes ATen's path."""
    monkeypatch.setenv("GPTKIT_NATIVE_KERNELS", "0")
    kernels.library.cache_clear()
    try:
        assert kernels.gemv_op() is None
    finally:
        monkeypatch.delenv("GPTKIT_NATIVE_KERNELS")
        kernels.library.cache_clear()


def test_each_torch_installation_builds_in_its_own_folder(tmp_path, monkeypatch):
    """Guards kernels.build_directory: two environments with the same torch version used one
    folder, each rebuilt the kernel after the other had used it (its header paths differ),
    relinking the library under any process that had it loaded."""
    monkeypatch.setenv("GPTKIT_KERNEL_CACHE", str(tmp_path))
    here = kernels.build_directory("gptkit_cpu_x")
    assert kernels.build_directory("gptkit_cpu_x") == here  # stable: the cache is found again
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-env" / "torch" / "__init__.py"))
    there = kernels.build_directory("gptkit_cpu_x")
    assert there != here and there.parent == here.parent == tmp_path and there.is_dir()


def test_a_stale_build_lock_is_cleared(tmp_path):
    """Guards kernels.build_lock: a lock file left by a killed build (cpp_extension would
    wait on it forever), however recent, is removed when no process holds the build, and
    the kernel builds into a fresh cache. In a child process: one process cannot load two
    builds of the same op namespace."""
    isa = kernels.native_isa()
    if isa not in kernels.ISA_FLAGS:
        pytest.skip("no native kernel for this CPU")
    env = {**os.environ, "GPTKIT_KERNEL_CACHE": str(tmp_path)}
    script = (
        "import sys; from gptkit import kernels; "
        f"print(kernels.build_directory('gptkit_cpu_{isa.lower()}'))"
    )
    lock = Path(subprocess.check_output([sys.executable, "-c", script], env=env, text=True).strip())
    lock = lock / "lock"
    lock.touch()  # just now, by a process that died
    script = "from gptkit import kernels; assert kernels.gemv_op() is not None"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert not lock.exists()
    assert "building the native CPU kernel" in done.stderr


def test_the_kernel_builds_with_the_ninja_beside_python(tmp_path, monkeypatch):
    """Guards against rebuilding the kernel from scratch (~50 s) each time the venv is
    activated or not: a system ninja and the venv's keep build logs the other does not
    trust, so the build must run the venv's whatever PATH says (and PATH come back)."""
    (tmp_path / "ninja").write_text("")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with kernels._environment_ninja():
        assert os.environ["PATH"] == os.pathsep.join([str(tmp_path), "/usr/bin:/bin"])
    assert os.environ["PATH"] == "/usr/bin:/bin"
    monkeypatch.delenv("PATH")
    with kernels._environment_ninja():
        assert os.environ["PATH"] == str(tmp_path)
    assert "PATH" not in os.environ
