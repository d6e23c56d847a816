"""Models: registry, builders (each takes its activation by name), the FGSM-SDI generator,
SAT activations and the smooth-backward switch, and self-describing checkpoints.
Plain PyTorch; nothing here knows about Ray (nor imports torchvision or timm until a model
needs it)."""

# importing the builder modules registers them
from raydist.models import efficientnet, preact_resnet, resnet, resnext, torchvision_models, wide_resnet  # noqa: F401
from raydist.models.activations import (
    ACTIVATIONS,
    BACKWARD_MODES,
    ParametricSoftplus,
    ReLUSmoothGrad,
    SATSchedule,
    SmoothReLU,
    activation_parameters,
    configure_sat,
    make_activation,
    parse_activation,
    set_backward_mode,
    smooth_backward,
)
from raydist.models.checkpoint import load_checkpoint, save_checkpoint, unwrap_model
from raydist.models.generator import SDIGenerator
from raydist.models.pretrained import load_pretrained
from raydist.models.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_NAMES,
    ImageClassifier,
    Normalize,
    builder_kwargs,
    count_parameters,
    create_model,
    list_models,
    model_spec_for,
    register_model,
)
from raydist.models.swap import functional_activation_calls, swap_activations

__all__ = [
    "ACTIVATIONS",
    "BACKWARD_MODES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_NAMES",
    "ImageClassifier",
    "Normalize",
    "ParametricSoftplus",
    "ReLUSmoothGrad",
    "SATSchedule",
    "SDIGenerator",
    "SmoothReLU",
    "activation_parameters",
    "builder_kwargs",
    "configure_sat",
    "count_parameters",
    "create_model",
    "functional_activation_calls",
    "list_models",
    "load_checkpoint",
    "load_pretrained",
    "make_activation",
    "model_spec_for",
    "parse_activation",
    "register_model",
    "save_checkpoint",
    "set_backward_mode",
    "smooth_backward",
    "swap_activations",
    "unwrap_model",
]
