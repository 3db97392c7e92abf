"""engine/kernels.py: the fast decode step's C++ products and attention compute what torch computes, at the widths and
row counts where their vector loops have tails; where they cannot run, the step says why and keeps oneDNN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from thinkforge.engine import kernels


@pytest.fixture(scope="module")
def ops():
    built = kernels.ops()
    assert built is not None, f"the CPU kernels did not build here: {kernels.why_not()}"
    return built


def close(ours, theirs, rel=2e-6):
    scale = theirs.abs().max().clamp(min=1.0)
    assert (ours - theirs).abs().max() <= rel * scale * theirs.shape[-1] ** 0.5, (ours - theirs).abs().max()


# widths with and without a tail past the 8-float lanes, output rows with and without a tail past the 4-row blocks,
# input rows in pairs and alone
@pytest.mark.parametrize("rows, width, out", [(1, 64, 96), (2, 77, 13), (3, 577, 1003), (5, 8, 3), (8, 130, 4)])
def test_linear_with_its_norm_bias_and_residual(ops, rows, width, out):
    torch.manual_seed(rows * 1000 + width)
    x, w = torch.randn(rows, width), torch.randn(out, width)
    bias, residual, norm = torch.randn(out), torch.randn(rows, out), torch.rand(width) + 0.5
    close(ops.linear(x, [w], None, None, None, 0.0), x @ w.T)
    close(ops.linear(x, [w], bias, residual, None, 0.0), residual + F.linear(x, w, bias))
    close(ops.linear(x * 30, [w], None, None, norm, 1e-5), F.rms_norm(x * 30, (width,), norm, 1e-5) @ w.T)
    # parts stacked by rows (q, k, v read where they are): each part's own tail of rows
    parts = [torch.randn(n, width) for n in (out, 5, 2 * out + 1)]
    close(ops.linear(x, parts, None, None, None, 0.0), x @ torch.cat(parts).T)


@pytest.mark.parametrize("rows, width, inner", [(1, 64, 96), (3, 45, 7), (4, 576, 1536)])
def test_gated_silu_is_silu_of_gate_times_up(ops, rows, width, inner):
    torch.manual_seed(inner)
    x, w, norm = torch.randn(rows, width), torch.randn(2 * inner, width) / width**0.5, torch.rand(width) + 0.5
    gate, up = (x @ w.T).chunk(2, dim=-1)
    close(ops.gated_silu(x, w[:inner], w[inner:], None, 0.0), F.silu(gate) * up)
    gate, up = (F.rms_norm(x, (width,), norm, 1e-6) @ w.T).chunk(2, dim=-1)
    close(ops.gated_silu(x, w[:inner], w[inner:], norm, 1e-6), F.silu(gate) * up)


def _rotate(x, cos, sin, rotated):
    """transformers' rotate_half rotation of each head's first `rotated` dims (x (B, H, d), cos/sin (B, rotated))."""
    r, rest = x[..., :rotated], x[..., rotated:]
    half = rotated // 2
    turned = torch.cat([-r[..., half:], r[..., :half]], dim=-1)
    return torch.cat([r * cos[:, None] + turned * sin[:, None], rest], dim=-1)


@pytest.mark.parametrize("heads, kv_heads, d, rotated", [(4, 4, 16, 16), (9, 3, 64, 64), (8, 2, 20, 12), (2, 1, 264, 128)])
@pytest.mark.parametrize("padded", [False, True])
def test_attend_writes_the_cache_and_attends_like_sdpa(ops, heads, kv_heads, d, rotated, padded):
    """Grouped query heads, partial rotary (Phi-2, Phi-4-mini), head widths past the register sums (264), left
    padding hidden: the output is sdpa's over the rotated keys, and the new key and value are in the cache."""
    torch.manual_seed(heads * d)
    b, capacity, at = 3, 40, 29
    qkv = torch.randn(b, (heads + 2 * kv_heads) * d)
    angle = torch.rand(b, rotated // 2) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    k_buf, v_buf = torch.randn(b, kv_heads, capacity, d), torch.randn(b, kv_heads, capacity, d)
    before_k, before_v = k_buf.clone(), v_buf.clone()
    keys = torch.ones(b, at + 1, dtype=torch.bool)
    if padded:
        keys[0, :5] = False
        keys[2, :17] = False
    o = ops.attend(qkv, cos, sin, k_buf, v_buf, at, keys if padded else None, heads, kv_heads, d**-0.5)
    q = _rotate(qkv[:, : heads * d].view(b, heads, d), cos, sin, rotated)
    k = _rotate(qkv[:, heads * d : (heads + kv_heads) * d].view(b, kv_heads, d), cos, sin, rotated)
    v = qkv[:, (heads + kv_heads) * d :].view(b, kv_heads, d)
    close(k_buf[:, :, at], k)  # rotated with fused multiply-adds: float32 rounding apart from torch's
    assert torch.equal(v_buf[:, :, at], v)
    untouched = torch.ones(capacity, dtype=torch.bool)
    untouched[at] = False
    assert torch.equal(k_buf[:, :, untouched], before_k[:, :, untouched])
    assert torch.equal(v_buf[:, :, untouched], before_v[:, :, untouched])
    group = heads // kv_heads
    keys_ = k_buf[:, :, : at + 1].repeat_interleave(group, 1)
    values = v_buf[:, :, : at + 1].repeat_interleave(group, 1)
    theirs = F.scaled_dot_product_attention(q[:, :, None], keys_, values, attn_mask=keys[:, None, None], scale=d**-0.5)
    close(o, theirs.reshape(b, heads * d), rel=1e-5)


def test_attend_at_a_long_context_runs_on_threads_and_agrees(ops):
    """Past 4,096 key floats per head the heads are split over threads: the same result as one thread's."""
    torch.manual_seed(0)
    b, heads, kv_heads, d, capacity, at = 2, 4, 2, 64, 300, 299
    qkv, cos, sin = torch.randn(b, 8 * d), torch.ones(b, d), torch.zeros(b, d)
    k_buf, v_buf = torch.randn(b, kv_heads, capacity, d), torch.randn(b, kv_heads, capacity, d)
    threaded = ops.attend(qkv, cos, sin, k_buf.clone(), v_buf.clone(), at, None, heads, kv_heads, 0.125)
    with_one = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = ops.attend(qkv, cos, sin, k_buf.clone(), v_buf.clone(), at, None, heads, kv_heads, 0.125)
    finally:
        torch.set_num_threads(with_one)
    assert torch.equal(threaded, alone)


def test_bad_inputs_are_refused_with_a_reason(ops):
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.linear(torch.randn(1, 8, dtype=torch.float64), [torch.randn(4, 8)], None, None, None, 0.0)
    with pytest.raises(RuntimeError, match="x is 8 wide, w 9"):
        ops.linear(torch.randn(1, 8), [torch.randn(4, 9)], None, None, None, 0.0)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.linear(torch.randn(8, 2).T, [torch.randn(4, 8)], None, None, None, 0.0)
    with pytest.raises(RuntimeError, match="outside a cache of 4"):
        ops.attend(torch.randn(1, 48), torch.ones(1, 16), torch.zeros(1, 16), torch.zeros(1, 1, 4, 16),
                   torch.zeros(1, 1, 4, 16), 4, None, 1, 1, 0.25)


@pytest.fixture
def fresh(monkeypatch):
    """kernels.ops() as in a new process (its outcome is kept a process)."""
    monkeypatch.setattr(kernels, "_STATE", {})


def test_turned_off_the_fast_step_keeps_onednn(tmp_path, fresh, monkeypatch):
    from tests.test_fast_step import PROMPTS, step_logits, tiny

    monkeypatch.setenv("THINKFORGE_CPU_KERNELS", "0")
    assert kernels.ops() is None and kernels.why_not() == "THINKFORGE_CPU_KERNELS=0"
    model, _ = tiny(tmp_path, "llama")
    ours, theirs = step_logits(model, PROMPTS[:1], 3, True), step_logits(model, PROMPTS[:1], 3, False)
    assert not step_logits.plain
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()


# torch's message for a failed ninja build: its prefix, then ninja's whole output (the compile command first)
COMPILER_ERROR = ("Error building extension 'thinkforge_cpu_avx2_0': [1/2] c++ -MMD -MF main.o.d -O3 -c main.cpp -o main.o\n"
                  "FAILED: main.o\nc++ -MMD -MF main.o.d -O3 -c main.cpp -o main.o\n"
                  "main.cpp:2:10: fatal error: ATen/core/Tensor.h: No such file or directory\ncompilation terminated.\n"
                  "ninja: build stopped: subcommand failed.\n")
INTERRUPTED = ("Error building extension 'thinkforge_cpu_avx2_0': [1/2] c++ -MMD -MF main.o.d -O3 -c main.cpp -o main.o\n"
               "ninja: build stopped: interrupted by user.\n")


def test_a_compiler_error_is_told_once_kept_and_keeps_onednn(fresh, monkeypatch, tmp_path, capsys):
    """A compiler's error: warned once a process with its diagnostic line and the folder to delete to retry; later
    processes read it there instead of compiling again. Nothing is printed where stderr is not a terminal (a CLI's
    error stays its one line)."""
    import warnings

    import torch.utils.cpp_extension

    def fails(*args, **kwargs):
        raise RuntimeError(COMPILER_ERROR)

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", fails)
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        assert kernels.ops() is None and kernels.ops() is None
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert [str(w.message) for w in told] == [
        "thinkforge: decoding a few rows keeps oneDNN's products: the CPU kernels did not build (main.cpp:2:10: fatal "
        f"error: ATen/core/Tensor.h: No such file or directory); see {folder / 'failed.txt'}, delete {folder} to retry"]
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(kernels, "_STATE", {})  # a new process: not compiled again
    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", lambda *a, **k: pytest.fail("compiled again"))
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        assert kernels.ops() is None
    assert len(told) == 1 and "fatal error: ATen/core/Tensor.h" in str(told[0].message)


def test_an_interrupted_build_is_retried_by_the_next_process(fresh, monkeypatch, tmp_path):
    """Ctrl-C during the first chat reply interrupts ninja: nothing is kept, the next process builds."""
    import warnings

    import torch.utils.cpp_extension

    def interrupted(*args, **kwargs):
        raise RuntimeError(INTERRUPTED)

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", interrupted)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert kernels.ops() is None
    assert not list(tmp_path.rglob("failed.txt"))
    monkeypatch.setattr(kernels, "_STATE", {})
    built = []
    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", lambda *a, **k: built.append(a[0]))
    kernels.ops()
    assert built == [kernels._name(kernels._vector_unit())]


def test_building_is_said_on_a_terminal(monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    kernels._say("building")
    assert capsys.readouterr().err == "thinkforge: building\n"


def test_a_lock_left_by_a_killed_build_is_not_waited_on(ops, fresh):
    """torch's builder waits, without end, on a lock file that a build killed midway left behind: with ours held
    (released by the OS when a process dies), that file is stale and removed. (The built folder itself: a second
    copy of the library in one process would register its ops twice.)"""
    from pathlib import Path

    folder = Path(kernels._root()) / kernels._name(kernels._vector_unit())
    (folder / "lock").write_text("")
    import threading

    done = []
    loading = threading.Thread(target=lambda: done.append(kernels.ops()), daemon=True)
    loading.start()
    loading.join(timeout=120)  # torch's own wait has no end: a regression hangs here, then fails
    assert done and done[0] is not None and not (folder / "lock").exists()


def test_without_avx2_the_products_stay_onednn(fresh, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    if kernels.platform.machine().lower() in ("x86_64", "amd64"):
        assert kernels.ops() is None and "no AVX2" in kernels.why_not()


def test_ninja_is_found_in_the_venv_without_it_on_path(monkeypatch):
    """`.venv/bin/python -m thinkforge ...` (the Makefile, a service) has no venv on PATH, where pip put ninja."""
    import os
    import shutil
    import sys

    assert os.path.isfile(os.path.join(os.path.dirname(sys.executable), "ninja")), "ninja (a dependency) is not in the venv"
    monkeypatch.setenv("PATH", "/nonexistent")
    kernels._ninja_on_path()
    assert shutil.which("ninja") == os.path.join(os.path.dirname(sys.executable), "ninja")
