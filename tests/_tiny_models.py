"""Tiny randomly initialised causal LMs saved to temporary directories (offline; never downloaded)."""

from __future__ import annotations

import os

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 300


def tiny_hf(family: str, directory: str, *, vocab: int = VOCAB, seed: int = 0, tokenizer: bool = False, **over):
    """Build and save_pretrained a tiny GPT-2 / Llama / GPTNeoX; returns the model."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                            bos_token_id=0, eos_token_id=0, **over)
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             bos_token_id=0, eos_token_id=0, pad_token_id=None, **over)
        model = tf.LlamaForCausalLM(cfg)
    elif family == "gptneox":
        cfg = tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=64, bos_token_id=0,
                               eos_token_id=0, **over)
        model = tf.GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(family)
    # Random init of GPT-2/NeoX has tiny weights: scale the head so logits are far from uniform.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(directory)
    if tokenizer:
        save_tiny_tokenizer(directory, vocab)
    return model


def save_tiny_tokenizer(directory: str, vocab: int = VOCAB) -> None:
    """A byte-level BPE with <|endoftext|> = 0, saved as a PreTrainedTokenizerFast."""
    from tokenbounds.eval.data import tiny_documents, train_tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = train_tokenizer(tiny_documents(), vocab)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(directory)


def random_tokens(path: str, n: int = 4000, *, vocab: int = VOCAB, doc_every: int = 97, seed: int = 0) -> np.ndarray:
    from tokenbounds.eval.data import write_tokens

    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=n).astype(np.uint16)
    ids[::doc_every] = 0
    write_tokens(path, ids)
    return ids
