"""The compiled LoRA-expert kernels: parity with the formula written in plain tensor ops, and the build's fallbacks."""

import shutil
import warnings

import pytest
import torch

from unimoe.moe import LoRAExperts, make_plan, native
from unimoe.moe.experts import _LoRAExpertLoop, _native_kernels

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A clean build cache and a cleared ``lora_kernels`` memo; the memo is cleared again afterwards."""
    monkeypatch.setenv("UNIMOE_CACHE", str(tmp_path))
    monkeypatch.delenv("UNIMOE_NATIVE", raising=False)
    native.lora_kernels.cache_clear()
    yield tmp_path
    native.lora_kernels.cache_clear()


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rank", [4, 12, 16])  # eight factor rows at a time, and the rest
@pytest.mark.parametrize("with_keep", [False, True], ids=["weights-sum-to-one", "keep-term"])
def test_native_lora_loop_matches_reference(rank, with_keep, threads, lora_loop_reference):
    """Output and every gradient of the kernel path against the float64 reference. The sizes leave partial tiles and a
    partial column block (37 tokens, I = 160 = 128 + 32) and one expert without tokens; with 2 threads the factor
    gradients are summed from per-thread copies."""
    torch.set_num_threads(threads)  # conftest restores it
    check_against_reference(rank, with_keep, lora_loop_reference)


def check_against_reference(rank, with_keep, lora_loop_reference):
    t, h, i, e, s = 37, 24, 160, 4, 0.6
    g = torch.Generator().manual_seed(rank)
    assert _native_kernels(torch.zeros(1), i) is not None, "the kernels should build on this machine"

    scores = torch.rand(t, e, generator=g)
    scores[:, 2] = -1.0  # expert 2 gets no tokens
    top = scores.topk(2, dim=-1).indices  # (T, 2)
    order = top.flatten().argsort(stable=True)
    token_index = torch.arange(t).repeat_interleave(2)[order]
    counts = torch.bincount(top.flatten(), minlength=e).tolist()
    assert counts[2] == 0

    def make(*shape, std=1.0, grad=True):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).requires_grad_(grad)

    inputs = [
        make(t, h),
        make(2 * i, h, std=0.3),  # gate | up
        make(h, i, std=0.1),
        make(e, 2 * rank, h, std=0.3),  # A gate | up
        make(e, i, rank, std=0.3),
        make(e, i, rank, std=0.3),
        make(e, rank, i, std=0.1),
        make(e, h, rank, std=0.3),
        torch.rand(2 * t, generator=g, dtype=torch.float64).requires_grad_(),
        torch.rand(t, generator=g, dtype=torch.float64).requires_grad_() if with_keep else None,
    ]
    grad_out = torch.randn(t, h, generator=g, dtype=torch.float64)

    def run(fn, tensors):
        tensors = [None if v is None else v.detach().clone().requires_grad_() for v in tensors]
        out = fn(*tensors, token_index, counts, s)
        out.backward(grad_out.to(out.dtype))
        return out.detach(), [None if v is None else v.grad for v in tensors]

    ref_out, ref_grads = run(lora_loop_reference, inputs)
    out, grads = run(_LoRAExpertLoop.apply, [None if v is None else v.float() for v in inputs])
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
    for name, got, want in zip(["x", "w_gu", "w_d", "a_gu", "b_g", "b_u", "a_d", "b_d", "weight", "keep"], grads,
                               ref_grads):  # fmt: skip
        if want is None:
            continue
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@needs_compiler
@pytest.mark.parametrize("routing", ["softmax", "renormalized-with-padding"])
def test_native_and_torch_ops_paths_agree_in_the_layer(monkeypatch, routing):
    """The LoRA experts module with the kernels and with ``UNIMOE_NATIVE=0``: same outputs and gradients. Softmax
    weights leave the frozen FFN's keep term live; renormalized ones skip it, and padding tokens (no computed slot)
    are rows the kernels never write, which must come out zero."""
    torch.manual_seed(0)
    experts = LoRAExperts(num_experts=5, hidden_size=32, intermediate_size=64, lora_rank=8)
    with torch.no_grad():
        for name in ("lora_B_gate", "lora_B_up", "lora_B_down"):
            getattr(experts, name).normal_(std=0.2)
    x = torch.randn(50, 32)
    scores = torch.randn(50, 5)
    index = scores.topk(2, dim=-1).indices
    weight = scores.softmax(-1).gather(1, index)
    computed = torch.ones_like(index, dtype=torch.bool)
    if routing == "softmax":
        plan = make_plan(index, weight, computed, 5)
    else:
        computed[[3, 17, 49]] = False  # padding
        plan = make_plan(index, weight / weight.sum(-1, keepdim=True), computed, 5, weights_sum_to_one=True)

    def run():
        experts.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        out = experts(xx, plan)
        out.pow(2).sum().backward()
        return out.detach(), xx.grad, {n: p.grad.clone() for n, p in experts.named_parameters() if p.requires_grad}

    native.lora_kernels.cache_clear()
    out, grad_x, grads = run()
    monkeypatch.setenv("UNIMOE_NATIVE", "0")
    native.lora_kernels.cache_clear()
    try:
        assert _native_kernels(x, 64) is None
        ref_out, ref_grad_x, ref_grads = run()
    finally:
        native.lora_kernels.cache_clear()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_x, ref_grad_x, rtol=1e-5, atol=1e-6)
    if routing != "softmax":
        assert out[[3, 17, 49]].abs().max() == 0
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_kernels_apply_only_to_float32_cpu_and_whole_vectors():
    if native.lora_kernels() is None:
        pytest.skip("no native kernels here")
    assert _native_kernels(torch.zeros(1), 48) is not None
    assert _native_kernels(torch.zeros(1), 40) is None  # not a multiple of 16 columns
    assert _native_kernels(torch.zeros(1, dtype=torch.float64), 48) is None
    assert _native_kernels(torch.zeros(1, dtype=torch.bfloat16), 48) is None


@needs_compiler
def test_build_is_cached_and_reused(fresh_build, monkeypatch):
    assert native.lora_kernels() is not None
    files = [p.name for p in (fresh_build / "native").iterdir()]
    assert len(files) == 1 and files[0].startswith("lora_swiglu-"), files  # no temporary file left
    native.lora_kernels.cache_clear()

    def no_compile(*_):
        raise AssertionError("rebuilt although the cached library matches")

    monkeypatch.setattr(native, "_compile", no_compile)
    assert native.lora_kernels() is not None


@needs_compiler
def test_portable_build_when_the_native_one_fails(fresh_build, monkeypatch, lora_loop_reference):
    """A compiler that refuses ``-march=native`` (another architecture, an old compiler) gets the portable build, which
    must compute the same (no AVX-512 there: the vector type is split into narrower registers)."""
    wrapper, log = fresh_build / "no-native-cc", fresh_build / "calls.log"
    wrapper.write_text(
        f'#!/bin/sh\necho "$@" >> {log}\n'
        'for a in "$@"; do [ "$a" = "-march=native" ] && { echo "no -march=native" >&2; exit 1; }; done\n'
        f'exec {shutil.which("cc")} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    assert native.lora_kernels() is not None
    builds = [line for line in log.read_text().splitlines() if "-shared" in line]
    assert len(builds) == 2 and "-march=native" in builds[0] and "-march" not in builds[1]
    check_against_reference(16, True, lora_loop_reference)


def test_without_a_compiler_the_layer_falls_back_with_one_warning(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-unimoe")
    with pytest.warns(UserWarning, match="no C compiler"):
        assert native.lora_kernels() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.lora_kernels() is None  # memoized: warned once
    experts = LoRAExperts(num_experts=2, hidden_size=8, intermediate_size=16, lora_rank=2)
    index = torch.tensor([[0], [1], [0]])
    out = experts(torch.randn(3, 8), make_plan(index, torch.ones(3, 1), torch.ones_like(index, dtype=torch.bool), 2))
    assert out.shape == (3, 8) and torch.isfinite(out).all()


def test_a_failing_compiler_gives_a_warning_naming_it(fresh_build, monkeypatch):
    broken = fresh_build / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'cc1: fatal error: out of cheese' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with pytest.warns(UserWarning, match="out of cheese"):
        assert native.lora_kernels() is None
    assert not list((fresh_build / "native").iterdir())  # no half-written library left behind


def test_switched_off_by_environment(fresh_build, monkeypatch):
    monkeypatch.setenv("UNIMOE_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.lora_kernels() is None
