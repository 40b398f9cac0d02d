"""The book review's MLP (flatten -> Dense 128 -> relu -> Dense 10) on Fashion-MNIST.

flaxtrain --config=configs/fashion_mlp.py --workdir=runs/fashion_mlp
"""

from flaxtrain import config_lib


def get_config():
  c = config_lib.get_base_config()
  c.dataset.name = "fashion_mnist"
  c.model = config_lib.mlp_model(hidden=(128,))
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.schedule.name = "cosine"
  return c
