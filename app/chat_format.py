"""Turning messages into token ids with the model's own chat template, one message at a time.

The window is built message by message, so each message must be tokenized on its own and still
match what the template would produce for the whole conversation. For ChatML-style templates
(SmolLM2 and most Llama-family instruct models) a message's tokens are the difference between the
template rendered with and without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

_PROBE_SYSTEM = "S"


@dataclass(frozen=True)
class EncodedMessage:
    """A message's token ids and which of them are content (eligible for memory)."""

    role: str
    token_ids: np.ndarray  # (T,) int64
    content_mask: np.ndarray  # (T,) bool: not a special token, not the role header or footer


class ChatFormat:
    """Encodes single messages, the system block and the assistant's generation header."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.special_ids = set(int(i) for i in tokenizer.all_special_ids)
        self.stop_ids = {i for i in (tokenizer.eos_token_id,) if i is not None}
        for tok in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
                self.stop_ids.add(tid)
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        # fixed token runs, rendered once instead of on every turn
        self._header = self._generation_header()
        self._close = self._close_reply()

    def _render(self, messages: list[dict[str, str]], generation: bool = False) -> list[int]:
        if not self.has_template:  # ChatML by hand for tokenizers without a template
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            if generation:
                text += "<|im_start|>assistant\n"
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        out: Any = self.tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=generation
        )
        ids = out["input_ids"] if hasattr(out, "keys") else out  # BatchEncoding or a list
        return [int(i) for i in ids]

    def _message_ids(self, role: str, content: str) -> np.ndarray:
        base = [{"role": "system", "content": _PROBE_SYSTEM}]
        before = self._render(base)
        after = self._render(base + [{"role": role, "content": content}])
        if after[: len(before)] != before:
            raise ValueError(
                "chat template is not prefix-stable; memchat needs a ChatML-like template"
            )
        return np.asarray(after[len(before) :], dtype=np.int64)

    def encode(self, role: str, content: str) -> EncodedMessage:
        """Tokens of one message as it appears inside a conversation."""
        ids = self._message_ids(role, content)
        return EncodedMessage(role, ids, self._content_mask(role, ids))

    def _content_mask(self, role: str, ids: np.ndarray) -> np.ndarray:
        head, foot = self._frame(role)
        mask = np.zeros(len(ids), dtype=bool)
        mask[head : max(head, len(ids) - foot)] = True
        mask &= ~np.isin(ids, list(self.special_ids))
        return mask

    def content_mask(self, role: str, ids: np.ndarray) -> np.ndarray:
        """Content mask of stored token ids (recomputed when a session is loaded)."""
        return self._content_mask(role, np.asarray(ids, dtype=np.int64))

    @lru_cache(maxsize=16)  # noqa: B019 - a handful of roles, the object lives as long as the model
    def _frame(self, role: str) -> tuple[int, int]:
        """Lengths of the role header and footer around the content."""
        a = list(self._message_ids(role, "x"))
        b = list(self._message_ids(role, "y z"))
        head = 0
        while head < min(len(a), len(b)) and a[head] == b[head]:
            head += 1
        foot = 0
        while foot < min(len(a), len(b)) - head and a[-1 - foot] == b[-1 - foot]:
            foot += 1
        return head, foot

    def system_block(self, system_prompt: str | None) -> EncodedMessage:
        """The pinned start of the window: the given system prompt, else what the template adds on
        its own before a first user message (may be empty)."""
        if system_prompt is not None:
            return self.encode("system", system_prompt)
        user = self._message_ids("user", "x")
        whole = self._render([{"role": "user", "content": "x"}])
        prefix = np.asarray(whole[: len(whole) - len(user)], dtype=np.int64)
        return EncodedMessage("system", prefix, self._content_mask("system", prefix))

    def generation_header(self) -> np.ndarray:
        """Tokens that open the assistant's reply (e.g. ``<|im_start|>assistant\\n``)."""
        return self._header

    def close_reply(self) -> np.ndarray:
        """Tokens that end an assistant message after its content (footer)."""
        return self._close

    def _generation_header(self) -> np.ndarray:
        base = [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": "x"}]
        before = self._render(base)
        after = self._render(base, generation=True)
        return np.asarray(after[len(before) :], dtype=np.int64)

    def reply_ids(self, text: str) -> np.ndarray:
        """Content tokens of an assistant reply, as they would appear after the header."""
        enc = self.encode("assistant", text)
        return enc.token_ids[enc.content_mask]

    def _close_reply(self) -> np.ndarray:
        _, foot = self._frame("assistant")
        ids = self._message_ids("assistant", "x")
        return ids[len(ids) - foot :]
