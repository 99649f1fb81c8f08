"""Texts for tokenizer parity tests: each entry is chosen to exercise a different part of a
byte-level BPE (the pre-tokenizer split, multi-byte characters, merges across whitespace,
special-token matching)."""
import heapq
import json.decoder
import string
import textwrap


def _source(module) -> str:
    with open(module.__file__, encoding="utf-8") as f:
        return f.read()


# Whole files: indentation, comments, docstrings, operators, string escapes.
PYTHON = [_source(m) for m in (json.decoder, textwrap, heapq, string)]

PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity.",
    "Don't worry -- we'll see; they've said it's fine. I'm sure you'd agree, wouldn't you? "
    "DON'T SHOUT. O'Brien's dog's bowl.",
    "Mr. Smith paid $1,234.56 on 2024-06-01 at 09:30 (about 15% more than last year's 1,070).",
    "Email me at someone@example.com or visit the docs/tokenizers page; use --help for flags.",
    "“Curly quotes”, ‘single ones’, an em—dash, an en–dash, an ellipsis… and «guillemets».",
    "naïve café résumé façade Ångström jalapeño Straße İstanbul ﬁnance",
    "e\u0301 (combining acute) vs \u00e9 (precomposed); A\u030a vs \u00c5.",
]

SCRIPTS = [
    "机器学习是人工智能的一个分支。它使计算机能够从数据中学习，而无需明确编程。",
    "الذكاء الاصطناعي هو محاكاة الذكاء البشري في الآلات المبرمجة للتفكير مثل البشر.",
    "कृत्रिम बुद्धिमत्ता मशीनों द्वारा प्रदर्शित बुद्धिमत्ता है। यह एक तेज़ी से बढ़ता क्षेत्र है।",
    "Машинное обучение — это класс методов искусственного интеллекта. Ёлка, щи, объём.",
    "東京は日本の首都です。ひらがな、カタカナ、漢字を混ぜて書きます。ｶﾀｶﾅ（半角）も。",
    "한국어 텍스트입니다. 안녕하세요!",
    "Ελληνικά: η γρήγορη καφέ αλεπού. עברית: שלום עולם. ไทย: สวัสดีครับ",
    "Tiếng Việt có dấu: Người ta nói rằng trăm nghe không bằng một thấy.",
]

EMOJI = [
    "I love it 😀😃😄! Thumbs up 👍🏽👍🏿 and hearts ❤️💔",
    "Family 👨\u200d👩\u200d👧\u200d👦, rainbow flag 🏳️\u200d🌈, technologist 🧑🏾\u200d💻",
    "Flags 🇯🇵🇫🇷🇧🇷, keycaps 1️⃣2️⃣#️⃣, zero width joiner alone: a\u200db, ZWNJ: a\u200cb",
    "Math: ∑_{i=1}^n x_i² ≤ ∞, ∀ε>0 ∃δ; arrows → ⇒ ↔; box ░▒▓█",
]

DIGITS = [
    "1234567890",
    "3.14159265358979323846264338327950288419716939937510",
    "0x1F 0b1010 1e-9 6.02e23 -42 +7 1_000_000",
    "year2024 v1.2.3 ipv4 192.168.0.1 phone +1-555-0100",
    "Arabic-Indic ٠١٢٣٤٥٦٧٨٩ Devanagari ०१२३ fullwidth １２３ superscripts ²³ fractions ½¼",
    "x=12345678901234567890;y=00000",
]

WHITESPACE = [
    "",
    " ",
    "\n",
    "   ",
    "\t\t\t",
    "\n\n\n",
    " \n \t \r\n ",
    "  leading and trailing  ",
    "\tindented\n\t\tmore\n",
    "a  b   c    d     e",
    "line one\r\nline two\r\n\r\nline four",
    "non\u00a0breaking\u2003em\u3000ideographic\u2028line\u2029para",
    "trailing newline\n",
    "words   \n   words",
    # whitespace right before digits: where SmolLM2's digit split changes the ids
    "x  1",
    "total:\t\t42\n\n7 items",
    "    return 10\n        x = 200",
]

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n",
    "before<|endoftext|>after",
    "<|im_end|><|im_end|><|endoftext|>",
    "partial <|im_ and <|im_end| and im_end|> and <|endoftext",
    " <|im_start|> spaced <|im_end|> ",
    "<repo_name>tailtune<file_sep>engine/tokenizer.py",
    "<|IM_END|> is not special (case differs)",
]

ALL = PYTHON + PROSE + SCRIPTS + EMOJI + DIGITS + WHITESPACE + SPECIALS

# Strings with special-token text, for property tests that splice them into random text.
SPECIAL_STRINGS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_", "|>", "<", "\n",
                   " ", "  ", "1", "22", "\t"]
