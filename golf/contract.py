"""The contract between the shared machinery and a model module: what a model must provide
(MODEL_CONTRACT_REQUIRED), its optional hooks (MODEL_HOOKS), and the registry of model families
(ModelSpec) through which the pipeline, the container and the tools build a model.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

# The model contract: what the shared machinery needs from each model module (golf/models/*.py).
#
# Required, at module level (MODEL_CONTRACT_REQUIRED; a test checks every model and bundle):
#   Hyperparameters - a dataclass subclassing golf.config.BaseHyperparameters with the model's
#       own fields; its `validate_model()` checks them, naming the variable.
#   PRESETS - {name: {field: value}}: `record`, `smoke` (and `baseline` in train_gpt.py).
#   MODEL - the ModelSpec that `register_model` returned: the script name of the model's bundle
#       (whose bytes are the counted code and whose sha256 binds the artifact), and the names
#       below, through which the pipeline and the tools reach the model.
#   CONTROL_TENSOR_PATTERNS - parameter-name components of control tensors (scales, mixes, gates):
#       Adam, fp32 in the artifact. `is_control_tensor` matches them against whole dotted
#       components, so "attn_gate" does not catch "attn_gate_proj".
#   build_model(h) - the model on CPU in fp32. `forward(input_ids, target_ids)` returns the mean
#       token cross-entropy (training); `forward_logits(input_ids)` returns (batch, seq, vocab)
#       logits after any softcap (every eval and audit).
#   param_groups(model, h) - (Muon matrices, Adam param groups with `base_lr`).
#   main() - the entry point, called under `if __name__ == "__main__":`.
#
# Optional attributes of the model (MODEL_HOOKS), read only through `model_hook(model, name)`:
#   prepare_training(h, rt, logger) - statistics built from train shards before the loop, timed
#       inside the training budget (TimeLedger.precompute_s).
#   set_training_progress(frac) - called every step with the budget fraction used (0..1), and
#       with 0 and 1 during warmup so that both graphs of a schedule get compiled.
#   validation_probes() - a dict shown on the dashboard at each periodic validation.
#   training_only_prefixes - state_dict prefixes of training-only heads, left out of the artifact.
#   blocks - the layer list: score-first TTT freezes the first TTT_FREEZE_BLOCKS of them.
#   tok_emb - the token embedding, probed before and after quantization.
#   lora_targets() - {name: module} that LoRA TTT adapts (default: nn.Linear under `blocks`, an
#       `lm_head` module, else `final_norm` in front of a tied head). TTT_LORA_FORM=record does
#       not call it: it needs gpt's blocks.N.attn / blocks.N.mlp modules and a head module.

MODEL_CONTRACT_REQUIRED = (
    "Hyperparameters",
    "Hyperparameters.validate_model",
    "PRESETS",
    "MODEL",
    "CONTROL_TENSOR_PATTERNS",
    "build_model",
    "param_groups",
    "main",
)
MODEL_HOOKS = (
    "prepare_training",
    "set_training_progress",
    "validation_probes",
    "training_only_prefixes",
    "blocks",
    "tok_emb",
    "lora_targets",
)


@dataclass(frozen=True)
class ModelSpec:
    """One model family, as its module registers it: the script name its bundle has (and the
    artifact header names), the module's file, its Hyperparameters class and PRESETS, the
    CONTROL_TENSOR_PATTERNS, and the two functions the pipeline calls."""

    script: str
    source_file: str
    hyperparameters: type
    presets: dict
    control_patterns: tuple
    build_model: Callable
    param_groups: Callable

    @property
    def code_path(self):
        """The bundle whose bytes are the counted code: the bundle at the top of the checkout
        when the model runs from the package (golf/models/<family>.py), else the file it runs
        from, which is the bundle (or a compact form of it, or a copy under another name)."""
        here = os.path.abspath(self.source_file)
        models = os.path.dirname(here)
        package = os.path.dirname(models)
        if os.path.basename(models) != "models" or os.path.basename(package) != "golf":
            return here
        return os.path.join(os.path.dirname(package), self.script)


MODELS = {}  # script name -> ModelSpec, filled as model modules register


def register_model(**fields):
    """Registers a model family (ModelSpec fields) and links its Hyperparameters class to it."""
    spec = ModelSpec(**fields)
    spec.hyperparameters.spec = spec
    MODELS[spec.script] = spec
    return spec


def model_for_script(script, where):
    """The registered ModelSpec of `script` (an artifact header's script name)."""
    spec = MODELS.get(script)
    if spec is None:
        known = ", ".join(sorted(MODELS)) or "none"
        raise ValueError(
            f"{where}: written by {str(script)[:60]!r}, not a model this process has "
            f"(registered: {known})"
        )
    return spec


def model_hook(model, name):
    """The model's optional attribute `name` (one of MODEL_HOOKS), or None where it has none."""
    if name not in MODEL_HOOKS:
        raise ValueError(f"{name!r} is not a model hook (known: {', '.join(MODEL_HOOKS)})")
    return getattr(model, name, None)


def is_control_tensor(name, patterns):
    """Whether one of a parameter name's dotted components is in `patterns` (a model's
    CONTROL_TENSOR_PATTERNS)."""
    return any(part in patterns for part in name.split("."))
