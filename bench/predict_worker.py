"""One rank of `bench predict`'s rank runs (under torchrun): the sam3_video predict loop over a dataset's val videos.

`python -m torch.distributed.run --nproc_per_node N -m bench.predict_worker <checkpoint> <dataset_uri>
<videos|frames> <heuristics JSON>`; rank 0 prints {"seconds", "masklets"}: the loop's time between
two barriers, after the model is built, and every masklet (as sorted JSON).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from sam3_core import comm, storage
from sam3_core.data.frames import FrameReader
from sam3_core.model.config import ModelConfig
from sam3_core.model.tracker import VideoInferenceConfig
from sam3_core.predict.sam3_video import Sam3VideoConfig, Sam3VideoRunner


def main(checkpoint: str, dataset_uri: str, parallel: str, heuristics: str) -> None:
    comm.init_process_group()
    torch.set_num_threads(1)
    cfg = Sam3VideoConfig(parallel=parallel, heuristics=VideoInferenceConfig(**json.loads(heuristics)))
    runner = Sam3VideoRunner(ModelConfig(), cfg, checkpoint, torch.device("cpu"))
    reader = FrameReader(dataset_uri)
    dataset = reader.dataset("val")
    coco = storage.read_json(str(reader.local_path("val_frames_coco.json")))
    image_ids = {(int(im["video_id"]), int(im["frame_index"])): int(im["id"]) for im in coco["images"]}
    prompts, category_ids = [c.name for c in dataset.categories], [c.id for c in dataset.categories]
    comm.barrier()
    start = time.perf_counter()
    masklets = []
    for index, video in enumerate(dataset.videos):
        predicted = runner.predict(index, video, reader.image, prompts, category_ids, image_ids)
        if predicted is not None:
            masklets.extend(json.dumps(m, sort_keys=True) for m in predicted.masklets)
    comm.barrier()
    seconds = time.perf_counter() - start
    parts = comm.gather_object(masklets)
    if parts is not None:
        print(json.dumps({"seconds": seconds, "masklets": sorted(m for part in parts for m in part)}))
    comm.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
