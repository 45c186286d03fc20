"""The memory-reading forward pass against the stock transformers model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.memory_llama import (
    ReadConfig,
    WindowCache,
    attend,
    forward,
    reference_logits,
    rope_into,
    rope_tables,
)
from app.model import LoadedModel

# fp32 on CPU: the hand-written forward differs from transformers' only by summation order
TOL = 2e-4


def _ids(lm: LoadedModel) -> torch.Tensor:
    msgs = [{"role": "user", "content": "Name three colours of the rainbow, please."}]
    out = lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    return torch.tensor(out["input_ids"])


def test_empty_memory_equals_stock_model(lm: LoadedModel) -> None:
    from memory_store import MemoryParams, SessionMemory

    cfg = lm.model.config
    ids = _ids(lm)
    ref = reference_logits(lm.model, ids)
    empty = SessionMemory(
        cfg.num_hidden_layers, cfg.num_key_value_heads, 64, cfg.hidden_size, MemoryParams()
    )
    for memory in (None, empty):
        window = WindowCache(lm.model, 256)
        out = forward(lm.model, ids, window, memory, ReadConfig())
        assert (out.logits - ref).abs().max().item() < TOL
    # incremental: the window cache (keys kept before RoPE, rotated on append) gives the same
    window = WindowCache(lm.model, 256)
    first = forward(lm.model, ids[:7], window, None, ReadConfig())
    rest = forward(lm.model, ids[7:], window, None, ReadConfig())
    assert (torch.cat([first.logits, rest.logits]) - ref).abs().max().item() < TOL


def test_repositioned_window_equals_reencoding(lm: LoadedModel) -> None:
    """Dropping the front of the window and rotating the rest anew equals encoding the rest from
    position 0: attention depends on relative positions only (layer 0 keys are context-free)."""
    ids = _ids(lm)
    window = WindowCache(lm.model, 256)
    forward(lm.model, ids, window, None, ReadConfig())
    window.drop_range(0, 5)
    fresh = WindowCache(lm.model, 256)
    fresh.append(
        window.keys[:, :, : window.length].clone(), window.values[:, :, : window.length].clone()
    )
    assert torch.allclose(
        window.keys_rot[:, :, : window.length], fresh.keys_rot[:, :, : fresh.length]
    )


@pytest.mark.parametrize("fp16", [False, True], ids=["float32-window", "float16-window"])
def test_dropping_a_middle_range_moves_and_rerotates_exactly(lm: LoadedModel, fp16: bool) -> None:
    """The compiled slide (`fused.slide_window`) gives the bits of moving the later tokens by
    torch and rotating them anew with the model's RoPE (in float32, from the float16 keys of a
    float16 window); rows before the range are untouched."""
    ids = _ids(lm)
    window = WindowCache(lm.model, 256, fp16=fp16)
    forward(lm.model, ids, window, None, ReadConfig())
    n = window.length
    keys, values, rot = (b[:, :, :n].clone() for b in (window.keys, window.values, window.keys_rot))
    window.drop_range(3, 8)
    assert window.length == n - 5
    want_keys = torch.cat([keys[:, :, :3], keys[:, :, 8:]], dim=2)
    want_values = torch.cat([values[:, :, :3], values[:, :, 8:]], dim=2)
    cos, sin = rope_tables(lm.model, 3, n - 8, torch.float32)
    moved = torch.empty(keys[:, :, 8:].shape)
    rope_into(moved, want_keys[:, :, 3:].float(), cos, sin)
    want_rot = torch.cat([rot[:, :, :3], moved], dim=2)
    assert window.keys.dtype == (torch.float16 if fp16 else torch.float32)
    assert torch.equal(window.keys[:, :, : n - 5], want_keys)
    assert torch.equal(window.values[:, :, : n - 5], want_values)
    assert torch.equal(window.keys_rot[:, :, : n - 5], want_rot)


class _OneEntryMemory:
    """A memory of one key/value per KV head, to check the joint softmax by hand."""

    def __init__(self, key: np.ndarray, value: np.ndarray, strength: float) -> None:
        self.key, self.value, self.strength = key, value, strength

    def entry_count(self) -> int:
        return 1

    def token_count(self) -> int:
        return 0

    def search(self, layer: int, queries: np.ndarray, k: int, with_keys: bool = True):  # noqa: ANN201
        from types import SimpleNamespace

        h, q, d = queries.shape
        scores = np.einsum("hqd,hd->hq", queries, self.key)[..., None]  # (H, Q, 1)
        return SimpleNamespace(
            ids=np.zeros((h, q, 1), dtype=np.int64),
            scores=scores.astype(np.float32),
            log_strength=np.full((h, q, 1), np.log(self.strength), dtype=np.float32),
            values=np.broadcast_to(self.value[:, None, None, :], (h, q, 1, d)).astype(np.float32),
        )


def test_memory_logit_joins_one_softmax() -> None:
    torch.manual_seed(0)
    hq, h, t, d = 4, 2, 3, 8
    q, k, v = torch.randn(hq, t, d), torch.randn(h, t, d), torch.randn(h, t, d)
    key, value = np.random.randn(h, d).astype(np.float32), np.random.randn(h, d).astype(np.float32)
    mem = _OneEntryMemory(key, value, strength=0.5)
    out, ids, w_mem, _ = attend(q, k, v, d**-0.5, 0, mem, 0, 1)
    # oracle: append the memory key as an extra, always-visible key with logit + log(strength)
    expected = []
    for head in range(hq):
        kv = head // (hq // h)
        logits = q[head] @ k[kv].T * d**-0.5
        logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        extra = (q[head] @ torch.from_numpy(key[kv])) * d**-0.5 + np.log(0.5)
        w = torch.softmax(torch.cat([logits, extra[:, None]], dim=1), dim=1)
        expected.append(w[:, :t] @ v[kv] + w[:, t:] * torch.from_numpy(value[kv]))
    expected_t = torch.stack(expected).transpose(0, 1).reshape(t, hq * d)
    assert torch.allclose(out, expected_t, atol=1e-5)
    assert ids is not None and w_mem is not None and (w_mem > 0).all() and (w_mem < 1).all()


class _KnnMemory:
    """A memory whose kNN read returns fixed neighbours."""

    def __init__(self, ids: np.ndarray, dist: np.ndarray, log_s: np.ndarray) -> None:
        self.ids, self.dist, self.log_s = ids, dist, log_s

    def token_count(self) -> int:
        return 1

    def knn_search(self, hidden: np.ndarray, k: int):  # noqa: ANN201
        from types import SimpleNamespace

        return SimpleNamespace(
            next_token_ids=self.ids, distances=self.dist, log_strength=self.log_s
        )


def _knn_mix_dense(logprobs, hidden, found: _KnnMemory, cfg) -> torch.Tensor:  # noqa: ANN001
    """The kNN-LM mixture over the whole vocabulary, as first written (the oracle)."""
    ids = torch.from_numpy(found.ids)
    norm2 = hidden.float().pow(2).sum(-1, keepdim=True).clamp_min(1e-6)
    dist = torch.from_numpy(found.dist).float() / norm2
    dist = dist.masked_fill(ids < 0, float("inf"))
    log_s = torch.from_numpy(found.log_s).float()
    vote = (-dist / cfg.knn_temperature + log_s).masked_fill(ids < 0, float("-inf"))
    p_vote = torch.softmax(vote, dim=-1).nan_to_num(0.0)
    p_mem = torch.zeros_like(logprobs, dtype=torch.float32)
    p_mem.scatter_add_(1, ids.clamp(min=0), p_vote)
    nearest = dist.min(dim=-1, keepdim=True).values
    lam = cfg.knn_lambda * torch.sigmoid((cfg.knn_gate - nearest) / cfg.knn_gate_width)
    lam = lam + cfg.knn_copy_lambda * torch.sigmoid(
        (cfg.knn_copy_gate - nearest) / cfg.knn_copy_width
    )
    lam = lam.clamp(max=0.97)
    mixed = (1 - lam) * logprobs.float().exp() + lam * p_mem
    return mixed.clamp_min(1e-30).log()


def test_knn_mix_equals_the_dense_mixture() -> None:
    from app.memory_llama import knn_mix

    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    t, v, k, dm = 5, 300, 6, 16
    logprobs = torch.log_softmax(torch.randn(t, v) * 12, dim=-1)  # some below log(1e-30)
    assert (logprobs < -69.1).any()
    hidden = torch.randn(t, dm)
    ids = rng.integers(0, 8, (t, k))  # repeated tokens among the neighbours
    ids[1, 3:] = -1  # missing neighbours (at the end, as the store pads)
    ids[2, :] = -1  # none at all
    ids[3, :] = [0, 0, 5, 5, 0, 7]
    norm2 = hidden.pow(2).sum(-1, keepdim=True).numpy()
    rel = np.sort(rng.uniform(0.2, 0.5, (t, k)), axis=1)
    rel[4] += 1.0  # far: the gate closes
    rel[0] -= 0.19  # nearly the same state: copying
    dist = (rel * norm2).astype(np.float32)
    dist[ids < 0] = np.inf
    log_s = np.where(ids < 0, -np.inf, rng.uniform(-1, 0, (t, k))).astype(np.float32)
    mem = _KnnMemory(ids, dist, log_s)
    configs = (
        ReadConfig(),
        ReadConfig(knn_lambda=0.9, knn_temperature=0.2),
        ReadConfig(knn_copy_lambda=0.7),
    )
    for cfg in configs:
        got = knn_mix(logprobs, hidden, mem, cfg)
        want = _knn_mix_dense(logprobs, hidden, mem, cfg)
        assert got.dtype == logprobs.dtype and got.shape == logprobs.shape
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert knn_mix(logprobs, hidden, mem, ReadConfig(knn_lambda=0.0)) is logprobs


def test_a_near_identical_neighbour_outvotes_a_confident_lm() -> None:
    """Copying: the LM is sure of token 1, the one neighbour (nearly the same state) says 2."""
    from app.memory_llama import knn_mix

    logprobs = torch.log(torch.tensor([[0.01, 0.95, 0.04]]))
    hidden = torch.ones(1, 4)  # |h|^2 = 4
    near = _KnnMemory(np.array([[2]]), np.array([[0.02 * 4]], np.float32), np.zeros((1, 1)))
    far = _KnnMemory(np.array([[2]]), np.array([[0.3 * 4]], np.float32), np.zeros((1, 1)))
    copy = ReadConfig(knn_copy_lambda=0.7)
    assert int(knn_mix(logprobs, hidden, near, copy).argmax()) == 2
    assert int(knn_mix(logprobs, hidden, far, copy).argmax()) == 1
    assert int(knn_mix(logprobs, hidden, near, ReadConfig()).argmax()) == 1  # off by default


def test_keys_written_in_place_equal_the_concatenating_path(lm: LoadedModel) -> None:
    ids = _ids(lm)
    n = len(ids)
    roomy = WindowCache(lm.model, n + 8)  # new tokens are written into its buffers
    tight = WindowCache(lm.model, n - 3)  # full after the prefix: new tokens are concatenated
    for w in (roomy, tight):
        forward(lm.model, ids[:-3], w, None, ReadConfig(), logits_from=None)
    a = forward(lm.model, ids[-3:], roomy, None, ReadConfig(), commit=False, logits_from=0)
    b = forward(lm.model, ids[-3:], tight, None, ReadConfig(), commit=False, logits_from=0)
    assert roomy.length == tight.length == n - 3  # commit=False leaves the windows as they were
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.keys, b.keys, atol=1e-6, rtol=0)
    c = forward(lm.model, ids[-3:], roomy, None, ReadConfig(), commit=True, logits_from=0)
    assert roomy.length == n
    torch.testing.assert_close(c.logits, a.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(roomy.keys[:, :, n - 3 : n], c.keys, atol=1e-6, rtol=0)


def test_uncommitted_forward_leaves_no_scratch_behind(lm: LoadedModel) -> None:
    ids = _ids(lm)
    w = WindowCache(lm.model, len(ids) + 8)
    forward(lm.model, ids[:-3], w, None, ReadConfig(), logits_from=None)
    forward(lm.model, ids[-3:], w, None, ReadConfig(), commit=False, logits_from=0)
    for buf in (w.keys, w.values, w.keys_rot):
        assert not buf[:, :, w.length :].any()


def test_rope_into_equals_transformers_rotation_bit_for_bit() -> None:
    """The window re-rotates keys with `rope_into`; the forward rotates new keys with transformers'
    apply_rotary_pos_emb: both must give the same bits, or a re-positioned window would drift."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from app.memory_llama import rope_into

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 50, 64, generator=g)
    cos, sin = torch.randn(50, 64, generator=g), torch.randn(50, 64, generator=g)
    _, want = apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=0)
    out = torch.full_like(x, float("nan"))
    rope_into(out, x, cos, sin)
    assert torch.equal(out, want)


def test_cached_rope_tables_equal_the_rotary_module_bit_for_bit(lm: LoadedModel) -> None:
    """`rope_tables` answers from one table per model (a decoding step asks for one row per
    layer call): each row must be what the model's rotary module gives for that position alone,
    also past the first table's end (it grows)."""
    from app.memory_llama import rope_tables

    model = lm.model
    rotary = model.model.rotary_emb
    for start, length in ((0, 1), (37, 1), (1000, 30), (1023, 2), (5000, 1), (70, 300)):
        cos, sin = rope_tables(model, start, length, torch.float32)
        want_cos, want_sin = rotary(torch.zeros(1), torch.arange(start, start + length)[None])
        assert torch.equal(cos, want_cos[0]) and torch.equal(sin, want_sin[0]), (start, length)
    assert model.memchat_rope[0].shape[0] >= 5001


@pytest.mark.parametrize("fp16", [False, True], ids=["float32-window", "float16-window"])
def test_a_batched_step_equals_one_step_per_sequence(lm: LoadedModel, fp16: bool) -> None:
    """`forward_batch`: three sequences of different lengths, one reading a memory, one an empty
    memory, one none, stepped together equal each stepped alone (logits, hidden states, window
    keys), and every window gains its token."""
    from app.memory_llama import forward_batch
    from memory_store import MemoryParams, SessionMemory

    cfg = lm.model.config
    h, dm = cfg.num_key_value_heads, cfg.hidden_size
    texts = ["My cat is called Pumpkin and she sleeps all day.", "Hi!", "What is a haiku, then?"]
    remembered = torch.tensor(lm.tokenizer.encode("The capital of Peru is Lima, said Ana."))
    scratch = WindowCache(lm.model, 64)
    seen = forward(lm.model, remembered, scratch, None, ReadConfig(knn_lambda=0.0))
    memory = SessionMemory(cfg.num_hidden_layers, h, 64, dm, MemoryParams())
    t = len(remembered)
    ids = remembered.numpy().astype(np.int64)
    memory.write(
        scratch.keys[:, :, :t].float().numpy(),
        scratch.values[:, :, :t].float().numpy(),
        ids,
        np.zeros(t, np.int64),
        np.arange(t),
    )
    memory.write_knn(
        seen.hidden.float().numpy(), np.append(ids[1:], 2), ids, np.zeros(t, np.int64), np.arange(t)
    )
    empty = SessionMemory(cfg.num_hidden_layers, h, 64, dm, MemoryParams())
    memories = [memory, empty, None]
    cfgs = [ReadConfig(collect_mass=True), ReadConfig(), ReadConfig(top_k=4)]
    alone, together, last = [], [], []
    for text in texts:
        prompt = torch.tensor(lm.tokenizer.encode(text))
        for group in (alone, together):
            w = WindowCache(lm.model, 64, fp16=fp16)
            out = forward(lm.model, prompt, w, None, ReadConfig())
            group.append(w)
        last.append(int(out.logits[-1].argmax()))
    singles = [
        forward(lm.model, torch.tensor([tok]), w, m, c)
        for tok, w, m, c in zip(last, alone, memories, cfgs, strict=True)
    ]
    batched = forward_batch(lm.model, last, together, memories, cfgs)
    # float16: the step's own value is read as kept, and the batched matmul's rounding of it may
    # land one float16 step apart (measured: logits 2e-4 apart)
    tol = 5e-4 if fp16 else 1e-4
    for a, b, wa, wb in zip(singles, batched, alone, together, strict=True):
        assert wa.length == wb.length
        torch.testing.assert_close(b.logits, a.logits, atol=tol, rtol=0)
        torch.testing.assert_close(b.hidden, a.hidden, atol=tol, rtol=1e-4)
        # the tokens before the step are untouched; the step's keys differ by the matmuls'
        # rounding, in a float16 window by float16 steps (measured: 1-4% of 5760, with the
        # matmuls' blocking)
        n = wa.length - 1
        assert torch.equal(wb.keys[:, :, :n], wa.keys[:, :, :n])
        diff = (wb.keys[:, :, n] - wa.keys[:, :, n]).float().abs()
        if fp16:
            rel = diff.norm() / wa.keys[:, :, n].float().norm()
            assert diff.max().item() <= 4e-3 and rel.item() < 1e-3
        else:
            assert diff.max().item() <= 1e-4
    assert (
        batched[0].memory_mass is not None and len(batched[0].memory_mass) == cfg.num_hidden_layers
    )
    assert batched[1].memory_mass is None and batched[0].read_seconds > 0


class _FixedHits:
    """A memory returning the same random hits (one a miss) for every query."""

    def __init__(self, h: int, g: int, k: int, d: int) -> None:
        rng = np.random.default_rng(3)
        self.ids = rng.integers(0, 100, (h, g, k))
        self.scores = (3 * rng.standard_normal((h, g, k))).astype(np.float32)
        self.log_strength = np.log(rng.uniform(0.05, 1, (h, g, k))).astype(np.float32)
        self.values = rng.standard_normal((h, g, k, d)).astype(np.float32)
        self.ids[:, :, -1], self.scores[:, :, -1] = -1, 0.0  # no entry: logit -inf, no weight
        self.log_strength[:, :, -1], self.values[:, :, -1] = -np.inf, 0.0

    def entry_count(self) -> int:
        return 1

    def token_count(self) -> int:
        return 0

    def search(self, layer: int, queries: np.ndarray, k: int, with_keys: bool = True):  # noqa: ANN201
        from types import SimpleNamespace

        return SimpleNamespace(
            ids=self.ids, scores=self.scores, log_strength=self.log_strength, values=self.values
        )


@pytest.mark.parametrize("fp16", [False, True], ids=["float32-window", "float16-window"])
@pytest.mark.parametrize("hq,h", [(9, 3), (8, 2)], ids=["3-per-group", "4-per-group"])
def test_decoding_step_kernel_equals_the_general_path(hq: int, h: int, fp16: bool) -> None:
    """One new token in float32 takes the compiled path (`decode_attention`, over the window's
    whole buffers, values float32 or float16; groups of 3 query heads have a loop of their
    own); the general torch path (taken for a view of the window) gives the same output and
    memory weights."""
    torch.manual_seed(1)
    d, capacity, past = 64, 300, 211
    q = torch.randn(hq, 1, d)
    dtype = torch.float16 if fp16 else torch.float32
    keys, values = torch.randn(h, capacity, d), torch.randn(h, capacity, d).to(dtype)
    keys[:, past + 1 :] = 1e4  # past the window: must not be read
    for memory in (None, _FixedHits(h, hq // h, 5, d)):
        fast, ids, w_fast, _ = attend(q, keys, values, d**-0.5, past, memory, 0, 5)
        view_k, view_v = keys[:, : past + 1], values[:, : past + 1]
        assert not view_k.is_contiguous()
        slow, ids_slow, w_slow, _ = attend(q, view_k, view_v, d**-0.5, past, memory, 0, 5)
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
        if memory is None:
            assert ids is None and w_fast is None
            continue
        assert ids is not None and w_fast is not None and w_slow is not None
        np.testing.assert_array_equal(ids, ids_slow)
        np.testing.assert_allclose(w_fast, w_slow, atol=1e-6)
        assert (w_fast[:, :, -1] == 0).all() and (w_fast[:, :, :-1] > 0).all()
