"""Mini-LLaVA on easy-VQA: does a language model still answer after the visual tokens are merged?

No LLaVA weights reach a machine without the model hubs, so this proxy builds the smallest
honest stand-in: a ``LlavaForConditionalGeneration`` whose vision tower is the *real* pretrained
DINOv2 ViT-S/14 (`pitome_mllm.zoo.real_tower`, exactly re-expressed as a ``CLIPVisionModel`` at
224 px: 256 patch tokens + CLS, LLaVA reads ``hidden_states[-2]`` without CLS), a GELU MLP
projector and a small LLaMA decoder. Tower frozen; projector and decoder are trained here, on
CPU, on **unmerged** tokens, to answer easy-VQA questions (``easy-vqa==1.0``: 64 px images of one
coloured circle / rectangle / triangle, 2–20 % of the image, on a plain background; questions
about its shape, its colour, or yes/no about either). The trained checkpoint is then evaluated
off the shelf through the lmms-eval plugin (task ``easy_vqa`` in ``eval/tasks``) with every
method and budget, exactly as a real LLaVA would be.

Training is seeded (data order, initialisation) and its checkpoint is cached under
``$PITOME_CACHE/easy_vqa/<key>`` (key: every setting that changes the weights), so a second run
reuses it. The tower's features of the training images are cached beside it.

What it does and does not say: questions are about one small object among large plain regions,
so a method that drops or blurs the object fails; nothing here measures text reading, counting
or reasoning, and a 2-layer decoder trained in minutes is not Vicuna.

This module holds the data (questions, images, the task's rows); the model and its training
are `mini_llava`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install easy-vqa==1.0 (or pip install -e '.[proxy]')"
POST_PROMPT = "\nAnswer the question using a single word or phrase."
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
KINDS = ("shape", "color", "yes/no")
# lmms-eval metric of each kind's accuracy (eval/tasks/easy_vqa).
KIND_METRICS = {"shape": "shape_accuracy", "color": "color_accuracy", "yes/no": "yes_no_accuracy"}
TASK_ROWS = 1000


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    answer: str
    image_id: int


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError as error:
        raise ImportError(f"the easy-VQA proxy needs the easy-vqa dataset: {INSTALL_HINT}") from error
    return easy_vqa


def question_kind(answer: str) -> str:
    """``"shape"``, ``"color"`` or ``"yes/no"``: what a question with this answer asks."""
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    if answer in ("yes", "no"):
        return "yes/no"
    raise ValueError(f"{answer!r} is not an easy-VQA answer; allowed: {SHAPES + COLORS + ('yes', 'no')}")


def load_questions(split: str) -> list[Question]:
    """Every question of ``split`` (``"train"``: 38,575 over 4,000 images; ``"test"``: 9,673 over 1,000)."""
    easy_vqa = _easy_vqa()
    loaders = {"train": easy_vqa.get_train_questions, "test": easy_vqa.get_test_questions}
    if split not in loaders:
        raise ValueError(f"split must be one of {tuple(loaders)}, got {split!r}")
    questions, answers, image_ids = loaders[split]()
    return [Question(q, a, int(i)) for q, a, i in zip(questions, answers, image_ids, strict=True)]


@functools.lru_cache(maxsize=2)
def image_paths(split: str) -> dict[int, str]:
    """Image id -> PNG path inside the installed easy-vqa package (listed once per split)."""
    easy_vqa = _easy_vqa()
    loaders = {"train": easy_vqa.get_train_image_paths, "test": easy_vqa.get_test_image_paths}
    if split not in loaders:
        raise ValueError(f"split must be one of {tuple(loaders)}, got {split!r}")
    return {int(key): value for key, value in loaders[split]().items()}


def open_rgb(path: str | Path):
    """An image file as RGB PIL."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def load_image(split: str, image_id: int):
    """An easy-VQA image as RGB PIL (64 x 64)."""
    return open_rgb(image_paths(split)[image_id])


def doc_to_text(question: str) -> str:
    """The text after the image, in training and in the lmms-eval task alike."""
    return f"{question}{POST_PROMPT}"


def balanced_subset(questions: Sequence[Question], count: int, seed: int = 0) -> list[Question]:
    """``count`` questions on distinct images, the three kinds in turn (shape, colour, yes/no).

    Every image is used once, so a method cannot profit from seeing one image many times. An
    image without a question of the wanted kind gives one of its own (mostly yes/no), so the
    1,000-row task holds 28 % shape, 27 % colour and 45 % yes/no questions instead of the
    split's 13 % / 13 % / 74 %.
    """
    by_image: dict[int, list[Question]] = {}
    for question in questions:
        by_image.setdefault(question.image_id, []).append(question)
    rng = random.Random(seed)
    image_ids = sorted(by_image)
    rng.shuffle(image_ids)
    chosen: list[Question] = []
    for position, image_id in enumerate(image_ids):
        wanted = KINDS[position % len(KINDS)]
        candidates = [q for q in by_image[image_id] if question_kind(q.answer) == wanted] or by_image[image_id]
        chosen.append(candidates[rng.randrange(len(candidates))])
        if len(chosen) == count:
            break
    if len(chosen) < count:
        raise ValueError(f"count={count} is more than the {len(chosen)} images available")
    return chosen


def task_rows(questions: Sequence[Question]) -> list[dict[str, Any]]:
    """Rows of the lmms-eval task's JSONL."""
    return [
        {
            "question_id": index,
            "question": q.question,
            "answer": q.answer,
            "image_id": q.image_id,
            "kind": question_kind(q.answer),
        }
        for index, q in enumerate(questions)
    ]


def write_task_rows(path: str | Path, count: int = TASK_ROWS, seed: int = 0) -> Path:
    """The task's JSONL: `balanced_subset` of the test split (how ``eval/tasks/easy_vqa`` was made)."""
    rows = task_rows(balanced_subset(load_questions("test"), count, seed))
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def normalise_answer(text: str) -> str:
    return text.strip().lower().strip(" .!?,;:\"'")
