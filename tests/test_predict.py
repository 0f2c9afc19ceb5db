"""The service gives torchvision's own answer: same preprocessing, same labels, same scores."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.models import ResNet18_Weights

from support import PHOTOS, TOLERANCE, assert_top_k, encode, large_jpeg, photo, photo_bytes, upload

pytestmark = pytest.mark.app


@pytest.mark.parametrize("name", PHOTOS)
def test_predict_matches_torchvision_reference(client, reference, name):
    expected = reference(photo(name))
    response = client.post("/predict", files=upload(photo_bytes(name), name))
    assert response.status_code == 200
    best = response.json()
    assert set(best) == {"label", "index", "score"}
    assert_top_k([best], expected, 1)


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("k", [1, 5, 1000])
def test_topk_matches_torchvision_reference(client, reference, name, k):
    expected = reference(photo(name))
    response = client.post(f"/predict/topk?k={k}", files=upload(photo_bytes(name), name))
    assert response.status_code == 200
    assert_top_k(response.json()["predictions"], expected, k)


def test_topk_defaults_to_five_and_scores_are_probabilities(client):
    response = client.post("/predict/topk", files=upload(photo_bytes("coffee.png")))
    assert len(response.json()["predictions"]) == 5
    everything = client.post("/predict/topk?k=1000", files=upload(photo_bytes("coffee.png"))).json()["predictions"]
    assert sorted(p["index"] for p in everything) == list(range(1000))
    assert sum(p["score"] for p in everything) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("name", PHOTOS)
def test_model_input_is_exactly_the_official_preprocessing(service, name):
    official = ResNet18_Weights.DEFAULT.transforms()(photo(name).convert("RGB"))
    ours = service.prepare(photo_bytes(name))
    assert ours.shape == (3, 224, 224)
    assert np.array_equal(ours, official.numpy())


def test_aspect_ratio_is_kept_not_squashed(service):
    # A wide image: the official pipeline crops the centre; Resize((224, 224)) would squash it.
    wide = Image.fromarray(np.tile(np.linspace(0, 255, 900, dtype=np.uint8), (300, 1)))
    ours = service.prepare(encode(wide))
    squashed = ResNet18_Weights.DEFAULT.transforms()(wide.convert("RGB").resize((224, 224)))
    assert not np.allclose(ours, squashed.numpy(), atol=1e-2)


def probabilities_of(client, data: bytes) -> torch.Tensor:
    predictions = client.post("/predict/topk?k=1000", files=upload(data)).json()["predictions"]
    result = torch.zeros(1000)
    for p in predictions:
        result[p["index"]] = p["score"]
    return result


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.allclose(actual, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", ["astronaut.png", "motorcycle_left.png"])
def test_a_camera_size_jpeg_gets_exactly_the_reference_answer(client, reference, name):
    # By default nothing is traded for speed: a 3000 px photo is decoded in full, as torchvision decodes it.
    data = large_jpeg(name, 3000)
    image = Image.open(io.BytesIO(data))
    assert min(image.size) == 3000
    assert_same(probabilities_of(client, data), reference(image))


def test_a_camera_size_exif_rotated_jpeg_gets_the_reference_answer_of_the_upright_photo(client, reference):
    upright = Image.open(io.BytesIO(large_jpeg("rocket.jpg", 2000)))
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 degrees counter-clockwise to display"
    stored = encode(upright.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=90, exif=exif)
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(stored)))
    assert shown.size == upright.size
    assert_same(probabilities_of(client, stored), reference(shown))


def test_a_large_png_gets_exactly_the_reference_answer(client, reference):
    big = photo("coffee.png").convert("RGB").resize((2400, 1600), Image.BICUBIC)
    assert_same(probabilities_of(client, encode(big)), reference(big))


def test_grayscale_image(client, reference):
    grey = photo("astronaut.png").convert("L")
    assert_same(probabilities_of(client, encode(grey)), reference(grey))


def test_sixteen_bit_image_keeps_its_top_eight_bits(client, reference):
    grey = photo("coffee.png").convert("L")
    sixteen = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I;16")
    data = encode(sixteen)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert_same(probabilities_of(client, data), reference(grey))


def test_opaque_rgba_equals_rgb(client, reference):
    rgb = photo("chelsea.png").convert("RGB")
    rgba = rgb.copy()
    rgba.putalpha(255)
    assert_same(probabilities_of(client, encode(rgba)), reference(rgb))


def test_transparent_pixels_are_composited_over_white(client, reference):
    rgba = photo("chelsea.png").convert("RGBA")
    alpha = np.full(rgba.size[::-1], 255, dtype=np.uint8)
    alpha[:, : rgba.width // 2] = 0  # left half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    over_white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    assert_same(probabilities_of(client, encode(rgba)), reference(over_white))
    assert not torch.allclose(reference(over_white), reference(rgba.convert("RGB")), atol=TOLERANCE, rtol=0)


def test_palette_image(client, reference):
    palette = photo("rocket.jpg").convert("P", palette=Image.Palette.ADAPTIVE)
    assert_same(probabilities_of(client, encode(palette)), reference(palette.convert("RGB")))


def test_cmyk_image(client, reference):
    cmyk = photo("coffee.png").convert("CMYK")
    assert_same(probabilities_of(client, encode(cmyk, "TIFF")), reference(cmyk.convert("RGB")))
    assert client.post("/predict", files=upload(encode(cmyk, "JPEG"))).status_code == 200


def test_exif_rotated_image_equals_upright(client):
    upright = photo("astronaut.png").convert("RGB").crop((0, 0, 512, 300))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(encode(stored, exif=exif)))).size == upright.size
    assert_same(probabilities_of(client, encode(stored, exif=exif)), probabilities_of(client, encode(upright)))
    assert not torch.allclose(probabilities_of(client, encode(stored)), probabilities_of(client, encode(upright)))


def test_animated_gif_uses_first_frame(client, reference):
    frames = [photo("chelsea.png").convert("RGB"), photo("coffee.png").convert("RGB").resize((451, 300))]
    animated = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    first = Image.open(io.BytesIO(animated))
    assert getattr(first, "n_frames", 1) == 2
    assert_same(probabilities_of(client, animated), reference(first.convert("RGB")))


def test_openapi_lists_both_endpoints_with_multipart_upload(client):
    spec = client.get("/openapi.json").json()
    for path in ("/predict", "/predict/topk"):
        body = spec["paths"][path]["post"]["requestBody"]
        schema_ref = body["content"]["multipart/form-data"]["schema"]["$ref"]
        schema = spec["components"]["schemas"][schema_ref.rsplit("/", 1)[-1]]
        assert schema["required"] == ["file"]
        assert schema["properties"]["file"]["type"] == "string"
        assert "200" in spec["paths"][path]["post"]["responses"]
        assert "413" in spec["paths"][path]["post"]["responses"]
    k = next(p for p in spec["paths"]["/predict/topk"]["post"]["parameters"] if p["name"] == "k")
    assert (k["schema"]["minimum"], k["schema"]["maximum"], k["schema"]["default"]) == (1, 1000, 5)
    assert client.get("/docs").status_code == 200


def test_every_prediction_says_the_model_version_that_made_it(client, service):
    version = client.get("/model").json()["version"]
    assert version == service.runtime.version and len(version) == 12 and int(version, 16) >= 0
    photo = upload(photo_bytes("coffee.png"))
    for path in ("/predict", "/predict/topk", "/predict/batch"):
        response = client.post(path, files=photo if path != "/predict/batch" else {"files": photo["file"]})
        assert response.status_code == 200 and response.headers["X-Model-Version"] == version
    assert "X-Model-Version" not in client.get("/health").headers  # not an answer of the model


def test_the_model_version_is_decided_by_the_weights_and_the_precision_only(runtime):
    from dataclasses import replace

    assert replace(runtime, backend="onnxruntime", device_name="another CPU").version == runtime.version
    assert replace(runtime, precision="bf16").version != runtime.version
    assert replace(runtime, weights_hash="0" * 32).version != runtime.version
    assert replace(runtime, precision="int8", int8_made={"model_hash": "a"}).version != \
        replace(runtime, precision="int8", int8_made={"model_hash": "b"}).version


def test_health_ready_and_model_info(client, weights_file):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ok"}
    info = client.get("/model").json()
    assert info["architecture"] == "resnet18"
    assert info["weights"] == f"file:{weights_file.name}"
    assert info["num_classes"] == 1000
    assert info["preprocessing"]["resize"] == 256 and info["preprocessing"]["crop"] == 224
    assert info["threads"] >= 1
