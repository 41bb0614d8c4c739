"""Prompt templates (DESIGN.md section 4). Every template can be overridden by the caller."""
from __future__ import annotations

import json

__all__ = ["BASE_TEMPLATE", "POWER_TEMPLATE", "QWEN_MATH_SYSTEM", "base_prompt", "thinking_prompt",
           "thinking_format", "power_prompt", "qwen_math_prompt", "TEMPLATES"]

BASE_TEMPLATE = ("Task: Answer the question below. Explain your reasoning step by step.\n\n\n\n"
                 "Question:\n{q}\n\nStep by step answer:\n")
POWER_TEMPLATE = ("Can you solve the following math problem? {q} Please reason step by step, and "
                  "put your final answer within \\boxed{{}}.")
QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def base_prompt(q: str, template: str = BASE_TEMPLATE) -> str:
    return template.format(q=q)


def power_prompt(q: str, template: str = POWER_TEMPLATE) -> str:
    return template.format(q=q)


def thinking_prompt(tokenizer, q: str) -> str:
    """The bare question in the thinking model's chat template (generation prompt added)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([dict(role="user", content=q)], tokenize=False,
                                             add_generation_prompt=True)
    return q + "\n"


def thinking_format(tokenizer) -> dict:
    """How :func:`thinking_prompt` formats a question with ``tokenizer``: its chat template (with
    the template's hash), or the bare question and a newline when it has none."""
    from .provenance import text_hash
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return dict(format="question + newline (the tokenizer has no chat template)")
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return dict(format="chat template", template=text_hash(text))


def qwen_math_prompt(tokenizer, q: str) -> str:
    msgs = [dict(role="system", content=QWEN_MATH_SYSTEM), dict(role="user", content=q)]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return QWEN_MATH_SYSTEM + "\n" + q + "\n"


TEMPLATES = {"base": lambda tok, q: base_prompt(q), "thinking": thinking_prompt,
             "power": lambda tok, q: power_prompt(q), "qwen-math": qwen_math_prompt}
