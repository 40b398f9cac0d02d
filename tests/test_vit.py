import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxtrain.errors import UserError
from flaxtrain.models.vit import DropPath, ViT, params_from_timm, posemb_sincos_2d

TINY = dict(image_shape=(28, 28, 1), width=32, depth=2, heads=2, mlp_dim=64, patch_size=7)

# timm's published counts (1000 classes, 224x224x3) for vit_{tiny,small,base,large}_patch16_224
# and vit_base_patch32_224, e.g. 86,567,656 for vit_base_patch16_224.
TIMM_COUNTS = {
  "Ti/16": 5_717_416,
  "S/16": 22_050_664,
  "B/16": 86_567_656,
  "L/16": 304_326_632,
  "B/32": 88_224_232,
}
# big_vision's plain ViT: the same minus the class token and the learned posemb.
PLAIN_COUNTS = {"S/16": 21_974_632, "B/16": 86_415_592}


def _classic_count(width, depth, mlp_dim, patch, classes=1000, side=224, channels=3):
  """timm's VisionTransformer, counted from its layers (qkv_bias=True, one final norm)."""
  tokens = (side // patch) ** 2 + 1
  embed = patch * patch * channels * width + width + width + tokens * width  # conv, cls, posemb
  block = (
    2 * 2 * width  # norm1, norm2
    + width * 3 * width
    + 3 * width  # qkv
    + width * width
    + width  # proj
    + width * mlp_dim
    + mlp_dim  # fc1
    + mlp_dim * width
    + width  # fc2
  )
  return embed + depth * block + 2 * width + width * classes + classes  # blocks, norm, head


def _count(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _abstract(variant, **kw):
  return nnx.eval_shape(
    lambda: ViT(1000, image_shape=(224, 224, 3), variant=variant, rngs=nnx.Rngs(0), **kw)
  )


@pytest.mark.parametrize("variant", sorted(TIMM_COUNTS))
def test_classic_parameter_counts_match_timm(variant):
  size, patch = variant.split("/")
  width, depth, heads, mlp_dim = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
  }[size]
  assert _classic_count(width, depth, mlp_dim, int(patch)) == TIMM_COUNTS[variant]
  model = _abstract(variant, pool="token", posemb="learn")
  assert _count(model) == TIMM_COUNTS[variant]


@pytest.mark.parametrize("variant", sorted(PLAIN_COUNTS))
def test_plain_parameter_counts(variant):
  model = _abstract(variant)
  width = model.norm.scale.shape[0]
  tokens = 224 // int(variant.split("/")[1])
  assert PLAIN_COUNTS[variant] == TIMM_COUNTS[variant] - width - (tokens**2 + 1) * width
  assert _count(model) == PLAIN_COUNTS[variant]
  assert not hasattr(model, "cls_token") and not hasattr(model, "pos_embed")


def test_overrides_replace_the_variant():
  model = nnx.eval_shape(lambda: ViT(10, variant="B/16", rngs=nnx.Rngs(0), **TINY))
  assert model.patch_embed.kernel.shape == (7, 7, 1, 32)
  assert len(model.blocks) == 2
  assert model.blocks[0].mlp.fc1.kernel.shape == (32, 64)
  assert model.blocks[0].attn.heads == 2


def _tiny(seed=0, **kw):
  """A tiny ViT whose head is random (the real init is zeros, which hides the forward pass)."""
  model = ViT(10, rngs=nnx.Rngs(params=seed, dropout=seed + 1), **{**TINY, **kw})
  model.head.kernel[...] = jax.random.normal(jax.random.key(seed + 7), model.head.kernel.shape)
  return model


@nnx.jit
def _run(model, x):
  # One compiled call instead of many eager ops keeps the file fast.
  return model(x)


def _images(n=4, shape=(28, 28, 1), seed=0):
  return jax.random.normal(jax.random.key(seed), (n, *shape))


def test_forward_shapes_dtypes_and_zero_head():
  model = ViT(10, rngs=nnx.Rngs(0), **TINY)
  assert np.all(np.asarray(model.head.kernel[...]) == 0)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert not nnx.state(model, nnx.BatchStat)
  for pool, posemb in [("gap", "sincos2d"), ("token", "learn"), ("gap", "learn")]:
    logits = _run(_tiny(pool=pool, posemb=posemb), _images())
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32


def test_bf16_compute_gives_float32_logits_and_float32_params():
  x = _images()
  f32 = _tiny()
  bf16 = _tiny(dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  logits = _run(bf16, x.astype(jnp.bfloat16))
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, _run(f32, x), atol=0.15, rtol=0.05)


def test_eval_is_deterministic_and_train_draws_from_dropout_stream():
  x = _images()
  model = _tiny(drop_path=0.5, dropout=0.1)
  model.eval()
  np.testing.assert_array_equal(_run(model, x), _run(model, x))
  model.train()
  nnx.reseed(model, dropout=1)
  a = _run(model, x)
  nnx.reseed(model, dropout=2)
  b = _run(model, x)
  nnx.reseed(model, dropout=1)
  np.testing.assert_array_equal(_run(model, x), a)  # reseed reaches every stream
  assert not np.allclose(a, b)


def test_train_equals_eval_without_regularisation():
  x = _images()
  model = _tiny()
  model.train()
  train = _run(model, x)
  model.eval()
  np.testing.assert_array_equal(train, _run(model, x))


def test_pure_step_with_split_and_merge():
  """The adapter's pattern: split outside, merge and call inside a jitted pure function."""
  model = _tiny(drop_path=0.5)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def apply(params, rest, x):
    model = nnx.merge(graphdef, params, rest)
    y = model(x)
    return y, nnx.state(model, nnx.RngState)

  x = _images()
  a, rng_state = apply(params, rest, x)
  nnx.update(model, rng_state)
  b, _ = apply(params, nnx.state(model, nnx.Not(nnx.Param)), x)
  assert not np.allclose(a, b)  # the streams' counts advanced


def test_drop_path_rates_rise_linearly():
  model = nnx.eval_shape(lambda: ViT(10, drop_path=0.3, rngs=nnx.Rngs(0), **{**TINY, "depth": 4}))
  rates = [(b.drop_path1.rate, b.drop_path2.rate) for b in model.blocks]
  np.testing.assert_allclose(rates, [(r, r) for r in (0.0, 0.1, 0.2, 0.3)])


def test_drop_path_drops_whole_examples_at_its_rate():
  layer = DropPath(0.25, rngs=nnx.Rngs(dropout=0))
  x = jnp.ones((4000, 3, 2))
  y = np.asarray(layer(x))
  per_example = y.reshape(4000, -1)
  assert np.all(per_example == per_example[:, :1])  # one decision per example
  assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
  dropped = np.mean(per_example[:, 0] == 0)
  assert abs(dropped - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 4000)
  assert abs(y.mean() - 1.0) < 0.05
  layer.eval()
  np.testing.assert_array_equal(layer(x), x)


def test_sincos2d_matches_big_vision_formula():
  h, w, width = 3, 5, 16
  quarter = width // 4
  ref = np.zeros((h * w, width))
  for i in range(h):
    for j in range(w):
      for d in range(quarter):
        omega = 1.0 / 10_000 ** (d / (quarter - 1))
        # big_vision: concat(sin(x), cos(x), sin(y), cos(y)), x the column, y the row.
        ref[i * w + j, [d, quarter + d, 2 * quarter + d, 3 * quarter + d]] = [
          math.sin(j * omega),
          math.cos(j * omega),
          math.sin(i * omega),
          math.cos(i * omega),
        ]
  pe = posemb_sincos_2d(h, w, width)
  assert pe.shape == (1, h * w, width)
  np.testing.assert_allclose(pe[0], ref, atol=1e-6)


# timm VisionTransformer's state-dict keys (qkv_bias=True, class token, global_pool='token').
def _timm_state_dict(depth=2, width=32, mlp_dim=64, patch=7, channels=1, tokens=17, classes=10):
  rng = np.random.default_rng(0)
  shapes = {
    "cls_token": (1, 1, width),
    "pos_embed": (1, tokens, width),
    "patch_embed.proj.weight": (width, channels, patch, patch),
    "patch_embed.proj.bias": (width,),
  }
  for i in range(depth):
    b = f"blocks.{i}."
    shapes |= {
      b + "norm1.weight": (width,),
      b + "norm1.bias": (width,),
      b + "attn.qkv.weight": (3 * width, width),
      b + "attn.qkv.bias": (3 * width,),
      b + "attn.proj.weight": (width, width),
      b + "attn.proj.bias": (width,),
      b + "norm2.weight": (width,),
      b + "norm2.bias": (width,),
      b + "mlp.fc1.weight": (mlp_dim, width),
      b + "mlp.fc1.bias": (mlp_dim,),
      b + "mlp.fc2.weight": (width, mlp_dim),
      b + "mlp.fc2.bias": (width,),
    }
  shapes |= {
    "norm.weight": (width,),
    "norm.bias": (width,),
    "head.weight": (classes, width),
    "head.bias": (classes,),
  }
  sd = {k: rng.normal(0, 0.2, s).astype(np.float32) for k, s in shapes.items()}
  for k in sd:
    if k.endswith(("norm1.weight", "norm2.weight")) or k == "norm.weight":
      sd[k] += 1.0
  return sd


def _layer_norm(x, w, b):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * w + b


def _timm_forward(sd, x, heads, depth=2, patch=7):
  """timm's VisionTransformer.forward in numpy, from the state dict (NCHW weights)."""
  n, hh, ww, c = x.shape
  gh, gw = hh // patch, ww // patch
  patches = x.reshape(n, gh, patch, gw, patch, c).transpose(0, 1, 3, 5, 2, 4)
  t = np.einsum("nijcpq,dcpq->nijd", patches, sd["patch_embed.proj.weight"])
  t = t.reshape(n, gh * gw, -1) + sd["patch_embed.proj.bias"]
  cls = np.broadcast_to(sd["cls_token"], (n, 1, t.shape[-1]))
  t = np.concatenate([cls, t], axis=1) + sd["pos_embed"]
  gelu = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))
  for i in range(depth):
    p = lambda name, i=i: sd[f"blocks.{i}.{name}"]  # noqa: E731
    y = _layer_norm(t, p("norm1.weight"), p("norm1.bias"))
    qkv = y @ p("attn.qkv.weight").T + p("attn.qkv.bias")
    b, m, d = y.shape
    q, k, v = qkv.reshape(b, m, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
    a = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads)
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    y = (a @ v).transpose(0, 2, 1, 3).reshape(b, m, d)
    t = t + y @ p("attn.proj.weight").T + p("attn.proj.bias")
    y = _layer_norm(t, p("norm2.weight"), p("norm2.bias"))
    y = gelu(y @ p("mlp.fc1.weight").T + p("mlp.fc1.bias"))
    t = t + y @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
  t = _layer_norm(t, sd["norm.weight"], sd["norm.bias"])
  return t[:, 0] @ sd["head.weight"].T + sd["head.bias"]


def _load(model, pure):
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  nnx.update(model, state)


def _classic():
  return ViT(10, pool="token", posemb="learn", rngs=nnx.Rngs(0), **TINY)


def test_params_from_timm_maps_every_key_and_matches_timm_forward():
  model = _classic()
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  sd = _timm_state_dict()
  mapped = params_from_timm(sd, params)
  assert jax.tree.structure(mapped) == jax.tree.structure(params)
  assert jax.tree.map(np.shape, mapped) == jax.tree.map(np.shape, params)
  # flaxtrain's variables spell block indices as strings; the result follows the tree.
  as_str = {**params, "blocks": {str(i): b for i, b in params["blocks"].items()}}
  assert set(params_from_timm(sd, as_str)["blocks"]) == {"0", "1"}
  _load(model, mapped)
  model.eval()

  # One Linear: torch computes x @ W.T + b.
  h = np.random.default_rng(1).normal(size=(3, 32)).astype(np.float32)
  w, b = sd["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.bias"]
  np.testing.assert_allclose(model.blocks[1].attn.qkv(h), h @ w.T + b, atol=1e-5)

  x = np.asarray(_images(2))
  np.testing.assert_allclose(
    _run(model, x), _timm_forward(sd, x.astype(np.float64), heads=2), atol=1e-4
  )


def test_params_from_timm_returns_a_head_of_another_size_as_found():
  params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(_classic), nnx.Param))
  sd = _timm_state_dict(classes=1000)
  mapped = params_from_timm({k: sd[k] for k in ("head.weight", "head.bias", "norm.bias")}, params)
  assert set(mapped) == {"head", "norm"} and set(mapped["norm"]) == {"bias"}
  assert mapped["head"]["kernel"].shape == (32, 1000)
  np.testing.assert_array_equal(mapped["head"]["kernel"], sd["head.weight"].T)


@pytest.mark.parametrize(
  "key,shape,words",
  [
    ("fc_norm.weight", (32,), "'fc_norm.weight' has no place"),
    ("blocks.0.ls1.gamma", (32,), "'blocks.0.ls1.gamma' has no place"),
    ("blocks.2.norm1.weight", (32,), "'blocks.2.norm1.weight' has no place"),
    ("blocks.1.attn.qkv.weight", (96, 16), "shape (96, 16) where the model expects (96, 32)"),
    ("patch_embed.proj.weight", (32, 3, 7, 7), "expects (32, 1, 7, 7)"),
    ("pos_embed", (1, 197, 32), "expects (1, 17, 32)"),
  ],
)
def test_params_from_timm_names_the_first_mismatch(key, shape, words):
  params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(_classic), nnx.Param))
  sd = _timm_state_dict()
  sd[key] = np.zeros(shape, np.float32)
  with pytest.raises(UserError, match="^[^\n]*$") as e:
    params_from_timm(sd, params)
  assert words in str(e.value) and str(e.value).count(". ") == 0


@pytest.mark.parametrize(
  "kw,words",
  [
    (dict(variant="X/16"), "not a ViT variant"),
    (dict(variant="S/15"), "not a ViT variant"),
    (dict(variant="S"), "not a ViT variant"),
    (dict(pool="cls"), "model.pool"),
    (dict(posemb="sincos"), "model.posemb"),
    (dict(patch_size=5), "not divisible by the ViT patch size 5"),
    (dict(heads=3), "not divisible by its 3 heads"),
    (dict(width=30, heads=3), "multiple of 4"),
    (dict(depth=-1), "model.depth=-1"),
    (dict(drop_path=1.0), "model.drop_path=1.0"),
    (dict(dropout=-0.1), "model.dropout=-0.1"),
    (dict(image_shape=(28, 28)), "(height, width, channels)"),
  ],
)
def test_bad_configs_fail_in_one_sentence(kw, words):
  with pytest.raises(UserError) as e:
    ViT(10, rngs=nnx.Rngs(0), **{**TINY, **kw})
  assert words in str(e.value) and "\n" not in str(e.value)
