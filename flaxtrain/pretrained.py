"""Fine-tuning from published weights: torchvision/timm ResNets and timm ViTs.

`--config.init_from=<file>` with a `.safetensors` file (read with safetensors' numpy API)
or a `.pth`/`.pt`/`.bin` file (read only with torch's `weights_only=True` loader, where
torch is installed: a downloaded file never runs code) holding the state dict of

* a torchvision or timm ResNet-18/34/50 (model.name resnet18/34/50): conv weights, the
  BatchNorm scales and offsets and their running statistics (into `batch_stats`);
* a timm VisionTransformer with a class token (model.name vit with pool='token',
  posemb='learn') or with global average pooling after its final norm (fc_norm=False;
  pool='gap', posemb='learn'), mapped by `models.vit.params_from_timm`.

The architecture is read from the keys and compared with the model's variables: a head
with another class count keeps its fresh initialisation (one log line says so), anything
else that differs is a one-sentence UserError naming the first mismatch.
"""

import json
import os
import pickle
import re

import jax
import ml_dtypes
import numpy as np
from absl import logging

from flaxtrain.errors import UserError

SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Torch's names of the ResNet modules flaxtrain's linen ResNet names otherwise.
_RESNET_MODULES = {
  "conv_init": "conv1",
  "bn_init": "bn1",
  "Conv_0": "conv1",
  "BatchNorm_0": "bn1",
  "Conv_1": "conv2",
  "BatchNorm_1": "bn2",
  "Conv_2": "conv3",
  "BatchNorm_2": "bn3",
  "conv_proj": "downsample.0",
  "norm_proj": "downsample.1",
}
_RESNET_LEAVES = {
  "kernel": "weight",
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
}
# Stage sizes of the torchvision names, for messages.
_RESNETS = {
  ("basic", (2, 2, 2, 2)): "resnet18",
  ("basic", (3, 4, 6, 3)): "resnet34",
  ("bottleneck", (3, 4, 6, 3)): "resnet50",
  ("bottleneck", (3, 4, 23, 3)): "resnet101",
  ("bottleneck", (3, 8, 36, 3)): "resnet152",
}


def is_weights_file(path: str) -> bool:
  """Whether init_from names a torch/safetensors file rather than a flaxtrain checkpoint."""
  return str(path).lower().endswith(SUFFIXES)


# ------------------------------------------------------------------ reading


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The file's tensors as numpy arrays (bfloat16 and float16 as float32), by name."""
  if not os.path.isfile(path):
    raise UserError(f"init_from {path} does not exist: pass a weights file or a flaxtrain workdir.")
  if path.lower().endswith(".safetensors"):
    return _read_safetensors(path)
  return _read_torch(path)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors import numpy as st_numpy

  try:
    tensors = st_numpy.load_file(path)
  except TypeError:  # numpy has no bfloat16: read the (simple) format directly.
    tensors = _read_safetensors_raw(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise UserError(f"init_from {path} is not a readable safetensors file ({e}).") from None
  return {k: _float32(v) for k, v in tensors.items()}


_ST_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


def _read_safetensors_raw(path: str) -> dict[str, np.ndarray]:
  """8-byte little-endian header size, a JSON header, then the tensors' bytes."""
  with open(path, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(size))
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    start, end = info["data_offsets"]
    dtype = _ST_DTYPES[info["dtype"]]
    out[name] = np.frombuffer(data[start:end], dtype).reshape(info["shape"])
  return out


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise UserError(
      f"init_from {path} is a torch file and torch is not installed: pip install torch, or "
      "convert it to .safetensors where torch is."
    ) from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError:
    raise UserError(
      f"init_from {path} holds pickled code, which flaxtrain never runs (torch's "
      "weights_only loader refuses it): convert it to .safetensors where you trust it, e.g. "
      "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')."
    ) from None
  except Exception as e:  # noqa: BLE001 - torch raises RuntimeError etc. on damaged files.
    raise UserError(f"init_from {path} cannot be read by torch.load ({e}).") from None
  # Training checkpoints wrap the state dict; DistributedDataParallel prefixes 'module.'.
  while isinstance(obj, dict) and not _is_state_dict(obj):
    inner = next((obj[k] for k in ("state_dict", "model", "module") if k in obj), None)
    if inner is None:
      break
    obj = inner
  if not isinstance(obj, dict) or not _is_state_dict(obj):
    raise UserError(
      f"init_from {path} holds no state dict of tensors: save model.state_dict() instead."
    )
  return {
    re.sub(r"^module\.", "", k): _float32(v.detach().cpu().float().numpy())
    if v.is_floating_point()
    else v.numpy()
    for k, v in obj.items()
  }


def _is_state_dict(obj: dict) -> bool:
  import torch

  return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _float32(x: np.ndarray) -> np.ndarray:
  floating = np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16
  return x.astype(np.float32) if floating else x


# ------------------------------------------------------------------ loading


def load(path: str, params, model_state: dict, model_name: str):
  """(params, model_state) of the model with the file's weights, on `params`' devices."""
  state_dict = read_state_dict(path)
  family = _family(state_dict)
  model_family = _model_family(params)
  if family != model_family:
    raise UserError(
      f"init_from {path} holds a {_FAMILY_NAMES[family]} but model.name is {model_name!r}: "
      f"set --config.model.name to {'vit' if family == 'vit' else 'resnet18, resnet34 or resnet50'}"
      " as the file's architecture."
    )
  # Only the shapes of `params` are read (no device-to-host copies).
  if family == "resnet":
    loaded = _resnet_variables(state_dict, params, model_state, path, model_name)
  else:
    loaded = _vit_variables(state_dict, params, path)
  head = _head_name(params)
  new_params = _fill(params, loaded, "params", head, path, model_name)
  new_state = {
    c: _fill(v, loaded, c, head, path, model_name) if c == "batch_stats" else v
    for c, v in model_state.items()
  }
  logging.info("Initialized the params from the %s weights in %s.", _FAMILY_NAMES[family], path)
  return new_params, new_state


_FAMILY_NAMES = {"resnet": "torchvision/timm ResNet", "vit": "timm ViT"}


def _family(state_dict: dict) -> str:
  if "patch_embed.proj.weight" in state_dict and any(k.startswith("blocks.") for k in state_dict):
    return "vit"
  if "conv1.weight" in state_dict and any(k.startswith("layer1.") for k in state_dict):
    return "resnet"
  raise UserError(
    "init_from holds neither a torchvision/timm ResNet nor a timm ViT state dict (its first "
    f"keys: {', '.join(list(state_dict)[:3])}): pass one of those or a flaxtrain workdir."
  )


def _model_family(params) -> str | None:
  if "patch_embed" in params:
    return "vit"
  if "conv_init" in params and any(re.fullmatch(r"(BasicBlock|Bottleneck)_\d+", k) for k in params):
    return "resnet"
  return None


def _head_name(params) -> str:
  return "head" if "head" in params else "Dense_0"


def _fill(target, loaded: dict, collection: str, head: str, path: str, model_name: str):
  """`target` with each leaf replaced by its loaded value (same dtype and sharding); a head
  whose class count differs keeps `target`'s values."""
  reinit = []

  def leaf(p, old):
    names = _names(p)
    key, value, file_shape, model_file_shape = loaded[(collection, *names)]
    if value.shape != old.shape:
      if collection == "params" and names[0] == head and _only_classes_differ(names, value, old):
        reinit.append((key, file_shape))
        return old
      raise UserError(
        f"init_from {path}: {key} has shape {file_shape} in the file but {model_file_shape} in "
        f"the model ({'/'.join(names)}, in the file's layout): use weights of the "
        f"architecture, input channels and image size of model.name={model_name}."
      )
    value = np.asarray(value, old.dtype)
    return jax.make_array_from_callback(old.shape, old.sharding, lambda idx: value[idx])

  out = jax.tree_util.tree_map_with_path(leaf, target)
  if reinit:
    key, shape = reinit[0]
    classes = jax.tree.leaves(target[head])[0].shape[-1]
    logging.warning(
      "init_from %s: the head (%s) has %d classes in the file and %d in the model, so the "
      "model's head keeps its fresh initialization.",
      path,
      key.rsplit(".", 1)[0],
      shape[0],
      classes,
    )
  return out


def _only_classes_differ(names, value, old) -> bool:
  """Head kernels are (features, classes) here: only the last dimension may differ."""
  return value.shape[:-1] == old.shape[:-1]


def _check_complete(loaded: dict, target, collection: str, path: str, where: str):
  """Every leaf of `target` has a value in `loaded`; else a UserError naming the first."""
  for p, _ in jax.tree_util.tree_flatten_with_path(target)[0]:
    names = _names(p)
    if (collection, *names) not in loaded:
      raise UserError(
        f"init_from {path} has no weights for the model's {collection}/{'/'.join(names)} "
        f"({where}): use weights of the same architecture as the model."
      )


# ------------------------------------------------------------------ ResNet


def _resnet_arch(keys) -> tuple[str, tuple[int, ...]]:
  """(block kind, blocks per stage) of a torch ResNet from its state-dict keys."""
  blocks = sorted(
    {tuple(map(int, m.groups())) for k in keys if (m := re.match(r"layer(\d+)\.(\d+)\.", k))}
  )
  stages = tuple(
    sum(1 for s, _ in blocks if s == stage) for stage in sorted({s for s, _ in blocks})
  )
  kind = "bottleneck" if any(re.match(r"layer\d+\.\d+\.conv3\.", k) for k in keys) else "basic"
  return kind, stages


def _model_arch(params) -> tuple[str, tuple[int, ...]]:
  """(block kind, blocks per stage) of flaxtrain's ResNet: a stage starts where the first
  conv's filter count changes."""
  blocks = sorted(
    (int(m.group(2)), m.group(1), k)
    for k in params
    if (m := re.fullmatch(r"(BasicBlock|Bottleneck)_(\d+)", k))
  )
  stages, last = [], None
  for _, _, k in blocks:
    filters = params[k]["Conv_0"]["kernel"].shape[-1]
    if filters != last:
      stages.append(0)
      last = filters
    stages[-1] += 1
  return {"BasicBlock": "basic", "Bottleneck": "bottleneck"}[blocks[0][1]], tuple(stages)


def _describe(arch) -> str:
  kind, stages = arch
  name = _RESNETS.get(arch)
  layout = f"{kind} blocks, stages {'-'.join(map(str, stages))}"
  return f"{name} ({layout})" if name else layout


def _resnet_variables(state_dict, params, model_state, path, model_name) -> dict:
  """{(collection, *names): (torch key, value in flax layout, file shape, model shape in
  the file's layout)} for every variable of flaxtrain's ResNet."""
  file_arch, model_arch = _resnet_arch(state_dict), _model_arch(params)
  if file_arch != model_arch:
    raise UserError(
      f"init_from {path} holds a {_describe(file_arch)} but model.name={model_name} is a "
      f"{_describe(model_arch)}: set --config.model.name to the file's architecture."
    )
  # Global block index -> torch's layer<stage>.<index>.
  torch_blocks = [f"layer{s + 1}.{b}" for s, size in enumerate(file_arch[1]) for b in range(size)]
  trees = {"params": params, "batch_stats": model_state.get("batch_stats", {})}
  loaded, used = {}, set()
  for collection, tree in trees.items():
    for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      names, shape = _names(p), leaf.shape
      key = _resnet_key(names, torch_blocks)
      if key is None or key not in state_dict:
        raise UserError(
          f"init_from {path} has no {key or 'weights'} for the model's "
          f"{collection}/{'/'.join(names)}: use weights of the architecture of "
          f"model.name={model_name}."
        )
      value = state_dict[key]
      loaded[(collection, *names)] = (key, to_flax(value), value.shape, torch_shape(shape))
      used.add(key)
  extra = [k for k in state_dict if k not in used and not k.endswith("num_batches_tracked")]
  if extra:
    raise UserError(
      f"init_from {path} has {extra[0]}, which flaxtrain's {model_name} has no place for: "
      "use a plain torchvision/timm ResNet state dict of the same architecture."
    )
  return loaded


def _resnet_key(names: tuple[str, ...], torch_blocks: list[str]) -> str | None:
  *modules, leaf = names
  if modules == ["Dense_0"]:
    return {"kernel": "fc.weight", "bias": "fc.bias"}.get(leaf)
  prefix = []
  if modules and (m := re.fullmatch(r"(?:BasicBlock|Bottleneck)_(\d+)", modules[0])):
    if int(m.group(1)) >= len(torch_blocks):
      return None
    prefix, modules = [torch_blocks[int(m.group(1))]], modules[1:]
  if len(modules) != 1 or modules[0] not in _RESNET_MODULES or leaf not in _RESNET_LEAVES:
    return None
  return ".".join([*prefix, _RESNET_MODULES[modules[0]], _RESNET_LEAVES[leaf]])


def to_flax(x: np.ndarray) -> np.ndarray:
  """Torch layouts to flax's: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
  if x.ndim == 4:
    return x.transpose(2, 3, 1, 0)
  return x.T if x.ndim == 2 else x


def torch_shape(shape: tuple) -> tuple:
  if len(shape) == 4:
    return tuple(shape[i] for i in (3, 2, 0, 1))
  return tuple(shape[::-1]) if len(shape) == 2 else tuple(shape)


# ------------------------------------------------------------------ ViT


def _vit_variables(state_dict, params, path) -> dict:
  from flaxtrain.models import vit

  _check_vit_layout(state_dict, params, path)
  mapped = vit.params_from_timm(state_dict, params)
  # Each mapped leaf's timm key, for messages: 'weight' became 'kernel' or 'scale'.
  keys = {}
  for key in state_dict:
    parts = key.split(".")
    names = ["patch_embed", *parts[2:]] if parts[:2] == ["patch_embed", "proj"] else parts
    if names[-1] == "weight":
      keys[(*names[:-1], "kernel")] = keys[(*names[:-1], "scale")] = key
    else:
      keys[tuple(names)] = key
  loaded = {}
  for p, value in jax.tree_util.tree_flatten_with_path(mapped)[0]:
    names = _names(p)
    key = keys.get(names, ".".join(names))
    model_shape = _lookup(params, names).shape
    model_file_shape = torch_shape(model_shape) if names[-1] == "kernel" else model_shape
    loaded[("params", *names)] = (key, value, state_dict[key].shape, tuple(model_file_shape))
  # params_from_timm maps the keys the file has; the model may have more.
  _check_complete(loaded, params, "params", path, "a timm ViT of another depth or layout")
  return loaded


def _check_vit_layout(state_dict, params, path):
  """The file's pooling and position embedding are the model's: a class token (pool='token')
  or global average pooling after the final norm (pool='gap'), and a learned embedding."""
  if any(k.startswith("fc_norm.") for k in state_dict):
    raise UserError(
      f"init_from {path} holds a timm ViT that normalises after pooling (fc_norm), which "
      "flaxtrain's ViT does not build: use a ViT with a class token or with fc_norm=False."
    )
  if "pos_embed" not in state_dict:
    raise UserError(
      f"init_from {path} holds a timm ViT without a position embedding (pos_embed), which "
      "flaxtrain's ViT does not build: use a ViT with a learned position embedding."
    )
  pool = "token" if "cls_token" in state_dict else "gap"
  if pool != ("token" if "cls_token" in params else "gap"):
    raise UserError(
      f"init_from {path} holds a timm ViT with "
      + ("a class token" if pool == "token" else "global average pooling")
      + f" and a learned position embedding: set --config.model.pool={pool} "
      "--config.model.posemb=learn."
    )
  if "pos_embed" not in params:
    raise UserError(
      f"init_from {path} holds a timm ViT with a learned position embedding: set "
      f"--config.model.posemb=learn (with --config.model.pool={pool})."
    )


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in path)


def _lookup(tree, names):
  for n in names:
    tree = tree[n] if n in tree else tree[int(n)]
  return tree
