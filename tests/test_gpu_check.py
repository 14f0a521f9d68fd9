"""``make gpu-check``: the plan without a GPU, the equality checks on stand-ins of the GPU
libraries (CPU), and the same checks on a real GPU (``gpu`` marker).

The equality checks compare each backend against the fp32 math kernel with Transformer Engine's
CP-test tolerances (bf16 2.5e-2, GQA 3.5e-2, fp16 5e-3); on the stand-ins, which compute in
float64 and round to the input dtype, they must pass too.
"""

from __future__ import annotations

import gpu_library_fakes
import pytest
import torch

from megatron_longvila.benchmarks import gpu_check

pytestmark = pytest.mark.usefixtures("one_thread")
EQUALITY = [c for c in gpu_check.CHECKS if c.equality]


def test_without_a_gpu_the_check_prints_its_plan_and_exits_0(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "no GPU" in printed
    for check in gpu_check.CHECKS:
        assert f"  {check.name} " in printed and check.what in printed
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("library", [("flash_attn", "2.8.3"), ("te_fused", "2.20.2")], ids=str)
def test_equality_checks_pass_on_library_stand_ins(monkeypatch, library):
    """The checks' own code (inputs, references, odd head dim, rectangles, simulated rings) on
    small shapes, with the stand-in library as the one GPU backend."""
    backend = gpu_library_fakes.install(monkeypatch, *library)
    monkeypatch.setattr(
        gpu_check,
        "DENSE_CASES",
        (("causal 4:2", True, 32, 32, 4, 2), ("sq≠sk", False, 8, 40, 4, 4)),
    )
    monkeypatch.setattr(gpu_check, "HEAD_DIMS", (16,))
    monkeypatch.setattr(gpu_check, "PACKED_SEGMENTS", [0] * 9 + [1] * 30 + [2] + [-1] * 8)
    monkeypatch.setattr(gpu_check, "RING_SHAPE", (64, 4, 2, 16))
    result = gpu_check.run_checks(torch.device("cpu"), EQUALITY)
    result["date"] = "test"
    assert not gpu_check.failures(result, EQUALITY), gpu_check.failures(result, EQUALITY)
    for check in EQUALITY:
        assert any(row.get("backend") == backend for row in result[check.name]), check.name
    refused = [r for r in result["backends"] if r["status"] == "refused"]
    assert len(refused) == len(gpu_check.DTYPES)  # the odd head dim, once per dtype
    assert "| rectangles | " + backend in gpu_check.markdown(result)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("check", EQUALITY, ids=lambda c: c.name)
def test_gpu_kernels_hold(check):
    rows = check.run(torch.device("cuda"))
    failed = [r for r in rows if r.get("status") in ("fail", "error")]
    assert not failed, failed


def _tiny_spec_step() -> dict:
    from megatron_longvila.benchmarks import spec_step
    from megatron_longvila.core.parallel_state import MMSPTopology, initialize_mmsp
    from megatron_longvila.core.sequence_parallel.attention import MMSPAttention
    from megatron_longvila.models.config import LLMConfig
    from megatron_longvila.models.llm import LanguageModel

    initialize_mmsp(MMSPTopology())
    cfg = LLMConfig.preset("tiny", qkv_bias=False)
    rows = spec_step.spec_step(torch.device("cpu"), cfg, seq=32, repeats=1)
    model = LanguageModel(cfg, core_attention=MMSPAttention)
    matrices = sum(
        p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embedding" not in n
    )
    return {"rows": rows, "matrices": matrices, "flops": spec_step.step_flops(cfg, 32), "cfg": cfg}


def test_spec_step_runs_the_local_spec_on_cpu(ranks2):
    """The model-step check's own code on a tiny LLM: one row per spec, TE absent on CPU; its
    FLOP count's matmul part is 6 × (the model's weight matrices) × tokens."""
    result = ranks2.run(_tiny_spec_step)[0]
    rows = {r["spec"]: r for r in result["rows"]}
    assert rows["te"]["status"] == "not installed"
    local = rows["local"]
    assert local["step_ms"] > 0 and local["mfu"] is None and local["seq"] == 32
    assert local["tokens_per_s"] == pytest.approx(32 / (local["step_ms"] / 1e3))
    cfg = result["cfg"]
    attention = 3.5 * cfg.num_layers * 2 * 32 * 32 * cfg.kv_channels * cfg.num_heads
    assert result["flops"] == 6 * result["matrices"] * 32 + attention
    md = gpu_check.markdown({"date": "test", "spec_step": result["rows"]})
    assert "| local | 2 | 32 | float32 |" in md
