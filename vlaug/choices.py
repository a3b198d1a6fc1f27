"""Closed choices and reserved names shared by the library and the command line.

Defined once here, in a module that imports nothing, so that the CLI builds its options
from them (``vlaug --help`` stays fast: no torch, no pyarrow) and the library checks
against the same tuples.
"""

CLASSES_PROMPT_SET = "classes"  # the class-name prompt ensemble in texts.parquet
STORAGE_DTYPES = ("float16", "float32")  # of the image embeddings in a cache
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # of the encoder's forward pass
HEAD_KINDS = ("box", "dr-sa", "dr-pool", "lads")  # stage-2 heads (vlaug train-box --head)
PROTOCOLS = ("single", "leave-one-domain-out")  # vlaug probe --protocol
SELECTIONS = ("training-domain", "leave-one-domain-out", "oracle", "all")  # vlaug probe --selection (DomainBed's)
REWEIGHTS = ("none", "groupdro", "seed-category", "seed-category-kmeans")  # probe reweighting (vlaug probe --reweight)
# LatentDR's layer options
DR_NORMS = ("post", "pre")
DR_MODES = ("dr", "d", "r")
DR_DEGRADES = ("attention", "gaussian")

# the modules of vlaug/methods that hold the built-in stage-3 methods, in their listing order
# (--method all, --help, the docs' table); any other module there is imported after them
METHOD_MODULES = ("zero_shot", "linear", "augmenting", "joint", "robust", "fewshot", "cdga")


def builtin_methods() -> tuple[str, ...]:
    """The built-in stage-3 methods as --method's help lists them (``NAME:DIR``: it needs a
    head), read off the registered classes' source in vlaug/methods/ without importing
    them: the CLI imports no torch to build its help. A test checks it lists
    ``vlaug.methods.REGISTRY``."""
    import ast
    from pathlib import Path

    folder = Path(__file__).parent / "methods"
    others = sorted(p.stem for p in folder.glob("*.py") if p.stem not in METHOD_MODULES and not p.stem.startswith("_"))
    found = []
    for module in (*METHOD_MODULES, *others):
        for node in ast.parse((folder / f"{module}.py").read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.ClassDef) or not any(getattr(d, "id", "") == "register" for d in node.decorator_list):
                continue
            values = {t.id: a.value for a in node.body if isinstance(a, ast.Assign) for t in a.targets
                      if isinstance(t, ast.Name)}
            if "name" in values:
                path = (":DIR" if "head_kinds" in values else
                        ":" + ast.literal_eval(values["path_argument"]) if "path_argument" in values else "")
                found.append(ast.literal_eval(values["name"]) + path)
    return tuple(found)
