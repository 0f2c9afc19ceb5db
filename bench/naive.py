"""The baseline: the ResNet18 service most tutorials build, for make bench to measure beside this one.

    uvicorn naive:app --app-dir bench        (MODEL_WEIGHTS=/path/to/resnet18.pth)

The model is called inside the request handler: no batching, no decode pool, no limits, torch's default
threads. Same weights, same preprocessing, same answers; only how the work is scheduled differs.
"""

from __future__ import annotations

import io
import os

import torch
from fastapi import FastAPI, UploadFile
from PIL import Image
from torchvision.models import ResNet18_Weights, resnet18

weights = ResNet18_Weights.DEFAULT
model = resnet18()
model.load_state_dict(torch.load(os.environ["MODEL_WEIGHTS"], weights_only=True))
model.eval()
transform = weights.transforms()
labels = weights.meta["categories"]

app = FastAPI()


@app.get("/ready")
def ready() -> dict:
    return {"status": "ok"}


@app.post("/predict")
async def predict(file: UploadFile) -> dict:
    image = Image.open(io.BytesIO(await file.read())).convert("RGB")
    with torch.no_grad():
        probabilities = torch.softmax(model(transform(image).unsqueeze(0)), dim=1)[0]
    score, index = probabilities.max(0)
    return {"label": labels[index], "index": int(index), "score": float(score)}
