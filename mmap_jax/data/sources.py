"""Prepare a dataset's domains (= tasks) once and open them as data sources.

    tasks = build_tasks("office_home", root="/data/OfficeHomeDataset",
                        data_dir="~/tensorflow_datasets")
    tasks[0].info.class_names   # ('Alarm Clock', ...) prompt words
    tasks[0].train[i]           # {'image': jpeg bytes, 'label': int, 'file_name': bytes}

Each domain is one TFDS dataset `<data_dir>/<builder>/<config>/1.0.0` written
as array_record (random access, no TensorFlow needed to write or read) and
read back with `as_data_source`, image bytes left undecoded so the decode runs
in the input pipeline's workers. Domains already prepared are only opened: the
root is then not needed (except for image_folder, whose config names hash it).
On several hosts, prepare once (one process, or a separate run) before all of
them open the data: concurrent builds of one domain would race.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

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
    num_train, num_test: examples per split (after skipped files).
    num_skipped: unreadable images left out at build time.
    data_dir: the prepared TFDS dataset directory.
  """

  name: str
  dataset: str
  builder: str
  class_names: tuple[str, ...]
  raw_class_names: tuple[str, ...]
  num_train: int
  num_test: int
  num_skipped: int
  data_dir: str

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class TaskData:
  """One task: its id (position in `build_tasks`' list), info and data sources.

  `train` / `test` are random-access sequences of
  {'image': JPEG bytes, 'label': int, 'file_name': bytes} (picklable, so they
  travel to grain worker processes).
  """

  task_id: int
  info: TaskInfo
  train: Sequence[dict[str, Any]]
  test: Sequence[dict[str, Any]]


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
    skip_corrupt: bool = False,
    allow_per_task_classes: bool = False,
    demo_seed: int = 0,
    demo_images_per_class: int = 40,
    demo_image_size: int = 64,
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
    skip_corrupt: skip unreadable images instead of failing (default fails,
      naming the file); the count is logged and kept in metadata.json.
    allow_per_task_classes: allow domains with different class lists.
    demo_seed, demo_images_per_class, demo_image_size: the demo world.
    num_threads: image conversion threads while building (0 = CPU count).
    force_rebuild: rebuild even if the domain is already prepared.

  Returns:
    One TaskData per domain, in `domains` order (the dataset's order by
    default); `task_id` is the position in this list.

  Raises:
    DataLayoutError: root, a domain folder or a split list is missing (the
      message lists what was expected and what was found).
    ClassListMismatchError: domains disagree on their classes.
    SplitFileError: a malformed split list line (file:line).
    mmap_jax.data.images.UnreadableImageError: a corrupt image (its path).
  """
  module = builders.get(name)
  options = common.BuildOptions(
      split_seed=split_seed, train_fraction=train_fraction, split_files=split_files,
      skip_corrupt=skip_corrupt, allow_per_task_classes=allow_per_task_classes,
      num_threads=num_threads, demo_seed=demo_seed,
      demo_images_per_class=demo_images_per_class, demo_image_size=demo_image_size)
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
    log.info("building %s/%s from %s", module.Builder.name, plan.config_name, plan.root)
    builder = module.Builder(
        config=common.DomainConfig(
            name=plan.config_name, version=common.VERSION,
            description=f"{name} domain {d!r}", plan=plan,
            skip_corrupt=skip_corrupt, num_threads=num_threads),
        data_dir=data_dir, file_format="array_record")
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if force_rebuild
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=plan.root, download_mode=mode))
    opened[d] = _open(paths[d])

  return [_task(i, name, d, paths[d], opened[d], skip_corrupt)
          for i, d in enumerate(domain_names)]


def _task(task_id: int, dataset: str, domain: str, path: str, builder,
          skip_corrupt: bool) -> TaskData:
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
  train, test = (builder.as_data_source(s, decoders=decoders) if s in info.splits else ()
                 for s in ("train", "test"))
  task_info = TaskInfo(
      name=domain, dataset=dataset, builder=f"{builder.name}/{info.config_name}",
      class_names=tuple(common.prompt_name(c) for c in raw), raw_class_names=raw,
      num_train=len(train), num_test=len(test), num_skipped=len(skipped), data_dir=path)
  return TaskData(task_id=task_id, info=task_info, train=train, test=test)
