"""Shared parts of the domain builders: layout checks, splits, the TFDS builder.

Each dataset module only says where its domains, classes and splits come from
(a `DomainPlan` per domain, pure Python and cheap); everything that touches
images and TFDS lives here, so all datasets store the same features:

  image      tfds.features.Image(jpeg) - see `mmap_jax.data.images` for why
  label      tfds.features.ClassLabel(names=raw class folder names)
  file_name  tfds.features.Text, the path relative to the manual dir (root)

and the same `metadata.json` (domain, raw and prompt class names, split
parameters, skipped files). Builders are never registered with TFDS
(`skip_registration=True`): modules can be re-imported freely, and our
`domainnet` cannot clash with TFDS's own `domainnet` builder. Prepared data
is read back with `tfds.builder_from_directory`, which needs no class.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import inspect
import logging
import os
import re
import uuid
import zlib
from typing import Iterable, Iterator, Mapping, Sequence

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from mmap_jax.data import images

log = logging.getLogger(__name__)

VERSION = "1.0.0"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
DEFAULT_SPLIT_SEED = 0
DEFAULT_TRAIN_FRACTION = 0.8
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_VAL_PER_CLASS = 0  # The library's carve is the fraction alone; configs ask for 8.
SHOTS_ALL = 0              # data.shots: 0 (or "all") = every train image; k = k per class.
SPLITS = ("train", "val", "test")
_VAL_SALT = zlib.crc32(b"val")  # The val carve's stream differs from the train/test split's.
_SHOTS_SALT = zlib.crc32(b"shots")  # ... and the few-shot draw's from both.


class DataLayoutError(FileNotFoundError):
  """A root, domain folder or split list is missing (says expected vs found)."""


class ClassListMismatchError(ValueError):
  """Domains of one dataset disagree on their classes."""


class SplitFileError(ValueError):
  """A split list line is malformed or inconsistent (names file and line)."""


def prompt_name(raw: str) -> str:
  """Folder name -> prompt words: 'alarm_clock' -> 'alarm clock'."""
  return " ".join(raw.replace("_", " ").split())


def slug(name: str) -> str:
  """Domain name -> TFDS config name part: 'Real World' -> 'real_world'."""
  s = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
  if not s:
    raise ValueError(f"domain name {name!r} has no letters or digits to name a TFDS config")
  return s


@dataclasses.dataclass(frozen=True)
class BuildOptions:
  """How a dataset's domains are split, checked and converted.

  Attributes:
    split_seed: seed of the stratified train/test split of folder datasets.
    train_fraction: share of each class that goes to train (folder datasets).
    split_files: folder of `<domain>_train.txt` / `<domain>_test.txt` lists
      (lines `<domain>/<class>/<file> [label]`, relative to the root) used
      instead of the seeded split; for the list datasets, where their lists are.
      An optional `<domain>_val.txt` there is the validation set (written as
      its own TFDS split; it may overlap neither train nor test).
    skip_corrupt: skip unreadable images (counted in the metadata) instead of
      failing on the first one.
    allow_per_task_classes: let domains have different class lists.
    num_threads: image conversion threads while building (0 = CPU count).
    demo_seed, demo_images_per_class, demo_image_size: the generated
      `demo_domains` world (ignored by the other datasets).
    demo_world: which demo world draws it (1: `mmap_jax.demo.world`, 10 classes; 2:
      `mmap_jax.demo.world_v2`, 24 classes, the paper's regime).
  """

  split_seed: int = DEFAULT_SPLIT_SEED
  train_fraction: float = DEFAULT_TRAIN_FRACTION
  split_files: str | None = None
  skip_corrupt: bool = False
  allow_per_task_classes: bool = False
  num_threads: int = 0
  demo_seed: int = 0
  demo_images_per_class: int = 40
  demo_image_size: int = 64
  demo_world: int = 1

  def __post_init__(self):
    if not 0.0 < self.train_fraction < 1.0:
      raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction}")


@dataclasses.dataclass(frozen=True)
class Example:
  relpath: str  # '/'-separated, relative to the root
  label: int


@dataclasses.dataclass(frozen=True)
class DomainPlan:
  """Everything needed to write one domain (= task): classes and split lists."""

  dataset: str
  domain: str
  config_name: str
  root: str
  raw_class_names: tuple[str, ...]
  train: tuple[Example, ...] = dataclasses.field(repr=False)
  test: tuple[Example, ...] = dataclasses.field(repr=False)
  split: Mapping[str, object] = dataclasses.field(repr=False)  # How train/test were made.
  val: tuple[Example, ...] = dataclasses.field(default=(), repr=False)  # From a user val list.


# ---------------------------------------------------------------- layout ---


def list_dirs(path: str) -> list[str]:
  """Sorted names of the visible sub-folders of `path`."""
  return sorted(
      e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")
  )


def check_root(root: str | None, dataset: str, expected_domains: Sequence[str]) -> str:
  if not root:
    raise DataLayoutError(
        f"{dataset}: no root folder given; expected a folder holding the domain folders "
        f"{list(expected_domains)}")
  if not os.path.isdir(root):
    parent = os.path.dirname(os.path.abspath(root))
    found = list_dirs(parent) if os.path.isdir(parent) else []
    raise DataLayoutError(
        f"{dataset}: root folder {root!r} does not exist; expected it to hold the domain "
        f"folders {list(expected_domains)} (found in {parent!r}: {found})")
  return root


def check_domains(root: str, dataset: str, expected: Sequence[str]) -> None:
  """Fails, listing expected and found folders, if a domain folder is missing."""
  found = list_dirs(root)
  missing = [d for d in expected if d not in found]
  if missing:
    raise DataLayoutError(
        f"{dataset}: missing domain folder(s) {missing} under {root!r}; "
        f"expected {list(expected)}, found {found}")


def resolve_domains(
    requested: Sequence[str] | None, available: Sequence[str], dataset: str,
    *, available_label: str = "expected one of",
) -> list[str]:
  """Maps user domain names ('real_world', 'Real World', 'real world') to folders."""
  if requested is None:
    return list(available)
  if isinstance(requested, str):
    requested = [requested]
  by_slug = {slug(d): d for d in available}
  out = []
  for name in requested:
    match = name if name in available else by_slug.get(slug(name))
    if match is None:
      raise DataLayoutError(
          f"{dataset}: unknown domain {name!r}; {available_label} {list(available)}")
    if match not in out:
      out.append(match)
  return out


def scan_domain(root: str, domain: str) -> dict[str, list[str]]:
  """`<root>/<domain>/<class>/<file>` -> {class: sorted relpaths}."""
  domain_dir = os.path.join(root, domain)
  files_by_class = {}
  for cls in list_dirs(domain_dir):
    names = sorted(
        e.name for e in os.scandir(os.path.join(domain_dir, cls))
        if e.is_file() and not e.name.startswith(".")
        and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
    files_by_class[cls] = [f"{domain}/{cls}/{n}" for n in names]
  if not files_by_class:
    raise DataLayoutError(
        f"domain folder {domain_dir!r} has no class folders; expected "
        f"<root>/{domain}/<class>/<image files>")
  return files_by_class


def check_class_lists(
    dataset: str, class_lists: Mapping[str, Sequence[str]], *, allow_per_task_classes: bool,
) -> None:
  """All domains must share one class list (same names, same label order)."""
  if allow_per_task_classes or len(class_lists) < 2:
    return
  ref_domain, ref = next(iter(class_lists.items()))
  for domain, names in class_lists.items():
    if tuple(names) == tuple(ref):
      continue
    missing = sorted(set(ref) - set(names))
    extra = sorted(set(names) - set(ref))
    detail = (f"missing {missing}, extra {extra}" if missing or extra
              else "the same classes in a different label order")
    raise ClassListMismatchError(
        f"{dataset}: domain {domain!r} has a class list different from domain "
        f"{ref_domain!r}: {detail}. Pass allow_per_task_classes=True to give each "
        "task its own classes.")


# ----------------------------------------------------------------- splits ---


def seeded_split(
    files_by_class: Mapping[str, Sequence[str]], class_names: Sequence[str], *,
    domain: str, seed: int, train_fraction: float,
) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
  """Stratified split: each class shuffled by (seed, domain, class), then cut.

  Keyed by names, not positions, so adding a class or a domain does not move
  any other class's images between train and test. Every class with >= 2
  images keeps at least one in each split.
  """
  train, test = [], []
  for label, cls in enumerate(class_names):
    files = list(files_by_class.get(cls, ()))
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode()), zlib.crc32(cls.encode())])
    order = rng.permutation(len(files))
    n_train = int(round(train_fraction * len(files)))
    if len(files) >= 2:
      n_train = min(max(n_train, 1), len(files) - 1)
    chosen = sorted(order[:n_train].tolist())
    held = sorted(order[n_train:].tolist())
    train += [Example(files[i], label) for i in chosen]
    test += [Example(files[i], label) for i in held]
  return tuple(train), tuple(test)


def carve_val(
    relpaths: Sequence[str], labels: Sequence[int], class_names: Sequence[str], *,
    domain: str, seed: int, val_fraction: float, min_per_class: int = DEFAULT_VAL_PER_CLASS,
) -> tuple[list[int], list[int]]:
  """(train indices, val indices) into a prepared train split: stratified and seeded.

  Each class's examples, ordered by relpath, are shuffled by (seed, domain, class name) on a
  stream of its own, and the first round(val_fraction * n) go to val (at least one, at most
  n - 1, when the class has >= 2 examples and val_fraction > 0). `min_per_class` raises that
  count to a floor (the few-shot protocol's >= 8 images per class), capped at n // 2 so a small
  class keeps half of its images for training. So the carve depends only on the split seed, the
  domain, the class and its files: the same for every method, training seed and `shots` of a
  sweep, and no class loses all of its training images.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  if min_per_class < 0:
    raise ValueError(f"min_per_class must be >= 0, got {min_per_class}")
  by_label: dict[int, list[int]] = {}
  for i, label in enumerate(labels):
    by_label.setdefault(int(label), []).append(i)
  val = []
  for label, members in by_label.items():
    members.sort(key=lambda i: relpaths[i])
    n = len(members)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
      n_val = min(max(n_val, 1, min(min_per_class, n // 2)), n - 1)
    elif n < 2:
      n_val = 0
    cls = class_names[label]
    rng = np.random.default_rng(
        [seed, zlib.crc32(domain.encode()), zlib.crc32(cls.encode()), _VAL_SALT])
    val += [members[j] for j in rng.permutation(n)[:n_val].tolist()]
  val_set = set(val)
  return [i for i in range(len(labels)) if i not in val_set], sorted(val)


def sample_shots(
    relpaths: Sequence[str], labels: Sequence[int], class_names: Sequence[str],
    indices: Sequence[int], *, domain: str, seed: int, shots: int,
) -> tuple[list[int], dict[str, int]]:
  """The few-shot train split: `shots` of `indices` per class, drawn by the split seed.

  Each class's candidates, ordered by relpath, are permuted by (seed, domain, class name) on a
  stream of its own and the first `shots` kept, so the draws are nested (the 4-shot split is
  part of the 16-shot one) and independent of the method and training seed. `shots=0` keeps
  every index. Returns (sorted indices, {class: count} of the classes with fewer than `shots`
  candidates, which keep all of theirs).
  """
  if shots < 0:
    raise ValueError(f"shots must be >= 0 (0 = all), got {shots}")
  if shots == SHOTS_ALL:
    return sorted(int(i) for i in indices), {}
  by_label: dict[int, list[int]] = {}
  for i in indices:
    by_label.setdefault(int(labels[i]), []).append(int(i))
  kept, short = [], {}
  for label, members in sorted(by_label.items()):
    members.sort(key=lambda i: relpaths[i])
    cls = class_names[label]
    rng = np.random.default_rng(
        [seed, zlib.crc32(domain.encode()), zlib.crc32(cls.encode()), _SHOTS_SALT])
    kept += [members[j] for j in rng.permutation(len(members))[:shots].tolist()]
    if len(members) < shots:
      short[cls] = len(members)
  return sorted(kept), short


def split_lists_text(rows: Sequence[tuple[str, int]]) -> str:
  """A split list's exact file content (lines `<relpath> <label>`)."""
  return "".join(f"{relpath} {label}\n" for relpath, label in rows)


def split_checksum(rows: Sequence[tuple[str, int]]) -> str:
  """sha256 of a split list's content: what results.json records to identify a split."""
  return hashlib.sha256(split_lists_text(rows).encode("utf-8")).hexdigest()


def write_split_lists(folder: str, domain: str,
                      lists: Mapping[str, Sequence[tuple[str, int]]]) -> dict[str, str]:
  """`<folder>/<domain>_<split>.txt` (lines `<relpath> <label>`), each written atomically.

  The format `read_split_file` reads, so the folder can be passed back as `split_files`.
  Returns {split: path}.
  """
  os.makedirs(folder, exist_ok=True)
  out = {}
  for split, rows in lists.items():
    path = os.path.join(folder, f"{domain}_{split}.txt")
    tmp = f"{path}.tmp{uuid.uuid4().hex[:12]}"  # Unique per process and host: hosts may race.
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(split_lists_text(rows))
    os.replace(tmp, path)
    out[split] = path
  return out


def find_split_file(split_dir: str, domain: str, split: str, dataset: str) -> str:
  names = [f"{domain}_{split}.txt", f"{slug(domain)}_{split}.txt"]
  for n in dict.fromkeys(names):
    path = os.path.join(split_dir, n)
    if os.path.isfile(path):
      return path
  found = (sorted(f for f in os.listdir(split_dir) if f.endswith(".txt"))
           if os.path.isdir(split_dir) else [])
  raise DataLayoutError(
      f"{dataset}: no {split} list for domain {domain!r} in {split_dir!r}; expected one of "
      f"{list(dict.fromkeys(names))}, found {found}")


def read_split_file(path: str) -> list[tuple[str, int | None, int]]:
  """Lines `<relpath> [<label>]` -> [(relpath, label or None, line number)].

  The label is the last whitespace-separated token when it is an integer, so
  paths may contain spaces ('Real World/Alarm_Clock/00001.jpg 0').
  """
  rows = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      parts = line.rsplit(None, 1)
      if len(parts) == 2 and re.fullmatch(r"-?\d+", parts[1]):
        rows.append((parts[0].strip().replace("\\", "/"), int(parts[1]), lineno))
      else:
        rows.append((line.replace("\\", "/"), None, lineno))
  return rows


def files_digest(paths: Iterable[str]) -> str:
  h = hashlib.sha1()
  for p in paths:
    with open(p, "rb") as f:
      h.update(f.read())
    h.update(b"\0")
  return h.hexdigest()[:8]


def optional_split_file(split_dir: str, domain: str, split: str) -> str | None:
  """`<domain>_<split>.txt` (or its slug form) in split_dir, or None when absent."""
  for n in dict.fromkeys([f"{domain}_{split}.txt", f"{slug(domain)}_{split}.txt"]):
    path = os.path.join(split_dir, n)
    if os.path.isfile(path):
      return path
  return None


def split_list_paths(split_dir: str, domain: str, dataset: str, *,
                     with_val: bool = True) -> list[str]:
  """The train and test lists (required) and the val list (when present), in that order."""
  paths = [find_split_file(split_dir, domain, s, dataset) for s in ("train", "test")]
  val = optional_split_file(split_dir, domain, "val") if with_val else None
  return paths + ([val] if val else [])


def split_from_files(
    split_dir: str, domain: str, class_names: Sequence[str], dataset: str,
) -> tuple[tuple[Example, ...], tuple[Example, ...], tuple[Example, ...]]:
  """User split lists for a folder dataset (train, test, val); labels follow the class folders.

  The val list is optional (empty tuple when absent); a file listed twice, in one list or
  across lists, is an error naming both places.
  """
  index = {c: i for i, c in enumerate(class_names)}
  out = {"val": ()}
  seen = {}
  for split, path in zip(("train", "test", "val"), split_list_paths(split_dir, domain, dataset)):
    examples = []
    for relpath, _, lineno in read_split_file(path):
      parts = relpath.split("/")
      if len(parts) < 3 or parts[0] != domain or parts[1] not in index:
        raise SplitFileError(
            f"{path}:{lineno}: {relpath!r} is not <domain>/<class>/<file> with domain "
            f"{domain!r} and a class folder of that domain")
      if relpath in seen:
        raise SplitFileError(
            f"{path}:{lineno}: {relpath!r} is already listed in {seen[relpath]}")
      seen[relpath] = f"{path}:{lineno}"
      examples.append(Example(relpath, index[parts[1]]))
    out[split] = tuple(examples)
  return out["train"], out["test"], out["val"]


def check_val_disjoint(val: Sequence[tuple[str, str]],
                       others: Sequence[Sequence[tuple[str, str]]]) -> None:
  """Rows (relpath, 'file:line'): a val row also in train/test (or twice in val) is an error.

  Train and test of the datasets' own lists are not checked against each other (as before).
  """
  seen = {relpath: where for rows in others for relpath, where in rows}
  for relpath, where in val:
    if relpath in seen:
      raise SplitFileError(f"{where}: {relpath!r} is already listed in {seen[relpath]}")
    seen[relpath] = where


def classes_from_lists(
    paths: Sequence[str],
) -> tuple[tuple[str, ...], list[list[tuple[str, int, str]]]]:
  """Class names from `<domain>/<class>/<file> <label>` lists.

  Returns the class names ordered by label and, per list, rows (relpath,
  label index, 'file:line'). Labels that are not 0..K-1 are renumbered in
  order; a label naming two classes (or a class with two labels) is an error.
  """
  label_to_class: dict[int, tuple[str, str]] = {}
  class_to_label: dict[str, tuple[int, str]] = {}
  parsed = []
  for path in paths:
    rows = []
    for relpath, label, lineno in read_split_file(path):
      where = f"{path}:{lineno}"
      parts = relpath.split("/")
      if label is None or len(parts) < 3:
        raise SplitFileError(
            f"{where}: expected '<domain>/<class>/<file> <label>', got {relpath!r}")
      cls = parts[1]
      if label in label_to_class and label_to_class[label][0] != cls:
        other, other_where = label_to_class[label]
        raise SplitFileError(
            f"{where}: label {label} is class {cls!r} here but {other!r} at {other_where}")
      if cls in class_to_label and class_to_label[cls][0] != label:
        other, other_where = class_to_label[cls]
        raise SplitFileError(
            f"{where}: class {cls!r} has label {label} here but {other} at {other_where}")
      label_to_class.setdefault(label, (cls, where))
      class_to_label.setdefault(cls, (label, where))
      rows.append((relpath, label, where))
    parsed.append(rows)
  labels = sorted(label_to_class)
  remap = {lab: i for i, lab in enumerate(labels)}
  names = tuple(label_to_class[lab][0] for lab in labels)
  return names, [[(r, remap[lab], w) for r, lab, w in rows] for rows in parsed]


# ---------------------------------------------------------------- builder ---


@dataclasses.dataclass(eq=False)
class DomainConfig(tfds.core.BuilderConfig):
  """One domain (= task) of a dataset, with its plan and conversion options."""

  plan: DomainPlan | None = dataclasses.field(default=None, repr=False)
  skip_corrupt: bool = False
  num_threads: int = 0


def _convert(
    root: str, examples: Sequence[Example], num_threads: int,
) -> Iterator[tuple[Example, bytes | images.UnreadableImageError]]:
  """Converts images in order with a thread pool (PIL releases the GIL)."""

  def one(ex: Example):
    try:
      return images.storage_bytes(os.path.join(root, *ex.relpath.split("/")))
    except images.UnreadableImageError as e:
      return e

  threads = num_threads or os.cpu_count() or 1
  window = 8 * threads  # Bounded: whole domains never sit in memory.
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for start in range(0, len(examples), window):
      chunk = examples[start:start + window]
      yield from zip(chunk, pool.map(one, chunk))


class DomainBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes one domain's train/test splits from a `DomainPlan` (array_record)."""

  VERSION = tfds.core.Version(VERSION)
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the dataset's root folder as the manual dir."

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """The builder's source file.

    TFDS's own lookup imports `importlib_resources`, which it only requires on
    Python < 3.9, and so fails here for builders that live in a package.
    """
    return epath.Path(inspect.getfile(cls))

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self._skipped: dict[str, list[str]] = {}

  # TFDS prints "Downloading and preparing dataset Unknown size ..." and "... downloaded and
  # prepared" to stdout; nothing is downloaded here (sources.build_tasks logs what is built).
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  @property
  def plan(self) -> DomainPlan:
    config = self.builder_config
    if not isinstance(config, DomainConfig) or config.plan is None:
      raise ValueError(f"{self.name}: build with a DomainConfig made by build_tasks")
    return config.plan

  def _info(self) -> tfds.core.DatasetInfo:
    plan = self.plan
    metadata = tfds.core.MetadataDict(
        dataset=plan.dataset,
        domain=plan.domain,
        raw_class_names=list(plan.raw_class_names),
        class_names=[prompt_name(c) for c in plan.raw_class_names],
        split=dict(plan.split),
        skip_corrupt=self.builder_config.skip_corrupt,
        num_skipped=0,
        skipped_files=[],
    )
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f"{plan.dataset} domain {plan.domain!r} ({len(plan.raw_class_names)} "
                     f"classes) from {plan.root}. Skipped unreadable images: see "
                     "metadata.json num_skipped/skipped_files."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=list(plan.raw_class_names)),
            "file_name": tfds.features.Text(),
        }),
        metadata=metadata,
        disable_shuffling=True,  # Records stay in (class, file) order.
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The plan already lists every file.
    plan = self.plan
    # TFDS cannot write an empty split; readers treat a missing one as empty.
    # A "val" split is written only from a user val list; otherwise val is carved from train
    # when the data is opened (see mmap_jax.data.sources).
    splits = {name: examples for name, examples in (("train", plan.train), ("test", plan.test),
                                                    ("val", plan.val)) if examples}
    for name in {"train", "test"} - set(splits):
      log.warning("%s/%s: the %s split is empty", plan.dataset, plan.domain, name)
    return {name: self._generate_examples(name) for name in splits}

  def _generate_examples(self, split: str):
    plan = self.plan
    config = self.builder_config
    examples = {"train": plan.train, "test": plan.test, "val": plan.val}[split]
    skipped = self._skipped.setdefault(split, [])
    for ex, result in _convert(plan.root, examples, config.num_threads):
      if isinstance(result, images.UnreadableImageError):
        if not config.skip_corrupt:
          raise images.UnreadableImageError(
              result.path, f"{result.reason} (in {plan.dataset} domain {plan.domain!r}, "
              f"{split} split; pass skip_corrupt=True to skip unreadable images)") from result
        log.warning("%s/%s: skipping %s", plan.dataset, plan.domain, result)
        skipped.append(ex.relpath)
        continue
      yield ex.relpath, {"image": result, "label": ex.label, "file_name": ex.relpath}
    all_skipped = sorted(f for files in self._skipped.values() for f in files)
    self.info.metadata["num_skipped"] = len(all_skipped)
    self.info.metadata["skipped_files"] = all_skipped
    if skipped:
      log.warning("%s/%s: skipped %d unreadable image(s) of %d in the %s split",
                  plan.dataset, plan.domain, len(skipped), len(examples), split)


# ------------------------------------------------------- dataset helpers ---


def folder_config_name(domain: str, options: BuildOptions, *, tag: str = "") -> str:
  """TFDS config name of a folder-dataset domain; encodes how it is split.

  'art' for the default seeded split, 'art-seed1-train0.7' for another seed or
  fraction, 'art-files1a2b3c4d' for user lists (digest of their contents), so
  differently split copies never overwrite each other in one data_dir.
  """
  name = slug(domain) + tag
  if options.split_files:
    paths = split_list_paths(options.split_files, domain, "split_files")
    return f"{name}-files{files_digest(paths)}"
  if (options.split_seed, options.train_fraction) != (DEFAULT_SPLIT_SEED, DEFAULT_TRAIN_FRACTION):
    return f"{name}-seed{options.split_seed}-train{options.train_fraction:g}"
  return name


def plan_folder_domains(
    dataset: str, root: str, domains: Sequence[str], options: BuildOptions,
    config_names: Mapping[str, str],
) -> list[DomainPlan]:
  """`<root>/<domain>/<class>/*` domains, split by seed or by user lists."""
  check_root(root, dataset, domains)
  check_domains(root, dataset, domains)
  plans = []
  for domain in domains:
    files_by_class = scan_domain(root, domain)
    class_names = tuple(files_by_class)  # Sorted folder names.
    val = ()
    if options.split_files:
      train, test, val = split_from_files(options.split_files, domain, class_names, dataset)
      split = {"kind": "files", "dir": os.path.abspath(options.split_files)}
    else:
      train, test = seeded_split(files_by_class, class_names, domain=domain,
                                 seed=options.split_seed, train_fraction=options.train_fraction)
      split = {"kind": "seeded", "seed": options.split_seed,
               "train_fraction": options.train_fraction}
    plans.append(DomainPlan(dataset, domain, config_names[domain], os.path.abspath(root),
                            class_names, train, test, split, val))
  return plans


def list_config_name(domain: str, options: BuildOptions) -> str:
  """'clipart' with the dataset's own lists; 'clipart-files<digest>' with others."""
  if options.split_files:
    paths = split_list_paths(options.split_files, domain, "split_files")
    return f"{slug(domain)}-files{files_digest(paths)}"
  return slug(domain)


def plan_list_domains(
    dataset: str, root: str, domains: Sequence[str], split_dir: str,
    config_names: Mapping[str, str], *, with_val: bool = True,
) -> list[DomainPlan]:
  """Domains whose classes, labels and splits come from `<domain>_{train,test}.txt`.

  With `with_val`, an optional `<domain>_val.txt` beside them is the validation split (the
  datasets pass it only for user `split_files`, whose digest keys the prepared data).
  """
  check_root(root, dataset, domains)
  check_domains(root, dataset, domains)
  plans = []
  for domain in domains:
    paths = split_list_paths(split_dir, domain, dataset, with_val=with_val)
    class_names, parsed = classes_from_lists(paths)
    if len(parsed) > 2:
      check_val_disjoint([(r, w) for r, _, w in parsed[2]],
                         [[(r, w) for r, _, w in rows] for rows in parsed[:2]])
    splits = []
    for rows in parsed:
      for relpath, _, where in rows:
        if relpath.split("/")[0] != domain:
          raise SplitFileError(f"{where}: {relpath!r} is not in domain folder {domain!r}")
      splits.append(tuple(Example(r, label) for r, label, _ in rows))
    how = {"kind": "lists", "train": os.path.abspath(paths[0]), "test": os.path.abspath(paths[1])}
    if len(paths) > 2:
      how["val"] = os.path.abspath(paths[2])
    plans.append(DomainPlan(
        dataset, domain, config_names[domain], os.path.abspath(root), class_names,
        splits[0], splits[1], how, splits[2] if len(splits) > 2 else ()))
  return plans


# ----------------------------------------------------------------- datasets ---


class FolderDataset:
  """A dataset's plug-in for `sources.build_tasks`: which domains, their TFDS config names, the
  manual dir, and the build plan. This base is a `<root>/<domain>/<class>/*` tree with a fixed
  domain list split by seed (or by split lists); the dataset modules subclass what differs.
  """

  def __init__(self, name: str, builder: type, domains: Sequence[str] = ()):
    self.name, self.Builder, self.fixed_domains = name, builder, tuple(domains)

  def domains(self, root: str | None, requested: Sequence[str] | None,
              options: BuildOptions) -> list[str]:
    """The domain folder names to build (`requested`, by folder or config name; else all)."""
    del root, options
    return resolve_domains(requested, self.fixed_domains, self.name)

  def config_name(self, domain: str, root: str | None, options: BuildOptions) -> str:
    del root
    return folder_config_name(domain, options)

  def resolve_root(self, root: str | None, data_dir: str, options: BuildOptions) -> str | None:
    """The manual dir (demo_domains generates it)."""
    del data_dir, options
    return root

  def plan(self, root: str, domains: Sequence[str], options: BuildOptions,
           config_names: dict[str, str]) -> list[DomainPlan]:
    """One DomainPlan per domain; checks the layout."""
    return plan_folder_domains(self.name, root, domains, options, config_names)


class ListDataset(FolderDataset):
  """A dataset whose classes, labels and splits come from `<domain>_{train,test}.txt` lists:
  in `split_files`, else the first of `list_dirs` (relative to root) that has them."""

  def __init__(self, name: str, builder: type, domains: Sequence[str],
               list_dirs: Sequence[str], missing_dir: str):
    super().__init__(name, builder, domains)
    self.list_dirs, self.missing_dir = tuple(list_dirs), missing_dir

  def split_dir(self, root: str, options: BuildOptions) -> str:
    """Where the lists are; `missing_dir` (relative to root) when none has them, so that
    `find_split_file` reports what is missing there."""
    if options.split_files:
      return options.split_files
    for d in self.list_dirs:
      path = os.path.normpath(os.path.join(root, d))
      if any(os.path.isfile(os.path.join(path, f"{x}_train.txt")) for x in self.fixed_domains):
        return path
    return os.path.normpath(os.path.join(root, self.missing_dir))

  def config_name(self, domain: str, root: str | None, options: BuildOptions) -> str:
    del root
    return list_config_name(domain, options)

  def plan(self, root: str, domains: Sequence[str], options: BuildOptions,
           config_names: dict[str, str]) -> list[DomainPlan]:
    check_root(root, self.name, domains)
    # A val list is honoured only in user split_files (their digest names the prepared data).
    return plan_list_domains(self.name, root, domains, self.split_dir(root, options),
                             config_names, with_val=bool(options.split_files))
