"""The native kernels (convnn/knn/csrc/kernels.cpp) against torch.topk / index_add_ and hand-made cases, its
oneDNN-scored selection against the matmul, and the fallback when no kernel can be built."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from convnn.knn import knn_select, native, prepare, prepared_similarity
from convnn.layers import build_layer
from convnn.layers.convnn import padded_rows


def run_python(script: str, **env: str) -> subprocess.CompletedProcess:
    """``python -c script`` in a fresh process with ``env`` added to this one's environment."""
    return subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


needs_kernel = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler to build the kernel"
)


@needs_kernel
def test_kernel_builds_where_a_compiler_is():
    assert native.available(), "the native top-k kernel failed to build (see the RuntimeWarning)"


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [1, 5, 32, 33, 64, 65, 100, 1156, 2049])
def test_equals_torch_topk_on_distinct_scores(m, dtype):
    generator = torch.Generator().manual_seed(m)
    wide = torch.randn(3, 70, m + 7, generator=generator, dtype=dtype)
    scores = wide[..., 3 : 3 + m]  # a column slice: rows strided in memory, as the selection passes them
    for k in sorted({1, 3, 8, min(m, native.MAX_K)}):
        if k > m:
            continue
        values, indices = native.topk_last(scores, k)
        ref_values, ref_indices = scores.topk(k, dim=-1)
        assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices), (m, k)


@needs_kernel
def test_ties_rank_by_lower_index_and_nan_ranks_first():
    row = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    values, indices = native.topk_last(row, 2)
    assert values.tolist() == [[3.0, 3.0]] and indices.tolist() == [[1, 2]]
    long_ties = torch.zeros(2, 300)  # the grouped path (M > 64): every entry tied
    long_ties[1, 250] = 1.0
    _, indices = native.topk_last(long_ties, 4)
    assert indices.tolist() == [[0, 1, 2, 3], [250, 0, 1, 2]]
    for m in (12, 29, 32, 64):  # short rows (M <= 64), ties everywhere: inside the top k and across its edge
        coarse = torch.randint(0, 4, (300, m), generator=torch.Generator().manual_seed(m)).float()
        values, indices = native.topk_last(coarse, 8)
        ref_values, ref_indices = coarse.sort(dim=-1, descending=True, stable=True)
        assert torch.equal(values, ref_values[:, :8]) and torch.equal(indices, ref_indices[:, :8])
    special = torch.randn(2, 200, generator=torch.Generator().manual_seed(0))
    special[0, 17], special[0, 40], special[1, 5] = float("nan"), float("inf"), float("-inf")
    values, indices = native.topk_last(special, 5)
    ref_values, ref_indices = special.topk(5, dim=-1)
    assert indices[0, :2].tolist() == [17, 40] and torch.equal(indices, ref_indices)
    torch.testing.assert_close(values, ref_values, equal_nan=True)
    for m in (12, 32, 64):  # short rows, in registers (M <= 32) or not
        special = torch.randn(3, m, generator=torch.Generator().manual_seed(m))
        special[0, 3], special[1, m - 1], special[2, 5] = float("nan"), float("inf"), float("-inf")
        values, indices = native.topk_last(special, 8)
        ref_values, ref_indices = special.topk(8, dim=-1)
        assert indices[0, 0] == 3 and indices[1, 0] == m - 1 and torch.equal(indices, ref_indices)
        torch.testing.assert_close(values, ref_values, equal_nan=True)


def test_selection_scored_by_onednn_matches_the_matmul_reference():
    """Float32 on CPU: cosine / dot scores come from oneDNN's 1x1 convolution in chunks of 16-multiple
    queries (the 1,156 keys padded to 1,168); neighbours equal a float64 matmul reference's."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1156, 16, generator=generator)
    queries = torch.arange(40, 1140, 1, dtype=torch.long)
    for kind in ("cosine", "dot"):
        values, idx = knn_select(x[:, queries], x, 9, kind=kind, queries=queries, chunk_size=200)
        ref = prepared_similarity(prepare(x[:, queries].double(), kind), prepare(x.double(), kind), kind)
        ref.scatter_(2, queries.view(1, -1, 1).expand(2, -1, 1), -torch.inf)
        ref_values, ref_idx = ref.topk(8, dim=-1)
        assert torch.equal(idx[..., 1:], ref_idx), kind
        torch.testing.assert_close(values[..., 1:], ref_values.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["cosine", "dot", "euclidean"])
@pytest.mark.parametrize("shared", [True, False])
def test_rows_prepared_inside_the_selection_equal_rows_prepared_before(kind, shared):
    """Without a gradient the selection normalises the rows itself (keys straight into the padded
    scoring buffer; queries taken from them when ``q is k``): neighbours and values are bitwise those
    of rows prepared outside it, as when a gradient needs them."""
    generator = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 1156, 16, generator=generator), torch.randn(2, 1156, 16, generator=generator)
    queries = torch.arange(35, 1121, dtype=torch.long)

    def select(x):
        q = x if shared else y[:, queries]
        return knn_select(q, x, 9, kind=kind, queries=queries)

    with torch.no_grad():
        values, idx = select(x)
    grad_values, grad_idx = select(x.clone().requires_grad_())
    assert grad_values.requires_grad and not values.requires_grad
    assert torch.equal(idx, grad_idx)
    assert torch.equal(values, grad_values.detach())


def test_layer_output_is_the_same_without_the_kernel(monkeypatch):
    layer = build_layer("convnn", 8, 8, k=9, sampling="random", num_candidates=40)
    x = torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    with_kernel = layer(x)
    monkeypatch.setattr(native, "available", lambda: False)
    torch.manual_seed(0)
    torch.testing.assert_close(layer(x), with_kernel, rtol=0, atol=0)


def test_a_failed_build_warns_once_and_falls_back_to_torch_topk(tmp_path):
    """A real fault: no usable compiler (CXX points at nothing) in a fresh extension directory."""
    script = textwrap.dedent(
        """
        import warnings
        import torch
        from convnn.knn import native
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not native.available() and not native.available()
            scores = torch.randn(4, 50)
            values, indices = native.topk_last(scores, 3)
        assert torch.equal(indices, scores.topk(3).indices)
        messages = [str(w.message) for w in caught if "native kernels" in str(w.message)]
        assert len(messages) == 1, messages
        print(messages[0])
        """
    )
    done = run_python(script, CXX=str(tmp_path / "no-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    assert done.returncode == 0, done.stderr
    assert "could not be built" in done.stdout and "using torch.topk / index_add_" in done.stdout


def test_convnn_native_0_turns_the_kernel_off():
    script = "from convnn.knn import native; print(native.available())"
    done = run_python(script, CONVNN_NATIVE="0")
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_index_add_rows_equals_index_add_with_repeated_rows(threads):
    generator = torch.Generator().manual_seed(5)
    index = torch.randint(0, 40, (3000,), generator=generator)  # every row hit ~75 times
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype, width in ((torch.float64, 64), (torch.float32, 72), (torch.float32, 5)):
            src = torch.randn(3000, width, generator=generator, dtype=dtype)
            start = torch.randn(40, width, generator=generator, dtype=dtype)
            ours = native.index_add_rows(start.clone(), index, src)
            torch.testing.assert_close(ours, start.clone().index_add_(0, index, src))
            again = native.index_add_rows(start.clone(), index, src)
            assert torch.equal(ours, again)  # rows are added in order: bitwise reproducible
    finally:
        torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_padded_rows_and_their_gradient_equal_torch_pad(threads):
    """The map layer's padded token rows and their gradient (transposed in 8 x 8 blocks, the edges one
    by one) against ``F.pad`` and a permute, bitwise, float32 and float64; the gradient is a
    contiguous map."""
    generator = torch.Generator().manual_seed(6)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype, (c, h, w), pad in [
            (torch.float32, (64, 16, 16), 1),
            (torch.float32, (20, 7, 19), 2),
            (torch.float32, (3, 5, 8), 1),
            (torch.float64, (8, 9, 10), 1),
        ]:
            x = torch.randn(2, c, h, w, generator=generator, dtype=dtype, requires_grad=True)
            ours = padded_rows(x, pad)
            reference = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)
            assert torch.equal(ours, reference), (c, h, w)
            grad = torch.randn(ours.shape, generator=generator, dtype=dtype)
            (ours_grad,) = torch.autograd.grad(ours, x, grad)
            (reference_grad,) = torch.autograd.grad(reference, x, grad)
            assert torch.equal(ours_grad, reference_grad) and ours_grad.is_contiguous(), (c, h, w)
        # a channels-last map (every map after a ConvNN layer and BatchNorm): the gradient keeps the layout
        x = torch.randn(2, 64, 16, 16, generator=generator).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        ours = padded_rows(x, 1)
        assert torch.equal(ours, F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1))
        (ours_grad,) = torch.autograd.grad(ours, x, torch.ones_like(ours))
        assert torch.equal(ours_grad, torch.ones_like(x))
        assert ours_grad.stride(1) == 1  # channels innermost, as in x
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_index_add_rows_rejects_an_index_out_of_range():
    with pytest.raises(RuntimeError, match=r"index 7 out of range \[0, 7\)"):
        native.index_add_rows(torch.zeros(7, 4), torch.tensor([0, 7]), torch.ones(2, 4))


@needs_kernel
@pytest.mark.slow  # builds the extension twice more (about 45 s on 2 cores)
@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT"])
def test_kernels_built_for_other_instruction_sets_agree(capability, tmp_path):
    """The AVX2 and plain C++ paths of the kernels (this machine runs the AVX-512 one), built fresh."""
    script = textwrap.dedent(
        f"""
        import torch
        from convnn.knn import native
        native.build({capability!r})
        generator = torch.Generator().manual_seed(0)
        for m in (20, 64, 65, 100, 1156):
            scores = torch.randn(300, m + 3, generator=generator)[:, :m]
            for k in (1, 8, min(m, 32)):
                values, indices = torch.ops.convnn_native.topk_rows(scores, k)
                ref = scores.topk(k)
                assert torch.equal(values, ref.values) and torch.equal(indices, ref.indices), (m, k)
        x = torch.randn(2, 20, 7, 19, generator=generator)
        rows = torch.nn.functional.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)
        assert torch.equal(torch.ops.convnn_native.padded_rows(x, 1), rows)
        assert torch.equal(torch.ops.convnn_native.cropped_map(rows.contiguous(), 1), x)
        index = torch.randint(0, 9, (500,), generator=generator)
        src = torch.randn(500, 40, generator=generator)
        out = torch.zeros(9, 40)
        torch.ops.convnn_native.index_add_rows(out, index, src)
        torch.testing.assert_close(out, torch.zeros(9, 40).index_add_(0, index, src))
        print("ok")
        """
    )
    done = run_python(script, TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
