from __future__ import annotations

from omni_train.trainer import checkpoint as ckpt


def _save(root, step, payload="x", **meta):
    staging = ckpt.staging_dir(root, step)
    staging.mkdir(parents=True)
    (staging / "weights.bin").write_text(payload)
    return ckpt.publish(staging, {"step": step, **meta})


def test_only_published_checkpoints_are_found_newest_last(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    # A save killed before publishing leaves a staging folder only.
    crashed = ckpt.staging_dir(tmp_path, 30)
    crashed.mkdir()
    (crashed / "weights.bin").write_text("partial")
    # A final-named folder without the marker (e.g. copied by hand) is not complete either.
    (tmp_path / ckpt.checkpoint_name(40)).mkdir()
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [10, 20]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000020"
    assert ckpt.read_meta(ckpt.latest_checkpoint(tmp_path)) == {"step": 20}


def test_clear_staging_removes_unfinished_saves_only(tmp_path):
    _save(tmp_path, 10)
    ckpt.staging_dir(tmp_path, 20).mkdir()
    removed = ckpt.clear_staging(tmp_path)
    assert [p.name for p in removed] == [".staging_step_00000020"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000010"]


def test_republishing_a_step_replaces_it(tmp_path):
    _save(tmp_path, 10, "old")
    final = _save(tmp_path, 10, "new")
    assert (final / "weights.bin").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000010"]


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
    removed = ckpt.prune(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["step_00000001", "step_00000002"]
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [3, 4]
    assert ckpt.prune(tmp_path, keep_last=0) == []


def test_prune_never_deletes_a_pinned_checkpoint_nor_counts_it(tmp_path):
    _save(tmp_path, 0, pinned=True)  # trainer.save_at_start's untrained weights
    for step in (3, 6, 9):
        _save(tmp_path, step, pinned=False)
    removed = ckpt.prune(tmp_path, keep_last=1)
    assert [p.name for p in removed] == ["step_00000003", "step_00000006"]
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [0, 9]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000009"
    assert ckpt.prune(tmp_path, keep_last=1) == []


def test_no_checkpoint_in_missing_folder(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path / "absent") is None
