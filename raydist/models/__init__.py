"""Models: registry, builders (each takes its activation by name), the FGSM-SDI generator,
and self-describing checkpoints.  Plain PyTorch; nothing here knows about Ray."""

from raydist.models import preact_resnet, resnet  # noqa: F401  (import registers the builders)
from raydist.models.activations import ACTIVATIONS, make_activation
from raydist.models.checkpoint import load_checkpoint, save_checkpoint, unwrap_model
from raydist.models.generator import SDIGenerator
from raydist.models.registry import (
    MODEL_NAMES,
    ImageClassifier,
    Normalize,
    create_model,
    list_models,
    model_spec_for,
    register_model,
)

__all__ = [
    "ACTIVATIONS",
    "MODEL_NAMES",
    "ImageClassifier",
    "Normalize",
    "SDIGenerator",
    "create_model",
    "list_models",
    "load_checkpoint",
    "make_activation",
    "model_spec_for",
    "register_model",
    "save_checkpoint",
    "unwrap_model",
]
