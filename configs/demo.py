"""A few-minute CPU run on the generated fine-grained dataset (no download): tiny ResNet50-style net at 96 px."""

from pmg_jax import config


def get_config():
    c = config.for_dataset("demo")
    c.data.hflip = True
    c.model.backbone = "resnet50"
    c.model.width = 16
    c.model.stage_sizes = (1, 1, 1, 1)
    c.model.feature_size = 64
    # From scratch, one rate for the whole tiny net. 12 epochs at 0.005 were the best of the settings tried
    # (bench/RESULTS.md, "The demo over seeds"): 8 epochs at 0.02 gave a lower mean and a wider spread.
    c.optim.lr_new = 0.005
    c.optim.lr_backbone = 0.005
    c.batch_size = 16
    c.eval_batch_size = 64
    c.num_epochs = 12
    c.log_every_steps = 8
    c.log_cams = 4  # watch each block's Grad-CAM of 4 test images evolve (TensorBoard, cams/epoch_<e>.png)
    return c
