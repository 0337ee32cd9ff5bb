"""Model factories for ``gradcheck_team_suite.yaml``: real ``transformers`` architectures
built from small configs with random weights (nothing is downloaded).

Each factory takes keyword arguments, which the suite's ``args:`` mappings give; the
suite names them by import path (``zoo_factories:bert_masked_lm``).
"""

from __future__ import annotations

from torch import nn


def bert_masked_lm(
    vocab_size: int = 128,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 64,
) -> nn.Module:
    """BERT with its masked-LM head: gives its own loss when the batch has ``labels``."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=64,
    )
    return transformers.BertForMaskedLM(config)


def bert_encoder(
    vocab_size: int = 128,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 64,
) -> nn.Module:
    """The bare BERT encoder (no head, no loss): the conftest's default-loss hook applies."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=64,
    )
    return transformers.BertModel(config, add_pooling_layer=False)


def gpt2_lm(
    vocab_size: int = 128, n_embd: int = 32, n_layer: int = 2, n_head: int = 4
) -> nn.Module:
    """GPT-2 with its language-model head."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=64,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def vit_classifier(
    image_size: int = 32, patch_size: int = 8, hidden_size: int = 32, num_labels: int = 10
) -> nn.Module:
    """A Vision Transformer image classifier."""
    import transformers

    config = transformers.ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        num_labels=num_labels,
    )
    return transformers.ViTForImageClassification(config)


def resnet_classifier(num_labels: int = 10) -> nn.Module:
    """A two-stage ResNet (BatchNorm after every convolution)."""
    import transformers

    config = transformers.ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        num_labels=num_labels,
    )
    return transformers.ResNetForImageClassification(config)
