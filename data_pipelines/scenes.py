"""What each sample-corpus clip shows: a plan per clip, and frames/keypoints drawn from it.

The clip kinds cycle in a fixed order so that even a few clips cover different quality
tiers: a silent clip, a nearly still one, a close-up with the legs out of frame (and no
caption), a soft-focus voice-over, and two with a hard cut (the background and the figure's place
jump). The seed picks colours, phases, textures and the voice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_pipelines.drawing import Canvas, Color, box_blur, smooth_noise
from data_pipelines.figure import FigureStyle, PoseAngles, draw_figure, pose_body, visible_keypoints


@dataclass(frozen=True)
class ClipKind:
    name: str
    width: int
    height: int
    seconds: float
    action: str  # for the caption
    speaking: bool = True
    cut_at: float | None = None  # seconds; a hard cut to a second scene
    blur: int = 0  # box-blur radius in pixels (soft focus)
    has_caption: bool = True
    lips_follow_voice: bool = True  # False: a voice-over, the figure's mouth stays shut


KINDS = (
    ClipKind("wave", 128, 96, 3.2, "waves both arms"),
    ClipKind("walk", 160, 120, 5.0, "walks across the room", speaking=False, cut_at=2.5),
    ClipKind("still", 96, 96, 2.6, "stands still"),
    ClipKind("closeup", 112, 144, 3.6, "gestures with both hands", has_caption=False),
    ClipKind("sway", 144, 112, 4.0, "sways from side to side", blur=2, lips_follow_voice=False),
    ClipKind("wave_one", 120, 160, 4.8, "waves one hand", cut_at=2.4),
)

SHIRTS = (("red", (200, 45, 45)), ("blue", (45, 75, 195)), ("green", (45, 150, 75)),
          ("yellow", (225, 190, 45)), ("purple", (135, 65, 165)), ("orange", (230, 125, 35)),
          ("white", (232, 232, 228)))  # fmt: skip
SKINS = ((238, 200, 170), (200, 150, 110), (150, 100, 70), (95, 65, 45))
PANTS = ((40, 45, 70), (60, 60, 60), (95, 70, 45), (30, 30, 35))
HAIRS = ((30, 25, 20), (90, 60, 30), (170, 140, 80), (60, 60, 60))
BACKDROPS = (("beige wall", (205, 190, 160), (170, 150, 120)),
             ("grey studio", (150, 155, 160), (110, 115, 125)),
             ("light blue wall", (160, 190, 215), (120, 150, 185)),
             ("green garden", (110, 160, 100), (70, 120, 70)),
             ("brick-coloured wall", (175, 105, 80), (135, 75, 60)))  # fmt: skip


@dataclass(frozen=True)
class Scene:
    """One shot's backdrop and where the figure stands in it."""

    texture: np.ndarray  # (H, W + margin) values in [0, 1]
    colors: tuple[Color, Color]
    floor: Color
    drift: float  # pixels per second
    center_x: float  # fraction of the width
    backdrop: str


@dataclass(frozen=True)
class ClipPlan:
    index: int
    name: str
    kind: ClipKind
    style: FigureStyle
    shirt: str
    scenes: tuple[Scene, ...]
    phase: float
    tempo: float  # gesture frequency in Hz

    @property
    def caption(self) -> str | None:
        if not self.kind.has_caption:
            return None
        voice = "while speaking" if self.kind.speaking else "in silence"
        if self.kind.speaking and not self.kind.lips_follow_voice:
            voice = "while a narrator speaks"
        article = "an" if self.shirt[0] in "aeiou" else "a"
        return (
            f"a person in {article} {self.shirt} shirt {self.kind.action} {voice} "
            f"in front of a {self.scenes[0].backdrop}"
        )


def plan_clip(index: int, seed: int) -> ClipPlan:
    kind = KINDS[index % len(KINDS)]
    rng = np.random.default_rng([seed, index])
    shirt, shirt_color = SHIRTS[int(rng.integers(len(SHIRTS)))]
    style = FigureStyle(
        skin=SKINS[int(rng.integers(len(SKINS)))],
        shirt=shirt_color,
        pants=PANTS[int(rng.integers(len(PANTS)))],
        hair=HAIRS[int(rng.integers(len(HAIRS)))],
    )
    backdrops = rng.permutation(len(BACKDROPS))[:2]
    scenes = tuple(
        _scene(rng, kind, BACKDROPS[int(b)], center_x)
        for b, center_x in zip(
            backdrops, (rng.uniform(0.35, 0.45), rng.uniform(0.58, 0.68)), strict=True
        )
    )
    return ClipPlan(
        index,
        f"clip{index:02d}_{kind.name}",
        kind,
        style,
        shirt,
        scenes,
        phase=float(rng.uniform(0, 2 * np.pi)),
        tempo=float(rng.uniform(0.9, 1.4)),
    )


def _scene(rng: np.random.Generator, kind: ClipKind, backdrop: tuple, center_x: float) -> Scene:
    name, near, far = backdrop
    margin = 48
    texture = 0.65 * smooth_noise(rng, kind.height, kind.width + margin, 5)
    texture += 0.35 * smooth_noise(rng, kind.height, kind.width + margin, 14)
    floor = tuple(0.55 * c for c in far)
    return Scene(texture, (near, far), floor, float(rng.uniform(3, 8)), center_x, name)


def scene_at(plan: ClipPlan, t: float) -> Scene:
    cut = plan.kind.cut_at
    return plan.scenes[1] if cut is not None and t >= cut else plan.scenes[0]


def pose_at(plan: ClipPlan, t: float) -> PoseAngles:
    """The figure's pose at time ``t`` (seconds) for the clip's kind of motion."""
    kind, w, h = plan.kind, plan.kind.width, plan.kind.height
    scene = scene_at(plan, t)
    wave = np.sin(2 * np.pi * plan.tempo * t + plan.phase)
    slow = np.sin(2 * np.pi * 0.35 * t + plan.phase)
    height, ground = 0.8 * h, 0.9 * h
    center = scene.center_x * w
    if kind.name == "wave":
        return PoseAngles(
            center,
            ground,
            height,
            lean=0.04 * slow,
            head_tilt=0.05 * slow,
            shoulder=(2.3 + 0.45 * wave, 2.3 - 0.45 * wave),
            elbow=(0.5 + 0.4 * wave, 0.5 - 0.4 * wave),
        )
    if kind.name == "walk":
        shot_start = 0.0 if scene is plan.scenes[0] else (kind.cut_at or 0.0)
        stride = np.sin(2 * np.pi * 1.6 * t + plan.phase)
        return PoseAngles(
            center + 12.0 * (t - shot_start) - 0.1 * w,
            ground,
            height,
            shoulder=(0.2 - 0.3 * stride, 0.2 + 0.3 * stride),
            elbow=(0.25, 0.25),
            hip=(0.05 + 0.3 * stride, 0.05 - 0.3 * stride),
            knee=(0.3 * max(0.0, -stride), 0.3 * max(0.0, stride)),
        )
    if kind.name == "still":
        return PoseAngles(center, ground, height, lean=0.008 * slow, shoulder=(0.12, 0.12))
    if kind.name == "closeup":
        big = 2.0 * h
        return PoseAngles(
            center,
            0.1 * h + 0.97 * big,
            big,
            lean=0.03 * slow,
            head_tilt=0.08 * wave,
            shoulder=(0.35 + 0.3 * wave, 0.35 - 0.3 * wave),
            elbow=(1.2 + 0.4 * wave, 1.2 - 0.4 * wave),
        )
    if kind.name == "sway":
        return PoseAngles(
            center + 4.0 * slow,
            ground,
            height,
            lean=0.14 * wave,
            shoulder=(0.5 + 0.2 * slow, 0.5 - 0.2 * slow),
            elbow=(0.6, 0.6),
        )
    # wave_one: the figure's right arm waves above the head, the left hangs.
    return PoseAngles(
        center,
        ground,
        height,
        head_tilt=0.04 * slow,
        shoulder=(0.15, 2.5 + 0.4 * wave),
        elbow=(0.1, 0.4 + 0.4 * wave),
    )


def render_frame(plan: ClipPlan, t: float, mouth_open: float) -> tuple[np.ndarray, list]:
    """One RGB uint8 frame and its COCO-17 keypoints at time ``t``."""
    kind, scene = plan.kind, scene_at(plan, t)
    w, h = kind.width, kind.height
    offset = scene.drift * t
    start, frac = int(offset), offset - int(offset)
    texture = (1 - frac) * scene.texture[:, start : start + w] + frac * scene.texture[
        :, start + 1 : start + 1 + w
    ]
    light = 1.0 + 0.04 * np.sin(2 * np.pi * 0.2 * t + plan.phase)
    near, far = (np.asarray(c, np.float32) for c in scene.colors)
    image = near + texture[..., None] * (far - near)
    horizon = int(0.78 * h)
    floor_weight = np.clip((np.arange(h) - horizon) / (0.1 * h), 0, 1)[:, None, None]
    image = (image * (1 - floor_weight) + np.asarray(scene.floor) * floor_weight) * light
    canvas = Canvas(image)
    body = pose_body(pose_at(plan, t))
    draw_figure(canvas, body, plan.style, mouth_open)
    frame = box_blur(canvas.image, kind.blur)
    return np.clip(frame + 0.5, 0, 255).astype(np.uint8), visible_keypoints(body, w, h)
