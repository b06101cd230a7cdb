"""The mini-LLaVA of the easy-VQA proxy: the real DINOv2 tower, a trained projector and decoder.

`build_mini_llava` builds it; `train_mini_llava` trains the projector and decoder on unmerged
tower features of easy-VQA training images (`easy_vqa`) and saves a checkpoint lmms-eval loads.
Training is seeded and its checkpoint cached under ``$PITOME_CACHE/easy_vqa/<key>``
(`checkpoint_key`: every setting that changes the weights), so a second run reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ...models import model_parts
from ...models.llava_hf import logits_from_tower_features
from .easy_vqa import Question, balanced_subset, doc_to_text, image_paths, load_questions, open_rgb
from .files import atomic_write_text, cached_tensor

logger = logging.getLogger("pitome_mllm")

CHECKPOINT_FILE = "training.json"


# ---------------------------------------------------------------------------------- model
@dataclasses.dataclass(frozen=True)
class MiniLlavaSpec:
    """Size of the trained part (projector + LLaMA decoder); the tower is the real DINOv2."""

    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 512


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """What the training run does; every field is part of the checkpoint's cache key.

    Attributes:
        train_images: training images used (of 4,000); every question on them is used.
        epochs: passes over those questions.
        batch_size, learning_rate, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay.
        seed: initialisation and data order.
    """

    train_images: int = 2000
    epochs: int = 3
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 30
    seed: int = 0


def build_mini_llava(spec: MiniLlavaSpec = MiniLlavaSpec(), seed: int = 0):
    """``(model, processor)``: real DINOv2 tower (frozen), random GELU projector and decoder (seeded), float32."""
    from ...zoo.real_tower import build_real_llava

    model, processor = build_real_llava(
        text_layers=spec.text_layers,
        text_hidden=spec.text_hidden,
        text_heads=spec.text_heads,
        text_intermediate=spec.text_intermediate,
        identity_projector=False,
        seed=seed,
    )
    model_parts(model).tower.requires_grad_(False)
    return model, processor


def tower_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[B, 3, 224, 224]`` -> ``[B, 256, 384]``: LLaVA's view of the tower (layer -2, CLS dropped)."""
    parts = model_parts(model)
    with torch.no_grad():
        hidden = parts.tower(pixel_values, output_hidden_states=True).hidden_states
    return hidden[parts.feature_layer][:, 1:]


def prompt_text(processor, question: str) -> str:
    """The prompt the lmms-eval plugin builds for this question (chat template), image expanded."""
    from ...common.prompts import build_prompt

    num_patches = processor.image_processor.crop_size["height"] // processor.patch_size
    prompt = build_prompt(processor, doc_to_text(question), 1)
    return prompt.replace(processor.image_token, processor.image_token * num_patches**2)


def encode_examples(processor, questions: Sequence[Question]) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, answer ids + EOS)`` per question; the answer is what greedy decoding must emit."""
    tokenizer = processor.tokenizer
    prompts: dict[str, list[int]] = {}
    answers: dict[str, list[int]] = {}
    examples = []
    for q in questions:
        if q.question not in prompts:
            prompts[q.question] = tokenizer(prompt_text(processor, q.question))["input_ids"]
        if q.answer not in answers:
            # Tokenised on its own, as generation appends it: " circle" after "ASSISTANT:".
            ids = tokenizer(f" {q.answer}", add_special_tokens=False)["input_ids"]
            answers[q.answer] = ids + [tokenizer.eos_token_id]
        examples.append((prompts[q.question], answers[q.answer]))
    return examples


def collate(
    examples: Sequence[tuple[list[int], list[int]]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)``, each ``[B, L]``, right-padded; labels -100 off the answer."""
    length = max(len(prompt) + len(answer) for prompt, answer in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    attention_mask = torch.zeros_like(input_ids)
    for row, (prompt, answer) in enumerate(examples):
        ids = prompt + answer
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(prompt) : len(ids)] = torch.tensor(answer)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask, labels


def answer_logits(model, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """``[B, L, V]`` logits of the decoder with ``features`` (``[B, 256, 384]``) at the image tokens.

    The same computation as the model's own forward after its vision tower, without re-running
    the frozen tower every step.
    """
    return logits_from_tower_features(model, features, input_ids, attention_mask)


def sequence_loss_and_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over answer tokens, and ``[B]`` whether every answer token is the argmax."""
    shifted_logits, shifted_labels = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1))
    answer = shifted_labels != -100
    correct = (shifted_logits.argmax(-1) == shifted_labels) | ~answer
    return loss, correct.all(dim=1)


def learning_rate_at(step: int, total_steps: int, settings: TrainSettings) -> float:
    """Linear warm-up to ``learning_rate``, then cosine decay to 0."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, total_steps - settings.warmup_steps)
    return settings.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -------------------------------------------------------------------------------- caching
def checkpoint_key(spec: MiniLlavaSpec, settings: TrainSettings) -> str:
    payload = json.dumps({"spec": dataclasses.asdict(spec), "train": dataclasses.asdict(settings), "v": 1})
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def default_checkpoint_dir(spec: MiniLlavaSpec, settings: TrainSettings) -> Path:
    from ...common.files import cache_dir

    return cache_dir() / "easy_vqa" / checkpoint_key(spec, settings)


def cached_train_features(model, processor, image_ids: Sequence[int], batch_size: int = 32) -> torch.Tensor:
    """``[n, 256, 384]`` float16 tower features of training images, computed once and cached on disk."""
    from ...common.files import cache_dir

    key = hashlib.sha256(json.dumps(list(image_ids)).encode()).hexdigest()[:12]
    path = cache_dir() / "easy_vqa" / f"train_features_{len(image_ids)}_{key}.pt"
    return cached_tensor(path, lambda: train_features(model, processor, image_ids, batch_size))


def train_features(model, processor, image_ids: Sequence[int], batch_size: int) -> torch.Tensor:
    """``[n, 256, 384]`` float16 tower features of the training images ``image_ids``."""
    from tqdm import tqdm

    paths = image_paths("train")
    chunks = []
    for start in tqdm(range(0, len(image_ids), batch_size), desc="tower features (train images)", unit="batch"):
        batch_ids = image_ids[start : start + batch_size]
        images = [open_rgb(paths[image_id]) for image_id in batch_ids]
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        chunks.append(tower_features(model, pixel_values).to(torch.float16))
    return torch.cat(chunks)


# ------------------------------------------------------------------------------- training
def train_mini_llava(
    output: str | Path | None = None,
    spec: MiniLlavaSpec = MiniLlavaSpec(),
    settings: TrainSettings = TrainSettings(),
    validation_images: int = 200,
    force: bool = False,
) -> Path:
    """Train the projector and decoder on unmerged tokens and save a loadable checkpoint.

    Args:
        output: checkpoint folder (default: the cache folder keyed by ``spec`` and ``settings``).
            A folder that already holds a finished checkpoint is reused unless ``force``.
        validation_images: training-split images held out (the last ones by id) to report
            accuracy during training; the lmms-eval task uses the test split.

    Returns:
        The folder, holding ``save_pretrained`` model + processor and ``training.json``
        (settings, loss per step, validation accuracy per epoch, wall time).
    """
    import time

    from tqdm import tqdm

    folder = Path(output) if output is not None else default_checkpoint_dir(spec, settings)
    if (folder / CHECKPOINT_FILE).exists() and not force:
        logger.info("reusing the trained mini-LLaVA in %s", folder)
        return folder
    if settings.train_images + validation_images > 4000:
        raise ValueError(
            f"train_images={settings.train_images} + validation_images={validation_images} "
            "exceed the 4000 training images"
        )
    started = time.perf_counter()
    model, processor = build_mini_llava(spec, seed=settings.seed)
    questions = load_questions("train")
    all_ids = sorted({q.image_id for q in questions})
    train_ids = all_ids[: settings.train_images]
    validation_ids = all_ids[len(all_ids) - validation_images :] if validation_images else []
    features = cached_train_features(model, processor, train_ids + validation_ids)
    row_of = {image_id: row for row, image_id in enumerate(train_ids + validation_ids)}
    train_set, validation_set = set(train_ids), set(validation_ids)
    train_questions = [q for q in questions if q.image_id in train_set]
    held_out = [q for q in questions if q.image_id in validation_set]
    validation_questions = balanced_subset(held_out, len(validation_ids), settings.seed) if validation_ids else []
    train_examples = encode_examples(processor, train_questions)
    validation_examples = encode_examples(processor, validation_questions)
    pad = processor.tokenizer.pad_token_id

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = math.ceil(len(train_examples) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    losses: list[float] = []
    validation: list[dict[str, float]] = []
    model.train()
    model_parts(model).tower.eval()  # frozen: no dropout, whatever train() set
    step = 0
    with tqdm(total=total_steps, desc="training mini-LLaVA", unit="step") as progress:
        for epoch in range(settings.epochs):
            order = torch.randperm(len(train_examples), generator=generator).tolist()
            for start in range(0, len(order), settings.batch_size):
                batch = order[start : start + settings.batch_size]
                input_ids, attention_mask, labels = collate([train_examples[i] for i in batch], pad)
                batch_features = features[[row_of[train_questions[i].image_id] for i in batch]].float()
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate_at(step, total_steps, settings)
                logits = answer_logits(model, batch_features, input_ids, attention_mask)
                loss, _ = sequence_loss_and_hits(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                losses.append(round(loss.item(), 5))
                step += 1
                progress.update(1)
                progress.set_postfix(epoch=epoch + 1, loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
            if validation_examples:
                accuracy = evaluate_examples(model, features, row_of, validation_questions, validation_examples, pad)
                validation.append({"epoch": epoch + 1, "accuracy": accuracy})
                progress.write(f"epoch {epoch + 1}: held-out accuracy (teacher-forced, unmerged) {accuracy:.3f}")
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    record = {
        "spec": dataclasses.asdict(spec),
        "train": dataclasses.asdict(settings),
        "train_questions": len(train_examples),
        "validation_questions": len(validation_examples),
        "validation": validation,
        "loss_per_step": losses,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    # Written last: its presence marks a finished checkpoint.
    atomic_write_text(folder / CHECKPOINT_FILE, json.dumps(record, indent=1) + "\n")
    return folder


def evaluate_examples(model, features, row_of, questions, examples, pad_token_id: int, batch_size: int = 100) -> float:
    """Teacher-forced exact-answer accuracy on unmerged features (a training-time check)."""
    hits = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = range(start, min(start + batch_size, len(examples)))
            input_ids, attention_mask, labels = collate([examples[i] for i in chunk], pad_token_id)
            batch_features = features[[row_of[questions[i].image_id] for i in chunk]].float()
            logits = answer_logits(model, batch_features, input_ids, attention_mask)
            _, batch_hits = sequence_loss_and_hits(logits, labels)
            hits += int(batch_hits.sum())
    model.train(was_training)
    return hits / max(1, len(examples))
