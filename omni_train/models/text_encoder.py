"""Caption -> token embeddings with a transformers text model, padded to the batch's longest.

``model.text_encoder.architecture`` picks the model: "t5" and "umt5" return the encoder's last
hidden state (Wan's pipeline uses umT5's), "llama" returns a decoder's hidden states
``hidden_layers_to_skip`` layers below the last for the caption inside a prompt template, with
the template's leading tokens cropped away (HunyuanVideo's pipeline).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (
    AutoTokenizer,
    ByT5Tokenizer,
    LlamaConfig,
    LlamaModel,
    PreTrainedModel,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from omni_train.models.config import TextEncoderConfig

# ByT5's vocabulary: 3 special tokens + 256 byte values + 125 extra ids.
BYTE_VOCAB_SIZE = 384


@dataclass(frozen=True)
class Architecture:
    model_class: type[PreTrainedModel]
    # config.json model_types this class loads correctly.
    model_types: tuple[str, ...]


ARCHITECTURES = {
    "t5": Architecture(T5EncoderModel, ("t5", "mt5")),
    "umt5": Architecture(UMT5EncoderModel, ("umt5",)),
    "llama": Architecture(LlamaModel, ("llama",)),
}


def random_t5_encoder(cfg: TextEncoderConfig, umt5: bool = False) -> PreTrainedModel:
    """A T5-family encoder (T5, or umT5 with its per-layer relative attention bias) of the
    configured sizes over the byte-level vocabulary."""
    config_class, model_class = (
        (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    )
    config = config_class(
        vocab_size=BYTE_VOCAB_SIZE,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        feed_forward_proj=cfg.feed_forward_proj,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        dropout_rate=0.0,
    )
    return model_class(config)


def random_llama_decoder(cfg: TextEncoderConfig, pad_token_id: int) -> LlamaModel:
    config = LlamaConfig(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        head_dim=cfg.d_kv,
        pad_token_id=pad_token_id,
    )
    return LlamaModel(config)


def random_model(cfg: TextEncoderConfig, tokenizer: ByT5Tokenizer) -> PreTrainedModel:
    if cfg.architecture == "umt5":
        return random_t5_encoder(cfg, umt5=True)
    if cfg.architecture == "llama":
        return random_llama_decoder(cfg, tokenizer.pad_token_id)
    return random_t5_encoder(cfg)


def pretrained_dirs(pretrained: str) -> tuple[Path, Path]:
    """(model dir, tokenizer dir): the directory itself, or a diffusers pipeline's
    text_encoder/ and tokenizer/."""
    root = Path(pretrained)
    if (root / "config.json").is_file():
        return root, root
    if (root / "text_encoder" / "config.json").is_file():
        return root / "text_encoder", root / "tokenizer"
    raise FileNotFoundError(
        f"model.text_encoder.pretrained={pretrained}: no config.json there nor in its "
        "text_encoder/; give a transformers model directory (as save_pretrained writes it, "
        "with its tokenizer) or a diffusers pipeline directory"
    )


def check_model_type(model_dir: Path, cfg: TextEncoderConfig) -> None:
    """A directory of another model type would load with missing or misread weights (a umT5
    loaded as T5 shares one relative attention bias across layers): refuse it."""
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type", "")
    expected = ARCHITECTURES[cfg.architecture].model_types
    if model_type in expected:
        return
    fitting = [name for name, arch in ARCHITECTURES.items() if model_type in arch.model_types]
    fix = (
        f"set model.text_encoder.architecture={fitting[0]}"
        if fitting
        else f"model.text_encoder.architecture supports {sorted(ARCHITECTURES)}"
    )
    raise ValueError(
        f"model.text_encoder.pretrained={cfg.pretrained} holds a {model_type!r} model "
        f"(config.json model_type) but model.text_encoder.architecture={cfg.architecture} "
        f"loads {list(expected)}; {fix}"
    )


def template_token_count(tokenizer, template: str) -> int:
    """Tokens of ``template`` before its {} placeholder, with the special tokens the tokenizer
    puts in front (Llama-3's <|begin_of_text|>). With Llama-3's tokenizer this is the pipeline's
    own count (the template's tokens less the placeholder and the closing <|eot_id|>); it also
    holds for tokenizers that split those into several tokens or append an end token."""
    prefix = template.split("{}")[0]
    plain = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    full = tokenizer(prefix)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return start + len(plain)
    raise ValueError(
        "cannot count the tokens of model.text_encoder.prompt_template before {}: the "
        "tokenizer does not reproduce them with its special tokens added; set "
        "model.text_encoder.crop_start"
    )


class TextEncoder(nn.Module):
    """``forward(captions)`` -> (embeddings (B, Ltok, D), mask (B, Ltok) bool, True = token)."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        if cfg.architecture not in ARCHITECTURES:
            raise ValueError(
                f"model.text_encoder.architecture={cfg.architecture!r} is unknown; use one of "
                f"{sorted(ARCHITECTURES)}"
            )
        self.architecture = cfg.architecture
        self.max_length = cfg.max_length
        self.hidden_layers_to_skip = cfg.hidden_layers_to_skip
        if cfg.pretrained:
            model_dir, tokenizer_dir = pretrained_dirs(cfg.pretrained)
            check_model_type(model_dir, cfg)
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
            model_class = ARCHITECTURES[cfg.architecture].model_class
            self.model = model_class.from_pretrained(model_dir, local_files_only=True)
            if self.dim != cfg.d_model:
                raise ValueError(
                    f"text encoder at {cfg.pretrained} has width {self.dim} but "
                    f"model.text_encoder.d_model is {cfg.d_model}; set it to {self.dim}"
                )
        else:
            self.tokenizer = ByT5Tokenizer()
            self.model = random_model(cfg, self.tokenizer)
        if cfg.architecture == "llama":
            self._init_template(cfg)

    def _init_template(self, cfg: TextEncoderConfig) -> None:
        if cfg.prompt_template.count("{}") != 1:
            raise ValueError(
                "model.text_encoder.prompt_template must hold the caption's place {} exactly "
                f"once; got {cfg.prompt_template!r}"
            )
        if cfg.hidden_layers_to_skip < 0 or (
            cfg.hidden_layers_to_skip > self.model.config.num_hidden_layers
        ):
            raise ValueError(
                f"model.text_encoder.hidden_layers_to_skip={cfg.hidden_layers_to_skip} is not "
                f"within the model's 0..{self.model.config.num_hidden_layers} layers"
            )
        # The crop takes the first tokens, so the template must sit at the start of every row.
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.prompt_template = cfg.prompt_template
        if cfg.crop_start is None or cfg.crop_start == -1:
            self.crop_start = template_token_count(self.tokenizer, cfg.prompt_template)
        else:
            self.crop_start = cfg.crop_start
        shortest = len(self.tokenizer(cfg.prompt_template.format(""))["input_ids"])
        if not 0 <= self.crop_start < shortest:
            raise ValueError(
                f"model.text_encoder.crop_start={cfg.crop_start} crops the whole templated "
                f"caption ({shortest} tokens for an empty caption with this tokenizer); set it "
                "to the template's tokens before {} or to -1 to count them"
            )

    @property
    def dim(self) -> int:
        config = self.model.config
        return int(config.hidden_size if self.architecture == "llama" else config.d_model)

    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids and bool mask (B, Ltok) on CPU; at least one column even if all are empty.
        "llama": the templated captions, template tokens included (``forward`` crops them)."""
        texts, max_length = list(captions), self.max_length
        if self.architecture == "llama":
            texts = [self.prompt_template.format(caption) for caption in texts]
            max_length += self.crop_start
        tokens = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
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
        if self.architecture == "llama":
            output = self.model(
                input_ids=ids, attention_mask=mask.long(), output_hidden_states=True
            )
            hidden = output.hidden_states[-(self.hidden_layers_to_skip + 1)]
            hidden, mask = hidden[:, self.crop_start :], mask[:, self.crop_start :]
        else:
            hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        # Padding positions carry no meaning; zero them so a caption's embedding does not
        # depend on what it was batched with.
        return hidden * mask.unsqueeze(-1).to(hidden.dtype), mask
