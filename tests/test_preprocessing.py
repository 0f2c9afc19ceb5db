"""The slim replica's preprocessing (Pillow and numpy, preprocessing.py) is torchvision's, bit for bit:
on every photo scikit-image ships, at many sizes and shapes, and on every picture of the upload corpus."""

from __future__ import annotations

import importlib.resources

import numpy as np
import pytest
from PIL import Image
from torchvision.models import ResNet18_Weights

from corpus import CORPUS
from support import photo

pytestmark = pytest.mark.unit

TRANSFORMS = ResNet18_Weights.DEFAULT.transforms()
PHOTOS = sorted(entry.name for entry in (importlib.resources.files("skimage") / "data").iterdir()
                if entry.name.endswith((".png", ".jpg")))
# Smaller than the crop, exactly the resize, one pixel off it, odd, portrait, landscape, a camera's.
SIZES = [(1, 1), (17, 300), (224, 224), (255, 256), (256, 256), (257, 256), (256, 999), (300, 225), (333, 500),
         (641, 479), (1023, 767), (4000, 3000)]


def slim_preprocessing():
    from classifier.inference.preprocessing import Preprocessing

    return Preprocessing(resize=TRANSFORMS.resize_size[0], crop=TRANSFORMS.crop_size[0], mean=tuple(TRANSFORMS.mean),
                         std=tuple(TRANSFORMS.std), interpolation=TRANSFORMS.interpolation.value)


def assert_same_input(picture: Image.Image) -> None:
    ours, theirs = slim_preprocessing()(picture), TRANSFORMS(picture).numpy()
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (3, 224, 224)
    assert np.array_equal(ours, theirs)  # bit for bit


def test_the_photos_are_many():
    assert len(PHOTOS) >= 25


@pytest.mark.parametrize("name", PHOTOS)
def test_every_scikit_image_photo_as_it_is(name):
    assert_same_input(photo(name).convert("RGB"))


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_every_size(size):
    for name in ("astronaut.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg"):
        assert_same_input(photo(name).convert("RGB").resize(size, Image.Resampling.BICUBIC))


@pytest.mark.app
@pytest.mark.parametrize("case", [case for case in CORPUS if CORPUS[case][3] == 200])
def test_every_corpus_upload_once_decoded(settings, case):
    from classifier.inference import images

    _, _, data, _, _ = CORPUS[case]
    assert_same_input(images.decode(data, TRANSFORMS.resize_size[0], settings.max_image_pixels))


def test_only_bilinear_is_implemented():
    from classifier.inference.preprocessing import Preprocessing

    with pytest.raises(ValueError, match="bilinear"):
        Preprocessing(resize=256, crop=224, mean=(0, 0, 0), std=(1, 1, 1), interpolation="bicubic")
