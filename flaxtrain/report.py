"""`--mode=report`: what a checkpoint learned, as pictures under `<workdir>/report/`.

  predictions.png        the first 25 eval images, predicted and true class (wrong in red)
  confusion_matrix.png   counts over the whole eval split, with class names
  curves.png             train/eval loss and accuracy against step, from the run's events
  reconstructions.png    originals above reconstructions (reconstruction tasks)
  report.md              the headline metrics and the pictures

Plots use matplotlib's object API (no pyplot state), which renders with Agg.
"""

import io
import math

import numpy as np
from etils import epath
from matplotlib.figure import Figure

from flaxtrain import console, evaluate, workdirs
from flaxtrain.errors import UserError

GRID = 5  # predictions.png is GRID x GRID.
RECONSTRUCTIONS = 12  # Columns of reconstructions.png.
WRONG, RIGHT = "#d62728", "#1a1a1a"

# ------------------------------------------------------------------ events


def event_files(workdir: str) -> list[epath.Path]:
  """The run's TensorBoard event files; a UserError if it has none."""
  files = sorted(epath.Path(workdir).glob("events.out.tfevents.*"))
  if not files:
    raise UserError(
      f"--workdir {workdir} has no TensorBoard event files to draw curves "
      "from: pass the --workdir of a run trained by flaxtrain."
    )
  return files


def read_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{name: (steps, values)} from every event file of the run, sorted by step.

  A resumed run logs again the steps after its last checkpoint: the value written last
  wins.
  """
  tf = console.import_tensorflow_quietly()

  records = []  # (wall_time, name, step, value)
  for path in event_files(workdir):
    for record in tf.data.TFRecordDataset(str(path)):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.HasField("simple_value"):
          number = value.simple_value
        elif value.metadata.plugin_data.plugin_name == "scalars":
          number = float(tf.make_ndarray(value.tensor))
        else:
          continue  # hparams, text, images.
        records.append((event.wall_time, value.tag, event.step, number))
  latest = {}
  for _, name, step, number in sorted(records, key=lambda r: r[0]):
    latest.setdefault(name, {})[step] = number
  return {
    name: (np.array(sorted(by_step)), np.array([by_step[s] for s in sorted(by_step)]))
    for name, by_step in latest.items()
  }


# ---------------------------------------------------------------- pictures


def _png(fig: Figure, dpi: int = 110) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
  return buf.getvalue()


def _show(ax, image: np.ndarray):
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255 if image.dtype == np.uint8 else 1)
  else:
    ax.imshow(image)
  ax.set_xticks([])
  ax.set_yticks([])


def predictions_png(images, labels, probs, class_names) -> bytes:
  """A GRID x GRID grid: predicted class and confidence over the true class."""
  n = min(GRID * GRID, len(images))
  fig = Figure(figsize=(2.1 * GRID, 2.45 * GRID))
  predicted = probs.argmax(-1)
  for i in range(n):
    ax = fig.add_subplot(GRID, GRID, i + 1)
    _show(ax, images[i])
    wrong = predicted[i] != labels[i]
    color = WRONG if wrong else RIGHT
    ax.set_title(
      f"{class_names[predicted[i]]} ({probs[i, predicted[i]]:.0%})\ntrue: {class_names[labels[i]]}",
      color=color,
      fontsize=10,
      fontweight="bold" if wrong else "normal",
    )
    for spine in ax.spines.values():
      spine.set_color(color if wrong else "#bbbbbb")
      spine.set_linewidth(3 if wrong else 0.5)
  correct = int((predicted[:n] == labels[:n]).sum())
  fig.suptitle(
    f"First {n} eval images: predicted (confidence) and true class; "
    f"{correct}/{n} right, wrong in red",
    fontsize=12,
  )
  fig.tight_layout()
  return _png(fig)


def confusion(labels, predicted, num_classes: int) -> np.ndarray:
  """counts[true, predicted]."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (labels, predicted), 1)
  return counts


def confusion_png(counts: np.ndarray, class_names) -> bytes:
  k = len(class_names)
  size = max(6.0, 0.6 * k + 2)
  fig = Figure(figsize=(size + 1.5, size))
  ax = fig.add_subplot()
  im = ax.imshow(counts, cmap="Blues")
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  if k <= 50:
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(k), class_names, fontsize=9)
  if k <= 20:
    dark = counts.max() / 2
    for t in range(k):
      for p in range(k):
        if counts[t, p]:
          ax.text(
            p,
            t,
            f"{counts[t, p]:,}",
            ha="center",
            va="center",
            fontsize=8,
            color="white" if counts[t, p] > dark else "black",
          )
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  total = counts.sum()
  ax.set_title(
    f"Confusion matrix: {total:,} eval examples, accuracy {np.trace(counts) / total:.2%}"
  )
  fig.tight_layout()
  return _png(fig)


def curves_png(scalars: dict, steps_per_epoch: int) -> bytes:
  """Loss and (when logged) accuracy against step, train and eval, epochs on top."""
  panels = [("loss", "loss")]
  if "train_accuracy" in scalars or "eval_accuracy" in scalars:
    panels.append(("accuracy", "accuracy"))
  fig = Figure(figsize=(6 * len(panels), 4.2))
  for i, (metric, label) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    for split, style in (
      ("train", dict(lw=1, alpha=0.8)),
      ("eval", dict(lw=1.8, marker="o", ms=4)),
    ):
      if f"{split}_{metric}" in scalars:
        steps, values = scalars[f"{split}_{metric}"]
        ax.plot(steps, values, label=split, **style)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
    top = ax.secondary_xaxis(
      "top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch)
    )
    top.set_xlabel("epoch")
    if metric == "loss" and _spans_decades(scalars, metric):
      ax.set_yscale("log")
  fig.tight_layout()
  return _png(fig)


def _spans_decades(scalars: dict, metric: str) -> bool:
  values = np.concatenate([v for k, (_, v) in scalars.items() if k.endswith(f"_{metric}")])
  values = values[np.isfinite(values) & (values > 0)]
  return len(values) > 0 and values.max() / values.min() > 30


def reconstructions_png(images, outputs) -> bytes:
  """Originals (top row of each pair) above their reconstructions."""
  n = min(RECONSTRUCTIONS * 2, len(images))
  cols = min(RECONSTRUCTIONS, n)
  pairs = math.ceil(n / cols)
  fig = Figure(figsize=(1.2 * cols, 2.6 * pairs))
  outputs = outputs.reshape(images.shape[:1] + images.shape[1:])
  for i in range(n):
    row, col = divmod(i, cols)
    for j, (image, title) in enumerate(((images[i], "original"), (outputs[i], "reconstructed"))):
      ax = fig.add_subplot(2 * pairs, cols, (2 * row + j) * cols + col + 1)
      _show(ax, image)
      if col == 0:
        ax.set_ylabel(title, fontsize=9)
  fig.suptitle("Eval images (original) and the model's reconstructions")
  fig.tight_layout()
  return _png(fig)


# ------------------------------------------------------------------ report


def markdown(
  exp,
  step: int,
  requested,
  metrics: dict,
  pictures: list[str],
  per_class: list[tuple[str, float, int]] | None,
) -> str:
  c = exp.config
  lines = [
    f"# {exp.spec.name} / {c.model.name}: checkpoint at step {step:,}",
    "",
    f"`--step={requested}`; {exp.task.name} task; {exp.spec.num_eval:,} eval examples "
    f"({c.dataset.eval_split}); {exp.plan.total_steps:,} steps planned "
    f"({exp.plan.steps_per_epoch:,} per epoch).",
    "",
    "| metric | value |",
    "| --- | ---: |",
  ]
  lines += [
    f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v:,} |" for k, v in metrics.items()
  ]
  for name in pictures:
    lines += ["", f"![{name}]({name}.png)"]
  if per_class:
    lines += ["", "| class | accuracy | examples |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {acc:.2%} | {n:,} |" for name, acc, n in per_class]
  return "\n".join(lines) + "\n"


def run(exp, workdir: str, step: int | str = "latest") -> epath.Path:
  """Writes `<workdir>/report/` for the requested checkpoint; returns its path."""
  evaluate.check_run(workdir, step)
  scalars = read_scalars(workdir)
  state, restored_step = evaluate.restore(exp, workdir, step)
  metrics = exp.evaluate(state)
  classification = exp.task.kind == "classification"
  pred = exp.predict(state, None if classification else RECONSTRUCTIONS * 2)
  final = epath.Path(workdir) / "report"
  if exp.par.process_index != 0:
    return final
  pictures = {}
  per_class = None
  if classification:
    names = exp.spec.class_names
    pictures["predictions"] = predictions_png(pred["image"], pred["label"], pred["output"], names)
    counts = confusion(pred["label"], pred["output"].argmax(-1), exp.spec.num_classes)
    pictures["confusion_matrix"] = confusion_png(counts, names)
    totals = counts.sum(1)
    per_class = [
      (names[i], counts[i, i] / max(totals[i], 1), int(totals[i])) for i in range(len(names))
    ]
  else:
    pictures["reconstructions"] = reconstructions_png(pred["image"], pred["output"])
  pictures["curves"] = curves_png(scalars, exp.plan.steps_per_epoch)
  with workdirs.staged_dir(final) as out:
    for name, png in pictures.items():
      (out / f"{name}.png").write_bytes(png)
    (out / "report.md").write_text(
      markdown(exp, restored_step, step, metrics, list(pictures), per_class)
    )
  return final
