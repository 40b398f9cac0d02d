"""The tutorial CNN, widened, on CIFAR-10 (needs TFDS's normal download, i.e. internet).

flaxtrain --config=configs/cifar10_cnn.py --workdir=runs/cifar10_cnn
"""

from flaxtrain import config_lib


def get_config():
  c = config_lib.get_base_config()
  c.dataset.name = "cifar10"
  c.model = config_lib.cnn_model(features=(64, 128), dense=(512,))
  c.num_epochs = 30
  return config_lib.adamw_warmup_cosine(c, learning_rate=2e-3, weight_decay=5e-4, warmup_epochs=1.0)
