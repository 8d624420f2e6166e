"""The video metric families, registered here and nowhere else.

Each family is one class in its own module (the interface is :class:`..family.VideoFamily`); its
``name`` is what ``evaluate.metrics`` lists. Adding a family = writing its class and adding it to
``CLASSES`` below; the suite, the config check and the report pick it up from here.
"""

from __future__ import annotations

from sam3_core.evaluate.families.cgf1 import Cgf1
from sam3_core.evaluate.families.class_map import ClassMap
from sam3_core.evaluate.families.hota import Hota
from sam3_core.evaluate.families.phrase_ap import PhraseAp
from sam3_core.evaluate.families.teta import Teta
from sam3_core.evaluate.families.vos import Vos
from sam3_core.evaluate.family import VideoFamily
from sam3_core.evaluate.videodata import VideoSet

# in the order they are prepared, run and reported
CLASSES: tuple[type[VideoFamily], ...] = (ClassMap, PhraseAp, Teta, Hota, Cgf1, Vos)
REGISTRY: dict[str, type[VideoFamily]] = {cls.name: cls for cls in CLASSES}
FAMILIES: tuple[str, ...] = tuple(REGISTRY)
# sam3's SA-Co/VEval suite (VEvalEvaluator): the default for a GT with video_np_pairs
SAM3_SUITE: tuple[str, ...] = ("map", "phrase_ap", "teta", "hota", "cgf1")


def default_families(data: VideoSet) -> tuple[str, ...]:
    """What to score when ``evaluate.metrics`` is empty.

    ``vos`` when the predictions carry ``gt_id`` (semi-supervised: each object was prompted by a GT
    mask, so detection metrics would score what it was given); else sam3's suite for SA-Co/VEval GT,
    class mAP for YT-VIS GT.
    """
    if any(p.gt_id is not None for p in data.predictions):
        return ("vos",)
    return SAM3_SUITE if data.is_saco else ("map",)


def family_files() -> tuple[str, ...]:
    """Every file name a family may publish beside metrics.json."""
    return tuple(name for cls in CLASSES for name in cls.files)
