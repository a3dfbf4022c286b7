"""LoRA adapters as data: a slot bank of `A [S, d_in, R]` / `B [S, R, d_out]` beside the frozen base
weights, applied to mixed-adapter batches through the models' `LinearHook`, with PEFT import/export.

(Landing with issue #3.)
"""
