"""Load LLaVA and Qwen-VL models and processors, build prompts, and time the stages of a ``generate`` call.

Shared by the command line (``chat``, ``demo``), the lmms-eval plugin and the profiler, so
that every entry point loads models the same way (dtype, device, 4/8-bit with the vision
tower kept in full precision) and reports the same stage timings.

Heavy imports (transformers, bitsandbytes) happen inside the functions.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DTYPES
from ..hooks.base import InstanceOverrides, remove_hooks
from ..models import model_parts
from ..models.llava_hf import QUANTIZATION_SKIP_MODULES
from ..models.qwen_tools import encoded_tokens_per_image, is_qwen_vl_checkpoint
from ..models.qwen_vl import QWEN_VL_CLASSES
from .quantization import bitsandbytes_config

logger = logging.getLogger("pitome_mllm")

TINY_SPECS = ("demo", "test")
# Names that `load_model` maps to the offline tiny model instead of a folder or hub id.
TINY_MODEL_NAMES = {"tiny": "demo", "tiny-test": "test"}

# A model hub id: "name" or "owner/name" (letters, digits, '-', '_', '.'), not starting with '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class ModelLoadError(ValueError):
    """A model or processor could not be loaded from the given folder or hub id."""


# ------------------------------------------------------------------------------ device / dtype
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else Apple MPS if available, else CPU.

    Raises:
        ValueError: an unparsable device, or an accelerator that is not available here.
    """
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    else:
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available here; use --device cpu")
    return resolved


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """``"auto"`` -> float16 on CUDA and MPS (what LLaVA-1.5 checkpoints are stored and evaluated in),
    float32 on CPU (half-precision matmuls are slow or missing there).

    Raises:
        ValueError: ``dtype`` is not one of `DTYPES` (or a floating ``torch.dtype``).
    """
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "auto":
        device_type = torch.device(device).type
        return torch.float16 if device_type in ("cuda", "mps") else torch.float32
    return getattr(torch, dtype)


# ------------------------------------------------------------------------------------ loading
def quantization_config(load_in_4bit: bool, load_in_8bit: bool, compute_dtype: torch.dtype):
    """A ``BitsAndBytesConfig`` for the language model only, or None when not quantising.

    Raises:
        ValueError: both 4- and 8-bit were asked for.
        ImportError: bitsandbytes is not installed.
    """
    return bitsandbytes_config(load_in_4bit, load_in_8bit, compute_dtype, QUANTIZATION_SKIP_MODULES)


def _check_source(model_id_or_path: str | Path) -> tuple[str, bool]:
    """``(source, is_local)``; a missing local path fails here instead of after hub retries."""
    source = str(model_id_or_path)
    if Path(source).expanduser().exists():
        return str(Path(source).expanduser()), True
    if not _HUB_ID.match(source):
        raise FileNotFoundError(f"model folder {source!r} does not exist (and it is not a model hub id)")
    return source, False


def _from_pretrained_kwargs(
    torch_dtype: torch.dtype,
    target_device: torch.device,
    device_map: str | dict | None,
    quantization,
    attn_implementation: str | None,
) -> tuple[dict[str, Any], str | dict | None]:
    """``(from_pretrained keywords, device_map)``: quantised weights are placed at load time (they
    cannot be moved with ``.to()`` afterwards), so quantising without a ``device_map`` puts the
    whole model on ``target_device``."""
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        device_map = device_map if device_map is not None else {"": str(target_device)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return kwargs, device_map


def _load_error(error: OSError, source: str, is_local: bool, what: str) -> ModelLoadError:
    """The `ModelLoadError` for a checkpoint ``from_pretrained`` could not read."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if is_local:
        return ModelLoadError(f"could not load {what} from folder {source!r}: {reason}")
    return ModelLoadError(f"could not load {source!r} offline: pass a local folder holding the checkpoint ({reason})")


def load_llava(
    model_id_or_path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    device_map: str | dict | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    attn_implementation: str | None = None,
) -> tuple[nn.Module, Any]:
    """Load a transformers LLaVA checkpoint and its processor.

    Args:
        model_id_or_path: a local folder (``save_pretrained`` output) or a hub id such as
            ``"llava-hf/llava-1.5-7b-hf"``.
        dtype: one of `DTYPES` or a ``torch.dtype``; see `resolve_dtype`.
        device: where to put the model when ``device_map`` is None; see `resolve_device`.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to spread a large model).
        load_in_4bit, load_in_8bit: quantise the language model with bitsandbytes; the
            vision tower, projector and LM head stay in ``dtype``.
        attn_implementation: e.g. ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``.

    Returns:
        ``(model, processor)``, the model in eval mode.

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
        ModelLoadError: the checkpoint could not be loaded (for a hub id, typically offline).
        ImportError: quantisation without bitsandbytes.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    source, is_local = _check_source(model_id_or_path)
    target_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target_device)
    quantization = quantization_config(load_in_4bit, load_in_8bit, torch_dtype)
    kwargs, device_map = _from_pretrained_kwargs(
        torch_dtype, target_device, device_map, quantization, attn_implementation
    )
    try:
        model = LlavaForConditionalGeneration.from_pretrained(source, **kwargs)
        processor = AutoProcessor.from_pretrained(source)
    except OSError as error:
        raise _load_error(error, source, is_local, "a LLaVA model") from error
    from ..zoo.real_tower import restore_identity_pre_norm

    if restore_identity_pre_norm(model):
        logger.info("vision tower converted from DINOv2: pre_layrnorm restored to the identity")
    if device_map is None:
        model.to(target_device)
    model.eval()
    logger.info("loaded %s (%s, %s)", source, torch_dtype, device_map or target_device)
    return model, processor


def qwen_vl_class_name(config) -> str:
    """The ``*ForConditionalGeneration`` class a Qwen-VL config names (its ``architectures``, else its model type).

    Raises:
        ModelLoadError: the config is not a Qwen2.5-VL or Qwen3-VL one.
    """
    allowed = sorted(QWEN_VL_CLASSES.values())
    for name in getattr(config, "architectures", None) or []:
        if name in allowed:
            return name
    model_type = getattr(config, "model_type", None)
    if model_type in QWEN_VL_CLASSES:
        return QWEN_VL_CLASSES[model_type]
    raise ModelLoadError(
        f"the checkpoint is a {model_type!r} model (architectures {getattr(config, 'architectures', None)}); "
        f"expected one of {allowed}"
    )


def load_qwen_vl(
    model_id_or_path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    device_map: str | dict | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    attn_implementation: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[nn.Module, Any]:
    """Load a transformers Qwen2.5-VL or Qwen3-VL checkpoint and its processor.

    The model class comes from the checkpoint's config (`qwen_vl_class_name`). Loading arguments
    are those of `load_llava` (4/8-bit quantises the language model; tower, merger and head stay
    in ``dtype``). ``min_pixels`` / ``max_pixels`` bound the processor's ``smart_resize`` (None
    keeps the checkpoint's), so they fix each image's native token count.

    The processor is ``AutoProcessor``'s. Without torchvision transformers cannot build these
    processors (their video processor needs it); the image processor, tokenizer and chat template
    are then joined by `pitome_mllm.zoo.tiny_qwen.load_qwen_vl_processor`, which handles images
    and text but no videos.

    Returns:
        ``(model, processor)``, the model in eval mode.

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
        ModelLoadError: the checkpoint could not be loaded, or is not a Qwen2.5-VL / Qwen3-VL one.
        ImportError: quantisation without bitsandbytes.
        ValueError: invalid pixel bounds.
    """
    import transformers
    from transformers import AutoConfig

    from ..models.qwen_vl import QUANTIZATION_SKIP_MODULES as QWEN_SKIP_MODULES
    from ..models.qwen_vl import set_pixel_limits

    source, is_local = _check_source(model_id_or_path)
    target_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target_device)
    quantization = bitsandbytes_config(load_in_4bit, load_in_8bit, torch_dtype, QWEN_SKIP_MODULES)
    kwargs, device_map = _from_pretrained_kwargs(
        torch_dtype, target_device, device_map, quantization, attn_implementation
    )
    try:
        config = AutoConfig.from_pretrained(source)
        model_class = getattr(transformers, qwen_vl_class_name(config))
        model = model_class.from_pretrained(source, **kwargs)
        processor = _qwen_vl_processor(source, is_local)
    except OSError as error:
        raise _load_error(error, source, is_local, "a Qwen-VL model") from error
    set_pixel_limits(processor.image_processor, min_pixels, max_pixels)
    if device_map is None:
        model.to(target_device)
    model.eval()
    logger.info("loaded %s (%s, %s, %s)", source, type(model).__name__, torch_dtype, device_map or target_device)
    return model, processor


def _qwen_vl_processor(source: str, is_local: bool):
    """``AutoProcessor.from_pretrained(source)``, or the torchvision-free reload where that needs torchvision."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(source)
    from ..zoo.tiny_qwen import load_qwen_vl_processor

    folder = source
    if not is_local:
        from huggingface_hub import snapshot_download

        # Only the processor's files: the weights are already where from_pretrained put them.
        folder = snapshot_download(source, allow_patterns=["*.json", "*.jinja", "*.txt", "*.model"])
    logger.info("torchvision is not installed: Qwen-VL processor built without its video processor (images only)")
    return load_qwen_vl_processor(folder)


def load_checkpoint(model_id_or_path: str | Path, **load_kwargs: Any) -> tuple[nn.Module, Any]:
    """`load_qwen_vl` for a local Qwen-VL folder, `load_llava` for anything else (same keyword arguments)."""
    if is_qwen_vl_checkpoint(model_id_or_path):
        return load_qwen_vl(model_id_or_path, **load_kwargs)
    return load_llava(model_id_or_path, **load_kwargs)


def tiny_demo_model(spec_name: str = "demo") -> tuple[nn.Module, Any]:
    """The offline tiny random LLaVA: ``"demo"`` has CLIP ViT-L/14-336 geometry (576 visual
    tokens, 24 layers), ``"test"`` is smaller (64 tokens, 6 layers). No download.

    Raises:
        ValueError: an unknown ``spec_name``.
    """
    from ..zoo.tiny import DEMO_SPEC, TEST_SPEC, build_tiny_llava

    specs = {"demo": DEMO_SPEC, "test": TEST_SPEC}
    if spec_name not in specs:
        raise ValueError(f"tiny model spec must be one of {TINY_SPECS}, got {spec_name!r}")
    return build_tiny_llava(specs[spec_name])


def load_model(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    **load_kwargs: Any,
) -> tuple[nn.Module, Any]:
    """`load_checkpoint` (a local Qwen-VL folder or a LLaVA), except that ``"tiny"`` / ``"tiny-test"`` give the
    offline tiny model.

    Raises:
        ValueError: quantisation asked for the tiny model (it has no checkpoint to quantise).
    """
    spec_name = TINY_MODEL_NAMES.get(str(name_or_path))
    if spec_name is None:
        return load_checkpoint(name_or_path, dtype=dtype, device=device, **load_kwargs)
    if load_kwargs.get("load_in_4bit") or load_kwargs.get("load_in_8bit"):
        raise ValueError(
            f"cannot quantise the built-in {name_or_path!r} model; save it with "
            "pitome_mllm.zoo.tiny.save_tiny_llava(folder) and load that folder"
        )
    target_device = resolve_device(device)
    model, processor = tiny_demo_model(spec_name)
    return model.to(device=target_device, dtype=resolve_dtype(dtype, target_device)), processor


# ------------------------------------------------------------------------------------- images
def load_image_arg(name_or_path: str | Path):
    """A bundled image name (``astronaut``, ...) or an image file, as an RGB PIL image.

    Raises:
        FileNotFoundError: neither a bundled image nor an existing file.
        ValueError: the file is not an image PIL can read.
    """
    from PIL import Image, UnidentifiedImageError

    from ..assets import list_images, load_image

    value = str(name_or_path)
    if value in list_images():
        return load_image(value)
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"image {value!r} is neither a bundled image ({', '.join(list_images())}) nor an existing file"
        )
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image file {value!r}: {error}") from error


# ------------------------------------------------------------------------------------ prompts
def build_conversation_prompt(processor, turns: Sequence[tuple[str, str | None]]) -> str:
    """The prompt for a conversation about one image.

    Args:
        processor: a LLaVA processor; its chat template is used when it has one.
        turns: ``(question, answer)`` pairs in order; the image goes with the first
            question; the last answer is None (the one to generate).

    Without a chat template the LLaVA-1.5 form is used:
    ``"USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:"``.
    """
    if not turns:
        raise ValueError("a conversation needs at least one question")
    if getattr(processor, "chat_template", None):
        messages = []
        for index, (question, answer) in enumerate(turns):
            content: list[dict[str, str]] = [{"type": "image"}] if index == 0 else []
            content.append({"type": "text", "text": question})
            messages.append({"role": "user", "content": content})
            if answer is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    tokenizer = getattr(processor, "tokenizer", None)
    end_of_answer = getattr(tokenizer, "eos_token", None) or "</s>"
    image_token = getattr(processor, "image_token", None) or "<image>"
    parts = []
    for index, (question, answer) in enumerate(turns):
        image = f"{image_token}\n" if index == 0 else ""
        parts.append(f"USER: {image}{question} ASSISTANT:")
        if answer is not None:
            parts.append(f" {answer}{end_of_answer}")
    return "".join(parts)


def build_prompt(processor, question: str) -> str:
    """The single-turn prompt for ``question`` about one image (see `build_conversation_prompt`)."""
    return build_conversation_prompt(processor, [(question, None)])


def count_image_tokens(processor, input_ids: torch.Tensor) -> int:
    """Image placeholders in ``input_ids``: the visual tokens the language model receives."""
    image_token_id = getattr(processor, "image_token_id", None)
    if image_token_id is None:
        image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return int((input_ids == image_token_id).sum())


# ------------------------------------------------------------------------------------- timing
def _synchronizer(model: nn.Module) -> Callable[[], None]:
    """Waits for queued GPU work, so wall-clock stamps measure the work rather than its launch."""
    devices = {parameter.device for parameter in model.parameters()}
    if any(device.type == "cuda" for device in devices):
        return torch.cuda.synchronize
    if any(device.type == "mps" for device in devices):
        return torch.mps.synchronize
    return lambda: None


class StageTimer:
    """Times the stages of one ``generate`` (or forward) call on a supported model; counts its visual tokens.

    >>> with StageTimer(model) as timer:                      # doctest: +SKIP
    ...     model.generate(**inputs, max_new_tokens=8)
    >>> timer.vision_s, timer.prefill_s, timer.total_s        # doctest: +SKIP

    Attributes (seconds, set on exit):
        vision_s: vision tower + projector (the model's image encoding, merges included).
        prefill_s: from entering the block to the end of the first model forward, i.e. the
            time to the first token's logits (vision included).
        total_s: the whole block.
        visual_tokens: tokens per image the projector stage handed on in the last call.

    The image-encoding method the adapter names (`ModelParts.image_feature_method` on
    ``image_feature_owner``) is shadowed on the instance while timing and restored on exit;
    a forward hook on the model stamps the end of the first forward. The model may run
    in another thread inside the block (streaming); only one call at a time.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        parts = model_parts(model)
        self._projector = parts.projector
        self._overrides = InstanceOverrides(parts.image_feature_owner)
        self._method = parts.image_feature_method
        self._sync = _synchronizer(model)
        self.vision_s = 0.0
        self.prefill_s = 0.0
        self.total_s = 0.0
        self._start = 0.0
        self._first_forward_end: float | None = None
        self.visual_tokens = 0
        self._hooks: list = []

    def __enter__(self) -> StageTimer:
        self.vision_s = 0.0
        self.visual_tokens = 0
        self._first_forward_end = None
        original = getattr(self._overrides.target, self._method)

        # wraps() keeps the signature visible: generate() inspects it to decide which
        # inputs (pixel_values) to encode before the prefill and remove from the forward.
        @functools.wraps(original)
        def timed_image_encoding(*args, **kwargs):
            self._sync()
            began = time.perf_counter()
            output = original(*args, **kwargs)
            self._sync()
            self.vision_s += time.perf_counter() - began
            per_image = encoded_tokens_per_image(self.model, output)
            if per_image:  # images concatenated into one sequence: the projector's output does not say
                self.visual_tokens = per_image[0]
            return output

        self._overrides.set(self._method, timed_image_encoding)
        # Registered after the patch's own projector hook, so it sees the merged count.
        self._hooks = [
            self.model.register_forward_hook(self._on_forward),
            self._projector.register_forward_hook(self._on_projector_output),
        ]
        self._sync()
        self._start = time.perf_counter()
        return self

    def _on_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._first_forward_end is None:
            self._sync()
            self._first_forward_end = time.perf_counter()

    def _on_projector_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if output.dim() == 3:  # [B, K, D]; a flat [sum K_i, D] is counted per image after the encoding
            self.visual_tokens = int(output.shape[1])

    def __exit__(self, *exc_info) -> None:
        self._sync()
        end = time.perf_counter()
        self.total_s = end - self._start
        first = self._first_forward_end if self._first_forward_end is not None else end
        self.prefill_s = first - self._start
        remove_hooks(self._hooks)
        self._overrides.restore()


__all__ = [
    "DTYPES",
    "ModelLoadError",
    "QUANTIZATION_SKIP_MODULES",
    "StageTimer",
    "build_conversation_prompt",
    "build_prompt",
    "count_image_tokens",
    "load_checkpoint",
    "load_image_arg",
    "load_llava",
    "load_qwen_vl",
    "load_model",
    "quantization_config",
    "qwen_vl_class_name",
    "resolve_device",
    "resolve_dtype",
    "tiny_demo_model",
]
