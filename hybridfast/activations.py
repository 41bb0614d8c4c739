"""Sentence activations of a (thinking) model (DESIGN.md section 1.1).

The activation of a sentence is the residual stream output by block ``layer`` (read with a
forward hook on that block: Hugging Face's ``hidden_states[layer + 1]`` is the same tensor except
for the last block, whose entry there has the final norm applied, which the router never sees),
averaged over tokens ``[tok_start - 1, tok_end]`` inclusive: the
token before the sentence through the token holding the character after it, located with the
tokenizer's offset mapping. Many traces go through the model per forward pass.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .sentences import split_sentences

__all__ = ["SentenceRecord", "block_output", "sentence_activations", "token_span"]


@dataclass
class SentenceRecord:
    trace: int          #: index of the trace
    index: int          #: sentence index within the trace
    text: str
    start: int          #: character span in the trace's full text
    end: int
    tok_lo: int         #: first token averaged (tok_start - 1, clamped at 0)
    tok_hi: int         #: last token averaged (inclusive)


@contextmanager
def block_output(model, layer: int):
    """``with block_output(model, L) as got: model(...)``, then ``got["h"]``: the residual stream
    ``[B, S, d]`` output by block ``L`` of a Hugging Face decoder, as the router reads it (equal
    to ``hidden_states[L + 1]`` except at the last block, whose entry there has the final norm)."""
    got = {}

    def keep(module, args, out):
        got["h"] = out[0] if isinstance(out, tuple) else out
    handle = model.model.layers[layer].register_forward_hook(keep)
    try:
        yield got
    finally:
        handle.remove()


def token_span(offsets, start: int, end: int) -> tuple[int, int]:
    """``(tok_start - 1, tok_end)`` for the character span ``[start, end)``."""
    n = len(offsets)
    tok_start = next((i for i, (a, b) in enumerate(offsets) if b > start), n - 1)
    tok_end = next((i for i, (a, b) in enumerate(offsets) if b > end), n - 1)
    return max(0, tok_start - 1), max(tok_end, tok_start)


@torch.inference_mode()
def sentence_activations(model, tokenizer, prefixes, thinking_texts, layer: int, *,
                         batch_size: int = 8, min_words: int = 3, max_length: int = 2048,
                         progress: bool = False):
    """Activations ``[N, d]`` (float32) of every sentence of every thinking text.

    ``prefixes[i] + thinking_texts[i]`` is the text the model reads (e.g. the chat-templated
    question followed by the thinking); only sentences of the thinking part are returned.
    """
    n_layers = model.config.num_hidden_layers
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer={layer} out of range: the model has {n_layers} blocks")
    if len(prefixes) != len(thinking_texts):
        raise ValueError(f"{len(prefixes)} prefixes for {len(thinking_texts)} thinking texts")
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    records, acts = [], []
    order = list(range(len(thinking_texts)))
    it = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="sentence activations")
    for b0 in it:
        idx = order[b0: b0 + batch_size]
        encs, sents = [], []
        for i in idx:
            full = prefixes[i] + thinking_texts[i]
            enc = tokenizer(full, return_offsets_mapping=True, add_special_tokens=False,
                            truncation=True, max_length=max_length)
            encs.append(enc)
            off = len(prefixes[i])
            sents.append([(s, a + off, e + off) for s, a, e in split_sentences(thinking_texts[i], min_words)])
        S = max(len(e["input_ids"]) for e in encs)
        ids = torch.full((len(idx), S), pad, dtype=torch.int64)
        mask = torch.zeros(len(idx), S, dtype=torch.int64)
        for r, e in enumerate(encs):
            n = len(e["input_ids"])
            ids[r, :n] = torch.tensor(e["input_ids"])
            mask[r, :n] = 1
        with block_output(model, layer) as got:
            model.model(input_ids=ids.to(dev), attention_mask=mask.to(dev))
        H = got["h"].float().cpu()
        for r, i in enumerate(idx):
            offs = encs[r]["offset_mapping"]
            for j, (s, a, e) in enumerate(sents[r]):
                if a >= (offs[-1][1] if offs else 0):
                    break  # truncated away
                lo, hi = token_span(offs, a, e)
                acts.append(H[r, lo: hi + 1].mean(0))
                records.append(SentenceRecord(i, j, s, a, e, lo, hi))
    if not acts:
        raise ValueError("no sentences found (need sentences of at least "
                         f"{min_words} words in the thinking texts)")
    X = torch.stack(acts)
    if torch.isnan(X).any():
        raise ValueError("NaN in the thinking model's activations")
    return X, records
