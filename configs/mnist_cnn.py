"""The tutorial CNN on MNIST (needs TFDS's normal download, i.e. internet).

flaxtrain --config=configs/mnist_cnn.py --workdir=runs/mnist_cnn
"""

from flaxtrain import config_lib


def get_config():
  c = config_lib.get_base_config()
  c.dataset.name = "mnist"
  c.model = config_lib.cnn_model(features=(32, 64), dense=(256,))
  c.num_epochs = 5
  return config_lib.adamw_warmup_cosine(c, learning_rate=2e-3, weight_decay=1e-4, warmup_epochs=0.5)
