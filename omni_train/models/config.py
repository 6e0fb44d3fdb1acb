"""Model configuration: the sizes of every part, and where pretrained weights come from.

Every default lives here once; conf/model/*.yaml select a preset by overriding fields.
An empty ``pretrained`` means random initialisation from the sizes given (tests, smoke runs);
a local path loads real weights (no hub access is assumed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class VAEConfig:
    # Dotted path of another VAE's builder, called with this config (omni_train/models/adapters.py);
    # "" = this project's CausalVAE. conf/model.vae/*.yaml (model.vae=wan|hunyuan_video|cogvideox)
    # set it to a diffusers VAE's builder in omni_train/models/foundation_vae.py.
    _target_: str = ""
    # A safetensors file with this VAE's state dict; "" = random init (frozen either way).
    # A diffusers VAE takes a local diffusers directory instead: the VAE's own (config.json and
    # weights) or a whole pipeline's, whose vae/ subfolder is used.
    pretrained: str = ""
    # Random-init diffusers VAE only: keyword arguments of its class that replace the defaults
    # (the released architecture), e.g. a tiny one for tests; a pretrained directory brings its
    # own config.
    diffusers_config: dict[str, Any] = field(default_factory=dict)
    in_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 16
    # Channel multiplier per resolution level; 4 levels -> 3 spatial halvings = 8x.
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 4])
    # Levels (0-based, among the first three) whose downsampling also halves time: 2 -> 4x time.
    temporal_down_levels: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    # latents = (posterior_mean - shift_factor) * scaling_factor
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    # Frames per encoder chunk when encoding long clips (1 + 4k); 0 = whole clip at once.
    chunk_frames: int = 0
    # A learnable linear codec of 4x8x8 pixel blocks next to the networks: the encoder's latent
    # mean adds a linear map of each latent's pixel block, the decoder's output a linear map of
    # the latent back to its block. It starts as block averaging and the networks as zero
    # residuals, so a short fit starts from a usable code (omni_train/models/README.md).
    # False = the plain networks, as before the knob existed.
    patch_shortcut: bool = False


# HunyuanVideo's prompt template (DEFAULT_PROMPT_TEMPLATE of diffusers'
# pipelines/hunyuan_video/pipeline_hunyuan_video.py): the caption replaces {}, and the
# text encoder's states of the tokens before it are cropped away (95 with its Llama-3 tokenizer).
HUNYUAN_VIDEO_PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following "
    "aspects: 1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)


@dataclass
class TextEncoderConfig:
    # Dotted path of another text encoder's builder, called with this config; "" = the
    # transformers model named by ``architecture``.
    _target_: str = ""
    # "t5": T5EncoderModel (T5, T5 v1.1, Flan-T5, mT5), last hidden state.
    # "umt5": UMT5EncoderModel (Wan's umT5-XXL; unlike T5 every layer has its own relative
    #   attention bias, so its weights must not be loaded as "t5"), last hidden state.
    # "llama": a decoder-only LlamaModel (HunyuanVideo's LLaVA-Llama-3-8B), the hidden states
    #   ``hidden_layers_to_skip`` layers below the last, of the caption inside
    #   ``prompt_template`` with the template's tokens cropped away.
    architecture: str = "t5"
    # A local directory usable by transformers' from_pretrained (model + tokenizer), or a
    # diffusers pipeline's, whose text_encoder/ and tokenizer/ are used; its config.json
    # model_type must fit ``architecture``. "" = random init from the sizes below with the
    # byte-level (ByT5) tokenizer.
    pretrained: str = ""
    d_model: int = 32
    num_layers: int = 2
    num_heads: int = 2
    d_kv: int = 16
    d_ff: int = 64
    # "relu" (original T5) or "gated-gelu" (T5 v1.1, umT5, Flan-T5): the random-init encoder's
    # feed-forward; a pretrained directory brings its own. "llama" always uses gated SiLU.
    feed_forward_proj: str = "relu"
    # Random-init "llama" only: key/value heads (grouped-query attention); 0 = num_heads.
    num_kv_heads: int = 0
    # Caption tokens kept ("llama": counted after the template's crop); captions pad to the
    # batch's longest.
    max_length: int = 64
    # "llama" only, as HunyuanVideoPipeline._get_llama_prompt_embeds takes them.
    prompt_template: str = HUNYUAN_VIDEO_PROMPT_TEMPLATE
    # Leading tokens cropped from the templated caption; None or -1 = count the tokenizer's
    # tokens of the template before {} (95 for the default template with Llama-3's tokenizer).
    crop_start: int | None = 95
    hidden_layers_to_skip: int = 2


@dataclass
class AudioEncoderConfig:
    # Dotted path of another audio encoder's builder, called with this config; "" = wav2vec2.
    _target_: str = ""
    # A local directory usable by transformers' Wav2Vec2Model.from_pretrained; "" = random init
    # from the sizes below (same 320-sample stride, 50 features per second at 16 kHz).
    pretrained: str = ""
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 64
    conv_dim: int = 32
    # Hidden states of the last N layers are concatenated into each feature (Hallo-style).
    feature_layers: int = 2
    sample_rate: int = 16_000

    @property
    def feature_dim(self) -> int:
        return self.hidden_size * self.feature_layers


@dataclass
class PoseGuiderConfig:
    # Heatmap channels: one per keypoint of the sample's skeleton (COCO-17 in the pipeline).
    num_keypoints: int = 17
    hidden_channels: int = 16
    out_channels: int = 4
    # Latent frames on each side whose features are stacked with a frame's own (paper §3.1).
    neighbor_frames: int = 1


@dataclass
class DiTConfig:
    hidden_size: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    patch_size: int = 2
    # Audio tokens of latent frame j: its own pixel frames plus this many on each side.
    audio_window: int = 2
    # Share of each head's dimension given to the (t, h, w) RoPE axes; must sum to head_dim.
    rope_axes: list[int] = field(default_factory=lambda: [4, 6, 6])
    rope_theta: float = 10_000.0
    # Recompute blocks in the backward pass instead of keeping their activations (memory for
    # compute); each checkpointed block keeps only its inputs. Works under ZeRO-3.
    gradient_checkpointing: bool = False
    # With gradient_checkpointing: checkpoint blocks 0, n, 2n, ... (1 = every block; 2 = half
    # of them, less recompute for more memory).
    checkpoint_every_n_blocks: int = 1
    # "auto" = flash-attn when importable on CUDA, else torch SDPA; "sdpa"; "flash".
    attention: str = "auto"


BACKBONE_FAMILIES = ("", "wan", "hunyuan_video")


@dataclass
class BackboneConfig:
    # Which transformer predicts the velocity. "" = this project's MMDiT, sized by `dit`;
    # "wan" = diffusers' WanTransformer3DModel (Wan 2.1/2.2, a cross-attention DiT);
    # "hunyuan_video" = diffusers' HunyuanVideoTransformer3DModel (dual- then single-stream
    # MMDiT). A family's omni-condition modules (audio cross-attention, pose guider, motion
    # frames, learned nulls) are added around the base with zero-initialised outputs.
    family: str = ""
    # Base weights. A family: a local diffusers directory (the transformer's own, as
    # save_pretrained writes it with sharded safetensors, or a whole pipeline's, whose
    # transformer/ is used). "": a safetensors file of this project's denoiser (e.g. a run's
    # model.safetensors). Empty = random init (tests, smoke runs).
    pretrained: str = ""
    # Random-init family only: keyword arguments of the diffusers class replacing its defaults
    # (the released 13B/14B shapes), e.g. a tiny one for tests; a pretrained directory brings
    # its own config.
    diffusers_config: dict[str, Any] = field(default_factory=dict)
    # HunyuanVideo's transformer is guidance-distilled: it takes the guidance scale as an
    # input (its pipeline's default guidance_scale is 6.0).
    embedded_guidance: float = 6.0


@dataclass
class ModelConfig:
    name: str = "tiny"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    audio_encoder: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    pose_guider: PoseGuiderConfig = field(default_factory=PoseGuiderConfig)
