"""The native step kernels (convnn/knn/csrc/kernels.cpp: select_chunks, gather_aggregate,
gather_scaled_sum, their backward passes and selected_pairs_grad) against the Python loops of
convnn/knn/ops.py and selection.py they stand in for: bitwise equal, forward and backward, at 1 and 2
torch threads, with many steps per call so the steps' in-order merges run while other steps compute.
The one exception, gather_aggregate's float32 forward (its own tiled product on AVX2 builds), equals the
loops within float32 rounding and is bitwise the same at every thread count."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from convnn.knn import gather_aggregate, gather_scaled_sum, knn_select, native, ops

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler to build the kernels"
)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """Run the native side at ``request.param`` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def native_and_loops(fn, monkeypatch, kernels: set[str]) -> tuple:
    """``fn()`` with the native kernels (asserted to run: ``kernels``, names in ``convnn_native``), then
    with the Python loops."""
    assert native.available()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with_kernels = fn()
    ran = {
        e.key.removeprefix("convnn_native::")
        for e in prof.key_averages()
        if e.key.startswith("convnn_native::")
    }
    assert kernels <= ran, ran
    with monkeypatch.context() as patch:
        patch.setattr(native, "available", lambda: False)
        loops = fn()
    return with_kernels, loops


def assert_bitwise(ours: tuple, reference: tuple, rounded: tuple[int, ...] = ()) -> None:
    """Outputs equal bitwise, those at ``rounded`` within float rounding (``assert_close``)."""
    assert len(ours) == len(reference)
    for i, (a, b) in enumerate(zip(ours, reference, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        if i in rounded:
            torch.testing.assert_close(a, b)
        else:
            assert torch.equal(a, b), f"output {i}: max difference {(a - b).abs().max().item()}"


def leaves(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Fresh leaf copies of the floating-point ``tensors`` that require a gradient; the rest as given."""
    return [
        t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in tensors
    ]


def forward_backward(op, inputs: list, grad: torch.Tensor) -> tuple:
    """``op(*inputs)`` and the gradients of every input that requires one for ``grad``."""
    inputs = leaves(*inputs)
    out = op(*inputs)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return (out.detach(), *torch.autograd.grad(out, wanted, grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scaled", [False, True])
def test_gather_aggregate_equals_the_python_steps(dtype, scaled, threads, monkeypatch):
    """600 tokens of k = 9 neighbours among 500 rows of 8 channels, steps of 16 tokens (38 steps: one
    short); rows repeat across steps, so the index-add merges overlap."""
    monkeypatch.setattr(ops, "STEP_ELEMENTS", 16 * 9 * 8)
    generator = torch.Generator().manual_seed(1)
    v = torch.randn(500, 8, generator=generator, dtype=dtype)
    flat = torch.randint(0, 500, (600, 9), generator=generator)
    weight = torch.randn(12, 9 * 8, generator=generator, dtype=dtype)
    bias = torch.randn(12, generator=generator, dtype=dtype)
    scale = torch.rand(600, 9, generator=generator, dtype=dtype) if scaled else None
    grad = torch.randn(600, 12, generator=generator, dtype=dtype)

    def run():
        return forward_backward(gather_aggregate, [v, flat, weight, bias, scale], grad)

    rounded = (0,) if dtype == torch.float32 else ()  # the forward's own tiled product (AVX2)
    kernels = {"gather_aggregate", "gather_aggregate_backward"}
    assert_bitwise(*native_and_loops(run, monkeypatch, kernels), rounded)


@pytest.mark.parametrize("outputs", [40, 250])
def test_gather_aggregate_forward_is_the_same_at_every_thread_count(outputs, monkeypatch):
    """A deep product (64 channels x 9 neighbours) into 40 outputs (tiles of 16, 16 and 8 columns; one
    pass over the depth) or 250 (three passes of at most 262 rows of the columns) for 1,000 tokens in
    steps of 48 (tiles of 6 rows; a short last step): bitwise the same at 1 and 2 threads, and within
    float32 rounding of the float64 product."""
    monkeypatch.setattr(ops, "STEP_ELEMENTS", 48 * 9 * 64)
    generator = torch.Generator().manual_seed(4)
    v = torch.randn(3000, 64, generator=generator)
    flat = torch.randint(0, 3000, (1000, 9), generator=generator)
    weight = torch.randn(outputs, 9 * 64, generator=generator) / 24
    bias = torch.randn(outputs, generator=generator)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(gather_aggregate(v, flat, weight, bias, None))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
    exact = v.double()[flat].flatten(1) @ weight.double().t() + bias.double()
    torch.testing.assert_close(outs[0].double(), exact, rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_scaled_sum_equals_the_python_steps(dtype, threads, monkeypatch):
    monkeypatch.setattr(ops, "STEP_ELEMENTS", 16 * 9 * 8)
    generator = torch.Generator().manual_seed(2)
    v = torch.randn(500, 8, generator=generator, dtype=dtype)
    flat = torch.randint(0, 500, (600, 9), generator=generator)
    w = torch.rand(600, 9, generator=generator, dtype=dtype)
    scale = torch.randn(9, 8, generator=generator, dtype=dtype)
    grad = torch.randn(600, 8, generator=generator, dtype=dtype)

    def run():
        return forward_backward(gather_scaled_sum, [v, flat, w, scale], grad)

    assert_bitwise(*native_and_loops(run, monkeypatch, {"gather_scaled_sum", "gather_scaled_sum_backward"}))


@pytest.mark.parametrize("kind", ["cosine", "dot", "euclidean"])
@pytest.mark.parametrize("sampled", [False, True])
def test_selection_and_its_gradient_equal_the_python_chunks(kind, sampled, threads, monkeypatch):
    """All keys or 60 sampled candidates of 2 images of 300 tokens (chunks of 48 queries and a tail
    of 12; cosine and dot scored natively, euclidean by the Python chunks either way): neighbours,
    values and the selected pairs' gradients of q and k (steps of 4 queries)."""
    monkeypatch.setattr(ops, "STEP_ELEMENTS", 2 * 4 * 9 * 16)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 300, 16, generator=generator)
    candidates = torch.randperm(300, generator=generator)[:60] if sampled else None
    grad = torch.randn(2, 300, 9, generator=generator)

    def run():
        (q,) = leaves(x)
        keys = q[:, candidates] if sampled else q
        values, idx = knn_select(q, keys, 9, kind=kind, candidates=candidates, chunk_size=48)
        return values.detach(), idx, *torch.autograd.grad(values, q, grad)

    kernels = {"selected_pairs_grad"} | (
        {"select_chunks"} if kind != "euclidean" else set()
    )  # by oneDNN / GEMM
    assert_bitwise(*native_and_loops(run, monkeypatch, kernels))


def test_narrow_rows_make_steps_of_at_most_max_step_tokens():
    """64 channels x 9 neighbours would fill STEP_ELEMENTS with 1,820 tokens; a step holds at most
    MAX_STEP_TOKENS (a multiple of 16), while wide rows keep their cache-sized steps."""
    flat = torch.zeros(32 * 1024, 9, dtype=torch.long)
    assert ops._step(flat, torch.empty(1, 64)) == ops.MAX_STEP_TOKENS == 1024
    assert ops._step(flat, torch.empty(1, 256)) == 448  # (1 << 20) // (9 * 256) = 455, to 16s


def test_a_failing_step_raises_at_two_threads_instead_of_stalling_the_merges():
    """A bad row index in step 30 of 38 fails that step's gather; the steps after it, which wait to
    merge in step order, stop waiting, and the op raises the gather's error (a subprocess with a
    deadline, so a stalled wait fails the test instead of hanging the suite)."""
    script = textwrap.dedent(
        """
        import torch
        from convnn.knn import native
        assert native.available()
        torch.set_num_threads(2)
        flat = torch.randint(0, 500, (600, 9))
        flat[30 * 16, 4] = 10_000
        args = (torch.randn(600, 12), torch.randn(500, 8), flat, torch.randn(12, 72), None)
        try:
            torch.ops.convnn_native.gather_aggregate_backward(*args, True, True, False, 16, False)
        except (IndexError, RuntimeError) as error:
            print("raised:", error)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "raised: index out of range" in done.stdout, done.stdout
