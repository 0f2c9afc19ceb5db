"""The 1000 ImageNet class names, in the order of the model's outputs.

They ship inside torchvision with the weights' metadata, so reading them needs no network. A slim replica
(MODEL_ONNX) imports no torchvision: it reads the copy python -m export wrote into the model file, which
model.py opens.
"""

from settings import get_settings

if get_settings().model_onnx is None:
    from torchvision.models import ResNet18_Weights

    LABELS: tuple[str, ...] = tuple(ResNet18_Weights.DEFAULT.meta["categories"])
else:
    from model import served

    assert served.model_file is not None
    LABELS = served.model_file.labels
