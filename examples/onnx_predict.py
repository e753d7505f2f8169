"""Classify one image with a model from `python -m pmg_jax.export --format onnx`: onnxruntime and OpenCV only.

python examples/onnx_predict.py exported/cub_onnx bird.jpg
"""

import json
import os
import sys

import cv2
import numpy as np
import onnxruntime

folder, image_path = sys.argv[1:3]
with open(os.path.join(folder, "model.json")) as f:
    card = json.load(f)
image = cv2.cvtColor(cv2.imread(image_path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
size, crop = card["resize_size"], card["crop_size"]
shrink = min(image.shape[:2]) > size  # model.json: antialias a shrink (INTER_AREA is OpenCV's close match)
image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
top = round((size - crop) / 2)
batch = np.ascontiguousarray(image[top : top + crop, top : top + crop])[None]  # uint8 NHWC; the model normalises
session = onnxruntime.InferenceSession(os.path.join(folder, card["files"][0]), providers=["CPUExecutionProvider"])
probabilities = session.run(["probabilities"], {card["input"]["name"]: batch})[0][0]
for i in np.argsort(-probabilities)[:5]:
    print(f"{card['class_names'][i]} {probabilities[i]:.4f}")
