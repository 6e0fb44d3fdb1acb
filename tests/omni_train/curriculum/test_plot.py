from __future__ import annotations

import pytest

from omni_train.curriculum.plot import main, schedule_table

pytest.importorskip("matplotlib")


def test_plot_writes_a_png_and_prints_the_stage_table(tmp_path, capsys):
    out = tmp_path / "schedule.png"
    code = main(
        [
            f"out={out}",
            "experiment=smoke",
            "curriculum.stages.1.ratios.audio=0.1",
            "curriculum.stages.1.ramp_steps.audio=5",
        ]
    )
    assert code == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    printed = capsys.readouterr().out
    assert "2 audio" in printed and "20-39" in printed and "0.10/0.00" in printed


def test_plot_refuses_an_invalid_curriculum(tmp_path, capsys):
    code = main(
        [f"out={tmp_path / 'x.png'}", "experiment=smoke", "curriculum.stages.1.ratios.pose=2"]
    )
    assert code == 2 and "stages.1.ratios.pose" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_schedule_table_clips_stages_to_the_plotted_steps():
    from omni_train.curriculum import CurriculumConfig

    rows = schedule_table(CurriculumConfig(), 30_000)
    assert [(r["first"], r["last"]) for r in rows] == [(0, 19_999), (20_000, 29_999)]
    assert rows[1]["audio_strong"] == 0.5 and rows[1]["audio_weak"] == 0.0
