"""A few-minute CPU run on the generated fine-grained dataset (no download): tiny ResNet50-style net at 96 px."""

from pmg_jax import config


def get_config():
    c = config.for_dataset("demo")
    c.data.hflip = True
    c.model.backbone = "resnet50"
    c.model.width = 16
    c.model.stage_sizes = (1, 1, 1, 1)
    c.model.feature_size = 64
    c.optim.lr_new = 0.02  # from-scratch tiny net: 10x the reference rates
    c.optim.lr_backbone = 0.02
    c.batch_size = 16
    c.eval_batch_size = 64
    c.num_epochs = 8
    c.log_every_steps = 8
    return c
