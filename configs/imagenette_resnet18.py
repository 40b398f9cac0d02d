"""ResNet-18 on Imagenette at 128 px: ImageNet's pipeline at a size a laptop can train.

    python -m flaxtrain.datasets imagenette/160px-v2
    flaxtrain --config=configs/imagenette_resnet18.py --workdir=runs/imagenette_resnet18

Imagenette (fast.ai): 10 easy ImageNet classes, 9,469 train / 3,925 validation JPEGs of
varying size (the 160px-v2 variant: shorter side 160 px, a 99 MB download). The same
streamed pipeline as configs/imagenet_resnet50.py: Grain workers decode the JPEGs on the
host, Inception random-resized crops (35-100% of the area) and flips at 128 px for
training, shorter side to 146 px and a 128 px centre crop for eval, ImageNet mean/std on
the device. ResNet-18 (ImageNet stem; 11.2 M parameters), SGD Nesterov 0.9, lr 0.2 at
batch 128, weight decay 5e-5, label smoothing 0.1, 2 warmup epochs, cosine over 40 epochs.

Expected: not yet measured by flaxtrain's authors (TFDS cannot download here; the recipe
runs in the tests on mocked records). For scale, fast.ai's Imagenette leaderboard lists
84-93% at 128 px for 5-80 epochs of an xresnet50 with more tricks.
"""

from flaxtrain import config_lib


def get_config():
  c = config_lib.imagenet_input(
    config_lib.get_base_config(), "imagenette/160px-v2", image_size=128, crop_area_range=(0.35, 1.0)
  )
  c.task.label_smoothing = 0.1
  c.model = config_lib.resnet_model("resnet18")
  c.num_epochs = 40
  c.batch_size = 128
  c.eval_batch_size = 500
  return config_lib.sgd_warmup_cosine(c, learning_rate=0.2, weight_decay=5e-5, warmup_epochs=2.0)
