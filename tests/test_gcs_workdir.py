"""gs:// workdirs end to end, against a Cloud Storage emulator on loopback (no network).

The emulator (`gcp-storage-emulator`, in memory) serves the GCS JSON API on 127.0.0.1. Every
client is pointed at it: gcsfs (epath's gs:// backend without TensorFlow) by
STORAGE_EMULATOR_HOST with anonymous credentials, orbax's tensorstore gcs kvstore by
TENSORSTORE_GCS_HTTP_URL with GOOGLE_AUTH_TOKEN_FOR_TESTING (tensorstore's test credentials),
and every metadata-server lookup at a closed loopback port, so nothing can leave the machine.
The emulator is made to keep two promises of real GCS that tensorstore relies on (see
`_faithful_generations`): media reads carry the object's generation, and an upload with
`ifGenerationMatch` is refused (412) when the generation moved.
The tiny config trains into gs://<bucket>/run, is restarted with more steps and resumes from
its checkpoint; the test then checks what is in the bucket and that nothing mirroring the URI
(a `gs:` directory) appeared on the local disk.
"""
from __future__ import annotations

import http
import json
import logging
import os
import pathlib
import socket

import numpy as np
import pytest
from etils import epath

from mmap_jax import paths
from tests import train_fixtures as fx

REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "mmap-test"


# ----------------------------------------------------------------------------- the path helper

def test_as_path_keeps_uris_and_absolutises_local_paths(tmp_path, monkeypatch):
  for uri in ("gs://b/run", "gs://b/a/b/c", "s3://bucket/x"):
    p = paths.as_path(uri)
    assert isinstance(p, epath.Path) and os.fspath(p) == uri
    assert os.fspath(p / "checkpoints") == uri + "/checkpoints"
  assert paths.as_path(paths.as_path("gs://b/run")) == paths.as_path("gs://b/run")
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.as_path("runs/x")) == str(tmp_path / "runs" / "x")
  assert os.fspath(paths.as_path(pathlib.Path("y"))) == str(tmp_path / "y")
  assert os.fspath(paths.as_path(epath.Path("z"))) == str(tmp_path / "z")
  assert os.fspath(paths.as_path("/abs/w")) == "/abs/w"
  with pytest.raises(ValueError, match=r"unsupported scheme memory://"):
    paths.as_path("memory://x/run")   # epath would make it a local 'memory:' directory
  assert list(tmp_path.iterdir()) == []


def test_atomic_write_locally_leaves_only_the_file(tmp_path):
  target = tmp_path / "sub" / "results.json"
  paths.write_text_atomic(str(target), "{}")
  paths.write_text_atomic(target, '{"a": 1}')
  assert json.loads(target.read_text()) == {"a": 1}
  assert [p.name for p in target.parent.iterdir()] == ["results.json"]


# ----------------------------------------------------------------------------- the emulator

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _faithful_generations(mp, handlers, objects, not_found):
  """Makes the emulator answer like GCS where tensorstore depends on it.

  GCS sends `x-goog-generation` with every media read; the emulator does not, so tensorstore
  records generation 0 for anything it reads back (an OCDBT manifest re-read while other arrays
  of the same checkpoint commit) and its next conditional write fails as "Malformed
  StorageGeneration" (0 is not a valid GCS generation). That was a timing-dependent CI failure.
  GCS also refuses an upload whose `ifGenerationMatch` no longer holds; the emulator ignores the
  condition, which would let a lost compare-and-swap pass unnoticed.
  """
  download, insert = objects.download, objects.insert

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    if response.status.value in (200, 206):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])

  def insert_if_generation_matches(request, response, storage, *args, **kwargs):
    wanted = request.query.get("ifGenerationMatch")
    name = request.query.get("name")   # media uploads (tensorstore's); multipart ones pass as-is
    if wanted and name:
      try:
        current = int(storage.get_file_obj(request.params["bucket_name"], name[0])["generation"])
      except not_found:
        current = 0   # GCS: ifGenerationMatch=0 means "only if absent"
      if int(wanted[0]) != current:
        response.status = http.HTTPStatus.PRECONDITION_FAILED
        return None
    return insert(request, response, storage, *args, **kwargs)

  mp.setattr(objects, "download", download_with_generation)   # objects.get calls it by name
  mp.setattr(objects, "insert", insert_if_generation_matches)
  for _, by_method in handlers:
    for method, fn in list(by_method.items()):
      if fn is download:
        mp.setitem(by_method, method, download_with_generation)
      elif fn is insert:
        mp.setitem(by_method, method, insert_if_generation_matches)


@pytest.fixture(scope="module")
def gcs():
  """An in-memory GCS emulator on loopback with one bucket; yields 'gs://<bucket>'."""
  pytest.importorskip("gcsfs")
  emulator = pytest.importorskip("gcp_storage_emulator.server")
  import fsspec
  import gcsfs.core
  from etils.epath import backend
  from gcp_storage_emulator.exceptions import NotFound
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  closed = "127.0.0.1:9"   # discard port: a metadata-server lookup fails at once, locally
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "NO_GCE_CHECK": "true",
         "GCE_METADATA_HOST": closed, "GCE_METADATA_IP": closed,
         "GCE_METADATA_ROOT": closed, "GOOGLE_CLOUD_PROJECT": "test"}
  server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  with pytest.MonkeyPatch.context() as mp:
    _faithful_generations(mp, emulator.HANDLERS, emulator.objects, NotFound)
    for k, v in env.items():
      mp.setenv(k, v)
    # Plain GCSFileSystem (not gcsfs' zonal-bucket probe, which asks a gRPC control API the
    # emulator lacks) with anonymous credentials; fresh instances that see the emulator.
    mp.setitem(fsspec.config.conf, "gcs", {"token": "anon"})
    for proto in ("gs", "gcs"):
      fsspec.register_implementation(proto, gcsfs.core.GCSFileSystem, clobber=True)
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()
    server.start()
    # The emulator's HTTP server prints a traceback when a client drops a kept-alive socket.
    server._api._httpd.handle_error = lambda *a: None
    try:
      yield f"gs://{BUCKET}"
    finally:
      server.stop()
      backend.fsspec_backend._get_filesystem.cache_clear()
      gcsfs.core.GCSFileSystem.clear_instance_cache()


@pytest.mark.slow
def test_emulator_keeps_the_generation_contract_tensorstore_relies_on(gcs):
  """A read back reports the object's generation, a write conditioned on it succeeds, and a
  write conditioned on a stale generation (or on absence) is refused, as on GCS."""
  import tensorstore as ts
  kv = ts.KvStore.open({"driver": "gcs", "bucket": BUCKET, "path": "contract/"}).result()
  written = kv.write("k", b"hello").result().generation
  ranged = kv.read("k", byte_range=slice(1, 3)).result()
  assert ranged.value == b"el" and ranged.stamp.generation == written
  assert kv.read("k").result().stamp.generation == written
  rewritten = kv.write("k", b"again", if_equal=written).result().generation
  assert rewritten not in (b"", written)
  assert kv.write("k", b"lost", if_equal=written).result().generation == b""   # 412: unknown
  absent = kv.read("missing").result()
  assert absent.state == "missing"
  # Conditioned on absence (ifGenerationMatch=0): refused for an existing key, done for a new one.
  assert kv.write("k", b"lost", if_equal=absent.stamp.generation).result().generation == b""
  assert kv.write("new", b"x", if_equal=absent.stamp.generation).result().generation != b""
  assert kv.read("k").result().value == b"again"


def _objects(uri: str) -> list[str]:
  """Every object under a gs:// prefix, as paths relative to it."""
  import fsspec
  fs = fsspec.filesystem("gcs")
  root = uri[len("gs://"):].rstrip("/")
  return sorted(p[len(root) + 1:] for p in fs.find(root))


@pytest.fixture(scope="module")
def trained(gcs, tmp_path_factory, bpe_path):
  """Everything that writes, in an empty working directory (so anything written to a local path
  mirroring the URI, e.g. `./gs:/bucket/run`, is seen by `test_nothing_is_written_locally`):

  MmAP-MT with gradient grouping, 4 steps into gs://.../run, then restarted with 6 steps (it
  resumes from step 4); launch.evaluate's path with --out in the bucket; a one-run sweep over
  gs://.../sweep, run twice (the second finds the run finished and only tabulates).
  """
  from mmap_jax.apps import sweep
  from mmap_jax.train import loop
  root = tmp_path_factory.mktemp("gcs")
  clip_dir = fx.make_tiny_clip(root / "clip", bpe_path)
  data_dir = str(root / "tfds")
  cwd = root / "cwd"
  cwd.mkdir()
  workdir = f"{gcs}/run"
  config = fx.tiny_config(clip_dir, data_dir)
  config.train.steps = 4
  records = []
  handler = logging.Handler()
  handler.emit = lambda record: records.append(record.getMessage())
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  overrides = dict(a[len("--config."):].split("=", 1) for a in fx.override_flags(data_dir))
  settings = sweep.make_settings(f"{REPO}/configs/demo.py:clip={clip_dir},runlocal",
                                 "method=zeroshot", overrides, seeds=[0])
  ran = []
  run_fn = lambda c, w: ran.append(w) or loop.train_and_evaluate(c, w)
  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(cwd)
    first = loop.train_and_evaluate(config, workdir)
    first_objects = _objects(workdir)
    config.train.steps = 6
    absl_logger.addHandler(handler)
    absl_logger.setLevel(logging.INFO)
    try:
      second = loop.train_and_evaluate(config, workdir)
    finally:
      absl_logger.removeHandler(handler)
      absl_logger.setLevel(level)
    evaluated = loop.evaluate_workdir(config, workdir, out=f"{gcs}/eval")
    sweep.run(settings, f"{gcs}/sweep", run_fn=run_fn, log=lambda s: None)
    swept_again = sweep.run(settings, f"{gcs}/sweep", run_fn=run_fn, log=lambda s: None)
  return {"workdir": workdir, "first": first, "second": second, "evaluated": evaluated,
          "first_objects": first_objects, "logs": records, "cwd": cwd, "root": root,
          "sweep_ran": ran, "swept_again": swept_again}


@pytest.mark.slow
def test_run_and_resume_write_everything_to_the_bucket(trained):
  workdir = trained["workdir"]
  objects = _objects(workdir)
  for f in ("results.json", "results.md", "groups.json", "affinity.npy", "affinity.png",
            "affinity_history.npy", "grouping_warmup.safetensors"):
    assert f in objects, f
  run = epath.Path(workdir)
  saved = json.loads((run / "results.json").read_text())
  assert saved == json.loads(json.dumps(trained["second"]))
  assert saved["trained_steps"] == 6 and trained["first"]["trained_steps"] == 4
  groups = json.loads((run / "groups.json").read_text())
  assert groups["mode"] == "gradient" and len(groups["groups"]) == 2
  np.testing.assert_allclose(paths.load_npy(run / "affinity.npy"), groups["affinity"], atol=1e-6)
  assert paths.load_npy(run / "affinity_history.npy").shape == (2, 4, 4)
  assert (run / "affinity.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
  # orbax: complete steps 2, 4, 6 (keep 3), each committed, arrays written by tensorstore.
  steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4, 6]
  for s in steps:
    assert f"checkpoints/{s}/commit_success.txt" in objects
    assert any(o.startswith(f"checkpoints/{s}/state/") and "/d/" in o for o in objects)
  assert not any(".tmp" in o for o in objects)   # no temporary leftovers of atomic writes


@pytest.mark.slow
def test_restart_resumed_from_the_checkpoint(trained):
  workdir = trained["workdir"]
  # The restart restored step 4 from the bucket (the URI reached orbax unmangled) ...
  assert f"resumed from {workdir}/checkpoints at step 4" in trained["logs"]
  # ... and trained only steps 5..6: its own event file logs train/loss at step 6 alone, the
  # first run's at 2 and 4 (log_every=2).
  events = [o for o in _objects(workdir) if o.startswith("tensorboard/events.out.tfevents.")]
  assert len(events) == 2, events
  logged = sorted(fx.event_scalar_steps((epath.Path(workdir) / e).read_bytes())["train/loss"]
                  for e in events)
  assert logged == [[2, 4], [6]]
  # The groups came back with the checkpoint: no second grouping warm-up.
  assert "groups.json" in trained["first_objects"]
  assert trained["second"]["groups"] == trained["first"]["groups"]
  assert not any("grouping warm-up" in m for m in trained["logs"])


@pytest.mark.slow
def test_evaluate_and_predict_read_the_bucket(trained):
  from mmap_jax.train import trained as trained_lib
  ev = trained["evaluated"]
  assert ev["tasks"] == trained["second"]["tasks"]   # the same selected state, the same test set
  assert json.loads((epath.Path(trained["workdir"]).parent / "eval" / "results.json")
                    .read_text())["evaluated_state"] == "selected"
  model = trained_lib.load_trained(trained["workdir"])
  assert model.step == trained["second"]["step"]
  assert model.task_names == tuple(trained["second"]["tasks"])


@pytest.mark.slow
def test_sweep_over_a_bucket_runs_once_then_only_tabulates(gcs, trained):
  assert trained["sweep_ran"] == [f"{gcs}/sweep/method=zeroshot/seed=0"]  # then found finished
  again = trained["swept_again"]
  assert again["missing"] == [] and len(again["rows"]) == 1
  objects = _objects(f"{gcs}/sweep")
  for f in ("results.json", "results.md", "accuracy_vs_params.png",
            "method=zeroshot/seed=0/results.json"):
    assert f in objects, f
  table = json.loads((epath.Path(gcs) / "sweep" / "results.json").read_text())
  assert table["rows"][0]["average"]["per_seed"] == [
      json.loads((epath.Path(gcs) / "sweep/method=zeroshot/seed=0/results.json").read_text())
      ["average"]]


@pytest.mark.slow
def test_nothing_is_written_locally(trained):
  assert list(trained["cwd"].iterdir()) == []
  for base in (REPO, trained["root"], pathlib.Path.cwd()):
    assert not (base / "gs:").exists(), base
