"""lilllm: the finished code of the lilllm course, one module per idea.

Each notebook in `notebooks/` builds one idea from scratch and ends by importing the
matching module from this package; `lilllm.course.CURRICULUM` maps notebooks to modules,
and the README's Contributing section lists the modules in the order they depend on each other.
"""

__version__ = "0.1.0"


class LilllmError(Exception):
    """A problem with the user's input (a file, a setting, an argument), not a bug.

    The message says what is wrong and how to fix it; the command line prints it as
    one line, without a traceback.
    """
