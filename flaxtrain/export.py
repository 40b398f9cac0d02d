"""`--mode=export`: a checkpoint as files that run without flaxtrain's model code.

`<workdir>/export/` gets
  params.msgpack   the eval variables (EMA params when on, plus e.g. batch_stats) as Flax
                   msgpack: `flax.serialization.from_bytes(target, data)` or
                   `flax.serialization.msgpack_restore(data)`;
  inference.jax    `jax.export` (StableHLO) of uint8 images [batch, H, W, C] -> outputs,
                   the variables baked in, any batch size, for CPU, CUDA and TPU;
  saved_model/     the same function as a TF SavedModel (jax2tf), where jax2tf imports;
  metadata.json, README.md   what goes in and comes out, and how to load each file.
"""

import json
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from flaxtrain import console, evaluate, steps, workdirs

PLATFORMS = ("cpu", "cuda", "tpu")


def _outputs(exp, variables, images):
  """uint8 images -> the task's predictions: class probabilities, or images in [0, 1]."""
  x = steps.preprocess(images, exp.dtype, exp.norm)
  return exp.task.predict(exp.model.apply(variables, x, train=False))


def export_inference(exp, variables) -> jax.export.Exported:
  """`jax.export` of the inference function, `variables` baked in, batch size symbolic."""
  (batch,) = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, *exp.spec.image_shape), jnp.uint8)
  infer = jax.jit(lambda images: _outputs(exp, variables, images))
  return jax.export.export(infer, platforms=PLATFORMS)(spec)


def save_tf(exp, variables, directory: epath.Path) -> bool:
  """Writes a TF SavedModel of the inference function; False if jax2tf is unavailable."""
  try:
    tf = console.import_tensorflow_quietly()
    from jax.experimental import jax2tf
  except ImportError as e:
    logging.info("No TF SavedModel: jax2tf does not import here (%s).", e)
    return False
  module = tf.Module()
  # Variables rather than constants: no 2 GiB GraphDef limit for big models.
  module.variables_ = tf.nest.map_structure(tf.Variable, variables)
  converted = jax2tf.convert(
    lambda v, x: _outputs(exp, v, x), polymorphic_shapes=[None, "(b, ...)"], with_gradient=False
  )
  module.serve = tf.function(
    lambda images: converted(module.variables_, images),
    autograph=False,
    input_signature=[tf.TensorSpec((None, *exp.spec.image_shape), tf.uint8, "images")],
  )
  tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})
  # A TensorFlow older than this jax cannot run what jax2tf wrote (its StableHLO is too
  # new): check by running it, and keep no SavedModel that does not work.
  probe = np.zeros((2, *exp.spec.image_shape), np.uint8)
  try:
    serve = tf.saved_model.load(str(directory)).signatures["serving_default"]
    got = serve(images=probe)["output_0"].numpy()
    np.testing.assert_allclose(got, np.asarray(_outputs(exp, variables, probe)), atol=1e-4)
  except Exception as e:  # noqa: BLE001 - any TF load/run error means: not usable here.
    directory.rmtree(missing_ok=True)
    logging.warning(
      "No TF SavedModel: TensorFlow %s cannot run what jax2tf wrote (%s); "
      "inference.jax holds the same function.",
      tf.__version__,
      " ".join(str(e).split())[:200],
    )
    return False
  return True


def run(exp, workdir: str, step: int | str = "latest") -> epath.Path:
  """Writes `<workdir>/export/` for the requested checkpoint; returns its path."""
  evaluate.check_run(workdir, step)
  state, restored_step = evaluate.restore(exp, workdir, step)
  variables = exp.eval_variables(state)
  final = epath.Path(workdir) / "export"
  if exp.par.process_index != 0:
    return final
  exported = export_inference(exp, variables)
  with workdirs.staged_dir(final) as out:
    (out / "params.msgpack").write_bytes(flax.serialization.to_bytes(variables))
    (out / "inference.jax").write_bytes(exported.serialize())
    has_tf = save_tf(exp, variables, out / "saved_model")
    (out / "metadata.json").write_text(json.dumps(metadata(exp, restored_step), indent=2))
    (out / "README.md").write_text(readme(exp, restored_step, has_tf))
  logging.info("Wrote %s (step %d).", final, restored_step)
  return final


def metadata(exp, step: int) -> dict:
  return {
    "step": step,
    "config": json.loads(exp.config.to_json_best_effort()),
    "dataset": exp.spec.name,
    "task": exp.task.name,
    "kind": exp.task.kind,
    "input": {"shape": ["batch", *exp.spec.image_shape], "dtype": "uint8"},
    "output": _output_doc(exp),
    "class_names": list(exp.spec.class_names),
    "platforms": list(PLATFORMS),
  }


def _output_doc(exp) -> str:
  if exp.task.kind == "reconstruction":
    return f"float32 images [batch, {', '.join(map(str, exp.spec.image_shape))}] in [0, 1]"
  return f"float32 class probabilities [batch, {exp.spec.num_classes}]"


def _input_doc(exp) -> str:
  """How images must be prepared before the model: what the eval pipeline did to them."""
  transform = getattr(exp.data, "eval_transform", None)  # Streamed sources resize.
  if transform is None or transform.size is None:
    return "as the dataset stores them"
  size, fraction = transform.size, transform.crop_fraction
  if fraction == 1.0:
    return f"resized to {size}x{size} as in eval (RGB)"
  return (
    f"prepared as in eval: the shorter side resized to {size / fraction:.0f} px, then "
    f"the central {size}x{size} (RGB)"
  )


def readme(exp, step: int, has_tf: bool) -> str:
  shape = ", ".join(str(d) for d in exp.spec.image_shape)
  text = f"""\
  # {exp.spec.name} / {exp.config.model.name}, step {step}

  Input: uint8 images `[batch, {shape}]` (any batch size), {_input_doc(exp)}; the
  normalisation is inside the model. Output: {_output_doc(exp)}.
  Class names, in output order, are in `metadata.json`.

  ## inference.jax: StableHLO, no model code needed

  ```python
  import jax, numpy as np
  exported = jax.export.deserialize(open("inference.jax", "rb").read())
  outputs = exported.call(np.zeros((8, {shape}), np.uint8))
  ```

  Lowered for {", ".join(PLATFORMS)}; the parameters are constants inside it.

  ## params.msgpack: the variables for `model.apply`

  ```python
  import flax
  variables = flax.serialization.msgpack_restore(open("params.msgpack", "rb").read())
  # or into an existing structure: flax.serialization.from_bytes(target_variables, data)
  ```
  """
  if has_tf:
    text += (
      """
  ## saved_model/: TF SavedModel (jax2tf)

  ```python
  import tensorflow as tf
  serve = tf.saved_model.load("saved_model").signatures["serving_default"]
  outputs = serve(images=tf.zeros((8, """
      + shape
      + """), tf.uint8))["output_0"]
  ```
  """
    )
  return textwrap.dedent(text)
