"""The base config every `configs/*.py` starts from: every key declared once, typed.

Config files call `get_base_config()`, change what differs and return it; the
CLI locks the result, so a typo'd override fails instead of adding a key.
"""

import ml_collections
from ml_collections import config_dict

# ImageNet's per-channel statistics in pixel units (torchvision, the Flax example).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Global batch, across all devices of all processes. Must divide by the device count.
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.num_epochs = 10
  c.num_train_steps = config_dict.placeholder(int)  # Overrides num_epochs when set.
  c.log_every_steps = 100
  c.eval_every_steps = config_dict.placeholder(int)  # Default: once per epoch.
  c.checkpoint_every_steps = config_dict.placeholder(int)  # Default: once per epoch.
  c.keep_checkpoints = 3  # The newest N are kept, plus the best by eval accuracy.
  # Train steps run per device dispatch (lax loop on device); log/eval/checkpoint
  # steps stay exact. 0 picks a default: 25, or 1 on a CPU for a model with convolutions.
  c.steps_per_dispatch = 0
  # 'error' stops at a NaN/Inf loss or gradient without applying it; 'skip' drops the
  # update and counts it in the metrics.
  c.nonfinite = "error"
  c.init_from = config_dict.placeholder(str)  # Another run's workdir or checkpoint dir.
  c.compute_dtype = "float32"  # 'bfloat16': bf16 compute, float32 parameters and optimizer.
  # Exponential moving average of the parameters (0: off), used for eval and saved with
  # the checkpoint. The decay ramps up as min(ema_decay, (1 + step) / (10 + step)).
  c.ema_decay = 0.0
  # Gradient accumulation: each device's share of the global batch is split into this
  # many micro-batches whose gradients are averaged into one update.
  c.grad_accum_steps = 1
  # Bitwise-reproducible results on any topology (0: off, the fast default). N > 0 splits
  # the global batch into N fixed shards (N a power of two, a multiple of the device
  # count) and sums their gradients in one fixed binary tree, so 1 device, 8 devices and
  # 2 hosts x 4 devices compute the same bits. Costs N / devices passes per device and
  # log2(devices) neighbour exchanges instead of one all-reduce. Not with BatchNorm.
  c.topology_invariant_shards = 0
  # jax.profiler trace of train steps (start, count), e.g. (100, 5): written under
  # <workdir>/plugins/profile/ for TensorBoard's profile plugin, by process 0 only
  # (-1: every process). None: off. The trace does not change the run's results.
  c.profile_steps = config_dict.placeholder(tuple)
  c.profile_process = 0
  # Where metrics go, comma-separated: tensorboard (event files in the workdir), wandb,
  # mlflow, e.g. 'tensorboard,wandb' (docs/trackers.md). Only process 0 writes.
  c.loggers = "tensorboard"
  # The wandb project and MLflow experiment. Default: $WANDB_PROJECT (wandb) or
  # $MLFLOW_EXPERIMENT_NAME (MLflow), else 'flaxtrain'.
  c.tracker_project = config_dict.placeholder(str)

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "fashion_mnist"
  c.dataset.data_dir = config_dict.placeholder(str)  # TFDS data dir; default TFDS's own.
  c.dataset.manual_dir = config_dict.placeholder(str)  # Local copies of the original files.
  c.dataset.train_split = "train"
  c.dataset.eval_split = "test"
  # 'memory': decode both splits into host memory (fixed-size images only); 'stream':
  # read records by random access from TFDS's ArrayRecord files and decode them in Grain
  # worker processes; 'auto': stream when the images vary in size, need resizing or
  # random-resized crops, or would take over a quarter of host memory decoded.
  c.dataset.source = "auto"
  # Side of the (square) images the model gets. Default: the dataset's own size when it
  # is fixed, 224 when it varies. Resizing happens on the host (streamed data).
  c.dataset.image_size = config_dict.placeholder(int)
  # Eval of images of varying size: resize the shorter side to image_size / this, then
  # centre-crop image_size (fixed-size images are only resized).
  c.dataset.eval_crop_fraction = 0.875
  # Per-channel normalisation on the device, in pixel units (0-255), e.g. ImageNet's
  # mean (123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375). None: x / 255.
  c.dataset.mean = config_dict.placeholder(tuple)
  c.dataset.std = config_dict.placeholder(tuple)
  # Streaming: Grain worker processes per process (-1: one per core up to 64; 0: none,
  # decode in threads of the training process), threads per process (-1: 1 per worker, or
  # one per core when workers is 0), batches prefetched per worker.
  c.dataset.workers = -1
  c.dataset.threads = -1
  c.dataset.prefetch = 2
  # In-memory data: keep the decoded dataset on every device and gather batches there
  # ('auto': when it is small enough); otherwise gather on the host and transfer.
  c.dataset.on_device = "auto"

  # Train-time augmentation, per example on the device (see flaxtrain/data/augment.py).
  c.augment = ml_collections.ConfigDict()
  c.augment.crop_padding = 0  # Pixels of zero padding for a random crop (0: off).
  c.augment.flip = False  # Random left-right mirror.
  c.augment.erase_prob = 0.0  # Probability of random erasing.
  # On the host, streamed data only: Inception-style random-resized crop to image_size
  # (area fraction and aspect-ratio ranges; a centre crop when 10 tries fail).
  c.augment.random_resized_crop = False
  c.augment.crop_area_range = (0.08, 1.0)
  c.augment.crop_aspect_range = (3 / 4, 4 / 3)
  # RandAugment (big_vision/timm op set): num_ops random ops per image at this magnitude
  # (0-30; 10 is timm's full scale, _LEVEL_DENOM; 0 ops: off). From (seed, step, example).
  c.augment.randaugment_num_ops = 0
  c.augment.randaugment_magnitude = 10.0
  # Mixup and CutMix with timm's semantics, in the train step: each example is mixed with
  # a partner with probability mix_prob; when both alphas are > 0, CutMix is used with
  # probability mix_switch_prob. Label smoothing is applied to the labels before mixing.
  # Deterministic from (seed, step, example): the same on any device or process count.
  c.augment.mixup_alpha = 0.0  # Beta(alpha, alpha) mixing weights; 0: off.
  c.augment.cutmix_alpha = 0.0  # Beta(alpha, alpha) box areas; 0: off.
  c.augment.mix_prob = 1.0
  c.augment.mix_switch_prob = 0.5

  c.model = ml_collections.ConfigDict()
  c.model.name = "cnn"

  c.task = ml_collections.ConfigDict()
  c.task.name = "classification"
  c.task.label_smoothing = 0.0  # classification
  c.task.loss = "mse"  # reconstruction: 'mse' or 'bce'

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1  # Peak learning rate of the schedule.
  c.optimizer.momentum = 0.9  # sgd
  c.optimizer.nesterov = False  # sgd
  c.optimizer.b1 = 0.9  # adam, adamw
  c.optimizer.b2 = 0.999  # adam, adamw
  c.optimizer.eps = 1e-8  # adam, adamw
  c.optimizer.weight_decay = 0.0  # Decoupled for adamw; added to the gradient otherwise.
  c.optimizer.weight_decay_mask = "kernels"  # 'kernels' leaves biases and norm scales alone; 'all'.
  c.optimizer.grad_clip_norm = config_dict.placeholder(float)  # Global-norm clipping.
  # Layer-wise learning-rate decay for fine-tuning: the head gets the full rate, block k
  # of n gets decay ** (n - k), the embeddings decay ** (n + 1). 1.0: off.
  c.optimizer.layer_decay = 1.0
  # Parameters that get no updates: 'none', 'backbone' (all but the head: a linear
  # probe), or a regular expression matched against 'a/b/c' parameter paths.
  c.optimizer.freeze = "none"

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "constant"  # constant | cosine | warmup_cosine | piecewise
  c.schedule.warmup_epochs = 0.0  # warmup_cosine
  c.schedule.end_factor = 0.0  # cosine, warmup_cosine: final lr as a fraction of the peak.
  c.schedule.boundaries_epochs = (5.0, 8.0)  # piecewise
  c.schedule.decay_factor = 0.1  # piecewise: lr multiplied by this at each boundary.
  return c


def imagenet_input(
  c: ml_collections.ConfigDict, name: str, image_size: int, crop_area_range=(0.08, 1.0)
) -> ml_collections.ConfigDict:
  """ImageNet-style streamed input: random-resized crops and flips for training, 87.5%
  centre crops for eval, ImageNet mean/std on the device."""
  c.dataset.name = name
  c.dataset.eval_split = "validation"
  c.dataset.source = "stream"
  c.dataset.image_size = image_size
  c.dataset.eval_crop_fraction = 0.875  # 224 of 256.
  c.dataset.mean, c.dataset.std = IMAGENET_MEAN, IMAGENET_STD
  c.augment.random_resized_crop = True
  c.augment.crop_area_range = crop_area_range
  c.augment.crop_aspect_range = (3 / 4, 4 / 3)
  c.augment.flip = True
  return c


def adamw_warmup_cosine(
  c: ml_collections.ConfigDict, learning_rate: float, weight_decay: float, warmup_epochs: float
) -> ml_collections.ConfigDict:
  """The recipe of the CNN configs: AdamW, linear warmup, cosine decay to 0."""
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = learning_rate
  c.optimizer.weight_decay = weight_decay
  c.schedule.name = "warmup_cosine"
  c.schedule.warmup_epochs = warmup_epochs
  return c


def sgd_warmup_cosine(
  c: ml_collections.ConfigDict, learning_rate: float, weight_decay: float, warmup_epochs: float
) -> ml_collections.ConfigDict:
  """The recipe of the ResNet configs: SGD, Nesterov momentum 0.9, warmup, cosine to 0."""
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = learning_rate
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = weight_decay
  c.schedule.name = "warmup_cosine"
  c.schedule.warmup_epochs = warmup_epochs
  return c


def cnn_model(
  features=(32, 64), dense=(256,), dropout=0.0, conv="auto"
) -> ml_collections.ConfigDict:
  """conv: 'auto' (im2col + matmul on CPU, XLA's convolutions elsewhere), 'xla', 'im2col'."""
  return ml_collections.ConfigDict(
    dict(name="cnn", features=features, dense=dense, dropout=dropout, conv=conv)
  )


def mlp_model(hidden=(128,)) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(name="mlp", hidden=hidden))


def resnet_model(
  name="resnet18",
  stage_sizes=(2, 2, 2, 2),
  width=64,
  dropout=0.0,
  stem="imagenet",
  stage_strides=(),
  remat="none",
  drop_path=0.0,
) -> ml_collections.ConfigDict:
  """resnet18/34/50 (stages fixed by the name) or resnet_small (3x3 stem, stages given).

  stage_strides: stride of each stage's first block; () for (1, 2, 2, ...).
  remat: 'none', or 'block': each residual block's activations are recomputed in the
  backward pass instead of kept (less device memory, ~1/3 more compute).
  drop_path: stochastic depth, the drop rate of the last block's residual branch (rising
  linearly from 0 at the first block).
  """
  return ml_collections.ConfigDict(
    dict(
      name=name,
      stage_sizes=stage_sizes,
      width=width,
      dropout=dropout,
      stem=stem,
      stage_strides=stage_strides,
      remat=remat,
      drop_path=drop_path,
    )
  )


def wide_resnet_model(depth=28, widen=10, dropout=0.0, remat="none") -> ml_collections.ConfigDict:
  """remat: as for resnet_model."""
  return ml_collections.ConfigDict(
    dict(name="wide_resnet", depth=depth, widen=widen, dropout=dropout, remat=remat)
  )


def vit_model(
  variant="S/16",
  pool="gap",
  posemb="sincos2d",
  drop_path=0.0,
  dropout=0.0,
  width=0,
  depth=0,
  heads=0,
  mlp_dim=0,
  patch_size=0,
) -> ml_collections.ConfigDict:
  """A Vision Transformer (Flax NNX, flaxtrain/models/vit.py).

  variant: 'Ti/16', 'S/16', 'B/16', 'L/16' (or /32): width, depth, heads and MLP size
  of the ViT paper and timm, and the patch size. width/depth/heads/mlp_dim/patch_size
  > 0 override the variant's (small ViTs for small images).
  pool='gap', posemb='sincos2d': big_vision's plain ViT (global-average pool, fixed 2-D
  sin-cos position embedding, no class token); pool='token', posemb='learn': the
  classic ViT and timm's (class token, learned position embedding).
  drop_path: stochastic depth rate of the last block (linear from 0 at the first).
  """
  return ml_collections.ConfigDict(
    dict(
      name="vit",
      variant=variant,
      pool=pool,
      posemb=posemb,
      drop_path=drop_path,
      dropout=dropout,
      width=width,
      depth=depth,
      heads=heads,
      mlp_dim=mlp_dim,
      patch_size=patch_size,
    )
  )


def autoencoder_model(
  encoder=(256, 128), latent=32, decoder=(128, 256), activity_l1=0.0
) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      name="autoencoder", encoder=encoder, latent=latent, decoder=decoder, activity_l1=activity_l1
    )
  )
