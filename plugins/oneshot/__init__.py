"""One-shot compression from calibration data, no fine-tuning: GPTQ, SparseGPT, Wanda, AWQ-style scaling.

Each technique compresses the model layer by layer from a few hundred calibration samples
(``plugins.oneshot.calibration``: blocks run one after another, so a layer is compressed with the
inputs the already-compressed layers before it produce).  None of them declares ``needs_recovery``,
so a plan of only these stages costs seconds, not a fine-tuning run.
"""
