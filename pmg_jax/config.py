"""Every config field with its default (the PMG reference: ResNet50, 550 -> 448), and the dataset presets.

The library owns these: checkpoints are restored over them, configs are checked against them, and
`configs/*.py` (the experiments) start from `get_config()` or `for_dataset(name)`.
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds initialisation, jigsaw permutations, data order and augmentation
    c.method = "pmg"  # pmg: jigsaw passes, 4 heads | pmg_v2: tiled stages, consistency loss, 3 heads (methods.py)

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "cub"  # demo | cub | cars | aircraft | dogs | imagefolder | any TFDS builder (source='tfds')
    c.dataset.source = "folder"  # folder: an extracted download or ImageFolder; tfds: a prepared TFDS data_dir
    c.dataset.data_dir = ""  # the dataset's folder, or the TFDS data_dir (local or a bucket; '' = TFDS default)
    c.dataset.num_classes = 200  # must match the dataset's class count (checked when the data is opened)
    c.dataset.train_split = "train"  # split to train on (aircraft: trainval; imagefolder: a folder; TFDS: any split)
    c.dataset.test_split = "test"  # split to evaluate on
    c.dataset.val_fraction = 0.0  # hold out this stratified share of train_split as 'val'; best is then chosen on it
    c.dataset.val_seed = 0  # which examples val_fraction holds out
    c.dataset.tfds_name = ""  # TFDS builder; '' = caltech_birds2011 / cars196 / stanford_dogs for cub / cars / dogs
    c.dataset.tfds_image_key = "image"  # TFDS feature holding the image
    c.dataset.tfds_label_key = "label"  # TFDS feature holding the class label
    c.dataset.demo_image_size = 128  # demo only: side of the generated images
    c.dataset.demo_seed = 0  # demo only: generator seed
    c.dataset.demo_train_size = 2000  # demo only: training images
    c.dataset.demo_test_size = 500  # demo only: test images

    c.data = ml_collections.ConfigDict()
    c.data.resize_size = 550  # images are resized to this square first (aspect ignored)
    c.data.crop_size = 448  # network input side: random crop (train) / centre crop (eval)
    c.data.pad = 8  # zero padding before the random crop
    c.data.hflip = True  # random horizontal flip in training
    c.data.mean = (0.5, 0.5, 0.5)  # per-channel normalisation mean (after scaling to [0, 1])
    c.data.std = (0.5, 0.5, 0.5)  # per-channel normalisation std
    c.data.resize_backend = "auto"  # auto: PIL (the reference) where a side shrinks, else OpenCV | pil | opencv (fast)
    c.data.max_image_pixels = 178_956_970  # larger images are reported and skipped unread (PIL's bomb limit)
    c.data.normalize_on_device = True  # ship uint8 crops (4x less to move) and normalise inside the jitted step
    c.data.workers = 0  # Grain worker processes for decoding/augmentation (0: in-process)
    c.data.prefetch = 4  # batches buffered per worker

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "resnet50"  # pmg_jax.backbones: resnet18..152, resnet18d..152d, convnext_tiny/small/base
    c.model.width = 0  # base width (stem / first stage); 0 = the backbone's standard (64 for ResNets, 96 ConvNeXt-T)
    c.model.stage_sizes = ()  # blocks per stage; empty = the backbone's standard counts
    c.model.feature_size = 512  # channels of each block's 1x1 conv (its output has twice this)
    c.model.drop_path_rate = 0.0  # stochastic depth of the backbone's last block, rising from 0 (convnext_* only)
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
    c.model.kernels = "auto"  # auto: platform fast paths where they pay (pmg_jax.kernels) | xla: plain XLA ops
    c.model.remat = "none"  # none | blocks: backward recomputes blocks and heads | stages: and backbone stages
    c.model.bn_group_size = 0  # ghost BN: normalise in groups of this many training images (0: whole batch)
    c.model.bn_group_stats = "mean"  # grouped running stats: mean over the groups | first: group 0 (GPU 0's)

    c.jigsaw = ml_collections.ConfigDict()
    c.jigsaw.granularities = (8, 4, 2)  # jigsaw grid n of the passes for head1, head2, head3
    c.jigsaw.mode = "cycle"  # cycle: reference single cycle shared by the batch; uniform: per image

    c.optim = ml_collections.ConfigDict()
    c.optim.lr_new = 0.002  # learning rate of the blocks and heads (epoch-cosine decayed)
    c.optim.lr_backbone = 0.0002  # learning rate of the backbone (the ResNet trunk)
    c.optim.momentum = 0.9  # SGD momentum (no Nesterov)
    c.optim.weight_decay = 5e-4  # added to the gradient of every parameter
    c.optim.warmup_epochs = 0  # epochs of linear learning-rate warm-up per update (0: none, as the reference)

    c.concat_loss_weight = 2.0  # the concat pass trains on 2 x cross-entropy
    c.schedule = "progressive"  # progressive: 4 passes, 4 updates | joint: 4 inputs as one 4B batch, 1 update
    c.accumulation_steps = 1  # k micro-batches per update, gradients averaged; BN per micro-batch (k stat steps)
    c.bn_stats = "all"  # all: every pass updates every BN's running stats (reference); used: those feeding its loss
    c.batch_size = 16  # global batch (all devices and hosts together)
    c.eval_batch_size = 16  # global eval batch; the last one is padded and masked
    c.num_epochs = 200  # epochs; also the period of the cosine schedule
    c.eval_every_epochs = 1  # evaluate on the test split every this many epochs
    c.log_every_steps = 10  # fetch metrics to the host every this many steps
    c.log_cams = 0  # at each evaluation, Grad-CAM of this many fixed test images to TensorBoard and cams/ (0: off)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 3  # keep the latest N checkpoints (plus the best)
    c.checkpoint.every_steps = 0  # also checkpoint every N steps within an epoch (0: at epoch ends only)

    c.init = ml_collections.ConfigDict()
    c.init.backbone = ""  # ResNet weights to start from (.pth/.safetensors/.npz, torchvision or timm names)
    c.init.checkpoint = ""  # a run or checkpoint whose weights start training, or that eval_only evaluates
    c.init.which = "latest"  # latest | best: which checkpoint of that run (or of the workdir, for eval_only)
    c.eval_only = False  # evaluate init.checkpoint (or the workdir's latest) on the test split and stop
    # Resuming refuses a change to what a step or the data position means (validate.RESUME_FIELDS: batch size,
    # accumulation, schedule, warm-up, seed, the training data); name the fields you mean to change, comma
    # separated (e.g. 'batch_size,seed'), or 'all'.
    c.resume_changes = ""
    return c


# Per dataset: the fields that differ from the defaults (dataset.* unless dotted). data_dir is the folder
# source's (relative to the working directory); TFDS uses its own data_dir.
DATASETS: dict[str, dict[str, object]] = {
    "cub": {"data_dir": "data/CUB_200_2011", "num_classes": 200, "data.workers": 8},  # extracted CUB_200_2011.tgz
    "cars": {"data_dir": "data/stanford_cars", "num_classes": 196, "data.workers": 8},
    "aircraft": {
        "data_dir": "data/fgvc-aircraft-2013b",
        "num_classes": 100,
        "train_split": "trainval",
        "data.workers": 8,
    },
    "dogs": {"data_dir": "data/stanford_dogs", "num_classes": 120, "data.workers": 8},  # images, annotation, lists
    # the generated demo (no download): 8 classes at 112 px, cropped to 96 (divisible by 32 and by 8)
    "demo": {
        "num_classes": 8,
        "demo_image_size": 112,
        "demo_train_size": 1024,
        "demo_test_size": 256,
        "data.resize_size": 112,
        "data.crop_size": 96,
        "data.pad": 0,
    },
}
TFDS_DATASETS = ("cub", "cars", "dogs")  # those with a TFDS builder (FGVC-Aircraft has none)


def for_dataset(name: str, source: str = "folder") -> ml_collections.ConfigDict:
    """The defaults for one of DATASETS read from `source` ('folder' or 'tfds'; decoding 448-pixel crops
    for a GPU takes several cores, hence 8 input workers for the real datasets)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; presets exist for {', '.join(DATASETS)}")
    if source not in ("folder", "tfds") or (source == "tfds" and name not in TFDS_DATASETS):
        raise ValueError(f"dataset {name!r} cannot be read from source {source!r}")
    c = get_config()
    c.dataset.name = name
    c.dataset.source = source
    for key, value in DATASETS[name].items():
        section, _, field = key.rpartition(".")
        c[section or "dataset"][field] = value
    if source == "tfds":
        c.dataset.data_dir = ""  # the TFDS data_dir ('' = TFDS's default)
    return c
