"""Tiny random-weight models for tests, benchmarks and the demo (no downloads).

``initializer_range=0.3`` (DESIGN.md section 5): with the default 0.02 the residual stream of a
tiny model is ~0.1 in norm and greedy outputs collapse to one repeated token, hiding bugs.
"""
from __future__ import annotations

import json
from importlib import resources

import torch

__all__ = ["tiny_model", "model_from_config", "bundled_config"]


def bundled_config(name: str) -> dict:
    """A config shipped in ``hybridfast/configs/<name>.json``."""
    try:
        text = resources.files("hybridfast.configs").joinpath(f"{name}.json").read_text()
    except FileNotFoundError:
        names = sorted(p.name[:-5] for p in resources.files("hybridfast.configs").iterdir()
                       if p.name.endswith(".json"))
        raise ValueError(f"unknown bundled config {name!r}; available: {names}") from None
    return json.loads(text)


def model_from_config(cfg: dict, seed: int = 0, dtype=torch.float32, device="cpu"):
    """Build a random-weight ``transformers`` causal LM from a config dict (seeded)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(cfg)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def tiny_model(family: str = "qwen2", seed: int = 0, vocab_size: int = 96, hidden_size: int = 64,
               layers: int = 4, heads: int = 4, kv_heads: int = 2, initializer_range: float = 0.3,
               dtype=torch.float32, **overrides):
    """A tiny random ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` (family ``qwen2``/``llama``)."""
    cfg = dict(model_type=family, vocab_size=vocab_size, hidden_size=hidden_size,
               intermediate_size=2 * hidden_size, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads,
               initializer_range=initializer_range, max_position_embeddings=512,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if family == "llama":
        cfg["attention_bias"] = False
    cfg.update(overrides)
    return model_from_config(cfg, seed=seed, dtype=dtype)


SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<think>", "</think>"]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: <think>\n{% endif %}")


def tiny_tokenizer(vocab_size: int = 384, texts=None):
    """A byte-level BPE tokenizer trained (deterministically, in about a second) on the bundled
    GSM8K sample, with ``<pad> <s> </s> <think> </think>`` as ids 0..4 and a chat template.
    Offsets mapping works, so sentence activations can be located exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    if texts is None:
        from importlib import resources
        import json as _json
        raw = resources.files("hybridfast.data").joinpath("gsm8k_train_sample.jsonl").read_text()
        texts = []
        for line in raw.splitlines():
            r = _json.loads(line)
            texts += [r["question"], r["answer"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_pair(tokenizer, seed: int = 0, family: str = "qwen2", perturb: float = 0.3, **kw):
    """(base, thinking) tiny models sharing ``tokenizer``'s vocabulary: the thinking model is
    the base with every weight perturbed by ``perturb`` x its std (they agree often, not always)."""
    import copy
    V = len(tokenizer)
    ids = dict(vocab_size=V, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    base = tiny_model(family, seed=seed, **ids, **kw)
    think = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in think.parameters():
            p.add_(torch.randn(p.shape, generator=g) * perturb * p.std().clamp_min(1e-3))
    return base, think
