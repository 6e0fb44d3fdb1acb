"""umT5 and Llama text encoders against the diffusers pipelines' own prompt-embedding code.

Tiny models saved with save_pretrained stand in for umT5-XXL and LLaVA-Llama-3-8B; the
reference outputs come from WanPipeline._get_t5_prompt_embeds and
HunyuanVideoPipeline._get_llama_prompt_embeds called on those same models and tokenizers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import (
    DEFAULT_PROMPT_TEMPLATE,
    HunyuanVideoPipeline,
)
from diffusers.pipelines.wan.pipeline_wan import WanPipeline
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaModel, PreTrainedTokenizerFast, T5EncoderModel, UMT5EncoderModel

from omni_train.models.config import HUNYUAN_VIDEO_PROMPT_TEMPLATE, TextEncoderConfig
from omni_train.models.text_encoder import TextEncoder

CPU = torch.device("cpu")
CAPTIONS = ["a man talks", "hi", "a caption that is far longer than sixteen tokens"]
TINY = TextEncoderConfig(max_length=16, num_layers=3)
TEMPLATE_PREFIX = HUNYUAN_VIDEO_PROMPT_TEMPLATE.split("{}")[0]


def byte_bpe_tokenizer(
    specials: list[str], single: str, **special_roles: str
) -> PreTrainedTokenizerFast:
    """A 384-token byte-level BPE (tokenizer.json, as real umT5 and Llama-3 directories ship
    theirs) whose post-processor adds ``single``'s special tokens around each text."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Many placeholders, so that {} becomes one token as in Llama-3's vocabulary.
    corpus = [HUNYUAN_VIDEO_PROMPT_TEMPLATE, *CAPTIONS] * 8 + ["{}"] * 64
    bpe.train_from_iterator(corpus, trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(token, specials.index(token)) for token in specials]
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **special_roles)


def umt5_like_tokenizer() -> PreTrainedTokenizerFast:
    """T5's convention: </s> after every text, <pad> for padding."""
    return byte_bpe_tokenizer(
        ["<pad>", "</s>", "<unk>"], "$A </s>", pad_token="<pad>", eos_token="</s>"
    )


def llama3_like_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-3's special tokens: <|begin_of_text|> in front of every text, no end token, and
    "{}" and <|eot_id|> one token each, so the pipeline's own crop_start count (the template's
    tokens less 2) applies."""
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    return byte_bpe_tokenizer(
        specials,
        "<|begin_of_text|> $A",
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
    )


def save_model(encoder: TextEncoder, tokenizer, directory: Path) -> Path:
    encoder.model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    encoder = TextEncoder(dataclasses.replace(TINY, architecture="umt5"))
    return save_model(encoder, umt5_like_tokenizer(), tmp_path_factory.mktemp("umt5"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    encoder = TextEncoder(dataclasses.replace(TINY, architecture="llama", crop_start=-1))
    return save_model(encoder, llama3_like_tokenizer(), tmp_path_factory.mktemp("llama"))


def wan_pipeline_embeds(encoder: TextEncoder, captions: list[str], length: int) -> torch.Tensor:
    pipe = SimpleNamespace(tokenizer=encoder.tokenizer, text_encoder=encoder.model)
    return WanPipeline._get_t5_prompt_embeds(
        pipe, captions, max_sequence_length=length, device=CPU, dtype=torch.float32
    )


def hunyuan_pipeline_embeds(
    encoder: TextEncoder, captions: list[str], crop_start: int | None, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    pipe = SimpleNamespace(tokenizer=encoder.tokenizer, text_encoder=encoder.model)
    template = {"template": HUNYUAN_VIDEO_PROMPT_TEMPLATE, "crop_start": crop_start}
    embeds, mask = HunyuanVideoPipeline._get_llama_prompt_embeds(
        pipe, captions, template, device=CPU, dtype=torch.float32, max_sequence_length=length
    )
    return embeds, mask.bool()


def assert_matches_padded_reference(got, mask, reference, reference_mask) -> None:
    """Ours pads to the batch's longest, the pipelines to max_length: the extra columns are
    padding; the pipeline leaves Llama's states at padding, this encoder zeroes them."""
    length = got.shape[1]
    assert torch.equal(mask, reference_mask[:, :length])
    assert not reference_mask[:, length:].any()
    expected = reference[:, :length] * reference_mask[:, :length, None]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_template_is_the_hunyuan_video_pipelines():
    assert HUNYUAN_VIDEO_PROMPT_TEMPLATE == DEFAULT_PROMPT_TEMPLATE["template"]
    assert TextEncoderConfig().crop_start == DEFAULT_PROMPT_TEMPLATE["crop_start"] == 95
    assert TextEncoderConfig().hidden_layers_to_skip == 2


@pytest.mark.parametrize(
    ("architecture", "model_class", "lengths"),
    [
        # Byte tokens plus the end token; the third caption is cut at max_length.
        ("t5", T5EncoderModel, [12, 3, 16]),
        ("umt5", UMT5EncoderModel, [12, 3, 16]),
        # Caption bytes, the template's closing <|eot_id|> (10 bytes), the end token: 2 + 11
        # for "hi", the others cut at max_length.
        ("llama", LlamaModel, [16, 13, 16]),
    ],
)
def test_random_init_builds_each_architecture(architecture, model_class, lengths):
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, architecture=architecture, crop_start=-1)
    encoder = TextEncoder(cfg).eval()
    with torch.no_grad():
        embeddings, mask = encoder(CAPTIONS)
    assert type(encoder.model) is model_class and encoder.dim == 32
    assert mask.dtype == torch.bool and mask.sum(dim=1).tolist() == lengths
    assert embeddings.shape == (3, max(lengths), 32) and embeddings.isfinite().all()
    assert torch.count_nonzero(embeddings[~mask]) == 0
    assert torch.count_nonzero(embeddings[mask].abs().sum(-1)) == sum(lengths)


def test_umt5_dir_matches_wan_pipeline(umt5_dir):
    cfg = dataclasses.replace(TINY, architecture="umt5", pretrained=str(umt5_dir))
    encoder = TextEncoder(cfg).eval()
    assert type(encoder.model) is UMT5EncoderModel
    with torch.no_grad():
        got, mask = encoder(CAPTIONS)
        reference = wan_pipeline_embeds(encoder, CAPTIONS, cfg.max_length)
    # The pipeline zeroes past each caption's length, so its mask is its nonzero rows.
    reference_mask = reference.abs().sum(-1) > 0
    assert reference.shape[1] == cfg.max_length
    assert_matches_padded_reference(got, mask, reference, reference_mask)


def test_random_init_llama_crops_the_template_bytes_as_the_pipeline_does():
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, architecture="llama", crop_start=-1)
    encoder = TextEncoder(cfg).eval()
    # Byte-level tokens and no start token: the template's bytes before {} are cropped.
    assert encoder.crop_start == len(TEMPLATE_PREFIX.encode())
    with torch.no_grad():
        got, mask = encoder(CAPTIONS)
        reference, reference_mask = hunyuan_pipeline_embeds(
            encoder, CAPTIONS, encoder.crop_start, cfg.max_length
        )
    assert_matches_padded_reference(got, mask, reference, reference_mask)


def test_llama_dir_matches_hunyuan_pipeline(llama_dir):
    cfg = dataclasses.replace(
        TINY, architecture="llama", pretrained=str(llama_dir), crop_start=None
    )
    encoder = TextEncoder(cfg).eval()
    assert type(encoder.model) is LlamaModel
    tokenizer = encoder.tokenizer
    assert tokenizer.tokenize("{}") == ["{}"]
    template_ids = tokenizer(HUNYUAN_VIDEO_PROMPT_TEMPLATE)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(template_ids[:1] + template_ids[-1:]) == [
        "<|begin_of_text|>",
        "<|eot_id|>",
    ]
    assert encoder.crop_start == len(template_ids) - 2
    with torch.no_grad():
        got, mask = encoder(CAPTIONS)
        # crop_start=None: the pipeline counts the template's tokens itself.
        reference, reference_mask = hunyuan_pipeline_embeds(encoder, CAPTIONS, None, cfg.max_length)
    assert_matches_padded_reference(got, mask, reference, reference_mask)
    # What is left of each row starts with the caption's first token.
    ids, _ = encoder.tokenize(CAPTIONS)
    for row, caption in zip(ids, CAPTIONS, strict=True):
        caption_ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        assert row[encoder.crop_start] == caption_ids[0]


def test_pipeline_directory_uses_its_text_encoder_and_tokenizer(umt5_dir, tmp_path):
    model = UMT5EncoderModel.from_pretrained(umt5_dir)
    model.save_pretrained(tmp_path / "text_encoder")
    direct = TextEncoder(dataclasses.replace(TINY, architecture="umt5", pretrained=str(umt5_dir)))
    direct.tokenizer.save_pretrained(tmp_path / "tokenizer")
    nested = TextEncoder(dataclasses.replace(TINY, architecture="umt5", pretrained=str(tmp_path)))
    with torch.no_grad():
        assert torch.equal(nested.eval()(CAPTIONS)[0], direct.eval()(CAPTIONS)[0])


@pytest.mark.parametrize(
    ("directory", "architecture", "fix"),
    [
        ("umt5_dir", "t5", "architecture=umt5"),
        ("llama_dir", "umt5", "architecture=llama"),
        ("umt5_dir", "llama", "architecture=umt5"),
    ],
)
def test_directory_of_another_model_type_is_refused(directory, architecture, fix, request):
    path = request.getfixturevalue(directory)
    cfg = dataclasses.replace(TINY, architecture=architecture, pretrained=str(path))
    with pytest.raises(ValueError, match=f"model_type.*model.text_encoder.{fix}"):
        TextEncoder(cfg)


def test_unknown_architecture_and_bad_llama_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="architecture='bert'.*'llama', 't5', 'umt5'"):
        TextEncoder(dataclasses.replace(TINY, architecture="bert"))
    llama = dataclasses.replace(TINY, architecture="llama")
    with pytest.raises(ValueError, match="prompt_template must hold"):
        TextEncoder(dataclasses.replace(llama, prompt_template="no placeholder"))
    with pytest.raises(ValueError, match="crop_start=9999 crops the whole"):
        TextEncoder(dataclasses.replace(llama, crop_start=9999))
    with pytest.raises(ValueError, match="hidden_layers_to_skip=4"):
        TextEncoder(dataclasses.replace(llama, hidden_layers_to_skip=4))
    with pytest.raises(FileNotFoundError, match="text_encoder.pretrained=.*no config.json"):
        TextEncoder(dataclasses.replace(llama, pretrained=str(tmp_path)))
