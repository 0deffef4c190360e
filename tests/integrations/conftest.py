"""The tiny random Llama of issue 11 and token data generated here (nothing is downloaded).

Data: arithmetic progressions mod 256 (``x_t = a + k t``, random start ``a`` and step ``k`` in
1..7): a model with attention can learn them, and at lr 3e-2 its attention logits grow past 1e3 within
a few hundred steps (Trainer, seeds 0-4: the first ``attention_logit_growth`` warning at steps 60-94).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

LAYERS = 2


def tiny_llama(seed: int):
    """``LlamaForCausalLM`` with the issue's config: d=64, 2 layers, 4 heads, 2 KV heads (GQA), sdpa."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    return model


def progressions(n: int, length: int = 32, seed: int = 1234) -> torch.Tensor:
    """``n`` token sequences ``(a + k t) mod 256``, shape (n, length)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 256, (n, 1), generator=g)
    k = torch.randint(1, 8, (n, 1), generator=g)
    return (a + k * torch.arange(length)) % 256


class TokenDataset(torch.utils.data.Dataset):
    """Causal-LM items ``{"input_ids", "labels"}`` for the Trainer."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


@pytest.fixture
def llama():
    return tiny_llama


@pytest.fixture
def token_data():
    return progressions


@pytest.fixture
def token_dataset():
    return lambda n, **kw: TokenDataset(progressions(n, **kw))


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny model: one torch thread (see tests/conftest.py)."""
