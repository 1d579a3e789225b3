"""Instruction and chat records as token sequences with the loss on the response only.

A record is a conversation (instruction records are ``[system?, user: prompt, assistant:
response]``).  It is rendered with the tokenizer's chat template when it has one (SmolLM2-
Instruct's does), else with the plain format::

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}<eos>

Each assistant turn's content (with the template's end-of-turn marker, or EOS in the plain
format) is a target; everything else -- system and user turns, role headers -- gets the label
``-100``, so the per-sample loss is the mean NLL of the response tokens.  The template is
rendered turn by turn and each rendering must extend the previous one (else the template is
refused).  A sequence longer than ``max_length`` is cut at its end; a record left without a
response token contributes nothing (a zero gradient) and is counted in the warning.
"""

from __future__ import annotations

import logging
from typing import Any

from ..data.lm import IGNORE_INDEX, pad_token_id
from ..errors import UserError
from .examples import TaskExamples, pad_rows
from .records import decode_record

log = logging.getLogger(__name__)
Segment = tuple[str, bool]  # (text, trained)


class ChatTemplateError(UserError, ValueError):
    """A chat template that cannot be split into prompt and response tokens."""


def messages_of(fields: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation of a decoded instruction or chat record."""
    if "messages" in fields:
        return fields["messages"]
    msgs = [{"role": "system", "content": fields["system"]}] if fields.get("system") else []
    return [
        *msgs,
        {"role": "user", "content": fields["prompt"]},
        {"role": "assistant", "content": fields["response"]},
    ]


def uses_template(tokenizer: Any, mode: str) -> bool:
    return mode == "auto" and bool(getattr(tokenizer, "chat_template", None))


def segments(messages: list[dict[str, str]], tokenizer: Any, mode: str) -> list[Segment]:
    """The conversation as (text, trained) pieces whose concatenation is its rendering."""
    if not uses_template(tokenizer, mode):
        eos = tokenizer.eos_token or ""
        out: list[Segment] = []
        for m in messages:
            if m["role"] == "assistant":
                out += [("<|assistant|>\n", False), (m["content"] + eos, True)]
            else:
                out.append((f"<|{m['role']}|>\n{m['content']}\n", False))
        return out
    out, prev = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True)
        after = _render(tokenizer, messages[: i + 1], False)
        if not before.startswith(prev) or not after.startswith(before):
            raise ChatTemplateError(
                "the tokenizer's chat template does not render a conversation turn by turn (a "
                "later rendering does not extend an earlier one), so the response tokens cannot "
                "be told from the prompt. Fix: set task.chat_template: plain"
            )
        out += [(before[len(prev) :], False), (after[len(before) :], True)]
        prev = after
    rest = _render(tokenizer, messages, False)
    if rest.startswith(prev) and len(rest) > len(prev):
        out.append((rest[len(prev) :], False))
    return [s for s in out if s[0]]


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def tokens(segs: list[Segment], tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Token ids of the segments (each tokenized alone) and whether each is a target.  The
    tokenizer's own special tokens (a BOS) are added once, unless the text starts with them."""
    ids: list[int] = []
    trained: list[bool] = []
    bos = getattr(tokenizer, "bos_token", None)
    for k, (text, target) in enumerate(segs):
        special = k == 0 and not (bos and text.startswith(bos))
        piece = tokenizer(text, add_special_tokens=special)["input_ids"]
        ids += piece
        trained += [target] * len(piece)
    return ids, trained


def generation_prompt(tokenizer: Any, prompt: str, mode: str) -> list[int]:
    """Token ids that ask the model to answer ``prompt`` as the user's message."""
    msgs = [{"role": "user", "content": prompt}]
    if uses_template(tokenizer, mode):
        segs: list[Segment] = [(_render(tokenizer, msgs, True), False)]
    else:
        segs = [(f"<|user|>\n{prompt}\n<|assistant|>\n", False)]
    return tokens(segs, tokenizer)[0]


def encode_chat(ds: Any, tokenizer: Any, max_length: int, mode: str) -> TaskExamples:
    """Tokenize instruction or chat records (canonical texts, see :mod:`.records`); plain-text
    canary records are trained on every token, with EOS."""
    rows, targets = [], []
    truncated = empty = 0
    eos = tokenizer.eos_token_id
    for text, rid in zip(ds.texts, ds.ids, strict=True):
        fields = decode_record(text, rid)
        if fields is None:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [eos]
            trained = [True] * len(ids)
        else:
            ids, trained = tokens(segments(messages_of(fields), tokenizer, mode), tokenizer)
        if len(ids) > max_length:
            ids, trained = ids[:max_length], trained[:max_length]
            truncated += 1
        if not any(trained):
            empty += 1
        rows.append(ids)
        targets.append([t if keep else IGNORE_INDEX for t, keep in zip(ids, trained, strict=True)])
    pad = pad_token_id(tokenizer)
    input_ids, mask, labels = pad_rows(rows, targets, pad)
    if truncated:
        log.warning(
            "truncated %d of %d records to max_length=%d tokens%s",
            truncated,
            len(rows),
            max_length,
            f"; {empty} have no response token left (they train nothing: raise data.max_length)"
            if empty
            else "",
        )
    assert labels is not None
    return TaskExamples(input_ids, mask, labels, list(ds.ids), truncated, max_length, pad)
