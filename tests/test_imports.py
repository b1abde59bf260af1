"""The package's dependencies point one way. Each module may import only modules below it
in LAYERS (read from the source with `ast`, imports inside functions included), so the
day someone adds an upward import or a cycle, this fails and names it."""

import ast
from pathlib import Path

import lilllm

PACKAGE = Path(lilllm.__file__).parent
# Bottom to top. layers/* are one level: they may import each other, but not in a cycle.
LAYERS = ["runtime", "config", "layers", "model", "hourglass", "tokenizer", "chat", "data", "checkpoint", "hf", "settings",
          "progress", "optim", "train", "sampling", "sft", "next_speaker", "bench", "env", "course", "diagrams", "cli"]


def package_imports() -> dict[str, set[str]]:
    """{module: the lilllm modules it imports}, modules named relative to the package
    ("train", "layers.moe"); importing the package itself (LilllmError) is not counted."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        if name == "__init__":
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            imported |= {n.removeprefix("lilllm.") for n in names if n.startswith("lilllm.")}
        graph[name] = imported
    return graph


def level(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a imports b' for every import of a module at the same level or above (layers/* may
    import each other), and every module that has no level."""
    problems = [f"{m} has no place in LAYERS: add it where its imports allow" for m in graph
                if m.split(".")[0] not in LAYERS]
    for module, imported in graph.items():
        for target in imported:
            if module.split(".")[0] not in LAYERS or target.split(".")[0] not in LAYERS:
                continue
            same_package = module.startswith("layers.") and target.startswith("layers")
            if level(target) > level(module) or (level(target) == level(module) and not same_package):
                problems.append(f"{module} imports {target}, which is not below it")
    return sorted(problems)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk of the import graph."""
    found, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_every_import_points_down():
    assert upward_imports(package_imports()) == []


def test_there_are_no_import_cycles():
    assert cycles(package_imports()) == []


def test_the_graph_is_read_from_the_source():
    graph = package_imports()
    assert "runtime" in graph["data"] and "checkpoint" in graph["train"] and "train" in graph["sft"]
    assert graph["runtime"] == set()
    assert {"layers.attention", "layers.sublayer"} <= graph["layers.plga"]


def test_the_checks_catch_an_upward_import_and_a_cycle():
    graph = {"runtime": set(), "model": {"runtime"}, "train": {"model"}, "layers.moe": {"layers.ffn"},
             "layers.ffn": set()}
    assert upward_imports(graph) == []
    assert upward_imports({**graph, "model": {"train"}}) == ["model imports train, which is not below it"]
    assert upward_imports({**graph, "sft": {"next_speaker"}}) == ["sft imports next_speaker, which is not below it"]
    assert upward_imports({**graph, "extras": set()}) == ["extras has no place in LAYERS: add it where its imports allow"]
    assert cycles(graph) == []
    assert cycles({**graph, "layers.ffn": {"layers.moe"}}) == [["layers.ffn", "layers.moe", "layers.ffn"]]
