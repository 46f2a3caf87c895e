"""How the layers run, beyond their values: compilation, precision of the selection, determinism,
the training-only fast paths against the Conv1d paths, and (on CUDA) host-device syncs."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.data import DataLoader, TensorDataset

from convnn import knn
from convnn.knn import knn_select, reset_sampling
from convnn.layers import build_layer
from convnn.train import app as train
from convnn.train.config import validate_config
from convnn.train.distributed import Start
from convnn.train.module import ImageClassifier
from tests.test_configs import compose_train

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MAP_CASES = {
    "convnn all": ("convnn", {}),
    "convnn random": ("convnn", {"sampling": "random", "num_candidates": 16}),
    "convnn spatial softmax linear": (
        "convnn",
        {"sampling": "spatial", "num_candidates": 16, "rho": "softmax", "projections": "linear"},
    ),
    "convnn depthwise both": ("convnn", {"select_by": "both", "aggregation": "depthwise"}),
    "branching random": ("branching", {"ratio": 0.5, "sampling": "random", "num_candidates": 16}),
}
TOKEN_CASES = {
    "convnn_attention random": ("convnn_attention", {"sampling": "random", "num_candidates": 10}),
    "convnn_attention spatial self_logit": (
        "convnn_attention",
        {"sampling": "spatial", "num_candidates": 10, "self_logit": 1.0, "dropout_on": "output"},
    ),
    "convnn_attention all standard": ("convnn_attention", {"aggregation": "standard", "heads": 2}),
    "kvt_attention": ("kvt_attention", {"k": 5}),
}
DETERMINISTIC = {"convnn all", "convnn depthwise both", "convnn_attention all standard", "kvt_attention"}


def make(case: str, dtype=torch.float32) -> tuple[torch.nn.Module, callable]:
    """The layer of ``case`` (seeded) and a function ``batch -> input`` of its shape."""
    torch.manual_seed(0)
    if case in MAP_CASES:
        name, options = MAP_CASES[case]
        return build_layer(name, 6, 12, **options).to(dtype), lambda b: torch.randn(b, 6, 9, 9, dtype=dtype)
    name, options = TOKEN_CASES[case]
    return build_layer(name, 16, 16, **options).to(dtype), lambda b: torch.randn(b, 20, 16, dtype=dtype)


@pytest.mark.slow
@pytest.mark.parametrize("case", [*MAP_CASES, *TOKEN_CASES])
def test_compiles_fullgraph_in_train_mode_with_backward_and_a_dynamic_batch(case):
    # fullgraph=True fails on any graph break (host syncs such as .item() or boolean-mask indexing
    # included); no new compile after the first batch size means the batch stayed symbolic
    torch._dynamo.reset()  # no cache entries of other tests' layers of the same class
    layer, example = make(case)
    layer.train()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend=counter)
    frames = None
    for batch in (2, 3, 5):
        x = example(batch).requires_grad_()
        out = compiled(x)
        out.square().sum().backward()
        assert out.shape[0] == batch and torch.isfinite(out).all() and torch.isfinite(x.grad).all()
        frames = frames or counter.frame_count
        assert counter.frame_count == frames, f"recompiled for batch {batch}"
    if case in DETERMINISTIC:  # no random candidates, no dropout in eval: eager computes the same
        layer.eval()
        x = example(4).requires_grad_()
        x_eager = x.detach().clone().requires_grad_()
        compiled(x).square().sum().backward()
        layer(x_eager).square().sum().backward()
        torch.testing.assert_close(compiled(x), layer(x_eager), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x.grad, x_eager.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["convnn all", "convnn random"])
def test_compiled_map_layer_calls_the_eager_kernels(case):
    """Compiled in train mode, the map layer's graph holds the custom ops that run the eager code
    (chunked selection, gather-aggregate, padded rows), not a dense single-chunk selection."""
    torch._dynamo.reset()
    layer, example = make(case)
    layer.train()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = example(3).requires_grad_()
    x_eager = x.detach().clone().requires_grad_()
    torch.manual_seed(1)
    out = torch.compile(layer, fullgraph=True, dynamic=True, backend=record)(x)
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert {"convnn.select", "convnn.gather_aggregate.default", "convnn.padded_rows.default"} <= targets
    assert not any("topk" in target for target in targets), targets
    torch.manual_seed(1)
    torch.testing.assert_close(out, layer(x_eager), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_compiled_selection_honours_chunk_size(chunk_size, monkeypatch):
    """The compiled graph's selection op runs the query chunks eager runs (40 queries of 2 images:
    ``chunk_size`` 8, 5 chunks of both images; None: sized for the CPU, per image 32 queries and a
    tail of 8), with eager's result. The Python chunk loop is counted (the native kernel runs the same
    chunks, tests/test_native.py)."""
    torch._dynamo.reset()
    monkeypatch.setattr(knn.native, "available", lambda: False)
    calls = []
    chunk_fn = knn.selection._select_chunk
    monkeypatch.setattr(knn.selection, "_select_chunk", lambda *args: calls.append(1) or chunk_fn(*args))
    q = torch.randn(2, 40, 8, generator=torch.Generator().manual_seed(0))

    def select(q):
        return knn_select(q, q, 5, chunk_size=chunk_size)

    compiled = torch.compile(select, fullgraph=True, backend=lambda gm, _: gm.forward)(q)
    compiled_calls = len(calls)
    eager = select(q)
    assert compiled_calls == len(calls) - compiled_calls == (5 if chunk_size else 4)
    assert torch.equal(compiled[1], eager[1]) and torch.equal(compiled[0], eager[0])


def test_selection_stays_fp32_under_bf16_autocast():
    # many near-ties: in bf16 about a quarter of the rows would swap their 8th and 9th neighbour
    q = torch.randn(4, 300, 16, generator=torch.Generator().manual_seed(0))
    plain_values, plain_idx = knn_select(q, q, 9, kind="cosine")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values, idx = knn_select(q, q, 9, kind="cosine")
    assert torch.equal(idx, plain_idx)
    torch.testing.assert_close(values, plain_values)
    # bf16 rows (what projections give under autocast) are selected as their exact fp32 values
    q16 = q.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, idx16 = knn_select(q16, q16, 9, kind="dot")
    assert torch.equal(idx16, knn_select(q16.float(), q16.float(), 9, kind="dot")[1])


@pytest.mark.parametrize("case", ["convnn all", "convnn depthwise both"])
def test_layer_output_under_bf16_autocast_stays_near_fp32(case):
    # identity projections: the selection sees the fp32 input and picks the fp32 neighbours (in bf16
    # the output moved by 20-38 %); only the aggregation's bf16 rounding remains
    layer, example = make(case)
    layer.eval()
    x = example(4)
    with torch.no_grad():
        full = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = layer(x).float()
    assert ((half - full).norm() / full.norm()).item() < 0.02


@pytest.mark.parametrize("case", [*MAP_CASES, *TOKEN_CASES])
def test_training_fast_path_equals_the_conv1d_path(case):
    # with gradients on, the layers aggregate token-major (gather_aggregate, batched products); without
    # them they run the gather + Conv1d ops that FLOP counters see: same values in float64
    layer, example = make(case, torch.float64)
    layer.eval()
    x = example(3)
    reset_sampling(layer, 1)
    with torch.no_grad():
        plain = layer(x)
    reset_sampling(layer, 1)
    fast = layer(x.requires_grad_())
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-10)


GRAD_CASES = {
    "convnn": (("convnn", 3, 4), {}, (1, 3, 4, 4)),
    "convnn softmax": (("convnn", 2, 3), {"rho": "softmax", "projections": "linear"}, (1, 2, 3, 3)),
    "attention standard": (
        ("convnn_attention", 4, 4),
        {"k": 3, "heads": 2, "aggregation": "standard"},
        (1, 6, 4),
    ),
    "attention separable": (
        ("convnn_attention", 8, 8),
        {"k": 3, "heads": 2, "aggregation": "separable"},
        (1, 6, 8),
    ),
    "attention depthwise bias": (
        ("convnn_attention", 8, 8),
        {"k": 3, "bias": True, "unit_init": False},
        (1, 6, 8),
    ),
    "attention depthwise ones": (("convnn_attention", 8, 8), {"k": 3, "rho": "ones"}, (2, 6, 8)),
    "attention separable one head": (
        ("convnn_attention", 8, 8),
        {"k": 3, "aggregation": "separable"},
        (1, 6, 8),
    ),
    "kvt": (("kvt_attention", 8, 8), {"k": 3}, (1, 6, 8)),
}


@pytest.mark.parametrize("case", GRAD_CASES)
def test_training_fast_path_gradients(case):
    # gradcheck through the fast path, for the input and the aggregation's own parameters
    (name, c_in, c_out), options, shape = GRAD_CASES[case]
    torch.manual_seed(0)
    layer = build_layer(name, c_in, c_out, **options).double().eval()
    params = {n: p.detach().requires_grad_() for n, p in layer.named_parameters() if "aggregate" in n}
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    def run(x, *values):
        return torch.func.functional_call(layer, dict(zip(params, values, strict=True)), (x,))

    assert torch.autograd.gradcheck(run, (x, *params.values()))


def test_trainer_deterministic_flag_reaches_the_layers(tmp_path):
    # trainer.deterministic=true makes Lightning call torch.use_deterministic_algorithms(True) (a GPU
    # run's default is its warn mode); the layers' backward gathers add in sorted order on CUDA and
    # scatter_ writes distinct positions, so the flag is all a deterministic run needs
    overrides = ["trainer.deterministic=true", "model=vgg11", "model.width_mult=0.125", "layer=convnn"]
    overrides += ["model.hidden_features=16", "layer.sampling=random", "layer.num_candidates=16", "epochs=1"]
    composed = compose_train(*overrides)[0]
    cfg = validate_config(composed)
    model, image_size = train.build_model_or_fail(composed)
    seen = []
    for layer in model.modules():
        if type(layer).__name__ == "ConvNN":
            layer.register_forward_hook(lambda *_: seen.append(torch.are_deterministic_algorithms_enabled()))
    module = ImageClassifier(model, cfg.data.num_classes, 1, cfg.optim, cfg.scheduler)
    trainer = train._build_trainer(cfg, tmp_path, False, [], Start("train"))
    data = TensorDataset(torch.randn(4, 3, image_size, image_size), torch.arange(4))
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        trainer.fit(module, DataLoader(data, batch_size=4))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert seen and all(seen)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("case", [*MAP_CASES, *TOKEN_CASES])
def test_cuda_training_step_has_no_host_sync_and_is_deterministic(case, monkeypatch):
    # torch checks this for every cuBLAS call under deterministic algorithms (Lightning sets it in runs)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    layer, example = make(case)
    layer = layer.cuda().train()
    x = example(4).cuda().requires_grad_()
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            torch.manual_seed(0)
            x.grad = None
            torch.cuda.set_sync_debug_mode("error")
            out = layer(x)
            out.square().sum().backward()
            torch.cuda.set_sync_debug_mode("default")
            grads.append(x.grad.clone())
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.use_deterministic_algorithms(False)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("rho", ["ones", "softmax"])
@pytest.mark.parametrize("tokens", [7, 8])  # 2 x 7 x 8 = 112 rows: 16-row conv steps; 2 x 7 x 7: GEMM tail
def test_gather_aggregate_in_steps_equals_gather_then_conv(tokens, rho, monkeypatch):
    # gather_aggregate's 1x1-conv steps (oneDNN) and its GEMM fallback against autograd through
    # gather + modulate + Conv1d, in float64, values and all gradients (rho's values' too)
    monkeypatch.setattr(knn.ops, "STEP_ELEMENTS", 32 * 3 * 5)  # steps of 32 tokens
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(2, 5, 30, dtype=torch.float64, generator=gen, requires_grad=True)
    idx = torch.randint(0, 30, (2, 7 * tokens, 3), generator=gen)
    values = torch.randn(2, 7 * tokens, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    conv = torch.nn.Conv1d(5, 4, 3, stride=3).double()
    inputs = (v, conv.weight, conv.bias, values)
    out = knn.aggregate_neighbors(v, idx, values, rho, conv)
    grads = torch.autograd.grad(out.square().sum(), inputs, allow_unused=True)
    ref = conv(knn.modulate(knn.gather_neighbors(v, idx), values, rho))
    ref_grads = torch.autograd.grad(ref.square().sum(), inputs, allow_unused=True)
    assert (grads[-1] is None) == (ref_grads[-1] is None) == (rho == "ones")
    grads, ref_grads = grads[: 3 if rho == "ones" else 4], ref_grads[: 3 if rho == "ones" else 4]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
