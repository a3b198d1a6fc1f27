"""Closed choices and reserved names shared by the library and the command line.

Defined once here, in a module that imports nothing, so that the CLI builds its options
from them (``vlaug --help`` stays fast: no torch, no pyarrow) and the library checks
against the same tuples.
"""

CLASSES_PROMPT_SET = "classes"  # the class-name prompt ensemble in texts.parquet
STORAGE_DTYPES = ("float16", "float32")  # of the image embeddings in a cache
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # of the encoder's forward pass
HEAD_KINDS = ("box", "dr-sa", "dr-pool", "lads")  # stage-2 heads (vlaug train-box --head)
REWEIGHTS = ("none", "groupdro", "seed-category", "seed-category-kmeans")  # probe reweighting (vlaug probe --reweight)
# LatentDR's layer options
DR_NORMS = ("post", "pre")
DR_MODES = ("dr", "d", "r")
DR_DEGRADES = ("attention", "gaussian")

# the built-in stage-3 methods as --method's help lists them (NAME:DIR: needs a head); the CLI
# imports no torch, so this repeats vlaug.methods.REGISTRY, and a test checks that it does
METHODS = ("zero-shot", "linear", "linear-zs", "box:DIR", "dr:DIR", "lads:DIR", "gaussian", "mixup", "xdomain-mix",
           "linear-adamw", "batchformer", "latentdr-sa", "latentdr-pool", "gda", "text-anchor", "prompt-shift", "adaptive")
