"""The rules every committed notebook follows, as a checker the tests run (and test).

`notebook_problems` checks one notebook; `course_problems` checks the folder as a whole.
Each returns a list of human-readable problems; an empty list means the rules hold.
"""

import base64
import io
import re
from pathlib import Path

import nbformat

NAME = re.compile(r"^(\d\d)_[a-z0-9_]+\.ipynb$")
BONUS_NAME = re.compile(r"^bonus_[a-z0-9_]+\.ipynb$")
# Units that only a run can put next to a number (a speed, a ratio, a share, a loss, a
# duration, a size), each with the spellings that count as the same unit in an output.
RUN_UNITS = {
    "%": r"%",
    "×": r"(?:×|x\b)",
    "tok/s": r"(?:tok/s|tokens/s|tokens per second)",
    "bits per byte": r"(?:bits per byte|bpb)",
    "nats": r"nats?\b",
    "bytes per token": r"(?:bytes per token|bytes/token)",
    "ms": r"ms\b",
    "s": r"(?:s\b|seconds?\b)",
    "minutes": r"(?:minutes?|min)\b",
    "bytes": r"[KMG]i?B\b",
}
RUN_NUMBER = re.compile(r"(?<![\w.,$^_{])(\d[\d,]*(?:\.\d+)?)\s?(" + "|".join(RUN_UNITS.values()) + ")")
FENCED_CODE = re.compile(r"```.*?```", re.DOTALL)
QUOTED = re.compile(r"<!--\s*quoted:(.*?)-->", re.DOTALL)
SOLUTION_HEADING = re.compile(r"^#+\s*Solution (\d+)\b", re.MULTILINE)
# Home folders and temporary folders of Linux, macOS and Windows machines.
ABSOLUTE_PATH = re.compile(r"(/home/|/Users/|/root/|/tmp/|/work/|/private/var/|[A-Za-z]:\\\\Users\\\\)")
IMPORTS_LILLLM = re.compile(r"^\s*(import lilllm|from lilllm[\s.])", re.MULTILINE)


def _output_text(output) -> str:
    if output.output_type == "stream":
        return output.text
    if output.output_type == "error":
        return "\n".join(output.traceback)
    data = output.get("data", {})
    return "\n".join(str(data[key]) for key in ("text/plain", "text/html", "text/markdown") if key in data)


def notebook_problems(path: Path) -> list[str]:
    """Problems with one notebook file: format, name, execution, outputs, imports."""
    path = Path(path)
    problems = []
    if not (NAME.match(path.name) or BONUS_NAME.match(path.name)):
        problems.append(f"{path.name}: name must look like NN_topic.ipynb or bonus_topic.ipynb")
    try:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
    except Exception as err:  # any parse or schema error is the same problem: not a valid notebook
        return problems + [f"{path.name}: not a valid notebook ({type(err).__name__}: {str(err)[:200]})"]

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code_cells]
    if not code_cells:
        problems.append(f"{path.name}: has no code cells")
    if any(not cell.source.strip() for cell in code_cells):
        problems.append(f"{path.name}: has an empty code cell")
    if counts != list(range(1, len(code_cells) + 1)):
        problems.append(f"{path.name}: code cells were not all executed once, in order, in one fresh run "
                        f"(execution counts {counts})")
    if code_cells and not any(cell.outputs for cell in code_cells):
        problems.append(f"{path.name}: has no outputs (commit it executed)")
    for number, cell in enumerate(code_cells, start=1):
        for output in cell.outputs:
            where = f"{path.name}, code cell {number}"
            if output.output_type == "error":
                problems.append(f"{where}: error output ({output.ename})")
            if output.output_type == "stream" and output.name == "stderr":
                problems.append(f"{where}: writes to stderr ({output.text.strip()[:80]!r})")
            match = ABSOLUTE_PATH.search(_output_text(output))
            if match:
                problems.append(f"{where}: output holds an absolute path ({match.group()!r}...)")
            if "image/png" in output.get("data", {}) and _png_mode(output.data["image/png"]) != "P":
                problems.append(f"{where}: a full-colour PNG (call setup_notebook() first: it stores 256-colour ones)")
    if not any(IMPORTS_LILLLM.search(cell.source) for cell in code_cells):
        problems.append(f"{path.name}: never imports lilllm")
    return problems


def _png_mode(encoded: str) -> str:
    """The colour mode of a base64 PNG: "P" for a palette of at most 256 colours."""
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(encoded))).mode


def imported_modules(path: Path) -> set[str]:
    """The lilllm modules a notebook imports ("lilllm.data", "lilllm.layers.rope", ...)."""
    notebook = nbformat.read(path, as_version=4)
    source = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    return set(re.findall(r"(?:from|import)\s+(lilllm(?:\.\w+)*)", source))


def course_problems(notebook_paths: list[Path], public_modules: list[str], curriculum) -> list[str]:
    """Problems with the course as a whole: contiguous numbering from 00, every notebook in
    the curriculum map, each notebook importing the modules the map assigns it, and every
    public lilllm module taught by some notebook."""
    problems = []
    names = [Path(p).name for p in notebook_paths]
    numbers = sorted(int(NAME.match(n).group(1)) for n in names if NAME.match(n))
    if numbers != list(range(len(numbers))):
        problems.append(f"notebook numbers must run 00, 01, 02, ... without gaps or repeats: found {numbers}")
    chapters = {chapter.notebook: chapter for chapter in curriculum}
    taught = set()
    for path in notebook_paths:
        path = Path(path)
        if NAME.match(path.name) and path.stem not in chapters:
            problems.append(f"{path.name} is not in the curriculum map (lilllm/course.py)")
            continue
        if path.stem not in chapters:
            continue
        imported = imported_modules(path)
        for module in chapters[path.stem].modules:
            if module not in public_modules:
                continue  # a chapter's module that is not written yet
            if module in imported:
                taught.add(module)
            else:
                problems.append(f"{path.name} should import {module} (the curriculum map says it teaches it)")
    for module in public_modules:
        if module not in taught:
            problems.append(f"{module} is not taught by any notebook: add it to a chapter in lilllm/course.py")
    return problems


def exercise_numbers(path: Path) -> list[int]:
    """The numbers of the exercises listed under a chapter's "## Exercises" heading."""
    notebook = nbformat.read(path, as_version=4)
    numbers = []
    for cell in notebook.cells:
        if cell.cell_type == "markdown" and "## Exercises" in cell.source:
            section = cell.source.split("## Exercises", 1)[1].split("\n## ", 1)[0]
            numbers += [int(n) for n in re.findall(r"^(\d+)\.\s", section, re.MULTILINE)]
    return numbers


def solution_problems(chapter: Path, solutions_dir: Path) -> list[str]:
    """Problems with a chapter's solutions notebook: it exists (NN_topic_solutions.ipynb), and
    it has a "Solution N" heading for every exercise of the chapter, and no other."""
    chapter = Path(chapter)
    exercises = exercise_numbers(chapter)
    if not exercises:
        return []
    path = Path(solutions_dir) / f"{chapter.stem}_solutions.ipynb"
    if not path.exists():
        return [f"{chapter.name} has {len(exercises)} exercises and no {path.name}"]
    notebook = nbformat.read(path, as_version=4)
    text = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    solved = sorted(int(n) for n in SOLUTION_HEADING.findall(text))
    if solved != sorted(exercises):
        return [f"{path.name} has solutions {solved} for exercises {sorted(exercises)}"]
    return []


def _forms(number: str) -> set[str]:
    return {re.escape(number), re.escape(number.replace(",", ""))}


def _printed_with_unit(number: str, unit: str, text: str) -> bool:
    """Whether `text` prints `number` followed by the same unit (in any of its spellings);
    a printed 45.3% stands for a written 45%."""
    spellings = next(pattern for pattern in RUN_UNITS.values() if re.fullmatch(pattern, unit))
    return any(re.search(rf"(?<![\d.,]){form}(?:\.\d+)?\s?{spellings}", text) for form in _forms(number))


def _written(number: str, text: str) -> bool:
    """Whether `number` is written in `text` as a number of its own."""
    return any(re.search(rf"(?<![\d.,]){form}(?![\d,])", text) for form in _forms(number))


def _bounded(number: str, asserts: str) -> bool:
    """Whether an assert compares something with `number` (`assert 0.45 < ratio < 0.65`)."""
    return any(re.search(rf"(?:[<>]=?|==)\s*{form}(?![\d.,])|(?<![\d.,]){form}\s*(?:[<>]=?|==)", asserts) for form in _forms(number))


def prose_problems(path: Path) -> list[str]:
    """Numbers typed into a notebook's Markdown with a unit that comes from a run (%, ×, tok/s,
    bits per byte, nats, seconds, ...) that no code cell of the notebook prints with the same
    unit, and no assert of a code cell bounds. Numbers quoted from papers or fixed by
    definition are listed in the cell as `<!-- quoted: 12%, 2.8× -->` and pass. Fenced code in
    Markdown (commands) is skipped."""
    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    printed = "\n".join(_output_text(output) for cell in code_cells for output in cell.outputs)
    asserts = "\n".join(line for cell in code_cells for line in cell.source.splitlines() if "assert" in line)
    problems = []
    for number, cell in enumerate(notebook.cells):
        if cell.cell_type != "markdown":
            continue
        quoted = " ".join(QUOTED.findall(cell.source))
        prose = QUOTED.sub("", FENCED_CODE.sub("", cell.source))
        for match in RUN_NUMBER.finditer(prose):
            value, unit = match.group(1).rstrip(","), match.group(2)
            if not (_printed_with_unit(value, unit, printed) or _bounded(value, asserts) or _written(value, quoted)):
                problems.append(f"{path.name}, cell {number}: {match.group().strip()!r} is typed into Markdown; "
                                f"no output prints {value} {unit} and no assert bounds it")
    return problems
