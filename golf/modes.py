"""The eval modes registry: EVAL_MODE name -> function and final log label, read by the pipeline,
eval_bpb.py and pack.py.
"""

from collections.abc import Callable
from dataclasses import dataclass

from golf.evaluation import eval_val, eval_val_sliding, eval_val_ttt
from golf.ttt import eval_val_ttt_lora, eval_val_ttt_phased


@dataclass(frozen=True)
class EvalMode:
    """An eval mode: its EVAL_MODE name, `evaluate(h, model, val_tokens, luts)`, and the label of
    its final log lines (`<label> val_loss:... val_bpb:...` and `<label>_exact ...`)."""

    name: str
    evaluate: Callable
    label: str


EVAL_MODES = {
    mode.name: mode
    for mode in (
        EvalMode("standard", eval_val, "final_int8_zlib_roundtrip"),
        EvalMode("sliding", eval_val_sliding, "final_sliding_window"),
        EvalMode("ttt", eval_val_ttt, "legal_ttt"),
        EvalMode("ttt_lora", eval_val_ttt_lora, "quantized_ttt_lora"),
        EvalMode("ttt_phased", eval_val_ttt_phased, "quantized_ttt_phased"),
    )
}
