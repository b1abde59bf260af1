"""lilllm: the finished code of the lilllm course, one module per idea.

Each notebook in `notebooks/` builds one idea from scratch and ends by importing the
matching module from this package; `lilllm.curriculum` maps notebooks to modules.
"""

__version__ = "0.1.0"


class LilllmError(Exception):
    """A problem with the user's input (a file, a setting, an argument), not a bug.

    The message says what is wrong and how to fix it; the command line prints it as
    one line, without a traceback.
    """
