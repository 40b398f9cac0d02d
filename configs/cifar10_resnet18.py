"""ResNet-18 (3x3 stem, for 32 px images) on CIFAR-10: the standard GPU/TPU recipe.

    flaxtrain --config=configs/cifar10_resnet18.py --workdir=runs/cifar10_resnet18

SGD with Nesterov momentum 0.9, peak lr 0.4 for batch 512 (0.1 per 128), weight decay
5e-4 on kernels, 2 warmup epochs then cosine to 0 over 100 epochs; random crops (pad 4)
and flips; label smoothing 0.1; bfloat16 compute. Published recipes of this kind reach
94-95% test accuracy; 11,173,962 parameters. CIFAR-10 needs TFDS's normal download, so
on this offline CPU machine only a smoke run was made (tests/test_configs: a few steps
on stand-in data).
"""

from flaxtrain import config_lib


def get_config():
  c = config_lib.get_base_config()
  c.dataset.name = "cifar10"
  c.model = config_lib.resnet_model("resnet18", width=64, stem="small")
  c.num_epochs = 100
  c.batch_size = 512
  c.compute_dtype = "bfloat16"
  c.augment.crop_padding = 4
  c.augment.flip = True
  c.task.label_smoothing = 0.1
  return config_lib.sgd_warmup_cosine(c, learning_rate=0.4, weight_decay=5e-4, warmup_epochs=2.0)
