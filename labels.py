"""The 1000 ImageNet class names, in the order of the model's outputs.

They ship inside torchvision with the weights' metadata, so reading them needs no network.
"""

from torchvision.models import ResNet18_Weights

LABELS: tuple[str, ...] = tuple(ResNet18_Weights.DEFAULT.meta["categories"])
