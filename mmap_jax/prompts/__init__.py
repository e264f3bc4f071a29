"""Prompt methods (CoOp, VPT, MaPLe, IVLP, MmAP) behind one interface, and their multi-task wiring.

Family modules: `init(key, clip_cfg, spec) -> params`, `expand(params, clip_cfg, spec) ->
PromptTokens`. `multitask` builds the learned pytree of a method and per-task prompt tokens.
"""
from mmap_jax.prompts.base import PromptTokens
from mmap_jax.prompts.multitask import (Groups, clip_params_for, clip_per_task, init_learned,
                                        param_summary, resolve_groups, task_prompts,
                                        task_to_group, trainable_param_count)
from mmap_jax.prompts.spec import FAMILIES, METHODS, PromptSpec

__all__ = ["PromptTokens", "PromptSpec", "METHODS", "FAMILIES", "Groups", "init_learned",
           "task_prompts", "clip_params_for", "clip_per_task", "trainable_param_count",
           "param_summary", "resolve_groups", "task_to_group"]
