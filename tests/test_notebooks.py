"""The committed notebooks follow the course's rules (tests/hygiene.py), and the checker
itself catches each broken rule on small synthetic notebooks."""

import pkgutil

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

import lilllm
from lilllm.course import CURRICULUM, NOTEBOOKS_DIR, SOLUTIONS_DIR, Chapter
from tests.hygiene import course_problems, notebook_problems, prose_problems, solution_problems

NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
SOLUTIONS = sorted(SOLUTIONS_DIR.glob("*.ipynb"))
PUBLIC_MODULES = sorted(
    info.name for info in pkgutil.walk_packages(lilllm.__path__, "lilllm.")
    if not info.ispkg and not any(part.startswith("_") for part in info.name.split("."))
)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_follows_the_rules(path):
    assert notebook_problems(path) == []


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_committed_solutions_follow_the_rules(path):
    assert notebook_problems(path) == []


def test_the_committed_notebooks_stay_light():
    # A clone should stay quick to download: about 100 KB per notebook on average, figures included.
    total = sum(path.stat().st_size for path in NOTEBOOKS + SOLUTIONS)
    limit = 100_000 * len(NOTEBOOKS + SOLUTIONS)
    assert total <= limit, f"the notebooks hold {total:,} bytes (at most {limit:,}): lighten the heaviest figures or listings"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_exercise_has_a_solution(path):
    assert solution_problems(path, SOLUTIONS_DIR) == []


@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=lambda p: p.name)
def test_no_run_dependent_number_is_typed_into_markdown(path):
    assert prose_problems(path) == []


def test_the_prose_checker_catches_a_typed_number_and_accepts_printed_asserted_and_quoted_ones(tmp_path):
    notebook = good_notebook()
    notebook.cells.append(new_markdown_cell("The cache is about 5x faster, at 1,234 tok/s."))
    problems = prose_problems(write(tmp_path, notebook))
    assert len(problems) == 2 and "'5x'" in problems[0] and "'1,234 tok/s'" in problems[1], problems
    notebook.cells.append(new_code_cell("assert 4 < speedup < 5  # seed=1234", execution_count=3, outputs=[
        new_output("stream", name="stdout", text="speed 1234.4 tokens/s\n")]))
    assert prose_problems(write(tmp_path, notebook)) == []
    notebook.cells[-1].source = "assert speedup > 4 and seed == 5"  # 5 is bounded, 1234 no longer printed
    notebook.cells[-1].outputs = []
    assert prose_problems(write(tmp_path, notebook)) == [problems[1]]
    notebook.cells[-2].source += "\n<!-- quoted: 1,234 tok/s, from the paper -->\n\n```\nlilllm bench  # 9x\n```"
    assert prose_problems(write(tmp_path, notebook)) == []


def test_the_solutions_checker_catches_a_missing_and_a_skipped_solution(tmp_path):
    chapter = good_notebook()
    chapter.cells.append(new_markdown_cell("## Exercises\n\n1. One thing.\n2. Another,\n   on two lines.\n"))
    path = write(tmp_path, chapter)
    assert any("no 03_topic_solutions.ipynb" in p for p in solution_problems(path, tmp_path))
    solutions = good_notebook()
    solutions.cells.append(new_markdown_cell("## Solution 1\n\nDone."))
    write(tmp_path, solutions, "03_topic_solutions.ipynb")
    assert any("solutions [1] for exercises [1, 2]" in p for p in solution_problems(path, tmp_path))
    solutions.cells.append(new_markdown_cell("## Solution 2\n\nDone too."))
    write(tmp_path, solutions, "03_topic_solutions.ipynb")
    assert solution_problems(path, tmp_path) == []


def test_course_is_numbered_mapped_and_teaches_every_module():
    assert NOTEBOOKS, "no notebooks found"
    assert course_problems(NOTEBOOKS, PUBLIC_MODULES, CURRICULUM) == []


def test_every_written_chapter_is_in_the_readme_table():
    readme = (NOTEBOOKS_DIR.parent / "README.md").read_text()
    for chapter in CURRICULUM:
        if chapter.written:
            assert f"notebooks/{chapter.notebook}.ipynb" in readme, chapter.notebook


# --- the checker, on synthetic notebooks ------------------------------------------------

def good_notebook():
    return new_notebook(cells=[
        new_markdown_cell("# A chapter"),
        new_code_cell("import lilllm", execution_count=1),
        new_code_cell("print(1 + 1)", execution_count=2,
                      outputs=[new_output("stream", name="stdout", text="2\n")]),
    ])


def write(tmp_path, notebook, name="03_topic.ipynb"):
    path = tmp_path / name
    nbformat.write(notebook, path)
    return path


def test_a_good_notebook_has_no_problems(tmp_path):
    assert notebook_problems(write(tmp_path, good_notebook())) == []


def break_execution_order(nb):
    nb.cells[1].execution_count, nb.cells[2].execution_count = 2, 1


def break_unexecuted(nb):
    nb.cells[2].execution_count = None


def break_stderr(nb):
    nb.cells[2].outputs.append(new_output("stream", name="stderr", text="UserWarning: careful\n"))


def break_error(nb):
    nb.cells[2].outputs.append(new_output("error", ename="ValueError", evalue="bad", traceback=["ValueError: bad"]))


def break_absolute_path(nb):
    nb.cells[2].outputs[0].text = "saved to /home/alice/lilllm/figures/x.png\n"


def break_no_lilllm(nb):
    nb.cells[1].source = "import torch"


def break_no_outputs(nb):
    nb.cells[2].outputs = []


def break_empty_cell(nb):
    nb.cells.append(new_code_cell("", execution_count=3))


@pytest.mark.parametrize("break_rule, expected", [
    (break_execution_order, "executed once, in order"),
    (break_unexecuted, "executed once, in order"),
    (break_stderr, "writes to stderr"),
    (break_error, "error output"),
    (break_absolute_path, "absolute path"),
    (break_no_lilllm, "never imports lilllm"),
    (break_no_outputs, "has no outputs"),
    (break_empty_cell, "empty code cell"),
])
def test_the_checker_catches_each_broken_rule(tmp_path, break_rule, expected):
    notebook = good_notebook()
    break_rule(notebook)
    problems = notebook_problems(write(tmp_path, notebook))
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize("name", ["3_topic.ipynb", "03-topic.ipynb", "Topic.ipynb", "03_Topic.ipynb"])
def test_the_checker_catches_bad_names(tmp_path, name):
    problems = notebook_problems(write(tmp_path, good_notebook(), name))
    assert any("name must look like" in problem for problem in problems)


def test_the_checker_catches_invalid_json(tmp_path):
    path = tmp_path / "03_topic.ipynb"
    path.write_text("{not json")
    assert any("not a valid notebook" in problem for problem in notebook_problems(path))


def test_the_checker_catches_course_level_problems(tmp_path):
    source = good_notebook()
    source.cells[1].source = "import lilllm.alpha"
    paths = [write(tmp_path, source, "00_alpha.ipynb"), write(tmp_path, good_notebook(), "02_gap.ipynb")]
    curriculum = [Chapter("00_alpha", "", ("lilllm.alpha",)), Chapter("02_gap", "", ("lilllm.beta",))]
    problems = course_problems(paths, ["lilllm.alpha", "lilllm.beta", "lilllm.gamma"], curriculum)
    assert any("without gaps" in p for p in problems)
    assert any("02_gap.ipynb should import lilllm.beta" in p for p in problems)
    assert any("lilllm.gamma is not taught" in p for p in problems)
    assert not any("lilllm.alpha" in p for p in problems)
    unmapped = course_problems(paths, ["lilllm.alpha"], curriculum[:1])
    assert any("02_gap.ipynb is not in the curriculum map" in p for p in unmapped)
