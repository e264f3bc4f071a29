"""Prepare a dataset's domains (= tasks) once and open them as data sources.

    tasks = build_tasks("office_home", root="/data/OfficeHomeDataset",
                        data_dir="~/tensorflow_datasets")
    tasks[0].info.class_names   # ('Alarm Clock', ...) prompt words
    tasks[0].train[i]           # {'image': jpeg bytes, 'label': int, 'file_name': bytes}
    tasks[0].val, tasks[0].test # the same records; val is carved from the prepared train split

Each domain is one TFDS dataset `<data_dir>/<builder>/<config>/1.0.0` written
as array_record (random access, no TensorFlow needed to write or read) and
read back with `as_data_source`, image bytes left undecoded so the decode runs
in the input pipeline's workers. Domains already prepared are only opened: the
root is then not needed (except for image_folder, whose config names hash it).
On several hosts, prepare once (one process, or a separate run) before all of
them open the data: concurrent builds of one domain would race.

Validation. The validation split is carved from the prepared train split when it is
opened (`common.carve_val`: stratified, keyed by split seed, domain and class), as
index views into the TFDS train records, so prepared datasets are never rebuilt for
it and every method and training seed of a sweep sees the same split. A user
`<domain>_val.txt` in `split_files` is written as its own TFDS split instead. The
lists a task uses are written beside the prepared data, in
`<data_dir>/<builder>/<config>/splits/<val tag>/<domain>_{train,val,test}.txt`
(the split-list format; pass that folder as `split_files` to reproduce them), with
`index.json` caching the carve so later opens read no records.

Few-shot protocol (`shots`, `split_seed`). The test split is the builder's; the validation
pool is carved from the train split first (at least `val_per_class` images per class when
asked, see `common.carve_val`); then `shots` > 0 keeps k images per class of what is left
(`common.sample_shots`: drawn by the split seed, nested across k). So val and test never
depend on k, and every method and training seed of a sweep sees the same k-shot split. The
lists go to the same folder as above, whose tag names the carve and the draw
(`val0.1-min8-seed0-shots16`); `TaskInfo.split_checksums` holds the sha256 of each list's
content, which the trainer writes into results.json. Why beside the data and not in the
workdir: a split is a function of the prepared data and the split parameters only, shared by
every run of a sweep, and the data dir is where the carve lists already live; the checksums in
each run's results.json say which lists it used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import uuid
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

from mmap_jax.data import builders
from mmap_jax.data.builders import common

log = logging.getLogger(__name__)

DataLayoutError = common.DataLayoutError
ClassListMismatchError = common.ClassListMismatchError
SplitFileError = common.SplitFileError


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """What the trainer and the prompts need to know about one task.

  Attributes:
    name: the domain folder name, e.g. 'Real World'.
    dataset: the dataset name given to `build_tasks`, e.g. 'office_home'.
    builder: TFDS '<builder>/<config>', e.g. 'office_home/real_world'.
    class_names: prompt words per label ('alarm_clock' -> 'alarm clock').
    raw_class_names: the class folder names per label.
    num_train, num_test, num_val: examples per split (after skipped files;
      num_train after the validation carve).
    num_skipped: unreadable images left out at build time.
    data_dir: the prepared TFDS dataset directory.
    val_split: how val was made: 'files' (a user val list), 'val<fraction>-seed<seed>'
      (carved from train) or 'none' (val_fraction=0).
    split_lists: the folder holding this task's `<domain>_{train,val,test}.txt` lists
      ('' when it could not be written).
    shots: images per class in the train split (0 = all of the train pool).
    split_checksums: {split: sha256 of its list's content} (`common.split_checksum`).
    short_classes: {class: count} of the classes with fewer than `shots` train images.
  """

  name: str
  dataset: str
  builder: str
  class_names: tuple[str, ...]
  raw_class_names: tuple[str, ...]
  num_train: int
  num_test: int
  num_val: int
  num_skipped: int
  data_dir: str
  val_split: str = ""
  split_lists: str = ""
  shots: int = 0
  split_checksums: dict = dataclasses.field(default_factory=dict, hash=False)
  short_classes: dict = dataclasses.field(default_factory=dict, hash=False)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class TaskData:
  """One task: its id (position in `build_tasks`' list), info and data sources.

  `train` / `val` / `test` are random-access sequences of
  {'image': JPEG bytes, 'label': int, 'file_name': bytes} (picklable, so they
  travel to grain worker processes); `val` is empty with val_fraction=0.
  """

  task_id: int
  info: TaskInfo
  train: Sequence[dict[str, Any]]
  test: Sequence[dict[str, Any]]
  val: Sequence[dict[str, Any]] = ()


class Subset:
  """Records `indices` of a random-access source, as a source (picklable; grain-ready)."""

  def __init__(self, base: Sequence[dict[str, Any]], indices: Sequence[int]):
    self.base = base
    self.indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self.base[int(self.indices[i])]

  def __getitems__(self, keys: Sequence[int]) -> list[dict[str, Any]]:
    picked = [int(self.indices[k]) for k in keys]
    getitems = getattr(self.base, "__getitems__", None)
    return list(getitems(picked)) if getitems else [self.base[i] for i in picked]

  def __repr__(self) -> str:
    return f"Subset({len(self)} of {len(self.base)} records)"


def default_data_dir() -> str:
  """$TFDS_DATA_DIR, else ~/tensorflow_datasets (TFDS's own default)."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")


def _is_prepared(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "dataset_info.json"))


def _open(path: str):
  return tfds.builder_from_directory(path)


def build_tasks(
    name: str,
    *,
    root: str | None = None,
    data_dir: str | None = None,
    domains: Sequence[str] | None = None,
    split_seed: int = common.DEFAULT_SPLIT_SEED,
    train_fraction: float = common.DEFAULT_TRAIN_FRACTION,
    split_files: str | None = None,
    val_fraction: float = common.DEFAULT_VAL_FRACTION,
    val_per_class: int = common.DEFAULT_VAL_PER_CLASS,
    shots: int = common.SHOTS_ALL,
    skip_corrupt: bool = False,
    allow_per_task_classes: bool = False,
    demo_seed: int = 0,
    demo_images_per_class: int = 40,
    demo_image_size: int = 64,
    demo_world: int = 1,
    num_threads: int = 0,
    force_rebuild: bool = False,
) -> list[TaskData]:
  """Prepares (once) and opens every requested domain of a dataset as a task.

  Args:
    name: 'office_home', 'mini_domainnet', 'domainnet', 'image_folder' or
      'demo_domains'.
    root: the manual dir (the dataset's unpacked download or your own tree);
      for 'demo_domains' optional (defaults to a folder under data_dir).
    data_dir: TFDS data dir (default `default_data_dir()`).
    domains: domains to use, by folder name or config name ('Real World' or
      'real_world'); default all of the dataset's domains.
    split_seed, train_fraction, split_files: see `common.BuildOptions`.
    val_fraction: share of each class's train examples carved out as the
      validation split (`common.carve_val`, seeded by split_seed); 0 = no
      validation split. Ignored for a domain whose split_files have a val list.
    val_per_class: a floor on each class's carved validation images (capped at half of the
      class; 0 = the fraction alone).
    shots: train images per class, drawn by split_seed from what the carve leaves (0 = all).
    skip_corrupt: skip unreadable images instead of failing (default fails,
      naming the file); the count is logged and kept in metadata.json.
    allow_per_task_classes: allow domains with different class lists.
    demo_seed, demo_images_per_class, demo_image_size, demo_world: the demo world.
    num_threads: image conversion threads while building (0 = CPU count).
    force_rebuild: rebuild even if the domain is already prepared.

  Returns:
    One TaskData per domain, in `domains` order (the dataset's order by
    default); `task_id` is the position in this list.

  Raises:
    DataLayoutError: root, a domain folder or a split list is missing (the
      message lists what was expected and what was found).
    ClassListMismatchError: domains disagree on their classes.
    SplitFileError: a malformed split list line, or a val list line that is
      also in the train or test list (file:line).
    mmap_jax.data.images.UnreadableImageError: a corrupt image (its path).
  """
  module = builders.get(name)   # the dataset plug-in (common.FolderDataset)
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  if val_per_class < 0:
    raise ValueError(f"val_per_class must be >= 0, got {val_per_class}")
  if shots < 0:
    raise ValueError(f"shots must be >= 0 (0 = all), got {shots}")
  options = common.BuildOptions(
      split_seed=split_seed, train_fraction=train_fraction, split_files=split_files,
      skip_corrupt=skip_corrupt, allow_per_task_classes=allow_per_task_classes,
      num_threads=num_threads, demo_seed=demo_seed,
      demo_images_per_class=demo_images_per_class, demo_image_size=demo_image_size,
      demo_world=demo_world)
  data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
  domain_names = module.domains(root, domains, options)
  config_names = {d: module.config_name(d, root, options) for d in domain_names}
  paths = {d: os.path.join(data_dir, module.Builder.name, config_names[d], common.VERSION)
           for d in domain_names}
  todo = [d for d in domain_names if force_rebuild or not _is_prepared(paths[d])]
  plans = {}
  if todo:
    root = module.resolve_root(root, data_dir, options)  # demo_domains: generates the tree.
    plans = {p.domain: p for p in module.plan(root, todo, options, config_names)}

  opened = {d: _open(paths[d]) for d in domain_names if d not in plans}
  class_lists = {
      d: plans[d].raw_class_names if d in plans
      else tuple(opened[d].info.features["label"].names)
      for d in domain_names
  }
  common.check_class_lists(name, class_lists, allow_per_task_classes=allow_per_task_classes)

  for d in todo:
    plan = plans[d]
    shutil.rmtree(_splits_root(paths[d]), ignore_errors=True)  # Lists of the old build.
    log.info("building %s/%s from %s", module.Builder.name, plan.config_name, plan.root)
    builder = module.Builder(
        config=common.DomainConfig(
            name=plan.config_name, version=common.VERSION,
            description=f"{name} domain {d!r}", plan=plan,
            skip_corrupt=skip_corrupt, num_threads=num_threads),
        data_dir=data_dir, file_format="array_record")
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if force_rebuild
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    with _no_progress_bars():
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=plan.root, download_mode=mode))
    opened[d] = _open(paths[d])
  if todo:
    size = sum(f.stat().st_size for d in todo for f in pathlib.Path(paths[d]).rglob("*")
               if f.is_file())
    log.info("%s: prepared %d domain(s) under %s (%.1f MB; later runs reuse them)",
             name, len(todo), os.path.join(data_dir, module.Builder.name), size / 2**20)

  return [_task(i, name, d, paths[d], opened[d], skip_corrupt, split_seed=split_seed,
                val_fraction=val_fraction, val_per_class=val_per_class, shots=shots)
          for i, d in enumerate(domain_names)]


@contextlib.contextmanager
def _no_progress_bars():
  """TFDS's per-split progress bars (a dozen stderr lines per domain) off while building."""
  from tensorflow_datasets.core.utils import tqdm_utils
  was = getattr(tqdm_utils, "_active", True)
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(was)


def _splits_root(path: str) -> str:
  """`<data_dir>/<builder>/<config>/splits`: beside the version folder TFDS reads."""
  return os.path.join(os.path.dirname(path), "splits")


def _listing(source) -> tuple[list[str], list[int]]:
  """(relpaths, labels) of every record of a source, read in chunks."""
  relpaths, labels = [], []
  for start in range(0, len(source), 512):
    for r in source.__getitems__(list(range(start, min(start + 512, len(source))))):
      name = r["file_name"]
      relpaths.append(name.decode() if isinstance(name, bytes) else str(name))
      labels.append(int(r["label"]))
  return relpaths, labels


def split_tag(*, files_val: bool, split_seed: int, val_fraction: float, val_per_class: int,
              shots: int) -> str:
  """The split folder's name: how val was made ('files', 'val0.1[-min8]-seed0', 'none'), then
  '-shots<k>' (with the seed when the carve does not already name it) for a few-shot draw."""
  if files_val:
    tag = "files"
  elif val_fraction > 0:
    tag = (f"val{val_fraction:g}" + (f"-min{val_per_class}" if val_per_class else "")
           + f"-seed{split_seed}")
  else:
    tag = "none"
  if shots:
    tag += ("" if tag.startswith("val") else f"-seed{split_seed}") + f"-shots{shots}"
  return tag


def _split_views(domain: str, path: str, raw: Sequence[str], train_all, val_written, test, *,
                 split_seed: int, val_fraction: float,
                 val_per_class: int = common.DEFAULT_VAL_PER_CLASS,
                 shots: int = common.SHOTS_ALL):
  """(train, val, tag, lists folder, checksums, short classes): the carve and few-shot draw
  (cached in index.json) and the written lists."""
  counts = {"train": len(train_all), "val": len(val_written), "test": len(test)}
  files_val = bool(len(val_written))
  tag = split_tag(files_val=files_val, split_seed=split_seed, val_fraction=val_fraction,
                  val_per_class=val_per_class, shots=shots)
  folder = os.path.join(_splits_root(path), tag)
  index_path = os.path.join(folder, "index.json")
  cached = None
  if os.path.isfile(index_path):
    with open(index_path, encoding="utf-8") as f:
      cached = json.load(f)
    if cached.get("num_records") != counts or "checksums" not in cached:
      log.warning("%s: %s does not match the prepared data (%s vs %s); recomputing",
                  domain, index_path, cached.get("num_records"), counts)
      cached = None
  if cached is None:
    log.info("%s: listing records to write the split lists in %s (once)", domain, folder)
    train_rows = list(zip(*_listing(train_all)))
    relpaths, labels = [r for r, _ in train_rows], [l for _, l in train_rows]
    if tag.startswith("val"):
      train_idx, val_idx = common.carve_val(
          relpaths, labels, raw, domain=domain, seed=split_seed, val_fraction=val_fraction,
          min_per_class=val_per_class)
    else:
      train_idx, val_idx = list(range(len(train_all))), []
    train_idx, short = common.sample_shots(relpaths, labels, raw, train_idx, domain=domain,
                                           seed=split_seed, shots=shots)
    if short:
      log.warning("%s: %d class(es) have fewer than %d train images and keep all of theirs: %s",
                  domain, len(short), shots, short)
    lists = {"train": [train_rows[i] for i in train_idx],
             "val": ([train_rows[i] for i in val_idx] if not files_val
                     else list(zip(*_listing(val_written)))),
             "test": list(zip(*_listing(test)))}
    if tag.startswith("none"):
      del lists["val"]  # No list: passed back as split_files it must not read as an empty val.
    cached = {"num_records": counts, "val_split": tag, "train": train_idx, "val": val_idx,
              "short_classes": short,
              "checksums": {split: common.split_checksum(rows) for split, rows in lists.items()}}
    try:
      common.write_split_lists(folder, domain, lists)
      tmp = f"{index_path}.tmp{uuid.uuid4().hex[:12]}"
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(cached, f)
      os.replace(tmp, index_path)  # Last: its presence means the lists are complete.
    except OSError as e:
      log.warning("%s: could not write the split lists to %s (%s); using them in memory",
                  domain, folder, e)
      folder = ""
  train_idx, val_idx = cached["train"], cached["val"]
  train = train_all if len(train_idx) == len(train_all) else Subset(train_all, train_idx)
  val = val_written if files_val else (Subset(train_all, val_idx) if val_idx else ())
  return train, val, tag, folder, cached["checksums"], cached.get("short_classes", {})


def _task(task_id: int, dataset: str, domain: str, path: str, builder,
          skip_corrupt: bool, *, split_seed: int = common.DEFAULT_SPLIT_SEED,
          val_fraction: float = common.DEFAULT_VAL_FRACTION,
          val_per_class: int = common.DEFAULT_VAL_PER_CLASS,
          shots: int = common.SHOTS_ALL) -> TaskData:
  info = builder.info
  metadata = dict(info.metadata or {})
  skipped = list(metadata.get("skipped_files", []))
  if skipped and not skip_corrupt:
    raise ValueError(
        f"{path} was prepared with skip_corrupt=True and left out {len(skipped)} unreadable "
        f"image(s) ({skipped[:5]}{' ...' if len(skipped) > 5 else ''}); pass "
        "skip_corrupt=True to use it, or fix the files and pass force_rebuild=True")
  raw = tuple(info.features["label"].names)
  decoders = {"image": tfds.decode.SkipDecoding()}
  # A split with no examples is not written at all (see DomainBuilder).
  train_all, val_written, test = (
      builder.as_data_source(s, decoders=decoders) if s in info.splits else ()
      for s in ("train", "val", "test"))
  train, val, tag, folder, checksums, short = _split_views(
      domain, path, raw, train_all, val_written, test, split_seed=split_seed,
      val_fraction=val_fraction, val_per_class=val_per_class, shots=shots)
  task_info = TaskInfo(
      name=domain, dataset=dataset, builder=f"{builder.name}/{info.config_name}",
      class_names=tuple(common.prompt_name(c) for c in raw), raw_class_names=raw,
      num_train=len(train), num_test=len(test), num_val=len(val), num_skipped=len(skipped),
      data_dir=path, val_split=tag, split_lists=folder, shots=shots,
      split_checksums=dict(checksums), short_classes=dict(short))
  return TaskData(task_id=task_id, info=task_info, train=train, test=test, val=val)


def splits_record(tasks: Sequence[TaskData]) -> dict[str, Any]:
  """What results.json records of the splits: per task the split parameters, sizes and each
  list's sha256, and one sha256 over all of them (equal digests = the same examples)."""
  per_task = {
      t.info.name: {"split": t.info.val_split, "shots": t.info.shots,
                    "num_train": t.info.num_train, "num_val": t.info.num_val,
                    "num_test": t.info.num_test, "sha256": dict(t.info.split_checksums),
                    **({"short_classes": dict(t.info.short_classes)}
                       if t.info.short_classes else {})}
      for t in tasks}
  joined = json.dumps({n: r["sha256"] for n, r in per_task.items()}, sort_keys=True)
  return {"tasks": per_task,
          "sha256": hashlib.sha256(joined.encode("utf-8")).hexdigest()}
