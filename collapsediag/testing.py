"""Tiny random models and a locally trained tokenizer, for tests and benchmarks: no downloads, no pytest.

>>> tok = build_tokenizer()
>>> model = make_model("gpt2", len(tok))      # 3 layers, width 32, random weights
>>> corpus_texts(300)                         # synthetic sentences over the facts' words
"""
from __future__ import annotations

import random

import torch

SUBJECTS = ["Danielle Darrieux", "Paris", "Toko Yasuda", "Autonomous University of Madrid", "Angola",
            "Apple", "Edwin of Northumbria", "Kiki Dee", "the Nile", "Tokyo"]
OBJECTS = ["French", "English", "Spain", "Christianity", "Italy", "Africa", "guitar", "Japan", "Brazil",
           "piano", "London", "Islam"]
TEMPLATES = ["{} is located in", "The mother tongue of {} is", "{} plays the", "{} is a citizen of",
             "The official religion of {} is", "I think {} was born in", "Because of {}, we went to"]
WORDS = ("the a of in is was and to city music language country river company people known famous "
         "history because therefore you I we they said new old capital born plays located official").split()


def corpus_texts(n: int = 300, seed: int = 0) -> list[str]:
    """Synthetic sentences mixing the facts' words with filler words."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        t = rnd.choice(TEMPLATES).format(rnd.choice(SUBJECTS))
        filler = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(5, 25)))
        out.append(f"{rnd.choice(WORDS).capitalize()} {filler}. {t} {rnd.choice(OBJECTS)}.")
    return out


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the synthetic corpus (fast, with offsets)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus_texts(400, seed=1), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.padding_side = "right"
    return tok


def make_model(kind: str, vocab: int, **over):
    """A 2-4 layer random model of one family."""
    from transformers import (AutoModelForCausalLM, GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig)

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=3, n_head=4,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **over)
    elif kind == "gptj":
        cfg = GPTJConfig(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, **over)
    elif kind == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=vocab, max_position_embeddings=128, hidden_size=32, num_hidden_layers=3,
                            num_attention_heads=4, intermediate_size=64, **over)
    elif kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=128, hidden_size=32, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, **over)
    else:
        raise ValueError(kind)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.requires_grad_(False)
    return model
