"""Real architectures from ``transformers`` configs (random init, nothing downloaded).

Attention query/key projections sit decades below the other weights at initialisation
and embeddings get mostly-zero gradients: the gate knows both are healthy.
"""

from __future__ import annotations

import pytest
import torch

from pytest_gradcheck import gradient_health

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # random-init configs make it chatty


@gradient_health
def test_bert_masked_lm(gradcheck) -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    model = transformers.BertForMaskedLM(config)
    ids = torch.randint(0, 128, (2, 16))
    gradcheck(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})


@gradient_health
def test_gpt2_language_model(gradcheck) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=128,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 128, (2, 16))
    report = gradcheck(model, {"input_ids": ids, "labels": ids})
    assert report.loss > 0  # the model's own loss (output.loss) was used
