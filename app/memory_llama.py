"""A Llama forward pass whose attention reads the session's memory in every layer.

This file is the one place where the memory is read:

* token level (inside attention): for each query token and KV-head group, the top-k memory keys by
  inner product of the RoPE-rotated query with the *un-rotated* memory key (memory keys carry no
  position: as if at position 0); their logits ``q.k / sqrt(d) + log(strength)`` join the local
  logits in one softmax, and the output mixes local and memory values;
* output level (kNN-LM): the final hidden state's nearest remembered hidden states vote for the
  token that followed them; ``p = lam * p_mem + (1 - lam) * p_lm``.

The window's keys are kept *before* RoPE (``WindowCache``) so that tokens leaving the window go to
memory exactly as the forward pass that first saw them computed them, and the window can be
re-positioned after a slide by rotating again instead of re-encoding.
Shapes leave out the batch dimension: one sequence at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


class MemoryReader(Protocol):
    """What the attention needs from a session memory (``memory_store.SessionMemory`` is one)."""

    def entry_count(self) -> int: ...
    def token_count(self) -> int: ...
    def search(self, layer: int, queries: np.ndarray, k: int) -> Any: ...
    def knn_search(self, hidden: np.ndarray, k: int) -> Any: ...


@dataclass(frozen=True)
class ReadConfig:
    """How the memory is read in one forward pass."""

    top_k: int = 16  # memory keys per query per KV head, in every layer
    knn_lambda: float = 0.25  # weight of the kNN-LM distribution; 0 turns the output read off
    knn_k: int = 16  # neighbours of the output-level read
    knn_temperature: float = 0.05  # p_mem = softmax(-relative distance / temperature)
    knn_gate: float = 0.35  # relative distance of the nearest neighbour where lam is halved
    knn_gate_width: float = 0.03  # how sharp that gate is
    collect_mass: bool = False  # return the attention mass each memory entry received


@dataclass
class LayerMass:
    """Attention mass the memory entries of one layer received, summed over the query heads of
    each group and over the query tokens: ``ids[h]`` and ``mass[h]`` per KV head ``h``."""

    ids: list[np.ndarray]
    mass: list[np.ndarray]


@dataclass
class ForwardOutput:
    """Everything one forward pass produced for its new tokens."""

    logits: torch.Tensor  # (T - logits_from, V) log-probabilities after the output-level read
    hidden: torch.Tensor  # (T, Dm) final hidden state (after the last norm)
    keys: torch.Tensor  # (L, H, T, D) keys before RoPE
    values: torch.Tensor  # (L, H, T, D)
    memory_mass: list[LayerMass] | None = None  # per layer, when ReadConfig.collect_mass
    read_seconds: float = 0.0  # time spent in memory search and gather


class WindowCache:
    """The working window's keys (before and after RoPE) and values, in preallocated buffers.

    Tokens sit at positions ``0 .. length-1``; ``append`` writes new tokens after them and
    ``drop_front`` removes the oldest tokens and re-rotates the rest to their new positions.
    """

    def __init__(self, model: LlamaForCausalLM, capacity: int, round_fp16: bool = False) -> None:
        cfg = model.config
        # Sessions keep window states in SQL as float16; rounding them on entry makes a reloaded
        # window identical to the live one.
        self.round_fp16 = round_fp16
        self.model = model
        self.n_layers = int(cfg.num_hidden_layers)
        self.n_kv = int(cfg.num_key_value_heads or cfg.num_attention_heads)
        self.head_dim = int(
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        )
        self.capacity = capacity
        self.length = 0
        shape = (self.n_layers, self.n_kv, capacity, self.head_dim)
        dtype = model.dtype
        self.keys = torch.zeros(shape, dtype=dtype)  # before RoPE
        self.keys_rot = torch.zeros(shape, dtype=dtype)  # at positions 0..length-1
        self.values = torch.zeros(shape, dtype=dtype)

    def rotate(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """RoPE-rotate ``keys`` (L, H, T, D) as if they sat at positions start..start+T-1."""
        cos, sin = rope_tables(self.model, start, keys.shape[2], keys.dtype)
        _, rotated = apply_rotary_pos_emb(keys, keys, cos, sin, unsqueeze_dim=0)
        return rotated

    def append(
        self, keys: torch.Tensor, values: torch.Tensor, keys_rot: torch.Tensor | None = None
    ) -> None:
        """Add tokens (L, H, T, D) after the current ones; ``keys_rot`` if already rotated."""
        t = keys.shape[2]
        if self.round_fp16:
            keys, values, keys_rot = (
                keys.half().to(keys.dtype),
                values.half().to(values.dtype),
                None,
            )
        if self.length + t > self.capacity:
            raise ValueError(f"window cache full: {self.length} + {t} > {self.capacity}")
        end = self.length + t
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.keys_rot[:, :, self.length : end] = (
            keys_rot if keys_rot is not None else self.rotate(keys, self.length)
        )
        self.length = end

    def drop_range(self, start: int, end: int) -> None:
        """Remove tokens ``start..end-1`` and re-position the tokens after them."""
        n = end - start
        if n <= 0:
            return
        rest = self.length - end
        self.keys[:, :, start : start + rest] = self.keys[:, :, end : self.length].clone()
        self.values[:, :, start : start + rest] = self.values[:, :, end : self.length].clone()
        self.length -= n
        if rest:
            self.keys_rot[:, :, start : self.length] = self.rotate(
                self.keys[:, :, start : self.length], start
            )

    def clear(self) -> None:
        """Forget every token (buffers are kept)."""
        self.length = 0


def rope_tables(
    model: LlamaForCausalLM, start: int, length: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, D) for positions start..start+length-1, from the model's own rotary module
    (so RoPE scaling variants of Llama-family models are honoured)."""
    positions = torch.arange(start, start + length).unsqueeze(0)  # (1, T)
    probe = torch.zeros(1, dtype=dtype)
    cos, sin = model.model.rotary_emb(probe, positions)
    return cos[0], sin[0]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    past: int,
    memory: MemoryReader | None,
    layer: int,
    top_k: int,
) -> tuple[torch.Tensor, np.ndarray | None, np.ndarray | None, float]:
    """Attention of the new tokens over the window (causal) and, if given, the memory.

    q: (Hq, T, D) rotated queries at positions past..past+T-1; k, v: (H, S, D) rotated window keys
    and values, S = past + T. Returns the output (T, Hq * D), the memory ids (H, g*T, k) and the
    memory weights (H, g*T, k) they received (None without memory), and seconds spent searching.
    """
    hq, t, d = q.shape
    h, s, _ = k.shape
    g = hq // h  # query heads per KV head
    qg = q.view(h, g, t, d)  # (H, g, T, D)
    local = torch.einsum("hgtd,hsd->hgts", qg, k) * scaling  # (H, g, T, S)
    causal = torch.ones(t, s, dtype=torch.bool).triu(past + 1)  # key after query: masked
    local = local.masked_fill(causal, float("-inf"))

    if memory is None or memory.entry_count() == 0:
        weights = torch.softmax(local, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.einsum("hgts,hsd->hgtd", weights, v)
        return out.reshape(hq, t, d).transpose(0, 1).reshape(t, hq * d), None, None, 0.0

    t0 = time.perf_counter()
    queries = qg.reshape(h, g * t, d).float().numpy()  # (H, g*T, D)
    found = memory.search(layer, queries, top_k)
    kk = found.ids.shape[-1]
    mem_scores = torch.from_numpy(found.scores).view(h, g, t, kk)  # (H, g, T, k) raw q.key
    log_s = torch.from_numpy(found.log_strength).view(h, g, t, kk)  # -inf where no entry
    mem_values = torch.from_numpy(found.values).view(h, g, t, kk, d).to(q.dtype)
    read_s = time.perf_counter() - t0

    mem_logits = (mem_scores * scaling + log_s).to(local.dtype)
    weights = torch.softmax(torch.cat([local, mem_logits], dim=-1), dim=-1, dtype=torch.float32)
    w_local, w_mem = weights[..., :s].to(q.dtype), weights[..., s:].to(q.dtype)
    out = torch.einsum("hgts,hsd->hgtd", w_local, v) + torch.einsum(
        "hgtk,hgtkd->hgtd", w_mem, mem_values
    )
    out = out.reshape(hq, t, d).transpose(0, 1).reshape(t, hq * d)
    return out, found.ids, w_mem.reshape(h, g * t, kk).float().numpy(), read_s


def knn_mix(
    logprobs: torch.Tensor, hidden: torch.Tensor, memory: MemoryReader | None, cfg: ReadConfig
) -> torch.Tensor:
    """Output-level read: mix the kNN-LM distribution of the remembered tokens into ``logprobs``
    (T, V). Neighbours vote for the token that followed them with
    ``softmax(-d / temperature + log strength)``, ``d`` the squared distance relative to the
    query's squared norm (so one temperature fits any model width). The mixing weight is ``lam``
    gated by how close the nearest neighbour is: far neighbours (``d`` above ``knn_gate``) leave
    the LM alone, which keeps the memory from pulling unrelated remembered tokens into a reply."""
    if memory is None or cfg.knn_lambda <= 0 or memory.token_count() == 0:
        return logprobs
    query = np.ascontiguousarray(hidden.float().numpy())
    found = memory.knn_search(query, cfg.knn_k)
    ids = torch.from_numpy(found.next_token_ids)  # (T, k), -1 missing
    norm2 = hidden.float().pow(2).sum(-1, keepdim=True).clamp_min(1e-6)  # (T, 1)
    dist = torch.from_numpy(found.distances).float() / norm2  # relative squared distance
    dist = dist.masked_fill(ids < 0, float("inf"))
    log_s = torch.from_numpy(found.log_strength).float()
    vote = (-dist / cfg.knn_temperature + log_s).masked_fill(ids < 0, float("-inf"))
    p_vote = torch.softmax(vote, dim=-1).nan_to_num(0.0)  # (T, k)
    p_mem = torch.zeros_like(logprobs, dtype=torch.float32)
    p_mem.scatter_add_(1, ids.clamp(min=0), p_vote)
    nearest = dist.min(dim=-1, keepdim=True).values  # (T, 1)
    lam = cfg.knn_lambda * torch.sigmoid((cfg.knn_gate - nearest) / cfg.knn_gate_width)
    mixed = (1 - lam) * logprobs.float().exp() + lam * p_mem
    return mixed.clamp_min(1e-30).log().to(logprobs.dtype)


@torch.inference_mode()
def forward(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,
    window: WindowCache,
    memory: MemoryReader | None,
    cfg: ReadConfig,
    commit: bool = True,
    logits_from: int | None = 0,
) -> ForwardOutput:
    """Run ``input_ids`` (T,) after the window's tokens, reading ``memory`` in every layer.

    With ``commit`` the new tokens' keys and values are appended to the window; without it the
    window is left as it was (used to score candidate replies). Log-probabilities are computed
    for the new tokens from index ``logits_from`` on (None: none, as when importing history; the
    LM head is a fifth of this model's compute).
    """
    cfg_m = model.config
    inner = model.model
    t = input_ids.shape[0]
    past = window.length
    hq = cfg_m.num_attention_heads
    d = window.head_dim
    scaling = d**-0.5
    cos, sin = rope_tables(model, past, t, model.dtype)

    h = inner.embed_tokens(input_ids)  # (T, Dm)
    keys, values, masses = [], [], []
    read_s = 0.0
    for layer_idx, layer in enumerate(inner.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(t, hq, d).transpose(0, 1)  # (Hq, T, D)
        k = attn.k_proj(x).view(t, window.n_kv, d).transpose(0, 1)  # (H, T, D) before RoPE
        v = attn.v_proj(x).view(t, window.n_kv, d).transpose(0, 1)  # (H, T, D)
        keys.append(k)
        values.append(v)
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=0)
        k_all = torch.cat([window.keys_rot[layer_idx, :, :past], k_rot], dim=1)  # (H, S, D)
        v_all = torch.cat([window.values[layer_idx, :, :past], v], dim=1)
        attn_out, ids, w_mem, secs = attend(
            q_rot, k_all, v_all, scaling, past, memory, layer_idx, cfg.top_k
        )
        read_s += secs
        if cfg.collect_mass and ids is not None and w_mem is not None:
            masses.append((ids, w_mem))
        h = h + attn.o_proj(attn_out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))

    hidden = inner.norm(h)  # (T, Dm)
    logprobs = torch.empty(0, cfg_m.vocab_size)
    if logits_from is not None:
        tail = hidden[logits_from:]
        logprobs = torch.log_softmax(model.lm_head(tail).float(), dim=-1)
        t0 = time.perf_counter()
        logprobs = knn_mix(logprobs, tail, memory, cfg)
        read_s += time.perf_counter() - t0

    keys_t = torch.stack(keys)  # (L, H, T, D)
    values_t = torch.stack(values)
    if commit:
        window.append(keys_t, values_t)
    out = ForwardOutput(
        logits=logprobs, hidden=hidden, keys=keys_t, values=values_t, read_seconds=read_s
    )
    if cfg.collect_mass:
        out.memory_mass = [_sum_mass(ids, w) for ids, w in masses]
    return out


def _sum_mass(ids: np.ndarray, weights: np.ndarray) -> LayerMass:
    """Sum the weights (H, Q, k) each distinct memory id received, per KV head."""
    out_ids, out_mass = [], []
    for head in range(ids.shape[0]):
        flat_ids = ids[head].ravel()
        keep = flat_ids >= 0
        uniq, inverse = np.unique(flat_ids[keep], return_inverse=True)
        out_ids.append(uniq.astype(np.int64))
        out_mass.append(
            np.bincount(inverse, weights=weights[head].ravel()[keep], minlength=len(uniq)).astype(
                np.float32
            )
        )
    return LayerMass(ids=out_ids, mass=out_mass)


def reference_logits(model: LlamaForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (T, V) of the unpatched transformers model (the oracle in tests)."""
    with torch.inference_mode():
        logits = model(input_ids.unsqueeze(0)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)
