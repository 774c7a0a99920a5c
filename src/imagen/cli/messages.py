"""What the ``imagen`` command says on stderr besides its results: warnings (and, with
``--verbose`` or ``IMAGEN_LOG``, info and debug lines) in the CLI's own voice,
``imagen: warning: ...``, without breaking a progress bar.

:func:`cli_messages` is installed by :func:`imagen.cli.main.main` around every command. Every
record logged at the chosen level (``IMAGEN_LOG=debug|info|warning|error``, default warning;
``--verbose`` is info) and every Python warning (``warnings.warn``: torch's, diffusers' and
transformers' UserWarnings and the like, with their usual once-per-place filters) goes through
one handler. It writes through tqdm's writer while tqdm is loaded, so a live bar is cleared,
the line written, and the bar drawn again below it; on a terminal the line is wrapped to its
width (continuation lines indented two spaces), elsewhere it is one line. Below the warning
level each line also names its logger. transformers, diffusers and huggingface_hub write to
stderr through handlers of their own: :func:`adopt_library_loggers` (called once a command's
model is loaded and when a progress bar starts) sends their records through this handler
instead. torch- and tqdm-free: it is set up before a command's arguments are parsed.
"""

from __future__ import annotations

import logging
import os
import sys
import textwrap
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

PROG = "imagen"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
LIBRARIES = ("transformers", "diffusers", "huggingface_hub")
"""Libraries whose loggers write to stderr through a handler of their own."""
INDENT = "  "


def log_level(verbose: bool) -> tuple[int, str | None]:
    """The level to show (``IMAGEN_LOG`` wins over ``--verbose``), and a complaint about an
    ``IMAGEN_LOG`` value that is not a level."""
    value = os.environ.get("IMAGEN_LOG", "").strip().lower()
    default = logging.INFO if verbose else logging.WARNING
    if not value:
        return default, None
    if value not in LEVELS:
        known = ", ".join(LEVELS)
        return default, f"IMAGEN_LOG={value}: expected one of {known}; using the default"
    return LEVELS[value], None


def terminal_width(stream: TextIO) -> int | None:
    """The width of the terminal ``stream`` writes to (as tqdm measures it: the terminal's
    own size, else ``COLUMNS``), or None when it is not a terminal."""
    try:
        if not stream.isatty():
            return None
    except (AttributeError, ValueError):  # no isatty, or closed
        return None
    try:
        return os.get_terminal_size(stream.fileno()).columns or None
    except (AttributeError, OSError, ValueError):
        pass
    try:
        return int(os.environ.get("COLUMNS", "")) or 80
    except ValueError:
        return 80


def wrap(text: str, width: int | None) -> str:
    """``text`` wrapped to ``width`` (None: as it is), every line after the first indented;
    words longer than a line (paths) are kept whole."""
    if width is None:
        return text
    lines: list[str] = []
    for k, paragraph in enumerate(text.splitlines() or [""]):
        lines += textwrap.wrap(
            paragraph,
            width=max(width - 1, 20),  # not the last column: some terminals wrap early there
            initial_indent="" if k == 0 else INDENT,
            subsequent_indent=INDENT,
            break_long_words=False,
            break_on_hyphens=False,
        ) or [""]
    return "\n".join(lines)


def write(text: str, stream: TextIO | None = None) -> None:
    """Write ``text`` and a newline to ``stream`` (default: stderr now), through tqdm's
    writer where tqdm is loaded, so that no bar on that stream is broken."""
    stream = stream if stream is not None else sys.stderr
    tqdm_std = sys.modules.get("tqdm.std")
    if tqdm_std is not None:
        tqdm_std.tqdm.write(text, file=stream)
    else:
        stream.write(text + "\n")
    stream.flush()


class MessageFormatter(logging.Formatter):
    """``imagen: warning: message``; with ``names``, ``imagen: info: logger.name: message``."""

    def __init__(self, names: bool = False) -> None:
        super().__init__()
        self.names = names

    def format(self, record: logging.LogRecord) -> str:
        level = "error" if record.levelno >= logging.ERROR else record.levelname.lower()
        head = f"{PROG}: {level}: " + (f"{record.name}: " if self.names else "")
        message = record.getMessage()
        where = getattr(record, "warning_at", None)  # a Python warning's file and line
        if self.names and where:
            message += f" [{where}]"
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return head + message


class MessageHandler(logging.Handler):
    """Writes each record with :func:`write` to stderr as it is when the record comes (so
    redirected or captured stderr is honoured), wrapped where stderr is a terminal (a record
    with a traceback is not)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            width = None if record.exc_info else terminal_width(stream)  # tracebacks as they are
            write(wrap(self.format(record), width), stream)
        except Exception:
            self.handleError(record)


def warning_origin(filename: str) -> str:
    """The package a warning came from (``torch``, ``transformers``), from its file name."""
    parts = Path(filename).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts[:-1]:
            return Path(parts[parts.index(marker) + 1]).stem
    if "imagen" in parts[:-1]:
        return PROG
    return Path(filename).name


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` for the command: the warning as a log record of
    ``py.warnings`` (to a ``file`` given explicitly, the way it was shown before)."""
    if file is not None and _installed:
        _installed[-1].show_warning(message, category, filename, lineno, file, line)
        return
    logging.getLogger("py.warnings").warning(
        "%s (%s from %s)",
        message,
        category.__name__,
        warning_origin(filename),
        extra={"warning_at": f"{filename}:{lineno}"},
    )


class _Installed:
    """What :func:`cli_messages` changed, to put back when the command returns."""

    def __init__(self, handler: MessageHandler) -> None:
        self.handler = handler
        self.root_level = logging.getLogger().level
        self.show_warning = warnings.showwarning
        self.libraries: dict[str, tuple[list[logging.Handler], bool]] = {}
        self.adopted: dict[str, tuple[list[logging.Handler], bool]] = {}

    def adopt(self) -> None:
        """Route the loaded :data:`LIBRARIES`' loggers through the handler (again: a library
        may configure its logger after it was first seen; then that configuration is the one
        :meth:`restore` puts back)."""
        for name in LIBRARIES:
            logger = logging.Logger.manager.loggerDict.get(name)
            if not isinstance(logger, logging.Logger):
                continue
            state = (list(logger.handlers), logger.propagate)
            if self.adopted.get(name) != state:  # first seen, or changed by its library since
                self.libraries[name] = state
            for h in [h for h in logger.handlers if _own_stderr_handler(h)]:
                logger.removeHandler(h)
            logger.propagate = True
            self.adopted[name] = (list(logger.handlers), True)

    def restore(self) -> None:
        """Put the libraries' loggers, the root logger and ``warnings.showwarning`` back."""
        warnings.showwarning = self.show_warning
        root = logging.getLogger()
        root.removeHandler(self.handler)
        root.setLevel(self.root_level)
        for name, (handlers, propagate) in self.libraries.items():
            logger = logging.getLogger(name)
            logger.handlers = handlers  # as they were, in their order
            logger.propagate = propagate


def _own_stderr_handler(handler: logging.Handler) -> bool:
    """Whether ``handler`` is a library's plain stderr handler (``logging.StreamHandler()``:
    not a file's handler, not one writing to stdout)."""
    stream: Any = getattr(handler, "stream", None)
    return type(handler) is logging.StreamHandler and stream not in (sys.stdout, sys.__stdout__)


_installed: list[_Installed] = []


def adopt_library_loggers() -> None:
    """Send the records of transformers, diffusers and huggingface_hub (those loaded so far)
    through the command's handler instead of their own stderr handlers."""
    if _installed:
        _installed[-1].adopt()


@contextmanager
def cli_messages(verbose: bool = False) -> Iterator[None]:
    """While inside: log records and Python warnings reach stderr as described in the module
    docstring; on leaving, the logging and warnings set-up is as it was."""
    level, complaint = log_level(verbose)
    root = logging.getLogger()
    handler = MessageHandler(level)
    handler.setFormatter(MessageFormatter(names=level < logging.WARNING))
    installed = _Installed(handler)
    root.addHandler(handler)
    if root.level > level:  # only ever lowered: the handler
        root.setLevel(level)  # filters, and a caller's (a test's) lower level keeps working
    warnings.showwarning = show_warning
    _installed.append(installed)
    installed.adopt()
    if complaint:
        logging.getLogger("imagen.cli").warning("%s", complaint)
    try:
        yield
    finally:
        _installed.remove(installed)
        installed.restore()
