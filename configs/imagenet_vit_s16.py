"""ViT-S/16 on ImageNet (ILSVRC 2012): big_vision's 90-epoch plain-ViT recipe, streamed.

    python -m flaxtrain.datasets imagenet2012 --manual_dir=DIR_WITH_THE_TWO_TARS
    flaxtrain --config=configs/imagenet_vit_s16.py --workdir=runs/imagenet_vit_s16
    # On a Cloud TPU VM (data copied to gs://BUCKET/tfds, see README "Training on ImageNet"):
    scripts/tpu_vm.sh up --name=vit --zone=us-central1-a --project=P --tpu-type=v3-8 \
        --data-bucket=gs://BUCKET/tfds --workdir=gs://BUCKET/runs/vit_s16 \
        --config=configs/imagenet_vit_s16.py
    # 300 epochs (big_vision's ~80%): --config.num_epochs=300

Recipe (google-research/big_vision configs/vit_s16_i1k.py, arXiv 2205.01580): the
plain ViT-S/16 (global-average pool, fixed 2-D sin-cos position embedding, no class
token; 21,974,632 parameters with 1,000 classes), batch 1024, 90 epochs; Adam
(b1 0.9, b2 0.999), peak lr 1e-3, 10,000 warmup steps (8 epochs) then cosine to 0,
decoupled weight decay 1e-4 per step (flaxtrain's AdamW multiplies weight_decay by the
lr, so 0.1 here), global-norm clipping 1.0, bfloat16 compute. Input: Inception crops
(5-100% of the area) and flips at 224 px, RandAugment(2, 10), mixup with alpha 0.2;
pixels scaled to [-1, 1]; eval resizes the shorter side to 256 and centre-crops 224.

Expected: 76.5% top-1 after 90 epochs, "6-7h on a TPU-v3-8" (big_vision's README and
config). Differences from big_vision: no pre-logits layer (its rep_size=True adds a
384x384 tanh layer), Adam's first moment kept in float32 (big_vision: bfloat16),
mixup drawn per example (big_vision: one weight per batch), training on all of
'train' (big_vision holds out 1% as minival), RandAugment as flaxtrain's JAX version
on the device (flaxtrain/data/randaugment.py). Not measured by flaxtrain's authors:
there is no ImageNet or accelerator where it is developed; `flaxtrain
--config=configs/imagenet_vit_s16.py --mode=describe --topology=v3-8` checks the step
fits before a launch.
"""

from flaxtrain import config_lib


def get_config():
  c = config_lib.imagenet_input(
    config_lib.get_base_config(), "imagenet2012", image_size=224, crop_area_range=(0.05, 1.0)
  )
  c.dataset.mean = (127.5, 127.5, 127.5)  # big_vision's value_range(-1, 1).
  c.dataset.std = (127.5, 127.5, 127.5)
  c.model = config_lib.vit_model(variant="S/16", pool="gap", posemb="sincos2d")
  c.compute_dtype = "bfloat16"
  c.num_epochs = 90
  c.batch_size = 1024
  c.eval_batch_size = 1024
  c.log_every_steps = 50
  c.augment.randaugment_num_ops = 2
  c.augment.randaugment_magnitude = 10.0
  c.augment.mixup_alpha = 0.2
  c.optimizer.grad_clip_norm = 1.0
  # 10,000 warmup steps of 1,251 per epoch (1,281,167 images at batch 1024).
  return config_lib.adamw_warmup_cosine(
    c, learning_rate=1e-3, weight_decay=0.1, warmup_epochs=10_000 / 1251
  )
