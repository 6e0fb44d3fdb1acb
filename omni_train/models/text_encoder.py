"""Caption -> token embeddings with a T5 encoder (transformers), padded to the batch's longest."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, ByT5Tokenizer, T5Config, T5EncoderModel

from omni_train.models.config import TextEncoderConfig

# ByT5's vocabulary: 3 special tokens + 256 byte values + 125 extra ids.
BYTE_VOCAB_SIZE = 384


def random_t5_encoder(cfg: TextEncoderConfig) -> T5EncoderModel:
    config = T5Config(
        vocab_size=BYTE_VOCAB_SIZE,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        feed_forward_proj=cfg.feed_forward_proj,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        dropout_rate=0.0,
    )
    return T5EncoderModel(config)


class TextEncoder(nn.Module):
    """``forward(captions)`` -> (embeddings (B, Ltok, D), mask (B, Ltok) bool, True = token)."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.max_length = cfg.max_length
        if cfg.pretrained:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.pretrained, local_files_only=True)
            self.model = T5EncoderModel.from_pretrained(cfg.pretrained, local_files_only=True)
            if self.model.config.d_model != cfg.d_model:
                raise ValueError(
                    f"text encoder at {cfg.pretrained} has d_model {self.model.config.d_model} "
                    f"but model.text_encoder.d_model is {cfg.d_model}; set it to "
                    f"{self.model.config.d_model}"
                )
        else:
            self.tokenizer = ByT5Tokenizer()
            self.model = random_t5_encoder(cfg)

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids and bool mask (B, Ltok) on CPU; at least one column even if all are empty."""
        tokens = self.tokenizer(
            list(captions),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        ids, mask = tokens["input_ids"], tokens["attention_mask"].bool()
        if ids.shape[1] == 0:
            pad_id = self.tokenizer.pad_token_id or 0
            ids = torch.full((len(captions), 1), pad_id, dtype=torch.long)
            mask = torch.zeros(len(captions), 1, dtype=torch.bool)
        return ids, mask

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokenize(captions)
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        # Padding positions carry no meaning; zero them so a caption's embedding does not
        # depend on what it was batched with.
        return hidden * mask.unsqueeze(-1).to(hidden.dtype), mask
