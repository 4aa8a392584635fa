"""YAML loading that remembers where each key stood, so errors can name a line.

PyYAML's safe_load throws positions away, and it silently keeps the last of two
duplicate keys; a field engineer needs both caught.  We compose the node tree
once, record the line of every key path, and construct plain data from it.

A file that is not a YAML mapping in UTF-8 text gets one problem in plain words, with
the line and column and, for a syntax error, the offending line and a caret under the
spot: PyYAML's "expected <block end>" means nothing to someone at a substation.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

MAX_PROFILE_BYTES = 2 << 20  # a 1000-asset site is ~300 kB: more is another file, and slow to parse
MAX_VALUES = 200_000  # what anchors and aliases may expand to (a "billion laughs" file is refused)
MAX_DEPTH = 64


class WarningText(str):
    """A check's message that is a warning (will surprise at run time), not an error.

    Drivers' ``check_assets`` return ``(key path, message)``; a message of this type warns."""


@dataclass(frozen=True)
class ProfileProblem:
    file: str
    line: int  # 1-based; 0 when the problem is the file itself (missing, a folder ...)
    path: str
    message: str
    severity: str = "error"  # or "warning"
    excerpt: str = ""  # the offending line and a caret under the spot (syntax errors)

    @property
    def is_warning(self) -> bool:
        return self.severity == "warning"

    def __str__(self) -> str:
        if self.line <= 0:  # the file itself
            return f"{self.file}: {self.message}"
        where = f"{self.file}:{self.line}"
        return f"{where} {self.path}: {self.message}" if self.path else f"{where} {self.message}"


def path_text(loc: Iterable[Any]) -> str:
    """``("assets", 2, "serial", "port")`` -> ``assets[2].serial.port``."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def path_loc(text: str) -> tuple[Any, ...]:
    """The inverse of :func:`path_text`, for key paths written in messages."""
    return tuple(int(p[1:-1]) if p.startswith("[") else p for p in re.findall(r"\[\d+\]|[^.\[\]]+", text))


def did_you_mean(word: Any, choices: Iterable[Any]) -> str:
    """`` (did you mean 'x'?)`` when one of ``choices`` is close to ``word``, else ``""``."""
    options = {str(c): c for c in choices}
    text = str(word)
    for option in options:
        if option.lower() == text.lower() and option != text:
            return f" (did you mean {option!r}?)"
    lowered = {o.lower(): o for o in options}
    close = difflib.get_close_matches(text.lower(), list(lowered), n=1, cutoff=0.72)
    return f" (did you mean {lowered[close[0]]!r}?)" if close and lowered[close[0]] != text else ""


@dataclass
class YamlDocument:
    name: str
    data: Any = None
    lines: dict[tuple[Any, ...], int] = field(default_factory=dict)
    problems: list[ProfileProblem] = field(default_factory=list)
    line_count: int = 0
    sha256: str | None = None  # of the file's bytes, when they could be read

    def line_of(self, loc: tuple[Any, ...]) -> int:
        """Line of the deepest recorded prefix of ``loc`` (1-based)."""
        for end in range(len(loc), -1, -1):
            line = self.lines.get(tuple(loc[:end]))
            if line is not None:
                return line
        return 1

    def has(self, loc: tuple[Any, ...]) -> bool:
        return tuple(loc) in self.lines

    def problem(self, loc: tuple[Any, ...], message: str, severity: str = "error") -> ProfileProblem:
        return ProfileProblem(self.name, self.line_of(loc), path_text(loc), message, severity)


# ------------------------------------------------------------------ the tree


def _key_value(node: yaml.Node) -> Any:
    """The key as the constructed data has it (``1:`` is the int 1, ``true:`` True)."""
    if isinstance(node, yaml.ScalarNode) and node.tag != "tag:yaml.org,2002:str":
        try:
            return yaml.SafeLoader("").construct_object(node)
        except yaml.YAMLError:
            return node.value
    return node.value if isinstance(node, yaml.ScalarNode) else None


class _Walker:
    def __init__(self, doc: YamlDocument):
        self.doc = doc
        self.sizes: dict[int, int] = {}  # id(node) -> values it expands to

    def walk(self, node: yaml.Node, path: tuple[Any, ...], depth: int = 0) -> int:
        """Record the lines under ``node`` and return how many values it expands to."""
        if depth > MAX_DEPTH:
            raise _TooDeep(node.start_mark.line + 1)
        known = self.sizes.get(id(node))
        if known is not None:  # an alias: counted, but its keys' lines are those of the anchor
            return known
        self.sizes[id(node)] = 1  # a node that contains itself counts once
        size = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = _key_value(key_node)
                line = key_node.start_mark.line + 1
                if key in seen and key != "<<":
                    shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else key
                    self.doc.problems.append(ProfileProblem(
                        self.doc.name, line, path_text(path + (key,)),
                        f"duplicate key `{shown}` (also at line {seen[key]}); YAML would silently keep only the last"))
                try:
                    seen[key] = line
                except TypeError:  # an unhashable key: the constructor says so
                    continue
                self.doc.lines.setdefault(path + (key,), line)
                size += self.walk(value_node, path + (key,), depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.doc.lines.setdefault(path + (index,), item.start_mark.line + 1)
                size += self.walk(item, path + (index,), depth + 1)
        self.sizes[id(node)] = size
        if size > MAX_VALUES:
            raise _TooBig(node.start_mark.line + 1)
        return size


class _TooDeep(Exception):
    def __init__(self, line: int):
        self.line = line


class _TooBig(Exception):
    def __init__(self, line: int):
        self.line = line


# ------------------------------------------------------------------ loading


def _read(path: Path, doc: YamlDocument) -> bytes | None:
    """The file's bytes, or ``None`` with one problem saying why not."""
    def fail(message: str) -> None:
        doc.problems.append(ProfileProblem(str(path), 0, "", message))

    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        fail("does not exist")
        return None
    except OSError as error:
        fail(f"cannot be reached: {(error.strerror or str(error)).lower()}")
        return None
    if stat.S_ISDIR(info.st_mode):
        fail("is a folder, not a profile file")
        return None
    if not stat.S_ISREG(info.st_mode):
        fail("is not a regular file (a device, a pipe or a socket)")  # reading a FIFO would block
        return None
    if info.st_size > MAX_PROFILE_BYTES:
        fail(f"is {info.st_size / 1e6:.1f} MB: a site profile is a few kB to a few hundred kB (the limit is "
             f"{MAX_PROFILE_BYTES // (1 << 20)} MB); is this the right file?")
        return None
    try:
        with open(path, "rb") as handle:
            return handle.read(MAX_PROFILE_BYTES + 1)
    except OSError as error:
        fail(f"cannot be read: {(error.strerror or str(error)).lower()}")
        return None


def _decode(raw: bytes, doc: YamlDocument) -> str | None:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        doc.problems.append(ProfileProblem(doc.name, 1, "", "the file is UTF-16 text: save it as UTF-8"))
        return None
    if b"\x00" in raw:
        line = raw[:raw.index(b"\x00")].count(b"\n") + 1
        doc.problems.append(ProfileProblem(doc.name, line, "", "the file holds binary data (a NUL byte), not YAML "
                                                              "text: is this the right file?"))
        return None
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark (Windows editors) is fine
    except UnicodeDecodeError as error:
        before = raw[:error.start]
        line = before.count(b"\n") + 1
        column = error.start - (before.rfind(b"\n") + 1) + 1
        doc.problems.append(ProfileProblem(
            doc.name, line, "", f"column {column}: byte 0x{raw[error.start]:02x} is not UTF-8 text; save the file as "
                                f"UTF-8 (it was probably written as Latin-1 or Windows-1252)"))
        return None


def load_yaml(path: Path) -> YamlDocument:
    path = Path(path)
    doc = YamlDocument(name=path.name)
    raw = _read(path, doc)
    if raw is None:
        return doc
    doc.sha256 = hashlib.sha256(raw).hexdigest()
    text = _decode(raw, doc)
    if text is None:
        return doc
    doc.line_count = len(text.splitlines()) or 1
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        doc.problems.append(_syntax_problem(error, text, doc.name))
        return doc
    except RecursionError:
        doc.problems.append(ProfileProblem(doc.name, 1, "", f"nested too deeply (more than {MAX_DEPTH} levels)"))
        return doc
    if root is None:
        doc.problems.append(ProfileProblem(doc.name, 1, "", "the file is empty (or holds only comments)"))
        return doc
    doc.lines[()] = root.start_mark.line + 1
    try:
        _Walker(doc).walk(root, ())
    except _TooDeep as deep:
        doc.problems.append(ProfileProblem(doc.name, deep.line, "", f"nested too deeply (more than {MAX_DEPTH} levels)"))
        return doc
    except _TooBig as big:
        doc.problems.append(ProfileProblem(doc.name, big.line, "", f"anchors and aliases (&name, *name) expand to more "
                                                                   f"than {MAX_VALUES} values: not a site profile"))
        return doc
    try:  # with duplicate keys too: they are errors, and the rest is still worth checking
        doc.data = yaml.SafeLoader(text).get_single_data()
    except yaml.YAMLError as error:
        doc.problems.append(_syntax_problem(error, text, doc.name))
    except RecursionError:
        doc.problems.append(ProfileProblem(doc.name, 1, "", "anchors and aliases refer to themselves"))
    return doc


# ------------------------------------------------------------ syntax errors


def _excerpt(lines: list[str], line: int, column: int) -> str:
    if not 1 <= line <= len(lines):
        return ""
    text = lines[line - 1].rstrip("\n")
    shown = text.replace("\t", "→")  # a tab shown as itself is invisible
    return f"{shown}\n{' ' * max(column - 1, 0)}^"


def _indent(text: str) -> int:
    return len(text) - len(text.lstrip(" "))


def _open_quote_line(lines: list[str], upto: int) -> int | None:
    """The first line before ``upto`` whose value opens a quote it does not close: a string running
    on over several lines is legal YAML, but in a profile it is nearly always a missing quote."""
    for number, text in enumerate(lines[:upto], start=1):
        body = text.split(" #")[0] if not text.lstrip().startswith("#") else ""
        match = re.match(r"\s*(?:-\s+)?(?:[^'\"\s][^:]*:\s+|-\s+)?(['\"])(.*)$", body)
        if not match:
            continue
        quote, rest = match.groups()
        closed = rest.replace("''", "") if quote == "'" else re.sub(r"\\.", "", rest)
        if quote not in closed:
            return number
    return None


def _previous_content_line(lines: list[str], line: int) -> int | None:
    for number in range(line - 1, 0, -1):
        stripped = lines[number - 1].strip()
        if stripped and not stripped.startswith("#"):
            return number
    return None


def _syntax_problem(error: yaml.YAMLError, text: str, name: str) -> ProfileProblem:
    lines = text.splitlines()
    if isinstance(error, yaml.reader.ReaderError):
        before = text[:error.position]
        line, column = before.count("\n") + 1, error.position - (before.rfind("\n") + 1) + 1
        char = error.character if isinstance(error.character, str) else chr(error.character)
        message = (f"column {column}: a control character (U+{ord(char):04X}) that YAML does not allow: is this a "
                   f"text file? (delete the character)")
        return ProfileProblem(name, line, "", message, excerpt=_excerpt(lines, line, column))
    problem = getattr(error, "problem", None) or ""
    context = getattr(error, "context", None) or ""
    mark = getattr(error, "problem_mark", None)
    context_mark = getattr(error, "context_mark", None)
    line = mark.line + 1 if mark else 1
    column = mark.column + 1 if mark else 1
    line = min(max(line, 1), max(len(lines), 1))  # the end of the stream is past the last line

    def at(number: int, col: int, message: str) -> ProfileProblem:
        number = min(max(number, 1), max(len(lines), 1))
        return ProfileProblem(name, number, "", f"column {col}: {message}", excerpt=_excerpt(lines, number, col))

    def at_line_start(number: int, message: str) -> ProfileProblem:
        col = _indent(lines[number - 1]) + 1 if 1 <= number <= len(lines) else 1
        return at(number, col, message)

    if "'\\t'" in problem or "tab character" in problem:
        return at(line, column, "a tab character; YAML indents with spaces only (replace the tab with spaces)")
    if "quoted scalar" in context and "end of stream" in problem and context_mark:
        return at(context_mark.line + 1, context_mark.column + 1, "a quote opened here is never closed")
    if "unknown escape character" in problem:
        return at(line, column, "a backslash in a double-quoted string starts an escape that YAML does not know: use "
                                "single quotes for Windows paths ('C:\\data'), or double the backslash")
    opened = _open_quote_line(lines, line)
    if opened is not None and opened < line:
        quote_col = max(lines[opened - 1].find('"'), lines[opened - 1].find("'")) + 1
        return at(opened, quote_col, "a quote opened on this line is not closed on it (YAML reads on to the next "
                                     "quote)")
    if "flow sequence" in context and context_mark:
        return at(context_mark.line + 1, context_mark.column + 1,
                  "a '[' opened here is never closed (a list in brackets needs its ']', items separated by ',')")
    if "flow mapping" in context and context_mark:
        return at(context_mark.line + 1, context_mark.column + 1,
                  "a '{' opened here is never closed (a mapping in braces needs its '}', items separated by ',')")
    if "mapping values are not allowed" in problem:
        here = lines[line - 1] if line <= len(lines) else ""
        if ": " in here[:column - 1].lstrip(" -"):
            return at(line, column, "a second ': ' on this line: a value that contains ': ' must be in quotes")
        previous = _previous_content_line(lines, line)
        if previous is not None:
            above = lines[previous - 1].split(" #")[0].rstrip()
            if ":" not in above and not above.lstrip().startswith("- "):
                return at_line_start(previous, "this line has no ':' (each line of a mapping is `key: value`)")
            if _indent(here) > _indent(lines[previous - 1]):
                return at_line_start(line, f"indented more than line {previous} above, which already has its value: "
                                           "check the spaces")
        return at(line, column, "a ':' where YAML does not expect a key: check the indentation, or put the value "
                                "in quotes")
    if "could not find expected ':'" in problem and context_mark:
        return at_line_start(context_mark.line + 1, "this line has no ':' (each line of a mapping is `key: value`)")
    if "expected <block end>" in problem or "did not find expected key" in problem \
            or "did not find expected '-'" in problem:
        found = problem.rsplit("found ", 1)[-1].strip("'")
        if found == "-":
            return at_line_start(line, "a list item ('- ') where `key: value` lines are expected: check the "
                                       "indentation")
        if found in ("]", "}"):
            return at(line, column, f"a closing '{found}' that no bracket opened")
        if found == "<scalar>" and mark and line <= len(lines) and lines[line - 1][:column - 1].rstrip().endswith(("'", '"')):
            return at(line, column, "text after a closing quote: put the whole value inside the quotes")
        if found == ":" or found == "<scalar>" and mark and lines and lines[line - 1].lstrip().startswith(":"):
            return at(line, column, "a ':' with no key before it")
        previous = _previous_content_line(lines, line)
        hint = ""
        if previous is not None and line <= len(lines):
            hint = (f" (it starts at column {_indent(lines[line - 1]) + 1}, line {previous} above at column "
                    f"{_indent(lines[previous - 1]) + 1})")
        return at_line_start(line, f"indentation does not match the lines above{hint}: check the spaces")
    if "undefined alias" in problem:
        alias = problem.split("alias ")[-1].strip("'")
        return at(line, column, f"*{alias} is an alias (*name) with no anchor (&{alias}) before it")
    if "another document" in problem:
        return at(line, column, "a second document starts here (---): a profile is one document")
    if "document start" in problem:
        return at(line, column, "content after the end of the document ('...'): a profile is one document")
    if "could not determine a constructor" in problem:
        tag = problem.rsplit("tag ", 1)[-1]
        return at(line, column, f"unknown tag {tag}: profiles use plain values (remove the tag, or quote the value)")
    if "unhashable key" in problem:
        return at(line, column, "a key must be plain text, not a list or a mapping")
    if "that cannot start any token" in problem:
        char = problem.split("'")[1] if "'" in problem else "this character"
        return at(line, column, f"'{char}' cannot start a value: put the value in quotes")
    if "block scalar" in context:
        return at(line, column, "a value starting with '|' or '>' begins a block of text on the lines below: put a "
                                "value that starts with them in quotes")
    if "directive" in context or "directive" in problem:
        return at(line, column, "'%' at the start of a line begins a YAML directive: put a value that starts with it "
                                "in quotes")
    if "an anchor" in context or "an alias" in context:
        return at(line, column, "'&' and '*' start an anchor or an alias and must be followed by a name: put a value "
                                "that starts with them in quotes")
    if "a tag" in context:
        return at(line, column, "'!' starts a tag: put a value that starts with it in quotes")
    if "sequence entries are not allowed" in problem:
        return at(line, column, "a list item ('- ') where a value was expected: put a value that starts with '- ' in "
                                "quotes, or check the indentation")
    if "mapping keys are not allowed" in problem:
        return at(line, column, "'? ' starts a complex key: put a value that starts with it in quotes")
    if "expected the node content" in problem:
        found = problem.rsplit("found ", 1)[-1]
        return at(line, column, f"{found} where a value was expected: put the value in quotes")
    described = f"{context}: {problem}" if context else problem
    return at(line, column, f"not valid YAML ({described})")
