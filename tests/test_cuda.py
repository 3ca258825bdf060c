"""The CUDA paths: the same optimizer on a GPU gives the CPU's numbers (fused kernels, fast DCT, SVD, remap,
8-bit and factored states, bf16 weights with stochastic rounding on a CUDA generator), layer-wise updates inside
backward, and the one trainer on CUDA with SIGTERM + resume. Skipped without CUDA (``-m gpu`` selects them)."""

from __future__ import annotations

import pytest
import torch

import gradlore
from gradlore.train.presets import resolve
from gradlore.train.rundir import read_losses
from gradlore.train.trainer import run

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _grads(shape, n, dtype):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        low = torch.randn(shape[0], 4, generator=gen, dtype=dtype) @ torch.randn(4, shape[1], generator=gen, dtype=dtype)
        out.append(low + 0.1 * torch.randn(*shape, generator=gen, dtype=dtype))
    return out


def _steps(device, method, dtype, steps=12, **keys):
    """Two weights (both orientations) and a bias, ``steps`` optimizer steps with fixed gradients."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(96, 64), (64, 96), (96,)]
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=dtype).to(device)) for s in shapes]
    group = gradlore.presets.PRESETS[method](rank=8, **keys) if method != "adamw" else {}
    opt = gradlore.LowRankAdamW([{"params": params[:2], **group}, {"params": params[2:]}], lr=1e-2, weight_decay=0.1)
    streams = [_grads(s if len(s) == 2 else (s[0], 1), steps, dtype) for s in shapes]
    for k in range(steps):
        for p, gs in zip(params, streams):
            p.grad = gs[k].reshape(p.shape).to(device)
        opt.step()
    return [p.detach().cpu() for p in params], opt


@pytest.mark.parametrize("method,keys", [
    ("adamw", {}),
    ("galore", {"update_proj_gap": 100}),  # one refresh: the update does not depend on SVD's column signs
    ("dct", {}),  # per-step selection, moments remapped with their columns
    ("dct", {"remap_bias": "global"}),
    ("dct-galore", {"update_proj_gap": 5}),
    ("fira", {"update_proj_gap": 100}),
    ("frugal", {"update_proj_gap": 100}),
])
def test_cuda_step_equals_cpu_step(method, keys):
    cpu, _ = _steps("cpu", method, torch.float64, **keys)
    gpu, opt = _steps(CUDA, method, torch.float64, **keys)
    for a, b in zip(cpu, gpu):
        if method == "frugal":  # sign descent on the residual: an entry near 0 may take the other sign
            assert float(((b - a).abs() > 1e-5).double().mean()) < 0.01
        elif method in ("galore", "fira"):  # the SVD runs in float32 (as galore-torch's): bases agree to ~1e-6
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)
    assert any(t.is_cuda for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("state", ["8bit", "factored"])
def test_cuda_compact_states_track_cpu(state):
    cpu, _ = _steps("cpu", "dct-galore", torch.float32, state=state)
    gpu, _ = _steps(CUDA, "dct-galore", torch.float32, state=state)
    fp32, _ = _steps("cpu", "dct-galore", torch.float32)
    for a, b, r in zip(cpu, gpu, fp32):
        assert (b - a).norm() <= 1e-4 * a.norm(), (state, float((b - a).norm()))
        assert (r - a).norm() <= 5e-2 * r.norm()  # compact moments stay near the float32 run


def test_cuda_bf16_weights_stochastic_rounding_is_unbiased_and_reproducible():
    w0 = torch.full((4096,), 4.0)
    updates = []
    for _ in range(2):
        w = torch.nn.Parameter(w0.to(CUDA, torch.bfloat16))
        opt = gradlore.LowRankAdamW([{"params": [w], "rounding": "stochastic"}], lr=1e-3)
        for _ in range(20):
            w.grad = torch.ones_like(w)
            opt.step()
        updates.append(w.detach().float().cpu())
    assert torch.equal(updates[0], updates[1])  # the rounding generator lives in the state: same draws
    # 20 Adam steps of 1e-3 each (bias-corrected direction 1): 4 - 0.02, each far below half a bf16 ulp at 4 (2^-6 below 4).
    assert float(updates[0].mean()) == pytest.approx(4.0 - 0.02, abs=2e-3)
    w = torch.nn.Parameter(w0.to(CUDA, torch.bfloat16))
    opt = gradlore.LowRankAdamW([{"params": [w], "rounding": "nearest"}], lr=1e-3)
    for _ in range(20):
        w.grad = torch.ones_like(w)
        opt.step()
    assert torch.all(w.detach() == 4.0)  # round-to-nearest loses every one of these updates


def test_cuda_layerwise_equals_ordinary():
    from transformers import LlamaConfig, LlamaForCausalLM

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (2, 12), generator=gen) for _ in range(4)]
    runs = []
    for layerwise in (False, True):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
        model = LlamaForCausalLM(cfg).double().to(CUDA)
        groups = gradlore.param_groups(model, method="dct", rank=4)
        opt = gradlore.layerwise(groups, lr=1e-2) if layerwise else gradlore.LowRankAdamW(groups, lr=1e-2)
        for ids in batches:
            ids = ids.to(CUDA)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        runs.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_cuda_training_run_resumes_after_sigterm(tmp_path, sigterm_at):
    from gradlore.data.corpora import resolve_corpus

    cfg = lambda: resolve("tiny", [f"data.path={resolve_corpus('tiny-shakespeare')}", "train.device=cuda"])  # noqa: E731
    straight = tmp_path / "straight"
    assert run(cfg(), straight)["status"] == "completed"
    disarm = sigterm_at(9)
    out = tmp_path / "stopped"
    assert run(cfg(), out)["status"] == "interrupted"
    disarm()
    assert run(cfg(), out, resume=True)["status"] == "completed"
    got, want = read_losses(out / "metrics.jsonl")[0], read_losses(straight / "metrics.jsonl")[0]
    assert [s for s, _ in got] == [s for s, _ in want]
    # Same kernels on one device; the embedding's backward may use atomics, so allow float32 noise.
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-4)
    assert want[-1][1] < want[0][1] - 0.5  # it learned
