"""The 1000 ImageNet class names, in the order of the model's outputs: torchvision's, read on first use.

They ship inside torchvision with the weights' metadata, so reading them needs no network. A loaded model
carries the names it answers with (model.Runtime.labels): a slim replica's come from its model file, and it
never imports this module's torchvision.
"""

from __future__ import annotations

from functools import cache


@cache
def imagenet() -> tuple[str, ...]:
    from torchvision.models import ResNet18_Weights

    return tuple(ResNet18_Weights.DEFAULT.meta["categories"])


def __getattr__(name: str) -> tuple[str, ...]:
    if name == "LABELS":  # labels.LABELS, as before: read when first asked for, not at import
        return imagenet()
    raise AttributeError(name)
