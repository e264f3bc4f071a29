"""Every experiment config builds for every method and passes validation; arguments are checked."""
import importlib

import pytest

from configs import common
from mmap_jax.models.config import get_variant
from mmap_jax.prompts.spec import METHODS, PromptSpec
from mmap_jax.train import setup

CONFIGS = ["demo", "office_home", "mini_domainnet", "domainnet", "image_folder"]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("method", METHODS)
def test_every_config_and_method_validates(name, method):
  module = importlib.import_module(f"configs.{name}")
  c = module.get_config(f"method={method},clip=/ckpt,root=/data")
  setup.validate(c, num_devices=8)
  clip_cfg = get_variant("demo" if name == "demo" else "ViT-B/16")
  PromptSpec.from_config(c.prompt, c.method).validate(clip_cfg)
  assert c.method == method and c.clip.path == "/ckpt"


@pytest.mark.parametrize("name", CONFIGS)
def test_runlocal_shrinks(name):
  module = importlib.import_module(f"configs.{name}")
  full, small = module.get_config("clip=/c"), module.get_config("clip=/c,runlocal")
  assert small.train.steps < full.train.steps and small.runlocal and not full.runlocal


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("method", METHODS)
def test_method_means_the_same_from_the_argument_and_the_flag(name, method):
  """`file.py:method=X` and `--config.method=X` build the same config, so the same run."""
  module = importlib.import_module(f"configs.{name}")
  by_arg = module.get_config(f"method={method},clip=/ckpt,root=/data")
  by_flag = module.get_config("clip=/ckpt,root=/data")
  by_flag.method = method
  assert by_arg.to_dict() == by_flag.to_dict()


@pytest.mark.parametrize("method,clip,length,depth,source_dim", [
    ("mmap_mt", "ViT-B/16", 8, 11, 256), ("maple_mt", "ViT-B/16", 2, 9, None),
    ("vpt_mt", "ViT-B/16", 8, 12, None), ("coop_mt", "ViT-B/16", 16, 1, None),
    ("mmap_mt", "ViT-L/14", 8, 11, 256),
    # The demo CLIP: 3 text / 4 vision layers, widths 64 / 128.
    ("mmap_mt", "demo", 8, 3, 64), ("maple_st", "demo", 2, 3, None),
    ("ivlp_mt", "demo", 2, 3, None), ("vpt_mt", "demo", 8, 4, None), ("coop_st", "demo", 16, 1, None),
    ("mmap_st", "tiny", 8, 3, 16)])
def test_prompt_defaults_resolve_against_the_clip(method, clip, length, depth, source_dim):
  spec = PromptSpec(method=method).validate(get_variant(clip))
  cfg = get_variant(clip)
  assert (spec.length, spec.depth_for(cfg)) == (length, depth)
  if source_dim is not None:
    assert spec.source_dim_for(cfg) == source_dim
  assert spec.depth is None   # resolved per CLIP, never frozen into the spec


def test_defaults_follow_the_recipe():
  c = importlib.import_module("configs.office_home").get_config("clip=/c")
  r = setup.recipe(c)   # optim.* are None: MaPLe / MmAP's published recipe
  assert (r.recipe.name, r.recipe.lr, r.recipe.momentum) == ("sgd", 0.0035, 0.9)
  assert r.overridden == () and all(v is None for k, v in c.optim.items() if k != "accum_steps")
  assert c.method == "mmap_mt" and c.groups.mode == "gradient"


def test_parse_arg_types_and_errors():
  a = common.parse_arg("x=3,flag,name=foo,r=0.5", x=1, flag=False, name=None, r=0.1)
  assert (a.x, a.flag, a.name, a.r) == (3, True, "foo", 0.5)
  with pytest.raises(ValueError, match="unknown config argument 'nope'"):
    common.parse_arg("nope=1", x=1)
  with pytest.raises(ValueError, match="needs a value"):
    common.parse_arg("x", x=1)
  with pytest.raises(ValueError, match="true or false"):
    common.parse_arg("flag=maybe", flag=False)


def test_validate_names_every_bad_field():
  c = importlib.import_module("configs.demo").get_config("clip=/c")
  c.optim.lr = -1.0
  c.input.batch_size = 12
  c.clip.dtype = "float16"
  with pytest.raises(setup.ConfigError) as e:
    setup.validate(c, num_devices=8)
  msg = str(e.value)
  for field in ("optim.lr", "input.batch_size", "clip.dtype"):
    assert field in msg
