"""LoRA adapters as data: a slot bank of `A [L, S, d_in, R]` / `B [L, S, R, d_out]` per target beside the
frozen base weights, applied to mixed-adapter batches through the models' `LinearHook`, with PEFT
import/export and merging into full Hugging Face weights.
"""

from lora.bank import (
    ALL_TARGETS,
    ATTN_TARGETS,
    DEFAULT_ALPHA,
    MLP_TARGETS,
    ONE_HOT_MAX_SLOTS,
    UNEMBED_TARGET,
    LoraBank,
    LoraWeights,
    empty_bank,
    init_adapter,
    lora_relative_flops,
    make_hook,
    read_slot,
    select_targets,
    target_shape,
    write_slot,
)
from lora.peft_io import export_merged, export_peft, import_peft

__all__ = [
    "ALL_TARGETS",
    "ATTN_TARGETS",
    "DEFAULT_ALPHA",
    "MLP_TARGETS",
    "ONE_HOT_MAX_SLOTS",
    "UNEMBED_TARGET",
    "LoraBank",
    "LoraWeights",
    "empty_bank",
    "export_merged",
    "export_peft",
    "import_peft",
    "init_adapter",
    "lora_relative_flops",
    "make_hook",
    "read_slot",
    "select_targets",
    "target_shape",
    "write_slot",
]
