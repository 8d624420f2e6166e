"""Checkpoints are staged in the system temp folder and uploaded from there: nothing stays behind."""

from __future__ import annotations

from pathlib import Path

from sam3_core.model import checkpoint
from sam3_core.model.checkpoint import load_checkpoint, publish_checkpoint, save_checkpoint, stage_checkpoint


def test_a_saved_checkpoint_leaves_no_staging_folder_in_the_temp_folder(tmp_path: Path) -> None:
    uri = str(tmp_path / "run" / "last.pt")
    save_checkpoint({"step": 3}, uri, step=3)
    assert load_checkpoint(uri) == {"step": 3}
    assert not checkpoint.staging_dir(str(tmp_path / "run")).exists()


def test_the_folder_stays_while_another_checkpoint_is_staged_in_it(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    first = stage_checkpoint({"step": 1}, str(folder / "step_1.pt"), step=1)
    second = stage_checkpoint({"step": 2}, str(folder / "step_2.pt"), step=2)
    publish_checkpoint(first)
    assert second.path.exists()
    publish_checkpoint(second)
    assert not checkpoint.staging_dir(str(folder)).exists()
