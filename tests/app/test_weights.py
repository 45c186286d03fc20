"""Packed weight formats (app/weights.py): fp32 exact, bf16, int8 and int4 close to it."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from app.config import Settings
from app.memory_llama import ReadConfig, WindowCache, forward, head_logprobs, reference_logits
from app.model import LoadedModel, load_model, resolve_model_dir
from app.weights import INT4_MAX_ROWS, RESCORE_TOP, PackedLinear, RescoredHead, pack_weights

PROMPTS = [
    "Name three colours of the rainbow, please.",
    "My sister lives in Lisbon and works as a nurse.",
    "What is the capital of France?",
]


def _ids(lm: LoadedModel, text: str) -> torch.Tensor:
    msgs = [{"role": "user", "content": text}]
    out = lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    return torch.tensor(out["input_ids"])


@pytest.fixture(scope="module")
def stock() -> LlamaForCausalLM:
    """The model as transformers loads it: not packed, float32."""
    s = Settings()
    model = LlamaForCausalLM.from_pretrained(
        resolve_model_dir(s.model_path, s.cache_dir), local_files_only=True
    )
    return model.eval()


@pytest.fixture(scope="module")
def int8_lm() -> LoadedModel:
    s = Settings()
    return load_model(s.model_path, s.cache_dir, weights="int8")


@pytest.fixture(scope="module")
def int4_lm() -> LoadedModel:
    s = Settings()
    return load_model(s.model_path, s.cache_dir, weights="int4")


def _memchat_logprobs(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    window = WindowCache(model, len(ids) + 4)
    return forward(model, ids, window, None, ReadConfig(), logits_from=0).logits


def test_fp32_packed_forward_equals_stock_transformers(lm: LoadedModel, stock) -> None:
    assert getattr(lm.model, "memchat_weights", None) == "fp32"
    assert isinstance(lm.model.model.layers[0].self_attn.qkv_proj, PackedLinear)
    for text in PROMPTS:
        ids = _ids(lm, text)
        ref = reference_logits(stock, ids)
        # the fused matmuls change only the summation order
        assert (_memchat_logprobs(lm.model, ids) - ref).abs().max().item() < 2e-4
        # the packed model's own transformers forward still works (views of the fused weights)
        assert (reference_logits(lm.model, ids) - ref).abs().max().item() < 2e-4


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_packed_linear_close_to_float(fmt: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    x = torch.randn(5, 64)
    exact = x @ w.T
    got = PackedLinear(w, fmt)(x)  # type: ignore[arg-type]
    assert got.dtype == torch.float32 and got.shape == exact.shape
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel < (0.1 if fmt == "int4" else 0.02), rel  # 16 levels per group of 32: ~5%
    assert rel > 0  # actually quantized: not the float32 product


def test_int8_model_predicts_like_fp32(lm: LoadedModel, int8_lm: LoadedModel) -> None:
    lin = int8_lm.model.model.layers[3].mlp.gate_up_proj
    assert lin.weight.dtype == torch.int8
    assert int8_lm.model.lm_head.weight.dtype == torch.int8
    agree = total = 0
    for text in PROMPTS:
        ids = _ids(lm, text)
        a = _memchat_logprobs(lm.model, ids)
        b = _memchat_logprobs(int8_lm.model, ids)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(ids)
        # the probability mass the fp32 model puts on its top token moves little
        top = a.argmax(-1, keepdim=True)
        assert (a.gather(1, top).exp() - b.gather(1, top).exp()).abs().max().item() < 0.15
    assert agree / total >= 0.9, (agree, total)


def test_pack_weights_refuses_a_second_format(int8_lm: LoadedModel) -> None:
    assert pack_weights(int8_lm.model, "int8") is int8_lm.model  # same format: nothing to do
    with pytest.raises(ValueError, match="already packed as int8"):
        pack_weights(int8_lm.model, "fp32")
    with pytest.raises(ValueError, match="unknown weight format"):
        pack_weights(int8_lm.model, "int3")  # type: ignore[arg-type]


def test_int4_recovers_the_gguf_grid() -> None:
    """Weights already on a Q4_1 grid (a code 0..15 times a scale plus a minimum per group of 32
    inputs, as every decoder matrix of the bundled GGUF) come back on that grid, off only by the
    bf16 rounding of scale and zero point; the output rows of a fused matrix can be taken apart."""
    torch.manual_seed(1)
    codes = torch.randint(0, 16, (64, 96)).float()
    codes[:, ::32] = 0  # each group spans its whole range, as Q4_1's blocks do
    codes[:, 1::32] = 15
    scale = torch.rand(64, 3, 1) * 0.02 + 0.001
    low = -torch.rand(64, 3, 1) * 0.1
    w = (codes.view(64, 3, 32) * scale + low).view(64, 96)
    packed = PackedLinear(w, "int4")
    assert packed.weight.dtype == torch.uint8 and packed.weight.numel() == 64 * 96 // 2
    x = torch.randn(3, 96)
    got, exact = packed(x), x @ w.T
    assert ((got - exact).norm() / exact.norm()).item() < 0.01  # a 4-bit rounding would be ~5%
    part = PackedLinear.view_of(packed, 16, 40)
    torch.testing.assert_close(part(x), got[:, 16:40])
    # many rows go through the bf16 copy of the same weights: the same products up to rounding
    many = torch.randn(INT4_MAX_ROWS + 8, 96)
    many[:3] = x
    for mod in (packed, part):
        few, lots = mod(x), mod(many)[:3]
        assert ((lots - few).norm() / few.norm()).item() < 0.01
        assert not torch.equal(lots, few)  # the other path indeed
    with pytest.raises(ValueError, match="divisible by 32 and output sizes by 16"):
        PackedLinear(torch.randn(24, 96), "int4")


def test_int4_model_predicts_like_fp32(lm: LoadedModel, int4_lm: LoadedModel) -> None:
    """On the bundled model int4 is the GGUF's own precision: it agrees with fp32 on nearly every
    next token (measured: 132 of 133 positions; int8 126)."""
    assert int4_lm.model.model.layers[3].mlp.gate_up_proj.weight.dtype == torch.uint8
    assert int4_lm.model.lm_head.weight.dtype == torch.int8  # the head stays 8-bit
    agree = total = 0
    for text in PROMPTS:
        ids = _ids(lm, text)
        a = _memchat_logprobs(lm.model, ids)
        b = _memchat_logprobs(int4_lm.model, ids)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(ids)
        top = a.argmax(-1, keepdim=True)
        assert (a.gather(1, top).exp() - b.gather(1, top).exp()).abs().max().item() < 0.15
        # the packed model's own transformers forward (views of the fused weights) agrees too
        torch.testing.assert_close(reference_logits(int4_lm.model, ids), b, atol=2e-3, rtol=0)
    assert agree / total >= 0.95, (agree, total)


def test_int4_head_picks_exactly_what_the_int8_head_picks(int4_lm: LoadedModel) -> None:
    """`RescoredHead.pick_logits`: the int4 copy chooses the candidates, whose logits are then
    the exact (int8) head's; the argmax is the exact one at every position of real text, the
    other logits are only close. Plain calls (scoring) stay exact."""
    model = int4_lm.model
    head = model.lm_head
    assert isinstance(head, RescoredHead) and head.coarse.dtype == torch.uint8
    hidden = []
    for text in PROMPTS:
        ids = _ids(int4_lm, text)
        hidden.append(forward(model, ids, WindowCache(model, len(ids)), None, ReadConfig()).hidden)
    h = torch.cat(hidden)
    exact = head(h).float()
    torch.testing.assert_close(exact, head.exact(h).float(), rtol=0, atol=0)
    picked = torch.cat([head.pick_logits(h[i : i + 1]) for i in range(len(h))])
    assert torch.equal(picked.argmax(-1), exact.argmax(-1))
    top = exact.topk(8, dim=-1).indices  # the likely tokens are among the rescored candidates
    torch.testing.assert_close(picked.gather(1, top), exact.gather(1, top), rtol=0, atol=1e-4)
    assert RESCORE_TOP >= 8
    assert not torch.equal(picked, exact)  # the rest comes from the int4 copy
    # what forward hands the sampler: exact where it matters, approximate elsewhere
    lp_pick, lp_exact = head_logprobs(model, h, pick=True), head_logprobs(model, h, pick=False)
    torch.testing.assert_close(lp_exact, torch.log_softmax(exact, -1))
    best = lp_exact.argmax(-1, keepdim=True)
    assert (lp_pick.gather(1, best) - lp_exact.gather(1, best)).abs().max().item() < 0.05
    kl = (lp_exact.exp() * (lp_exact - lp_pick)).sum(-1).mean().item()
    assert kl < 0.02, kl  # measured 0.0066 on other text; the int4 head alone 0.044


@pytest.mark.parametrize("vocab", [1024, 1001])
def test_int4_head_needs_a_vocabulary_its_layout_holds(vocab: int) -> None:
    """The picking head is int4 only where the vocabulary is a multiple of 16 rows; otherwise the
    model still packs, with the plain int8 head (its layers are int4 either way)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = pack_weights(LlamaForCausalLM(cfg).eval(), "int4")
    head = model.lm_head
    assert isinstance(head, RescoredHead) == (vocab % 16 == 0)
    assert head.weight.dtype == torch.int8
    x = torch.randn(1, 64)
    exact = head(x)
    picked = head.pick_logits(x) if isinstance(head, RescoredHead) else exact
    assert picked.shape == exact.shape == (1, vocab)
    assert picked.argmax() == exact.argmax()
