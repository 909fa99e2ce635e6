"""Text in matplotlib figures is data, never markup.

A label (a class name, a file name) is shown as it is: matplotlib would read ``$...$`` in it as
mathtext (``price $\\x$ now`` fails with ``Unknown symbol: \\x``) and, with ``text.usetex`` on in a
user's matplotlibrc, the whole label as LaTeX. :func:`plain` escapes the dollars; :func:`no_tex`
draws a plot function's figures with ``text.usetex`` off.
"""
from __future__ import annotations

import functools


def plain(label) -> str:
    """``label`` as text matplotlib shows literally: every ``$`` escaped (``\\$`` is a literal dollar
    outside math, and with no unescaped dollar left there is no math)."""
    return str(label).replace("$", r"\$")


def no_tex(fn):
    """Run the plot function ``fn`` with ``text.usetex`` off (restored afterwards)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib
        with matplotlib.rc_context({"text.usetex": False}):
            return fn(*args, **kwargs)
    return wrapper
