"""Token ids of a bench sample: the context part (compressed question-agnostically) and the question part, with
the model's chat template applied when it has one; follow-up turns of a shared-context conversation."""

from __future__ import annotations

from .tasks.base import Sample

__all__ = ["answer_positions", "encode", "followup_ids", "text_positions"]


def _texts(tokenizer, sample: Sample) -> tuple[str, str, bool]:
    """``(context text, question text, BOS prepended to the context ids)``: what ``encode`` tokenizes."""
    marker = "\n\n" + sample.question
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": sample.context + marker}], tokenize=False, add_generation_prompt=True
        )
        cut = text.rindex(marker)
        return text[:cut], text[cut:] + sample.answer_prefix, False
    return sample.context, marker + "\n" + sample.answer_prefix, tokenizer.bos_token_id is not None


def encode(tokenizer, sample: Sample) -> tuple[list[int], list[int]]:
    """Token ids of (context part, question part) with the chat template applied when the model has one.
    The question part ends with the assistant turn's start and the answer prefix."""
    ctx_text, rest_text, bos = _texts(tokenizer, sample)
    ctx = tokenizer(ctx_text, add_special_tokens=False)["input_ids"]
    rest = tokenizer(rest_text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] + ctx) if bos else ctx, rest


def answer_positions(tokenizer, sample: Sample) -> list[int] | None:
    """Positions (in ``encode``'s context ids) of the tokens that spell a gold answer, at every place an answer
    occurs in the context: what a KV policy must keep for the answer to be read off the cache (a passkey's key,
    a needle's number). None where the tokenizer has no character offsets (a slow tokenizer) or no answer
    occurs in the context."""
    return text_positions(tokenizer, sample, sample.answers)


def text_positions(tokenizer, sample: Sample, strings) -> list[int] | None:
    """Positions (in ``encode``'s context ids) of the tokens that overlap any occurrence of any of ``strings`` in
    the context (e.g. the needle sentences a task lists in ``sample.meta["needles"]``); None as in
    ``answer_positions``."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    ctx_text, _, bos = _texts(tokenizer, sample)
    spans = []
    for a in {a for a in strings if a}:
        at = ctx_text.find(a)
        while at >= 0:
            spans.append((at, at + len(a)))
            at = ctx_text.find(a, at + 1)
    if not spans:
        return None
    offsets = tokenizer(ctx_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    shift = 1 if bos else 0
    return sorted({i + shift for i, (s, e) in enumerate(offsets) if e > s and any(s < b and e > a for a, b in spans)})


def followup_ids(tokenizer, sample: Sample, history: list[tuple[str, str]], question: str, prefix: str
                 ) -> list[int]:
    """Token ids that continue a conversation after the previous answer: the end of the assistant turn and the
    next user turn (``question``) up to the answer ``prefix``. ``history``: ``(question, answer text)`` of the
    turns so far (the first question carries the context)."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer("\n\n" + question + "\n" + prefix, add_special_tokens=False)["input_ids"]
    msgs = []
    for i, (q, a) in enumerate(history):
        msgs.append({"role": "user", "content": (sample.context + "\n\n" + q) if i == 0 else q})
        msgs.append({"role": "assistant", "content": a})
    before = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True) + msgs[-1]["content"]
    after = tokenizer.apply_chat_template(msgs + [{"role": "user", "content": question}], tokenize=False,
                                          add_generation_prompt=True)
    if not after.startswith(before):
        raise ValueError("shared context: the chat template does not render earlier turns verbatim; cannot continue "
                         "the conversation in the cache")
    return tokenizer(after[len(before) :] + prefix, add_special_tokens=False)["input_ids"]
