"""inference=sam3_video: predict's masklets equal those of sam3's own video session on the same weights and video.

The reference is sam3's `Sam3VideoPredictor` session API (start_session on a folder of the
video's JPEG frames, a text prompt on frame 0, propagate forward), holding the same tiny video
model. Random weights detect nothing and track nothing, so the model is biased to detect, keep
its tracks and re-condition them (`lively_model`); the settings make hot-start remove tracks and
the tracker's memory windows short, so `trim_state` drops frames within the video. A control run
whose memory is cut shows that the masklets depend on the memory trim_state keeps.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sam3_core import storage
from sam3_core.data.frames import FrameReader
from sam3_core.data.prep import DataPrepConfig, PreparedDataset, prepare_dataset
from sam3_core.data.synthetic import SyntheticConfig
from sam3_core.errors import ConfigError
from sam3_core.mlflow_records.settings import MlflowConfig
from sam3_core.model.checkpoint import save_checkpoint
from sam3_core.model.config import ModelConfig, TrackerConfig
from sam3_core.model.tracker import VideoInferenceConfig, build_video_model, inference_context
from sam3_core.predict import sam3_video
from sam3_core.predict.postprocess import encode_mask
from sam3_core.predict.predictor import PredictConfig, PredictDataConfig, PredictOutputConfig, predict
from sam3_core.predict.sam3_video import (
    Masklet,
    Sam3VideoConfig,
    StreamedFrames,
    frame_tensor,
    prompt_masklets,
    ytvis_results,
)

CATEGORIES = ["red circle", "blue square"]
VIDEO = SyntheticConfig(
    num_videos=2,
    frames_per_video=16,
    height=64,
    width=80,
    min_objects=2,
    max_objects=2,
    categories=CATEGORIES,
    min_size=16,
    max_size=28,
    max_speed=3.0,
)
# the tiny preset with memory windows short enough for trim_state to drop frames within 16
MODEL = ModelConfig(tracker=TrackerConfig(num_maskmem=5, max_obj_ptrs_in_encoder=6, max_cond_frames_in_attn=2))
# low thresholds for random weights; hot-start removes a track; tracks re-conditioned every other frame
HEURISTICS = VideoInferenceConfig(
    score_threshold_detection=0.1,
    new_det_thresh=0.1,
    det_nms_thresh=0.7,
    assoc_iou_thresh=0.9,
    hotstart_delay=4,
    hotstart_unmatch_thresh=2,
    hotstart_dup_thresh=2,
    recondition_every_nth_frame=2,
)


def lively_model(model_cfg: ModelConfig, heuristics: VideoInferenceConfig) -> torch.nn.Module:
    """The tiny video model, biased so that random weights detect confidently and keep their tracks."""
    model = build_video_model(model_cfg, heuristics)
    with torch.no_grad():
        model.tracker.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(2.0)
        model.detector.transformer.decoder.presence_token_head.layers[-1].bias.fill_(5.0)
        model.detector.dot_prod_scoring.prompt_proj.weight.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def video_dataset(tmp_path_factory) -> PreparedDataset:
    store = tmp_path_factory.mktemp("sam3-video-store")
    return prepare_dataset(DataPrepConfig(source="synthetic", synthetic=VIDEO, store=str(store), val_fraction=0.5))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, torch_single_thread: None) -> str:
    """The biased model's weights, flat in SAM3's layout, as an exported checkpoint is."""
    uri = str(tmp_path_factory.mktemp("sam3-video-ckpt") / "video.pt")
    save_checkpoint(lively_model(MODEL, HEURISTICS).state_dict(), uri, step=0)
    return uri


@pytest.fixture(scope="module")
def frame_folder(video_dataset, tmp_path_factory) -> tuple[Path, Any]:
    """The validation video's frames as sam3's session reads them: a folder of <index>.<ext>."""
    reader = FrameReader(video_dataset.uri)
    (video,) = reader.dataset("val").videos
    folder = tmp_path_factory.mktemp("frames")
    for index, name in enumerate(video.file_names):
        shutil.copy(reader.local_path(name), folder / f"{index:05d}{Path(name).suffix}")
    return folder, video


def sam3_session(model: Any, folder: Path, prompt: str) -> tuple[dict[int, dict[int, dict]], dict[str, Any]]:
    """Object id -> frame -> RLE from sam3's own session API on `folder`, and the session's final state."""
    from sam3.model.sam3_video_predictor import Sam3VideoPredictor

    session = object.__new__(Sam3VideoPredictor)
    session.model, session.async_loading_frames, session.video_loader_type = model, False, "cv2"
    masks: dict[int, dict[int, dict]] = {}
    with inference_context(torch.device("cpu")):
        session_id = session.handle_request({"type": "start_session", "resource_path": str(folder)})["session_id"]
        session.handle_request({"type": "add_prompt", "session_id": session_id, "frame_index": 0, "text": prompt})
        request = {"type": "propagate_in_video", "session_id": session_id, "propagation_direction": "forward"}
        for response in session.handle_stream_request(request):
            outputs = response["outputs"]
            for obj_id, mask in zip(outputs["out_obj_ids"].tolist(), outputs["out_binary_masks"]):
                masks.setdefault(int(obj_id), {})[response["frame_index"]] = encode_mask(torch.from_numpy(mask))
        state = session._ALL_INFERENCE_STATES[session_id]["state"]
        session.handle_request({"type": "close_session", "session_id": session_id})
    return masks, state


def reference_results(model: Any, folder: Path, video: Any) -> list[dict]:
    """YTVIS results of sam3's session, one prompt per category, as predict writes them."""
    results = []
    for category_id, prompt in enumerate(CATEGORIES, start=1):
        masks, state = sam3_session(model, folder, prompt)
        scores = state["tracker_metadata"]["obj_id_to_score"]
        masklets = [Masklet(float(scores[obj_id]), masks[obj_id]) for obj_id in sorted(masks)]
        results.extend(ytvis_results(masklets, video.id, category_id, video.length))
    return results


def comparable(results: list[dict]) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in results)


def our_masklets(model: Any, reader: FrameReader, video: Any, prompt: str, length: int = 0) -> dict[int, Masklet]:
    """Our masklets for `prompt`; with `length`, over the video played back and forth for that many frames."""
    period = 2 * video.length - 2

    def frame(t: int) -> Image.Image:
        return reader.image(video.file_names[min(t % period, period - t % period)])

    frames = StreamedFrames(frame, length or video.length, MODEL.image_size)
    with inference_context(torch.device("cpu")):
        return prompt_masklets(model, frames, video.height, video.width, prompt)


@pytest.fixture(scope="module")
def reference(checkpoint, frame_folder) -> list[dict]:
    folder, video = frame_folder
    return reference_results(lively_model(MODEL, HEURISTICS), folder, video)


@pytest.mark.integration
def test_predicted_masklets_equal_those_of_sam3s_own_video_session(
    video_dataset, checkpoint, reference, tmp_path
) -> None:
    config = PredictConfig(
        inference="sam3_video",
        model=replace(MODEL, uri=checkpoint),
        data=PredictDataConfig(uri=video_dataset.uri),
        sam3_video=Sam3VideoConfig(heuristics=HEURISTICS),
        output=PredictOutputConfig(uri=str(tmp_path)),
        mlflow=MlflowConfig(enabled=False),
    )
    predict(config)
    assert comparable(storage.read_json(str(tmp_path / "video_predictions.json"))) == comparable(reference)


@pytest.mark.integration
def test_the_reference_run_tracks_removes_and_reconditions(frame_folder) -> None:
    """What makes the parity worth having: several long masklets, a track removed by hot-start, re-prompted tracks."""
    folder, _ = frame_folder
    masks, state = sam3_session(lively_model(MODEL, HEURISTICS), folder, CATEGORIES[0])
    scores = state["tracker_metadata"]["obj_id_to_score"]
    conditioning = [len(s["output_dict"]["cond_frame_outputs"]) for s in state["tracker_inference_states"]]
    assert len(masks) >= 3 and max(len(by_frame) for by_frame in masks.values()) >= 12
    assert any(score < -1 for score in scores.values())  # sam3 marks removed tracks with -1e4
    assert max(conditioning) > MODEL.tracker.max_cond_frames_in_attn


@pytest.mark.integration
def test_masklets_change_when_the_memory_trim_state_keeps_is_cut(video_dataset, frame_folder, monkeypatch) -> None:
    """The control: the parity above depends on the frames trim_state keeps, so dropping them all shows."""
    _, video = frame_folder
    model = lively_model(MODEL, HEURISTICS)
    reader = FrameReader(video_dataset.uri)
    kept = our_masklets(model, reader, video, CATEGORIES[0])

    trim = sam3_video._trim_tracker_state

    def cut(tracker: Any, state: dict[str, Any], frame: int, horizon: int) -> None:
        trim(tracker, state, frame, horizon)
        for i in [i for i in state["output_dict"]["non_cond_frame_outputs"] if i < frame]:
            del state["output_dict"]["non_cond_frame_outputs"][i]
            for per_object in state["output_dict_per_obj"].values():
                per_object["non_cond_frame_outputs"].pop(i, None)

    monkeypatch.setattr(sam3_video, "_trim_tracker_state", cut)
    assert {k: m.rles for k, m in our_masklets(model, reader, video, CATEGORIES[0]).items()} != {
        k: m.rles for k, m in kept.items()
    }


def _frame_entries(state: dict[str, Any]) -> dict[str, int]:
    """How many frames the session state holds something for: tracker outputs (the most of any
    tracker state), output masks, per-frame scores."""
    tracker_states = state["tracker_inference_states"]
    outputs = [s["output_dict"] for s in tracker_states]
    return {
        "tracked": max((len(o["non_cond_frame_outputs"]) + len(o["cond_frame_outputs"]) for o in outputs), default=0),
        "cached_outputs": len(state["cached_frame_outputs"]),
        "frame_scores": len(state["tracker_metadata"].get("obj_id_to_tracker_score_frame_wise", {})),
    }


@pytest.mark.integration
def test_the_session_state_holds_a_bounded_number_of_frames_where_sam3s_holds_them_all(
    video_dataset, frame_folder, monkeypatch
) -> None:
    folder, video = frame_folder
    model = lively_model(MODEL, HEURISTICS)
    held: list[dict[str, int]] = []
    trim = sam3_video.trim_state

    def trim_and_count(model: Any, state: dict[str, Any], frame: int) -> None:
        trim(model, state, frame)
        held.append(_frame_entries(state))

    monkeypatch.setattr(sam3_video, "trim_state", trim_and_count)
    length = 3 * video.length
    our_masklets(model, FrameReader(video_dataset.uri), video, CATEGORIES[0], length)
    tracker = MODEL.tracker
    # the memory window and the frames held back by hot-start, the selectable frames, the conditioning frames
    bound = max(tracker.num_maskmem, tracker.max_obj_ptrs_in_encoder) + HEURISTICS.hotstart_delay - 1
    bound += tracker.max_obj_ptrs_in_encoder + tracker.max_cond_frames_in_attn
    assert max(h["tracked"] for h in held) <= bound < length
    assert max(h["cached_outputs"] + h["frame_scores"] for h in held) <= 2 * HEURISTICS.hotstart_delay
    _, theirs = sam3_session(model, folder, CATEGORIES[0])
    assert _frame_entries(theirs) == {
        "tracked": video.length,
        "cached_outputs": video.length,
        "frame_scores": video.length,
    }


def test_a_frame_is_the_tensor_sam3s_video_loader_makes(tmp_path) -> None:
    from sam3.model.io_utils import load_video_frames

    from sam3_core.model import cpu_compat

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    image.save(tmp_path / "00000.jpg", quality=95)
    with cpu_compat.cuda_calls_on_cpu():
        theirs, height, width = load_video_frames(str(tmp_path), image_size=112, offload_video_to_cpu=True)
    ours = frame_tensor(Image.open(tmp_path / "00000.jpg"), 112)
    assert (height, width) == (37, 53)
    assert ours.dtype == theirs.dtype == torch.float16
    assert torch.equal(ours, theirs[0])


def test_streamed_frames_are_decoded_once_while_cached_and_only_the_last_few_are_kept() -> None:
    decoded: list[int] = []

    def load(index: int) -> Image.Image:
        decoded.append(index)
        return Image.new("RGB", (20, 10), (index, 0, 0))

    frames = StreamedFrames(load, 10, 28, keep=2)
    for index in (0, 0, 1, 0, 2, 0, 1):
        frames[index]
    assert decoded == [0, 1, 2, 1]
    assert len(frames) == 10
    with pytest.raises(IndexError):
        frames[10]


def test_the_streaming_state_has_the_keys_of_sam3s_own_session_state(tmp_path) -> None:
    from sam3_core.model import cpu_compat

    Image.new("RGB", (20, 10)).save(tmp_path / "00000.jpg")
    model = build_video_model(MODEL)
    with cpu_compat.cuda_calls_on_cpu():
        theirs = model.init_state(str(tmp_path))
    ours = sam3_video.streaming_state(model, StreamedFrames(lambda t: Image.new("RGB", (20, 10)), 1, 112), 10, 20)
    assert set(ours) == set(theirs)
    assert set(ours["constants"]) == set(theirs["constants"])
    assert (ours["orig_height"], ours["orig_width"], ours["num_frames"]) == (10, 20, 1)


def test_find_stages_share_the_text_id_sam3_writes_on_every_frame() -> None:
    stages = sam3_video._FindStages(3, torch.device("cpu"))
    stages[0].text_ids[...] = 1
    assert [int(stages[i].text_ids) for i in range(3)] == [1, 1, 1]
    assert [int(stages[i].img_ids) for i in range(3)] == [0, 1, 2]


@pytest.mark.parametrize(("key", "value"), [("parallel", "gpus")])
def test_a_bad_sam3_video_value_is_refused_naming_its_key(key, value) -> None:
    with pytest.raises(ConfigError, match=f"sam3_video.{key}"):
        Sam3VideoConfig(**{key: value})


def test_an_unknown_inference_mode_is_refused() -> None:
    with pytest.raises(ConfigError, match="inference"):
        PredictConfig(inference="tracked", data=PredictDataConfig(uri="unused"))
