"""torchvision's ImageClassification preset for PIL images, in Pillow and numpy: what a slim replica
(MODEL_ONNX) runs instead of torchvision, with the same numbers out. No torch here.

    RGB picture --resize (shorter side, antialiased bilinear)--> --centre crop--> uint8 HWC
                --/255, then (x - mean) / std, float32--> the model's input [3, crop, crop]

Each step does what torchvision.transforms.functional does to a PIL image (resize, center_crop,
pil_to_tensor, convert_image_dtype, normalize), rounding included; tests/test_preprocessing.py checks the
two agree on the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Preprocessing:
    """The constants the weights were trained with (torchvision's ResNet18_Weights.DEFAULT.transforms())."""

    resize: int  # the shorter side is resized to this
    crop: int  # then a centre crop of crop x crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # with antialiasing, as Pillow always does when it shrinks

    def __post_init__(self) -> None:
        if self.interpolation != "bilinear":
            raise ValueError(f"only bilinear interpolation is implemented, not {self.interpolation}")

    def __call__(self, image: Image.Image) -> np.ndarray:
        """An RGB picture -> the model's input, float32 [3, crop, crop]."""
        return self.normalized(self.cropped(image))

    def cropped(self, image: Image.Image) -> np.ndarray:
        """An RGB picture -> its resized centre crop, uint8 [crop, crop, 3] (a quarter of the input's bytes: what
        the Ray run's decode tasks hand its model actors)."""
        return np.asarray(self.centre_crop(self.resized(image)), dtype=np.uint8)

    def normalized(self, cropped: np.ndarray) -> np.ndarray:
        """A centre crop, uint8 [crop, crop, 3] -> the model's input, float32 [3, crop, crop]."""
        pixels = cropped.transpose(2, 0, 1)
        scaled = pixels.astype(np.float32) / np.float32(255)
        return (scaled - np.asarray(self.mean, np.float32)[:, None, None]) / np.asarray(self.std, np.float32)[:, None, None]

    def resized(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        short, long = sorted((width, height))
        new_long = int(self.resize * long / short)  # torchvision truncates, in Python floats
        size = (self.resize, new_long) if width <= height else (new_long, self.resize)
        return image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)

    def centre_crop(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if (width, height) == (self.crop, self.crop):
            return image
        top, left = int(round((height - self.crop) / 2.0)), int(round((width - self.crop) / 2.0))
        return image.crop((left, top, left + self.crop, top + self.crop))
