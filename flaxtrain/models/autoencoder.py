"""The tutorials' AutoEncoder: encoder and decoder MLPs, callable apart.

    z = model.apply(variables, images, method=model.encode)
    logits = model.apply(variables, z, method=model.decode)  # sigmoid -> images

`__call__` is decode(encode(x)) and returns pixel logits shaped like the input. With
`activity_l1 > 0` the encoder adds an L1 penalty on the code through Flax's `sow`
into the 'losses' collection: the loop adds it to the training loss, logged apart.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class AutoEncoder(nn.Module):
  image_shape: Sequence[int]
  encoder: Sequence[int] = (256, 128)
  latent: int = 32
  decoder: Sequence[int] = (128, 256)
  activity_l1: float = 0.0
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.enc = [nn.Dense(f, dtype=self.dtype) for f in (*self.encoder, self.latent)]
    size = 1
    for d in self.image_shape:
      size *= d
    self.dec = [nn.Dense(f, dtype=self.dtype) for f in (*self.decoder, size)]

  def encode(self, x):
    x = x.reshape((x.shape[0], -1))
    for layer in self.enc[:-1]:
      x = nn.relu(layer(x))
    z = self.enc[-1](x)
    if self.activity_l1:
      self.sow(
        "losses",
        "activity_l1",
        self.activity_l1 * jnp.mean(jnp.sum(jnp.abs(z.astype(jnp.float32)), -1)),
      )
    return z

  def decode(self, z):
    for layer in self.dec[:-1]:
      z = nn.relu(layer(z))
    return self.dec[-1](z).reshape((z.shape[0], *self.image_shape))

  def __call__(self, x, *, train: bool = False):
    del train
    return self.decode(self.encode(x))
