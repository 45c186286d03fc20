"""Weight formats of the decoder's linear layers, and the fused projections the decoding step uses.

Decoding one token is a matrix-vector product per linear layer, so its cost is the bytes of the
weights read, plus a fixed cost per call. `pack_weights` therefore

* fuses the projections that share an input: q/k/v into one ``qkv`` matrix and gate/up into one
  ``gate_up`` matrix per layer (four matmuls per layer instead of seven), keeping the original
  modules as views of the fused storage so the model's own (transformers) forward still works;
* stores the weights in the chosen format:

  - ``fp32``: as loaded (exact: the reference);
  - ``bf16``: bfloat16 weights, activations cast to bf16 for the product (half the bytes);
  - ``int8``: weight-only int8, symmetric per output channel (scale = max |w| / 127), computed by
    torch's ``_weight_int8pack_mm`` kernel with bf16 activations (a quarter of the bytes);
  - ``int4``: weight-only 4-bit, asymmetric per group of 32 inputs (bf16 scale and zero point),
    computed by torch's ``_weight_int4pack_mm_for_cpu`` with bf16 activations (an eighth of the
    bytes). The bundled GGUF stores every decoder matrix as Q4_1, which is this very layout (4-bit
    codes, a scale and a minimum per 32 inputs): its weights come back on the same grid but for
    the bf16 rounding of scale and zero point. Inputs of more than `INT4_MAX_ROWS` rows
    (prefills) use a bf16 copy of those weights instead: that kernel's time grows with the rows.

Norms, embeddings, RoPE, attention and the window/memory tensors stay float32 in every format.
The LM head (tied to the embedding in SmolLM2) gets its own packed copy in ``bf16``/``int8``, and
in ``int8`` under ``int4`` (the GGUF's embedding is Q8_0: 4 bits would lose precision it has),
with an int4 copy that only picks the candidates of a next-token choice (`RescoredHead`); the
embedding lookup keeps the float32 table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from transformers import LlamaForCausalLM

WeightFormat = Literal["fp32", "bf16", "int8", "int4"]
WEIGHT_FORMATS: tuple[WeightFormat, ...] = ("fp32", "bf16", "int8", "int4")
INT4_GROUP = 32  # inputs per scale/zero point in int4 (Q4_1's block size)
_INT4_ROWS = 16  # torch's int4 CPU layout needs a multiple of 16 output rows
# Above this many input rows (long messages, history imports) int4 multiplies by a bf16 copy of
# its weights: the int4 kernel's time grows with the rows, bf16's hardly (30 layers' matmuls, ms:
# 1 row int4 8.5 / bf16 28.2; 20 rows 54.4 / 47.4; 64 rows 166.8 / 88.8; a 256-token prefill 0.8
# vs 0.42 s). The copy rounds each weight to bf16 once more: with it from 17 rows on, one case of
# recall-dev-hard flipped (mc 0.683 vs 0.700); from 65 rows on, none. RAM: 2 bytes per weight
# (212 MB for the bundled model).
INT4_MAX_ROWS = 64
RESCORE_TOP = 64  # candidates of `RescoredHead.pick_logits` recomputed exactly


class PackedLinear(nn.Module):
    """``y = x W^T`` (no bias) with W in one of the weight formats; input and output keep the
    caller's dtype (float32)."""

    weight: torch.Tensor
    scale: torch.Tensor | None
    dense: torch.Tensor  # int4 only: the same weights as a bf16 matrix, for many rows
    rows: tuple[int, int] | None = None  # a part of an int4 matrix: its rows of the product

    def __init__(self, weight: torch.Tensor, fmt: WeightFormat) -> None:
        super().__init__()
        w = weight.detach().float()
        self.fmt = fmt
        self.in_features = int(w.shape[1])
        self.out_features = int(w.shape[0])
        if fmt == "int4":
            packed, scale_zero, dense = _pack_int4(w)
            self.register_buffer("weight", packed)
            self.register_buffer("scale", scale_zero)
            self.register_buffer("dense", dense)
        elif fmt == "int8":
            scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            self.register_buffer("weight", q.contiguous())
            self.register_buffer("scale", scale.to(torch.bfloat16))
        elif fmt == "bf16":
            self.register_buffer("weight", w.to(torch.bfloat16).contiguous())
            self.register_buffer("scale", None)
        else:
            self.register_buffer("weight", w.contiguous())
            self.register_buffer("scale", None)

    @classmethod
    def view_of(cls, fused: PackedLinear, start: int, end: int) -> PackedLinear:
        """Rows start..end-1 of `fused` as a module sharing its storage (no copy)."""
        part = cls.__new__(cls)
        nn.Module.__init__(part)
        part.fmt = fused.fmt
        part.in_features = fused.in_features
        part.out_features = end - start
        part.rows = None
        if fused.fmt == "int4":
            # torch's int4 layout interleaves rows in blocks chosen by the matrix's height: a
            # slice of it is no matrix, so the part computes the whole product and keeps its rows
            # (only transformers' own forward uses the parts; memchat's uses the fused matrices)
            part.register_buffer("weight", fused.weight)
            part.register_buffer("scale", fused.scale)
            part.register_buffer("dense", fused.dense[start:end])
            part.rows = (start, end)
            return part
        part.register_buffer("weight", fused.weight[start:end])
        part.register_buffer("scale", None if fused.scale is None else fused.scale[start:end])
        return part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.fmt == "int4" and x2.shape[0] > INT4_MAX_ROWS:
            y = torch.nn.functional.linear(x2.to(torch.bfloat16), self.dense)
        elif self.fmt == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(torch.bfloat16), self.weight, INT4_GROUP, self.scale
            )
            if self.rows is not None:
                y = y[:, self.rows[0] : self.rows[1]]
        elif self.fmt == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scale)
        elif self.fmt == "bf16":
            y = torch.nn.functional.linear(x2.to(torch.bfloat16), self.weight)
        else:
            y = torch.nn.functional.linear(x2, self.weight)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def bf16_matmul(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x -> x W^T`` for bf16 inputs of at most `INT4_MAX_ROWS` rows (rows, in), contiguous,
        giving bf16 (rows, out): the kernel itself, without `forward`'s reshapes, conversions
        and module call (a decoding step makes four such calls per layer). Not for fp32
        weights or row views of int4 matrices."""
        w, scale = self.weight, self.scale
        if self.fmt == "int4" and self.rows is None:
            op4 = torch.ops.aten._weight_int4pack_mm_for_cpu
            return lambda x: op4(x, w, INT4_GROUP, scale)
        if self.fmt == "int8":
            op8 = torch.ops.aten._weight_int8pack_mm
            return lambda x: op8(x, w, scale)
        if self.fmt == "bf16":
            return lambda x: torch.nn.functional.linear(x, w)
        raise ValueError(
            f"no bf16 matmul for {self.fmt} weights{' (a row view)' if self.rows else ''}"
        )

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, format={self.fmt}"


class RescoredHead(nn.Module):
    """The LM head under int4: calling it gives the exact (int8) logits, as `PackedLinear`;
    `pick_logits`, for choosing the next token, multiplies by an int4 copy (1.6 vs 3.6 ms per
    token here: the head is a quarter of a decoding step) and recomputes its `RESCORE_TOP`
    largest logits exactly. The argmax is the exact head's whenever it is among those candidates
    (every one of 102 positions of real text, even with 16 candidates); the other logits keep
    the int4 error, so log-probabilities move by up to ~0.02 (mean KL to the exact head 0.0066
    with 64 candidates; 0.044 without rescoring)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.exact = PackedLinear(weight, "int8")
        packed, scale_zero, _ = _pack_int4(weight.detach().float())
        self.register_buffer("coarse", packed)
        self.register_buffer("coarse_scale", scale_zero)
        self.in_features, self.out_features = self.exact.in_features, self.exact.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The exact head's int8 weights."""
        return self.exact.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.exact(x)

    def pick_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (rows, V) float32 of ``x`` (rows, in) whose largest `RESCORE_TOP` per row are
        the exact head's and the rest int4 approximations."""
        xb = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            xb, self.coarse, INT4_GROUP, self.coarse_scale
        ).float()
        top = y.topk(min(RESCORE_TOP, self.out_features), dim=-1).indices
        w, scale = self.exact.weight, self.exact.scale
        assert scale is not None
        for r in range(xb.shape[0]):
            rows = top[r]
            y[r, rows] = torch.ops.aten._weight_int8pack_mm(xb[r : r + 1], w[rows], scale[rows])[
                0
            ].float()
        return y


def _pack_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w`` (out, in) as torch's CPU int4 layout: packed codes (out, in / 2) uint8 and bf16
    scales and zero points (in / 32, out, 2), ``w ~ (code - 8) * scale + zero``; and those
    weights as a bf16 matrix (out, in). The scale spans each group's range in 15 steps; codes are
    rounded against the bf16-rounded scale and zero."""
    out_f, in_f = w.shape
    if in_f % INT4_GROUP or out_f % _INT4_ROWS:
        raise ValueError(
            f"int4 needs input sizes divisible by {INT4_GROUP} and output sizes by {_INT4_ROWS}, "
            f"not {in_f} and {out_f}: choose another weight format for this model"
        )
    groups = w.view(out_f, in_f // INT4_GROUP, INT4_GROUP)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    codes = (groups - zero.float()[..., None]) / scale.float()[..., None] + 8
    codes = codes.round().clamp(0, 15).to(torch.int32).view(out_f, in_f)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    grid = (codes.view(groups.shape).float() - 8) * scale.float()[..., None]
    dense = (grid + zero.float()[..., None]).view(out_f, in_f).to(torch.bfloat16).contiguous()
    return packed, torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous(), dense


def _fuse(mods: list[nn.Linear], fmt: WeightFormat) -> tuple[PackedLinear, list[PackedLinear]]:
    """One packed matrix of the modules' weights stacked by rows, and a view per module."""
    fused = PackedLinear(torch.cat([m.weight for m in mods], dim=0), fmt)
    views, start = [], 0
    for m in mods:
        end = start + m.weight.shape[0]
        views.append(PackedLinear.view_of(fused, start, end))
        start = end
    return fused, views


def pack_weights(model: LlamaForCausalLM, fmt: WeightFormat = "fp32") -> LlamaForCausalLM:
    """Fuse every layer's q/k/v and gate/up projections (``self_attn.qkv_proj``,
    ``mlp.gate_up_proj``) and store all linear weights in `fmt`; in place, returns `model`.
    Idempotent for the same format; a packed model cannot be repacked to another format."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose from {', '.join(WEIGHT_FORMATS)}")
    done = getattr(model, "memchat_weights", None)
    if done is not None:
        if done != fmt:
            raise ValueError(f"the model is already packed as {done}, not {fmt}")
        return model
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            owner = attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else mlp
            if getattr(owner, name).bias is not None:
                raise ValueError(f"{name} has a bias: memchat's packed linears have none")
        attn.qkv_proj, (attn.q_proj, attn.k_proj, attn.v_proj) = _fuse(
            [attn.q_proj, attn.k_proj, attn.v_proj], fmt
        )
        mlp.gate_up_proj, (mlp.gate_proj, mlp.up_proj) = _fuse([mlp.gate_proj, mlp.up_proj], fmt)
        attn.o_proj = PackedLinear(attn.o_proj.weight, fmt)
        mlp.down_proj = PackedLinear(mlp.down_proj.weight, fmt)
    if fmt != "fp32":
        # a packed copy for the head; the embedding keeps the float32 table for lookups
        head = model.lm_head.weight
        if fmt == "int4" and head.shape[0] % _INT4_ROWS == 0 and head.shape[1] % INT4_GROUP == 0:
            model.lm_head = RescoredHead(head)
        else:  # a vocabulary int4's layout cannot hold keeps the plain int8 head
            model.lm_head = PackedLinear(head, "int8" if fmt == "int4" else fmt)
    model.memchat_weights = fmt  # type: ignore[assignment]  # a plain attribute, not a module
    return model
