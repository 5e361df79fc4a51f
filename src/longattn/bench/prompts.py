"""Token ids of a bench sample: the context part (compressed question-agnostically) and the question part, with
the model's chat template applied when it has one; follow-up turns of a shared-context conversation."""

from __future__ import annotations

from .tasks.base import Sample

__all__ = ["encode", "followup_ids"]


def encode(tokenizer, sample: Sample) -> tuple[list[int], list[int]]:
    """Token ids of (context part, question part) with the chat template applied when the model has one.
    The question part ends with the assistant turn's start and the answer prefix."""
    marker = "\n\n" + sample.question
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": sample.context + marker}], tokenize=False, add_generation_prompt=True
        )
        cut = text.rindex(marker)
        ctx_text, rest_text = text[:cut], text[cut:] + sample.answer_prefix
    else:
        ctx_text, rest_text = sample.context, marker + "\n" + sample.answer_prefix
    ctx = tokenizer(ctx_text, add_special_tokens=False)["input_ids"]
    rest = tokenizer(rest_text, add_special_tokens=False)["input_ids"]
    if not getattr(tokenizer, "chat_template", None) and tokenizer.bos_token_id is not None:
        ctx = [tokenizer.bos_token_id] + ctx
    return ctx, rest


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
