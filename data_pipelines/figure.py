"""A human-like figure: joint angles -> COCO-17 keypoints (forward kinematics) -> pixels.

Lengths are fractions of the figure's height. Angles are in radians; a limb angle of 0
points straight down and positive angles point away from the body's midline, so raising
both arms is the same number on either side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_pipelines.drawing import Canvas, Color

COCO17_JOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
J = {name: index for index, name in enumerate(COCO17_JOINTS)}

HEAD_RADIUS = 0.075
SHOULDER_HALF_WIDTH = 0.12
HIP_HALF_WIDTH = 0.07
TORSO = 0.30
NECK = 0.04
UPPER_ARM, FOREARM = 0.16, 0.15
THIGH, SHIN = 0.23, 0.22


@dataclass(frozen=True)
class FigureStyle:
    skin: Color
    shirt: Color
    pants: Color
    hair: Color


@dataclass(frozen=True)
class PoseAngles:
    """One frame of the figure: where it stands, how tall it is and its joint angles."""

    center_x: float  # pixels
    ground_y: float  # pixels: the lower foot rests here
    height: float  # pixels, head top to ankles when standing
    lean: float = 0.0  # upper-body rotation about the pelvis (+ = towards image right)
    head_tilt: float = 0.0
    shoulder: tuple[float, float] = (0.15, 0.15)  # (figure's left, figure's right)
    elbow: tuple[float, float] = (0.1, 0.1)
    hip: tuple[float, float] = (0.05, 0.05)
    knee: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Body:
    """Pixel positions: the 17 COCO joints plus the points only the drawing needs."""

    joints: np.ndarray  # (17, 2)
    neck: np.ndarray
    head_center: np.ndarray
    head_radius: float


def _direction(angle: float, side: float) -> np.ndarray:
    return np.array([side * np.sin(angle), np.cos(angle)], np.float32)


def _rotate(points: np.ndarray, pivot: np.ndarray, angle: float) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    rel = points - pivot
    return pivot + rel @ np.array([[cos, sin], [-sin, cos]], np.float32)


def pose_body(pose: PoseAngles) -> Body:
    """Forward kinematics. The figure faces the camera: its left side is image right (+x)."""
    h = pose.height
    sides = {"left": 1.0, "right": -1.0}
    joints = np.zeros((17, 2), np.float32)
    # Legs first, relative to a pelvis at the origin, so the lower foot can touch the ground.
    for index, (name, side) in enumerate(sides.items()):
        hip = np.array([side * HIP_HALF_WIDTH * h, 0.0], np.float32)
        knee = hip + THIGH * h * _direction(pose.hip[index], side)
        ankle = knee + SHIN * h * _direction(pose.hip[index] + pose.knee[index], side)
        joints[J[f"{name}_hip"]], joints[J[f"{name}_knee"]] = hip, knee
        joints[J[f"{name}_ankle"]] = ankle
    lowest_foot = joints[[J["left_ankle"], J["right_ankle"]], 1].max()
    pelvis = np.array([pose.center_x, pose.ground_y - lowest_foot], np.float32)
    joints += pelvis

    # Upper body, upright, then leaned about the pelvis.
    shoulder_y = pelvis[1] - TORSO * h
    neck = np.array([pelvis[0], shoulder_y - NECK * h], np.float32)
    radius = HEAD_RADIUS * h
    head = neck + _rotate(np.array([[0.0, -radius]], np.float32), np.zeros(2), pose.head_tilt)[0]
    for index, (name, side) in enumerate(sides.items()):
        shoulder = np.array([pelvis[0] + side * SHOULDER_HALF_WIDTH * h, shoulder_y], np.float32)
        elbow = shoulder + UPPER_ARM * h * _direction(pose.shoulder[index], side)
        wrist = elbow + FOREARM * h * _direction(pose.shoulder[index] + pose.elbow[index], side)
        joints[J[f"{name}_shoulder"]], joints[J[f"{name}_elbow"]] = shoulder, elbow
        joints[J[f"{name}_wrist"]] = wrist
        joints[J[f"{name}_eye"]] = head + side * np.array([0.38 * radius, 0.0]) - [0, 0.15 * radius]
        joints[J[f"{name}_ear"]] = head + side * np.array([0.95 * radius, 0.0]) - [0, 0.05 * radius]
    joints[J["nose"]] = head + np.array([0.0, 0.12 * radius])
    face = [J[n] for n in COCO17_JOINTS[:5]]
    joints[face] = _rotate(joints[face], head, pose.head_tilt)

    upper = [J[n] for n in COCO17_JOINTS[:11]]
    joints[upper] = _rotate(joints[upper], pelvis, pose.lean)
    neck, head = _rotate(np.stack([neck, head]), pelvis, pose.lean)
    return Body(joints=joints, neck=neck, head_center=head, head_radius=float(radius))


def draw_figure(canvas: Canvas, body: Body, style: FigureStyle, mouth_open: float) -> None:
    """Paint the figure back to front; ``mouth_open`` in [0, 1] sets the mouth height."""
    j, r = body.joints, body.head_radius
    limb = 0.35 * r
    for side in ("left", "right"):
        canvas.capsule(j[J[f"{side}_hip"]], j[J[f"{side}_knee"]], limb * 1.25, style.pants)
        canvas.capsule(j[J[f"{side}_knee"]], j[J[f"{side}_ankle"]], limb * 1.1, style.pants)
    torso = j[[J["left_shoulder"], J["right_shoulder"], J["right_hip"], J["left_hip"]]]
    canvas.convex_polygon(torso, style.shirt)
    canvas.capsule(j[J["left_shoulder"]], j[J["right_shoulder"]], limb, style.shirt)
    canvas.capsule(
        body.neck, (j[J["left_shoulder"]] + j[J["right_shoulder"]]) / 2, limb, style.skin
    )
    for side in ("left", "right"):
        canvas.capsule(j[J[f"{side}_shoulder"]], j[J[f"{side}_elbow"]], limb, style.shirt)
        canvas.capsule(j[J[f"{side}_elbow"]], j[J[f"{side}_wrist"]], limb * 0.85, style.skin)
        canvas.ellipse(j[J[f"{side}_wrist"]], limb * 1.2, limb * 1.2, style.skin)
    head = body.head_center
    canvas.ellipse(head - [0, 0.35 * r], 1.02 * r, 0.75 * r, style.hair)
    canvas.ellipse(head, 0.92 * r, r, style.skin)
    for side in ("left", "right"):
        canvas.ellipse(j[J[f"{side}_eye"]], 0.14 * r, 0.16 * r, (25.0, 25.0, 35.0))
    mouth = j[J["nose"]] + (j[J["nose"]] - head) * 3.2
    canvas.ellipse(
        mouth, 0.32 * r, 0.06 * r + 0.3 * r * float(np.clip(mouth_open, 0, 1)), (95.0, 20.0, 35.0)
    )


def visible_keypoints(body: Body, width: int, height: int) -> list[list[float]]:
    """COCO-17 [x, y, visibility] normalised to the frame; joints outside it are [0, 0, 0]."""
    rows = []
    for x, y in body.joints:
        if 0.0 <= x < width and 0.0 <= y < height:
            rows.append([round(float(x) / width, 4), round(float(y) / height, 4), 1.0])
        else:
            rows.append([0.0, 0.0, 0.0])
    return rows
