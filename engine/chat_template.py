"""Chat templates: Jinja code from model files, rendered in a bounded sandbox.

A template is untrusted code. Jinja's immutable sandbox (set up the way `transformers` does it,
so prompts match `apply_chat_template` character for character) keeps it away from Python's
internals; the bounds here keep it away from time and memory.
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import re
import threading
import time
import types
from datetime import datetime

from .errors import InputError, is_int, optional_import
from .tokenizer import ChatTemplateError, _clip


# A chat template is code from a model file. Jinja's sandbox keeps it away from Python's
# internals, not from time and memory: one call can ask for a string of gigabytes
# ('a'.ljust(1500000000)), a few nested loops for hours. So every operation that can build
# something large is measured before it runs, and each render has a budget of time, loop
# iterations and characters built that it cannot exceed. The limits are far above what real
# templates use (SmolLM2's renders in well under a millisecond).
_MAX_BUILD = 1_000_000        # longest string / list one `*` may build
_MAX_TEXT = 10_000_000        # longest string / list any other operation may build; longest prompt
_MAX_BUILT = 256_000_000      # characters (or list items) all operations of one render may build
_MAX_POWER_BITS = 1_000_000   # largest integer `**` or `*` may build, in bits
_MAX_STEPS = 10_000_000       # loop iterations of one render
_MAX_RANGE_ITEMS = 1_000_000  # items all range() calls of one render may make
_MAX_TEMPLATE = 1_000_000     # longest template source, in characters (real ones: a few KB)
_RENDER_SECONDS = 5.0         # wall time of one render


def _jinja():
    return optional_import("jinja2", "jinja2.ext", "jinja2.sandbox", error=ChatTemplateError,
                           what="chat templates")


class _Budget:
    """What the render under way may still spend. Each bounded operation charges its result
    here as well, so that many operations, each allowed, cannot add up to what one may not do."""

    __slots__ = ("deadline", "built", "steps", "range_items")

    def __init__(self):
        self.deadline = time.monotonic() + _RENDER_SECONDS
        self.built, self.steps, self.range_items = _MAX_BUILT, _MAX_STEPS, _MAX_RANGE_ITEMS

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _refused(f"it ran for more than {_RENDER_SECONDS:g} s (a loop that does not "
                           "end?)")

    def step(self) -> None:
        """Called at each loop's start and every 256 iterations of loops over iterables of
        no known length (reading the clock on each would cost more)."""
        if self.steps <= 0:
            raise _refused(f"its loops ran more than {_MAX_STEPS} iterations")
        self.check_time()


_render = threading.local()  # .budget: the _Budget of the render this thread runs, if any


def _budget() -> _Budget | None:
    return getattr(_render, "budget", None)


def _refused(message: str):
    """The error a bound raises: the sandbox's own, so the render reports it as refused."""
    from jinja2.exceptions import SecurityError
    return SecurityError(message)


def _build(n: int, what: str) -> None:
    """Refuse an operation that would build `n` characters (or items) past the limit, else
    charge it to the render's budget."""
    if n > _MAX_TEXT:
        raise _refused(f"{what} would build {n} characters or items (at most {_MAX_TEXT})")
    budget = _budget()
    if budget is not None and n > 0:
        budget.built -= n
        if budget.built < 0:
            raise _refused(f"it built more than {_MAX_BUILT} characters or items in all")


def _counted(out, what: str):
    """`out`, charged to the render's budget if it is a string or list (what it retains)."""
    if isinstance(out, _SEQUENCES):
        _build(len(out), what)
    return out


_TEXT = (str, bytes, bytearray)
_SEQUENCES = (str, bytes, bytearray, list, tuple)
_SCALARS = (str, bytes, bytearray, int, float, type(None))
_VIEWS = (type({}.items()), type({}.keys()), type({}.values()))
_END = object()


def _text_size(v, limit: int = _MAX_TEXT, indent: int = 0, sep: int = 2) -> int:
    """About how many characters str(v), or its JSON with `indent` and separators of `sep`
    characters, has: at least that many, up to a constant factor for escapes. Stops once past
    `limit`. A list holding one string a million times is small in memory but prints it a
    million times, so printing is measured first."""
    if isinstance(v, _TEXT):
        return len(v)
    total, visited, budget = 0, 0, _budget()
    stack, open_ = [(iter((v,)), None, 0)], set()  # (children, their container, depth)
    while stack:
        children, owner, depth = stack[-1]
        x = next(children, _END)
        if x is _END:
            stack.pop()
            open_.discard(id(owner))
            continue
        total += sep + indent * depth
        inner = None if isinstance(x, _SCALARS) else _children(x)
        if inner is None:
            total += _scalar_size(x)
        elif id(x) in open_:
            total += 5  # a container inside itself prints as [...]
        else:
            open_.add(id(x))
            stack.append((iter(inner), x, depth + 1))
        visited += 1
        if total > limit:
            return total
        if budget is not None and not visited & 4095:
            budget.check_time()
    return total


def _children(x):
    """What a container prints, or None for a value that is not one."""
    if isinstance(x, dict):
        return itertools.chain.from_iterable(x.items())
    if isinstance(x, (list, tuple, set, frozenset, *_VIEWS)):
        return x
    from jinja2.utils import Namespace
    if isinstance(x, Namespace):
        attrs = object.__getattribute__(x, "_Namespace__attrs")
        return itertools.chain.from_iterable(attrs.items())
    return None


def _scalar_size(x) -> int:
    if isinstance(x, _TEXT):
        return len(x) + 2
    if isinstance(x, int):
        return x.bit_length() // 3 + 2  # decimal digits, over-estimated
    if isinstance(x, float) or x is None:
        return 25
    return 100  # an object: its repr names its type (and address)


def _add(*terms):
    """`a + b + c ...` (at least two terms): one call for a whole chain, as real templates add
    a few strings for every message. The sum is measured after the fact (its terms exist, so it
    costs at most their size), since a loop adding a string to itself would double memory on
    each pass."""
    for t in terms:
        if type(t) is not str:
            return _add_any(terms)
    out = "".join(terms)  # what adding them left to right gives, in one pass
    if len(out) > 256:  # (short ones are not worth the budget's bookkeeping)
        _build(len(out), "`+`")
    return out


def _add_any(terms):
    out = terms[0]
    for x in terms[1:]:
        if isinstance(out, _SEQUENCES) and isinstance(x, _SEQUENCES):
            _build(len(out) + len(x), "`+`")  # lists: before, a list of references is big
        out = out + x
    return out


def _check_binop(operator: str, left, right) -> None:
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, _SEQUENCES) and isinstance(n, int):
                if len(seq) * n > _MAX_BUILD:
                    raise _refused(f"the template repeats a sequence of {len(seq)} items {n} "
                                   f"times (more than {_MAX_BUILD} in all)")
                _build(len(seq) * n, "`*`")
        if (isinstance(left, int) and isinstance(right, int)
                and left.bit_length() + right.bit_length() > _MAX_POWER_BITS):
            raise _refused(f"the template multiplies integers of {left.bit_length()} and "
                           f"{right.bit_length()} bits: more than {_MAX_POWER_BITS} bits")
    elif operator == "%":
        if isinstance(left, _TEXT):
            _check_printf(left, right, "`%` formatting")
    elif (isinstance(left, int) and isinstance(right, int) and right > 0
          and left.bit_length() * right > _MAX_POWER_BITS):
        raise _refused(f"the template raises an integer to the power {right}: more than "
                       f"{_MAX_POWER_BITS} bits")


# printf-style conversion after '%' and its (key): flags, width, '.' precision, one length
# modifier, as Python's own parser reads them (ASCII digits only there)
_PRINTF_SPEC = re.compile(r"[-+ #0]*(\*|[0-9]*)(?:\.(\*|[0-9]*))?[hlL]?")


def _check_printf(fmt, args, what: str) -> None:
    """Bound printf-style formatting (`fmt % args`, the format filter) before it runs: its
    widths and precisions, and the arguments it prints, against the result limit."""
    fmt = fmt if isinstance(fmt, str) else bytes(fmt).decode("latin-1")
    total, i = len(fmt) + _text_size(args), 0
    while (i := fmt.find("%", i) + 1) > 0:
        i = _skip_key(fmt, i)
        m = _PRINTF_SPEC.match(fmt, i)
        for number in m.groups():
            if number == "*":
                raise _refused(f"{what} takes a width from its arguments ('*'), which chat "
                               "templates may not")
            total += _width(number, what)
        i = m.end() + 1  # past the conversion character ('%' of '%%' too)
    _build(total, what)


def _skip_key(fmt: str, i: int) -> int:
    """Past the (key) of a conversion starting at i, if it has one: its parentheses nest."""
    if not fmt.startswith("(", i):
        return i
    depth = 0
    for j in range(i, len(fmt)):
        depth += (fmt[j] == "(") - (fmt[j] == ")")
        if depth == 0:
            return j + 1
    return len(fmt)


def _width(number: str | None, what: str) -> int:
    if not number:
        return 0
    if len(number) > 8:  # int() of a long digit string is slow, and past 4300 digits refused
        raise _refused(f"{what} asks for a width of {_clip(number, 20)} (at most {_MAX_TEXT})")
    return int(number)


def _spec_numbers(spec: str, what: str) -> int:
    """The sum of the numbers in a str.format spec: at least its width and precision, however
    the spec spells them (a digit as fill character only adds a little)."""
    return sum(_width(d, what) for d in re.findall(r"\d+", spec))


# ---- calls: str / bytes methods that build from a size argument

def _check_pad(s, args, kwargs, name):
    width = args[0] if args else None
    if is_int(width):
        _build(max(width, len(s)), f"str.{name}")
    return args


def _check_expandtabs(s, args, kwargs, name):
    size = args[0] if args else kwargs.get("tabsize", 8)
    if is_int(size):
        _build(len(s) + s.count(b"\t" if isinstance(s, (bytes, bytearray)) else "\t")
               * max(size, 0), f"str.{name}")
    return args


def _check_replace(s, args, kwargs, name):
    if len(args) >= 2 and all(isinstance(a, type(s)) for a in args[:2]):
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        _build(_replaced_size(s, args[0], args[1], count), f"str.{name}")
    return args


def _replaced_size(s, old, new, count) -> int:
    n = s.count(old) if old else len(s) + 1  # an empty `old` matches between every character
    if is_int(count) and count >= 0:
        n = min(n, count)
    return len(s) + n * max(len(new) - len(old), 0)


def _check_join(s, args, kwargs, name):
    if not args:
        return args
    items = list(args[0])  # read once here, to measure; the join gets the list
    total = len(s) * max(len(items) - 1, 0)
    for x in items:
        total += len(x) if isinstance(x, _TEXT) else 0
        if total > _MAX_TEXT:
            break
    _build(total, f"str.{name}")
    return (items, *args[1:])


def _check_translate(s, args, kwargs, name):
    table = args[0] if args else None
    values = table.values() if isinstance(table, dict) else table if isinstance(
        table, (list, tuple)) else ()
    if isinstance(s, str):
        longest = max((len(v) for v in values if isinstance(v, str)), default=1)
        _build(len(s) * max(longest, 1), f"str.{name}")
    return args


_METHOD_CHECKS = {"ljust": _check_pad, "rjust": _check_pad, "center": _check_pad,
                  "zfill": _check_pad, "expandtabs": _check_expandtabs,
                  "replace": _check_replace, "join": _check_join, "translate": _check_translate}


def _checked_call_args(obj, args: tuple, kwargs: dict) -> tuple:
    """Measure a call to a str / bytes method that builds from a size argument (or
    int.to_bytes) before it runs; the arguments to call it with."""
    owner = getattr(obj, "__self__", None)
    if not isinstance(obj, types.BuiltinMethodType) or owner is None:
        return args
    if isinstance(owner, _TEXT) and obj.__name__ in _METHOD_CHECKS:
        return _METHOD_CHECKS[obj.__name__](owner, args, kwargs, obj.__name__)
    if isinstance(owner, int) and obj.__name__ == "to_bytes":
        length = args[0] if args else kwargs.get("length", 1)
        if is_int(length):
            _build(length, "int.to_bytes")
    return args


# ---- filters

def _printed(value, *args, **kwargs):
    """For a filter that prints its value: a list prints each item, as often as it is there."""
    if not isinstance(value, _TEXT):
        _build(_text_size(value), "printing a value")
    return value


def _center(value, width=80):
    _printed(value)
    if is_int(width):
        _build(width, "the center filter")
    return value


def _indent(s, width=4, first=False, blank=False):
    if isinstance(s, str):
        w = len(width) if isinstance(width, str) else width if is_int(width) else 0
        _build(len(s) + (s.count("\n") + 2) * max(w, 0), "the indent filter")
    return s


def _wordwrap(s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True):
    if isinstance(s, str):
        wrap = len(wrapstring) if isinstance(wrapstring, str) else 1
        _build(len(s) * (1 + wrap), "the wordwrap filter")  # at most a break per character
    return s


def _join(value, d="", attribute=None):
    items = list(value)  # read once here, to measure; the filter gets the list
    total = _text_size(d) * max(len(items) - 1, 0)
    for x in items:
        total += _text_size(x)
        if total > _MAX_TEXT:
            break
    _build(total, "the join filter")
    return items


def _replace(s, old, new, count=None):
    for x in (s, old, new):
        _printed(x)
    _build(_replaced_size(str(s), str(old), str(new), count), "the replace filter")
    return s


def _format(value, *args, **kwargs):
    _printed(value)
    _check_printf(str(value), kwargs or args, "the format filter")
    return value


def _batch(value, linecount, fill_with=None):
    _check_count(linecount if fill_with is not None else 0, "the batch filter")
    return value


def _slice(value, slices, fill_with=None):
    _check_count(slices, "the slice filter")  # one list per slice, even an empty one
    return value


def _check_count(n, what: str) -> None:
    """A count of items made from nothing (padding, empty slices): bounded as `*` is."""
    if is_int(n) and n > _MAX_BUILD:
        raise _refused(f"{what} would make {n} items (at most {_MAX_BUILD})")
    _build(n if is_int(n) else 0, what)


def _pprint(value):
    _build(_text_size(value, indent=1), "the pprint filter")
    return value


_FILTER_CHECKS = {"center": _center, "indent": _indent, "wordwrap": _wordwrap, "join": _join,
                  "replace": _replace, "format": _format, "batch": _batch, "slice": _slice,
                  "pprint": _pprint,
                  **{name: _printed for name in (
                      "string", "e", "escape", "forceescape", "safe", "upper", "lower",
                      "capitalize", "title", "trim", "striptags", "wordcount", "urlize",
                      "urlencode", "xmlattr", "truncate")}}


def _bounded_filter(name: str, f, check=None):
    """`f` as a context filter that first checks the render's clock (a chain of slow filters
    has no loop for the step budget to count) and runs `check` on its arguments, which may
    hand back a value to use instead (an iterable read into a list to measure it). A context
    filter is never run at compile time, where no budget applies."""
    from jinja2 import pass_context
    kind = getattr(getattr(f, "jinja_pass_arg", None), "name", None)
    first = {"context": lambda c: (c,), "eval_context": lambda c: (c.eval_ctx,),
             "environment": lambda c: (c.environment,)}.get(kind, lambda c: ())
    what = f"the {name} filter"

    @pass_context
    @functools.wraps(f)
    def run(context, value, /, *args, **kwargs):
        budget = _budget()
        if budget is not None:
            budget.check_time()
        if check is not None:
            value = check(value, *args, **kwargs)
        return _counted(f(*first(context), value, *args, **kwargs), what)

    return run


def _sum(environment, iterable, attribute=None, start=0):
    """jinja's sum, except that lists and tuples are joined in one pass: added one by one, each
    addition copies the growing total (quadratic), and the total is measured first."""
    from jinja2.filters import make_attrgetter, sync_do_sum
    if not isinstance(start, (list, tuple)):
        return sync_do_sum(environment, iterable, attribute, start)
    if attribute is not None:
        iterable = map(make_attrgetter(environment, attribute), iterable)
    items = list(iterable)
    _build(len(start) + sum(len(x) if isinstance(x, _SEQUENCES) else 1 for x in items),
           "the sum filter")
    same = list(itertools.takewhile(lambda x: type(x) is type(start), items))
    total = type(start)(itertools.chain(start, *same))
    for x in items[len(same):]:  # another type: added as Python adds it (a TypeError, mostly)
        total = total + x
    return total


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters (<, >, &, '), which would change the prompt.
    width = len(indent) if isinstance(indent, str) else max(indent, 0) if is_int(indent) else 0
    sep = sum(len(s) for s in separators if isinstance(s, str)) if isinstance(
        separators, (list, tuple)) else 2
    _build(_text_size(x, indent=width, sep=sep + 1), "the tojson filter")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _finalize(value):
    """Every {{ ... }} value before it is printed: a list prints each item, as often as it is
    there, so it is measured first. (A string exists already; what the template prints is
    bounded by _generate, and inside macros and {% set %} blocks by _concat.)"""
    if type(value) is not str:
        _build(_text_size(value), "printing a value")
    return value


def _concat(parts) -> str:
    """The output of a macro, call or {% set %} block joined, measured first."""
    parts = list(parts)
    _build(sum(map(len, parts)), "a block's output")
    return "".join(parts)


@functools.lru_cache(maxsize=1)
def _environment():
    """Jinja's immutable sandbox with transformers' settings and helpers. The sandbox refuses
    underscore attributes (the way to Python internals), unsafe callables and in-place changes
    to the caller's objects; the bounds above keep a template from running for hours or
    building gigabytes."""
    jinja2 = _jinja()
    from jinja2.sandbox import (ImmutableSandboxedEnvironment, SandboxedEscapeFormatter,
                                SandboxedFormatter, safe_range)
    from markupsafe import Markup

    class Sized:
        """str.format fields measured before they are formatted: width and precision, and
        the value printed (a list prints every item)."""

        def vformat(self, format_string, args, kwargs):
            self.size = len(format_string)
            out = super().vformat(format_string, args, kwargs)
            _build(len(out), "str.format")
            return out

        def format_field(self, value, format_spec):
            self.size += _spec_numbers(format_spec, "str.format") + _text_size(value)
            if self.size > _MAX_TEXT:
                raise _refused(f"str.format would build more than {_MAX_TEXT} characters")
            return super().format_field(value, format_spec)

    class Formatter(Sized, SandboxedFormatter):
        pass

    class EscapeFormatter(Sized, SandboxedEscapeFormatter):
        pass

    class CodeGenerator(jinja2.compiler.CodeGenerator):
        def visit_Template(self, node, frame=None):
            # each for loop's iterable through _loop_items, as a filter (Jinja allows no new
            # node types, and a call would go through the sandbox's slower call())
            for loop in list(node.find_all(jinja2.nodes.For)):
                loop.iter = jinja2.nodes.Filter(loop.iter, _LOOP_FILTER, [], [], None, None,
                                                lineno=loop.lineno)
            super().visit_Template(node, frame)

        def visit_Const(self, node, frame):
            # Jinja writes a constant as its repr, which for 1e400 is `inf`, a NameError when
            # run. It rarely showed while filters folded constants at compile time; ours do not.
            self.write(_const_source(node.as_const(frame.eval_ctx)))

        @jinja2.compiler.optimizeconst
        def visit_Add(self, node, frame):
            # a chain a + b + c ... in one call to _add: through call_binop, one call per `+`,
            # real templates (which add strings for every message) would render 2x slower
            terms = [node.right]
            while isinstance(node.left, jinja2.nodes.Add):
                node = node.left
                terms.append(node.right)
            self.write("environment.add(")
            for term in [node.left, *reversed(terms)]:
                self.visit(term, frame)
                self.write(", ")
            self.write(")")

        @jinja2.compiler.optimizeconst
        def visit_Getitem(self, node, frame):
            if not isinstance(node.arg, jinja2.nodes.Slice):
                return super().visit_Getitem(node, frame)
            # a slice copies: through Environment.sliced, which counts the copy (Jinja writes
            # a plain x[a:b], past the environment)
            self.write("environment.sliced(")
            self.visit(node.node, frame)
            self.write(", slice(")
            for part in (node.arg.start, node.arg.stop, node.arg.step):
                if part is None:
                    self.write("None")
                else:
                    self.visit(part, frame)
                self.write(", ")
            self.write("))")

        @jinja2.compiler.optimizeconst
        def visit_Concat(self, node, frame):
            # `~` through a size check; the join itself is Jinja's (as in CodeGenerator)
            if frame.eval_ctx.volatile:
                join = "(markup_join if context.eval_ctx.volatile else str_join)"
            else:
                join = "markup_join" if frame.eval_ctx.autoescape else "str_join"
            self.write(f"environment.joined({join}, (")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "%"])
        code_generator_class = CodeGenerator
        concat = staticmethod(_concat)
        add = staticmethod(_add)

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return self.binop_table[operator](left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            budget = _budget()
            if budget is not None:
                budget.check_time()  # macros can recurse into each other with no loop
            if isinstance(__obj, jinja2.runtime.LoopContext) and args:
                args = (_loop_items(args[0]), *args[1:])  # a recursive loop's next level
            args = _checked_call_args(__obj, args, kwargs)
            return _counted(super().call(__context, __obj, *args, **kwargs), "a call")

        def sliced(self, obj, part):
            return _counted(obj[part], "a slice")

        def joined(self, join, parts):
            _build(sum(_text_size(p) for p in parts), "`~`")
            return join(parts)

        def wrap_str_format(self, value):
            if (not isinstance(value, (types.MethodType, types.BuiltinMethodType))
                    or value.__name__ not in ("format", "format_map")
                    or not isinstance(value.__self__, str)):
                return None
            return functools.update_wrapper(
                lambda *args, **kwargs: self.format_string(value.__self__, args, kwargs, value),
                value)

        def format_string(self, s, args, kwargs, format_func=None):
            # (also what Jinja before 3.1.5 calls for str.format, with format_func the method)
            if getattr(format_func, "__name__", "") == "format_map":
                if len(args) != 1 or kwargs:
                    raise TypeError("format_map() takes exactly one positional argument")
                args, kwargs = (), args[0]
            formatter = (EscapeFormatter(self, escape=s.escape) if isinstance(s, Markup)
                         else Formatter(self))
            return type(s)(formatter.vformat(s, args, kwargs))

        def unsafe_undefined(self, obj, attribute):
            # Jinja returns an Undefined that prints as "" and fails only when used further;
            # a template reaching for Python internals should fail right there, visibly.
            raise jinja2.exceptions.SecurityError(
                f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for transformers'
        assistant masks; rendering keeps the body unchanged."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body)
            return call.set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = Environment(trim_blocks=True, lstrip_blocks=True, finalize=_finalize,
                      extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters["sum"] = jinja2.pass_environment(_sum)
    env.filters = {name: _bounded_filter(name, f, _FILTER_CHECKS.get(name))
                   for name, f in env.filters.items()}
    # a context filter: never folded into a constant at compile time, uncounted
    env.filters[_LOOP_FILTER] = jinja2.pass_context(lambda context, items: _loop_items(items))
    env.globals["lipsum"] = _no_lipsum
    env.globals["range"] = functools.partial(_range, safe_range)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _namespace_class(jinja2)
    return env


def _const_source(val) -> str:
    """Python source of a template constant (what Jinja's visit_Const writes), with floats
    that are not finite spelled so that they run."""
    if isinstance(val, float):
        return str(val) if math.isfinite(val) else f"float({str(val)!r})"
    if isinstance(val, (list, tuple, set, frozenset)) and val:
        items = "".join(_const_source(x) + ", " for x in val)
        return {list: f"[{items}]", tuple: f"({items})", set: f"{{{items}}}",
                frozenset: f"frozenset(({items}))"}[type(val)]
    if isinstance(val, dict) and val:
        return "{" + "".join(f"{_const_source(k)}: {_const_source(v)}, "
                             for k, v in val.items()) + "}"
    return repr(val)


_LOOP_FILTER = "loop items"  # a name no template can write (a filter name is an identifier)


def _loop_items(items):
    """A for loop's iterable, its iterations counted against the render's step budget: all at
    once when it has a length, one by one if not. A short loop runs over the iterable itself,
    as in Jinja; a long one reads the clock every 256 iterations, since its body may print
    many pieces without a call or loop of its own that would."""
    budget = _budget()
    if budget is None:
        return items
    try:
        n = len(items)
    except TypeError:
        return _counted_items(items, budget)
    budget.steps -= n
    budget.step()
    return items if n <= 256 else _TimedItems(items, budget)


def _counted_items(items, budget):
    for x in items:
        budget.steps -= 1
        if not budget.steps & 255:
            budget.step()
        yield x


class _TimedItems:
    """A long loop's iterable, counted already: its length for loop.length and loop.last,
    the clock read as it goes."""

    __slots__ = ("items", "budget")

    def __init__(self, items, budget):
        self.items, self.budget = items, budget

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        for k, x in enumerate(self.items):
            if not k & 255:
                self.budget.check_time()
            yield x


def _range(safe_range, *args):
    """The sandbox's range (at most 100000 items), within the render's budget of items."""
    items = safe_range(*args)
    budget = _budget()
    if budget is not None:
        budget.range_items -= len(items)
        if budget.range_items < 0:
            raise _refused(f"its range() calls made more than {_MAX_RANGE_ITEMS} items in all")
    return items


def _no_lipsum(*args, **kwargs):
    # Jinja's lorem-ipsum generator: lipsum(n=10**7) takes minutes, and no chat template needs
    # it. A stub rather than nothing, so that lipsum.__globals__ still meets the sandbox.
    raise _refused("lipsum() is not available to chat templates")


class _TemplateRaised(Exception):
    """raise_exception(...) called by the template: it rejects the conversation."""


def _raise_exception(message):
    _printed(message)
    raise _TemplateRaised(_clip(str(message), 1000))


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without handing them the `dict` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@functools.lru_cache(maxsize=1)
def _namespace_class(jinja2):
    class Namespace(jinja2.utils.Namespace):
        """Jinja's namespace, refusing underscore names (they could shadow internals)."""

        def __init__(*args, **kwargs):  # same signature trick as jinja2.utils.Namespace
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"namespace attribute {name!r}: underscore names are not allowed")

    return Namespace


def _compile(source):
    if not isinstance(source, str):
        raise ChatTemplateError(f"a chat template must be a string, got {type(source).__name__}")
    if len(source) > _MAX_TEMPLATE:
        raise ChatTemplateError(f"the chat template has {len(source)} characters, more than the "
                                f"{_MAX_TEMPLATE} a chat template may have")
    return _compiled(source)


@functools.lru_cache(maxsize=16)
def _compiled(source: str):
    jinja2 = _jinja()
    try:
        return _environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {e.lineno}): "
                                f"{e.message}") from None
    except (RecursionError, MemoryError, SyntaxError) as e:  # nesting past the parser's stack
        raise ChatTemplateError(f"the chat template cannot be compiled ({type(e).__name__}: "
                                f"{_clip(str(e))}): nested too deeply?") from None


def render_chat_template(source: str, messages, add_generation_prompt: bool = True,
                         **variables) -> str:
    """Render a chat template in the sandbox. Messages are copied to plain JSON data first, so
    the template never sees the caller's objects; keys whose value is None are dropped, as
    transformers drops them (templates test for a missing key, not for None)."""
    jinja2 = _jinja()
    template = _compile(source)
    chat = [_message(m) for m in messages]
    variables = {k: _plain(v) for k, v in variables.items()}
    try:
        return _generate(template, messages=chat, add_generation_prompt=bool(add_generation_prompt),
                         **variables)
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"the chat template tried an operation the sandbox forbids "
                                f"(model files are untrusted; refusing to render): "
                                f"{_clip(str(e))}") from None
    except _TemplateRaised as e:
        raise ChatTemplateError(f"the chat template rejected the messages: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed: {_clip(str(e))}") from None
    except MemoryError:
        raise ChatTemplateError("the chat template ran out of memory (model files are "
                                "untrusted; refusing to render)") from None
    except Exception as e:  # the template is code from the model file: whatever it raises
        # (RecursionError, cycler()'s RuntimeError, a NameError for an `inf` literal, ...)
        raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: "
                                f"{_clip(str(e))}") from None


def _generate(template, **context) -> str:
    """The template rendered within a fresh budget, its output cut off past _MAX_TEXT. (Its
    render function straight, not through generate(), which costs a generator per chunk and
    only rewrites tracebacks, which the caller drops.)"""
    saved, _render.budget = _budget(), _Budget()
    try:
        out, n = [], 0
        for chunk in template.root_render_func(template.new_context(context)):
            n += len(chunk)
            if n > _MAX_TEXT:
                raise _refused(f"the prompt it renders passes {_MAX_TEXT} characters")
            out.append(chunk)
        return "".join(out)
    finally:
        _render.budget = saved


def _message(m) -> dict:
    if not isinstance(m, dict):
        raise InputError(f"chat messages must be dicts like {{'role': ..., 'content': ...}}, "
                         f"got {type(m).__name__}")
    return {k: _plain(v) for k, v in m.items() if v is not None}


def _plain(v):
    """JSON-like data rebuilt from plain types; anything else becomes an inert '<TypeName>'
    string (objects could carry methods the sandbox does not know to be dangerous)."""
    if v is None or type(v) in (str, int, float, bool):
        return v
    if isinstance(v, str):
        return str.__str__(v)
    if isinstance(v, int):
        return int.__int__(v)
    if isinstance(v, float):
        return float.__float__(v)
    if isinstance(v, dict):
        return {_plain(k): _plain(x) for k, x in v.items()}
    if isinstance(v, tuple) and type(v) is tuple:
        return tuple(_plain(x) for x in v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and callable(v.item) and getattr(v, "shape", None) == ():
        return _plain(v.item())  # a numpy scalar
    return f"<{type(v).__name__}>"
