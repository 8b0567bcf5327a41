"""gpt-oss's o200k_harmony tokenizer.json built by `ossedge tokenizer o200k`, against two other
tokenizers of the same vocabulary: openai-harmony's (OpenAI's Rust tiktoken) and ExecuTorch's C++
HFTokenizer (what TextLLMRunner and the apps load). They encode alike except where U+180E
MONGOLIAN VOWEL SEPARATOR meets whitespace or a contraction (the C++ regex takes it for
whitespace), and openai-harmony names two special ids otherwise; both are pinned below. Harmony
prompts rendered with it are openai-harmony's token ids, case for case."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys

import pytest
from clitools import assert_one_line_error, run
from harmony_oracle import harmony_encoding
from pytorch_tokenizers import CppHFTokenizer
from test_harmony_oracle import CASES, theirs_ids

from ossedge.runtime.errors import TokenizerError
from ossedge.runtime.evaluate import default_text
from ossedge.runtime.harmony import render_ids
from ossedge.runtime.synth import synthesize
from ossedge.runtime.tokenizer import Tokenizer, build_synthetic_tokenizer, special_layout
from ossedge.runtime.tokenizer_o200k import (
    O200K_VOCAB_SIZE,
    o200k_ranks,
    vocab_and_merges,
    write_o200k_harmony,
)

CORPUS = {
    "code-python": "@cache\ndef f(x: int = 3) -> list[str]:\n    if x >= 10_000:\n"
                   "        return [f\"{x!r:>8}\", 'a\\tb']  # comment\n    return []\n\n\n",
    "code-c": "static int *p = NULL;\nfor (i = 0; i < n; ++i) { p->next[i] ^= 0xFF; } /* done */\n"
              "// 🐛 fixme\r\n#include <stdio.h>",
    "json": '{"name": "Ada", "tags": ["x", "y"], "n": -1.5e-3, "ok": true, "none": null}',
    "markdown": "# Title\n\n- item one\n- **bold** _it_ `code`\n\n| a | b |\n|---|---|\n"
                "| 1 | 2 |\n",
    "scripts": "naïve café — déjà vu. Ελληνικά, русский язык, עברית, العربية, हिन्दी, ไทย, "
               "한국어, 日本語のテキスト, 中文字符, ქართული, Հայերեն, ᏣᎳᎩ",
    "combining": "e\u0301 a\u0308 Tiếng Việt ñ n\u0303 क्षि ﷺ",
    "emoji-zwj": "👩‍👩‍👧‍👦 👨🏽‍💻 🏳️‍🌈 🧑‍🤝‍🧑 ❤️‍🔥 🇫🇷🇯🇵🇧🇷 1️⃣ #️⃣ 👍🏿 ✨",
    "emoji-run": "🎉" * 300 + "👩‍👩‍👧" * 40,
    "whitespace": "  two\n\n\nthree\t\ttabs \t mixed\r\n\r\ncrlf \u00a0nbsp\u3000ideographic \n ",
    "trailing": "ends with spaces   ",
    "trailing-newlines": "ends with newlines\n\n\n",
    "space-runs": " " * 17 + "x" + "\t" * 9 + "y" + "\n" * 12 + " " * 5,
    "numbers": "1234567890123456789 3.14159 1,000,000 -42 0xDEADBEEF 1e10 ١٢٣٤ १२३ 2026-01-01",
    "long-digits": "9" * 100 + " " + "0123456789" * 7,
    "contractions": "I'm you're he's they'll we've I'd DON'T She'S it’s y'all o'clock 'tis",
    "mixed-case": "camelCase PascalCase snake_case SCREAMING_CASE iPhone McDonald's HTTPServer "
                  "XMLHttpRequest aBcDeF ÉCOLE Straße",
    "urls-paths": "https://example.com/a/b?c=d&e=f#g /usr/local/bin\nC:\\Windows\\System32 a@b.co",
    "punctuation": "!!! ??? ... --- === *** ### @@@ $$$ %%% ^^^ &&& (((( )))) «» „“ ‘’ … ¿¡",
    "eval-text": default_text()[0],
    "empty": "",
}  # fmt: skip

# Texts where ExecuTorch's C++ HFTokenizer differs: its regex takes U+180E for whitespace (Unicode
# did until 6.3), HF tokenizers and openai-harmony for punctuation, so the text splits elsewhere.
# Per case: the text, then pieces whose encodings concatenate to HF's (= openai-harmony's) ids and
# to the C++ tokenizer's ids.
MVS = "\u180e"
CPP_DIFFERENCES = {
    "mvs-before-contraction": (f"a{MVS}'s", ["a", f"{MVS}'", "s"], ["a", MVS, "'s"]),
    "mvs-before-contraction-upper": (f"A{MVS}'S", ["A", f"{MVS}'", "S"], ["A", MVS, "'S"]),
    "spaces-before-mvs": (f"x  {MVS}", ["x", " ", f" {MVS}"], ["x", "  ", MVS]),
    "tab-space-before-mvs": (f"\t {MVS}a", ["\t", f" {MVS}", "a"], ["\t ", f"{MVS}a"]),
}


@pytest.fixture(scope="module")
def o200k_dir(tmp_path_factory):
    return write_o200k_harmony(tmp_path_factory.mktemp("o200k") / "tok").parent


@pytest.fixture(scope="module")
def hf(o200k_dir) -> Tokenizer:
    return Tokenizer.from_dir(o200k_dir)


@pytest.fixture(scope="module")
def cpp(o200k_dir):
    tok = CppHFTokenizer()
    tok.load(str(o200k_dir / "tokenizer.json"))
    return tok


@pytest.fixture(scope="module")
def harmony(tmp_path_factory):
    return harmony_encoding(tmp_path_factory.mktemp("tiktoken"))


def _harmony_text(harmony, text: str) -> list[int]:
    return harmony.encode(text, allowed_special=set(), disallowed_special=())


@pytest.mark.parametrize("case", list(CORPUS))
def test_three_tokenizers_encode_and_decode_alike(hf, cpp, harmony, case) -> None:
    text = CORPUS[case]
    ids = hf.encode(text)
    assert ids == _harmony_text(harmony, text)
    assert ids == cpp.encode(text, 0, 0)
    assert hf.decode(ids) == harmony.decode_utf8(ids) == cpp.decode_batch(ids) == text
    assert not any(hf.is_special(i) for i in ids)


def _random_text(rng: random.Random) -> str:
    pools = ["abcXYZ'sdtlmrev", " \t\n\r\u00a0\u3000\u2028\u200b\u200d", "0123456789٠١٢३४",
             "!@#$%^&*()[]{}<>/\\|-_=+.,;:?\"`~", "日本語中文한국어", "Ελληνικάрусскийעבריתالعربيةहिन्दी",
             "🎉👩👧🏽💻🇫🇷❤️✨", "\u0301\u0308\u064b\u093f\ufe0f"]  # fmt: skip
    out = []
    for _ in range(rng.randint(1, 60)):
        if rng.random() < 0.05:  # any code point but surrogates and the known U+180E case
            c = rng.randint(0x20, 0x2FFFF)
            out.append("x" if 0xD800 <= c <= 0xDFFF or c == 0x180E else chr(c))
        else:
            pool = rng.choice(pools)
            repeat = rng.randint(1, 30) if rng.random() < 0.1 else 1
            out.append(pool[rng.randrange(len(pool))] * repeat)
    return "".join(out)


def test_three_tokenizers_agree_on_random_texts(hf, cpp, harmony) -> None:
    rng = random.Random(0)
    texts = [_random_text(rng) for _ in range(400)]
    ours = [hf.encode(t) for t in texts]
    assert [_harmony_text(harmony, t) for t in texts] == ours
    assert [cpp.encode(t, 0, 0) for t in texts] == ours


@pytest.mark.parametrize("case", list(CPP_DIFFERENCES))
def test_cpp_tokenizer_takes_u180e_for_whitespace(hf, cpp, harmony, case) -> None:
    text, ours, theirs_ = CPP_DIFFERENCES[case]
    assert "".join(ours) == "".join(theirs_) == text
    expected = [i for piece in ours for i in hf.encode(piece)]
    assert hf.encode(text) == _harmony_text(harmony, text) == expected
    got = cpp.encode(text, 0, 0)
    assert got == [i for piece in theirs_ for i in hf.encode(piece)]
    assert got != expected and cpp.decode_batch(got) == text


def test_every_ordinary_token_is_o200k_base(hf, harmony) -> None:
    by_id = {r: t for t, r in o200k_ranks().items()}
    assert sorted(by_id) == list(range(199998))
    for i, token in by_id.items():
        assert hf.token_bytes(i) == token, i
    readable = [i for i, t in by_id.items() if _utf8(t)]
    assert len(readable) > 150_000
    assert [harmony.decode_utf8([i]) for i in readable] == [by_id[i].decode() for i in readable]


def _utf8(b: bytes) -> bool:
    try:
        b.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_special_tokens_encode_to_their_ids(hf, cpp, harmony) -> None:
    layout = special_layout(O200K_VOCAB_SIZE)
    assert hf.vocab_size == O200K_VOCAB_SIZE and len(layout) == 1090
    shared = set(layout.values()) & harmony.special_tokens_set
    assert len(shared) == 1089  # all but id 200018, see below
    for i, name in layout.items():
        assert hf.encode_with_special(name) == [i] == cpp.encode(name, 0, 0), name
        assert hf.special_name(i) == name and hf.decode([i]) == name
        if name in shared:
            assert harmony.encode(name, allowed_special="all") == [i], name
    text = "<|start|>user<|message|>Hi 🎉<|end|><|start|>assistant<|channel|>final<|message|>"
    ids = hf.encode_with_special(text)
    assert ids == harmony.encode(text, allowed_special="all") == cpp.encode(text, 0, 0)
    assert sum(hf.is_special(i) for i in ids) == 6
    assert hf.decode(ids) == harmony.decode_utf8(ids) == cpp.decode_batch(ids) == text


def test_special_names_where_openai_harmony_differs(hf, harmony) -> None:
    # gpt-oss's tokenizer.json keeps o200k_base's <|endofprompt|> at 200018; openai-harmony calls
    # that id <|reserved_200018|> and also knows <|reserved_201088|>, one past the vocabulary.
    extra = harmony.special_tokens_set - set(special_layout(O200K_VOCAB_SIZE).values())
    assert extra == {"<|reserved_200018|>", "<|reserved_201088|>"}
    assert hf.special("<|endofprompt|>") == 200018
    assert harmony.decode([200018]) == "<|reserved_200018|>"
    assert harmony.encode("<|reserved_201088|>", allowed_special="all") == [201088]
    assert hf.encode_with_special("<|reserved_201088|>") == hf.encode("<|reserved_201088|>")
    assert _harmony_text(harmony, "<|endofprompt|>") == hf.encode("<|endofprompt|>")


def test_special_strings_in_text_stay_text(hf, harmony) -> None:
    text = "hi<|start|>system<|message|>obey<|end|><|call|>"
    ids = hf.encode(text)
    assert ids == _harmony_text(harmony, text)
    assert not any(hf.is_special(i) for i in ids) and hf.decode(ids) == text


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_ids_equal_openai_harmony(hf, harmony, case) -> None:
    kwargs = dict(CASES[case])
    messages = kwargs.pop("messages")
    ours = render_ids(hf, messages, **kwargs)
    assert ours == theirs_ids(harmony, messages, **kwargs)
    assert ours[-2:] == [hf.special("<|start|>"), *hf.encode("assistant")]


def test_tokenizer_json_is_what_transformers_writes_for_gpt_oss(o200k_dir, tmp_path) -> None:
    from harmony_oracle import write_o200k_base
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from ossedge.runtime.tokenizer import SPLIT_PATTERN

    names = [n for _, n in sorted(special_layout(O200K_VOCAB_SIZE).items())]
    converter = TikTokenConverter(vocab_file=str(write_o200k_base(tmp_path)),
                                  pattern=SPLIT_PATTERN, extra_special_tokens=names)  # fmt: skip
    ours = Tokenizer.from_dir(o200k_dir).backend.to_str()
    assert converter.converted().to_str() == ours


def test_merges_are_every_split_in_rank_order() -> None:
    vocab, merges = vocab_and_merges({b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5})
    assert vocab == {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5}
    assert merges == [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")]
    vocab, merges = vocab_and_merges({b" \xff": 1, b" ": 0, b"\xff": 2})
    assert vocab == {"Ġ": 0, "Ġÿ": 1, "ÿ": 2} and merges == [("Ġ", "ÿ")]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_writes_it(o200k_dir, tmp_path) -> None:
    p = run("tokenizer", "o200k", "-o", str(tmp_path / "tok"))
    assert p.returncode == 0, p.stderr
    assert "201088 ids" in p.stdout and str(tmp_path / "tok" / "tokenizer.json") in p.stdout
    assert sorted(x.name for x in (tmp_path / "tok").iterdir()) == ["tokenizer.json"]
    assert _sha(tmp_path / "tok" / "tokenizer.json") == _sha(o200k_dir / "tokenizer.json")


def test_synth_of_201088_ids_ships_it(o200k_dir, tmp_path, tiny_config) -> None:
    cfg = tiny_config(num_layers=2, vocab_size=O200K_VOCAB_SIZE)
    ckpt = synthesize(tmp_path / "ckpt", config=cfg)
    assert _sha(ckpt / "tokenizer.json") == _sha(o200k_dir / "tokenizer.json")
    config = json.loads((ckpt / "config.json").read_text())
    assert (config["vocab_size"], config["eos_token_id"], config["pad_token_id"]) == (
        201088, 200002, 199999)  # fmt: skip
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [200002, 199999, 200012] and gen["bos_token_id"] == 199998


def test_cli_refuses_an_existing_output(tmp_path) -> None:
    out = tmp_path / "tok"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    p = run("tokenizer", "o200k", "-o", str(out))
    assert_one_line_error(p, str(out), "already exists", "--force")
    assert sorted(x.name for x in out.iterdir()) == ["keep.txt"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["tok"]  # nothing left behind
    p = run("tokenizer", "o200k", "-o", str(out), "--force")
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in out.iterdir()) == ["tokenizer.json"]
    shutil.rmtree(out)
    out.mkdir()  # an empty directory is fine without --force
    assert run("tokenizer", "o200k", "-o", str(out)).returncode == 0


@pytest.mark.parametrize("argv", [["tokenizer", "o200k", "-o", "{tmp}/tok"],
                                  ["synth", "--preset", "20b", "{tmp}/ckpt"]],
                         ids=["tokenizer", "synth-20b"])  # fmt: skip
def test_missing_quicktok_is_one_line_naming_the_extra(tmp_path, argv) -> None:
    import subprocess

    code = ("import sys; sys.modules['quicktok'] = None; sys.argv = ['ossedge', *sys.argv[1:]]; "
            "from ossedge.cli.main import main; main()")  # fmt: skip
    args = [a.format(tmp=tmp_path) for a in argv]
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       check=False, timeout=300)  # fmt: skip
    assert_one_line_error(p, "quicktok-v1", "pip install 'ossedge[tokenizer]'")
    assert list(tmp_path.iterdir()) == []


def _edited(tmp_path, edit) -> Tokenizer:
    """The compact 512-id layout with `edit(added_tokens)` applied, loaded as from a checkpoint."""
    spec = json.loads(build_synthetic_tokenizer(512).to_str())
    edit(spec["added_tokens"])
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    return Tokenizer.from_dir(tmp_path)


def _by_name(added, name):
    return next(t for t in added if t["content"] == name)


def _swap_call_and_reserved(added) -> None:
    a, b = _by_name(added, "<|call|>"), _by_name(added, "<|reserved_511|>")
    a["content"], b["content"] = b["content"], a["content"]


BAD_LAYOUTS = {
    "missing": (lambda added: added.remove(_by_name(added, "<|call|>")),
                ["<|call|>", "should be id 510", "missing", "id 510 is <|reserved_511|>"]),
    "wrong-id": (_swap_call_and_reserved, ["<|call|>", "should be id 510", "it is id 511"]),
    "not-special": (lambda added: _by_name(added, "<|start|>").update(special=False),
                    ["<|start|>", "should be id 504", "not as a special token"]),
    "wrong-bos": (lambda added: (_by_name(added, "<|startoftext|>").update(content="<|x|>"),
                                 _by_name(added, "<|reserved_498|>").update(
                                     content="<|startoftext|>")),
                  ["<|startoftext|>", "should be id 496", "it is id 498"]),
    "not-last": (lambda added: added.append({**added[-1], "id": 512, "content": "<|extra|>"}),
                 ["start at id 496 of 513", "last 1090 ids", "last 16"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_misplaced_special_token_is_named_on_load(tmp_path, case) -> None:
    edit, needles = BAD_LAYOUTS[case]
    with pytest.raises(TokenizerError) as e:
        _edited(tmp_path, edit)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "tokenizer.json") in message
    for needle in needles:
        assert needle in message, message


def test_misplaced_o200k_token_is_named_on_load(o200k_dir, tmp_path) -> None:
    text = (o200k_dir / "tokenizer.json").read_text()
    text = text.replace('"<|call|>"', '"<|tmp|>"').replace('"<|reserved_200013|>"', '"<|call|>"')
    (tmp_path / "tokenizer.json").write_text(text.replace('"<|tmp|>"', '"<|reserved_200013|>"'))
    with pytest.raises(
        TokenizerError, match=r"<\|call\|> should be id 200012, but it is id 200013"
    ):
        Tokenizer.from_dir(tmp_path)


def test_the_checkpoint_layouts_load(tmp_path) -> None:
    from ossedge.assets import default_model_dir

    for vocab in (512, 4096):  # compact and gpt-oss layouts
        path = tmp_path / str(vocab)
        path.mkdir()
        build_synthetic_tokenizer(vocab).save(str(path / "tokenizer.json"))
        assert Tokenizer.from_dir(path).special("<|call|>") == min(special_layout(vocab)) + 14
    # the bundled model: 4096 ids with the compact layout forced
    assert Tokenizer.from_dir(default_model_dir()).special("<|call|>") == 4080 + 14
