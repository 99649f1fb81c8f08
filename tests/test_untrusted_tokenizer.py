"""Tokenizer files and chat templates from a model are untrusted input. Hostile ones must end in
the engine's own errors (TokenizerError, ChatTemplateError), soon and without a large
allocation: never a hang, an out-of-memory kill, a raw Python error or a pyo3 PanicException
(a BaseException that `except Exception` misses), and never a local file read through a link.

Each test names the defect it guards; the inputs are the security review's reproductions.
"""
import contextlib
import json
import os
import signal
import time
import tracemalloc

import numpy as np
import pytest

import engine
import engine.chat_template
from engine.chat_template import render_chat_template
from engine.tokenizer import ByteTokenizer, ChatTemplateError, TokenizerError
from gguf_fixtures import VT, write_gguf

MSGS = [{"role": "user", "content": "hi"}]


class _Hung(BaseException):
    """Raised by the alarm; a BaseException, so no handler under test turns it into a pass."""


@contextlib.contextmanager
def finishes_within(seconds: int):
    """Fail, rather than hang the test run, when the code under test does not finish."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def alarm(*_):
        raise _Hung(f"did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def small_and_quick(seconds: float = 10, megabytes: int = 128):
    """The block must finish within `seconds` and allocate at most `megabytes` at its peak."""
    tracing = tracemalloc.is_tracing()
    tracemalloc.start() if not tracing else tracemalloc.reset_peak()
    t = time.monotonic()
    try:
        with finishes_within(int(seconds) + 20):
            yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        if not tracing:
            tracemalloc.stop()
    assert time.monotonic() - t < seconds
    assert peak < megabytes << 20, f"peak allocation {peak >> 20} MB"


def refused(source: str, match: str = "sandbox forbids"):
    with small_and_quick():
        with pytest.raises(ChatTemplateError, match=match):
            render_chat_template(source, MSGS)


@pytest.fixture
def short_renders(monkeypatch):
    """Renders stop after 0.5 s instead of 5, to keep the tests quick."""
    monkeypatch.setattr(engine.chat_template, "_RENDER_SECONDS", 0.5)


# ---------------------------------------------------------------------------------------------
# 1. Chat templates: time and memory inside the sandbox


# One operation each, asking for about 1.5 GB.
SIZE_BOMBS = {
    "ljust": "{{ 'a'.ljust(1500000000) }}",
    "rjust": "{{ 'a'.rjust(1500000000) }}",
    "center": "{{ 'a'.center(1500000000) }}",
    "zfill": "{{ 'a'.zfill(1500000000) }}",
    "%-width": "{{ '%01500000000d' % 1 }}",
    "%-precision": "{{ '%.1500000000f' % 1.0 }}",
    "%-key": "{{ '%(x)1500000000d' % {'x': 1} }}",
    "%-nested-key": "{{ '%(a(b))1500000000d' % {'a(b)': 1} }}",
    "%-length-modifier": "{{ '%l%%1500000000d' % (1,) }}",
    "%-star": "{{ '%*d' % (1500000000, 1) }}",
    "%-many-widths": "{{ ('%1000000d' * 1500) % ((1,) * 1500) }}",  # each allowed alone
    "format-filter": "{{ '%01500000000d'|format(1) }}",
    "str.format": "{{ '{:>1500000000}'.format(1) }}",
    "str.format-nested": "{{ '{:{}}'.format(1, 1500000000) }}",
    "str.format_map": "{{ '{x:>1500000000}'.format_map({'x': 1}) }}",
    "expandtabs": "{{ ('a\t' * 1000).expandtabs(2000000) }}",
    "replace": "{{ ('a' * 100000).replace('a', 'a' * 100000) }}",
    "replace-empty": "{{ ('a' * 1000000).replace('', 'b' * 20) }}",
    "str.join": "{{ ('x' * 10000).join(['a'] * 100000) }}",
    "join-filter": "{{ (range(100000)|list)|join('x' * 10000) }}",
    "center-filter": "{{ 'a'|center(1500000000) }}",
    "indent-filter": "{{ ('a\n' * 300000)|indent(10000) }}",
    "wordwrap-filter": "{{ ('a ' * 500000)|wordwrap(1, wrapstring='x' * 100) }}",
    "tojson-indent": "{{ messages|tojson(indent=1000000000) }}",
    "translate": "{{ ('a' * 100000).translate({97: 'b' * 100000}) }}",
    "to_bytes": "{{ (1).to_bytes(1500000000, 'big') }}",
    "bytes-times": "{{ 'ab'.encode() * 1000000000 }}",
    "batch-fill": "{{ range(3)|batch(1500000000, 0)|list }}",
    "slice-filter": "{{ range(3)|slice(1500000000)|list }}",
    "sum-lists": "{{ ([[0] * 1000000] * 2000)|sum(start=[]) }}",
    "int-times": "{% set x = 3 ** 400000 %}{{ x * x }}",
}


@pytest.mark.parametrize("source", SIZE_BOMBS.values(), ids=SIZE_BOMBS)
def test_template_operations_that_build_gigabytes_are_refused(source):
    refused(source)


# Each doubles a string or list: 40 times would be a terabyte.
DOUBLINGS = {
    "~": "{% set x = 'a' * 1000000 %}" + "{% set x = x ~ x %}" * 40,
    "+": "{% set x = 'a' * 1000000 %}" + "{% set x = x + x %}" * 40,
    "list+": "{% set ns = namespace(s=[0] * 1000000) %}{% for i in range(40) %}"
             "{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "set-block": "{% set x = 'a' * 1000000 %}" + "{% set x %}{{ x }}{{ x }}{% endset %}" * 40,
    "macro": "{% macro twice(s) %}{{ s }}{{ s }}{% endmacro %}{% set x = 'a' * 1000000 %}"
             + "{% set x = twice(x) %}" * 40,
    # a block printing one piece many times
    "set-block-loop": "{% set s = 'x' * 100000 %}{% set x %}{% for i in s %}" + "abcdefghij" * 1000
                      + "{% endfor %}{% endset %}",
}
# A list of 2^40 references to one string: small in memory, a terabyte when printed.
NESTED = "{% set x = 'a' * 1000 %}" + "{% set x = [x, x] %}" * 40
PRINTINGS = ["{{ x }}", "{{ x|tojson }}", "{{ x|string }}", "{{ x|join }}", "{{ x|pprint }}",
             "{{ x ~ '' }}", "{{ '%s' % [x] }}", "{{ '{}'.format(x) }}",
             "{{ x|map('string')|list }}", "{{ raise_exception(x) }}", "{{ x|e }}",
             "{% set ns = namespace(a=x) %}{{ ns }}", "{{ dict(a=x).items() }}"]
DOUBLINGS.update({f"nested-list {p}": NESTED + p for p in PRINTINGS})


@pytest.mark.parametrize("source", DOUBLINGS.values(), ids=DOUBLINGS)
def test_template_doubling_is_refused(source):
    refused(source)


# Each would run for hours.
SLOW = {
    "nested-range": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                    "{% endfor %}",
    "nested-str": "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}"
                  "{% endfor %}",
    "nested-generator": "{% set s = 'x' * 100000 %}{% for a in s|map('upper') %}"
                        "{% for b in s|map('upper') %}{% endfor %}{% endfor %}",
    "one-long-loop": "{% set t = 'x' * 1000000 %}{% set s = t ~ t ~ t ~ t ~ t %}"
                     "{% for a in s %}{% if a == 'y' %}{% endif %}{% endfor %}",
    "macro-recursion": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}"
                       "{% endmacro %}{{ f(60) }}",
    "recursive-loop": "{% set s = range(20)|list %}{% for x in s recursive %}"
                      "{% if loop.depth < 8 %}{{ loop(s) }}{% endif %}{% endfor %}",
    "lipsum": "{{ lipsum(n=10000000) }}",
    "int-squaring": "{% set ns = namespace(x=3 ** 100000) %}{% for i in range(40) %}"
                    "{% set ns.x = ns.x * ns.x %}{% endfor %}",
}


@pytest.mark.parametrize("source", SLOW.values(), ids=SLOW)
def test_template_that_runs_long_is_stopped(short_renders, source):
    refused(source)


def test_rendered_prompt_is_capped():
    refused("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", match="passes 10000000")


def test_template_failures_are_chat_template_errors(monkeypatch):
    # 7. cycler() raises RuntimeError; a MemoryError anywhere in the render is converted too
    with pytest.raises(ChatTemplateError, match="RuntimeError"):
        render_chat_template("{{ cycler() }}", MSGS)

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(json, "dumps", no_memory)
    with pytest.raises(ChatTemplateError, match="out of memory"):
        render_chat_template("{{ messages|tojson }}", MSGS)


def test_template_limits_keep_ordinary_work():
    """The bounds are far above what templates do: large but sane inputs render as in
    transformers."""
    from transformers.utils.chat_template_utils import render_jinja_template
    template = ("{% for m in messages %}{{ '<|' + m.role + '|>' + m.content + '\n' }}"
                "{{ m.content|trim|length }} {{ (m.content ~ '!')[-2:] }} "
                "{{ '%5d|%-4s|' % (7, 'ab') }}{{ '%(k)s' % {'k': 1} }} {{ '{:>6}'.format('x') }} "
                "{{ 'ab'.ljust(4, '.') }} {{ m.content[:9]|center(13) }} {{ [1, 2]|join(', ') }} "
                "{{ range(5)|sum }} {{ (1e400, 1.5)|tojson }} {{ m.content.split()|length }} "
                "{{ (m.content ~ m.content)|wordcount }}{% endfor %}")
    chat = [{"role": "user", "content": "word " * 200000}]  # a 1 MB message
    ref = render_jinja_template([chat], chat_template=template)
    assert render_chat_template(template, chat) == (ref[0][0] if isinstance(ref, tuple) else ref[0])


# Templates as models ship them, in the styles of transformers' usual families: rendered by the
# engine and by transformers, they must agree character for character.
LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
{%- endif %}
{{- system_message }}{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}{{- '"parameters": ' }}{{- tool_call.arguments | tojson }}{{- "}" }}{{- "<|eot_id|>" }}
    {%- else %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}{{- message.content | tojson }}{%- else %}{{- message.content }}{%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""

GEMMA = """{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"""

MISTRAL = """{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}{{- bos_token }}{%- for message in loop_messages %}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}{%- if message['role'] == 'user' %}{%- if loop.first and system_message is defined %}{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}{%- endif %}{%- endfor %}"""

QWEN = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}
        {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.function.name }}{{- '", "arguments": ' }}{{- tool_call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}{%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

PHI3 = """{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"""

CHAT = [{"role": "user", "content": "  Hello <b>there</b> ünï\n"},
        {"role": "assistant", "content": "<think>hmm</think>\nHi! How can I help?"},
        {"role": "user", "content": "Weather in Paris, 2 days?"}]
TOOLS = [{"type": "function", "function": {
    "name": "weather", "description": "Forecast", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}}}}}]
TOOL_CHAT = CHAT + [
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "weather", "arguments": {"city": "Paris", "days": 2}}}]},
    {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "22 C"}]


REAL = {
    "llama3": (LLAMA3, [{"role": "system", "content": " Be brief. "}] + CHAT, None),
    "llama3-tools": (LLAMA3, CHAT + TOOL_CHAT[3:4], TOOLS),
    "gemma": (GEMMA, CHAT, None),
    "mistral": (MISTRAL, [{"role": "system", "content": "Be brief."}] + CHAT, None),
    "qwen-tools": (QWEN, TOOL_CHAT, TOOLS),
    "qwen": (QWEN, [{"role": "system", "content": "sys"}] + CHAT, None),
    "phi3": (PHI3, CHAT, None),
}


@pytest.mark.parametrize("template, chat, tools", REAL.values(), ids=REAL)
@pytest.mark.parametrize("gen", [True, False])
def test_real_templates_render_as_transformers(template, chat, tools, gen):
    from transformers.utils.chat_template_utils import render_jinja_template
    specials = {"bos_token": "<s>", "eos_token": "</s>"}
    ref = render_jinja_template([chat], tools=tools, chat_template=template,
                                add_generation_prompt=gen, **specials)
    ref = ref[0][0] if isinstance(ref, tuple) else ref[0]
    assert render_chat_template(template, chat, add_generation_prompt=gen, tools=tools,
                                **specials) == ref


def test_gemma_template_still_rejects_bad_roles():
    with pytest.raises(ChatTemplateError, match="rejected the messages: Conversation roles"):
        render_chat_template(GEMMA, CHAT[1:], bos_token="<bos>")


# ---------------------------------------------------------------------------------------------
# Tokenizer files to build on


def byte_dir(d):
    """A tokenizer directory that needs no tokenizers library (a ByteTokenizer's files)."""
    ByteTokenizer().save(d)
    return d


def bpe_dir(d, mutate=None, config=None):
    """A tokenizer.json directory loaded through the tokenizers library: the ByteTokenizer's
    byte-level BPE, edited by `mutate(tokenizer_json)`, with `config` as tokenizer_config.json."""
    ByteTokenizer().save(d)
    os.remove(os.path.join(d, "tokenizer_config.json"))
    if mutate is not None:
        with open(os.path.join(d, "tokenizer.json")) as f:
            tj = json.load(f)
        mutate(tj)
        with open(os.path.join(d, "tokenizer.json"), "w") as f:
            json.dump(tj, f)
    if config is not None:
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    return d


GGUF_BASE = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
             "tokenizer.ggml.merges": ["t 0"], "tokenizer.ggml.eos_token_id": 1,
             "tokenizer.ggml.tokens": ["t", "0", "t0"] + [f"x{i}" for i in range(93)]}


def gguf_with(path, metadata: dict):
    """A GGUF holding tokenizer metadata only: GGUF_BASE updated with `metadata`."""
    write_gguf(path, "llama", {**GGUF_BASE, **metadata}, {})
    return path


# ---------------------------------------------------------------------------------------------
# 2. check_vocab: one id of 2e9 must not become a list of 2e9 ids


def test_vocab_check_names_the_token_without_listing_every_id(tmp_path):
    d = bpe_dir(tmp_path, lambda tj: tj["model"]["vocab"].__setitem__("zzzq", 2_000_000_000))
    with small_and_quick():
        with pytest.raises(TokenizerError, match=r"ids run to 2000000000 .* 300 entries.*"
                                                 r"token\(s\) 'zzzq' are past"):
            engine.load_tokenizer(d, model_vocab_size=300)


# ---------------------------------------------------------------------------------------------
# 3. Links and special files in a model directory


def test_template_linked_out_of_the_model_directory_is_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2")
    d = byte_dir(tmp_path / "model")
    os.symlink(secret, d / "chat_template.jinja")
    with pytest.raises(TokenizerError, match="chat_template.jinja: links to .*secret.txt, "
                                             "outside the model directory"):
        engine.load_tokenizer(d)
    os.remove(d / "chat_template.jinja")
    (d / "additional_chat_templates").mkdir()
    os.symlink(secret, d / "additional_chat_templates" / "tool_use.jinja")
    with pytest.raises(TokenizerError, match="tool_use.jinja: links to"):
        engine.load_tokenizer(d)


def test_links_inside_the_model_directory_and_the_hf_cache_are_followed(tmp_path):
    d = byte_dir(tmp_path / "model")
    (d / "templates").mkdir()
    (d / "templates" / "t.jinja").write_text("{{ 'inside' }}")
    os.symlink("templates/t.jinja", d / "chat_template.jinja")
    assert engine.load_tokenizer(d).chat_template == "{{ 'inside' }}"
    # the Hugging Face cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "hub" / "models--org--name"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    byte_dir(snap)
    for name in os.listdir(snap):
        os.replace(snap / name, blobs / name)
        os.symlink(os.path.join("..", "..", "blobs", name), snap / name)
    (blobs / "tpl").write_text("{{ 'cached' }}")
    os.symlink("../../blobs/tpl", snap / "chat_template.jinja")
    assert engine.load_tokenizer(snap).chat_template == "{{ 'cached' }}"
    # a --local-dir download whose large files link into the cache
    local = byte_dir(tmp_path / "local")
    os.symlink(blobs / "tpl", local / "chat_template.jinja")
    assert engine.load_tokenizer(local).chat_template == "{{ 'cached' }}"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_files_are_refused_without_blocking(tmp_path):
    d = byte_dir(tmp_path / "model")
    (d / "additional_chat_templates").mkdir()
    os.mkfifo(d / "additional_chat_templates" / "x.jinja")
    with finishes_within(10), pytest.raises(TokenizerError, match="x.jinja: a FIFO, not a "
                                                                  "regular file"):
        engine.load_tokenizer(d)
    os.remove(d / "additional_chat_templates" / "x.jinja")
    os.symlink("/dev/zero", d / "additional_chat_templates" / "x.jinja")
    with finishes_within(10), pytest.raises(TokenizerError, match="links to /dev/zero"):
        engine.load_tokenizer(d)
    os.remove(d / "additional_chat_templates" / "x.jinja")
    os.remove(d / "tokenizer_config.json")
    os.mkfifo(d / "tokenizer_config.json")
    with finishes_within(10), pytest.raises(TokenizerError, match="tokenizer_config.json: a FIFO"):
        engine.load_tokenizer(d)
    os.mkfifo(tmp_path / "fifo")
    with finishes_within(10), pytest.raises(TokenizerError, match="fifo: not a regular file"):
        engine.load_tokenizer(tmp_path / "fifo")


def test_oversized_template_file_is_refused(tmp_path):
    d = byte_dir(tmp_path)
    (d / "chat_template.jinja").write_text("x" * ((1 << 20) + 1))
    with pytest.raises(TokenizerError, match=r"chat_template.jinja: 1048577 bytes, more than"):
        engine.load_tokenizer(d)


# ---------------------------------------------------------------------------------------------
# 4. Panics inside the tokenizers library


def _split_regex(tj):
    tj["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(a+)+$"},
                           "behavior": "Isolated", "invert": False}


def _missing_special(tj):
    tj["post_processor"] = {"type": "TemplateProcessing",
                            "single": [{"SpecialToken": {"id": "<q>", "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}}],
                            "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                            "special_tokens": {}}


def _garbage_charsmap(tj):
    tj["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": "AAAAAAAA"}


@pytest.mark.parametrize("mutate", [_split_regex, _missing_special, _garbage_charsmap],
                         ids=lambda f: f.__name__.strip("_"))
def test_panic_in_tokenizers_library_is_a_tokenizer_error(tmp_path, mutate):
    tok = engine.load_tokenizer(bpe_dir(tmp_path, mutate))
    text = "a" * 40 + "!"
    with pytest.raises(TokenizerError, match="encoding a text: the tokenizers library crashed"):
        tok.encode(text)
    with pytest.raises(TokenizerError, match="the tokenizers library crashed"):
        tok.encode_batch(["ok", text])


def test_panic_building_a_gguf_vocabulary_is_a_tokenizer_error(tmp_path, monkeypatch):
    """(The vocabularies that made the library panic here, repeated tokens, are refused before
    it now; a panic is stood in for.)"""
    import tokenizers

    class PanicException(BaseException):   # pyo3's, matched by name
        pass

    def panics(*a, **k):
        raise PanicException("index out of range")
    monkeypatch.setattr(tokenizers.models, "BPE", panics)
    p = gguf_with(tmp_path / "t.gguf", {})
    with pytest.raises(TokenizerError, match="GGUF vocabulary and merges.*crashed"):
        engine.load_tokenizer(p)


def test_a_repeated_gguf_token_is_named(tmp_path):
    """llama.cpp asserts the tokens are distinct (llama-vocab.cpp): a file that repeats one is
    refused, naming it, not read with one of its ids unreachable."""
    p = gguf_with(tmp_path / "t.gguf", {"tokenizer.ggml.tokens": ["t", "0"] * 48})
    with pytest.raises(TokenizerError, match=r"holds 't' twice \(ids 0 and 2\)"):
        engine.load_tokenizer(p)


# ---------------------------------------------------------------------------------------------
# 5. GGUF tokenizer metadata of the wrong type


@pytest.mark.parametrize("key, value, expected", [
    ("tokenizer.ggml.model", np.array([1, 2], np.int32), "a string"),
    ("tokenizer.ggml.model", ["gpt2", "x"], "a string"),
    ("tokenizer.ggml.pre", np.array([1, 2], np.int32), "a string"),
    ("tokenizer.ggml.pre", ["gpt2"], "a string"),
    ("tokenizer.ggml.tokens", ([["t"], ["0"]], VT.ARRAY), "an array of strings"),
    ("tokenizer.ggml.merges", np.array([1], np.int32), "an array of strings"),
    ("tokenizer.ggml.token_type", 5, "an array of integers of 96 elements"),
    ("tokenizer.ggml.token_type", [f"x{i}" for i in range(96)], "an array of integers"),
    ("tokenizer.ggml.token_type", ([[1]] * 96, VT.ARRAY), "an array of integers"),
    ("tokenizer.ggml.token_type", np.array([1] * 95, np.int32),
     r"an array of integers of 96 elements \(one per token\), got an array of 95 int32"),
    ("tokenizer.ggml.add_bos_token", "false", "a bool"),
    ("tokenizer.ggml.add_eos_token", np.array([1], np.int32), "a bool"),
    ("tokenizer.chat_template", 7, "a string"),
    ("tokenizer.chat_template", True, "a string"),
    ("tokenizer.chat_template", 1.5, "a string"),
    ("tokenizer.chat_template", np.array([1, 2], np.int32), "a string"),
    ("tokenizer.chat_template", ["{{ 1 }}"], "a string"),
])
def test_gguf_tokenizer_metadata_of_the_wrong_type_is_named(tmp_path, key, value, expected):
    p = gguf_with(tmp_path / "t.gguf", {key: value})
    with pytest.raises(TokenizerError, match=f"GGUF metadata {key} must be {expected}"):
        engine.load_tokenizer(p)


def test_gguf_merge_without_a_space_is_named(tmp_path):
    p = gguf_with(tmp_path / "t.gguf", {"tokenizer.ggml.merges": ["t0"]})
    with pytest.raises(TokenizerError, match="merges entry 't0' is not two tokens"):
        engine.load_tokenizer(p)


# ---------------------------------------------------------------------------------------------
# 6. BOS / EOS tokens whose text the post-processor's string form would parse


@pytest.mark.parametrize("bos", ["a:1", "$A", "x:0 $B:1"])
def test_bos_token_text_is_not_parsed(tmp_path, bos):
    tokens = ["t", "0", "t0", bos] + [f"x{i}" for i in range(92)]
    p = gguf_with(tmp_path / "t.gguf", {"tokenizer.ggml.tokens": tokens,
                                        "tokenizer.ggml.bos_token_id": 3,
                                        "tokenizer.ggml.add_bos_token": True,
                                        "tokenizer.ggml.add_eos_token": True})
    tok = engine.load_tokenizer(p)
    assert tok.special_tokens["bos_token"] == bos
    expected = [tok.bos_id, 0, 1, 0, 1, 1]  # BOS, t 0 t 0 (split apart by GPT-2's regex), EOS
    assert tok.encode("t0t0") == expected
    assert tok.encode("t0t0", add_special_tokens=False) == expected[1:-1]
    tok.save(tmp_path / "saved")   # the tokenizers library reads its own post-processor back
    import tokenizers
    assert tokenizers.Tokenizer.from_file(str(tmp_path / "saved" / "tokenizer.json")).encode(
        "t0t0").ids == expected


def test_declared_bos_token_with_a_space_is_added(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s> x", "add_bos_token": True}))
    tok = engine.load_tokenizer(tmp_path)
    assert tok.encode("ab") == [tok.bos_id, 2]


# ---------------------------------------------------------------------------------------------
# 8. JSON the parser refuses with RecursionError or ValueError


@pytest.mark.parametrize("name, text, match", [
    ("tokenizer_config.json", '{"a":' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
    ("special_tokens_map.json", '{"bos_token": ' + "9" * 5000 + "}", "4300 digits"),
    ("tokenizer_config.json", '{"x": 1', "Expecting"),
])
def test_json_the_parser_refuses_is_named(tmp_path, name, text, match):
    d = byte_dir(tmp_path)
    (d / name).write_text(text)
    with pytest.raises(TokenizerError, match=f"{name}: cannot read {name}: .*{match}"):
        engine.load_tokenizer(d)


# ---------------------------------------------------------------------------------------------
# 9. added_tokens_decoder keys that are not plain numbers


def test_added_tokens_decoder_keys_that_are_not_numbers(tmp_path):
    decl = {"²": {"content": "<a>", "special": True},   # isdigit(), but int() refuses it
            "9" * 5000: {"content": "<b>", "special": True},   # more digits than int() takes
            "300": {"content": "<c>", "special": True}}
    tok = engine.load_tokenizer(bpe_dir(tmp_path, config={"added_tokens_decoder": decl}))
    assert {tok.token_to_id(t) for t in ("<a>", "<b>", "<c>")} == {257, 258, 259}


# ---------------------------------------------------------------------------------------------
# 10. End-of-generation ids of generation_config.json


@pytest.mark.parametrize("eos, match", [
    ([2, -5], r"eos_token_id must be a token id or a list of token ids, got \[2, -5\]"),
    ("2", "eos_token_id must be a token id"),
    (10 ** 13, "eos_token_id 10000000000000 is past the tokenizer's vocabulary"),
])
def test_malformed_generation_eos_ids_are_refused(tmp_path, eos, match):
    d = bpe_dir(tmp_path)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    with pytest.raises(TokenizerError, match=match):
        engine.load_tokenizer(d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [256, 3]}))
    assert engine.load_tokenizer(d).eos_ids[:2] == (256, 3)
