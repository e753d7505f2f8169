"""PMG-V2 on the generated demo: configs/demo.py's tiny net and schedule length at 128 px.

PMG-V2 tiles the backbone's stages 8, 4 and 2 tiles per side, each tile a side its stage's stride divides:
for a ResNet the crop must be a multiple of 64, so the demo's 96 is refused (`--config configs/demo.py
--config.method=pmg_v2` says which stage); this crops 128 of 144.
Three seeds: 84.9% combined, 83.6-85.5 (bench/RESULTS.md, "The demo over seeds").
"""

from configs import demo


def get_config():
    c = demo.get_config()
    c.method = "pmg_v2"
    c.dataset.demo_image_size = 144
    c.data.resize_size = 144
    c.data.crop_size = 128
    c.optim.schedule = "cosine"  # 12 epochs: the step at epoch 100 of the method's default would never come
    c.log_cams = 0
    return c
